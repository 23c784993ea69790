"""Commands of the train family (see probllm/train)."""

from probllm.cli.app import app  # noqa: F401
