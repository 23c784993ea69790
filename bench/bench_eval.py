"""Bench: `probllm eval` against lm-evaluation-harness on the same model, items, template and batch size.

Both run in this one process on the same loaded model object (the offline SmolLM2-135M-Instruct, float32), so
neither pays model loading in its timing. Items: ARC-Easy dev (AI2's format) and the MMLU dev rows of
../shared/examples, turned into our MCQ records for `probllm eval` and into lm-eval's own document shapes
(ARC: question/choices{text,label}/answerKey; MMLU: question/choices/answer index) for custom lm-eval tasks that
copy lm-eval's `arc_easy` and `mmlu_<subject>` configs with `dataset_path: json`.

Reports per-item agreement of the predictions (acc and acc_norm), accuracy difference, items/s ratio; then the
quantize table (size, memory, tokens/s, accuracy per method). Prints markdown and writes bench/results/eval.md.

    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_eval.py [--arc-limit 200] [--batch-size 16]

Needs `pip install lm-eval==0.4.13 -c constraints.txt`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LETTERS = "ABCDE"
ARC_TEMPLATE = {
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
}
MMLU_TEMPLATE = {
    "output_type": "multiple_choice",
    "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\n"
                   "Answer:",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "answer",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
}


def shared_examples() -> Path:
    for c in (os.environ.get("PROBLLM_SHARED_EXAMPLES", ""), ROOT.parent / "shared" / "examples"):
        if c and Path(c).is_dir():
            return Path(c)
    sys.exit("bench_eval: ../shared/examples not found (set PROBLLM_SHARED_EXAMPLES)")


def prepare(work: Path, arc_limit: int | None) -> tuple[list[dict], list[dict]]:
    """Our MCQ records, and lm-eval task configs reading the same items from JSONL files."""
    ex = shared_examples()
    ours: list[dict] = []
    tasks: list[dict] = []
    arc_docs = []
    with open(ex / "arc" / "ARC-Easy-Dev.jsonl", encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            labels = [c["label"] for c in d["question"]["choices"]]
            texts = [c["text"] for c in d["question"]["choices"]]
            arc_docs.append({"id": d["id"], "question": d["question"]["stem"],
                             "choices": {"text": texts, "label": labels}, "answerKey": d["answerKey"]})
            ours.append({"id": d["id"], "question": d["question"]["stem"], "choices": texts,
                         "answer": LETTERS[labels.index(d["answerKey"])], "source": "arc-easy", "subject": "arc-easy"})
            if arc_limit and len(arc_docs) == arc_limit:
                break
    arc_file = work / "arc_easy.jsonl"
    arc_file.write_text("".join(json.dumps(d) + "\n" for d in arc_docs), encoding="utf-8")
    tasks.append({"task": "bench_arc_easy", "dataset_path": "json",
                  "dataset_kwargs": {"data_files": {"test": str(arc_file)}}, "test_split": "test", **ARC_TEMPLATE})
    for csv_path in sorted((ex / "mmlu" / "dev").glob("*_dev.csv")):
        subject = csv_path.name[: -len("_dev.csv")]
        docs = []
        with open(csv_path, encoding="utf-8", newline="") as fh:
            for i, row in enumerate(csv.reader(fh)):
                q, *choices, ans = row
                docs.append({"question": q, "subject": subject, "choices": choices, "answer": LETTERS.index(ans)})
                ours.append({"id": f"{subject}-dev-{i}", "question": q, "choices": choices, "answer": ans,
                             "source": "mmlu", "subject": subject})
        f = work / f"mmlu_{subject}.jsonl"
        f.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        tasks.append({"task": f"bench_mmlu_{subject}", "dataset_path": "json",
                      "dataset_kwargs": {"data_files": {"test": str(f)}}, "test_split": "test",
                      "description": f"The following are multiple choice questions (with answers) about "
                                     f"{subject.replace('_', ' ')}.\n\n", **MMLU_TEMPLATE})
    return ours, tasks


def run_lm_eval(model, tok, tasks: list[dict], batch_size: int) -> tuple[dict, float]:
    """lm-eval's per-item results keyed by (task, doc index), and its wall time."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu", dtype="float32")
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, batch_size=batch_size, log_samples=True,
                                  bootstrap_iters=0, verbosity="ERROR")
    seconds = time.perf_counter() - t0
    per_item = {}
    for task, samples in out["samples"].items():
        for s in samples:
            lls = [r[0] for r in s["filtered_resps"]]
            per_item[(task, s["doc_id"])] = {"acc": s["acc"], "acc_norm": s["acc_norm"], "lls": lls}
    return per_item, seconds


