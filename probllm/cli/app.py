"""The Typer app and what every command shares: input arguments, common options, error and exit handling.

Commands live in one module per family (data, llm, train, evaluate, rag) and only wire options to functions.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from probllm import __version__
from probllm.io import EXIT_DATAERR, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, Interrupted, RecordError, Stats, \
    UsageError, log
from probllm.lm.base import FatalBackendError
from probllm.summary import write_summary

# Typer 0.29 vendors click; its usage-error class is not re-exported, but BadParameter (public) derives from it.
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption  # noqa: E402

ClickUsageError = typer.BadParameter.__mro__[1]

# Old spellings of renamed options, per command: still accepted, never shown in --help (one vocabulary: --output,
# --max-new-tokens, --question-field, ...). Filled by `hidden_aliases()` next to each command.
HIDDEN_ALIASES: dict[str, dict[str, str]] = {}


def hidden_aliases(command_name: str, **old_to_new: str) -> None:
    """Register old option spellings for a command, e.g. `hidden_aliases("dpo", out="--output")`."""
    HIDDEN_ALIASES.setdefault(command_name, {}).update(
        {"--" + old.replace("_", "-"): new for old, new in old_to_new.items()})


def _rewrite_aliases(args: list[str], aliases: dict[str, str]) -> list[str]:
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        flag, eq, value = arg.partition("=")
        if flag in aliases:
            arg = aliases[flag] + eq + value
        out.append(arg)
    return out


def _inputs_as_arguments(args: list[str]) -> list[str]:
    """`-i FILE` / `--input FILE` mean the same as a positional FILE in every command that reads records, so
    that `-i` works everywhere (ask and retrieve, whose positional argument is a question, take only `-i`)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + args[i:]
        if arg in ("-i", "--input") and i + 1 < len(args):
            out.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--input="):
            arg = arg.split("=", 1)[1]
        out.append(arg)
        i += 1
    return out


def _usage_error(ctx, error) -> None:
    """Bad or misspelt options: one line on stderr, exit 2, like every other user error of probllm."""
    name = ctx.command_path if ctx is not None else "probllm"
    log(f"{name}: error: {error.format_message()} (see {name} --help)")
    raise typer.Exit(EXIT_USAGE)


class ProbllmCommand(TyperCommand):
    """A command whose help pastes (examples printed as written) and whose option errors are one line."""

    def parse_args(self, ctx, args):
        args = _rewrite_aliases(list(args), HIDDEN_ALIASES.get(self.name or "", {}))
        if any(p.name in ("files", "sources", "paths") and isinstance(p, TyperArgument) for p in self.params):
            args = _inputs_as_arguments(args)
        try:
            return super().parse_args(ctx, args)
        except ClickUsageError as e:
            _usage_error(ctx, e)

    def format_help_text(self, ctx, formatter) -> None:
        write_help_text(self.help, formatter)


def _is_example_block(lines: list[str]) -> bool:
    # cleandoc leaves examples indented, except when the docstring has only one line of prose before them.
    return bool(lines) and (all(line.startswith("    ") for line in lines) or lines[0].startswith("probllm "))


def write_help_text(help_text: str | None, formatter) -> None:
    """Prose paragraphs are rewrapped to the terminal; example blocks are written exactly as in the docstring,
    one command per line, so that they paste as they are (click would join their lines)."""
    text = inspect.cleandoc(help_text or "").partition("\f")[0]
    if not text:
        return
    formatter.write_paragraph()
    with formatter.indentation():
        for i, block in enumerate(text.split("\n\n")):
            lines = block.splitlines()
            if i:
                formatter.write_paragraph()
            if _is_example_block(lines):
                indent = min(len(line) - len(line.lstrip()) for line in lines)
                for line in lines:
                    formatter.write(" " * (formatter.current_indent + 2) + line[indent:] + "\n")
            else:
                formatter.write_text(block)


# `probllm --help` lists the commands by family, in the order a pipeline uses them (not in import order). A command
# that no family names yet is still listed, under "Other", so a new command is never hidden.
COMMAND_FAMILIES: dict[str, tuple[str, ...]] = {
    "Data": ("load", "mcqify", "split", "decontaminate"),
    "Preference pairs": ("pair-annotated", "pair-stackexchange", "corrupt", "judge", "feedback"),
    "Training": ("dpo", "kto", "reward-eval", "plot"),
    "Evaluation": ("eval", "quantize", "report"),
    "Retrieval": ("index", "retrieve", "ask", "rag-eval"),
    "Serving": ("serve", "chat", "export"),
}


class ProbllmGroup(TyperGroup):
    """`probllm` alone prints the help and exits 0; an unknown command is a one-line error; commands are listed
    by family (COMMAND_FAMILIES)."""

    def format_help_text(self, ctx, formatter) -> None:
        write_help_text(self.help, formatter)

    def list_commands(self, ctx) -> list[str]:
        registered = super().list_commands(ctx)
        ordered = [name for names in COMMAND_FAMILIES.values() for name in names if name in registered]
        return ordered + [name for name in registered if name not in ordered]

    def format_commands(self, ctx, formatter) -> None:
        listed = self.list_commands(ctx)
        families = [(family, [n for n in names if n in listed]) for family, names in COMMAND_FAMILIES.items()]
        known = {n for _, names in families for n in names}
        families.append(("Other", [n for n in listed if n not in known]))
        name_width = max(len(n) for n in listed)
        width = formatter.width - 6 - name_width
        for family, names in families:
            # Names padded to one width, so that the descriptions line up across the sections.
            rows = [(n.ljust(name_width), self.get_command(ctx, n).get_short_help_str(width)) for n in names
                    if not self.get_command(ctx, n).hidden]
            if rows:
                with formatter.section(family):
                    formatter.write_dl(rows)

    def parse_args(self, ctx, args):
        if not args:
            typer.echo(ctx.get_help())
            ctx.exit(0)
        try:
            return super().parse_args(ctx, args)
        except ClickUsageError as e:
            _usage_error(ctx, e)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except ClickUsageError as e:
            _usage_error(ctx, e)


