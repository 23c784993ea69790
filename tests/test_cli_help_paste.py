"""Issue 14 item 7: help you can paste. Examples print one command per line, as written, at 80 columns; every
example (in --help and in the README) parses as a command line of its command; metavars are click's standard
ones; option errors are one line; the README's command reference is --help, generated."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from conftest import ROOT
from probllm.cli import app
from probllm.cli.app import COMMAND_FAMILIES, _is_example_block

sys.path.insert(0, str(ROOT / "scripts"))
import readme_help  # noqa: E402

GROUP = get_command(app)
COMMANDS = list(GROUP.commands)


def examples_of(help_text: str) -> list[list[str]]:
    """The example blocks of a docstring, as lists of lines (continuation lines kept separate)."""
    import inspect

    blocks = [b.splitlines() for b in inspect.cleandoc(help_text or "").split("\n\n")]
    return [[line.strip() for line in b] for b in blocks if _is_example_block(b)]


def command_lines(lines: list[str]) -> list[str]:
    """Shell lines, with backslash continuations joined and comments dropped."""
    joined, out = "", []
    for line in lines:
        line = line.rstrip()
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        out.append(joined + line)
        joined = ""
    return [re.sub(r"\s#.*$", "", line) for line in out if line and not line.startswith("#")]


def probllm_invocations(shell_line: str) -> list[list[str]]:
    """The argument lists of every `probllm ...` in a pipeline (redirections and other programs left out)."""
    lexer = shlex.shlex(shell_line, posix=True, punctuation_chars="|;&<>")
    lexer.whitespace_split = True
    tokens, calls, current, skip_next = list(lexer), [], None, False
    for tok in tokens:
        if skip_next:
            skip_next = False
            continue
        if tok in ("|", ";", "&&", "||", "&"):
            current = None
            continue
        if tok in (">", ">>", "<", "2>"):
            skip_next = True
            continue
        if current is None:
            if tok == "probllm":
                current = []
                calls.append(current)
            else:
                current = ["<other program>"]
            continue
        if current and current[0] == "<other program>":
            continue
        current.append(tok)
    return [c for c in calls]


def parses(args: list[str]) -> None:
    """Parse ARGS as `probllm` does, without running the command (typer.Exit(2) on a usage error)."""
    name, rest = args[0], args[1:]
    command = GROUP.commands[name]
    root = typer.Context(GROUP, info_name="probllm")
    command.make_context(name, list(rest), parent=root)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_examples_paste_at_80_columns(name):
    text = readme_help.help_text(name, width=80)
    examples = examples_of(GROUP.commands[name].help)
    assert examples, f"probllm {name} --help has no example"
    printed = text.splitlines()
    for block in examples:
        for line in block:
            matches = [p for p in printed if p.strip() == line]
            assert matches, f"example line not printed as written: {line!r}\n{text}"
            assert all(len(p) <= 80 for p in matches), f"example line wider than 80 columns: {line!r}"
    assert not re.search(r"<(bool|str|int|float|path|list\[str\])>", text), text


@pytest.mark.parametrize("name", COMMANDS)
def test_every_help_example_parses_as_its_command(name):
    for block in examples_of(GROUP.commands[name].help):
        for line in command_lines(block):
            for args in probllm_invocations(line):
                try:
                    parses(args)
                except typer.Exit as e:  # our one-line usage error
                    pytest.fail(f"example does not parse (exit {e.exit_code}): probllm {shlex.join(args)}")


def readme_shell_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [line for b in blocks for line in command_lines(b.splitlines())]


def test_every_readme_example_parses():
    calls = [args for line in readme_shell_lines() for args in probllm_invocations(line)]
    assert len(calls) > 20
    for args in calls:
        try:
            parses(args)
        except typer.Exit as e:
            pytest.fail(f"README example does not parse (exit {e.exit_code}): probllm {shlex.join(args)}")


def test_command_reference_is_the_help():
    text = readme_help.REFERENCE.read_text(encoding="utf-8")
    assert readme_help.updated_reference(text) == text, "docs/cli.md's command reference drifted from --help: " \
                                                         "run python scripts/readme_help.py"


def test_judge_help_does_not_offer_rules():
    text = readme_help.help_text("judge")
    backend_line = next(line for line in text.splitlines() if line.strip().startswith("--backend"))
    assert "rules" not in backend_line and "[openai|hf]" in backend_line


def _probllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "probllm", *args], capture_output=True, text=True, cwd=ROOT,
                          input="")


def test_help_lists_the_commands_by_family_in_pipeline_order():
    text = readme_help.help_text()
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    families = [h for h in headings if h in COMMAND_FAMILIES]
    assert families == list(COMMAND_FAMILIES)[:len(families)] and families[:2] == ["Data", "Preference pairs"]
    listed = [line.split()[0] for line in text.split("Data:", 1)[1].splitlines() if line.startswith("  ")]
    assert listed.index("load") < listed.index("dpo") < listed.index("eval") < listed.index("serve")
    top_level = {name for name in readme_help.command_names() if " " not in name}
    assert set(listed) == top_level  # every command is listed, under "Other" if need be


def test_no_arguments_prints_help_and_exits_0():
    run = _probllm()
    assert run.returncode == 0 and "Usage: probllm" in run.stdout and "mcqify" in run.stdout


@pytest.mark.parametrize("args", [["split", "--bogus"], ["split", "--test-fraction", "x"], ["nope"],
                                  ["judge", "--backend", "rules"], ["split", "--part"]])
def test_bad_options_are_one_line_errors(args):
    run = _probllm(*args)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("probllm") and ": error: " in lines[0], run.stderr
