"""What a generated answer says: `eval --method generate` reads the final answer out of a chain of thought (a
GSM8K number after '####', MATH's last \\boxed{}, or an option letter) and maps it onto one of the choices."""

from __future__ import annotations

import math
import re

from probllm.evaluate.templates import Item, answer_kind
from probllm.records import LETTERS, extract_letter

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _num(text: str) -> float | None:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(text)
    except ValueError:
        pass
    m = re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", text)
    if m and int(m.group(2)):
        return int(m.group(1)) / int(m.group(2))
    return None


def extract_number(text: str) -> str | None:
    """GSM8K style: '#### N', else 'the answer is N', else the last number in the text."""
    for pattern in (r"####\s*(" + _NUMBER + ")", r"[Tt]he (?:final )?answer is:?\s*(" + _NUMBER + ")"):
        m = re.findall(pattern, text)
        if m:
            return m[-1]
    found = re.findall(_NUMBER, text)
    return found[-1] if found else None


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces nest), else 'the answer is X'."""
    start = text.rfind("\\boxed")
    if start >= 0:
        i = text.find("{", start)
        if i >= 0:
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1: j]
    m = re.findall(r"[Tt]he (?:final )?answer is:?\s*\$?([^\n$]+?)\$?\s*(?:\.|$)", text)
    return m[-1].strip() if m else None


def _norm_math(s: str) -> str:
    s = s.strip().strip("$").replace(" ", "").replace("\\!", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    return s.rstrip(".")


def match_choice(value: str | None, item: Item) -> int | None:
    """The index of the choice an extracted answer names: same number, or same normalised text."""
    if value is None:
        return None
    v_num = _num(value)
    if v_num is not None:
        for i, c in enumerate(item.choices):
            c_num = _num(c)
            if c_num is not None and math.isclose(v_num, c_num, rel_tol=1e-9, abs_tol=1e-9):
                return i
    v = _norm_math(value)
    for i, c in enumerate(item.choices):
        if _norm_math(c) == v:
            return i
    return None


def extract_answer(text: str, item: Item) -> tuple[str | None, int | None]:
    """What the generation answered, and which choice that is (None when it names none)."""
    kind = answer_kind(item)
    if kind == "number":
        value = extract_number(text)
        return value, match_choice(value, item)
    if kind == "boxed":
        value = extract_boxed(text)
        idx = match_choice(value, item)
        return value, idx
    letter = extract_letter(text, len(item.choices))
    return letter, (LETTERS.index(letter) if letter else None)


