"""Corruptions without a model (`corrupt --backend rules`): quick runs, tests, and a baseline for the LLM ones.

Each function takes the current answer text and a random.Random and returns a changed text, or None when it finds
nothing to change. They follow the three operations of method.md section 1: REMOVE drops the sentence most
related to the question (the essential one), SUBSTITUTE changes a number or flips a negation or a comparison,
INSERT adds a sentence taken from another record.
"""

from __future__ import annotations

import random
import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
_NUMBER = re.compile(r"(?<![\w.])(\d+)(\.\d+)?(?![\w.]*\d)")
_STOP = set("""a an the of to in on for and or is are was were be been by with as at from that this it its
what which who how why when does do can into than then there their these those your you we our not""".split())

# Word pairs whose swap turns a true statement false; both directions are used.
_FLIPS = [("is not", "is"), ("are not", "are"), ("cannot", "can"), ("does not", "does"), ("increases", "decreases"),
          ("increase", "decrease"), ("larger", "smaller"), ("greater", "less"), ("more", "fewer"), ("higher", "lower"),
          ("always", "never"), ("true", "false"), ("maximum", "minimum"), ("before", "after"),
          ("positive", "negative"), ("faster", "slower"), ("inside", "outside"), ("left", "right"),
          ("odd", "even"), ("upper", "lower"), ("first", "last")]
_FLIP_TABLE = {}
for _x, _y in _FLIPS:
    _FLIP_TABLE.setdefault(_x, _y)
    _FLIP_TABLE.setdefault(_y, _x)
_FLIP_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _FLIP_TABLE), key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)

# Used by INSERT before the run has seen another record (the first record of a file).
FALLBACK_SENTENCES = [
    "The Great Wall of China is visible in many travel photographs.",
    "Many programming languages use curly braces to delimit blocks.",
    "Honey never spoils if it is stored in a sealed container.",
    "The violin has four strings tuned in fifths.",
    "Mount Everest lies on the border between Nepal and China.",
]


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if w.lower() not in _STOP}


def remove(text: str, question: str, rng: random.Random) -> str | None:
    sentences = split_sentences(text)
    if len(sentences) >= 2:
        q = _content_words(question)
        # The essential sentence: the one sharing most words with the question; the longest breaks ties.
        best = max(range(len(sentences)), key=lambda i: (len(q & _content_words(sentences[i])),
                                                        len(sentences[i]), -i))
        return " ".join(s for i, s in enumerate(sentences) if i != best)
    words = text.split()
    if len(words) < 4:
        return None
    # One sentence: keep its first half (the part that states the topic, losing what answers it).
    cut = max(2, len(words) // 2)
    return " ".join(words[:cut]).rstrip(",;:") + "."


def substitute(text: str, rng: random.Random) -> str | None:
    candidates = [("num", m) for m in _NUMBER.finditer(text)] + [("flip", m) for m in _FLIP_RE.finditer(text)]
    if not candidates:
        return None
    kind, m = rng.choice(candidates)
    if kind == "num":
        whole, frac = m.group(1), m.group(2) or ""
        value = int(whole)
        new = value + rng.choice([d for d in range(-9, 10) if d != 0 and value + d >= 0])
        replacement = f"{new}{frac}"
    else:
        word = m.group(1)
        replacement = _FLIP_TABLE[word.lower()]
        if word[0].isupper():
            replacement = replacement[0].upper() + replacement[1:]
    return text[: m.start()] + replacement + text[m.end():]


def insert(text: str, rng: random.Random, pool: list[str]) -> str | None:
    own = set(split_sentences(text))
    choices = [s for s in pool if s not in own] or [s for s in FALLBACK_SENTENCES if s not in own]
    sentence = rng.choice(choices)
    sentences = split_sentences(text) or [text]
    at = rng.randint(1, len(sentences)) if len(sentences) > 1 else 1
    return " ".join(sentences[:at] + [sentence] + sentences[at:])


class RulesLM:
    """The `rules` backend: no model, no requests; it applies one corruption operation to a text (`corrupt`).

    Declares the single capability `corrupt_rules`, so a command that needs chat or log-likelihoods refuses it
    with the usual message; `corrupt` asks for the capability instead of testing the backend's name."""

    name = "rules"
    model = "rules"
    capabilities = frozenset({"corrupt_rules"})

    def apply(self, op: str, text: str, question: str, rng: random.Random, pool: list[str]) -> str | None:
        return apply_rule(op, text, question, rng, pool)

    def counts(self) -> dict:
        return {}

    async def aclose(self) -> None:
        pass


def apply_rule(op: str, text: str, question: str, rng: random.Random, pool: list[str]) -> str | None:
    if op == "REMOVE":
        return remove(text, question, rng)
    if op == "SUBSTITUTE":
        return substitute(text, rng)
    if op == "INSERT":
        return insert(text, rng, pool)
    raise ValueError(op)
