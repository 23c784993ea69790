"""Markdown tables from `eval --summary` files (the report's ablation table) and from `quantize` records."""

from __future__ import annotations

from pathlib import Path

from probllm.io import UsageError
from probllm.summary import read_summary


def _pct(m: dict, key: str) -> str:
    if key not in m:
        return "-"
    return f"{100 * m[key]:.1f} ± {100 * m.get(key + '_stderr', 0.0):.1f}"


def load_summary(spec: str) -> tuple[str, dict]:
    """`LABEL=FILE` or `FILE` (label = file stem) -> (label, summary dict)."""
    label, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    return label or Path(path).stem, read_summary(path)


def ablation_markdown(rows: list[tuple[str, dict]]) -> str:
    """One row per variant: accuracy (acc, acc_norm, in % with standard error) overall and per source."""
    sources = sorted({s for _, d in rows for s in d.get("by_source", {})})
    head = ["variant", "model", "method", "items", "acc %", "acc_norm %"] + [f"{s} acc %" for s in sources] + \
        ["items/s"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for label, d in rows:
        overall = d.get("overall", {})
        model = d.get("model", "?") + (f" + {Path(d['adapter']).name}" if d.get("adapter") else "")
        cells = [label, model, d.get("method", "?"), str(overall.get("items", 0)), _pct(overall, "acc"),
                 _pct(overall, "acc_norm")]
        cells += [_pct(d.get("by_source", {}).get(s, {}), "acc") for s in sources]
        cells.append(f"{d['items_per_s']:.1f}" if d.get("items_per_s") else "-")
        lines.append("| " + " | ".join(cells) + " |")
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


def run_report(specs: list[str], output: Path | None = None) -> str:
    if not specs:
        raise UsageError("name at least one summary file")
    text = ablation_markdown([load_summary(s) for s in specs]) + "\n"
    print(text, end="")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    return text
