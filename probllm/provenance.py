"""What produced a record, carried in the record, and the check that a resume never mixes two producers.

`eval -o` and `ask -o` write each record with a `provenance` field: the model's identity
(`probllm.models.ModelIdentity`: `model` for people, `model_id` the content hash or endpoint that decides) and
the settings that change the output (method, template, shots, dtype, generation length, index generation...).
A rerun into the same file resumes only when every record there has the provenance this run would write; else
it stops with one line naming the first difference. `--force-resume` resumes anyway, knowingly (said on stderr).
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

from probllm.io import UsageError, log

FIELD = "provenance"
FORCE_OPTION = "--force-resume"


def stamp(records: Iterable[dict], provenance: dict) -> Iterator[dict]:
    """The records with `provenance` set (an input's own `provenance` is replaced: it is not this output's)."""
    for rec in records:
        yield {**rec, FIELD: provenance}


def _show(value) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True) if not isinstance(value, str) else value


def difference(recorded: dict | None, current: dict) -> str | None:
    """The first way `recorded` differs from `current`, in words; None when they are the same.

    `model` (a name) is not compared: the same weights under another path are the same model, and `model_id`
    says so; it is shown next to the id when the ids differ."""
    if not isinstance(recorded, dict):
        return "its records carry no provenance (written by an older probllm, or by something else)"
    # In the order this run states them (model first, then what it reads, then settings).
    for key in [*current, *(k for k in recorded if k not in current)]:
        if key == "model":
            continue
        old, new = recorded.get(key), current.get(key)
        if old == new:
            continue
        if key == "model_id":
            return (f"model {recorded.get('model')} ({_show(old)}) there, {current.get('model')} ({_show(new)}) "
                    "in this run")
        return f"{key} {_show(old)} there, {_show(new)} in this run"
    return None


def check_resume(path: str, records: Iterable[dict], current: dict, force: bool, command: str) -> str | None:
    """None when the records of `path` may be resumed by a run with provenance `current`; else the one-line
    refusal (the caller raises it: with several processes, every one of them must stop). With `force`, a
    difference is only reported on stderr."""
    seen: set[str] = set()
    for rec in records:
        recorded = rec.get(FIELD)
        key = json.dumps(recorded, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        diff = difference(recorded, current)
        if diff is None:
            continue
        if force:
            log(f"probllm {command}: warning: {path}: {diff}; resuming anyway ({FORCE_OPTION})")
            return None
        return (f"{path}: not resuming: {diff}. Write to another file, or pass {FORCE_OPTION} to resume it "
                "anyway")
    return None


def refuse_mixed_resume(path: str, records: Iterable[dict], current: dict, force: bool, command: str) -> None:
    """`check_resume`, raised as the usage error it is."""
    refusal = check_resume(path, records, current, force, command)
    if refusal:
        raise UsageError(refusal)
