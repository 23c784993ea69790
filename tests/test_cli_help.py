"""Every command documents itself with an example, and startup imports no heavy library (torch)."""

import subprocess
import sys

import pytest
from typer.main import get_command

from probllm.cli import app

COMMANDS = sorted(get_command(app).commands)


def test_every_family_is_registered():
    for name in ["load", "pair-annotated", "pair-stackexchange", "mcqify", "split", "corrupt", "judge", "dpo",
                 "reward-eval", "plot", "eval", "quantize", "index", "retrieve", "ask"]:
        assert name in COMMANDS


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_an_example(name):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"probllm {name}" in result.output, f"`probllm {name} --help` shows no example of itself"


def test_top_level_help_lists_commands_without_loading_torch():
    code = "import sys; from probllm.cli import app; assert 'torch' not in sys.modules, 'torch imported at startup'"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "probllm", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "mcqify" in out.stdout and "ask" in out.stdout
