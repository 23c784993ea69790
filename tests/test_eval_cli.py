"""The eval/quantize/report commands through a real subprocess: the pipe contract, summaries, errors."""

from __future__ import annotations

import json

import pytest

MCQ = [
    {"id": "a1", "question": "What is 2 + 2?", "choices": ["3", "4", "5", "6"], "answer": "B", "source": "arc-easy",
     "subject": "arithmetic", "extra": {"kept": True},
     "context": [{"id": "n1", "text": "Two plus two is four.", "score": 0.9}]},
    {"id": "m1", "question": "Water boils at sea level at", "choices": ["50 C", "100 C", "0 C", "200 C"],
     "answer": "B", "source": "mmlu", "subject": "conceptual_physics", "context": ["Water boils at 100 C."]},
    {"id": "a2", "question": "Which gas do plants absorb?", "choices": ["Oxygen", "Carbon dioxide", "Nitrogen"],
     "answer": "B", "source": "arc-easy", "subject": "biology", "context": []},
]


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def mcq_file(tmp_path):
    path = tmp_path / "mcq.jsonl"
    path.write_text(jsonl(MCQ))
    return path


def test_eval_writes_predictions_and_a_summary(cli, tiny_model_dir, mcq_file, tmp_path):
    summary = tmp_path / "s.json"
    r = cli("eval", "--model", tiny_model_dir, "--summary", summary, "--batch-size", "2", "--context", "context",
            mcq_file)
    assert r.code == 0, r.stderr
    recs = r.records
    assert [x["id"] for x in recs] == ["a1", "m1", "a2"]
    assert recs[0]["extra"] == {"kept": True} and recs[0]["pred"] in "ABCD" and len(recs[2]["scores"]) == 3
    s = json.loads(summary.read_text())
    assert s["items"] == 3 and s["overall"]["items"] == 3 and s["context"] == "context"
    assert s["overall"]["acc"] == pytest.approx(sum(x["correct"] for x in recs) / 3)
    assert s["overall"]["acc_norm"] == pytest.approx(sum(x["correct_norm"] for x in recs) / 3)
    assert set(s["by_source"]) == {"arc-easy", "mmlu"} and s["by_source"]["mmlu"]["items"] == 1
    assert "acc_stderr" in s["overall"] and s["items_per_s"] > 0
    assert "overall" in r.stderr and "3 in, 3 out" in r.stderr


def test_bad_record_names_file_line_and_field(cli, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl([MCQ[0], {**MCQ[1], "answer": "Z"}, MCQ[2]]))
    r = cli("eval", "--model", tiny_model_dir, bad)
    assert r.code == 65
    assert f"{bad}:2: field 'answer'" in r.stderr and "Traceback" not in r.stderr
    r = cli("eval", "--model", tiny_model_dir, "--skip-invalid", bad)
    assert r.code == 0 and len(r.records) == 2 and "1 invalid" in r.stderr
    # Input that is not JSON lines is found before the model is looked at (here there is none).
    r = cli("eval", "--model", str(tmp_path / "no-such-model"), input="{not json\n")
    assert r.code == 65 and "<stdin>:1" in r.stderr
    r = cli("eval", "--model", tiny_model_dir, "--shots", "2", input=jsonl(MCQ))
    assert r.code == 2 and "--dev" in r.stderr
    r = cli("eval", "--model", tiny_model_dir, "--method", "vibes", input=jsonl(MCQ))
    assert r.code == 2


def test_few_shot_from_dev_and_limit(cli, tiny_model_dir, mcq_file):
    r = cli("eval", "--model", tiny_model_dir, "--shots", "1", "--dev", mcq_file, "--limit", "2", mcq_file)
    assert r.code == 0, r.stderr
    assert len(r.records) == 2


def test_quantize_eval_and_report(cli, tiny_model_dir, mcq_file, tmp_path):
    out, qs = tmp_path / "q8", tmp_path / "quantize.json"
    r = cli("quantize", "--model", tiny_model_dir, "--method", "torch-int8", "-o", out, "--eval", mcq_file,
            "--summary", qs)
    assert r.code == 0, r.stderr
    (rec,) = r.records
    assert rec["method"] == "torch-int8" and rec["bits"] == 8 and rec["size_mb"] >= 0
    for key in ("rss_mb", "base_rss_mb", "tokens_per_s", "base_tokens_per_s", "accuracy", "base_accuracy"):
        assert rec[key] is not None, key
    s1, s2 = tmp_path / "base.json", tmp_path / "q8.json"
    assert cli("eval", "--model", tiny_model_dir, "--summary", s1, mcq_file).code == 0
    r = cli("eval", "--model", out, "--summary", s2, mcq_file)
    assert r.code == 0, r.stderr
    assert len(r.records) == 3
    # One summary schema: report reads what `eval --summary` and `quantize --eval --summary` write alike.
    summaries = [json.loads(p.read_text()) for p in (s1, s2, qs)]
    assert [s["command"] for s in summaries] == ["eval", "eval", "quantize"]
    for s in summaries:
        assert set(s["counts"]) == {"in", "out", "skipped", "invalid"} and s["timings"]["seconds"] > 0
        assert s["overall"]["items"] == 3
    assert summaries[0]["counts"]["in"] == 3 and summaries[2]["counts"]["out"] == 1
    assert summaries[2]["overall"]["acc"] == rec["accuracy"] and summaries[2]["base"]["overall"]["acc"] == \
        rec["base_accuracy"]
    r = cli("report", f"base={s1}", f"8-bit={s2}", f"quantize={qs}")
    assert r.code == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("| variant") and lines[2].startswith("| base |") and lines[3].startswith("| 8-bit |")
    assert lines[4].startswith("| quantize |")
    r = cli("report", str(mcq_file))
    assert r.code == 2
    no_eval = tmp_path / "load.json"
    assert cli("load", "--summary", no_eval, mcq_file).code == 0
    r = cli("report", str(no_eval))
    assert r.code == 2 and "a `load` summary without evaluation figures" in r.stderr
