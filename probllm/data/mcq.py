"""GSM8K, MATH, ARC and MMLU records to the one MCQ record shape (method.md section 2).

    {"id", "question", "choices": [str, ...], "answer": "A".., "source", "subject", ...kept input fields}

- GSM8K: `<<calc>>` annotations are stripped from the worked answer (kept as `solution`); the correct option is
  the `#### N` number, three distractors N + k with k a non-zero integer in [-10, 10]; options shuffled.
- MATH: the last `\\boxed{...}` (braces nest) is the answer; a distractor perturbs one number of it, picked at
  random, by a non-zero integer in [-5, 5], keeping the rest of the text (fractions, roots); repeated until three
  distinct distractors that differ from the answer. Answers without a number are counted and reported.
- ARC (original nested and Hugging Face export): labels `1..5` become letters, the true number of choices (3 to
  5 in the public files) is kept, order unchanged.
- MMLU (header-less CSV rows via `load --format mmlu-csv`, or the hub form with `choices` and an integer
  `answer`): order unchanged; `subjects` filters (the report's 23 subjects by default with `report`).
- Public benchmark items (ARC, MMLU) are never dropped or altered for their content: repeated option texts,
  3 or 5 options, numeric labels are kept as published (repeats are noted on stderr). Only the options mcqify
  generates (GSM8K, MATH) must be distinct.

Randomness comes from the one `random.Random(seed)` of the run, passed in.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from typing import Callable

from probllm.io import Record, RecordError, Skip, require
from probllm.records import LETTERS

# method.md section 2: the report's MMLU subjects (4,219 questions over test + validation + dev).
REPORT_SUBJECTS = (
    "abstract_algebra", "elementary_mathematics", "college_mathematics", "formal_logic", "high_school_mathematics",
    "high_school_statistics",
    "anatomy", "astronomy", "college_biology", "college_chemistry", "conceptual_physics", "college_physics",
    "high_school_biology", "high_school_chemistry", "high_school_physics", "virology", "medical_genetics",
    "college_computer_science", "high_school_computer_science", "machine_learning", "computer_security",
    "electrical_engineering",
    "logical_fallacies",
)
assert len(REPORT_SUBJECTS) == 23

SOURCES = ("gsm8k", "math", "arc", "mmlu", "auto")


def stable_id(prefix: str, *parts: str) -> str:
    """An id that depends only on the content, so reruns and reorderings keep it."""
    digest = hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:12]
    return f"{prefix}-{digest}"


MAX_NOTES = 10
_notes_logged = [0]


def _note_oddities(record: dict, choices: list[str], source: str) -> None:
    """A public benchmark item is kept exactly as published, even when its options repeat a text (the official
    MMLU test set has such questions; lm-eval scores them, the first of equal scores winning). Such items are only
    noted on stderr (the first MAX_NOTES), so that a user knows they are there."""
    if len(set(c.strip() for c in choices)) == len(choices) or _notes_logged[0] >= MAX_NOTES:
        return
    from probllm.io import log

    _notes_logged[0] += 1
    where = f"{getattr(record, 'source', '<input>')}:{getattr(record, 'line', '?')}"
    more = " (further notes of this kind are not shown)" if _notes_logged[0] == MAX_NOTES else ""
    log(f"probllm mcqify: note: {where}: {source} item repeats an option text; kept as published{more}")


def _shuffled(correct: str, distractors: list[str], rng: random.Random) -> tuple[list[str], str]:
    options = [correct, *distractors]
    rng.shuffle(options)
    return options, LETTERS[options.index(correct)]


def _keep(record: dict, *consumed: str) -> dict:
    return {k: v for k, v in record.items() if k not in consumed}


def _mcq(kept: dict, **fields) -> dict:
    """The MCQ fields first (easier to read), then every input field not replaced."""
    fields["id"] = str(fields["id"])
    return {**fields, **{k: v for k, v in kept.items() if k not in fields}}


# ---------------------------------------------------------------------------------------------------- GSM8K

_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def strip_calculator(text: str) -> str:
    """GSM8K's worked answers carry calculator annotations `<<48/2=24>>`: not for humans or models."""
    return _CALC.sub("", text)


