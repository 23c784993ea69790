"""KTO with LoRA through TRL's KTOTrainer: preference tuning from unpaired thumbs-up/down answers.

KTO (Ethayarajh et al. 2024, arXiv:2402.01306) needs no pairs: each record is one answer to a prompt with a
label (true: desirable), which is what students' ratings in the chat page are (`probllm feedback export --kind
ratings`). Everything but the records and the KTO settings is the `dpo` run (probllm/train/run.py): same LoRA
defaults, model loading and QLoRA, metrics.jsonl and `plot` curves, checkpoints, `--resume`, Ctrl-C.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable

from probllm.io import Stats, UsageError
from probllm.train import run
from probllm.train.pairs import normalize_unpaired, to_trl
from probllm.train.run import setting


@dataclass
class Settings(run.TrainSettings):
    """Every `kto` setting: the shared LoRA settings (the report's values), and KTO's own with the paper's
    defaults (TRL's: beta 0.1, both weights 1)."""

    beta: float = setting(0.1, "KTO beta.")
    desirable_weight: float = setting(1.0, "Weight of the loss on desirable (label true) answers.")
    undesirable_weight: float = setting(1.0, "Weight of the loss on undesirable (label false) answers; with "
                                             "unequal counts the paper keeps weight x count within 1 to 4/3 of "
                                             "the other side's.")


load_config_file = partial(run.load_config_file, Settings)


def resolve_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Defaults, then the YAML file, then CLI flags (those not None): the last one given wins."""
    settings = run.resolve_settings(Settings, "kto", config_file, **overrides)
    if settings.batch_size < 2:
        # KTO estimates its KL term from the other answers of the same batch (TRL refuses a batch of one).
        raise UsageError("--batch-size must be at least 2 for kto (its KL estimate pairs each prompt with "
                         "another answer of the batch)")
    return settings


def to_row(example: dict, has_chat_template: bool) -> dict:
    """One normalised unpaired example -> what KTOTrainer takes: prompt, completion (messages or text) and a
    boolean label."""
    return {**to_trl(example, has_chat_template, answers=("completion",)), "label": example["label"]}


def make_config(s: Settings, shared: dict):
    from trl import KTOConfig

    # KTOConfig truncates from the right and has no truncation_mode.
    return KTOConfig(**shared, beta=s.beta, desirable_weight=s.desirable_weight,
                     undesirable_weight=s.undesirable_weight)


def trainer_class(settings: Settings, model_key: str):
    from trl import KTOTrainer

    return KTOTrainer


def label_counts(rows: list[dict]) -> dict:
    desirable = sum(row["label"] for row in rows)
    return {"desirable": desirable, "undesirable": len(rows) - desirable}


METHOD = run.Method(command="kto", unit="examples", normalize=normalize_unpaired, to_row=to_row,
                    config=make_config, trainer_class=trainer_class, counts=label_counts, sequential=True)


def train(train_records: Iterable[dict], settings: Settings, out: str | os.PathLike, stats: Stats, **kw) -> dict:
    """Train a LoRA adapter with KTO; returns the summary record (also written to OUT/summary.json). Keyword
    arguments as `probllm.train.run.train` (eval_records, resume, overwrite, skip_invalid, eval_stats)."""
    return run.train(METHOD, train_records, settings, out, stats, **kw)
