"""Stack Exchange answers to preference pairs with the report's pm_score rule (method.md section 1).

Two inputs, one rule:

- HuggingFaceH4/stack-exchange-preferences records (`qid`, `question`, `answers[{answer_id, text, pm_score,
  selected, ...}]`, `date`, `metadata[question URL, site URL, asker URL]`): one record in, at most one pair out,
  so it streams like every other command.
- A raw Stack Exchange dump, `Posts.xml` (rows with `PostTypeId` 1 = question, 2 = answer, `ParentId`, `Score`,
  `AcceptedAnswerId`, `Body`, `Title`). pm_score is computed as the dataset did:
  round(log2(1 + upvotes)), +1 if accepted, -1 if upvotes are negative.

The rule: chosen = the highest-scored answer, only if its score >= `chosen_min` (10); rejected = one answer with
`rejected_min` <= score <= `rejected_max` (3..5), picked with the run's seeded generator; questions without both
are counted and skipped.

Memory for Posts.xml. A dump is ordered by post Id, so a question comes before its answers, but an answer can come
years (millions of rows) later. Holding question bodies until their answers show up would grow with the dump.
Instead the dump is read twice, with a temporary SQLite file on disk holding the state between passes:

1. Pass 1 streams the rows (expat, one row at a time, nothing kept in memory) and stores only integers:
   questions (id, accepted answer id) and answers (id, parent id, score).
2. Selection walks answers grouped by question (an indexed SQL scan) and applies the rule, recording the picked
   (question, chosen, rejected) ids.
3. Pass 2 streams the rows again and copies to disk only the bodies of picked posts; the pairs are then emitted
   in question-id order by a join.

So memory is bounded by one XML row, SQLite's page cache (4 MB) and a 5,000-row insert batch whatever the
dump size; disk use is about 24 bytes per post plus the bodies of the picked posts. Reading from stdin spools to
a temporary file first, since two passes need a file.
"""

from __future__ import annotations

import gzip
import math
import os
import random
import shutil
import sqlite3
import tempfile
import xml.parsers.expat
from dataclasses import dataclass, field
from typing import Iterable, Iterator
from urllib.parse import urlparse

from probllm.data.markdown import html_to_markdown
from probllm.io import RecordError, Skip, Stats, UsageError, log, require

SOURCE = "stackexchange"
_BATCH = 5_000  # rows per SQLite insert: big enough to be fast, small enough to keep memory flat


@dataclass
class PairRule:
    chosen_min: int = 10
    rejected_min: int = 3
    rejected_max: int = 5
    sites: frozenset[str] = field(default_factory=frozenset)  # empty: every site
    markdown: bool = True

    def __post_init__(self) -> None:
        if self.rejected_min > self.rejected_max:
            raise UsageError(f"--rejected-min {self.rejected_min} is above --rejected-max {self.rejected_max}")


def pm_score(upvotes: int, accepted: bool) -> int:
    """The dataset's log-scaled score: round(log2(1 + upvotes)), +1 if accepted, -1 if upvotes are negative."""
    if upvotes < 0:
        base = -1
    else:
        base = int(math.floor(math.log2(1 + upvotes) + 0.5))  # round half up, not Python's banker's rounding
    return base + (1 if accepted else 0)


# ------------------------------------------------------------------------------------------------- sites


def site_of(metadata: Iterable) -> str:
    """The site host from the metadata URLs: the site URL (second) if there, else the question URL."""
    urls = [u for u in metadata if isinstance(u, str) and u.startswith(("http://", "https://"))]
    ordered = urls[1:2] + urls[:1] + urls[2:]
    for u in ordered:
        host = urlparse(u).netloc.lower()
        if host:
            return host.removeprefix("www.")
    return ""


def parse_sites(spec: str | None) -> frozenset[str]:
    return frozenset(s.strip().lower() for s in (spec or "").split(",") if s.strip())


def site_matches(host: str, wanted: frozenset[str]) -> bool:
    """`math` matches math.stackexchange.com, `stackoverflow` stackoverflow.com; full hosts match themselves."""
    if not wanted:
        return True
    short = host.removesuffix(".stackexchange.com").removesuffix(".com")
    return host in wanted or short in wanted


# ------------------------------------------------------------------------------------------------- the rule


def pick_pair(answers: list[tuple[int, object]], rule: PairRule, rng: random.Random) -> tuple[object, object]:
    """From (score, answer) tuples in input order, the (chosen, rejected) answers or Skip.

    Ties for the top score go to the first answer in input order; the rejected one is drawn among the answers
    in the rejected band (never the chosen one)."""
    if not answers:
        raise Skip("no answers")
    best_score, best = max(answers, key=lambda sa: sa[0])  # max keeps the first of equal scores
    if best_score < rule.chosen_min:
        raise Skip(f"best answer scored below {rule.chosen_min}")
    band = [a for s, a in answers if rule.rejected_min <= s <= rule.rejected_max and a is not best]
    if not band:
        raise Skip(f"no answer scored {rule.rejected_min}..{rule.rejected_max}")
    return best, rng.choice(band)


def _md(html: str, rule: PairRule) -> str:
    return html_to_markdown(html) if rule.markdown else html


