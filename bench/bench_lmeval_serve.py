"""lm-evaluation-harness 0.4.13 against `probllm serve`: its `local-completions` model scores an ARC task through
our /v1/completions (echo + logprobs), and must pick the same answers as `probllm eval` does locally.

Items: the ARC-Easy dev slice of ../shared/examples (AI2's format), as a custom lm-eval task copying lm-eval's
`arc_easy` config with `dataset_path: json`, and as our MCQ records for `probllm eval` (loglik, the same
template). lm-eval tokenizes the requests itself (`tokenized_requests`, with the model folder's tokenizer) and
sends token ids; the server returns the log-prob of every prompt token. Prints the per-item agreement of acc and
acc_norm predictions and both accuracies; writes bench/results/lmeval-serve.md.

    .venv/bin/pip install -r bench/requirements.txt -c constraints.txt      # lm-eval (make bench-setup)
    .venv/bin/python bench/bench_lmeval_serve.py --limit 20                 # a short run
    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_lmeval_serve.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from offline import ROOT  # noqa: E402  (offline, and this checkout importable)
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results" / "lmeval-serve.md"


def prepare(work: Path, limit: int | None) -> tuple[list[dict], dict]:
    from bench_eval import ARC_TEMPLATE, LETTERS, shared_examples

    docs, ours = [], []
    with open(shared_examples() / "arc" / "ARC-Easy-Dev.jsonl", encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            labels = [c["label"] for c in d["question"]["choices"]]
            texts = [c["text"] for c in d["question"]["choices"]]
            docs.append({"id": d["id"], "question": d["question"]["stem"],
                         "choices": {"text": texts, "label": labels}, "answerKey": d["answerKey"]})
            ours.append({"id": d["id"], "question": d["question"]["stem"], "choices": texts,
                         "answer": LETTERS[labels.index(d["answerKey"])], "source": "arc-easy"})
            if limit and len(docs) == limit:
                break
    data = work / "arc_easy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    task = {"task": "serve_arc_easy", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **ARC_TEMPLATE}
    return ours, task


def argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model folder (default: the offline SmolLM2)")
    parser.add_argument("--limit", type=int, default=None, help="first N ARC-Easy dev items")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval requests per HTTP call")
    args = parser.parse_args()

    import lm_eval

    from probllm.models import resolve_model
    from servers import probllm_serve

    model_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        records, task = prepare(work, args.limit)
        mcq = work / "mcq.jsonl"
        mcq.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

        t0 = time.perf_counter()
        local = subprocess.run([sys.executable, "-m", "probllm", "eval", str(mcq), "--model", model_dir],
                               capture_output=True, text=True, cwd=str(ROOT))
        local_s = time.perf_counter() - t0
        if local.returncode:
            sys.exit(f"probllm eval failed:\n{local.stderr}")
        ours = [json.loads(line) for line in local.stdout.splitlines() if line.strip()]

        with probllm_serve("--model", model_dir, "--served-model-name", "bench") as (url, _, _):
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model="local-completions",
                model_args={"base_url": f"{url}/completions", "model": "bench", "tokenizer_backend": "huggingface",
                            "tokenizer": model_dir, "tokenized_requests": True, "num_concurrent": 1,
                            "max_retries": 1, "batch_size": args.batch_size},
                tasks=[task], log_samples=True, bootstrap_iters=0, verbosity="ERROR")
            theirs_s = time.perf_counter() - t0

    samples = sorted(out["samples"]["serve_arc_easy"], key=lambda s: s["doc_id"])
    same_acc = same_norm = 0
    max_diff = 0.0
    for rec, s in zip(ours, samples):
        lls = [r[0] for r in s["filtered_resps"]]
        pred = argmax(lls)
        pred_norm = argmax([ll / len(c) for ll, c in zip(lls, rec["choices"])])
        same_acc += "ABCDE"[pred] == rec["pred"]
        same_norm += "ABCDE"[pred_norm] == rec["pred_norm"]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(lls, rec["scores"])))
    n = len(samples)
    res = out["results"]["serve_arc_easy"]
    acc_local = sum(r["correct"] for r in ours) / n
    accn_local = sum(r["correct_norm"] for r in ours) / n
    lines = [
        f"lm-evaluation-harness {lm_eval.__version__ if hasattr(lm_eval, '__version__') else '0.4.13'} "
        f"`local-completions` -> `probllm serve` ({Path(model_dir).name}) vs local `probllm eval`, "
        f"ARC-Easy dev, {n} items. Machine: {os.cpu_count()} cores (shared; times are indicative only).", "",
        "| | acc | acc_norm | seconds |", "| --- | ---: | ---: | ---: |",
        f"| lm-eval via probllm serve | {res['acc,none']:.4f} | {res['acc_norm,none']:.4f} | {theirs_s:.1f} |",
        f"| probllm eval (local) | {acc_local:.4f} | {accn_local:.4f} | {local_s:.1f} |", "",
        f"Agreement on the predicted answer: acc {same_acc}/{n} ({same_acc / n:.1%}), acc_norm {same_norm}/{n} "
        f"({same_norm / n:.1%}); largest log-likelihood difference {max_diff:.2e}.",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table + "\n")
    if same_acc != n or same_norm != n:
        sys.exit(1)


if __name__ == "__main__":
    main()
