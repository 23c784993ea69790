"""Commands of the evaluate family (see probllm/evaluate)."""

from probllm.cli.app import app  # noqa: F401