def pair_from_hf(record: dict, rule: PairRule, rng: random.Random) -> dict:
    """One HuggingFaceH4/stack-exchange-preferences record to one pair (or Skip)."""
    question = require(record, "question", str)
    answers = require(record, "answers", list, allow_empty=True)
    metadata = record.get("metadata") or []
    if not isinstance(metadata, list):
        raise RecordError("expected an array of URLs", field="metadata")
    site = site_of(metadata)
    if not site_matches(site, rule.sites):
        raise Skip("site not selected")
    scored = []
    for i, ans in enumerate(answers):
        if not isinstance(ans, dict):
            raise RecordError("expected an object", field=f"answers[{i}]")
        score = require(ans, "pm_score", int)
        require(ans, "text", str, allow_empty=True)
        scored.append((score, ans))
    chosen, rejected = pick_pair(scored, rule, rng)
    kept = {k: v for k, v in record.items() if k not in ("question", "answers")}
    return {
        **kept,
        "prompt": _md(question, rule),
        "chosen": _md(chosen["text"], rule),
        "rejected": _md(rejected["text"], rule),
        "source": SOURCE,
        "site": site,
        "chosen_score": chosen["pm_score"],
        "rejected_score": rejected["pm_score"],
        "chosen_answer_id": chosen.get("answer_id"),
        "rejected_answer_id": rejected.get("answer_id"),
    }


# ------------------------------------------------------------------------------------------------- Posts.xml


def is_posts_xml(path: str) -> bool:
    return path.endswith((".xml", ".xml.gz"))


