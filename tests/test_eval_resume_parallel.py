"""eval: nothing scored is lost on Ctrl-C, `-o FILE` resumes, and N processes write what one process writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probllm.evaluate.mcqa import EvalOptions, evaluate_records
from probllm.evaluate.scorer import MCQScorer, local_scorer
from probllm.evaluate.summary import Summary
from probllm.io import Record, Stats

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    {"question": "What is 2 + 2?", "choices": ["3", "4", "5", "6"], "answer": "B", "source": "arc-easy"},
    {"question": "Which gas do plants absorb?", "choices": ["Oxygen", "Carbon dioxide", "Nitrogen"], "answer": "B",
     "source": "arc-easy"},
    {"question": "Water boils at sea level at", "choices": ["50 C", "100 C", "0 C", "200 C"], "answer": "B",
     "source": "mmlu", "subject": "conceptual_physics"},
    {"question": "Heapsort's worst case is", "choices": ["O(n)", "O(n log n)", "O(n^2)", "O(1)", "O(log n)"],
     "answer": "B", "source": "arc-challenge"},
]


def records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        r = dict(BASE[i % len(BASE)])
        r["id"] = f"q{i}"
        r["question"] = f"{r['question']} (variant {i % 7}{'!' * (i % 3)})"
        out.append(r)
    return out


def jsonl(recs) -> str:
    return "".join(json.dumps(r) + "\n" for r in recs)


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


class InterruptAfter:
    """A real scorer that gets Ctrl-C during its n-th batch, as a user pressing it mid-forward-pass would."""

    def __init__(self, scorer: MCQScorer, n: int):
        self.scorer, self.n, self.calls = scorer, n, 0

    def __getattr__(self, name):
        return getattr(self.scorer, name)

    def loglik(self, prompts):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.scorer.loglik(prompts)


def test_ctrl_c_mid_window_still_yields_every_scored_item(tiny_model_dir):
    from probllm.models import load_model, load_tokenizer

    scorer = local_scorer(load_model(tiny_model_dir), load_tokenizer(tiny_model_dir))
    recs = records(40)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for rec in evaluate_records((Record(r) for r in recs), InterruptAfter(scorer, 4), EvalOptions(batch_size=4),
                                    Stats(), Summary()):
            got.append(rec)
    # 40 items are one window (4 x 16); three batches of 4 were scored before Ctrl-C: all 12 come out, in order.
    assert len(got) == 12
    ids = [r["id"] for r in got]
    assert ids == sorted(ids, key=lambda i: int(i[1:]))
    full = list(evaluate_records((Record(r) for r in recs), scorer, EvalOptions(batch_size=4), Stats(), Summary()))
    by_id = {r["id"]: r for r in full}
    for r in got:
        assert r["pred"] == by_id[r["id"]]["pred"] and r["scores"] == pytest.approx(by_id[r["id"]]["scores"], abs=1e-4)


def _eval_cmd(model, *args):
    return [sys.executable, "-m", "probllm", "eval", "--model", model, *map(str, args)]


def test_ctrl_c_then_rerun_with_output_file_loses_and_duplicates_nothing(cli, tiny_model_dir, tmp_path):
    recs = records(400)
    src = tmp_path / "mcq.jsonl"
    src.write_text(jsonl(recs))
    out = tmp_path / "preds.jsonl"
    proc = subprocess.Popen(_eval_cmd(tiny_model_dir, "--batch-size", "2", "-o", out, src), cwd=str(ROOT),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or out.stat().st_size == 0) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr.decode()[-2000:]
    assert stdout == b""  # -o: records go to the file only
    partial = read(out)
    assert 0 < len(partial) < len(recs)
    assert f"{len(partial)} out" in stderr.decode()  # everything reported as written is in the file
    r = cli("eval", "--model", tiny_model_dir, "--batch-size", "2", "-o", out, src)
    assert r.code == 0, r.stderr
    assert f"{len(partial)} skipped (already in --output" in r.stderr
    final = read(out)
    assert [x["id"] for x in final] == [x["id"] for x in recs]  # each once, in input order
    clean = cli("eval", "--model", tiny_model_dir, "--batch-size", "2", src)
    assert clean.code == 0
    for a, b in zip(final, clean.records):
        assert a["pred"] == b["pred"] and a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    # A rerun of a finished file does nothing and reports the whole run's accuracy.
    summary = tmp_path / "s.json"
    r = cli("eval", "--model", tiny_model_dir, "-o", out, "--summary", summary, src)
    assert r.code == 0 and read(out) == final
    assert json.loads(summary.read_text())["overall"]["items"] == len(recs)


def test_two_processes_write_what_one_process_writes(cli, tiny_model_dir, tmp_path):
    recs = records(70)
    src = tmp_path / "mcq.jsonl"
    src.write_text(jsonl(recs))
    one = cli("eval", "--model", tiny_model_dir, "--batch-size", "2", src)
    assert one.code == 0, one.stderr
    two = cli("eval", "--model", tiny_model_dir, "--batch-size", "2", "--num-processes", "2", src)
    assert two.code == 0, two.stderr
    assert [r["id"] for r in two.records] == [r["id"] for r in one.records] == [r["id"] for r in recs]
    for a, b in zip(one.records, two.records):
        assert set(a) == set(b) and a["pred"] == b["pred"] and a["pred_norm"] == b["pred_norm"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    assert "70 in, 70 out" in two.stderr
    # stdin is shared with the other process; -o works with several processes too.
    out = tmp_path / "p.jsonl"
    r = cli("eval", "--model", tiny_model_dir, "--batch-size", "2", "--num-processes", "2", "-o", out,
            input=jsonl(recs))
    assert r.code == 0, r.stderr
    assert [x["id"] for x in read(out)] == [x["id"] for x in recs]
