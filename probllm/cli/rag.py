"""Commands of the rag family (see probllm/rag)."""

from probllm.cli.app import app  # noqa: F401
