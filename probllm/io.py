"""The one place where records come in and go out.

Every command reads JSON records from stdin or files and writes JSON records to stdout. This module owns the
format rules (JSONL, gzip, JSON arrays, folders of JSON files), the error contract (file, line and field in one
line, a distinct exit code) and the counts that every command prints on stderr.

Command functions stay pure: they take and yield plain dicts and raise `RecordError` for bad data (without a
location: `map_records` adds the location of the record being processed) or `Skip` for records they drop on
purpose. Nothing here keeps more than one record in memory, except for `.json` array files, which JSON itself
does not let us stream.
"""

from __future__ import annotations

import gzip
import io as _io
import json
import os
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

# Exit codes, after sysexits.h where one fits: scripts can tell bad data from bad options from crashes.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATAERR = 65
EXIT_INTERRUPTED = 130

STDIN = "-"
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")


class Record(dict):
    """A JSON object that remembers where it came from (for error messages); serialises as a plain dict."""

    __slots__ = ("source", "line")

    def __init__(self, *args: Any, source: str = "<input>", line: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = source
        self.line = line


class UsageError(Exception):
    """A problem with options or arguments, reported as one line with exit code 2."""


class RecordError(Exception):
    """Bad input data: one line naming file, line and field; exit code 65 unless `--skip-invalid`."""

    def __init__(self, reason: str, field: str | None = None, source: str | None = None, line: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.source = source
        self.line = line

    def locate(self, record: Any) -> "RecordError":
        if self.source is None and isinstance(record, Record):
            self.source, self.line = record.source, record.line
        return self

    @property
    def kind(self) -> str:
        """A short, stable description used as the skip reason in counts (details in parentheses dropped, so
        counts group)."""
        reason = self.reason.split(" (")[0]
        return f"{self.field}: {reason}" if self.field else reason

    def __str__(self) -> str:
        where = self.source or "<input>"
        if self.line:
            where += f":{self.line}"
        what = f" field '{self.field}':" if self.field else ""
        return f"{where}:{what} {self.reason}"


class Skip(Exception):
    """A record dropped on purpose by a rule (e.g. 'both answers wrong'): counted by reason, never an error."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Stats:
    """Counts that every command reports on stderr: records in, out, and skipped by reason."""

    command: str = "probllm"
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    invalid: Counter = field(default_factory=Counter)
    notes: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # what a command measured, for its --summary file (not stderr)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def reject(self, error: "RecordError", record: Any = None, skip_invalid: bool = False) -> None:
        """The one policy for a bad record: locate the error on its record, then raise it, or with
        `--skip-invalid` count it by kind and report it on stderr so nothing is dropped silently."""
        error.locate(record)
        if not skip_invalid:
            raise error
        self.invalid[error.kind] += 1
        log(f"{self.command}: skipped {error}")

    def summary(self) -> str:
        parts = [f"{self.read} in", f"{self.written} out"]
        n_skip = sum(self.skipped.values())
        if n_skip:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.skipped.most_common())
            parts.append(f"{n_skip} skipped ({reasons})")
        n_bad = sum(self.invalid.values())
        if n_bad:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.invalid.most_common())
            parts.append(f"{n_bad} invalid ({reasons})")
        for k, v in self.notes.items():
            parts.append(f"{k}: {v}")
        return f"{self.command}: " + ", ".join(parts)

    def as_dict(self) -> dict:
        return {
            "command": self.command,
            "in": self.read,
            "out": self.written,
            "skipped": dict(self.skipped),
            "invalid": dict(self.invalid),
            **self.notes,
        }


def log(message: str) -> None:
    """Everything that is not a record goes to stderr."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------- input


def _open_text(path: str) -> TextIO:
    if path == STDIN:
        # Read stdin as bytes and decode ourselves so that a binary stream gives our error, not a traceback.
        return _io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="strict", newline="\n")
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="strict", newline="\n")
    return open(path, encoding="utf-8", errors="strict", newline="\n")


def expand_paths(paths: Iterable[str]) -> Iterator[str]:
    """Files as given; folders expand (recursively, sorted) to the JSON and JSONL files inside them."""
    for p in paths:
        if p != STDIN and os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).rglob("*") if f.is_file() and str(f).endswith(JSON_SUFFIXES))
            if not found:
                raise UsageError(f"{p}: folder holds no .json or .jsonl files")
            yield from found
        else:
            yield p


def _iter_lines(path: str) -> Iterator[tuple[int, str]]:
    fh = _open_text(path)
    lineno = 0
    try:
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError:
                raise RecordError("not UTF-8 text (is this a binary file?)", source=path, line=lineno + 1)
            except (EOFError, gzip.BadGzipFile, OSError) as e:
                raise RecordError(f"cannot read ({e})", source=path, line=lineno + 1)
            if not line:
                return
            lineno += 1
            if "\x00" in line:
                raise RecordError("not UTF-8 text (is this a binary file?)", source=path, line=lineno)
            yield lineno, line
    finally:
        if path == STDIN:
            fh.detach()  # never close the process's stdin: only our text wrapper around it
        else:
            fh.close()


