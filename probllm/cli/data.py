"""Commands of the data family (see probllm/data)."""

from probllm.cli.app import app  # noqa: F401
