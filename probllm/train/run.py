"""What `dpo` and `kto` share: LoRA settings and their resolution, the base model (full precision or QLoRA 4-bit),
the LoRA config, TRL's common arguments, metrics.jsonl, checkpoints and `--resume`, Ctrl-C, the summary.

A method (probllm/train/dpo.py, probllm/train/kto.py) supplies only what differs: its extra settings, how one
input record becomes a TRL row, its TRL config and trainer classes. An output folder holds the LoRA adapter
(safetensors, alone: never the base weights), the tokenizer, `config.json` (the exact resolved settings),
`metrics.jsonl` (one line per logging or evaluation step, written as it happens), `summary.json` and
`checkpoints/` (for `--resume`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from probllm.io import RecordError, Stats, UsageError, log, map_records, read_config, write_json

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD_DIR = "tensorboard"

# `--report-to`: where TRL also sends its logs (besides our metrics.jsonl), and the packages that can write them
# (transformers takes either of TensorBoard's); the first is the one to install.
REPORTERS = {
    "none": (),
    "tensorboard": ("tensorboard", "tensorboardX"),
    "trackio": ("trackio",),
}


def setting(default: Any, help: str, flag: str | None = None, choices: dict | None = None) -> Any:
    """A setting's default and its help: the CLI's options are generated from these (probllm/cli/train.py);
    `choices` is the registry whose keys are the allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass
