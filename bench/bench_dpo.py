"""`probllm dpo` against TRL's own CLI (`trl dpo`), then the on-disk reference log-prob cache.

Same model (offline SmolLM2 by default), same pairs (TRL conversational form, written to a dataset folder since
`trl dpo --dataset_name` wants a folder holding train.jsonl), same hyperparameters, same thread count
(OMP_NUM_THREADS set for both: `trl dpo` goes through accelerate, which otherwise pins one thread). Each run is its
own process; peak memory is its max RSS (children included, from wait4), seconds per step is the trainer's own
train_runtime / steps (model loading excluded, the same way for both).

Then: `--precompute-ref` (reference log-probs computed once, cached on disk keyed by model, tokens and max length)
run twice with different learning rates and LoRA ranks: the first run fills the cache, the second skips that pass.

    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_dpo.py [--steps 6] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable


def make_pairs(n: int) -> list[dict]:
    """Science-flavoured pairs in TRL string form: a short right answer against a longer wrong one."""
    import random

    rng = random.Random(0)
    topics = ["the derivative of x^2", "the time complexity of heapsort", "Newton's second law",
              "the entropy of a fair coin", "the boiling point of water at sea level", "a prime number"]
    right = ["2x.", "O(n log n) in the worst case.", "F = m a.", "1 bit.", "100 degrees Celsius.",
             "A number with exactly two divisors."]
    wrong = ["x^3 / 3, because you integrate.", "O(n^2), like bubble sort on every input.",
             "Energy equals mass times c squared.", "2 bits, one per side.", "90 degrees, roughly.",
             "Any odd number, such as 9."]
    out = []
    for i in range(n):
        k = rng.randrange(len(topics))
        out.append({"prompt": f"Question {i}: what is {topics[k]}? Explain briefly.",
                    "chosen": f"It is {right[k]} " * rng.randint(1, 3),
                    "rejected": f"It is {wrong[k]} " * rng.randint(1, 3), "source": "bench"})
    return out


def run_measured(cmd: list[str], env: dict, log_path: Path) -> tuple[float, float, str]:
    """Run a command; returns (wall seconds, peak RSS MiB of it and its children, combined output)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    text = log_path.read_text()
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    return wall, usage.ru_maxrss / 1024, text


