"""Markdown tables from `eval --summary` files or prediction files (the report's ablation table, with paired
significance against the first row) and from `quantize` records.

Significance: every row that scored the same items as the first (baseline) row gets the paired difference in
accuracy with a 95% paired-bootstrap interval and McNemar's exact p-value.
- Paired bootstrap over items: resample the n items with replacement and take the difference of the two
  accuracies on the resample. Only whether each item is a win (variant right, baseline wrong), a loss or a tie
  matters, so a resample is a multinomial draw of (wins, losses, ties) from their observed shares: the same
  distribution as drawing items, for any n, at the cost of one draw per resample. Seeded (`--seed`).
- McNemar's exact test: under "no difference" each discordant item (a win or a loss) is a fair coin, so the
  two-sided p-value is min(1, 2 * P(Binomial(wins + losses, 1/2) <= min(wins, losses))).
A difference is marked significant when p < 0.05. Rows scored on other items get a note instead: a paired test
on different items would compare the items, not the variants.
"""

from __future__ import annotations

import math
from pathlib import Path

from probllm.io import UsageError
from probllm.summary import read_summary

ALPHA = 0.05
RESAMPLES = 10_000


def _pct(m: dict, key: str) -> str:
    if key not in m:
        return "-"
    return f"{100 * m[key]:.1f} ± {100 * m.get(key + '_stderr', 0.0):.1f}"


def load_summary(spec: str) -> tuple[str, dict]:
    """`LABEL=FILE` or `FILE` (label = file stem) -> (label, summary dict). FILE is an `eval --summary` JSON
    file, or the prediction records of `eval` (JSONL), summarised here."""
    label, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    label = label or Path(path).stem.removesuffix(".jsonl")
    if path.endswith(".json"):
        return label, read_summary(path)
    return label, summarise_predictions(path)


def summarise_predictions(path: str) -> dict:
    """The summary `eval --summary` would have written for these predictions (accuracy, per item)."""
    from probllm.evaluate.mcqa import parse_item
    from probllm.evaluate.summary import Summary
    from probllm.io import RecordError, read_records

    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    summary = Summary()
    first = None
    for rec in read_records([path]):
        if not isinstance(rec.get("correct"), bool):
            raise UsageError(f"{path}:{rec.line}: not an `eval` prediction (no `correct`): give `eval` output "
                             "or an `eval --summary` file")
        try:
            summary.add(rec, parse_item(rec))
        except RecordError as e:
            raise UsageError(str(e.locate(rec))) from None
        first = first or rec
    prov = first.get("provenance") or {}
    data = summary.as_dict(model=prov.get("model", "?"), model_id=prov.get("model_id"),
                           method=prov.get("method", first.get("method", "?")))
    data["items_per_s"] = None  # predictions do not say how fast they were made (their summary does)
    return data


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (binomial test of wins vs losses at 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_bootstrap(wins: int, losses: int, n: int, seed: int = 0, resamples: int = RESAMPLES,
                     level: float = 0.95) -> tuple[float, float]:
    """The `level` percentile interval of the difference in accuracy (variant - baseline) over item resamples
    (see the module's note: a multinomial draw of wins, losses and ties per resample)."""
    import numpy as np

    if n == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [wins / n, losses / n, (n - wins - losses) / n], size=resamples)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_comparison(base: dict[str, bool], other: dict[str, bool], seed: int = 0,
                      resamples: int = RESAMPLES) -> dict:
    """Difference in accuracy of `other` over `base` on the same items, its interval, McNemar's p."""
    wins = sum(1 for k, ok in other.items() if ok and not base[k])
    losses = sum(1 for k, ok in other.items() if not ok and base[k])
    n = len(base)
    lo, hi = paired_bootstrap(wins, losses, n, seed, resamples)
    p = mcnemar_exact(wins, losses)
    return {"diff": (wins - losses) / n, "low": lo, "high": hi, "p": p, "wins": wins, "losses": losses,
            "significant": p < ALPHA}


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def significance_cells(rows: list[tuple[str, dict]], seed: int, resamples: int) -> tuple[list[list[str]], list[str]]:
    """The paired columns of every row against the first, and the notes for rows that cannot be paired."""
    base_label, base = rows[0]
    base_items = base.get("item_correct")
    cells, notes = [["baseline", "", ""]], []
    for label, d in rows[1:]:
        items = d.get("item_correct")
        if base_items is None or items is None:
            which = base_label if base_items is None else label
            cells.append(["n/a", "", ""])
            notes.append(f"{label}: no paired test: {which} has no per-item correctness (an older summary: "
                         "rerun `eval --summary`, or give the predictions file)")
            continue
        if set(items) != set(base_items):
            shared = len(set(items) & set(base_items))
            cells.append(["n/a", "", ""])
            notes.append(f"{label}: no paired test: scored on other items than {base_label} ({len(items)} and "
                         f"{len(base_items)} items, {shared} in common)")
            continue
        c = paired_comparison(base_items, items, seed, resamples)
        cells.append([f"{_signed(c['diff'])} [{_signed(c['low'])}, {_signed(c['high'])}]",
                      f"{c['p']:.3g}", "yes" if c["significant"] else "no"])
    return cells, notes