class TrainSettings:
    """The settings every LoRA preference method shares, with the report's values as defaults (method.md
    section 4); names match the CLI flags and YAML keys. Methods subclass it with their own settings."""

    seed: int = setting(0, "Seed for data order, LoRA init and dropout.")
    bf16: bool = setting(True, "bfloat16 where supported.", "--bf16/--no-bf16")
    optim: str = setting("paged_adamw_32bit", "Optimizer (adamw_torch without CUDA).")
    max_steps: int = setting(2000, "Training steps.")
    # used only when max_steps is not given (max_steps wins, as in transformers)
    epochs: float | None = setting(None, "Epochs, used when --max-steps is not given.")
    lr: float = setting(5e-4, "Peak learning rate.")
    lr_scheduler: str = setting("cosine", "Learning-rate schedule (transformers' names).")
    warmup_steps: int = setting(100, "Warmup steps (scaled down to 5% of a shorter --max-steps).")
    weight_decay: float = setting(0.05, "Weight decay.")
    max_grad_norm: float = setting(1.0, "Gradient clipping.")
    adam_beta1: float = setting(0.9, "Adam beta1.")
    adam_beta2: float = setting(0.999, "Adam beta2.")
    adam_epsilon: float = setting(1e-8, "Adam epsilon.")
    lora_r: int = setting(8, "LoRA rank.")
    lora_alpha: int = setting(16, "LoRA alpha.")
    lora_dropout: float = setting(0.05, "LoRA dropout.")
    lora_target: str = setting("all-linear", "LoRA target modules.")
    batch_size: int = setting(8, "Examples per device per step.")
    eval_batch_size: int | None = setting(None, "Examples per device per evaluation step (default: --batch-size).")
    grad_accum: int = setting(1, "Gradient accumulation steps.")
    eval_steps: int = setting(100, "Evaluate every N steps.")
    # Not fixed by the report: ours, each a flag.
    max_length: int = setting(1024, "Max tokens of prompt+answer.")
    logging_steps: int = setting(10, "Log metrics every N steps.")
    save_steps: int = setting(100, "Checkpoint every N steps.")
    save_total_limit: int = setting(3, "Checkpoints kept.")
    # None: on with CUDA (7B fits), off on CPU (it only slows)
    gradient_checkpointing: bool | None = setting(None, "Gradient checkpointing (default: on with CUDA, off on "
                                                        "CPU).", "--gradient-checkpointing/--no-gradient-checkpointing")
    load_in_4bit: bool = setting(False, "QLoRA: load the base model in 4-bit NF4 (bitsandbytes, double "
                                        "quantization) and train LoRA on top; the adapter is saved alone.",
                                 "--load-in-4bit/--no-load-in-4bit")
    report_to: str = setting("none", "Also send TRL's logs to TensorBoard (OUTPUT/tensorboard) or Trackio; "
                                     "metrics.jsonl is written either way.", choices=REPORTERS)
    model: str | None = setting(None, "Causal LM (hub id or folder); default: offline SmolLM2-135M-Instruct.")

    # Old names of settings, still read from --config files (the CLI has its own hidden aliases).
    renamed = {}

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def load_config_file(cls: type[TrainSettings], path: str | os.PathLike) -> dict:
    """A `--config` file (probllm.io.read_config) as `cls`'s settings: old names renamed, unknown ones refused."""
    out = {}
    for name, value in read_config(path).items():
        name = cls.renamed.get(name, name)
        if name not in cls.names():
            raise UsageError(f"--config {path}: unknown setting '{name}' (known: {', '.join(sorted(cls.names()))})")
        out[name] = value
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_settings(cls: type[TrainSettings], command: str, config_file: str | None = None, **overrides: Any):
    """Defaults, then the YAML file, then CLI flags (those not None): the last one given wins. Also checks what
    the settings need (choices, installed packages) before anything heavy is loaded."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_config_file(cls, config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "epochs" in values and "max_steps" not in values:
        values["max_steps"] = -1
    try:
        settings = cls(**values)
    except TypeError as e:
        raise UsageError(str(e))
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(settings, f.name) not in choices:
            raise UsageError(f"{_flag(f.name)} {getattr(settings, f.name)}: choose one of {', '.join(choices)}")
    for name in ("batch_size", "grad_accum", "eval_steps", "logging_steps", "save_steps", "lora_r", "max_length"):
        if not isinstance(getattr(settings, name), int) or getattr(settings, name) < 1:
            raise UsageError(f"{_flag(name)} must be a positive integer")
    if settings.max_steps == 0 or (settings.max_steps < 0 and not settings.epochs):
        raise UsageError("--max-steps must be positive (or give --epochs)")
    packages = REPORTERS[settings.report_to]
    if packages and not any(importlib.util.find_spec(p) for p in packages):
        raise UsageError(f"--report-to {settings.report_to} needs the {packages[0]} package: "
                         f"pip install {packages[0]}")
    if settings.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--load-in-4bit needs the bitsandbytes package: pip install bitsandbytes")
    if 0 < settings.max_steps <= settings.warmup_steps:
        if "warmup_steps" in values:
            log(f"probllm {command}: --warmup-steps {settings.warmup_steps} >= --max-steps {settings.max_steps}: "
                f"the learning rate never reaches --lr {settings.lr:g}")
        else:
            # The report's 100 warmup steps belong to its 2000-step runs: keep that share (5%) for short runs,
            # instead of a run that is all warmup and logs a learning rate of 0 at step 1.
            scaled = settings.max_steps * TrainSettings.warmup_steps // TrainSettings.max_steps
            log(f"probllm {command}: --max-steps {settings.max_steps} is shorter than the default "
                f"{settings.warmup_steps} warmup steps; warmup scaled to {scaled} (5% of the steps, as in the "
                f"report's 100 of 2000)")
            settings.warmup_steps = scaled
    return settings


# ------------------------------------------------------------------------------------------------ machine checks


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def machine_fallbacks(settings: TrainSettings) -> tuple[TrainSettings, list[str]]:
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


# --------------------------------------------------------------------------------------------- model and LoRA


def load_base_model(path: str, s: TrainSettings, cuda: bool):
    """The model LoRA trains on: full precision, or (QLoRA) 4-bit NF4 weights with double quantization and
    compute in the training dtype, prepared for k-bit training as PEFT does (norms and embeddings in float32,
    input gradients on, gradient checkpointing when asked)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if s.bf16 else torch.float32
    if not s.load_in_4bit:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    from peft import prepare_model_for_kbit_training

    from probllm.models import bnb_quantization_config

    # Each process holds the whole (quantized) model on its own device; bitsandbytes needs it placed at load.
    device = int(os.environ.get("LOCAL_RANK", "0")) if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, device_map={"": device},
        quantization_config=bnb_quantization_config("bnb-nf4", compute_dtype=dtype))
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(s.gradient_checkpointing))


def lora_config(s: TrainSettings):
    from peft import LoraConfig

    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=s.lora_target, task_type="CAUSAL_LM")


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


def trl_arguments(s: TrainSettings, out: Path, has_eval: bool, world: int, cuda: bool) -> dict:
    """The TRL/transformers arguments both methods set the same way, each from its setting (TRL's own defaults
    differ from the report's: lr 1e-6, gradient checkpointing on, ...)."""
    return dict(
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
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.eval_batch_size or s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        gradient_checkpointing=bool(s.gradient_checkpointing),
        max_length=s.max_length,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=s.eval_steps,
        logging_steps=s.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=s.save_total_limit,
        report_to=s.report_to,
        # Trackio's project and run; TensorBoard's folder is set in `_reporting` (transformers reads an env var).
        project="probllm",
        run_name=out.name,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if world > 1 else None,
    )


