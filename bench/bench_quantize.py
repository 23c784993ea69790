"""Bench: GGUF q8_0 / q4_0 run by llama.cpp against the fp32 transformers model and bitsandbytes nf4, one run.

Every variant is measured in a fresh process (`probllm.evaluate.quantize.measure`, what `probllm quantize`
reports): weights on disk, resident memory added by loading, greedy tokens/s on the same prompt (32 tokens), and
loglik accuracy on the same items (ARC Easy/Challenge and MMLU dev examples from ../shared/examples, converted by
mcqify's converters, lm-eval's templates). The GGUF files are `probllm export`'s (via `quantize --method gguf-*`).

GGUF speed, memory and accuracy come from llama.cpp through llama-cpp-python (`make bench-setup` builds it).
Without it the bench says so, reports the files' sizes, and takes the GGUF rows' accuracy from transformers'
dequantized copy of the same quantized weights (speed and memory of that copy would say nothing about llama.cpp,
so they are left out).

    flock /tmp/probllm-heavy.lock nice -n 0 .venv/bin/python bench/bench_quantize.py      # the official run
    .venv/bin/python bench/bench_quantize.py --limit 20 --output /tmp/quantize-check.md     # a check
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

from offline import ROOT  # noqa: E402  (offline, and this checkout importable)
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

METHODS = ("bnb-nf4", "gguf-q8_0", "gguf-q4_0")
ARC_FILES = (("ARC-Easy-Dev.jsonl", "easy"), ("ARC-Challenge-Dev.jsonl", "challenge"))


def shared_examples() -> Path:
    for c in (os.environ.get("PROBLLM_SHARED_EXAMPLES", ""), ROOT.parent / "shared" / "examples"):
        if c and Path(c).is_dir():
            return Path(c)
    sys.exit("bench_quantize: ../shared/examples not found (set PROBLLM_SHARED_EXAMPLES)")


def items(limit: int) -> list[dict]:
    """Every MMLU dev row, then ARC Easy and Challenge dev items in turn, `limit` in all."""
    from probllm.data.mcq import arc_to_mcq, mmlu_to_mcq

    ex = shared_examples()
    out = []
    for path in sorted((ex / "mmlu" / "dev").glob("*_dev.csv")):
        subject = path.name[: -len("_dev.csv")]
        with open(path, encoding="utf-8", newline="") as fh:
            for q, a, b, c, d, answer in csv.reader(fh):
                out.append(mmlu_to_mcq({"question": q, "subject": subject, "A": a, "B": b, "C": c, "D": d,
                                        "answer": answer}))
    arc = []
    for name, kind in ARC_FILES:
        with open(ex / "arc" / name, encoding="utf-8") as fh:
            arc.append([arc_to_mcq(json.loads(line), kind) for line in fh])
    for pair in zip(*arc):
        out.extend(pair)
    return out[:limit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="MCQ items for the accuracy column")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "quantize.md"))
    args = ap.parse_args()

    from probllm.evaluate.quantize import measure_in_subprocess, quantize_to_folder, weights_size
    from probllm.lm import llama_cpp
    from probllm.models import QUANT_METHODS, resolve_model

    model_dir = resolve_model(None)
    if not llama_cpp.available():
        print(f"bench_quantize: {llama_cpp.NOT_INSTALLED}: GGUF rows give size and (dequantized) accuracy only",
              file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        work = Path(tmp)
        mcq = work / "items.jsonl"
        records = items(args.limit)
        mcq.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        print(f"bench_quantize: fp32 on {len(records)} items", file=sys.stderr)
        base = measure_in_subprocess(model_dir, None, [str(mcq)], None, 16)
        rows.append({"variant": "fp32 (transformers)", "bits": 32, "size_mb": weights_size(model_dir) / 2**20,
                     "engine": "transformers", **base})
        for method in args.methods.split(","):
            folder = work / method
            print(f"bench_quantize: {method}", file=sys.stderr)
            quantize_to_folder(model_dir, method, str(folder))
            result = measure_in_subprocess(str(folder), None, [str(mcq)], None, 16)
            rows.append({"variant": method, "bits": QUANT_METHODS[method]["bits"],
                         "size_mb": weights_size(str(folder)) / 2**20,
                         "engine": result.get("engine", QUANT_METHODS[method]["library"]), **result})
    text = markdown(rows, len(records))
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text, encoding="utf-8")


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def markdown(rows: list[dict], n_items: int) -> str:
    base = rows[0]
    lines = [f"## GGUF (llama.cpp) vs transformers fp32 and bitsandbytes nf4: SmolLM2-135M-Instruct, {n_items} "
             f"ARC/MMLU example items", "",
             "| variant | bits | weights MB | resident MB | tokens/s | vs fp32 | acc | acc_norm | measured by |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        speed = r.get("tokens_per_s")
        ratio = f"{speed / base['tokens_per_s']:.2f}x" if speed and base.get("tokens_per_s") else "-"
        lines.append(f"| {r['variant']} | {r['bits']} | {r['size_mb']:.0f} | {_cell(r.get('rss_mb'), '{:.0f}')} | "
                     f"{_cell(speed, '{:.1f}')} | {ratio} | {_cell(r.get('accuracy'), '{:.3f}')} | "
                     f"{_cell(r.get('acc_norm'), '{:.3f}')} | {r['engine']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
