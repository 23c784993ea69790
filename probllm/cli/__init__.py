"""`probllm` command line: importing the family modules registers their commands on the one Typer app."""

from probllm.cli import chat, data, evaluate, export, feedback, llm, rag, serve, train  # noqa: F401  (registration by import)
from probllm.cli.app import app


def main() -> None:
    app(prog_name="probllm")
