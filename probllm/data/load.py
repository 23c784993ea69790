"""`load`: anything the `datasets` library reads, out as JSON records; plus header-less CSVs such as MMLU's.

- Hub names go through `datasets.load_dataset(name, config, split=..., streaming=...)`. Without `--split`,
  every split is written, each record tagged with `split`.
- Local csv/parquet files go through the same library with `streaming=True`: records come out as they are
  read, without an Arrow cache on disk. Local json/jsonl files go through probllm's own reader (the same
  records, but bad lines are named by file:line, which block-wise Arrow parsing cannot do).
- Header-less CSVs (the original MMLU files: question, A, B, C, D, answer) are read with the standard `csv`
  module, one row at a time (RFC 4180 quoting: commas and newlines inside quoted fields), with `--columns` or
  `--format mmlu-csv`; the subject comes from the file name (`anatomy_dev.csv` -> anatomy).

Values that JSON cannot hold (dates, bytes, images) are written as strings.
"""

from __future__ import annotations

import base64
import csv
import itertools
import datetime
import gzip
import io as _io
import os
from pathlib import Path
from typing import Any, Iterator

from probllm.data.mcq import subject_from_filename
from probllm.io import GLOB_CHARS, JSON_SUFFIXES, STDIN, Record, RecordError, Stats, UsageError, expand_paths, read_records

MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")
CSV_SUFFIXES = (".csv", ".csv.gz")
FORMATS = ("auto", "json", "csv", "parquet", "mmlu-csv")
_BUILDERS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet",
             ".tsv": "csv"}


class LoadError(Exception):
    """The datasets library could not open a source (offline, unknown name or config): exit 1, one line."""


def _builder_for(path: str) -> str | None:
    name = path.lower().removesuffix(".gz")
    return next((b for ext, b in _BUILDERS.items() if name.endswith(ext)), None)


def local_files(source: str, fmt: str) -> list[str] | None:
    """The local files a SOURCE names (`-`, a file, a folder, `~`, a glob), or None when it is not local (a hub
    name). Expansion is io.expand_paths, the same as every other command's."""
    if source == STDIN:
        return [STDIN]
    plain = source.removesuffix(".gz")
    looks_local = (os.path.exists(os.path.expanduser(source)) or any(ch in source for ch in GLOB_CHARS)
                   or source.startswith((".", "/", "~")) or os.path.splitext(plain)[1] in _BUILDERS)
    if not looks_local:
        return None
    wanted = {"mmlu-csv": "csv"}.get(fmt, fmt)
    suffixes = tuple(ext + gz for ext, builder in _BUILDERS.items() for gz in ("", ".gz")
                     if wanted == "auto" or builder == wanted)
    return list(expand_paths([source], suffixes))


def to_json_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return to_json_value(value.tolist())
    return str(value)


def read_headerless_csv(path: str, columns: list[str], stats: Stats, add_subject: bool,
                        skip_invalid: bool = False) -> Iterator[Record]:
    """Rows of a header-less CSV as records named by `columns`, streamed (one row in memory)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        fh = opener(path, "rt", encoding="utf-8-sig", errors="strict", newline="")
    except OSError as e:
        raise UsageError(f"{path}: {e}")
    subject = subject_from_filename(path)
    with fh:
        reader = csv.reader(fh)
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise RecordError("not UTF-8 text (is this a binary file?)", source=path, line=line)
            except csv.Error as e:
                raise RecordError(f"invalid CSV ({e})", source=path, line=line)
            if not row or all(not c.strip() for c in row):
                continue
            stats.read += 1
            if any("\x00" in c for c in row):
                raise RecordError("not UTF-8 text (is this a binary file?)", source=path, line=line)
            if len(row) != len(columns):
                stats.reject(RecordError(f"expected {len(columns)} columns ({','.join(columns)}), got {len(row)}",
                                         source=path, line=line), skip_invalid=skip_invalid)
                continue
            rec = Record(zip(columns, row), source=path, line=line)
            if add_subject and "subject" not in rec:
                rec["subject"] = subject
            yield rec


def load_records(sources: str | list[str], stats: Stats, *, fmt: str = "auto", config: str | None = None,
                 split: str | None = None, streaming: bool = False, columns: list[str] | None = None,
                 data_dir: str | None = None, limit: int | None = None,
                 skip_invalid: bool = False) -> Iterator[dict]:
    """Records of every SOURCE in turn (hub name, file, folder, glob or `-`), at most `limit` in all; bad rows
    stop the run or, with `skip_invalid`, are counted; sources without records are an error."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    for source in sources:  # every local source checked before the first record is read
        local_files(source, fmt)
    records = itertools.chain.from_iterable(
        _load(source, stats, fmt, config, split, streaming, columns, data_dir, skip_invalid) for source in sources)
    n = 0
    for rec in itertools.islice(records, limit):
        n += 1
        yield rec
    if n == 0 and stats.read == 0:
        raise RecordError("no input records (empty input)", source=", ".join(sources))


