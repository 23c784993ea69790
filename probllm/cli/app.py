"""The Typer app and what every command shares: input arguments, common options, error and exit handling.

Commands live in one module per family (data, llm, train, evaluate, rag) and only wire options to functions.
"""

from __future__ import annotations

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
from probllm.io import EXIT_DATAERR, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, RecordError, Stats, UsageError, \
    log
from probllm.summary import write_summary

app = typer.Typer(
    name="probllm",
    help=(
        "Turn an open LLM into a helper for university science multiple-choice questions: preference data, "
        "MCQ sets, DPO with LoRA, evaluation, quantization and retrieval, as small commands that read and "
        "write JSONL.\n\n"
        "Example:\n\n"
        "    probllm mcqify --source gsm8k examples/gsm8k.jsonl | probllm split --part test | head -n 2"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ----------------------------------------------------------------------------------------- shared option types

InputFiles = Annotated[
    Optional[list[str]],
    typer.Argument(help="Input files (.jsonl, .jsonl.gz, .json) or folders; none or '-' reads stdin.",
                   show_default=False),
]
SkipInvalid = Annotated[
    bool, typer.Option("--skip-invalid", help="Skip bad records (counted on stderr) instead of stopping.")
]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice: same seed, same output.")]
SummaryFile = Annotated[
    Optional[Path], typer.Option("--summary", help="Also write the run's summary as JSON to this file.")
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
    except KeyboardInterrupt:
        log(f"probllm {name}: interrupted")
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