def default_site(path: str) -> str:
    """Dumps unpack to folders named after the site (math.stackexchange.com/Posts.xml)."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return parent.lower().removeprefix("www.") if "." in parent else ""


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_rows(path: str, chunk_size: int = 1 << 20) -> Iterator[tuple[int, dict]]:
    """(line, attributes) of each `<row>` of a Posts.xml, streamed with expat: one row in memory at a time."""
    rows: list[tuple[int, dict]] = []
    parser = xml.parsers.expat.ParserCreate()

    def start(name: str, attrs: dict) -> None:
        if name == "row":
            rows.append((parser.CurrentLineNumber, attrs))

    parser.StartElementHandler = start
    with _open_binary(path) as fh:
        while True:
            try:
                chunk = fh.read(chunk_size)
            except (OSError, EOFError) as e:
                raise RecordError(f"cannot read ({e})", source=path)
            try:
                parser.Parse(chunk, not chunk)
            except xml.parsers.expat.ExpatError as e:
                raise RecordError(f"invalid XML ({xml.parsers.expat.ErrorString(e.code)} at column {e.offset})",
                                  source=path, line=e.lineno)
            yield from rows
            rows.clear()
            if not chunk:
                return


def _int_attr(attrs: dict, name: str, path: str, line: int, required: bool = True) -> int | None:
    value = attrs.get(name)
    if value is None:
        if required:
            raise RecordError("missing", field=name, source=path, line=line)
        return None
    try:
        return int(value)
    except ValueError:
        raise RecordError(f"expected an integer, got {value[:20]!r}", field=name, source=path, line=line)


class _Posts:
    """The on-disk state between the two passes (see the module docstring)."""

    def __init__(self, folder: str):
        self.db = sqlite3.connect(os.path.join(folder, "posts.sqlite"))
        self.db.executescript("""
            PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
            PRAGMA cache_size = -4000; PRAGMA temp_store = FILE;
            CREATE TABLE question (id INTEGER PRIMARY KEY, accepted INTEGER);
            CREATE TABLE answer (parent INTEGER, id INTEGER, score INTEGER);
            CREATE TABLE pick (qid INTEGER PRIMARY KEY, chosen INTEGER, rejected INTEGER,
                               chosen_score INTEGER, rejected_score INTEGER);
            CREATE TABLE wanted (id INTEGER PRIMARY KEY);
            CREATE TABLE body (id INTEGER PRIMARY KEY, title TEXT, body TEXT, attrs TEXT);
        """)

    def close(self) -> None:
        self.db.close()


def pairs_from_posts_xml(path: str, rule: PairRule, rng: random.Random, stats: Stats, site: str | None = None,
                         skip_invalid: bool = False) -> Iterator[dict]:
    """Pairs from one Posts.xml (plain or .gz; '-' spools stdin to a temporary file)."""
    import json

    with tempfile.TemporaryDirectory(prefix="probllm-posts-") as tmp:
        if path == "-":
            import sys

            spooled = os.path.join(tmp, "Posts.xml")
            with open(spooled, "wb") as out:
                shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)
            name, path = "<stdin>", spooled
        else:
            if not os.path.exists(path):
                raise UsageError(f"{path}: no such file")
            name = path
        site = site if site is not None else default_site(name if name != "<stdin>" else "")
        if not site_matches(site, rule.sites):
            log(f"{stats.command}: {name}: site {site or '(unknown)'} not selected by --sites")
            return
        state = _Posts(tmp)
        db = state.db
        try:
            # Pass 1: integers only.
            n_rows = 0
            questions, answers = [], []
            for line, attrs in iter_rows(path):
                n_rows += 1
                try:
                    post_id = _int_attr(attrs, "Id", name, line)
                    kind = _int_attr(attrs, "PostTypeId", name, line)
                    if kind == 1:
                        questions.append((post_id, _int_attr(attrs, "AcceptedAnswerId", name, line, False)))
                    elif kind == 2:
                        answers.append((_int_attr(attrs, "ParentId", name, line), post_id,
                                        _int_attr(attrs, "Score", name, line)))
                except RecordError as e:
                    stats.reject(e, skip_invalid=skip_invalid)
                if len(answers) >= _BATCH or len(questions) >= _BATCH:
                    db.executemany("INSERT OR REPLACE INTO question VALUES (?, ?)", questions)
                    db.executemany("INSERT INTO answer VALUES (?, ?, ?)", answers)
                    questions.clear()
                    answers.clear()
            db.executemany("INSERT OR REPLACE INTO question VALUES (?, ?)", questions)
            db.executemany("INSERT INTO answer VALUES (?, ?, ?)", answers)
            if n_rows == 0:
                raise RecordError("no <row> elements (empty dump)", source=name)
            n_questions = db.execute("SELECT count(*) FROM question").fetchone()[0]
            stats.read += n_questions
            stats.notes["posts"] = stats.notes.get("posts", 0) + n_rows
            db.execute("CREATE INDEX answer_parent ON answer(parent, id)")

            # Selection: the rule on each question's answers, in question-id order (deterministic draws).
            orphans = db.execute(  # NOT EXISTS probes the primary key; NOT IN would build a temporary id set
                "SELECT count(*) FROM answer a WHERE NOT EXISTS (SELECT 1 FROM question q WHERE q.id = a.parent)")
            n_orphans = orphans.fetchone()[0]
            if n_orphans:
                stats.notes["answers without their question"] = n_orphans
            cursor = db.execute("""
                SELECT q.id, q.accepted, a.id, a.score FROM question q LEFT JOIN answer a ON a.parent = q.id
                ORDER BY q.id, a.id""")
            picks = []
            current, group = None, []

            def decide(qid: int, group: list) -> None:
                scored = [(pm_score(score, aid == accepted), (aid, score, accepted)) for aid, score, accepted
                          in group if aid is not None]
                try:
                    chosen, rejected = pick_pair(scored, rule, rng)
                except Skip as s:
                    stats.skip(s.reason)
                    return
                picks.append((qid, chosen[0], rejected[0], pm_score(chosen[1], chosen[0] == chosen[2]),
                              pm_score(rejected[1], rejected[0] == rejected[2])))

            for qid, accepted, aid, score in cursor:
                if qid != current:
                    if current is not None:
                        decide(current, group)
                    current, group = qid, []
                group.append((aid, score, accepted))
                if len(picks) >= _BATCH:
                    _store_picks(db, picks)
            if current is not None:
                decide(current, group)
            _store_picks(db, picks)

            # Pass 2: bodies of the picked posts only.
            batch = []
            for line, attrs in iter_rows(path):
                post_id = attrs.get("Id")
                if post_id is None or not post_id.isdigit():
                    continue
                if db.execute("SELECT 1 FROM wanted WHERE id = ?", (int(post_id),)).fetchone():
                    extra = {k: v for k, v in attrs.items() if k not in ("Body", "Title")}
                    batch.append((int(post_id), attrs.get("Title"), attrs.get("Body") or "", json.dumps(extra)))
                    if len(batch) >= 1000:
                        db.executemany("INSERT OR REPLACE INTO body VALUES (?, ?, ?, ?)", batch)
                        batch.clear()
            db.executemany("INSERT OR REPLACE INTO body VALUES (?, ?, ?, ?)", batch)

            rows = db.execute("""
                SELECT p.qid, q.title, q.body, q.attrs, c.body, r.body, p.chosen, p.rejected,
                       p.chosen_score, p.rejected_score
                FROM pick p JOIN body q ON q.id = p.qid JOIN body c ON c.id = p.chosen
                     JOIN body r ON r.id = p.rejected ORDER BY p.qid""")
            for qid, title, qbody, qattrs, cbody, rbody, cid, rid, cscore, rscore in rows:
                question = _md(qbody, rule)
                prompt = f"{title}\n\n{question}" if title else question
                attrs = json.loads(qattrs)
                yield {
                    "qid": qid,
                    "prompt": prompt,
                    "chosen": _md(cbody, rule),
                    "rejected": _md(rbody, rule),
                    "source": SOURCE,
                    "site": site,
                    "chosen_score": cscore,
                    "rejected_score": rscore,
                    "chosen_answer_id": cid,
                    "rejected_answer_id": rid,
                    "date": attrs.get("CreationDate"),
                    "tags": attrs.get("Tags"),
                }
        finally:
            state.close()


def _store_picks(db: sqlite3.Connection, picks: list) -> None:
    db.executemany("INSERT INTO pick VALUES (?, ?, ?, ?, ?)", picks)
    db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", [(p[i],) for p in picks for i in range(3)])
    picks.clear()
