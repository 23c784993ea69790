"""Commands of the llm family (see probllm/llm)."""

from probllm.cli.app import app  # noqa: F401
