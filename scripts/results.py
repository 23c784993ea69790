"""The record of a `make experiment` or `make ablation` run, as markdown for docs/results/: the numbers with their
intervals, the data, the settings, the model's content identity, the machine, the commit and the time of each
stage. Reads only what the scripts wrote; computes nothing that the commands did not (the statistics come from
probllm.evaluate.report, the one definition of the paired test).

    python scripts/results.py experiment runs/demo/experiment [--results docs/results]
    python scripts/results.py ablation runs/demo/ablation [--results docs/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path

REPORT_TABLE_1 = [("Student-only (report, 7B)", 0.8811, 0.9969, 0.5687),
                  ("ProbLLM-7B, all data (report, 7B)", 0.6356, 0.9125, 0.6164)]
RUNS = (("student-only", "student data only"), ("all-data", "all data"))
# The curves shown inline; the other PNGs of `probllm plot` are linked below them.
SHOWN_CURVES = ("eval-loss", "eval-rewards-accuracies", "eval-rewards-margins", "train-loss")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion (sound at small n and near 0 or 1, unlike p ± 1.96 se)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def machine() -> str:
    cpu, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = "?"
    try:
        kib = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f"{kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    bf16 = "with" if {"avx512_bf16", "amx_bf16"} & flags else "no"
    return (f"{cpu}, {os.cpu_count()} cores ({bf16} native bfloat16), {mem} memory, {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def short(path: str) -> str:
    """A path as its last two parts (mmlu/test, math/test): the last alone is often ambiguous."""
    return "/".join(Path(path).parts[-2:])


def device() -> str:
    import torch

    return "GPU" if torch.cuda.is_available() else "CPU"


def stage_times(run_dir: Path) -> list[tuple[str, int]]:
    done = run_dir / ".done"
    return sorted(((p.name, int(p.read_text().strip() or 0)) for p in done.iterdir()), key=lambda t: t[0]) \
        if done.is_dir() else []


def header(title: str, run_dir: Path, target: str) -> list[str]:
    commit = git("rev-parse", "--short", "HEAD")
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    times = stage_times(run_dir)
    total = sum(t for _, t in times)
    return [f"# {title}", "",
            f"Run with `{target}` at commit {commit}{dirty}, written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
            f"Machine: {machine()}.",
            f"Wall time of the stages: {total // 60} min {total % 60} s"
            + (f" ({', '.join(f'{n} {t} s' for n, t in times)})." if times else "."), ""]


def settings_block(run_dir: Path) -> list[str]:
    path = run_dir / "settings.txt"
    return ["```", path.read_text(encoding="utf-8").strip(), "```"] if path.exists() else []


# ---------------------------------------------------------------------------------------------------- experiment

def experiment(exp: Path) -> tuple[str, list[Path]]:
    from probllm.evaluate.report import paired_comparison
    from probllm.models import model_identity

    rows, per_pair, summaries = [], {}, {}
    for name, label in RUNS:
        s = read_json(exp / f"{name}.summary.json")
        tr, te = read_json(exp / f"{name}.train-rewards.json"), read_json(exp / f"{name}.test-rewards.json")
        summaries[name] = s
        cells = [label, str(s["pairs"]), str(s["steps"]), f"{s['epochs']:.2f}", f"{s['eval']['eval_loss']:.4f}"]
        for r in (tr, te):
            lo, hi = wilson(r["reward_accuracy"] * r["pairs"], r["pairs"])
            cells.append(f"{r['reward_accuracy']:.4f} [{lo:.3f}, {hi:.3f}] (n={r['pairs']})")
        rows.append(cells)
        scored = exp / f"{name}.test-rewards.jsonl"
        if scored.exists():
            per_pair[name] = {str(i): bool(json.loads(line)["correct"])
                              for i, line in enumerate(scored.read_text(encoding="utf-8").splitlines())}
    config = read_json(exp / "all-data" / "config.json")
    identity = model_identity(config.get("model_path") or config.get("model"))

    model = config.get("model") or identity.name
    out = header(f"Table 1 on public data: student-only vs all-data DPO ({Path(str(model)).name}, {device()})", exp,
                 "make experiment")
    out += ["## Table 1", "",
            "Reward accuracy is the share of pairs whose implicit reward β·(log π − log π_ref) is higher for the "
            "chosen answer; train accuracy is on the student training pairs (the report's column), test on the "
            "held-out 20%. Brackets: Wilson 95% intervals. Eval loss is TRL's DPO loss on the held-out pairs at "
            "the last step.", "",
            "| model | train pairs | steps | epochs | eval loss | train reward acc [95% CI] | test reward acc [95% CI] |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += [f"| {label} | | 2000 | 1.53 | {loss:.4f} | {tr:.4f} | {te:.4f} |" for label, loss, tr, te in REPORT_TABLE_1]
    if len(per_pair) == 2:
        c = paired_comparison(per_pair["student-only"], per_pair["all-data"])
        out += ["", f"Paired on the same {len(per_pair['all-data'])} test pairs, all data minus student only: "
                f"{100 * c['diff']:+.1f} points of test reward accuracy, 95% bootstrap interval "
                f"[{100 * c['low']:+.1f}, {100 * c['high']:+.1f}], McNemar exact p = {c['p']:.3g} "
                f"({c['wins']} pairs won, {c['losses']} lost)."]
    out += ["", "## Curves", "",
            "The 17 curves of the report's Appendix E from both runs' `metrics.jsonl`, overlaid by `probllm plot`.",
            ""]
    plots = sorted((exp / "plots").glob("*.png"))
    shown = [p for p in plots if p.stem in SHOWN_CURVES]
    out += [f"![{p.stem}](experiment/{p.name})" for p in shown]
    out += ["", "All curves: " + ", ".join(f"[{p.stem}](experiment/{p.name})" for p in plots) + ".", ""]
    out += ["## Data", "", "| role in the report | public stand-in | records in | kept by length | "
            "dropped by decontamination | pairs used |", "| --- | --- | --- | --- | --- | --- |"]
    d = exp / "data"
    # The sources by their paths in settings.txt (fits.json names a file or folder by its last part alone).
    inputs = {Path(line.split()[1]).name: short(line.split()[1]) for line in
              (exp / "settings.txt").read_text(encoding="utf-8").splitlines() if line.startswith("input ")}
    for fits in sorted(d.glob("*.fits.json")):
        f = read_json(fits)
        dec = read_json(d / f"{f['name']}.decontaminate.json")
        dropped = dec["counts"]["in"] - dec["counts"]["out"]
        note = ""
        if f["name"].startswith("corrupted."):
            c = read_json(d / f"{f['name'].replace('corrupted.', 'corrupt.', 1)}.json")
            note = f" ({c['counts']['out']} of {c['counts']['in']} corrupted; the rest unchanged by the rules)"
        out.append(f"| {f['role']} | {inputs.get(f['source'], f['source'])} | {f['in']} | {f['out']} (prompt ≤ {f['limit']} chars) | "
                   f"{dropped} | {dec['counts']['out']}{note} |")
    bench = next(iter(d.glob("*.decontaminate.json")), None)
    if bench:
        items = read_json(bench)["benchmark_items"]
        out += ["", "Decontaminated (13-gram overlap, lm-eval's rule) against the evaluation items of the ablation: "
                + ", ".join(f"{short(k)} {v}" for k, v in items.items())
                + f" ({sum(items.values())} items). Split 80/20 by prompt with `probllm split` "
                f"(student train {summaries['student-only']['pairs']} pairs, test "
                f"{summaries['student-only'].get('eval_pairs', '?')}); the other sources go to the all-data "
                "training side only."]
    fallbacks = "; ".join(config.get("fallbacks", [])) or "none"
    out += ["", "## Settings", "",
            f"Model: {identity.name}, content identity `{identity.id}`. Both runs: LoRA r {config['lora_r']}, "
            f"alpha {config['lora_alpha']}, dropout {config['lora_dropout']}, targets {config['lora_target']}; "
            f"DPO beta {config['beta']} ({config['loss']}); lr {config['lr']} {config['lr_scheduler']}, "
            f"{config['warmup_steps']} warmup steps; weight decay {config['weight_decay']}; batch "
            f"{config['batch_size']}; max length {config['max_length']}; {config['max_steps']} steps; "
            f"seed {config['seed']}; bf16 {config['bf16']}; optimizer {config['optim']} (fallbacks: {fallbacks}). "
            "The script's settings (checked on resume):", ""]
    out += settings_block(exp)
    return "\n".join(out) + "\n", plots


# ------------------------------------------------------------------------------------------------------ ablation

def rag_coverage(run: Path, notes: list[str]) -> list[str]:
    """Which notes the top passage of each question came from, per subject (MMLU) or source: what the +RAG row
    could draw on, measured rather than claimed."""
    attached = run / "mcq.context.jsonl"
    if not attached.exists():
        return []
    index = read_json(run / "index.json") if (run / "index.json").exists() else {}
    books = sorted(notes, key=len, reverse=True)
    table: dict[str, dict[str, int]] = {}
    scores: dict[str, list[float]] = {}
    for line in attached.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        group = rec.get("subject") if rec.get("source") == "mmlu" else rec.get("source", "?")
        hits = rec.get("context") or []
        top = hits[0] if hits else {}
        source = str(top.get("source", ""))
        book = next((Path(b).name for b in books if source.startswith(b.rstrip("/"))), Path(source).parent.name or "-")
        table.setdefault(group, {}).setdefault(book, 0)
        table[group][book] += 1
        if "score" in top:
            scores.setdefault(group, []).append(float(top["score"]))
    lines = ["## +RAG: the notes and what they cover", "",
             f"Index of {', '.join(f'`{n}`' for n in notes)}"
             + (f": {index['documents']} documents, {index['chunks']} chunks" if "chunks" in index else "")
             + ". Where each question's top passage came from (share of the questions of that subject or source) "
             "and its mean retrieval score:", "",
             "| items | n | top passage from | mean top score |", "| --- | --- | --- | --- |"]
    for group in sorted(table):
        counts = table[group]
        n = sum(counts.values())
        where = ", ".join(f"{b} {100 * c / n:.0f}%" for b, c in sorted(counts.items(), key=lambda t: -t[1]))
        mean = sum(scores.get(group, [0.0])) / max(1, len(scores.get(group, [])))
        lines.append(f"| {group} | {n} | {where} | {mean:.3f} |")
    return lines + [""]


def ablation(run: Path, notes: list[str]) -> tuple[str, list[Path]]:
    base = read_json(run / "base.json") if (run / "base.json").exists() else {}
    model = Path(str(base.get("model") or "the default model")).name
    out = header(f"Ablation on public MCQA items: base, +DPO, quantized, +RAG ({model}, {device()})", run,
                 "make ablation")
    out += ["## Accuracy", "",
            "`eval --method loglik` with lm-eval's ARC and MMLU prompts, zero-shot; ± is the standard error. Every "
            "row is paired with the base model on the same items: the difference in accuracy (points) with a 95% "
            "bootstrap interval over items and McNemar's exact p.", ""]
    out += [(run / "ablation.md").read_text(encoding="utf-8").strip(), ""]
    items = run / "items.json"
    if items.exists():
        counts = read_json(items)
        out += ["## Items", "", "The items scored, by source: "
                + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" ({sum(counts.values())} in all). ARC and "
                "MMLU items go through unchanged (their own options); GSM8K and MATH get numeric distractors, so a "
                "MATH item whose answer is not a number (a choice letter, a set) cannot be converted: `mcqify` skips "
                "it with the reason on stderr, never changing it into another question.", ""]
    out += rag_coverage(run, notes)
    models = []
    for summary in sorted(run.glob("*.json")):
        s = read_json(summary)
        if s.get("command") == "eval":
            models.append(f"- {summary.stem}: {s.get('model')} (`{s.get('model_id')}`)"
                          + (f", adapter {s['adapter']}" if s.get("adapter") else ""))
    if models:
        out += ["## Models (content identity of each scored model)", ""] + models + [""]
    out += ["## Settings", ""] + settings_block(run)
    return "\n".join(out) + "\n", []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("experiment", "ablation"))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--results", type=Path, help="Also copy the page (and its PNGs) into this folder.")
    parser.add_argument("--notes", nargs="*", default=[], help="ablation: the notes the index was built from.")
    args = parser.parse_args()
    text, images = experiment(args.run_dir) if args.kind == "experiment" else ablation(args.run_dir, args.notes)
    # In the run folder the PNGs are in plots/; in --results, in a folder named after the page.
    (args.run_dir / f"{args.kind}.md").write_text(text.replace(f"]({args.kind}/", "](plots/"), encoding="utf-8")
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{args.kind}.md").write_text(text, encoding="utf-8")
        if images:
            folder = args.results / args.kind
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            for image in images:
                shutil.copy2(image, folder / image.name)
        print(f"results: wrote {args.results / (args.kind + '.md')}", file=__import__("sys").stderr)


if __name__ == "__main__":
    main()