def ablation_markdown(rows: list[tuple[str, dict]], seed: int = 0, resamples: int = RESAMPLES) -> str:
    """One row per variant: accuracy (acc, acc_norm, in % with standard error) overall and per source; with
    several rows, the paired difference to the first row (points, 95% bootstrap interval), McNemar's p and
    whether p < 0.05."""
    sources = sorted({s for _, d in rows for s in d.get("by_source", {})})
    head = ["variant", "model", "method", "items", "acc %", "acc_norm %"] + [f"{s} acc %" for s in sources] + \
        ["items/s"]
    paired, notes = significance_cells(rows, seed, resamples) if len(rows) > 1 else ([], [])
    if paired:
        head += [f"Δ acc vs {rows[0][0]} (95% CI)", "McNemar p", f"p < {ALPHA}"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for i, (label, d) in enumerate(rows):
        overall = d.get("overall", {})
        model = d.get("model", "?") + (f" + {Path(d['adapter']).name}" if d.get("adapter") else "")
        cells = [label, model, d.get("method", "?"), str(overall.get("items", 0)), _pct(overall, "acc"),
                 _pct(overall, "acc_norm")]
        cells += [_pct(d.get("by_source", {}).get(s, {}), "acc") for s in sources]
        cells.append(f"{d['items_per_s']:.1f}" if d.get("items_per_s") else "-")
        if paired:
            cells += paired[i]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def quantize_table_markdown(rows: list[dict]) -> str:
    """`quantize` records side by side with their full-precision baseline."""
    head = ["method", "bits", "weights MB (fp32)", "resident MB (fp32)", "tokens/s (fp32)", "acc (fp32)",
            "acc_norm (fp32)"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]

    def pair(r: dict, key: str, fmt: str = "{}") -> str:
        a, b = r.get(key), r.get("base_" + key)
        if a is None:
            return "-"
        return fmt.format(a) + (f" ({fmt.format(b)})" if b is not None else "")

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | - | failed: {r['error']} | | | | |")
            continue
        lines.append("| " + " | ".join([
            r["method"], str(r["bits"]), pair(r, "size_mb", "{:.0f}"), pair(r, "rss_mb", "{:.0f}"),
            pair(r, "tokens_per_s", "{:.1f}"), pair(r, "accuracy", "{:.3f}"), pair(r, "acc_norm", "{:.3f}"),
        ]) + " |")
    return "\n".join(lines)


def run_report(specs: list[str], output: Path | None = None, seed: int = 0, resamples: int = RESAMPLES) -> str:
    if not specs:
        raise UsageError("name at least one summary file")
    if resamples < 1:
        raise UsageError("--resamples must be at least 1")
    text = ablation_markdown([load_summary(s) for s in specs], seed, resamples) + "\n"
    print(text, end="")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    return text
