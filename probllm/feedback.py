"""Students' feedback from the chat page: the store (SQLite) and its export as training records.

`probllm serve --feedback FILE.sqlite` records two kinds of vote (routes in probllm/serve/feedback.py):
- a **rating**: thumbs up or down on one answer, with an optional comment;
- a **comparison** (`--compare`): two answers to one question shown side by side, unlabelled; the student picks
  the better one overall (or a tie, or neither), and marks the four criteria of the report (correctness,
  relevance, clarity, completeness) per answer.

Each vote keeps the conversation it answers, the answer(s), their sources, the model that wrote each (the
`model` field of its response, plus the generation settings the page sent), a pseudonymous session id (a random
id the page keeps in localStorage: no names, no IPs are stored) and UTC timestamps.

Durability: WAL mode, `synchronous=FULL`, one transaction per vote; a vote is committed before the server
answers 200, so a server killed with SIGKILL right after has lost nothing. Every vote carries a `vote_id` the page
makes: sending it again (a retry, a changed mind, a comment added later) replaces the earlier version, which then
moves to the end (a new row id), so `--since` exports it again; `feedback_id` names it across exports.

Criteria values follow the student-annotated format (probllm/data/annotated.py): `A`, `B`, `AB` (both) or `None`
(neither); `A` is the answer shown on the left. `export` writes what `pair-annotated` reads (a tie overall is
`AB`, both bad is `None`, and its rules drop them), and the ratings as TRL's unpaired preference records for KTO
(`prompt`, `completion`, `label`).
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from probllm.io import Stats, UsageError

SCHEMA_VERSION = 1
CRITERIA = ("correctness", "relevance", "clarity", "completeness")
VERDICTS = ("A", "B", "AB", "None")  # the annotated format's values: A, B, both, neither

# What every vote has: its row (the order `--since` follows), the page's vote id, the pseudonymous session, when
# it was first cast and last changed (UTC), and the conversation up to the question (JSON), then its own columns.
_VOTE = """
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vote_id TEXT NOT NULL UNIQUE,
    session TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    messages TEXT NOT NULL,"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ratings ({_VOTE}
    answer TEXT NOT NULL,
    model TEXT NOT NULL,
    settings TEXT NOT NULL,
    sources TEXT NOT NULL,
    rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
    comment TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS comparisons ({_VOTE}
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    settings_a TEXT NOT NULL,
    settings_b TEXT NOT NULL,
    sources_a TEXT NOT NULL,
    sources_b TEXT NOT NULL,
    overall TEXT NOT NULL CHECK (overall IN {VERDICTS}),
    {", ".join(f"{c} TEXT NOT NULL CHECK ({c} IN {VERDICTS})" for c in CRITERIA)},
    comment TEXT NOT NULL DEFAULT ''
);
"""

class VoteConflict(Exception):
    """A vote id that another session already used: refused rather than overwritten."""


def now() -> str:
    """UTC, ISO 8601 with microseconds: text that sorts in time order (what `--since` compares)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    else:
        conn = sqlite3.connect(str(path), timeout=10, isolation_level=None)  # transactions are ours: BEGIN
        conn.execute("PRAGMA journal_mode=WAL")  # readers (an export) never block the server's writes
        conn.execute("PRAGMA synchronous=FULL")  # a vote answered 200 is on disk, even across a power cut
    conn.row_factory = sqlite3.Row
    return conn


def _version(conn: sqlite3.Connection, path: str | Path) -> int:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise UsageError(f"{path} is not a probllm feedback file ({e})") from None
    if row is None:
        raise UsageError(f"{path} is not a probllm feedback file (no schema version)")
    version = int(row["value"])
    if version > SCHEMA_VERSION:
        raise UsageError(f"{path} has feedback schema {version}, newer than this probllm's {SCHEMA_VERSION}: "
                         "upgrade probllm")
    return version


