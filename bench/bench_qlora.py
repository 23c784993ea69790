"""`probllm dpo --load-in-4bit` (QLoRA: NF4 base, LoRA on top) against the same run on the full-precision base.

Same model (offline SmolLM2 by default), pairs, settings and thread count; each run its own process. Reported:
the base model's weight memory as loaded (transformers' get_memory_footprint, in this process), each run's peak
RSS (children included, from wait4), seconds per step (the trainer's own time / steps, loading excluded), and
the first and last logged loss (the adapter starts at zero, so both start at log 2).

    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_qlora.py [--steps 4] [--rounds 2] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_dpo import PY, make_pairs, run_measured  # noqa: E402


def footprint_mib(model_path: str, four_bit: bool) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from probllm.models import bnb_quantization_config

    kw = {"quantization_config": bnb_quantization_config("bnb-nf4", torch.float32), "device_map": {"": "cpu"}} \
        if four_bit else {}
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True, **kw)
    return model.get_memory_footprint() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: offline SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two runs this many times; best s/step kept")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "qlora.md"))
    args = ap.parse_args()

    from probllm.models import model_label, resolve_model

    model_path = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-qlora-"))
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(args.pairs)))
    threads = str(min(os.cpu_count() or 1, 2))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)}
    runs = (("LoRA, float32 base", []), ("QLoRA, NF4 base (--load-in-4bit)", ["--load-in-4bit"]))
    rows = [{"run": label, "weights_mib": footprint_mib(model_path, bool(extra)), "rounds": []}
            for label, extra in runs]
    for i in range(args.rounds):
        for row, (label, extra) in zip(rows, runs):
            out = work / (f"q4-{i}" if extra else f"fp32-{i}")
            cmd = [PY, "-m", "probllm", "dpo", str(data), "--model", model_path, "-o", str(out), "--max-steps",
                   str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--logging-steps", "1", "--no-bf16", "--save-steps", "1000", *extra]
            wall, rss, _ = run_measured(cmd, env, work / f"{out.name}.log")
            summary = json.loads((out / "summary.json").read_text())
            losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                      if "loss" in json.loads(line)]
            row["rounds"].append({"s_per_step": summary["seconds"] / summary["steps"], "rss": rss, "wall": wall,
                                  "loss": (losses[0], losses[-1]),
                                  "adapter_kib": (out / "adapter_model.safetensors").stat().st_size / 1024})
    for row in rows:
        row.update(min(row["rounds"], key=lambda r: r["s_per_step"]))
    base = rows[0]
    lines = [
        f"Model `{model_label(args.model)}`, {args.pairs} pairs, {args.steps} steps, batch {args.batch_size}, max "
        f"length {args.max_length}, float32 compute, adamw_torch, LoRA r 8 / alpha 16 / all-linear, "
        f"OMP_NUM_THREADS={threads}; {platform.machine()}, {os.cpu_count()} cores, CPU only. Best of {args.rounds} "
        f"alternating round(s); load average before the run: {os.getloadavg()[0]:.1f}.",
        "",
        "| run | base weights MiB | peak RSS MiB | s/step | wall s | loss first -> last | adapter KiB | "
        "weights ratio | time ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['weights_mib']:.0f} | {r['rss']:.0f} | {r['s_per_step']:.3f} | "
                     f"{r['wall']:.1f} | {r['loss'][0]:.4f} -> {r['loss'][1]:.4f} | {r['adapter_kib']:.0f} | "
                     f"{r['weights_mib'] / base['weights_mib']:.2f} | {r['s_per_step'] / base['s_per_step']:.2f} |")
    lines += ["", "Every round (s/step, peak RSS MiB), to show the noise of a shared machine: " + "; ".join(
        f"{r['run']}: " + ", ".join(f"{x['s_per_step']:.2f} s / {x['rss']:.0f} MiB" for x in r["rounds"])
        for r in rows)]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
