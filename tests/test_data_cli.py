"""The data commands through the real CLI: pipes, bad input (exit 65, one located line), --skip-invalid counts,
determinism, and the demo script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"

GOOD_GSM = json.dumps({"question": "q?", "answer": "1+1=<<1+1=2>>2\n#### 2"})
GOOD_ANN = json.dumps({"question_complete": "Q", "preference": [{"A": "a", "B": "b",
                                                                 "ranking_criteria": {"overall": "A"}}]})


def one_error_line(run, *needles):
    assert run.code == 65, (run.code, run.stderr)
    assert "Traceback" not in run.stderr
    errors = [ln for ln in run.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1, run.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("command, text, needles", [
    (["mcqify", "--source", "gsm8k"], GOOD_GSM + "\n" + '{"question": "q", "answer": "#### 1"', ["<stdin>:2:",
                                                                                                "invalid JSON"]),
    (["mcqify", "--source", "gsm8k"], GOOD_GSM + "\n" + '{"question": 3, "answer": "#### 1"}', ["<stdin>:2:",
                                                                                               "'question'"]),
    (["mcqify", "--source", "arc"], '{"question": "q", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}}',
     ["<stdin>:1:", "'answerKey'", "missing"]),
    (["pair-annotated"], GOOD_ANN + "\n" + '{"question_complete": "Q", "preference": "oops"}', ["<stdin>:2:",
                                                                                              "'preference'"]),
    (["pair-stackexchange"], '{"question": "q", "answers": [{"text": "t"}]}', ["<stdin>:1:", "'pm_score'"]),
    (["split"], '{"chosen": "x"}', ["<stdin>:1:", "'prompt'"]),
])
def test_bad_records_stop_with_one_located_line(cli, command, text, needles):
    run = cli(*command, input=text + "\n")
    one_error_line(run, *needles)


def test_bad_file_names_the_file(cli, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(GOOD_GSM + "\n" + GOOD_GSM + "\n" + '{"question": "q", "answer": 42}\n')
    run = cli("mcqify", "--source", "gsm8k", str(p))
    one_error_line(run, f"{p}:3:", "'answer'", "expected a string")
    assert len(run.records) == 2  # what came before the bad line was written, nothing after it


@pytest.mark.parametrize("command", [["mcqify"], ["pair-annotated"], ["pair-stackexchange"], ["split"]])
def test_empty_input_is_an_error(cli, command):
    run = cli(*command, input="")
    one_error_line(run, "empty input")


def test_binary_file_is_a_clear_error(cli, tmp_path):
    blob = tmp_path / "blob.jsonl"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 10)
    one_error_line(cli("mcqify", str(blob)), str(blob), "binary")
    csv_blob = tmp_path / "x_dev.csv"
    csv_blob.write_bytes(b"\xff\xfe\x00\x01" * 10)
    one_error_line(cli("mcqify", "--source", "mmlu", str(csv_blob)), str(csv_blob), "binary")
    one_error_line(cli("load", str(csv_blob), "--format", "mmlu-csv"), str(csv_blob), "binary")


def test_load_bad_local_files_and_unreachable_hub_name(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    one_error_line(cli("load", str(bad)), f"{bad}:2:", "invalid JSON")
    run = cli("load", "--skip-invalid", str(bad))
    assert run.code == 0 and run.records == [{"a": 1}] and "1 invalid" in run.stderr
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    one_error_line(cli("load", str(empty)), "empty input")
    short = tmp_path / "short_dev.csv"
    short.write_text("q,1,2,3,4,A\nq2,1,2\n")
    one_error_line(cli("load", "--format", "mmlu-csv", str(short)), f"{short}:2:", "expected 6 columns")
    # the hub path is the same code; offline it must fail with one line, not a traceback
    run = cli("load", "probllm-no-such/dataset", "--split", "test", env={"HF_HUB_OFFLINE": "1",
                                                                        "HF_DATASETS_OFFLINE": "1"})
    assert run.code == 1 and "Traceback" not in run.stderr and "cannot load probllm-no-such/dataset" in run.stderr


def test_skip_invalid_goes_on_and_counts(cli):
    text = "\n".join([GOOD_GSM, '{"question": "q", "answer"', '{"question": "q", "answer": "no final"}',
                      '{"question": "q"}', GOOD_GSM]) + "\n"
    run = cli("mcqify", "--source", "gsm8k", "--skip-invalid", input=text)
    assert run.code == 0 and len(run.records) == 2
    summary = run.stderr.strip().splitlines()[-1]
    assert "5 in, 2 out, 3 invalid" in summary
    assert "answer: missing: 1" in summary and "answer: no '#### N' final answer: 1" in summary


def test_math_without_numbers_is_reported_on_stderr(cli):
    run = cli("mcqify", "--source", "math", str(EX / "math"))
    assert run.code == 0 and len(run.records) == 8
    assert "counting_and_probability/1.json:1: no number in the answer" in run.stderr
    assert "1 skipped (math: no number in the answer: 1)" in run.stderr


def test_pair_annotated_counts_reasons_on_stderr_and_only_records_on_stdout(cli):
    run = cli("pair-annotated", str(EX / "annotated.jsonl"))
    assert run.code == 0 and len(run.records) == 39
    assert all(set(r) >= {"prompt", "chosen", "rejected", "source"} for r in run.records)
    assert "both answers wrong (correctness None): 8" in run.stderr and "overall tie (AB): 6" in run.stderr


def test_same_seed_same_output_and_seed_matters(cli):
    a = cli("mcqify", "--seed", "3", str(EX / "gsm8k.jsonl"), str(EX / "math"))
    b = cli("mcqify", "--seed", "3", str(EX / "gsm8k.jsonl"), str(EX / "math"))
    c = cli("mcqify", "--seed", "4", str(EX / "gsm8k.jsonl"), str(EX / "math"))
    assert a.stdout == b.stdout and a.stdout != c.stdout and a.code == 0


def test_split_parts_through_the_cli_are_complementary_and_disjoint(cli):
    pairs = cli("pair-annotated", str(EX / "annotated.jsonl")).stdout
    train = cli("split", "--part", "train", "--seed", "0", input=pairs).records
    test = cli("split", "--part", "test", "--seed", "0", input=pairs).records
    assert len(train) + len(test) == 39 and test
    key = lambda r: (r["question_id"], r["comparison"])  # noqa: E731
    assert {key(r) for r in train}.isdisjoint({key(r) for r in test})
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in test})


def test_posts_xml_from_stdin_and_sites_flag(cli):
    xml = (EX / "Posts.xml").read_bytes()
    run = cli("pair-stackexchange", "--format", "posts-xml", "--site", "math.stackexchange.com", input=xml)
    assert run.code == 0 and [r["qid"] for r in run.records] == [1, 4]
    assert all(r["site"] == "math.stackexchange.com" for r in run.records)
    run = cli("pair-stackexchange", "--sites", "physics", "--site", "math.stackexchange.com", str(EX / "Posts.xml"))
    assert run.code == 0 and run.records == [] and "not selected" in run.stderr
    run = cli("pair-stackexchange", "--sites", "math", str(EX / "stackexchange.jsonl"))
    assert [r["site"] for r in run.records] == ["math.stackexchange.com"]


def test_help_shows_an_example_for_every_command(cli):
    for command in ("load", "pair-annotated", "pair-stackexchange", "mcqify", "split"):
        run = cli(command, "--help")
        assert run.code == 0 and "probllm " + command in run.stdout


def test_demo_script_writes_the_four_files_through_pipes(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "SEED": "0", "PROBLLM": f"{sys.executable} -m probllm"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo-data.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    read = lambda name: [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    train, test, extra, mcq = (read(f"{n}.jsonl") for n in ("pairs.train", "pairs.test", "pairs.extra", "mcq"))
    assert len(train) + len(test) == 39 and 0 < len(test) < len(train)
    assert len(extra) == 5 and {p["source"] for p in extra} == {"stackexchange"}
    assert {m["source"] for m in mcq} == {"mmlu", "arc-easy", "arc-challenge", "gsm8k", "math"}
    assert all(m["answer"] in "ABCDE"[:len(m["choices"])] for m in mcq)