def _parse(text: str, path: str, lineno: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON ({e.msg} at column {e.colno})", source=path, line=lineno)


def _records_from(path: str) -> Iterator[Record | RecordError]:
    """Records of one file; a bad line is yielded as a RecordError (so reading can go on past it with
    --skip-invalid), while an unreadable file raises."""
    lines = _iter_lines(path)
    if is_json_doc_path(path):
        # A .json file is one document: an object (one record, e.g. a MATH problem) or an array of records
        # (e.g. LLaMA-Factory data). JSON arrays cannot be streamed without a streaming parser; they are small
        # in practice, so read them whole.
        text = "".join(line for _, line in lines)
        if not text.strip():
            return
        try:
            doc = _parse(text, path, 1)
        except RecordError as e:
            yield e
            return
        items = doc if isinstance(doc, list) else [doc]
        for i, item in enumerate(items, 1):
            where = i if isinstance(doc, list) else 1
            if isinstance(item, dict):
                yield Record(item, source=path, line=where)
            else:
                yield RecordError(f"expected a JSON object, got {_type_name(item)}", source=path, line=where)
        return
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            obj = _parse(line, path, lineno)
        except RecordError as e:
            yield e
            continue
        if isinstance(obj, dict):
            yield Record(obj, source=path, line=lineno)
        else:
            yield RecordError(f"expected a JSON object, got {_type_name(obj)}", source=path, line=lineno)


def is_json_doc_path(path: str) -> bool:
    return path.endswith((".json", ".json.gz"))


def read_records(
    paths: Iterable[str] | None = None,
    stats: Stats | None = None,
    skip_invalid: bool = False,
    allow_empty: bool = False,
) -> Iterator[Record]:
    """Stream records from files (JSONL, .gz, .json, folders) or stdin ('-' or no paths).

    Malformed lines raise RecordError, or with `skip_invalid` are counted and skipped. Empty input is an error
    unless `allow_empty`: in a pipeline it almost always means the step before failed.
    """
    paths = list(paths or []) or [STDIN]
    if paths == [STDIN] and sys.stdin is not None and sys.stdin.isatty():
        raise UsageError("no input: pipe JSONL records into this command or name input files")
    stats = stats if stats is not None else Stats()
    lines_seen = 0
    for path in expand_paths(paths):
        source = "<stdin>" if path == STDIN else path
        try:
            for item in _records_from(path):
                lines_seen += 1
                stats.read += 1
                if isinstance(item, RecordError):
                    item.source = source
                    stats.reject(item, skip_invalid=skip_invalid)
                    continue
                item.source = source
                yield item
        except RecordError as e:
            if e.source in (None, STDIN):
                e.source = source
            raise
    if lines_seen == 0 and not allow_empty:
        names = ", ".join("<stdin>" if p == STDIN else p for p in paths)
        raise RecordError("no input records (empty input)", source=names)


# ---------------------------------------------------------------------------------------------------- processing


def map_records(
    records: Iterable[Record],
    fn: Callable[[Record], Iterable[dict] | dict | None],
    stats: Stats,
    skip_invalid: bool = False,
) -> Iterator[dict]:
    """Apply a per-record function that returns a record, several, or None; count skips and invalid records."""
    for rec in records:
        try:
            out = fn(rec)
            if out is None:
                continue
            if isinstance(out, dict):
                yield out
            else:
                # Materialise so that a RecordError raised half-way leaves no partial output for this record.
                yield from list(out)
        except Skip as s:
            stats.skip(s.reason)
        except RecordError as e:
            stats.reject(e, rec, skip_invalid)


def write_records(records: Iterable[dict], stats: Stats | None = None, out: TextIO | None = None) -> int:
    """Write records as JSONL to stdout (or `out`), one per line, flushing per line only for a terminal."""
    out = out or sys.stdout
    interactive = out.isatty() if hasattr(out, "isatty") else False
    n = 0
    for rec in records:
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if interactive:
            out.flush()
        n += 1
        if stats is not None:
            stats.written += 1
    out.flush()
    return n


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records to a file atomically (temp file, then rename): readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- validation


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


_EXPECT = {str: "a string", int: "an integer", float: "a number", list: "an array", dict: "an object",
           bool: "a boolean"}


def require(record: dict, name: str, kind: type | tuple[type, ...] = str, *, allow_empty: bool = False) -> Any:
    """Return record[name] if present and of the right type, else raise RecordError naming the field.

    `name` may be a dotted path (`question.stem`)."""
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise RecordError("missing", field=name)
        value = value[part]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and int not in kinds:
        kinds = kinds + (int,)
    if value is None or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(_EXPECT.get(k, k.__name__) for k in kinds if not (k is int and float in kinds))
        raise RecordError(f"expected {expected}, got {_type_name(value)}", field=name)
    if not allow_empty and isinstance(value, (str, list)) and len(value) == 0:
        raise RecordError("is empty", field=name)
    return value


def first_present(record: dict, names: Iterable[str]) -> str | None:
    """The first of several accepted field names present in a record (e.g. 'question' or 'message_1')."""
    for n in names:
        if n in record:
            return n
    return None


# ---------------------------------------------------------------------------------------------------- progress


@contextmanager
def progress(description: str, total: int | None = None):
    """A rich progress bar on stderr when stderr is a terminal; a no-op advance function in pipes and CI."""
    if not sys.stderr.isatty():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
