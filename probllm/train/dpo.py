"""DPO with LoRA through TRL and PEFT, with the report's hyperparameters as defaults (method.md section 4).

TRL's DPOConfig has defaults of its own (lr 1e-6, beta 0.1, gradient checkpointing, max_length 1024, ...), so every
setting the report fixes is set explicitly here from `Settings`. An output folder holds the LoRA adapter
(safetensors), the tokenizer, `config.json` (the exact resolved settings), `metrics.jsonl` (one line per logging
or evaluation step, written as it happens) and `checkpoints/` (for `--resume`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from probllm.io import RecordError, Stats, UsageError, log, map_records, write_json
from probllm.train.pairs import normalize_pair, to_trl

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def _setting(default: Any, help: str, flag: str | None = None) -> Any:
    """A setting's default and its help: the CLI's `dpo` options are generated from these (probllm/cli/train.py)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


@dataclass
class Settings:
    """Every training setting, with the report's values as defaults; names match the CLI flags and YAML keys.

    This is the one definition: `probllm dpo`'s options, their help and the `--config` keys come from it."""

    seed: int = _setting(0, "Seed for data order, LoRA init and dropout.")
    bf16: bool = _setting(True, "bfloat16 where supported.", "--bf16/--no-bf16")
    optim: str = _setting("paged_adamw_32bit", "Optimizer (adamw_torch without CUDA).")
    max_steps: int = _setting(2000, "Training steps.")
    # used only when max_steps is not given (max_steps wins, as in transformers)
    epochs: float | None = _setting(None, "Epochs, used when --max-steps is not given.")
    lr: float = _setting(5e-4, "Peak learning rate.")
    lr_scheduler: str = _setting("cosine", "Learning-rate schedule (transformers' names).")
    warmup_steps: int = _setting(100, "Warmup steps (scaled down to 5% of a shorter --max-steps).")
    weight_decay: float = _setting(0.05, "Weight decay.")
    max_grad_norm: float = _setting(1.0, "Gradient clipping.")
    adam_beta1: float = _setting(0.9, "Adam beta1.")
    adam_beta2: float = _setting(0.999, "Adam beta2.")
    adam_epsilon: float = _setting(1e-8, "Adam epsilon.")
    beta: float = _setting(0.05, "DPO beta.")
    lora_r: int = _setting(8, "LoRA rank.")
    lora_alpha: int = _setting(16, "LoRA alpha.")
    lora_dropout: float = _setting(0.05, "LoRA dropout.")
    lora_target: str = _setting("all-linear", "LoRA target modules.")
    batch_size: int = _setting(8, "Pairs per device per step.")
    eval_batch_size: int | None = _setting(None, "Pairs per device per evaluation step (default: --batch-size).")
    grad_accum: int = _setting(1, "Gradient accumulation steps.")
    eval_steps: int = _setting(100, "Evaluate every N steps.")
    # Not fixed by the report: ours, each a flag.
    max_length: int = _setting(1024, "Max tokens of prompt+answer.")
    logging_steps: int = _setting(10, "Log metrics every N steps.")
    save_steps: int = _setting(100, "Checkpoint every N steps.")
    save_total_limit: int = _setting(3, "Checkpoints kept.")
    # None: on with CUDA (7B fits), off on CPU (it only slows)
    gradient_checkpointing: bool | None = _setting(None, "Gradient checkpointing (default: on with CUDA, off on "
                                                         "CPU).", "--gradient-checkpointing/--no-gradient-checkpointing")
    loss_type: str = _setting("sigmoid", "TRL loss type.")
    # reference log-probs once, cached on disk (see RefLogpCache)
    precompute_ref: bool = _setting(False, "Compute reference log-probs once and cache them on disk, keyed by "
                                           "model, data and max length: reruns with other hyperparameters skip "
                                           "that pass.", "--precompute-ref/--no-precompute-ref")
    model: str | None = _setting(None, "Causal LM (hub id or folder); default: offline SmolLM2-135M-Instruct.")

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def load_config_file(path: str | os.PathLike) -> dict:
    """A YAML (or JSON) file of settings with the CLI's names (dashes or underscores)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read ({e.strerror})")
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of setting names to values")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in Settings.names():
            raise UsageError(f"--config {path}: unknown setting '{key}' (known: {', '.join(sorted(Settings.names()))})")
        out[name] = value
    return out


def resolve_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Defaults, then the YAML file, then CLI flags (those not None): the last one given wins."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_config_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "epochs" in values and "max_steps" not in values:
        values["max_steps"] = -1
    try:
        settings = Settings(**values)
    except TypeError as e:
        raise UsageError(str(e))
    for name in ("batch_size", "grad_accum", "eval_steps", "logging_steps", "save_steps", "lora_r", "max_length"):
        if not isinstance(getattr(settings, name), int) or getattr(settings, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer")
    if settings.max_steps == 0 or (settings.max_steps < 0 and not settings.epochs):
        raise UsageError("--max-steps must be positive (or give --epochs)")
    if 0 < settings.max_steps <= settings.warmup_steps:
        if "warmup_steps" in values:
            log(f"probllm dpo: --warmup-steps {settings.warmup_steps} >= --max-steps {settings.max_steps}: the "
                f"learning rate never reaches --lr {settings.lr:g}")
        else:
            # The report's 100 warmup steps belong to its 2000-step runs: keep that share (5%) for short runs,
            # instead of a run that is all warmup and logs a learning rate of 0 at step 1.
            scaled = settings.max_steps * Settings.warmup_steps // Settings.max_steps
            log(f"probllm dpo: --max-steps {settings.max_steps} is shorter than the default {settings.warmup_steps} "
                f"warmup steps; warmup scaled to {scaled} (5% of the steps, as in the report's 100 of 2000)")
            settings.warmup_steps = scaled
    return settings


# -------------------------------------------------------------------------------------------------------- pairs


def read_pairs(records: Iterable[dict], stats: Stats, has_chat_template: bool, skip_invalid: bool) -> list[dict]:
    """Input records -> TRL-ready pairs (prompt/chosen/rejected only: the trainer needs nothing else)."""

    def one(rec: dict) -> dict:
        return to_trl(normalize_pair(rec), has_chat_template)

    return list(map_records(records, one, stats, skip_invalid=skip_invalid))


def to_dataset(pairs: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(pairs)


# ------------------------------------------------------------------------------------------------ machine checks


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def machine_fallbacks(settings: Settings) -> tuple[Settings, list[str]]:
    """Replace what this machine cannot run with the nearest option that it can; say what changed."""
    import torch

    from probllm.models import bf16_supported

    notes = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = dataclasses.replace(settings)
    if s.bf16 and not bf16_supported(device):
        s.bf16 = False
        notes.append(f"bf16 is not supported on this {device}: training in float32")
    if "paged" in s.optim and device != "cuda":
        fallback = "adamw_torch"
        notes.append(f"optimizer {s.optim} needs CUDA: using {fallback} (same Adam update, unpaged)")
        s.optim = fallback
    if s.gradient_checkpointing is None:
        s.gradient_checkpointing = device == "cuda"
    return s, notes


# --------------------------------------------------------------------------------------------- metrics callback


def _metrics_callback():
    from transformers import TrainerCallback

    class MetricsWriter(TrainerCallback):
        """Append one JSON line per `log` event to metrics.jsonl as it happens, with measured samples/s.

        On resume, lines after the checkpoint's step are dropped first, so the file matches an uninterrupted run."""

        def __init__(self, path: Path, samples_per_step: int, resume_step: int | None):
            self.path = path
            self.samples_per_step = samples_per_step
            self.resume_step = resume_step
            self.last_time = None
            self.last_step = 0
            self.start = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if self.resume_step is not None and self.path.exists():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    if line.strip() and json.loads(line).get("step", 0) <= self.resume_step:
                        kept.append(line)
            self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
            self.start = self.last_time = time.perf_counter()
            self.last_step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or logs is None:
                return
            now = time.perf_counter()
            rec: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
            is_eval = any(k.startswith("eval_") for k in logs)
            is_train_step = "loss" in logs
            if is_train_step and state.global_step > self.last_step and self.last_time is not None:
                dt = now - self.last_time
                steps = state.global_step - self.last_step
                rec["steps_per_second"] = round(steps / dt, 4)
                rec["samples_per_second"] = round(steps * self.samples_per_step / dt, 4)
                self.last_time, self.last_step = now, state.global_step
            rec.update({k: v for k, v in logs.items()})
            rec["time"] = round(now - (self.start or now), 3)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            if is_eval or is_train_step:
                shown = {k: round(v, 4) for k, v in logs.items()
                         if k in ("loss", "eval_loss", "rewards/accuracies", "eval_rewards/accuracies",
                                  "rewards/margins", "eval_rewards/margins")}
                log(f"probllm dpo: step {state.global_step}/{state.max_steps} " +
                    " ".join(f"{k}={v}" for k, v in shown.items()))

        def on_evaluate(self, args, state, control, **kwargs):
            # Evaluation time is not training time: restart the clock so samples/s measures training only.
            self.last_time = time.perf_counter()

    return MetricsWriter


