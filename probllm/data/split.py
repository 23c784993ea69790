"""Deterministic train/test split by a hash of (seed, key), one record at a time.

A record goes to `test` when sha256(seed, key value) read as a number in [0, 1) is below the test fraction.
The decision depends on nothing but the record's key, so two runs (`--part train`, `--part test`) give
complementary, disjoint parts, every pair of the same question lands on the same side, and it streams.
"""

from __future__ import annotations

import hashlib
import json

from probllm.io import RecordError, Skip, UsageError

DEFAULT_KEYS = ("prompt", "question", "question_complete", "problem", "id")


def key_value(record: dict, key: str | None) -> str:
    if key is None:
        key = next((k for k in DEFAULT_KEYS if k in record), None)
        if key is None:
            raise RecordError(f"missing (no {', '.join(DEFAULT_KEYS)}; pass --key)", field="prompt")
    value: object = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise RecordError("missing", field=key)
        value = value[part]
    if value is None:
        raise RecordError("is null", field=key)
    # Conversational prompts (message lists) and other structures hash by their canonical JSON.
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def hash_share(value: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00{value}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Splitter:
    def __init__(self, test_fraction: float, part: str, seed: int = 0, key: str | None = None):
        if not 0.0 <= test_fraction <= 1.0:
            raise UsageError(f"--test-fraction must be in [0, 1], got {test_fraction}")
        if part not in ("train", "test"):
            raise UsageError(f"--part must be train or test, got {part!r}")
        self.fraction, self.part, self.seed, self.key = test_fraction, part, seed, key

    def side(self, record: dict) -> str:
        return "test" if hash_share(key_value(record, self.key), self.seed) < self.fraction else "train"

    def __call__(self, record: dict) -> dict:
        side = self.side(record)
        if side != self.part:
            raise Skip(f"in the {side} part")
        return record
