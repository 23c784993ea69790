"""DPO with LoRA through TRL and PEFT, with the report's hyperparameters as defaults (method.md section 4).

TRL's DPOConfig has defaults of its own (lr 1e-6, beta 0.1, gradient checkpointing, max_length 1024, ...), so every
setting the report fixes is set explicitly here from `Settings`. The run itself (model, LoRA, metrics.jsonl,
checkpoints, Ctrl-C, summary) is shared with `kto` in probllm/train/run.py; this module adds the pairs, the loss
presets and the on-disk reference log-prob cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable

from probllm.io import Stats, UsageError
from probllm.train import run
from probllm.train.pairs import normalize_pair, to_trl
from probllm.train.run import setting


@dataclass(frozen=True)
class LossPreset:
    """A named DPO-family objective: the TRL loss types it sums, and where it comes from."""

    losses: tuple[str, ...]
    what: str
    paper: str

    def trl(self, rpo_alpha: float) -> tuple[list[str], list[float]]:
        """TRL's `loss_type` list and `loss_weights`: every term weighs 1, the SFT (NLL) term weighs --rpo-alpha."""
        return list(self.losses), [rpo_alpha if loss == "sft" else 1.0 for loss in self.losses]


# `dpo --loss`: the one list of presets (docs/train.md describes each).
LOSSES = {
    "sigmoid": LossPreset(("sigmoid",), "DPO's logistic loss on the reward margin",
                          "Rafailov et al. 2023, arXiv:2305.18290"),
    "sigmoid_norm": LossPreset(("sigmoid_norm",), "DPO on length-normalised (per-token) log-ratios",
                               "Tulu 3, Lambert et al. 2024, arXiv:2411.15124"),
    "ipo": LossPreset(("ipo",), "squared loss pulling the per-token margin to 1/(2 beta)",
                      "Azar et al. 2023, arXiv:2310.12036"),
    "rpo": LossPreset(("sigmoid", "sft"), "DPO plus --rpo-alpha times the NLL of the chosen answer",
                      "Pang et al. 2024, arXiv:2404.19733"),
    "apo_zero": LossPreset(("apo_zero",), "raises chosen and lowers rejected likelihood, each on its own",
                           "D'Oosterlinck et al. 2024, arXiv:2408.06266"),
    "hinge": LossPreset(("hinge",), "SLiC's hinge loss on the reward margin",
                        "Zhao et al. 2023, arXiv:2305.10425"),
}


@dataclass
class Settings(run.TrainSettings):
    """Every `dpo` setting, with the report's values as defaults; names match the CLI flags and YAML keys.

    This is the one definition: `probllm dpo`'s options, their help and the `--config` keys come from it."""

    beta: float = setting(0.05, "DPO beta (for ipo: its tau).")
    loss: str = setting("sigmoid", "Loss preset: " + "; ".join(f"{k}: {v.what}" for k, v in LOSSES.items()) + ".",
                        choices=LOSSES)
    rpo_alpha: float = setting(1.0, "Weight of the NLL term of --loss rpo.")
    # reference log-probs once, cached on disk (see RefLogpCache)
    precompute_ref: bool = setting(False, "Compute reference log-probs once and cache them on disk, keyed by "
                                          "model, data and max length: reruns with other hyperparameters skip "
                                          "that pass.", "--precompute-ref/--no-precompute-ref")

    # `loss_type` was the raw TRL string before the presets; its values that are presets still work.
    renamed = {"loss_type": "loss"}


load_config_file = partial(run.load_config_file, Settings)


