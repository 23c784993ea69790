"""The one `--summary` file: every command writes the same shape, and `report` reads it.

    {"command": "eval",
     "counts": {"in": 3, "out": 3, "skipped": {"reason": n}, "invalid": {"field: reason": n}},
     "timings": {"seconds": 12.3},
     ...figures}

`command`, `counts` and `timings` are the same for every command; the rest are the command's figures at the top
level (what `Stats.notes` and `Stats.figures` hold: `eval`'s `overall`/`by_source`/`items_per_s`, `judge`'s
wins and win rate, `reward-eval`'s reward accuracy, `quantize --eval`'s accuracy of the quantized model...).
A command that evaluates MCQs writes `overall` (acc, acc_norm, stderr, items), which is what `report` tabulates;
`eval` also writes `model_id` (the model's content identity, probllm/models.py) and `item_correct` (item key ->
correct, the key being the item's `id`: what `report` pairs two variants on for its significance columns).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from probllm.io import Stats, UsageError, write_json

RESERVED = ("command", "counts", "timings")


def summary_record(stats: Stats, seconds: float, timings: dict | None = None) -> dict:
    figures = {**stats.notes, **stats.figures}
    clash = [k for k in RESERVED if k in figures]
    if clash:  # a programming error, not a user's: keep the schema one schema
        raise ValueError(f"summary figures may not be named {', '.join(clash)}")
    return {
        "command": stats.command.removeprefix("probllm "),
        "counts": {"in": stats.read, "out": stats.written, "skipped": dict(stats.skipped),
                   "invalid": dict(stats.invalid)},
        "timings": {"seconds": round(seconds, 3), **(timings or {})},
        **figures,
    }


def write_summary(path: str | os.PathLike, stats: Stats, seconds: float) -> None:
    write_json(path, summary_record(stats, seconds))


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """A summary file that has evaluation figures (`overall`), or a UsageError saying what it is instead."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path}: no such summary file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not JSON ({e.msg})") from None
    if not isinstance(data, dict) or "overall" not in data:
        what = f"a `{data['command']}` summary" if isinstance(data, dict) and "command" in data else "not a summary"
        raise UsageError(f"{path}: {what} without evaluation figures (no 'overall'): write it with "
                         "`eval --summary` or `quantize --eval ... --summary`")
    return data
