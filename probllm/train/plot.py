"""The report's 17 training curves from one or several runs' metrics.jsonl, as PNGs plus an index page.

Headless (matplotlib's Agg backend), offline. Several runs are drawn on the same axes, one line each, labelled by
run folder name, so "student only" and "all data" can be compared at a glance.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from probllm.io import UsageError

# (file stem, title, which records, y key, x key). Eval records carry `eval_*` keys, train records `loss`.
CURVES = [
    ("eval-loss", "eval/loss", "eval", "eval_loss", "step"),
    ("eval-runtime", "eval/runtime (s)", "eval", "eval_runtime", "step"),
    ("eval-steps-per-second", "eval/steps_per_second", "eval", "eval_steps_per_second", "step"),
    ("eval-samples-per-second", "eval/samples_per_second", "eval", "eval_samples_per_second", "step"),
    ("eval-rewards-accuracies", "eval/rewards/accuracies", "eval", "eval_rewards/accuracies", "step"),
    ("eval-rewards-chosen", "eval/rewards/chosen", "eval", "eval_rewards/chosen", "step"),
    ("eval-rewards-rejected", "eval/rewards/rejected", "eval", "eval_rewards/rejected", "step"),
    ("eval-rewards-margins", "eval/rewards/margins", "eval", "eval_rewards/margins", "step"),
    ("train-loss", "train/loss", "train", "loss", "step"),
    ("train-grad-norm", "train/grad_norm", "train", "grad_norm", "step"),
    ("train-epoch", "train/epoch", "train", "epoch", "step"),
    ("train-learning-rate", "train/learning_rate", "train", "learning_rate", "step"),
    ("train-global-step", "train/global_step (against seconds)", "train", "step", "time"),
    ("train-rewards-margins", "train/rewards/margins", "train", "rewards/margins", "step"),
    ("train-rewards-accuracies", "train/rewards/accuracies", "train", "rewards/accuracies", "step"),
    ("train-rewards-chosen", "train/rewards/chosen", "train", "rewards/chosen", "step"),
    ("train-rewards-rejected", "train/rewards/rejected", "train", "rewards/rejected", "step"),
]


def metrics_path(run: str) -> Path:
    p = Path(run)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        raise UsageError(f"{run}: no metrics.jsonl (give a `dpo` or `kto` --output folder or a metrics.jsonl file)")
    return p


def load_run(run: str) -> tuple[str, list[dict], list[dict]]:
    """(label, train records, eval records) of one run."""
    path = metrics_path(run)
    label = path.parent.name if path.name == "metrics.jsonl" else path.stem
    train, evals = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{i}: invalid JSON ({e.msg})")
        if "eval_loss" in rec:
            evals.append(rec)
        elif "loss" in rec:
            train.append(rec)
    return label, train, evals


def plot_runs(runs: list[str], out_dir: str | Path, labels: list[str] | None = None) -> list[Path]:
    """Write one PNG per curve into out_dir, and index.md + index.html showing them; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise UsageError("give at least one run folder or metrics.jsonl")
    loaded = [load_run(r) for r in runs]
    if labels:
        if len(labels) != len(loaded):
            raise UsageError(f"--label given {len(labels)} times for {len(loaded)} runs")
        loaded = [(lab, t, e) for lab, (_, t, e) in zip(labels, loaded)]
    if not any(t or e for _, t, e in loaded):
        raise UsageError("no training or evaluation records in the metrics file(s)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    rows = []
    for stem, title, kind, ykey, xkey in CURVES:
        fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
        drawn = 0
        for label, train, evals in loaded:
            recs = train if kind == "train" else evals
            pts = [(r[xkey], r[ykey]) for r in recs if xkey in r and r.get(ykey) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=label)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("seconds" if xkey == "time" else "step")
        ax.grid(alpha=0.3)
        if drawn > 1 or len(loaded) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
        rows.append((title, path.name, drawn > 0))
    names = ", ".join(label for label, _, _ in loaded)
    md = [f"# Training curves: {names}", ""]
    for title, name, has in rows:
        md += [f"## {title}" + ("" if has else " (no data)"), "", f"![{title}]({name})", ""]
    (out / "index.md").write_text("\n".join(md), encoding="utf-8")
    cells = "\n".join(f'<figure><img src="{html.escape(n)}" alt="{html.escape(t)}"><figcaption>{html.escape(t)}'
                      f"</figcaption></figure>" for t, n, _ in rows)
    (out / "index.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>probllm curves</title>"
        f"<style>body{{font-family:sans-serif}}figure{{display:inline-block;margin:6px}}img{{width:420px}}</style>"
        f"<h1>Training curves: {html.escape(names)}</h1>\n{cells}\n", encoding="utf-8")
    return written
