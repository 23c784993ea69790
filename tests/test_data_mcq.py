"""mcqify: GSM8K, MATH, ARC and MMLU to MCQ records (method.md section 2), on handmade and real samples."""

import json
import random
import re
from pathlib import Path

import pytest

from probllm.data.load import read_inputs
from probllm.data.mcq import REPORT_SUBJECTS, arc_to_mcq, converter, detect_source, gsm8k_to_mcq, last_boxed, \
    math_to_mcq, mmlu_to_mcq, parse_subjects, strip_calculator, subject_from_filename
from probllm.io import Record, RecordError, Skip, Stats, read_records

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"


def valid_mcq(r, n=4):
    assert set(r) >= {"id", "question", "choices", "answer", "source", "subject"}
    assert isinstance(r["id"], str) and r["id"] and isinstance(r["question"], str) and r["question"]
    assert len(r["choices"]) == n and len(set(r["choices"])) == n
    assert all(isinstance(c, str) for c in r["choices"])
    assert r["answer"] in "ABCDE"[:n]
    return r["choices"][ord(r["answer"]) - 65]


# ----------------------------------------------------------------------------------------------- GSM8K

def gsm8k_final(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def test_gsm8k_options_are_n_plus_nonzero_k_and_answer_letter_right():
    rec = {"question": "How many?", "answer": "2 * 3 = <<2*3=6>>6\n#### 6", "extra": 1}
    for seed in range(30):
        r = gsm8k_to_mcq(rec, random.Random(seed))
        assert valid_mcq(r) == "6"
        assert all(1 <= abs(int(c) - 6) <= 10 for c in r["choices"] if c != "6")
        assert r["solution"] == "2 * 3 = 6\n#### 6" and r["extra"] == 1 and r["source"] == "gsm8k"
    assert strip_calculator("a <<1+1=2>>2 b") == "a 2 b"


def test_gsm8k_examples_file_commas_zero_and_negative():
    recs = [json.loads(line) for line in (EX / "gsm8k.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    for rec in recs:
        assert valid_mcq(gsm8k_to_mcq(rec, rng)) == gsm8k_final(rec["answer"])


def test_gsm8k_shared_every_item_becomes_a_question_whose_answer_is_the_final_number(shared_examples):
    rng = random.Random(0)
    lines = (shared_examples / "gsm8k" / "test-first25.jsonl").read_text().splitlines()
    assert len(lines) == 25
    for line in lines:
        rec = json.loads(line)
        r = gsm8k_to_mcq(rec, rng)
        assert valid_mcq(r) == gsm8k_final(rec["answer"])
        assert "<<" not in r["solution"]


def test_gsm8k_without_final_answer_is_a_record_error():
    with pytest.raises(RecordError) as e:
        gsm8k_to_mcq({"question": "q", "answer": "no final"}, random.Random(0))
    assert e.value.field == "answer"


# ------------------------------------------------------------------------------------------------- MATH

def test_last_boxed_nests_braces():
    assert last_boxed(r"so $\boxed{\frac{1}{\sqrt{2}}}$.") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\boxed{1} then \boxed{\{a, b\}}") == r"\{a, b\}"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed("no box") is None and last_boxed(r"\boxed{unclosed") is None


def test_math_perturbs_one_number_and_keeps_the_rest_of_the_text():
    rec = {"problem": "p", "solution": r"It is $\boxed{\frac{3}{4}\sqrt{7}}$.", "type": "Intermediate Algebra"}
    for seed in range(30):
        r = math_to_mcq(rec, random.Random(seed))
        assert valid_mcq(r) == r"\frac{3}{4}\sqrt{7}"
        for c in r["choices"]:
            nums = re.findall(r"-?\d+", c)
            assert re.sub(r"-?\d+", "#", c) == r"\frac{#}{#}\sqrt{#}"
            diffs = [int(a) - int(b) for a, b in zip(nums, ["3", "4", "7"])]
            assert c == r"\frac{3}{4}\sqrt{7}" or (sum(d != 0 for d in diffs) == 1 and
                                                     all(abs(d) <= 5 for d in diffs))
        assert r["subject"] == "intermediate_algebra" and r["solution"] == rec["solution"]


def test_math_without_number_is_reported_and_without_box_is_an_error():
    with pytest.raises(Skip, match="no number"):
        math_to_mcq({"problem": "p", "solution": r"$\boxed{\text{(C)}}$"}, random.Random(0))
    with pytest.raises(RecordError) as e:
        math_to_mcq({"problem": "p", "solution": "none"}, random.Random(0))
    assert e.value.field == "solution"


def test_math_examples_folder_subject_from_type(tmp_path):
    stats = Stats()
    out, skipped = [], 0
    rng = random.Random(0)
    for rec in read_records([str(EX / "math")], stats):
        try:
            out.append(math_to_mcq(rec, rng))
        except Skip:
            skipped += 1
    assert skipped == 1 and len(out) == 8
    assert {r["subject"] for r in out} == {"algebra", "geometry", "counting_and_probability", "precalculus"}
    for r in out:
        valid_mcq(r)


def test_math_shared_files_convert_or_are_reported(shared_examples):
    stats = Stats()
    rng = random.Random(0)
    converted = reported = 0
    for rec in read_records([str(shared_examples / "math")], stats):
        try:
            r = math_to_mcq(rec, rng)
        except Skip:
            reported += 1
            continue
        valid_mcq(r)
        assert r["choices"][ord(r["answer"]) - 65] == last_boxed(rec["solution"]).strip()
        converted += 1
    assert converted + reported == stats.read == 35 and converted >= 30


# -------------------------------------------------------------------------------------------------- ARC

def test_arc_original_numeric_labels_and_three_or_five_choices():
    recs = [Record(json.loads(line), source=str(EX / "arc.jsonl")) for line in
            (EX / "arc.jsonl").read_text().splitlines()]
    out = [arc_to_mcq(r, "easy") for r in recs]
    assert [len(r["choices"]) for r in out] == [4, 4, 3, 5, 3, 4]
    assert [r["answer"] for r in out] == ["A", "B", "B", "B", "A", "C"]
    assert out[1]["choices"][1] == "friction" and out[1]["original_labels"] == ["1", "2", "3", "4"]
    assert all(r["source"] == "arc-easy" and r["id"].startswith("PROBLLM_ARC") for r in out)


def test_arc_hf_export_format():
    recs = [json.loads(line) for line in (EX / "arc-hf.jsonl").read_text().splitlines()]
    out = [arc_to_mcq(r, "challenge") for r in recs]
    assert [r["answer"] for r in out] == ["C", "A", "B"]
    assert out[0]["choices"] == ["oxygen", "nitrogen", "carbon dioxide", "helium"]
    assert all(isinstance(r["question"], str) and r["source"] == "arc-challenge" for r in out)


def test_items_with_repeated_options_are_kept_as_published():
    out = arc_to_mcq({"question": "q", "choices": {"text": ["a", "b", "a "], "label": ["A", "B", "C"]},
                      "answerKey": "A"})
    assert out["choices"] == ["a", "b", "a "]
    out = mmlu_to_mcq({"question": "q", "subject": "x", "choices": ["1", "2", "2", "3"], "answer": 0})
    assert out["choices"] == ["1", "2", "2", "3"] and out["answer"] == "A"


def test_arc_bad_answer_key_names_the_field():
    with pytest.raises(RecordError) as e:
        arc_to_mcq({"question": "q", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]},
                    "answerKey": "D"})
    assert e.value.field == "answerKey"


def test_arc_shared_every_dev_item_normalises(shared_examples):
    for name, n_expected, source in [("ARC-Easy-Dev.jsonl", 570, "arc-easy"),
                                     ("ARC-Challenge-Dev.jsonl", 299, "arc-challenge"),
                                     ("ARC-Challenge-test-hf-first20.jsonl", 20, "arc-challenge")]:
        path = shared_examples / "arc" / name
        n = 0
        for rec in read_records([str(path)]):
            r = arc_to_mcq(rec)  # easy/challenge from the file name
            key_index = (rec["question"]["choices"] if isinstance(rec["question"], dict) else
                         [{"label": lab} for lab in rec["choices"]["label"]])
            labels = [str(c["label"]) for c in key_index]
            valid_mcq(r, len(labels))
            assert r["answer"] == "ABCDE"[labels.index(str(rec["answerKey"]))] and r["source"] == source
            n += 1
        assert n == n_expected


# ------------------------------------------------------------------------------------------------- MMLU

def test_mmlu_csv_files_quoting_subject_from_name_and_report_filter():
    stats = Stats()
    recs = list(read_inputs([str(EX / "mmlu")], stats))
    subjects = parse_subjects("report")
    out, skipped = [], 0
    for rec in recs:
        try:
            out.append(mmlu_to_mcq(rec, subjects))
        except Skip:
            skipped += 1
    assert skipped == 1 and {r["subject"] for r in out} == {"college_physics", "machine_learning", "astronomy"}
    stmt = next(r for r in out if r["question"].startswith("Statement 1"))
    assert "\nStatement 2" in stmt["question"] and stmt["choices"][0] == "True, True" and stmt["answer"] == "A"
    assert subject_from_filename("x/anatomy_dev.csv") == "anatomy"
    assert subject_from_filename("college_physics_test.csv") == "college_physics"


def test_mmlu_hub_form_with_integer_answer():
    r = mmlu_to_mcq({"question": "q", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 2})
    assert (r["answer"], r["choices"], r["subject"]) == ("C", ["a", "b", "c", "d"], "virology")
    with pytest.raises(RecordError) as e:
        mmlu_to_mcq({"question": "q", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 7})
    assert e.value.field == "answer"


def test_report_subjects_are_the_23_of_the_method():
    assert len(REPORT_SUBJECTS) == 23 and len(set(REPORT_SUBJECTS)) == 23
    assert parse_subjects("report") == frozenset(REPORT_SUBJECTS)
    assert parse_subjects("anatomy,virology") == {"anatomy", "virology"} and parse_subjects(None) is None


def test_mmlu_shared_dev_csvs_parse(shared_examples):
    import csv

    files = sorted((shared_examples / "mmlu" / "dev").glob("*.csv"))
    # Counted with the csv module (quoted commas and newlines inside fields), not by lines: every row must come out.
    rows = sum(len(list(csv.reader(f.open(newline="", encoding="utf-8")))) for f in files)
    stats = Stats()
    out = [mmlu_to_mcq(r) for r in read_inputs([str(shared_examples / "mmlu" / "dev")], stats)]
    assert rows >= 40 and len(out) == rows and stats.read == rows
    assert len({r["subject"] for r in out}) == len(files)
    for r in out:
        valid_mcq(r)


# ------------------------------------------------------------------------------------------------- auto

def test_auto_detects_each_format_and_ids_are_stable():
    rng = random.Random(0)
    convert = converter("auto", rng)
    samples = {
        "gsm8k": {"question": "q", "answer": "#### 3"},
        "math": {"problem": "p", "solution": r"\boxed{2}"},
        "arc": {"question": {"stem": "s", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"},
                                                      {"text": "c", "label": "C"}]}, "answerKey": "A"},
        "mmlu": {"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "D", "subject": "anatomy"},
    }
    for kind, rec in samples.items():
        assert detect_source(rec) == kind
        r = convert(rec)
        assert r["source"].startswith(kind)
        assert r["id"] == converter("auto", random.Random(5))(rec)["id"]
