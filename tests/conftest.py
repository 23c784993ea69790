"""Shared fixtures: a tiny model built once per session, the public example slices, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer Llama with a 512-token BPE tokenizer and a ChatML template, saved as safetensors."""
    from tiny_model import build_tiny_model  # tests/tiny_model.py: test-only code stays out of the package

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def notes_index(tmp_path_factory) -> str:
    """An index of the example course notes (examples/notes), built once; tests only read it."""
    from probllm.rag.index import build_index

    out = tmp_path_factory.mktemp("notes") / "notes.idx"
    build_index([str(ROOT / "examples" / "notes")], str(out))
    return str(out)


@pytest.fixture(scope="session")
def shared_examples() -> Path:
    """../shared/examples (real public data slices) when present; tests that need it skip otherwise."""
    candidates = [os.environ.get("PROBLLM_SHARED_EXAMPLES", ""), ROOT.parent / "shared" / "examples"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    pytest.skip("../shared/examples is not present")


def read_jsonl_text(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Run:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    @property
    def records(self) -> list[dict]:
        return read_jsonl_text(self.stdout)


@pytest.fixture
def cli():
    """Run `probllm ARGS` as a real subprocess (the pipe contract: stdin not a terminal, stdout only records)."""

    def run(*args: str, input: str | bytes | None = None, env: dict | None = None, timeout: float = 600) -> Run:
        data = input.encode() if isinstance(input, str) else input
        proc = subprocess.run(
            [sys.executable, "-m", "probllm", *map(str, args)],
            input=data if data is not None else b"",
            capture_output=True,
            env={**os.environ, **(env or {})},
            timeout=timeout,
            cwd=str(ROOT),
        )
        return Run(subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                               proc.stderr.decode()))

    return run