class FeedbackStore:
    """The votes of one course, in one SQLite file. A connection per transaction: the server's worker threads
    share nothing, and SQLite's own locking (WAL, busy timeout) orders concurrent votes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise UsageError(f"--feedback {path}: is a folder; name a .sqlite file")
        if not self.path.parent.is_dir():
            raise UsageError(f"--feedback {path}: the folder {self.path.parent} does not exist")
        try:
            with self._transaction() as conn:
                exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
                if exists:
                    _version(conn, path)
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (now(),))
        except sqlite3.DatabaseError as e:
            raise UsageError(f"--feedback {path}: not a probllm feedback file ({e})") from None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = _connect(self.path)
        try:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock now: two votes never deadlock on an upgrade
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _put(self, table: str, vote: dict) -> dict:
        """Insert a vote, replacing an earlier version of the same vote id (which keeps its first `created`)."""
        stamp = now()
        with self._transaction() as conn:
            old = conn.execute(f"SELECT session, created FROM {table} WHERE vote_id = ?",
                               (vote["vote_id"],)).fetchone()
            if old is not None:
                if old["session"] != vote["session"]:
                    raise VoteConflict(f"vote {vote['vote_id']} belongs to another session")
                conn.execute(f"DELETE FROM {table} WHERE vote_id = ?", (vote["vote_id"],))
            row = {**vote, "created": old["created"] if old else stamp, "updated": stamp}
            columns = ", ".join(row)
            cursor = conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(row))})",
                                  tuple(row.values()))
            return {"id": cursor.lastrowid, "vote_id": vote["vote_id"], "created": row["created"],
                    "updated": stamp, "replaced": old is not None}

    def add_rating(self, *, vote_id: str, session: str, messages: list[dict], answer: str, model: str,
                   rating: int, comment: str = "", settings: dict | None = None,
                   sources: list | None = None) -> dict:
        if rating not in (-1, 1):
            raise ValueError("rating is 1 (up) or -1 (down)")
        return self._put("ratings", {
            "vote_id": vote_id, "session": session, "messages": _json(messages), "answer": answer, "model": model,
            "settings": _json(settings or {}), "sources": _json(sources or []), "rating": rating,
            "comment": comment or ""})

    def add_comparison(self, *, vote_id: str, session: str, messages: list[dict], answers: list[dict],
                       overall: str, criteria: dict, comment: str = "") -> dict:
        """`answers`: [A, B] as shown left and right, each {text, model, settings, sources}; `criteria`: one
        verdict (A, B, AB, None) for each of CRITERIA."""
        if len(answers) != 2:
            raise ValueError("a comparison has two answers")
        for verdict in (overall, *(criteria[c] for c in CRITERIA)):
            if verdict not in VERDICTS:
                raise ValueError(f"a verdict is one of {', '.join(VERDICTS)}, got {verdict!r}")
        a, b = answers
        return self._put("comparisons", {
            "vote_id": vote_id, "session": session, "messages": _json(messages),
            "answer_a": a["text"], "answer_b": b["text"], "model_a": a["model"], "model_b": b["model"],
            "settings_a": _json(a.get("settings") or {}), "settings_b": _json(b.get("settings") or {}),
            "sources_a": _json(a.get("sources") or []), "sources_b": _json(b.get("sources") or []),
            "overall": overall, **{c: criteria[c] for c in CRITERIA}, "comment": comment or ""})


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------------- export


def parse_since(since: str | None) -> tuple[str, object] | None:
    """`--since`: the id of the last row exported (an integer: rows after it) or a UTC time or date (ISO 8601,
    e.g. 2026-03-02 or 2026-03-02T12:00; rows cast or changed after it)."""
    if since is None or not since.strip():
        return None
    text = since.strip()
    if text.isdigit():
        return ("id", int(text))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {since!r}: give the last exported id (an integer) or an ISO time such as "
                         "2026-03-02T12:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return ("updated", moment.astimezone(timezone.utc).isoformat(timespec="microseconds"))


def _rows(path: str | Path, table: str, since: str | None, stats: Stats,
          limit: int | None = None) -> Iterator[sqlite3.Row]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such feedback file")
    where = parse_since(since)
    conn = _connect(path, readonly=True)
    try:
        _version(conn, path)
        query, args = f"SELECT * FROM {table}", ()
        if where is not None:
            query, args = query + f" WHERE {where[0]} > ?", (where[1],)
        query += " ORDER BY id"
        if limit is not None:
            query, args = query + " LIMIT ?", (*args, limit)
        last = None
        for row in conn.execute(query, args):
            stats.read += 1
            last = row["id"]
            yield row
        if last is not None:
            stats.notes["last id"] = f"{last} (next time: --since {last})"
        else:
            stats.notes["last id"] = "none after --since" if where else "none (no votes yet)"
    finally:
        conn.close()


def _provenance(row: sqlite3.Row) -> dict:
    return {"feedback_id": row["vote_id"], "feedback_row": row["id"], "session": row["session"],
            "created": row["created"], "updated": row["updated"]}


def comparison_record(row: sqlite3.Row) -> dict:
    """One comparison as a student-annotated record (what `pair-annotated` reads): `question_complete`, and
    `preference` with one comparison whose `ranking_criteria` are the student's verdicts. The conversation before
    the question, the models, their settings and sources ride along as extra fields (pairs keep them)."""
    messages = json.loads(row["messages"])
    criteria = {"overall": row["overall"], **{c: row[c] for c in CRITERIA}}
    if row["comment"]:
        criteria["other"] = row["comment"]
    return {
        "question_id": row["vote_id"],
        "question_complete": messages[-1]["content"],
        "preference": [{"A": row["answer_a"], "B": row["answer_b"], "ranking_criteria": criteria}],
        **_provenance(row),
        "history": messages[:-1],
        "models": {"A": row["model_a"], "B": row["model_b"]},
        "settings": {"A": json.loads(row["settings_a"]), "B": json.loads(row["settings_b"])},
        "sources": {"A": json.loads(row["sources_a"]), "B": json.loads(row["sources_b"])},
    }


def rating_record(row: sqlite3.Row) -> dict:
    """One thumbs up/down as TRL's unpaired preference record (KTO), conversational: `prompt` the messages up to
    the question, `completion` the answer, `label` true for up."""
    return {
        "prompt": json.loads(row["messages"]),
        "completion": [{"role": "assistant", "content": row["answer"]}],
        "label": row["rating"] == 1,
        **_provenance(row),
        "model": row["model"],
        "settings": json.loads(row["settings"]),
        "sources": json.loads(row["sources"]),
        **({"comment": row["comment"]} if row["comment"] else {}),
    }


EXPORTS = {"comparisons": comparison_record, "ratings": rating_record}


def export(path: str | Path, kind: str, stats: Stats, since: str | None = None,
           limit: int | None = None) -> Iterator[dict]:
    """The votes of one kind as records, oldest row first (after `since`); tallies go to `stats.notes`."""
    to_record = EXPORTS[kind]
    tally: dict[str, int] = {}
    for row in _rows(path, kind, since, stats, limit):
        if kind == "comparisons":
            label = {"AB": "ties (AB)", "None": "both bad (None)"}.get(row["overall"], "a winner")
        else:
            label = "thumbs up" if row["rating"] == 1 else "thumbs down"
        tally[label] = tally.get(label, 0) + 1
        yield to_record(row)
    stats.notes.update(tally)
