"""`make experiment` and `make ablation` (scripts/experiment.sh, scripts/ablation.sh) end to end on a tiny slice:
the real commands in real pipes with the tiny model, then the resume and settings checks. The full runs on the
public data are not part of the suite (docs/results/ has their record)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(name: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"scripts/{name}.sh"], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PROBLLM": f"{sys.executable} -m probllm", "PY": sys.executable, **env})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """One experiment and one ablation on the project's examples, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("experiments")
    probllm = [sys.executable, "-m", "probllm"]
    student, extra = tmp / "student.jsonl", tmp / "extra.jsonl"
    student.write_text(subprocess.run([*probllm, "pair-annotated", "examples/annotated.jsonl"], cwd=ROOT,
                                      capture_output=True, text=True, check=True).stdout)
    extra.write_text(subprocess.run([*probllm, "pair-stackexchange", "examples/stackexchange.jsonl"], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout)
    out, results = tmp / "out", tmp / "results"
    experiment_env = {
        "OUT": str(out), "RESULTS": str(results), "MODEL": tiny_model_dir, "STEPS": "2", "SPLIT_KEY": "prompt",
        "STUDENT": str(student), "EXTRA": str(extra), "QA": "examples/qa.jsonl",
        "AGAINST": "examples/arc.jsonl examples/mmlu",
        "DPO_ARGS": "--max-length 64 --batch-size 2 --eval-batch-size 4 --eval-steps 1 --logging-steps 1 "
                    "--save-steps 1 --no-bf16"}
    experiment = script("experiment", experiment_env)
    assert experiment.returncode == 0, experiment.stderr[-3000:]
    ablation_env = {
        "OUT": str(out), "RESULTS": str(results), "MODEL": tiny_model_dir, "LIMIT": "2",
        "MMLU": "examples/mmlu", "ARC": "examples/arc.jsonl examples/arc-hf.jsonl", "GSM8K": "examples/gsm8k.jsonl",
        "MATH": "examples/math", "NOTES": "examples/notes", "QUANT8": "torch-int8", "QUANT4": "", "GGUF": ""}
    ablation = script("ablation", ablation_env)
    assert ablation.returncode == 0, ablation.stderr[-3000:]
    return {"out": out, "results": results, "experiment_env": experiment_env, "ablation_env": ablation_env}


def test_experiment_writes_table_1_for_both_runs_with_intervals_and_curves(runs):
    page = (runs["results"] / "experiment.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith(("| student data only", "| all data"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "2"  # steps
        float(cells[4])  # eval loss
        assert "[" in cells[5] and "(n=" in cells[6]  # reward accuracies with their intervals and counts
    assert "Paired on the same" in page and "McNemar" in page
    exp = runs["out"] / "experiment"
    # The all-data run trained on more pairs than the student-only run: the extra sources went to its train side.
    s_only = json.loads((exp / "student-only.summary.json").read_text())
    s_all = json.loads((exp / "all-data.summary.json").read_text())
    assert s_all["pairs"] > s_only["pairs"] > 0
    # Every record that went in is accounted for: decontaminated sources, no test prompt on the train side.
    train = {json.loads(line)["prompt"] for line in (exp / "student.train.jsonl").read_text().splitlines()}
    test = {json.loads(line)["prompt"] for line in (exp / "student.test.jsonl").read_text().splitlines()}
    assert train and test and not (train & test)
    pngs = sorted((runs["results"] / "experiment").glob("*.png"))
    assert len(pngs) == 17 and all(p.stat().st_size > 1000 for p in pngs)
    for png in ("eval-loss.png", "eval-rewards-accuracies.png"):
        assert f"](experiment/{png})" in page
    assert "content identity `sha256:" in page or "content identity `" in page


def test_experiment_resumes_finished_stages_and_refuses_other_settings(runs):
    exp = runs["out"] / "experiment"
    # As if interrupted inside a stage: its stamp is missing. (The split, the cheapest stage to run again: every
    # stage goes through the same stamp; a training stage's own restart, `dpo --resume`, is tested with dpo.)
    (exp / ".done" / "split").unlink()
    train_before = (exp / "student.train.jsonl").read_bytes()
    again = script("experiment", runs["experiment_env"])
    assert again.returncode == 0, again.stderr[-2000:]
    for done in ("data", "train-student-only", "rewards-student-only", "train-all-data", "rewards-all-data"):
        assert f"stage {done} already done" in again.stderr
    assert "experiment: stage split\n" in again.stderr
    assert (exp / "student.train.jsonl").read_bytes() == train_before  # the same seed, the same split
    assert "probllm dpo" not in again.stderr and "probllm reward-eval" not in again.stderr  # nothing trained again
    other = script("experiment", {**runs["experiment_env"], "STEPS": "3"})
    assert other.returncode != 0
    assert "started with other settings" in other.stderr and "steps=3" in other.stderr


def test_ablation_pairs_every_row_with_base_on_the_same_items(runs):
    page = (runs["results"] / "ablation.md").read_text()
    accuracy = page.split("## Accuracy", 1)[1].split("\n## ", 1)[0]  # the first table (RAG coverage follows)
    table = [line for line in accuracy.splitlines() if line.startswith("| ")]
    labels = [row.strip("|").split("|")[0].strip() for row in table[2:]]
    assert labels == ["base", "+DPO", "+DPO 8-bit (torch-int8)", "+DPO +RAG (top 1)"]
    for row in table[3:]:
        assert "McNemar" not in row and "[" in row  # a paired interval on every row after base
    items = json.loads((runs["out"] / "ablation" / "items.json").read_text())
    assert items == {"mmlu": 2, "arc": 4, "gsm8k": 2, "math": 2}  # LIMIT=2 per input, none dropped
    preds = (runs["out"] / "ablation" / "dpo.preds.jsonl").read_text().splitlines()
    assert len(preds) == sum(items.values()) and all("error" not in json.loads(p) for p in preds)
    summary = json.loads((runs["out"] / "ablation" / "dpo.json").read_text())
    assert summary["adapter"] and summary["model_id"] != json.loads(
        (runs["out"] / "ablation" / "base.json").read_text())["model_id"]
    again = script("ablation", runs["ablation_env"])
    assert again.returncode == 0 and "stage eval-rag already done" in again.stderr and "probllm eval:" not in again.stderr