def run_ours(model, tok, records: list[dict], batch_size: int) -> tuple[list[dict], float]:
    from probllm.evaluate.mcqa import EvalOptions, Scorer, Summary, evaluate_records
    from probllm.io import Record, Stats

    scorer = Scorer(model, tok)
    t0 = time.perf_counter()
    preds = list(evaluate_records((Record(r) for r in records), scorer, EvalOptions(batch_size=batch_size),
                                  Stats(), Summary()))
    return preds, time.perf_counter() - t0


def compare(records, preds, theirs) -> dict:
    """Agreement per item: our pred vs lm-eval's argmax (acc and acc_norm), and the largest loglik difference."""
    task_index: dict[str, int] = {}
    agree = agree_norm = 0
    max_diff = 0.0
    ours_acc = theirs_acc = ours_norm = theirs_norm = 0.0
    rows = []
    for rec, pred in zip(records, preds):
        task = "bench_arc_easy" if rec["source"] == "arc-easy" else f"bench_mmlu_{rec['subject']}"
        i = task_index.get(task, 0)
        task_index[task] = i + 1
        t = theirs[(task, i)]
        their_pred = max(range(len(t["lls"])), key=lambda k: (t["lls"][k], -k))
        norm = [ll / len(c) for ll, c in zip(t["lls"], rec["choices"] if task == "bench_arc_easy" else "ABCD")]
        their_norm = max(range(len(norm)), key=lambda k: (norm[k], -k))
        agree += LETTERS[their_pred] == pred["pred"]
        agree_norm += LETTERS[their_norm] == pred["pred_norm"]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(pred["scores"], t["lls"])))
        ours_acc += pred["correct"]
        ours_norm += pred["correct_norm"]
        theirs_acc += t["acc"]
        theirs_norm += t["acc_norm"]
        rows.append(rec["source"])
    n = len(records)
    return {"items": n, "agree": agree / n, "agree_norm": agree_norm / n, "max_loglik_diff": max_diff,
            "ours_acc": ours_acc / n, "theirs_acc": theirs_acc / n, "ours_acc_norm": ours_norm / n,
            "theirs_acc_norm": theirs_norm / n}


