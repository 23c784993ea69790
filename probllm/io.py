"""The one place where records come in and go out.

Every command reads JSON records from stdin or files and writes JSON records to stdout. This module owns the
format rules (JSONL, gzip, JSON arrays, folders of JSON files), the error contract (file, line and field in one
line, a distinct exit code) and the counts that every command prints on stderr.

Lines are parsed by `jsonlines` (the library the project asked for): it is handed our own line iterator, so
decoding errors, gzip and BOM handling and the `file:line:field` locations stay ours while it does the JSON.
`expand_paths` is the one place where path arguments become files, for every command.

Command functions stay pure: they take and yield plain dicts and raise `RecordError` for bad data (without a
location: `map_records` adds the location of the record being processed) or `Skip` for records they drop on
purpose. Nothing here keeps more than one record in memory, except for `.json` array files, which JSON itself
does not let us stream.
"""

from __future__ import annotations

import glob as globlib
import gzip
import io as _io
import itertools
import json
import os
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

import jsonlines

# Exit codes, after sysexits.h where one fits: scripts can tell bad data from bad options from crashes.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATAERR = 65
EXIT_INTERRUPTED = 130

STDIN = "-"
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")
JSONL_ONLY_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")


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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the command kept (e.g. "the index keeps the last committed state"), said once."""


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

GLOB_CHARS = "*?["


def read_config(path: str | os.PathLike) -> dict:
    """A `--config` file, for every command that takes one: a YAML (or JSON) mapping of option names to values,
    names with dashes or underscores (returned with underscores). A file that cannot be read or is no mapping
    is a UsageError naming it."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand_paths(paths: Iterable[str], suffixes: tuple[str, ...] | None = JSON_SUFFIXES,
                 on_other: Callable[[str], None] | None = None, walk: bool = True) -> Iterator[str]:
    """The one place where path arguments become files, for every command.

    Each argument may be `-` (stdin, kept as is), a file, a folder (walked recursively in sorted order, hidden
    entries skipped, keeping files that end with one of `suffixes`, all of them when None; others are passed to
    `on_other` when given, e.g. to count them), `~/...`, or a glob, relative or absolute, `**` included (quoted,
    so the shell left it to us; an unquoted one arrives already expanded as several arguments). A file named
    explicitly is kept whatever its suffix (the caller decides). An argument that names nothing is a one-line
    usage error. With `walk=False`, folders are kept as they are (for commands that take folders, like `plot`)."""
    for arg in paths:
        if arg == STDIN:
            yield arg
            continue
        path = os.path.expanduser(arg)
        if os.path.exists(path):
            matches = [path]
        elif any(ch in path for ch in GLOB_CHARS):
            matches = sorted(globlib.glob(path, recursive=True))
            if not matches:
                raise UsageError(f"{arg}: no file matches")
        else:
            raise UsageError(f"{arg}: no such file or folder")
        for match in matches:
            if not walk or not os.path.isdir(match):
                yield match
                continue
            root = Path(match)
            found = []
            for f in sorted(root.rglob("*")):
                if not f.is_file() or _is_hidden(f, root):
                    continue
                if suffixes is None or f.name.lower().endswith(suffixes):
                    found.append(str(f))
                elif on_other is not None:
                    on_other(str(f))
            if not found and on_other is None:
                kinds = "/".join(s.lstrip(".") for s in suffixes) if suffixes else "readable"
                raise UsageError(f"{arg}: folder holds no {kinds} files")
            yield from found


GZIP_MAGIC = b"\x1f\x8b"


def _open_binary(path: str):
    """The raw bytes of a file or stdin, un-gzipped when the bytes say gzip (whatever the name): stdin and
    files accept the same things."""
    if path == STDIN:
        raw = sys.stdin.buffer
        if not hasattr(raw, "peek"):
            raw = _io.BufferedReader(raw)  # type: ignore[arg-type]
        head = raw.peek(2)[:2]
    else:
        raw = open(path, "rb")
        head = raw.read(2)
        raw.seek(0)
    if head == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def _iter_lines(path: str) -> Iterator[str]:
    """Decoded lines of a file or stdin (UTF-8; a leading BOM, as Excel and Notepad write, is dropped)."""
    binary, raw = _open_binary(path)
    # Decode ourselves so that a binary stream gives our error, not a traceback.
    fh = _io.TextIOWrapper(binary, encoding="utf-8-sig", errors="strict", newline="\n")
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
            yield line
    finally:
        if path == STDIN:
            fh.detach()  # never close the process's stdin: only our wrappers around it
        else:
            fh.close()
            raw.close()