def train_runtime(text: str) -> float:
    m = re.findall(r"'train_runtime': '?([0-9.]+)", text)
    if not m:
        sys.exit("no train_runtime in the output:\n" + text[-2000:])
    return float(m[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: offline SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    from probllm.models import resolve_model
    from probllm.train.pairs import normalize_pair, to_trl

    model = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    cache = work / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PROBLLM_CACHE": str(cache),
           "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    # The default model lives in the normal cache; a fresh PROBLLM_CACHE only isolates the ref-logp cache.
    pairs = make_pairs(args.pairs)
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (work / "trl-data").mkdir()
    (work / "trl-data" / "train.jsonl").write_text(
        "".join(json.dumps(to_trl(normalize_pair(p), True)) + "\n" for p in pairs))

    common = dict(steps=args.steps, bs=args.batch_size, ml=args.max_length)
    ours_cmd = [PY, "-m", "probllm", "dpo", str(work / "pairs.jsonl"), "--model", model, "--out", str(work / "ours"),
                "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length",
                str(args.max_length), "--no-bf16", "--logging-steps", "1", "--save-steps", "100000",
                "--no-gradient-checkpointing", "--optim", "adamw_torch"]
    trl_cmd = [str(Path(PY).with_name("trl")), "dpo", "--model_name_or_path", model, "--dataset_name",
               str(work / "trl-data"), "--output_dir", str(work / "trl"), "--max_steps", str(args.steps),
               "--per_device_train_batch_size", str(args.batch_size), "--max_length", str(args.max_length),
               "--learning_rate", "5e-4", "--lr_scheduler_type", "cosine", "--warmup_steps", "100",
               "--weight_decay", "0.05", "--max_grad_norm", "1.0", "--adam_beta1", "0.9", "--adam_beta2", "0.999",
               "--adam_epsilon", "1e-8", "--beta", "0.05", "--seed", "0", "--use_peft", "--lora_r", "8",
               "--lora_alpha", "16", "--lora_dropout", "0.05", "--lora_target_modules", "all-linear",
               "--bf16", "False", "--dtype", "float32", "--no_gradient_checkpointing", "--optim", "adamw_torch",
               "--use_cpu", "True", "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no",
               "--disable_tqdm", "True"]

    rows = []
    results = {}
    # Alternate the order over two rounds so that neither tool always runs on a warmer machine.
    for rnd in range(2):
        order = [("probllm dpo", ours_cmd), ("trl dpo", trl_cmd)]
        if rnd == 1:
            order.reverse()
        for name, cmd in order:
            shutil.rmtree(work / "ours", ignore_errors=True)
            shutil.rmtree(work / "trl", ignore_errors=True)
            wall, rss, text = run_measured(cmd, env, work / f"{name.split()[0]}-{rnd}.log")
            if name == "probllm dpo":
                summary = json.loads([ln for ln in text.splitlines() if ln.startswith('{"out"')][-1])
                rt = summary["seconds"]
            else:
                rt = train_runtime(text)
            results.setdefault(name, []).append((rt / args.steps, rss, wall))
            print(f"  round {rnd + 1} {name}: {rt / args.steps:.3f} s/step, peak {rss:.0f} MiB, wall {wall:.1f} s",
                  file=sys.stderr, flush=True)
    best = {k: (min(v[0] for v in vs), min(v[1] for v in vs), min(v[2] for v in vs)) for k, vs in results.items()}
    o, t = best["probllm dpo"], best["trl dpo"]
    rows.append(("trl dpo", *t, "1.00", "1.00"))
    rows.append(("probllm dpo", *o, f"{o[0] / t[0]:.2f}", f"{o[1] / t[1]:.2f}"))

    # Going further: the reference log-probs cached on disk. Run A fills the cache (lr 5e-4, r 8); run B has other
    # hyperparameters (lr 1e-4, r 16, beta 0.1) and reads them back.
    cache_rows = []
    base = [a for a in ours_cmd]
    for label, extra in (("precompute, cache empty (lr 5e-4, r 8)", []),
                         ("precompute, cache hit (lr 1e-4, r 16, beta 0.1)",
                          ["--lr", "1e-4", "--lora-r", "16", "--beta", "0.1"])):
        shutil.rmtree(work / "ours", ignore_errors=True)
        wall, rss, text = run_measured(base + ["--precompute-ref"] + extra, env, work / "cache.log")
        summary = json.loads([ln for ln in text.splitlines() if ln.startswith('{"out"')][-1])
        cache_rows.append((label, summary["seconds"] / args.steps, rss, wall, summary.get("ref_cache_hits")))
        print(f"  {label}: {summary['seconds'] / args.steps:.3f} s/step, wall {wall:.1f} s, "
              f"hits {summary.get('ref_cache_hits')}", file=sys.stderr, flush=True)

    import platform

    lines = [
        f"# `probllm dpo` vs `trl dpo` (TRL {__import__('trl').__version__})",
        "",
        f"Model `{Path(model).name}`, {args.pairs} pairs, {args.steps} steps, batch {args.batch_size}, max length "
        f"{args.max_length}, float32, adamw_torch, LoRA r 8 / alpha 16 / all-linear, beta 0.05, no gradient "
        f"checkpointing, OMP_NUM_THREADS={args.threads}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores. Best of 2 alternating rounds. s/step = trainer runtime / steps (loading excluded);"
        f" wall = whole process.",
        "",
        "| tool | s/step | peak RSS MiB | wall s | time ratio ours/TRL | memory ratio ours/TRL |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.0f} | {r[3]:.1f} | {r[4]} | {r[5]} |" for r in rows]
    lines += ["", "Every round (s/step, peak MiB), to show the noise of a shared machine: " + "; ".join(
        f"{name}: " + ", ".join(f"{v[0]:.2f} s / {v[1]:.0f} MiB" for v in vs) for name, vs in results.items())]
    lines += [
        "",
        "Reference log-probs cached on disk (`probllm dpo --precompute-ref`), keyed by model, tokens and max length "
        "(not by LoRA settings, learning rate or beta):",
        "",
        "| run | s/step (training) | peak RSS MiB | wall s (incl. reference pass) | cache hit |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.0f} | {r[3]:.1f} | {r[4]} |" for r in cache_rows]
    table = "\n".join(lines) + "\n"
    print(table)
    out = ROOT / "bench" / "results" / "dpo.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