def _format_number(value: float | int, decimals: int) -> str:
    return f"{value:.{decimals}f}" if decimals else str(int(value))


def gsm8k_to_mcq(record: dict, rng: random.Random) -> dict:
    question = require(record, "question", str)
    worked = require(record, "answer", str)
    m = _FINAL.search(worked)
    if not m:
        raise RecordError("no '#### N' final answer", field="answer")
    final = m.group(1).replace(",", "").replace("$", "").strip()
    if not _NUMBER.fullmatch(final):
        raise RecordError(f"final answer {final[:30]!r} is not a number", field="answer")
    decimals = len(final.split(".")[1]) if "." in final else 0
    value = float(final) if decimals else int(final)
    correct = _format_number(value, decimals)
    distractors: list[str] = []
    while len(distractors) < 3:
        k = rng.choice([k for k in range(-10, 11) if k])
        option = _format_number(value + k, decimals)
        if option != correct and option not in distractors:
            distractors.append(option)
    choices, letter = _shuffled(correct, distractors, rng)
    return _mcq(
        _keep(record, "answer"),
        id=record.get("id") or stable_id("gsm8k", question),
        question=question,
        choices=choices,
        answer=letter,
        source="gsm8k",
        subject=record.get("subject") or "grade_school_math",
        solution=strip_calculator(worked),
    )