def quantize_table(model_dir: str, records: list[dict], methods: list[str], limit: int, work: Path) -> list[dict]:
    """One `probllm quantize` run per method (each measured in fresh processes), on the first `limit` items."""
    mcq = work / "quant_eval.jsonl"
    mcq.write_text("".join(json.dumps(r) + "\n" for r in records[:limit]), encoding="utf-8")
    rows = []
    for method in methods:
        out = work / f"q-{method}"
        proc = subprocess.run([sys.executable, "-m", "probllm", "quantize", "--method", method, "--output", str(out),
                               "--eval", str(mcq)], capture_output=True, text=True, cwd=str(ROOT))
        if proc.returncode != 0:
            rows.append({"method": method, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arc-limit", type=int, default=None, help="ARC-Easy items (default: all 570 dev items)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quant-limit", type=int, default=120, help="items for the quantize table's accuracy")
    ap.add_argument("--quant-methods", default="torch-int8,quanto-int8,quanto-int4,bnb-int8,bnb-nf4,bnb-fp4")
    ap.add_argument("--skip-quantize", action="store_true")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "eval.md"))
    args = ap.parse_args()

    import torch
    from probllm.models import load_model, load_tokenizer, resolve_model, set_threads

    set_threads()
    model_dir = resolve_model(None)
    model = load_model(model_dir, dtype="float32", device="cpu")
    tok = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        work = Path(tmp)
        records, tasks = prepare(work, args.arc_limit)
        # Warm-up (first-call allocations) for both, on a few items, so neither pays it in the timing.
        run_ours(model, tok, records[:4], args.batch_size)
        theirs, their_s = run_lm_eval(model, tok, tasks, args.batch_size)
        preds, our_s = run_ours(model, tok, records, args.batch_size)
        # Same number of sequences per pass as lm-eval (it batches question-choice pairs, ~4 per question).
        small_batch = max(1, args.batch_size // 4)
        preds_small, our_small_s = run_ours(model, tok, records, small_batch)
        same_small = sum(a["pred"] == b["pred"] for a, b in zip(preds, preds_small)) / len(preds)
        cmp_all = compare(records, preds, theirs)
        by_source = {}
        for source in ("arc-easy", "mmlu"):
            idx = [i for i, r in enumerate(records) if r["source"] == source]
            by_source[source] = compare([records[i] for i in idx], [preds[i] for i in idx],
                                        {k: v for k, v in theirs.items()
                                         if (source == "arc-easy") == (k[0] == "bench_arc_easy")})
        n = len(records)
        lines = [
            f"## `probllm eval` vs lm-evaluation-harness {lm_eval_version()}",
            "",
            f"Model: offline SmolLM2-135M-Instruct (float32, CPU, {torch.get_num_threads()} threads), batch size "
            f"{args.batch_size} for both (ours: questions per pass; lm-eval: requests, i.e. question-choice pairs, "
            "per pass), zero-shot, lm-eval's ARC and MMLU templates; same loaded model, same process.",
            "",
            "| items | agreement acc | agreement acc_norm | acc ours / lm-eval | acc_norm ours / lm-eval "
            "| max abs loglik diff | items/s ours | items/s lm-eval | ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, c in [("all", cmp_all), *by_source.items()]:
            lines.append(
                f"| {name} ({c['items']}) | {c['agree']:.2%} | {c['agree_norm']:.2%} | {c['ours_acc']:.4f} / "
                f"{c['theirs_acc']:.4f} | {c['ours_acc_norm']:.4f} / {c['theirs_acc_norm']:.4f} | "
                f"{c['max_loglik_diff']:.2e} | " + (f"{n / our_s:.1f} | {n / their_s:.1f} | {their_s / our_s:.2f}x |"
                                                     if name == "all" else "| | |"))
        lines.append("")
        lines.append(f"Wall time: ours {our_s:.1f} s, lm-eval {their_s:.1f} s for {n} items.")
        lines.append(f"Ours at batch size {small_batch} questions (about {small_batch * 4} prompt+choice sequences "
                     f"per pass, as lm-eval's {args.batch_size} requests): {our_small_s:.1f} s, {n / our_small_s:.1f} "
                     f"items/s, {their_s / our_small_s:.2f}x lm-eval; same predictions as at batch "
                     f"{args.batch_size}: {same_small:.2%}.")
        if not args.skip_quantize:
            rows = quantize_table(model_dir, records, args.quant_methods.split(","), args.quant_limit, work)
            lines += ["", f"## `probllm quantize` on SmolLM2-135M-Instruct (accuracy: loglik acc on the first "
                      f"{args.quant_limit} bench items)", "", quant_markdown(rows)]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text, encoding="utf-8")


def quant_markdown(rows: list[dict]) -> str:
    from probllm.evaluate.report import quantize_table_markdown

    return quantize_table_markdown(rows)


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


if __name__ == "__main__":
    main()