@contextmanager
def _reporting(s: TrainSettings, out: Path):
    """TensorBoard events go to OUTPUT/tensorboard (not into checkpoints/, which --overwrite deletes), unless the
    user set TENSORBOARD_LOGGING_DIR; transformers reads it when the trainer is built."""
    if s.report_to != "tensorboard" or "TENSORBOARD_LOGGING_DIR" in os.environ:
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / TENSORBOARD_DIR)
    try:
        yield
    finally:
        del os.environ["TENSORBOARD_LOGGING_DIR"]


# --------------------------------------------------------------------------------------------- metrics callback

# The metrics shown on stderr at each logged step (those a method logs; the rest go to metrics.jsonl only).
SHOWN = ("loss", "eval_loss", "rewards/accuracies", "eval_rewards/accuracies", "rewards/margins",
         "eval_rewards/margins", "kl", "eval_kl")


def metrics_callback(path: Path, samples_per_step: int, resume_step: int | None, command: str):
    from transformers import TrainerCallback

    class MetricsWriter(TrainerCallback):
        """Append one JSON line per `log` event to metrics.jsonl as it happens, with measured samples/s.

        On resume, lines after the checkpoint's step are dropped first, so the file matches an uninterrupted run."""

        def __init__(self):
            self.last_time = None
            self.last_step = 0
            self.start = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_step is not None and path.exists():
                for line in path.read_text(encoding="utf-8").splitlines():
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
            path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
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
                rec["samples_per_second"] = round(steps * samples_per_step / dt, 4)
                self.last_time, self.last_step = now, state.global_step
            rec.update({k: v for k, v in logs.items()})
            rec["time"] = round(now - (self.start or now), 3)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            if is_eval or is_train_step:
                shown = {k: round(v, 4) for k, v in logs.items() if k in SHOWN}
                log(f"probllm {command}: step {state.global_step}/{state.max_steps} " +
                    " ".join(f"{k}={v}" for k, v in shown.items()))

        def on_evaluate(self, args, state, control, **kwargs):
            # Evaluation time is not training time: restart the clock so samples/s measures training only.
            self.last_time = time.perf_counter()

    return MetricsWriter()


