"""A response cache on disk: what makes re-runs free and `kill -9` harmless.

One SQLite file in WAL mode, one row per successful completion, keyed by the sha256 of (backend, model identity,
messages, generation parameters). The identity (`LM.identity`: the content hash of a local model's weights and
adapter, or an endpoint's base URL and served name) is what makes a hit mean "this model said this": a folder
retrained in place or another server behind the same model name misses. Each answer is committed as soon as it arrives, so a process killed at any point loses
only the requests that were in flight; the next run finds everything else and sends nothing twice. WAL lets
several runs (or a reader) share one file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

from probllm.models import cache_dir


def default_cache_path() -> Path:
    return cache_dir() / "llm-cache.sqlite"


def request_key(backend: str, identity: str, messages: list[dict], params: dict) -> str:
    """A stable hash of everything that decides a completion (JSON with sorted keys: dict order never matters)."""
    doc = {"backend": backend, "model": identity, "messages": messages, "params": params}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: the hf backend generates in a worker thread, but every cache access happens on
        # the event loop's thread, one at a time.
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable against a killed process (not against power loss), and much faster than FULL.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL, created REAL)")
        self.hits = 0
        self.stored = 0

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        if row is not None:
            self.hits += 1
            return row[0]
        return None

    def put(self, key: str, response: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses (key, response, created) VALUES (?, ?, ?)",
                         (key, response, time.time()))
        self.stored += 1

    def keys(self) -> set[str]:
        return {k for (k,) in self._db.execute("SELECT key FROM responses")}

    def close(self) -> None:
        self._db.close()