def resolve_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Defaults, then the YAML file, then CLI flags (those not None): the last one given wins."""
    settings = run.resolve_settings(Settings, "dpo", config_file, **overrides)
    given = {k for k, v in overrides.items() if v is not None}
    given |= set(load_config_file(config_file) if config_file else ())
    if "rpo_alpha" in given and "sft" not in LOSSES[settings.loss].losses:
        raise UsageError(f"--rpo-alpha weighs the NLL term of --loss rpo; --loss {settings.loss} has none")
    return settings


# ------------------------------------------------------------------------------------- reference log-prob cache


class RefLogpCache:
    """Reference log-probs on disk, keyed by model, tokenised data and the settings they depend on.

    TRL's `precompute_ref_log_probs` computes the reference model's log-probs once per run; its own cache lives in
    the datasets cache of one process and is keyed by a hash of every weight, adapter included (so a new seed or
    LoRA rank misses it). The reference does not depend on the LoRA settings, the learning rate or beta: only on
    the base model, the tokens and the truncation. Keyed that way, a second run with other hyperparameters reads
    them back from `~/.cache/probllm/ref-logps/` and skips the pass."""

    def __init__(self, model_key: str, settings: Settings, root: Path | None = None):
        from probllm.models import cache_dir

        self.root = root or (cache_dir() / "ref-logps")
        # A 4-bit base gives other log-probs than the full-precision one: part of the key.
        self.base = {"model": model_key, "max_length": settings.max_length, "bf16": settings.bf16,
                     "load_in_4bit": settings.load_in_4bit, "truncation": "keep_start", "version": 1}

    def key(self, dataset) -> str:
        h = hashlib.sha256(json.dumps(self.base, sort_keys=True).encode())
        for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
            for ids in dataset[col]:
                h.update(b"|" + ",".join(map(str, ids)).encode())
            h.update(b"#")
        return h.hexdigest()[:32]

    def load(self, key: str):
        path = self.root / f"{key}.safetensors"
        if not path.exists():
            return None
        from safetensors.torch import load_file

        t = load_file(str(path))
        return t["ref_chosen_logps"], t["ref_rejected_logps"]

    def save(self, key: str, chosen, rejected) -> None:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        save_file({"ref_chosen_logps": chosen.contiguous(), "ref_rejected_logps": rejected.contiguous()}, str(tmp))
        os.replace(tmp, self.root / f"{key}.safetensors")


def _ref_cached_trainer(ref_cache: RefLogpCache | None):
    from trl import DPOTrainer

    if ref_cache is None:
        return DPOTrainer

    class CachedRefDPOTrainer(DPOTrainer):
        """DPOTrainer whose precomputed reference log-probs persist across runs (see RefLogpCache)."""

        ref_cache_hits: dict = {}  # split name -> read back from the cache

        def _precompute_ref_logps(self, dataset, name, batch_size):
            import torch
            from accelerate.utils import broadcast_object_list

            key = [ref_cache.key(dataset)]
            broadcast_object_list(key, from_process=0)
            hit = ref_cache.load(key[0])
            if hit is None:
                dataset = super()._precompute_ref_logps(dataset, name, batch_size)
                if self.accelerator.is_main_process:
                    ref_cache.save(key[0], torch.tensor(dataset["ref_chosen_logps"]),
                                   torch.tensor(dataset["ref_rejected_logps"]))
                self.accelerator.wait_for_everyone()
                self.ref_cache_hits = self.ref_cache_hits | {name: False}
                return dataset
            chosen, rejected = hit
            self.ref_cache_hits = self.ref_cache_hits | {name: True}
            return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column(
                "ref_rejected_logps", rejected.tolist())

    return CachedRefDPOTrainer


# ----------------------------------------------------------------------------------------------------- training


def trainer_class(settings: Settings, model_key: str):
    return _ref_cached_trainer(RefLogpCache(model_key, settings) if settings.precompute_ref else None)


def make_config(s: Settings, shared: dict):
    from trl import DPOConfig

    loss_type, loss_weights = LOSSES[s.loss].trl(s.rpo_alpha)
    return DPOConfig(**shared, beta=s.beta, loss_type=loss_type, loss_weights=loss_weights,
                     truncation_mode="keep_start", precompute_ref_log_probs=s.precompute_ref)


def _summary(trainer, settings: Settings) -> dict:
    return {"ref_cache_hits": trainer.ref_cache_hits} if settings.precompute_ref else {}


# A normalised pair becomes TRL's prompt/chosen/rejected as it is (the trainer needs nothing else).
METHOD = run.Method(command="dpo", unit="pairs", normalize=normalize_pair, to_row=to_trl, config=make_config,
                    trainer_class=trainer_class, summary=_summary)


def train(train_records: Iterable[dict], settings: Settings, out: str | os.PathLike, stats: Stats, **kw) -> dict:
    """Train a LoRA adapter with DPO; returns the summary record (also written to OUT/summary.json). Keyword
    arguments as `probllm.train.run.train` (eval_records, resume, overwrite, skip_invalid, eval_stats)."""
    return run.train(METHOD, train_records, settings, out, stats, **kw)
