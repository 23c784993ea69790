"""Commands of the train family: `dpo`, `kto`, `reward-eval`, `plot` (logic in probllm/train)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from probllm.cli.app import InputFiles, Limit, SkipInvalid, SummaryFile, app, command, hidden_aliases
from probllm.cli.choices import Choice, value
from probllm.cli.groups import Opt, OptionGroup, uses
from probllm.cli.options import LOCAL_MODEL
from probllm.io import Stats, log, read_records, write_records

# --loss-type was the raw TRL loss string before the presets: its values that are presets still work.
hidden_aliases("dpo", out="--output", force="--overwrite", loss_type="--loss")
hidden_aliases("plot", out="--output")


def _opt(flag: str, help: str, **kw):
    return typer.Option(flag, help=help, show_default=False, **kw)


def settings_group(settings_class: type) -> OptionGroup:
    """A training command's options, generated from its Settings dataclass (their one definition, in
    probllm/train): every field a flag with its help and default, a field with a registry of choices a choice
    of its keys; None means "not given", so a --config file or the default applies."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(settings_class)
    options = []
    for f in dataclasses.fields(settings_class):
        kind = hints[f.name]
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        if f.metadata.get("choices"):
            base = Choice(f.name.title().replace("_", ""), [(k, k) for k in f.metadata["choices"]])
        shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
        default = "" if f.default is None else f"  [default: {shown}]"
        options.append(Opt(f.name, Optional[base], None, f.metadata["help"] + default,
                           flags=(f.metadata["flag"],) if f.metadata.get("flag") else (),
                           settings={"show_default": False}))
    return OptionGroup("settings", tuple(options))


def _dpo_settings() -> OptionGroup:
    from probllm.train.dpo import Settings

    return settings_group(Settings)


def _kto_settings() -> OptionGroup:
    from probllm.train.kto import Settings

    return settings_group(Settings)


DPO = _dpo_settings()
KTO = _kto_settings()

Output = Annotated[Path, typer.Option("--output", "-o", help="Output folder: adapter, tokenizer, config.json, "
                                      "metrics.jsonl, checkpoints/.")]
EvalFile = Annotated[Optional[list[str]], _opt("--eval", "Held-out records, evaluated every --eval-steps and at "
                                               "the end.")]
SettingsFile = Annotated[Optional[Path], _opt("--config", "YAML file of settings with these flags' names; flags "
                                              "given on the command line win.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --output.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Discard --output's checkpoints and start again.")]


def _training_command(name: str, settings_options: OptionGroup, help: str) -> None:
    """Register `probllm NAME` (dpo, kto): the same input, output, resume and summary options around the method's
    settings, and the same body (probllm/train/NAME.py does the method's part)."""

    def train_command(
        files: InputFiles = None,
        out: Output = Path(f"runs/{name}"),
        eval_file: EvalFile = None,
        config: SettingsFile = None,
        settings: dict = None,
        resume: Resume = False,
        overwrite: Overwrite = False,
        limit: Limit = None,
        skip_invalid: SkipInvalid = False,
        summary: SummaryFile = None,
    ) -> None:
        import importlib

        from probllm.train.run import check_output, data_files, is_main_process

        method = importlib.import_module(f"probllm.train.{name}")
        with command(name, summary, quiet_summary=not is_main_process()) as stats:
            check_output(out, resume, overwrite)  # check first, load later: a refusal costs no model load
            resolved = method.resolve_settings(str(config) if config else None,
                                               **{k: value(v) for k, v in settings.items()})
            eval_stats = Stats(command=f"probllm {name} --eval")
            result = method.train(
                read_records(files, stats, skip_invalid, limit=limit),
                resolved, out, stats,
                eval_records=read_records(eval_file, eval_stats, skip_invalid, limit=limit) if eval_file else None,
                resume=resume, overwrite=overwrite, skip_invalid=skip_invalid, eval_stats=eval_stats,
                data=data_files(files, eval_file),
            )
            if is_main_process():
                if eval_file:
                    log(eval_stats.summary())
                write_records([result], stats)

    train_command.__doc__ = help  # before `uses` copies it: Typer shows it as the command's --help
    app.command(name)(uses(settings_options, config=False)(train_command))


