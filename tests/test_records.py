"""The record shapes defined once: located errors from one parse path, unknown fields kept, one letter rule."""

from __future__ import annotations

import pytest

from probllm.io import Record, RecordError, Stats, map_records
from probllm.records import LETTERS, MCQ, extract_letter, parse, parse_mcq, parse_passages


def test_mcq_keeps_unknown_fields_and_reads_the_hf_choices_form():
    mcq = parse_mcq({"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answer": "b",
                     "id": 7, "extra": {"kept": True}})
    assert mcq.choices == ["x", "y"] and mcq.gold == 1
    assert mcq.model_dump()["extra"] == {"kept": True} and mcq.model_extra["id"] == 7


@pytest.mark.parametrize("record, field, reason", [
    ({"choices": ["a", "b"]}, "question", "missing"),
    ({"question": 3}, "question", "expected a string, got a number"),
    ({"question": ""}, "question", "is empty"),
    ({"question": "q", "choices": "a or b"}, "choices", "expected an array of strings"),
    ({"question": "q", "choices": list("abcdefghijk")}, "choices", "at most 10 choices, got 11"),
    ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "answer", "expected a letter A-B, got 'C'"),
    ({"question": "q", "choices": ["a", "b"], "answer": 1}, "answer", "expected a string, got a number"),
    ({"question": "q", "source": 5}, "source", "expected a string, got a number"),
])
def test_mcq_errors_name_the_field(record, field, reason):
    with pytest.raises(RecordError) as e:
        parse_mcq(record)
    assert (e.value.field, e.value.reason) == (field, reason)


def test_question_field_is_named_as_the_user_named_it_and_errors_are_located():
    assert parse_mcq({"prompt": "Why?"}, "prompt").question == "Why?"
    records = [Record({"prompt": "ok"}, source="in.jsonl", line=1), Record({"text": "no"}, source="in.jsonl", line=2)]
    stats = Stats()
    with pytest.raises(RecordError) as e:
        list(map_records(records, lambda r: parse_mcq(r, "prompt").model_dump(), stats))
    assert str(e.value) == "in.jsonl:2: field 'prompt': missing"
    with pytest.raises(RecordError, match="needs at least 2 choices"):
        parse_mcq({"question": "q", "choices": ["a"], "answer": "A"}, min_choices=2)
    with pytest.raises(RecordError, match="field 'answer': missing"):
        parse_mcq({"question": "q", "choices": ["a", "b"]}, need_answer=True)


def test_other_shapes():
    mcq = {"question": "q", "choices": ["a", "b"], "answer": "A", "score": 1}
    assert parse(MCQ, mcq).model_extra == {"score": 1}
    with pytest.raises(RecordError) as e:
        parse(MCQ, {**mcq, "question": 5})
    assert (e.value.field, e.value.reason) == ("question", "expected a string, got a number")
    passages = parse_passages({"ctx": ["plain", {"text": "t", "id": "n#1", "score": 0.5}]}, "ctx")
    assert passages == [{"id": "ctx[0]", "text": "plain"}, {"id": "n#1", "text": "t", "score": 0.5}]
    assert parse_passages({}, "ctx") == []
    with pytest.raises(RecordError, match="asked for by --context"):
        parse_passages({}, "ctx", required=True)


@pytest.mark.parametrize("text, n, letter", [
    ("Let's see... The answer is (C).", 4, "C"),
    ("Answer: B. Option A is wrong because...", 4, "B"),
    ("B. Because the moon...", 4, "B"),
    ("(D) is right", 4, "D"),
    ("A cat says (B)", 4, "B"),
    ("The correct option is **A**", 4, "A"),
    ("the answer is e", 4, None),
    ("no letter here", 4, None),
    ("The answer is E", 4, None),
    ("The answer is E", 5, "E"),
])
def test_one_letter_rule(text, n, letter):
    assert extract_letter(text, n) == letter
    assert LETTERS[:4] == "ABCD" and MCQ
