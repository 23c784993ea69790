"""`eval -o FILE`: predictions appended as they are scored, a rerun resumes, the finished file in input order.

A prediction is known by its record's `id` (else a hash of its question and choices) and by which occurrence of
that key it is in the input, so duplicated items (the official MMLU test set has some) are each kept once.
A last line cut short by a kill is dropped (its item is scored again). Every prediction carries its
`provenance` (model identity and scoring settings); a file written by another model or other settings is not
resumed (probllm/provenance.py). When a run completes, a file that was
resumed is rewritten (atomically) in input order, so an interruption leaves no trace in the final file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from typing import Iterable, Iterator

from probllm.io import Record, Stats, read_complete, write_jsonl


def record_key(rec: dict) -> str:
    if "id" in rec:
        return json.dumps(rec["id"], sort_keys=True, ensure_ascii=False)
    text = json.dumps([rec.get("question"), rec.get("choices")], sort_keys=True, ensure_ascii=False)
    return "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()


def item_key(rec: dict, seen: Counter) -> str:
    """The name of a scored item in a summary's `item_correct`: its `record_key`, plus `#n` for the n-th
    repeat of that key in the input (counted in `seen`), so duplicated items stay apart."""
    k = rec["id"] if isinstance(rec.get("id"), str) else record_key(rec)  # a string id as it is: readable
    n = seen[k]
    seen[k] += 1
    return k if n == 0 else f"{k}#{n}"


def occurrence_keys(records: Iterable[dict]) -> Iterator[tuple[str, int]]:
    """(key, n): the n-th record with this key (0-based), in the order given."""
    seen: Counter = Counter()
    for rec in records:
        k = record_key(rec)
        yield k, seen[k]
        seen[k] += 1


class ResumableOutput:
    """The `-o FILE` of eval: what is there is skipped, what is scored is appended and flushed at once."""

    def __init__(self, path: str, done: set | None = None):
        """`done`: the keys already written, when another process has read the file (then this one only skips)."""
        self.path = str(path)
        self.done = set(occurrence_keys(read_complete(self.path))) if done is None else done
        self.resumed = bool(self.done)
        self.input_order: list[tuple[str, int]] = []
        self._fh = None

    def existing(self) -> list[dict]:
        return read_complete(self.path)

    def refusal(self, provenance: dict, force: bool) -> str | None:
        """Why this file may not be resumed by a run that writes `provenance` (None: it may)."""
        from probllm.provenance import check_resume

        return check_resume(self.path, self.existing(), provenance, force, "eval") if self.resumed else None

    def skip_done(self, records: Iterable[Record], stats: Stats) -> Iterator[Record]:
        seen: Counter = Counter()
        for rec in records:
            k = record_key(rec)
            key = (k, seen[k])
            seen[k] += 1
            self.input_order.append(key)
            if key in self.done:
                stats.skip("already in --output")
                continue
            yield rec

    def append(self, records: Iterable[dict], stats: Stats) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                fh.flush()
                stats.written += 1

    def finish(self) -> None:
        """After a complete run: a resumed file is put back in input order (records not from this input last)."""
        if not self.resumed:
            return
        records = read_complete(self.path)
        by_key = dict(zip(occurrence_keys(records), records))
        ordered = [by_key.pop(k) for k in self.input_order if k in by_key]
        desired = ordered + list(by_key.values())
        if desired != records:
            write_jsonl(self.path, desired)