def _parse(text: str, path: str, lineno: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON ({e.msg} at column {e.colno})", source=path, line=lineno)


def _json_document(text: str, path: str) -> Iterator[Record | RecordError]:
    """A whole JSON document: an object (one record, e.g. a MATH problem) or an array of records (e.g.
    LLaMA-Factory data). JSON arrays cannot be streamed without a streaming parser; they are small in practice,
    so they are read whole."""
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
            yield RecordError(f"expected a JSON object, got {type_name(item)}", source=path, line=where)


class _CountedLines:
    """Lines handed to `jsonlines` one at a time, counting them: after a read, `lineno` is the record's line."""

    def __init__(self, lines: Iterable[str]):
        self._lines = iter(lines)
        self.lineno = 0

    def __iter__(self) -> "_CountedLines":
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.lineno += 1
        return line


def _records_from(path: str) -> Iterator[Record | RecordError]:
    """Records of one file or stdin; a bad line is yielded as a RecordError (so reading can go on past it with
    --skip-invalid), while an unreadable file raises.

    A `.json` file is one document; so is any other input whose first non-blank character is `[` (a JSON
    array piped on stdin, say), detected from the bytes. Everything else is JSON Lines, read by `jsonlines`
    one line at a time."""
    lines = _iter_lines(path)
    if is_json_doc_path(path):
        yield from _json_document("".join(lines), path)
        return
    head: list[str] = []
    for line in lines:
        head.append(line)
        if line.strip():
            break
    if head and head[-1].lstrip().startswith("[") and not path.endswith(JSONL_ONLY_SUFFIXES):
        yield from _json_document("".join(itertools.chain(head, lines)), path)
        return
    counted = _CountedLines(itertools.chain(head, lines))
    reader = jsonlines.Reader(counted, loads=json.loads)
    while True:
        try:
            obj = reader.read(skip_empty=True, allow_none=True)
        except EOFError:
            return
        except jsonlines.InvalidLineError as e:
            cause = e.__cause__
            if isinstance(cause, json.JSONDecodeError):
                yield RecordError(f"invalid JSON ({cause.msg} at column {cause.colno})", source=path, line=e.lineno)
            else:
                yield RecordError(f"invalid JSON ({e})", source=path, line=e.lineno)
            continue
        if isinstance(obj, dict):
            yield Record(obj, source=path, line=counted.lineno)
        else:
            yield RecordError(f"expected a JSON object, got {type_name(obj)}", source=path, line=counted.lineno)


def is_json_doc_path(path: str) -> bool:
    return path.endswith((".json", ".json.gz"))


def read_records(
    paths: Iterable[str] | None = None,
    stats: Stats | None = None,
    skip_invalid: bool = False,
    allow_empty: bool = False,
    limit: int | None = None,
) -> Iterator[Record]:
    """Stream records from files (JSONL, .gz, .json, folders, globs) or stdin ('-' or no paths), at most `limit`
    of them (`--limit`: reading stops there, so the rest is never read).

    Malformed lines raise RecordError, or with `skip_invalid` are counted and skipped. Empty input is an error
    unless `allow_empty`: in a pipeline it almost always means the step before failed.
    """
    paths = list(paths or []) or [STDIN]
    if paths == [STDIN] and sys.stdin is not None and sys.stdin.isatty():
        raise UsageError("no input: pipe JSONL records into this command or name input files")
    stats = stats if stats is not None else Stats()
    lines_seen = 0
    yielded = 0
    for path in list(expand_paths(paths)):
        source = "<stdin>" if path == STDIN else path
        if limit is not None and yielded >= limit:
            break
        try:
            for item in _records_from(path):
                if limit is not None and yielded >= limit:
                    break
                lines_seen += 1
                stats.read += 1
                if isinstance(item, RecordError):
                    item.source = source
                    stats.reject(item, skip_invalid=skip_invalid)
                    continue
                item.source = source
                yielded += 1
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


def _dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)


def write_records(records: Iterable[dict], stats: Stats | None = None, out: TextIO | None = None) -> int:
    """Write records as JSONL to stdout (or `out`), one per line, flushing per line only for a terminal."""
    out = out or sys.stdout
    interactive = out.isatty() if hasattr(out, "isatty") else False
    writer = jsonlines.Writer(out, dumps=_dumps, flush=interactive)
    n = 0
    for rec in records:
        writer.write(rec)
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
        writer = jsonlines.Writer(fh, dumps=_dumps)
        for rec in records:
            writer.write(rec)
            n += 1
    os.replace(tmp, path)
    return n


def sha256_file(path: str | os.PathLike) -> str:
    """A file's content identity (read in 1 MB blocks: any size fits in memory)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- validation


def type_name(value: Any) -> str:
    """A JSON value's kind as error messages say it ("expected a string, got an array")."""
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
        raise RecordError(f"expected {expected}, got {type_name(value)}", field=name)
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


# ------------------------------------------------------------------------------- resumable output files


def read_complete(path: str) -> list[dict]:
    """The records of an output file; a last line cut short (no newline, or not JSON) is cut off the file."""
    if not os.path.exists(path):
        return []
    records: list[dict] = []
    good_end = 0
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except ValueError:
                break
            good_end += len(line)
            if isinstance(rec, dict):
                records.append(rec)
    if good_end < os.path.getsize(path):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return records
