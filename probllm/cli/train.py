"""Commands of the train family: `dpo`, `reward-eval`, `plot` (logic in probllm/train)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from probllm.cli.app import InputFiles, Limit, SkipInvalid, SummaryFile, app, command, hidden_aliases
from probllm.cli.choices import Dtype, value
from probllm.io import Stats, log, read_records, write_records

hidden_aliases("dpo", out="--output", force="--overwrite")
hidden_aliases("plot", out="--output")


def _opt(flag: str, help: str, **kw):
    return typer.Option(flag, help=help, show_default=False, **kw)


@app.command("dpo")
def dpo_command(
    files: InputFiles = None,
    out: Annotated[Path, typer.Option("--output", "-o", help="Output folder: adapter, tokenizer, config.json, "
                                      "metrics.jsonl, checkpoints/.")] = Path("runs/dpo"),
    model: Annotated[Optional[str], _opt("--model", "Causal LM (hub id or folder); default: offline "
                                         "SmolLM2-135M-Instruct.")] = None,
    eval_file: Annotated[Optional[list[str]], _opt("--eval", "Held-out pairs, evaluated every --eval-steps "
                                                   "and at the end.")] = None,
    config: Annotated[Optional[Path], _opt("--config", "YAML file of settings with these flags' names; "
                                           "flags given on the command line win.")] = None,
    max_steps: Annotated[Optional[int], _opt("--max-steps", "Training steps [2000].")] = None,
    epochs: Annotated[Optional[float], _opt("--epochs", "Epochs, used when --max-steps is not given.")] = None,
    lr: Annotated[Optional[float], _opt("--lr", "Peak learning rate [5e-4].")] = None,
    lr_scheduler: Annotated[Optional[str], _opt("--lr-scheduler", "Schedule [cosine].")] = None,
    warmup_steps: Annotated[Optional[int], _opt("--warmup-steps", "Warmup steps [100].")] = None,
    weight_decay: Annotated[Optional[float], _opt("--weight-decay", "Weight decay [0.05].")] = None,
    max_grad_norm: Annotated[Optional[float], _opt("--max-grad-norm", "Gradient clipping [1.0].")] = None,
    beta: Annotated[Optional[float], _opt("--beta", "DPO beta [0.05].")] = None,
    loss_type: Annotated[Optional[str], _opt("--loss-type", "TRL loss type [sigmoid].")] = None,
    lora_r: Annotated[Optional[int], _opt("--lora-r", "LoRA rank [8].")] = None,
    lora_alpha: Annotated[Optional[int], _opt("--lora-alpha", "LoRA alpha [16].")] = None,
    lora_dropout: Annotated[Optional[float], _opt("--lora-dropout", "LoRA dropout [0.05].")] = None,
    lora_target: Annotated[Optional[str], _opt("--lora-target", "LoRA target modules [all-linear].")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "Pairs per device per step [8].")] = None,
    grad_accum: Annotated[Optional[int], _opt("--grad-accum", "Gradient accumulation steps [1].")] = None,
    max_length: Annotated[Optional[int], _opt("--max-length", "Max tokens of prompt+answer [1024].")] = None,
    eval_steps: Annotated[Optional[int], _opt("--eval-steps", "Evaluate every N steps [100].")] = None,
    logging_steps: Annotated[Optional[int], _opt("--logging-steps", "Log metrics every N steps [10].")] = None,
    save_steps: Annotated[Optional[int], _opt("--save-steps", "Checkpoint every N steps [100].")] = None,
    optim: Annotated[Optional[str], _opt("--optim", "Optimizer [paged_adamw_32bit; adamw_torch without "
                                         "CUDA].")] = None,
    bf16: Annotated[Optional[bool], _opt("--bf16/--no-bf16", "bfloat16 [on where supported].")] = None,
    gradient_checkpointing: Annotated[Optional[bool], _opt(
        "--gradient-checkpointing/--no-gradient-checkpointing", "[on with CUDA, off on CPU].")] = None,
    precompute_ref: Annotated[Optional[bool], _opt(
        "--precompute-ref/--no-precompute-ref", "Compute reference log-probs once and cache them on disk, "
        "keyed by model, data and max length: reruns with other hyperparameters skip that pass [off].")] = None,
    seed: Annotated[Optional[int], _opt("--seed", "Seed for data order, LoRA init and dropout [0].")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --output.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard --output's checkpoints and start "
                                            "again.")] = False,
    limit: Limit = None,
    skip_invalid: SkipInvalid = False,
    summary: SummaryFile = None,
) -> None:
    """Preference-tune a causal LM with DPO and LoRA; defaults are the report's hyperparameters.

    Pairs in TRL string, conversational or implicit-prompt form, or LLaMA-Factory ShareGPT form. Prints one
    summary record; the adapter, config.json and metrics.jsonl go to --output.

        probllm dpo pairs.train.jsonl --eval pairs.test.jsonl -o runs/dpo \\
            --max-steps 30 --max-length 256 --batch-size 4
    """
    from probllm.train.dpo import check_output, is_main_process, resolve_settings, train

    with command("dpo", summary, quiet_summary=not is_main_process()) as stats:
        check_output(out, resume, overwrite)  # check first, load later: a refusal costs no model load
        settings = resolve_settings(
            str(config) if config else None, model=model, max_steps=max_steps, epochs=epochs, lr=lr,
            lr_scheduler=lr_scheduler, warmup_steps=warmup_steps, weight_decay=weight_decay,
            max_grad_norm=max_grad_norm, beta=beta, loss_type=loss_type, lora_r=lora_r, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, lora_target=lora_target, batch_size=batch_size, grad_accum=grad_accum,
            max_length=max_length, eval_steps=eval_steps, logging_steps=logging_steps, save_steps=save_steps,
            optim=optim, bf16=bf16, gradient_checkpointing=gradient_checkpointing,
            precompute_ref=precompute_ref, seed=seed)
        eval_stats = Stats(command="probllm dpo --eval")
        result = train(
            read_records(files, stats, skip_invalid, limit=limit),
            settings, out, stats,
            eval_records=read_records(eval_file, eval_stats, skip_invalid, limit=limit) if eval_file else None,
            resume=resume, overwrite=overwrite, skip_invalid=skip_invalid, eval_stats=eval_stats,
        )
        if is_main_process():
            if eval_file:
                log(eval_stats.summary())
            write_records([result], stats)


@app.command("reward-eval")
def reward_eval_command(
    files: InputFiles = None,
    adapter: Annotated[Optional[str], _opt("--adapter", "A `dpo --output` folder (LoRA adapter); the reference "
                                           "is the same model with the adapter disabled.")] = None,
    model: Annotated[Optional[str], _opt("--model", "Policy model (default: the adapter's base model).")] = None,
    ref: Annotated[Optional[str], _opt("--ref", "Reference model, for a policy without adapter.")] = None,
    beta: Annotated[Optional[float], _opt("--beta", "DPO beta (default: the run's, else 0.05).")] = None,
    max_length: Annotated[Optional[int], _opt("--max-length", "Truncation (default: the run's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per forward pass.")] = 4,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="auto: the run's.")] = Dtype.auto,
    limit: Limit = None,
    skip_invalid: SkipInvalid = False,
    summary: SummaryFile = None,
) -> None:
    """Score pairs with a trained adapter: implicit rewards, margin and whether chosen wins, per pair.

    r = beta * (log pi(y|x) - log pi_ref(y|x)). Reward accuracy and mean margin go to stderr and --summary.

        probllm reward-eval pairs.test.jsonl --adapter runs/dpo \\
            --summary runs/dpo/test-rewards.json > scored.jsonl
    """
    from probllm.train.reward import RewardScorer, reward_eval

    with command("reward-eval", summary) as stats:
        records = read_records(files, stats, skip_invalid, limit=limit)
        scorer = RewardScorer(adapter=adapter, model=model, ref=ref, beta=beta, max_length=max_length,
                              dtype=value(dtype))
        write_records(reward_eval(records, scorer, stats, batch_size=batch_size,
                                  skip_invalid=skip_invalid), stats)


@app.command("plot")
def plot_command(
    runs: Annotated[list[str], typer.Argument(help="`dpo --output` folders or metrics.jsonl files (several: "
                                              "overlaid).", show_default=False)],
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder for the PNGs and index.md/index.html.")]
    = Path("runs/plots"),
    label: Annotated[Optional[list[str]], _opt("--label", "A name per run for the legend (default: folder "
                                               "names).")] = None,
) -> None:
    """Draw the report's 17 training curves (eval and train) as PNGs, with an index page.

        probllm plot runs/student-only runs/all-data -o runs/plots
    """
    from probllm.train.plot import plot_runs

    with command("plot", quiet_summary=True):
        paths = plot_runs(runs, out, labels=label)
        log(f"probllm plot: {len(paths)} figures in {out} (index.md, index.html)")
