"""Bench: `probllm export --format gguf` time and peak memory on SmolLM2-135M-Instruct (f16 and q4_0).

Each export runs as its own `python -m probllm export` process, timed from start to exit, with its peak resident
memory read from the kernel (wait4's ru_maxrss). A process that only imports what export imports (torch,
transformers, gguf, safetensors) gives the floor that every such process pays, so `peak - floor` is what the
conversion itself holds: with tensors converted one at a time it stays near one tensor's float32 copy plus its
quantized form, not the model (the float weights are memory-mapped and read a tensor at a time).

    flock /tmp/probllm-heavy.lock nice -n 0 .venv/bin/python bench/bench_export.py      # the official run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from offline import ROOT  # noqa: E402  (offline, and this checkout importable)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
FLOOR = "import torch, transformers, gguf, safetensors, numpy; from probllm.cli import app"


def timed(args: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak resident MB and exit code of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, cwd=str(ROOT))
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"bench_export: {' '.join(args)} failed: {proc.stderr.read().decode()[-400:]}")
    return seconds, usage.ru_maxrss / 1024, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quants", default="f16,q4_0")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "export.md"))
    args = ap.parse_args()

    from probllm.evaluate.quantize import weights_size
    from probllm.models import resolve_model

    model_dir = resolve_model(None)
    float_mb = weights_size(model_dir) / 2**20
    floor_s, floor_mb, _ = timed([sys.executable, "-c", FLOOR])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for quant in args.quants.split(","):
            out = Path(tmp) / f"smollm2.{quant}.gguf"
            seconds, peak_mb, _ = timed([sys.executable, "-m", "probllm", "export", "--format", "gguf",
                                         "--quant", quant, "-o", str(out)])
            rows.append((quant, seconds, peak_mb, out.stat().st_size / 2**20))
            print(f"bench_export: {quant}: {seconds:.1f} s, peak {peak_mb:.0f} MB", file=sys.stderr)
    lines = ["## `probllm export --format gguf` on SmolLM2-135M-Instruct", "",
             f"Source: the offline float32 safetensors folder ({float_mb:.0f} MB of weights, 135M parameters). "
             f"One process per export, timed start to exit; peak = the process's maximum resident memory. "
             f"Import floor (a process importing torch, transformers, gguf, safetensors and the CLI): "
             f"{floor_s:.1f} s, {floor_mb:.0f} MB.", "",
             "| quant | wall s | of which import floor s | peak RSS MB | peak - floor MB | GGUF MB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for quant, seconds, peak_mb, size_mb in rows:
        lines.append(f"| {quant} | {seconds:.1f} | {floor_s:.1f} | {peak_mb:.0f} | {peak_mb - floor_mb:.0f} | "
                     f"{size_mb:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