class GracefulStop:
    """First Ctrl-C (or SIGTERM) asks the trainer to checkpoint at the end of the current step and stop, so that
    `--resume` loses no finished step; a second Ctrl-C interrupts at once."""

    def __init__(self, command: str):
        self.command = command
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
        log(f"probllm {self.command}: stopping after this step (checkpoint saved; continue with --resume); "
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


def read_examples(records: Iterable[dict], normalize: Callable[[dict], dict], stats: Stats, skip_invalid: bool,
                  what: str, source: str) -> list[dict]:
    """Input records -> checked, normalised examples (a bad one is a RecordError naming its line and field; none
    left is one naming `source`: "no usable WHAT")."""
    examples = list(map_records(records, normalize, stats, skip_invalid=skip_invalid))
    if not examples:
        raise RecordError(f"no usable {what}", source=source)
    return examples


def to_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


@dataclass
class Method:
    """What a preference method adds to the shared run: its command name, what its input records are called,
    how one record is checked and becomes a TRL row, and its TRL config and trainer."""

    command: str                                       # "dpo"
    unit: str                                          # "pairs": names counts and summary keys
    normalize: Callable[[dict], dict]                  # input record -> checked example (RecordError if not)
    to_row: Callable[[dict, bool], dict]               # (example, model has a chat template) -> TRL row
    config: Callable[[TrainSettings, dict], Any]       # (settings, shared TRL arguments) -> TRL config
    trainer_class: Callable[[TrainSettings, str], type]  # (settings, model identity) -> TRL trainer class
    # extra summary fields from the finished trainer and the settings
    summary: Callable[[Any, TrainSettings], dict] = lambda trainer, settings: {}
    # counts of the training rows worth saying (on stderr and in the summary), e.g. kto's labels
    counts: Callable[[list[dict]], dict] = lambda rows: {}
    # The trainer reads rows in their order (KTO pairs each answer with its batch neighbours' prompts for its KL
    # estimate): shuffle them once, seeded, so that an export in time order does not train week by week.
    sequential: bool = False


def train(
    method: Method,
    train_records: Iterable[dict],
    settings: TrainSettings,
    out: str | os.PathLike,
    stats: Stats,
    eval_records: Iterable[dict] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    skip_invalid: bool = False,
    eval_stats: Stats | None = None,
    data: list[dict] | None = None,
) -> dict:
    """Train a LoRA adapter with `method`; returns the summary record (also written to OUT/summary.json).
    `data`: the input files with their hashes (`data_files`), recorded in config.json."""
    import shutil
    import warnings

    name, unit = method.command, method.unit
    # The records are read and checked before anything heavy is imported or any model file is touched: a bad
    # line is an error in about a second, not after torch and the tokenizer, and it deletes no checkpoints.
    examples = read_examples(train_records, method.normalize, stats, skip_invalid, f"training {unit}", "input")
    eval_examples = None
    if eval_records is not None:
        eval_examples = read_examples(eval_records, method.normalize,
                                      eval_stats or Stats(command=f"probllm {name} --eval"), skip_invalid,
                                      f"evaluation {unit}", "--eval")
        if eval_stats is not None:
            eval_stats.written = len(eval_examples)  # "out" = rows used for evaluation

    import torch

    from probllm.models import load_tokenizer, model_identity, model_label, resolve_model, set_threads

    # transformers 5 renames gradient_checkpointing and warns on every use; the name is still the working one.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    out = Path(out)
    if check_output(out, resume, overwrite) and is_main_process():
        shutil.rmtree(out / CHECKPOINTS)
    resolved, notes = machine_fallbacks(settings)
    if is_main_process():
        for note in notes:
            log(f"probllm {name}: {note}")
    set_threads()
    if not sys.stderr.isatty():  # datasets' per-map progress bars are noise in logs and pipes
        import datasets

        datasets.disable_progress_bars()

    model_path = resolve_model(settings.model)
    tokenizer = load_tokenizer(settings.model, padding_side="right")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    rows = [method.to_row(example, has_template) for example in examples]
    stats.notes[unit] = len(rows)
    if method.sequential:
        import random

        random.Random(resolved.seed).shuffle(rows)
    counts = method.counts(rows)
    stats.notes.update(counts)
    eval_rows = None if eval_examples is None else [method.to_row(example, has_template)
                                                    for example in eval_examples]

    checkpoint = _last_checkpoint(out) if resume else None
    if resume and checkpoint is None and is_main_process():
        log(f"probllm {name}: no checkpoint in {out / CHECKPOINTS}: starting from the beginning")
    resume_step = int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    config = method.config(resolved, trl_arguments(resolved, out, eval_rows is not None, world, cuda))

    if is_main_process():
        write_json(out / CONFIG_FILE, {**dataclasses.asdict(resolved), "method": name,
                                       "model": model_label(settings.model), "model_path": model_path,
                                       "requested": dataclasses.asdict(settings), "fallbacks": notes,
                                       "trl": config.to_dict(), "data": data or []})

    model = load_base_model(model_path, resolved, cuda)
    # What the base was quantized with (QLoRA), from the loaded model itself: provenance for the summary.
    quantization = model.config.quantization_config.to_dict() if resolved.load_in_4bit else None
    # The base's content identity (probllm.models): the reference log-prob cache is never read for other weights.
    Trainer = method.trainer_class(resolved, model_identity(settings.model).id)
    samples_per_step = resolved.batch_size * resolved.grad_accum * world
    with _reporting(resolved, out):
        trainer = Trainer(
            model=model,
            args=config,
            train_dataset=to_dataset(rows),
            eval_dataset=to_dataset(eval_rows) if eval_rows else None,
            processing_class=tokenizer,
            peft_config=lora_config(resolved),
            callbacks=[metrics_callback(out / METRICS_FILE, samples_per_step, resume_step, name)],
        )
    # Trainer prints every log dict to stdout when tqdm is off; stdout carries only our summary record.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    started = time.perf_counter()
    with GracefulStop(name) as stop:
        trainer.add_callback(stop.callback())
        result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    if stop.requested:
        raise KeyboardInterrupt  # the checkpoint of the last finished step is on disk; exit 130
    eval_metrics = {}
    if eval_rows:
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
        "method": name,
        "model": model_label(settings.model),
        unit: len(rows),
        **counts,
        f"eval_{unit}": len(eval_rows or []),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_loss": result.training_loss,
        "last": {k: v for k, v in (train_logs[-1] if train_logs else {}).items()},
        "eval": {k: v for k, v in eval_metrics.items()},
        "seconds": round(seconds, 2),
        "resumed_from": checkpoint,
        "fallbacks": notes,
        "base_quantization": quantization,
        **method.summary(trainer, resolved),
    }
    if is_main_process():
        write_json(out / SUMMARY_FILE, summary)
    stats.notes["steps"] = trainer.state.global_step
    return summary