def _load(source: str, stats: Stats, fmt: str, config: str | None, split: str | None, streaming: bool,
          columns: list[str] | None, data_dir: str | None, skip_invalid: bool) -> Iterator[dict]:
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}")
    if fmt == "mmlu-csv" and not columns:
        columns = list(MMLU_COLUMNS)
    files = local_files(source, fmt)
    if columns:
        if files is None:
            raise UsageError("--columns / --format mmlu-csv need local CSV files")
        for path in files:
            yield from read_headerless_csv(path, columns, stats, add_subject=fmt == "mmlu-csv",
                                           skip_invalid=skip_invalid)
        return
    if files is not None and fmt in ("auto", "json") and all(f == STDIN or _builder_for(f) == "json" for f in files):
        # Local JSON/JSONL: probllm's own reader streams the same records and names file:line on bad input,
        # which the datasets library (block-wise Arrow parsing) cannot.
        yield from read_records(files, stats, skip_invalid)
        return
    if files is not None:
        if STDIN in files:
            raise UsageError("stdin holds JSON records only; name csv/parquet files")
        for f in files:
            if os.path.getsize(f) == 0:
                raise RecordError("no input records (empty input)", source=f)
    import datasets  # heavy: imported only when this path runs

    try:
        if files is not None:
            builders = {_builder_for(f) for f in files} if fmt == "auto" else {fmt}
            if None in builders or len(builders) != 1:
                raise UsageError(f"{source}: cannot tell one format for these files; pass --format")
            builder = builders.pop()
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
            splits = [(None, ds)]
        else:
            ds = datasets.load_dataset(source, config, split=split, streaming=streaming, data_dir=data_dir)
            splits = list(ds.items()) if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)) \
                else [(None, ds)]
    except UsageError:
        raise
    except Exception as e:  # offline, unknown dataset or config, bad data_files: the library's message, one line
        raise LoadError(f"cannot load {source}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
    try:
        for split_name, part in splits:
            for row in part:
                stats.read += 1
                rec = to_json_value(dict(row))
                if split_name is not None:
                    rec.setdefault("split", split_name)
                yield rec
    except (ValueError, TypeError, _io.UnsupportedOperation, UnicodeDecodeError) as e:
        # pyarrow/json parse errors surface as ValueError subclasses with the file in the message
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecordError(f"cannot read: {msg[:200]}", source=source)
    except Exception as e:  # pyarrow.lib.ArrowInvalid and friends: bad data, not a bug of ours
        if type(e).__module__.startswith(("pyarrow", "datasets")):
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RecordError(f"cannot read: {msg[:200]}", source=source)
        raise


def _csv_files(path: str) -> list[str] | None:
    """The CSV files a path argument names for MMLU input (a .csv file, a folder or glob of them), else None."""
    if path == STDIN:
        return None
    files = list(expand_paths([path], JSON_SUFFIXES + CSV_SUFFIXES))
    csvs = [f for f in files if f.lower().endswith(CSV_SUFFIXES)]
    if csvs and len(csvs) != len(files):
        raise UsageError(f"{path}: holds both CSV and JSON files; name them separately")
    return csvs or None


def read_inputs(paths: list[str] | None, stats: Stats, skip_invalid: bool = False) -> Iterator[Record]:
    """Like io.read_records, but header-less MMLU CSV files (or folders of them) are read directly too, so
    `mcqify --source mmlu data/dev/` works without a `load` step."""

    paths = list(paths or [])
    csv_files = {p: _csv_files(p) for p in paths}
    if not any(csv_files.values()):
        yield from read_records(paths, stats, skip_invalid)
        return
    before = stats.read
    for p in paths:
        csvs = csv_files[p]
        if csvs is None:
            yield from read_records([p], stats, skip_invalid, allow_empty=True)
            continue
        for f in csvs:
            yield from read_headerless_csv(f, list(MMLU_COLUMNS), stats, add_subject=True,
                                           skip_invalid=skip_invalid)
    if stats.read == before:
        raise RecordError("no input records (empty input)", source=", ".join(paths))