_TYPER_DISPLAY_TYPE = TyperOption.display_type
_STANDARD_METAVARS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "bool": "BOOLEAN"}


def _standard_metavar(self, ctx) -> str:
    """click's usual metavars (TEXT, INTEGER, PATH, [a|b|c]) instead of Typer 0.29's `<str>` labels."""
    if self.metavar is not None:
        return self.metavar
    label = _TYPER_DISPLAY_TYPE(self, ctx).strip("<>")
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]
    if "|" in label:
        return f"[{label}]"
    base, ranged, _ = label.partition(" range")
    return _STANDARD_METAVARS.get(base.lower(), base.upper()) + (" RANGE" if ranged else "")


def _usage_name(self) -> str:
    """SOURCE and [FILES]... in the usage line, as click and man pages write them (Typer 0.29: `{source}`)."""
    name = (self.metavar or self.name or "").upper()
    name = name if self.required else f"[{name}]"
    return name + ("..." if self.nargs != 1 else "")


def _display_name(self) -> str:
    return (self.metavar or (self.name or "").upper()) + ("..." if self.metavar is None and self.nargs != 1 else "")


for _param_class in (TyperOption, TyperArgument):
    _param_class.display_type = _standard_metavar  # type: ignore[method-assign]
TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign]
TyperArgument._rich_display_name = _display_name  # type: ignore[method-assign]


class ProbllmTyper(typer.Typer):
    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", ProbllmCommand)
        return super().command(*args, **kwargs)


app = ProbllmTyper(
    name="probllm",
    cls=ProbllmGroup,
    help=(
        "Turn an open LLM into a helper for university science multiple-choice questions: preference data, "
        "MCQ sets, DPO with LoRA, evaluation, quantization and retrieval, as small commands that read and "
        "write JSONL.\n\n"
        "Example:\n\n"
        "    probllm mcqify --source gsm8k examples/gsm8k.jsonl \\\n"
        "        | probllm split --part test | head -n 2"
    ),
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

# ----------------------------------------------------------------------------------------- shared option types

InputFiles = Annotated[
    Optional[list[str]],
    typer.Argument(help="Input files (.jsonl, .json, .gz), folders, `~` or globs (quoted or not; also as "
                        "-i/--input FILE); none or '-' reads stdin.", show_default=False),
]
InputOption = Annotated[
    Optional[list[str]],
    typer.Option("--input", "-i", help="Input files (.jsonl, .json, .gz), folders or globs; none or '-' reads "
                                       "stdin. Repeat for several.", show_default=False),
]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Only the first N input records.",
                                              show_default=False, min=0)]
SkipInvalid = Annotated[
    bool, typer.Option("--skip-invalid", help="Skip bad records (counted on stderr) instead of stopping.")
]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice: same seed, same output.")]
SummaryFile = Annotated[
    Optional[Path], typer.Option("--summary", help="Also write the run's summary as JSON to this file.")
]
ForceResume = Annotated[
    bool, typer.Option("--force-resume", help="Resume --output even though it was written by another model or "
                                              "other settings (refused otherwise: results would be mixed).")
]


def _version(value: bool) -> None:
    if value:
        print(f"probllm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    # bitsandbytes warns at import that an optional CPU kernel package (`kernels`, fetched from a hub) is missing;
    # it falls back to its own CPU path, so the warning is noise in every command that imports trl or peft.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Deprecation notices addressed to library authors (transformers, trl, peft) say nothing to a user of ours.
    for lib in ("transformers", "trl", "peft", "accelerate"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=lib)
    # In pipes and CI, the hub libraries' own progress bars are noise on stderr; on a terminal they help.
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")


@contextmanager
def command(name: str, summary_file: Optional[Path] = None, quiet_summary: bool = False) -> Iterator[Stats]:
    """Run a command body: counts on stderr at the end, user errors as one line with a distinct exit code.

    Bad data exits 65, bad options 2, Ctrl-C 130; a closed stdout (`| head`) ends quietly. Anything else is
    a bug in probllm and keeps its traceback."""
    stats = Stats(command=f"probllm {name}")
    started = time.perf_counter()
    code = 0
    try:
        yield stats
    except RecordError as e:
        log(f"probllm {name}: error: {e}")
        code = EXIT_DATAERR
    except UsageError as e:
        log(f"probllm {name}: error: {e}")
        code = EXIT_USAGE
    except FatalBackendError as e:  # the model or endpoint cannot work at all (refused key, no such model...)
        log(f"probllm {name}: error: {e}")
        code = EXIT_FAILURE
    except KeyboardInterrupt as e:
        note = str(e) if isinstance(e, Interrupted) and str(e) else ""
        log(f"probllm {name}: interrupted" + (f"; {note}" if note else ""))
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error. Point stdout at devnull so the final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    if not quiet_summary:
        log(stats.summary())
    if summary_file is not None:
        write_summary(summary_file, stats, time.perf_counter() - started)
    if code:
        raise typer.Exit(code)


def fail(message: str, code: int = EXIT_FAILURE) -> None:
    log(f"probllm: error: {message}")
    raise typer.Exit(code)