class GracefulStop:
    """First Ctrl-C (or SIGTERM) asks the trainer to checkpoint at the end of the current step and stop, so that
    `--resume` loses no finished step; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("probllm dpo: stopping after this step (checkpoint saved; continue with --resume); "
            "Ctrl-C again to stop now")

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def callback(self):
        from transformers import TrainerCallback

        stop = self

        class StopCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stop.requested:
                    control.should_save = True
                    control.should_training_stop = True

        return StopCallback()


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
        self.base = {"model": model_key, "max_length": settings.max_length, "bf16": settings.bf16,
                     "truncation": "keep_start", "version": 1}

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


def _trainer_class(ref_cache: RefLogpCache | None):
    from trl import DPOTrainer

    if ref_cache is None:
        return DPOTrainer

    class CachedRefDPOTrainer(DPOTrainer):
        """DPOTrainer whose precomputed reference log-probs persist across runs (see RefLogpCache)."""

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
                self.ref_cache_hits = getattr(self, "ref_cache_hits", {}) | {name: False}
                return dataset
            chosen, rejected = hit
            self.ref_cache_hits = getattr(self, "ref_cache_hits", {}) | {name: True}
            return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column(
                "ref_rejected_logps", rejected.tolist())

    return CachedRefDPOTrainer


# ----------------------------------------------------------------------------------------------------- training


def _last_checkpoint(out: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = out / CHECKPOINTS
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def check_output(out: str | os.PathLike, resume: bool, overwrite: bool) -> bool:
    """Refuse to start over an earlier run's checkpoints unless --resume or --overwrite; True when they are to
    be discarded. Cheap on purpose: the CLI calls it before anything heavy is imported or loaded."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out}: exists and is not a folder")
    if out.exists() and (out / CHECKPOINTS).exists() and not resume:
        if not overwrite:
            raise UsageError(f"--output {out}: holds checkpoints of an earlier run; pass --resume to continue it "
                             "or --overwrite to start again")
        return True
    return False