_training_command("dpo", DPO, """
    Preference-tune a causal LM with DPO and LoRA; defaults are the report's hyperparameters.

    Pairs in TRL string, conversational or implicit-prompt form, or LLaMA-Factory ShareGPT form. Prints one
    summary record; the adapter, config.json and metrics.jsonl go to --output. Settings: defaults, then
    --config, then flags. --loss picks the objective (DPO, its length-normalised form, IPO, RPO, APO-zero,
    hinge); --load-in-4bit trains QLoRA on a 4-bit base.

        probllm dpo pairs.train.jsonl --eval pairs.test.jsonl -o runs/dpo \\
            --max-steps 30 --max-length 256 --batch-size 4
        probllm dpo pairs.jsonl -o runs/rpo --loss rpo --rpo-alpha 0.5
        probllm dpo pairs.jsonl -o runs/7b --model deepseek-ai/deepseek-math-7b-rl \\
            --load-in-4bit --report-to tensorboard
    """)

_training_command("kto", KTO, """
    Preference-tune a causal LM with KTO and LoRA from unpaired answers rated good or bad (thumbs up/down).

    Records `{"prompt", "completion", "label"}` (label true: a good answer; prompt and completion strings or
    message lists), TRL's unpaired preference form, as `feedback export --kind ratings` writes them. The same
    LoRA defaults, output folder, metrics.jsonl, --resume and --load-in-4bit as dpo.

        probllm kto ratings.jsonl --eval ratings.test.jsonl -o runs/kto \\
            --max-steps 30 --max-length 256 --batch-size 4
    """)


REWARD_MODEL = LOCAL_MODEL.replace(
    "model", help="Policy model (default: the adapter's base model).").replace(
    "adapter", help="A `dpo --output` folder (LoRA adapter); the reference is the same model with the adapter "
                    "disabled.").replace("dtype", help="auto: the run's.")


@app.command("reward-eval")
@uses(REWARD_MODEL)
def reward_eval_command(
    local_model: dict,
    files: InputFiles = None,
    ref: Annotated[Optional[str], _opt("--ref", "Reference model, for a policy without adapter.")] = None,
    beta: Annotated[Optional[float], _opt("--beta", "DPO beta (default: the run's, else 0.05).")] = None,
    max_length: Annotated[Optional[int], _opt("--max-length", "Truncation (default: the run's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per forward pass.")] = 4,
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
        scorer = RewardScorer(**{k: value(v) for k, v in local_model.items()}, ref=ref, beta=beta,
                              max_length=max_length)
        write_records(reward_eval(records, scorer, stats, batch_size=batch_size,
                                  skip_invalid=skip_invalid), stats)


@app.command("plot")
def plot_command(
    runs: Annotated[list[str], typer.Argument(help="`dpo` or `kto` --output folders or metrics.jsonl files, or "
                                              "globs of them (several: overlaid).", show_default=False)],
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder for the PNGs and index.md/index.html.")]
    = Path("runs/plots"),
    label: Annotated[Optional[list[str]], _opt("--label", "A name per run for the legend (default: folder "
                                               "names).")] = None,
) -> None:
    """Draw the report's 17 training curves (eval and train) as PNGs, with an index page.

        probllm plot runs/student-only runs/all-data -o runs/plots
    """
    from probllm.train.plot import plot_runs

    from probllm.io import expand_paths

    with command("plot", quiet_summary=True):
        paths = plot_runs(list(expand_paths(runs, walk=False)), out, labels=label)
        log(f"probllm plot: {len(paths)} figures in {out} (index.md, index.html)")