# ----------------------------------------------------------------------------------------------------- MATH

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces nested; None when there is none or it is
    unbalanced. `\\boxed 5` (no braces) is read as `5`."""
    starts = list(_BOXED.finditer(text))
    if not starts:
        m = list(re.finditer(r"\\boxed ([^\s$]+)", text))
        return m[-1].group(1) if m else None
    i = starts[-1].end()
    depth, j = 1, i
    while j < len(text):
        c = text[j]
        if c == "\\" and j + 1 < len(text):
            j += 2  # an escaped brace \{ does not count
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
        j += 1
    return None


_MATH_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _numbers(answer: str) -> list[tuple[int, int, str]]:
    """(start, end, text) of each number; a minus sign counts when it is a sign (start, or after `{ ( [ , = `
    or a space), not a subtraction (`x-3`)."""
    found = []
    for m in _MATH_NUMBER.finditer(answer):
        start = m.start()
        if start > 0 and answer[start - 1] == "-" and (start == 1 or answer[start - 2] in "{([,= "):
            start -= 1
        found.append((start, m.end(), answer[start:m.end()]))
    return found


def perturb_number(answer: str, rng: random.Random, spread: int = 5) -> str:
    """The answer with one of its numbers (picked at random) moved by a non-zero integer in [-spread, spread]."""
    numbers = _numbers(answer)
    start, end, text = rng.choice(numbers)
    k = rng.choice([k for k in range(-spread, spread + 1) if k])
    decimals = len(text.split(".")[1]) if "." in text else 0
    value = (float(text) if decimals else int(text)) + k
    return answer[:start] + _format_number(value, decimals) + answer[end:]


def math_distractors(answer: str, rng: random.Random, n: int = 3, max_tries: int = 200) -> list[str]:
    if not _numbers(answer):
        raise Skip("math: no number in the answer")
    out: list[str] = []
    for _ in range(max_tries):
        option = perturb_number(answer, rng)
        if option != answer and option not in out:
            out.append(option)
            if len(out) == n:
                return out
    raise Skip("math: could not make distinct distractors")


def _math_subject(record: Record | dict) -> str:
    kind = record.get("type")
    if isinstance(kind, str) and kind.strip():
        return re.sub(r"[^a-z0-9]+", "_", kind.lower().replace("&", "and")).strip("_")
    source = getattr(record, "source", "")
    parent = os.path.basename(os.path.dirname(source)) if source else ""
    return parent or "math"


def math_to_mcq(record: dict, rng: random.Random) -> dict:
    problem = require(record, "problem", str)
    solution = require(record, "solution", str)
    answer = last_boxed(solution)
    if answer is None:
        raise RecordError("no \\boxed{...} answer", field="solution")
    answer = answer.strip()
    if not answer:
        raise RecordError("empty \\boxed{} answer", field="solution")
    distractors = math_distractors(answer, rng)
    choices, letter = _shuffled(answer, distractors, rng)
    return _mcq(
        _keep(record, "answer"),
        id=record.get("id") or stable_id("math", problem),
        question=problem,
        choices=choices,
        answer=letter,
        source="math",
        subject=record.get("subject") or _math_subject(record),
    )


# ------------------------------------------------------------------------------------------------------ ARC


def _arc_set(record: Record | dict, arc_set: str | None) -> str:
    """arc-easy / arc-challenge: from the option, else an existing field, else the file name."""
    if arc_set:
        return f"arc-{arc_set}" if not arc_set.startswith("arc") else arc_set
    for key in ("source", "subset", "config"):
        v = record.get(key)
        if isinstance(v, str) and ("easy" in v.lower() or "challenge" in v.lower()):
            return "arc-easy" if "easy" in v.lower() else "arc-challenge"
    name = os.path.basename(getattr(record, "source", "") or "").lower()
    if "easy" in name:
        return "arc-easy"
    if "challenge" in name:
        return "arc-challenge"
    return "arc"


def arc_to_mcq(record: dict, arc_set: str | None = None) -> dict:
    q = record.get("question")
    if isinstance(q, dict):  # original AI2 format: question.stem, question.choices[{text, label}]
        stem = require(record, "question.stem", str)
        raw = require(record, "question.choices", list)
        texts, labels = [], []
        for i, c in enumerate(raw):
            if not isinstance(c, dict):
                raise RecordError("expected an object", field=f"question.choices[{i}]")
            texts.append(require(c, "text", str, allow_empty=True))
            labels.append(str(require(c, "label", (str, int))))
    else:  # Hugging Face export: question str, choices {text: [...], label: [...]}
        stem = require(record, "question", str)
        texts = require(record, "choices.text", list)
        labels = [str(x) for x in require(record, "choices.label", list)]
        if len(texts) != len(labels):
            raise RecordError(f"{len(texts)} texts but {len(labels)} labels", field="choices")
        if not all(isinstance(t, str) for t in texts):
            raise RecordError("expected strings", field="choices.text")
    if not 2 <= len(texts) <= len(LETTERS):
        raise RecordError(f"expected 2 to {len(LETTERS)} choices, got {len(texts)}", field="choices")
    key = str(require(record, "answerKey", (str, int))).strip()
    if key not in labels:
        raise RecordError(f"answer key {key!r} is not one of the labels {labels}", field="answerKey")
    _note_oddities(record, texts, "arc")
    source = _arc_set(record, arc_set)
    out = _mcq(
        _keep(record, "question", "choices", "answerKey"),
        id=record.get("id") or stable_id(source, stem),
        question=stem,
        choices=texts,
        answer=LETTERS[labels.index(key)],
        source=source,
        subject=record.get("subject") or "science",
    )
    if labels != list(LETTERS[:len(labels)]):
        out["original_labels"] = labels
    return out


# ----------------------------------------------------------------------------------------------------- MMLU


def subject_from_filename(path: str) -> str:
    """`anatomy_dev.csv` -> anatomy, `college_physics_test.csv` -> college_physics."""
    stem = os.path.basename(path)
    for suffix in (".csv.gz", ".csv", ".jsonl", ".json"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"_(dev|val|validation|test|train|auxiliary_train)$", "", stem)


def parse_subjects(spec: str | None) -> frozenset[str] | None:
    """None = every subject; 'report' = the 23 of method.md; else a comma list."""
    if not spec or spec == "all":
        return None
    names: set[str] = set()
    for part in spec.split(","):
        part = part.strip()
        if part == "report":
            names.update(REPORT_SUBJECTS)
        elif part:
            names.add(part)
    return frozenset(names)


def mmlu_to_mcq(record: dict, subjects: frozenset[str] | None = None) -> dict:
    question = require(record, "question", str)
    subject = record.get("subject")
    if not isinstance(subject, str) or not subject:
        src = getattr(record, "source", "")
        subject = subject_from_filename(src) if src and src != "<stdin>" else ""
    if not subject:
        raise RecordError("missing (and not in the file name)", field="subject")
    if subjects is not None and subject not in subjects:
        raise Skip("subject not selected")
    if "choices" in record:  # hub form (cais/mmlu): choices list, answer index 0-3
        choices = require(record, "choices", list)
        if not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices):
            raise RecordError("expected strings", field="choices")
        choices = [str(c) for c in choices]
        consumed = ("choices", "answer")
    else:  # CSV form: A, B, C, D columns
        choices = [str(require(record, k, (str, int, float), allow_empty=True)) for k in "ABCD"]
        consumed = ("A", "B", "C", "D", "answer")
    if not 2 <= len(choices) <= len(LETTERS):
        raise RecordError(f"expected 2 to {len(LETTERS)} choices, got {len(choices)}", field="choices")
    _note_oddities(record, choices, "mmlu")
    raw = record.get("answer", record.get("target"))
    if isinstance(raw, bool) or raw is None:
        raise RecordError("missing" if raw is None else "expected a letter or an index", field="answer")
    if isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit()):
        index = int(raw)
    elif isinstance(raw, str) and len(raw.strip()) == 1 and raw.strip().upper() in LETTERS[:len(choices)]:
        index = LETTERS.index(raw.strip().upper())
    else:
        raise RecordError(f"expected A-{LETTERS[len(choices) - 1]} or 0-{len(choices) - 1}, got {str(raw)[:20]!r}",
                          field="answer")
    if not 0 <= index < len(choices):
        raise RecordError(f"answer index {index} out of range", field="answer")
    return _mcq(
        _keep(record, *consumed, "target"),
        id=record.get("id") or stable_id(f"mmlu-{subject}", question, *choices),
        question=question,
        choices=choices,
        answer=LETTERS[index],
        source="mmlu",
        subject=subject,
    )


# ----------------------------------------------------------------------------------------------------- auto


def detect_source(record: dict) -> str:
    """Which converter a record needs, from its fields."""
    q = record.get("question")
    if isinstance(q, dict) or (isinstance(record.get("choices"), dict) and "answerKey" in record):
        return "arc"
    if "answerKey" in record:
        return "arc"
    if "problem" in record and "solution" in record:
        return "math"
    if isinstance(q, str) and isinstance(record.get("answer"), str) and "####" in record["answer"]:
        return "gsm8k"
    if isinstance(q, str) and ("choices" in record or all(k in record for k in "ABCD")):
        return "mmlu"
    raise RecordError("cannot tell the format (expected GSM8K, MATH, ARC or MMLU fields)")


def converter(source: str, rng: random.Random, subjects: frozenset[str] | None = None,
              arc_set: str | None = None) -> Callable[[dict], dict]:
    """The per-record function for `--source` (for `auto`, chosen per record)."""
    table: dict[str, Callable[[dict], dict]] = {
        "gsm8k": lambda r: gsm8k_to_mcq(r, rng),
        "math": lambda r: math_to_mcq(r, rng),
        "arc": lambda r: arc_to_mcq(r, arc_set),
        "mmlu": lambda r: mmlu_to_mcq(r, subjects),
    }
    if source == "auto":
        return lambda r: table[detect_source(r)](r)
    return table[source]
