"""report's paired columns: the difference to the baseline with a 95% paired-bootstrap interval and McNemar's
exact p-value, checked against values computed here by hand and by a plain item-resampling bootstrap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from probllm.cli import app
from probllm.evaluate.report import mcnemar_exact, paired_bootstrap, paired_comparison

N = 40


def outcomes(wins: int, losses: int, both_right: int, n: int = N) -> tuple[list[bool], list[bool]]:
    """(baseline, variant) correctness of n items: `wins` only the variant gets, `losses` only the baseline,
    `both_right` both, the rest neither."""
    base = [False] * wins + [True] * losses + [True] * both_right
    other = [True] * wins + [False] * losses + [True] * both_right
    rest = n - len(base)
    return base + [False] * rest, other + [False] * rest


def test_mcnemar_exact_p_and_paired_bootstrap_interval_by_hand():
    base, other = outcomes(wins=9, losses=2, both_right=15)
    # McNemar: 11 discordant items, 2 go the baseline's way: p = 2 * P(Bin(11, 1/2) <= 2).
    assert mcnemar_exact(9, 2) == 2 * (math.comb(11, 0) + math.comb(11, 1) + math.comb(11, 2)) / 2 ** 11
    assert mcnemar_exact(9, 2) == 134 / 2048
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(12, 1) == 2 * (1 + 13) / 2 ** 13

    c = paired_comparison(dict(enumerate(base)), dict(enumerate(other)), seed=7, resamples=20_000)
    assert c["diff"] == (sum(other) - sum(base)) / N == 7 / 40
    assert (c["wins"], c["losses"], c["p"], c["significant"]) == (9, 2, 134 / 2048, False)

    # The seeded procedure, written out: resample the 40 items with replacement 20,000 times, as counts of
    # wins, losses and ties; the 2.5th and 97.5th percentiles of (wins - losses) / 40.
    draws = np.random.default_rng(7).multinomial(N, [9 / N, 2 / N, 29 / N], size=20_000)
    expected = np.percentile((draws[:, 0] - draws[:, 1]) / N, [2.5, 97.5])
    assert (c["low"], c["high"]) == tuple(expected)
    assert paired_bootstrap(9, 2, N, seed=7, resamples=20_000) == tuple(expected)
    assert paired_bootstrap(9, 2, N, seed=7, resamples=37) == paired_bootstrap(9, 2, N, seed=7, resamples=37)
    # The textbook bootstrap (draw item indices) has the same distribution: its interval agrees.
    idx = np.random.default_rng(0).integers(0, N, size=(20_000, N))
    b, o = np.array(base, dtype=float), np.array(other, dtype=float)
    textbook = np.percentile(o[idx].mean(axis=1) - b[idx].mean(axis=1), [2.5, 97.5])
    assert abs(textbook[0] - c["low"]) <= 0.026 and abs(textbook[1] - c["high"]) <= 0.026
    # ... and roughly the normal approximation: diff +- 1.96 * sd of the per-item differences / sqrt(n).
    d = o - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(N)
    assert abs(c["low"] - (7 / 40 - half)) < 0.03 and abs(c["high"] - (7 / 40 + half)) < 0.03


def predictions(path: Path, base: list[bool], ids: list[str], model: str) -> str:
    recs = [{"id": i, "question": f"Question {i}?", "choices": ["a", "b", "c", "d"], "answer": "A",
             "source": "arc", "pred": "A" if ok else "B", "correct": ok, "method": "loglik",
             "provenance": {"model": model, "model_id": f"sha256:{model}", "method": "loglik"}}
            for i, ok in zip(ids, base)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_report_pairs_rows_with_the_baseline_and_notes_other_items(tmp_path):
    ids = [f"q{i}" for i in range(N)]
    base, small_gain = outcomes(wins=9, losses=2, both_right=15)
    # Against the same baseline: 12 of its wrong items right, 1 of its right items wrong.
    wrong, right = [i for i, ok in enumerate(base) if not ok], [i for i, ok in enumerate(base) if ok]
    big_gain = [ok or i in wrong[:12] for i, ok in enumerate(base)]
    big_gain[right[0]] = False
    files = [f"base={predictions(tmp_path / 'base.jsonl', base, ids, 'base')}",
             f"dpo={predictions(tmp_path / 'dpo.jsonl', small_gain, ids, 'dpo')}",
             f"dpo2={predictions(tmp_path / 'dpo2.jsonl', big_gain, ids, 'dpo2')}",
             f"other={predictions(tmp_path / 'other.jsonl', base, [f'x{i}' for i in range(N)], 'x')}"]
    result = CliRunner().invoke(app, ["report", *files, "--seed", "7", "--resamples", "20000"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("| Δ acc vs base (95% CI) | McNemar p | p < 0.05 |")
    rows = {line.split(" | ")[0].lstrip("| "): [c.strip() for c in line.strip("|").split("|")]
            for line in lines[2:6]}
    lo, hi = paired_bootstrap(9, 2, N, seed=7, resamples=20_000)
    assert rows["base"][-3:] == ["baseline", "", ""]
    assert rows["dpo"][-3:] == [f"+17.5 [{100 * lo:+.1f}, {100 * hi:+.1f}]", f"{134 / 2048:.3g}", "no"]
    assert rows["dpo2"][-2:] == [f"{2 * 14 / 2 ** 13:.3g}", "yes"]
    assert rows["dpo"][1] == "dpo" and rows["dpo"][4] == "60.0 ± 7.8"  # 24 of 40; sd (n - 1) / sqrt(n)
    assert rows["other"][-3:] == ["n/a", "", ""]
    assert f"- other: no paired test: scored on other items than base ({N} and {N} items, 0 in common)" in lines
    bad = CliRunner().invoke(app, ["report", str(Path(__file__).parents[1] / "examples" / "qa.jsonl")])
    assert bad.exit_code == 2 and "not an `eval` prediction" in bad.stderr
