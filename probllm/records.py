"""The record shapes that commands read, defined once: MCQ and passage (the shapes a command parses; pairs and
outputs are checked where they are read, with `io.require`).

Each shape is a pydantic model with extra fields allowed, so a record's unknown fields pass through untouched
(the JSONL contract). `parse(Shape, record)` is the one parse path: a record that does not fit raises the
located `RecordError` (`file:line: field 'x': reason`) that every command reports, never a pydantic dump.

Letters of multiple-choice options (`LETTERS`) and reading the chosen letter out of generated text
(`extract_letter`) live here too, because every command that handles MCQs needs the same rule.
"""

from __future__ import annotations

import re
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from probllm.io import Record, RecordError, Stats, type_name

LETTERS = "ABCDEFGHIJ"

Shape = TypeVar("Shape", bound=BaseModel)
T = TypeVar("T")


class _Record(BaseModel):
    # strict: JSON "4" is not the number 4; extra="allow": unknown fields ride along.
    model_config = ConfigDict(extra="allow", strict=True)


class Passage(_Record):
    """A retrieved or quoted passage (`retrieve --attach`, `eval --context`, `ask`, `serve` sources)."""

    text: str
    id: Optional[Any] = None
    score: Optional[float] = None
    source: Optional[str] = None
    heading: Optional[str] = None


class MCQ(_Record):
    """A multiple-choice question: up to ten string choices, the answer as a letter (A = first choice)."""

    question: str
    choices: list[str] = []
    answer: Optional[str] = None
    source: Optional[str] = None
    subject: Optional[str] = None

    @field_validator("question")
    @classmethod
    def _question_not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("is empty")
        return value

    @field_validator("choices", mode="before")
    @classmethod
    def _choices(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("text"), list):
            value = value["text"]  # the Hugging Face ARC export: {"text": [...], "label": [...]}
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise ValueError("expected an array of strings")
        if len(value) > len(LETTERS):
            raise ValueError(f"at most {len(LETTERS)} choices, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _answer_names_a_choice(self) -> "MCQ":
        if self.answer is not None and self.choices:
            letter = self.answer.strip().upper()
            if len(letter) != 1 or letter not in LETTERS[:len(self.choices)]:
                raise _FieldError("answer", f"expected a letter A-{LETTERS[len(self.choices) - 1]}, "
                                            f"got {self.answer!r}")
        return self

    @property
    def gold(self) -> int | None:
        """Index of the correct choice, when the record has an answer."""
        return LETTERS.index(self.answer.strip().upper()) if self.answer is not None else None


class _FieldError(ValueError):
    """A check of one model that blames a field other than the one being validated."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


_EXPECTED = {"string_type": "a string", "list_type": "an array", "int_type": "an integer", "float_type": "a number",
             "bool_type": "a boolean", "dict_type": "an object", "model_type": "an object"}


def _record_error(error: ValidationError, rename: dict[str, str]) -> RecordError:
    first = error.errors()[0]
    loc = [part for part in first["loc"] if isinstance(part, str)]
    field = rename.get(loc[0], loc[0]) if loc else None
    kind = first["type"]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        return RecordError(cause.reason, field=cause.field)
    if kind == "missing":
        reason = "missing"
    elif kind in _EXPECTED:
        got = type_name(first.get("input"))
        reason = f"expected {_EXPECTED[kind]}, got {got}"
    elif cause is not None:
        reason = str(cause)
    else:
        reason = first["msg"]
    return RecordError(reason, field=field)


def parse(shape: type[Shape], record: dict, rename: dict[str, str] | None = None) -> Shape:
    """`record` as `shape`, or a RecordError naming the field (`rename` maps shape fields to record fields,
    e.g. a question read from `--question-field prompt`). Locating the error on file and line is the caller's
    (`Stats.reject`, `map_records`)."""
    try:
        return shape.model_validate(record)
    except ValidationError as e:
        raise _record_error(e, rename or {}) from None


def parse_mcq(record: dict, question_field: str = "question", *, need_answer: bool = False,
              min_choices: int = 0) -> MCQ:
    """The one reading of an MCQ record for eval, ask and retrieve. `need_answer`: the answer letter is
    required (eval scores against it); `min_choices`: fewer options is an error (eval needs 2 to choose)."""
    if question_field != "question":
        record = {**record, "question": record[question_field]} if question_field in record else \
            {k: v for k, v in record.items() if k != "question"}
    mcq = parse(MCQ, record, {"question": question_field})
    if len(mcq.choices) < min_choices:
        raise RecordError(f"needs at least {min_choices} choices, got {len(mcq.choices)}", field="choices")
    if need_answer and mcq.answer is None:
        raise RecordError("missing", field="answer")
    return mcq


def parse_passages(record: dict, field: str, *, required: bool = False) -> list[dict]:
    """The passages of a record's context field, as `Passage`-shaped dicts with an id: strings or objects with
    'text' (`retrieve --attach` writes those); a missing field is no passages unless `required`."""
    if field not in record:
        if required:
            raise RecordError("missing (asked for by --context)", field=field)
        return []
    value = record[field]
    if not isinstance(value, list):
        raise RecordError("expected an array of passages", field=field)
    passages = []
    for i, p in enumerate(value):
        if isinstance(p, str):
            passages.append({"id": f"{field}[{i}]", "text": p})
        elif isinstance(p, dict) and isinstance(p.get("text"), str):
            passages.append({"id": f"{field}[{i}]", **p})
        else:
            raise RecordError("each passage must be a string or an object with 'text'", field=field)
    return passages


def parsed_batches(records: Iterable[Record], parse_one: Callable[[Record], T], stats: Stats, skip_invalid: bool,
                   size: int) -> Iterator[list[tuple[Record, T]]]:
    """Records in batches of `size`, each with its parsed form, in input order; a bad record is rejected (raised,
    or counted and left out with --skip-invalid), so a batch may come out short or empty."""
    it = iter(records)
    while batch := list(islice(it, size)):
        parsed = []
        for rec in batch:
            try:
                parsed.append((rec, parse_one(rec)))
            except RecordError as e:
                stats.reject(e, rec, skip_invalid)
        yield parsed


# ------------------------------------------------------------------------------------------------------ letters

def _letter_patterns(n_choices: int) -> tuple[re.Pattern, ...]:
    allowed = LETTERS[:n_choices]
    return (
        # "The answer is (C)", "Answer: B", "the correct option is **D**": the last such statement wins.
        re.compile(rf"(?i:\banswer|\bcorrect option)(?:\s+is)?\s*:?\s*\(?\**([{allowed}])\b"),
        # An answer that opens with the letter: "B. Because ...", "(C) ...".
        re.compile(rf"^\s*\(?([{allowed}])(?:[.):]|\s*$)"),
        re.compile(rf"\(([{allowed}])\)"),
        re.compile(rf"\b([{allowed}])\b"),
    )


_PATTERNS = {n: _letter_patterns(n) for n in range(1, len(LETTERS) + 1)}


def extract_letter(text: str, n_choices: int) -> str | None:
    """The option letter a generated answer chooses, or None: an explicit "answer is X" first (the last one, as
    chains of thought conclude at the end), then a leading letter, then "(X)", then a lone capital letter."""
    if not 1 <= n_choices <= len(LETTERS):
        return None
    for pattern in _PATTERNS[n_choices]:
        found = pattern.findall(text)
        if found:
            return found[-1]
    return None


def letter_index(letter: str | None) -> int | None:
    return LETTERS.index(letter) if letter else None
