"""eval's summary: accuracy (acc, acc_norm) with lm-eval's standard errors, overall, per source and per subject,
the speed, and every item's correctness (what `report`'s paired tests compare)."""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from typing import Any

from probllm.evaluate.templates import Item

def mean_stderr(values: list[float]) -> float:
    """lm-eval's `mean_stderr`: sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    if n < 2:
        return 0.0
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


class Summary:
    """Accuracy (acc, acc_norm) with standard errors overall, per source and per subject; items/s."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.started = time.perf_counter()
        self.items = 0
        self.prior = 0  # items read back from a resumed --output: in the accuracy, not in the speed
        # Per item: correct or not, keyed by item id (and occurrence), for `report`'s paired tests.
        self.correct: dict[str, bool] = {}
        self._occurrences: Counter = Counter()

    def add(self, rec: dict, item: Item) -> None:
        from probllm.evaluate.output import item_key

        self.items += 1
        key = item_key(rec, self._occurrences)
        self.correct[key] = bool(rec["correct"])
        for key in (("overall", "all"), ("source", item.source), ("subject", item.subject)):
            g = self.groups[key]
            g["acc"].append(1.0 if rec["correct"] else 0.0)
            if "correct_norm" in rec:
                g["acc_norm"].append(1.0 if rec["correct_norm"] else 0.0)

    @staticmethod
    def _metrics(g: dict[str, list[float]]) -> dict:
        out: dict[str, Any] = {"items": len(g["acc"])}
        for name in ("acc", "acc_norm"):
            vals = g.get(name)
            if vals:
                out[name] = round(sum(vals) / len(vals), 6)
                out[f"{name}_stderr"] = round(mean_stderr(vals), 6)
        return out

    def as_dict(self, **extra: Any) -> dict:
        seconds = time.perf_counter() - self.started
        result: dict[str, Any] = {
            **extra,
            "items": self.items,
            "seconds": round(seconds, 3),
            "items_per_s": round((self.items - self.prior) / seconds, 3) if seconds > 0 else None,
            "overall": self._metrics(self.groups[("overall", "all")]) if self.items else {"items": 0},
            "by_source": {},
            "by_subject": {},
            "item_correct": dict(self.correct),
        }
        for (kind, name), g in sorted(self.groups.items()):
            if kind == "source":
                result["by_source"][name] = self._metrics(g)
            elif kind == "subject":
                result["by_subject"][name] = self._metrics(g)
        return result

    def table(self, data: dict | None = None) -> str:
        """A short plain-text table for stderr."""
        data = data or self.as_dict()
        lines = [f"{'group':32} {'items':>6} {'acc':>14} {'acc_norm':>14}"]

        def row(name: str, m: dict) -> str:
            acc = f"{m['acc']:.4f}±{m['acc_stderr']:.4f}" if "acc" in m else "-"
            accn = f"{m['acc_norm']:.4f}±{m['acc_norm_stderr']:.4f}" if "acc_norm" in m else "-"
            return f"{name[:32]:32} {m['items']:>6} {acc:>14} {accn:>14}"

        lines.append(row("overall", data["overall"]))
        for name, m in data["by_source"].items():
            lines.append(row(f"source {name}", m))
        if len(data["by_subject"]) > 1:
            for name, m in data["by_subject"].items():
                lines.append(row(f"  subject {name}", m))
        return "\n".join(lines)