def data_files(train_files: list[str] | None, eval_files: list[str] | None = None) -> list[dict]:
    """The input files of a run with their sha256, for config.json (what `export` quotes in a model card)."""
    from probllm.io import expand_paths, sha256_file

    entries = []
    for part, paths in (("train", train_files or ["-"]), ("eval", eval_files or [])):
        for path in expand_paths(paths):
            if path == "-":
                entries.append({"part": part, "file": "-", "sha256": None})
                continue
            entries.append({"part": part, "file": os.path.abspath(path), "sha256": sha256_file(path),
                            "bytes": os.path.getsize(path)})
    return entries


def train(
    train_records: Iterable[dict],
    settings: Settings,
    out: str | os.PathLike,
    stats: Stats,
    eval_records: Iterable[dict] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    skip_invalid: bool = False,
    eval_stats: Stats | None = None,
    data: list[dict] | None = None,
) -> dict:
    """Train a LoRA adapter with DPO; returns the summary record (also written to OUT/summary.json)."""
    import shutil
    import warnings

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from probllm.models import load_tokenizer, model_identity, model_label, resolve_model, set_threads

    # transformers 5 renames gradient_checkpointing and warns on every use; the name is still the working one.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    out = Path(out)
    if check_output(out, resume, overwrite) and is_main_process():
        shutil.rmtree(out / CHECKPOINTS)
    resolved, notes = machine_fallbacks(settings)
    if is_main_process():
        for note in notes:
            log(f"probllm dpo: {note}")
    set_threads()
    if not sys.stderr.isatty():  # datasets' per-map progress bars are noise in logs and pipes
        import datasets

        datasets.disable_progress_bars()

    model_path = resolve_model(settings.model)
    tokenizer = load_tokenizer(settings.model, padding_side="right")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    pairs = read_pairs(train_records, stats, has_template, skip_invalid)
    if not pairs:
        raise RecordError("no usable training pairs", source="input")
    stats.notes["pairs"] = len(pairs)
    eval_pairs = None
    if eval_records is not None:
        eval_pairs = read_pairs(eval_records, eval_stats or Stats(command="probllm dpo --eval"), has_template,
                                skip_invalid)
        if not eval_pairs:
            raise RecordError("no usable evaluation pairs", source="--eval")
        if eval_stats is not None:
            eval_stats.written = len(eval_pairs)  # "out" = pairs used for evaluation

    checkpoint = _last_checkpoint(out) if resume else None
    if resume and checkpoint is None and is_main_process():
        log(f"probllm dpo: no checkpoint in {out / CHECKPOINTS}: starting from the beginning")
    resume_step = int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    config = _make_config(DPOConfig, resolved, out, eval_pairs is not None, world, cuda)

    if is_main_process():
        write_json(out / CONFIG_FILE, {**dataclasses.asdict(resolved), "model": model_label(settings.model),
                                       "model_path": model_path, "requested": dataclasses.asdict(settings),
                                       "fallbacks": notes, "trl": config.to_dict(), "data": data or []})

    dtype = torch.bfloat16 if resolved.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, use_safetensors=True)
    peft_config = LoraConfig(r=resolved.lora_r, lora_alpha=resolved.lora_alpha, lora_dropout=resolved.lora_dropout,
                             target_modules=resolved.lora_target, task_type="CAUSAL_LM")
    ref_cache = RefLogpCache(model_identity(settings.model).id, resolved) if resolved.precompute_ref else None
    Trainer = _trainer_class(ref_cache)
    samples_per_step = resolved.batch_size * resolved.grad_accum * world
    trainer = Trainer(
        model=model,
        args=config,
        train_dataset=to_dataset(pairs),
        eval_dataset=to_dataset(eval_pairs) if eval_pairs else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[_metrics_callback()(out / METRICS_FILE, samples_per_step, resume_step)],
    )
    # Trainer prints every log dict to stdout when tqdm is off; stdout carries only our summary record.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    started = time.perf_counter()
    with GracefulStop() as stop:
        trainer.add_callback(stop.callback())
        result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    if stop.requested:
        raise KeyboardInterrupt  # the checkpoint of the last finished step is on disk; exit 130
    eval_metrics = {}
    if eval_pairs:
        last_eval_step = next((h["step"] for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        if last_eval_step == trainer.state.global_step:
            eval_metrics = next(h for h in reversed(trainer.state.log_history) if "eval_loss" in h)
        else:
            eval_metrics = trainer.evaluate()
    if is_main_process():
        from probllm.evaluate.quantize import publish_permissions

        trainer.model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        publish_permissions(out)
    train_logs = [h for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
    summary = {
        "out": str(out),
        "model": model_label(settings.model),
        "pairs": len(pairs),
        "eval_pairs": len(eval_pairs or []),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_loss": result.training_loss,
        "last": {k: v for k, v in (train_logs[-1] if train_logs else {}).items()},
        "eval": {k: v for k, v in eval_metrics.items()},
        "seconds": round(seconds, 2),
        "resumed_from": checkpoint,
        "fallbacks": notes,
    }
    if ref_cache is not None:
        summary["ref_cache_hits"] = getattr(trainer, "ref_cache_hits", {})
    if is_main_process():
        write_json(out / "summary.json", summary)
    stats.notes["steps"] = trainer.state.global_step
    return summary


def _make_config(DPOConfig, s: Settings, out: Path, has_eval: bool, world: int, cuda: bool):
    return DPOConfig(
        output_dir=str(out / CHECKPOINTS),
        seed=s.seed,
        data_seed=s.seed,
        bf16=s.bf16,
        fp16=False,
        use_cpu=not cuda,
        optim=s.optim,
        max_steps=s.max_steps,
        num_train_epochs=s.epochs or 1.0,
        learning_rate=s.lr,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        adam_beta1=s.adam_beta1,
        adam_beta2=s.adam_beta2,
        adam_epsilon=s.adam_epsilon,
        beta=s.beta,
        loss_type=[s.loss_type],
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.eval_batch_size or s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        gradient_checkpointing=bool(s.gradient_checkpointing),
        max_length=s.max_length,
        truncation_mode="keep_start",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=s.eval_steps,
        logging_steps=s.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=s.save_total_limit,
        precompute_ref_log_probs=s.precompute_ref,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if world > 1 else None,
    )
