"""The vector index of course notes: hnswlib (cosine) + an SQLite sidecar, updated incrementally and atomically.

An index is a folder:

    notes.idx/
      manifest.json          written LAST, atomically: names the current generation's files, the embedder
                             (name + dimension), the chunking and hnswlib settings, counts
      vectors.<gen>.bin      hnswlib index; integer labels
      chunks.<gen>.sqlite    sidecar: label -> chunk id, text, source, heading, page, offsets; documents -> hash

Updating never touches the files the manifest names. It copies the sidecar to the next generation's name,
applies the changes there and in memory, writes `vectors.<gen+1>.bin`, and only then replaces the manifest
(`os.replace`, atomic on POSIX). A crash or Ctrl-C at any point before that leaves the previous manifest pointing
at the previous, complete files; leftovers of a killed run are removed by the next run.

Incremental: a document (a file, or one JSONL record) is re-chunked only when its content hash (text + chunking
settings) changed. Within a changed document, chunks whose text is unchanged keep their label and vector; only
new chunk texts are embedded. Documents that are no longer among the inputs are removed (hnswlib
`mark_deleted`; their slots are reused by later additions). Long runs commit a generation every
`checkpoint_chunks` embedded chunks, so an interrupted run keeps what it finished and the next run continues.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from probllm.io import Interrupted, RecordError, Stats, UsageError, expand_paths, log, progress, read_records, \
    require, write_json
from probllm.rag.chunk import Block, Chunk, chunk_document, token_counter
from probllm.rag.extract import EXTRACTION_VERSION, EXTRACTORS, ExtractError, extractor_for

FORMAT = "probllm-rag-index/1"
MANIFEST = "manifest.json"
TEXT_SUFFIXES = {".md": True, ".markdown": True, ".mdx": True, ".rmd": True, ".qmd": True, ".txt": False, ".text": False, ".rst": False}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".json.gz")
GENERATION_FILE = re.compile(r"^(vectors\.\d+\.bin|chunks\.\d+\.sqlite(-journal|-wal|-shm)?)$")
DEFAULT_EMBEDDER_LABEL = "all-MiniLM-L6-v2"
SUPPORTED = "markdown, text, JSONL, JSON, " + ", ".join(dict.fromkeys(e.label for e in EXTRACTORS.values()))

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
  key TEXT PRIMARY KEY,          -- normalised file path, or FILE:ID for a JSONL record
  source TEXT NOT NULL,          -- what is shown to the reader
  content_hash TEXT NOT NULL,    -- sha256 of the text and the chunking settings
  n_chunks INTEGER NOT NULL,
  metadata TEXT NOT NULL         -- JSON
);
CREATE TABLE IF NOT EXISTS chunks (
  label INTEGER PRIMARY KEY,     -- the hnswlib label
  chunk_id TEXT NOT NULL UNIQUE, -- KEY#first 8 hex of the chunk hash: stable while the chunk text is
  doc_key TEXT NOT NULL REFERENCES documents(key),
  chunk_hash TEXT NOT NULL,
  position INTEGER NOT NULL,
  text TEXT NOT NULL,
  heading TEXT NOT NULL,
  start INTEGER NOT NULL,        -- character offsets into the original document (an extracted one: its text)
  end INTEGER NOT NULL,
  page INTEGER                   -- 1-based page (PDF page, slide number); NULL for unpaged formats
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_key);
"""
CHUNK_COLUMNS = ("label", "chunk_id", "doc_key", "chunk_hash", "position", "text", "heading", "start", "end", "page")


def has_page_column(db: sqlite3.Connection) -> bool:
    """Indexes built before pages were recorded have no `page` column: they still load (pages read as None)."""
    return any(row[1] == "page" for row in db.execute("PRAGMA table_info(chunks)"))


def upgrade_schema(db: sqlite3.Connection) -> None:
    """Bring a sidecar copied from an older generation to the current schema (in the new generation's copy only:
    the committed files are never written)."""
    if not has_page_column(db):
        db.execute("ALTER TABLE chunks ADD COLUMN page INTEGER")

# Keyword search (BM25): an FTS5 index over the chunk texts and headings, stored in the same sidecar and kept in
# step with `chunks` by triggers, so it changes in the very transactions (and generations) that change the chunks.
# External content: the text is stored once, in `chunks`. Porter stemming: "gradients" finds "gradient".
KEYWORD_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
  text, heading, content='chunks', content_rowid='label', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
  INSERT INTO chunks_fts(rowid, text, heading) VALUES (new.label, new.text, new.heading);
END;
CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
  INSERT INTO chunks_fts(chunks_fts, rowid, text, heading) VALUES ('delete', old.label, old.text, old.heading);
END;
"""
KEYWORD_INDEX = "fts5-bm25/1"  # the manifest's `keyword` entry: an index without it has dense search only


@dataclass
class Settings:
    chunk_tokens: int = 200
    overlap: int = 40
    M: int = 16
    ef_construction: int = 200
    ef: int = 64

    def chunking_key(self) -> str:
        return f"chunk_tokens={self.chunk_tokens};overlap={self.overlap}"


def embedder_label(name: str | None) -> str:
    """The name an index records for its embedder: stable across machines for the offline default."""
    from probllm.models import DEFAULT_EMBEDDER_ALIASES

    if name is None or name in DEFAULT_EMBEDDER_ALIASES:
        return DEFAULT_EMBEDDER_LABEL
    return name.rstrip("/")


class Embedder:
    """A sentence-transformers model that returns normalised float32 vectors and counts what it embedded
    (the incremental tests check those counts)."""

    def __init__(self, name: str | None = None, device: str = "auto", batch_size: int = 64):
        from probllm.models import load_embedder

        self.label = embedder_label(name)
        self.name = name
        self.model = load_embedder(name, device=device)
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_of())
        self.count_tokens = token_counter(self.model.tokenizer)
        self.batch_size = batch_size
        self.calls = 0
        self.texts_embedded = 0

    def embed(self, texts: list[str]):
        import numpy as np

        self.calls += 1
        self.texts_embedded += len(texts)
        vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)


# ---------------------------------------------------------------------------------------------------- reading


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{folder}: unreadable index manifest ({e})")
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{folder}: not a probllm index (format {manifest.get('format')!r})")
    return manifest


def check_embedder(manifest: dict, folder: str, name: str | None) -> None:
    """Refuse to mix embedders: vectors of two models live in different spaces and scores would be noise."""
    if name is None:
        return
    wanted = embedder_label(name)
    built = manifest["embedder"]["name"]
    if wanted != built:
        raise UsageError(
            f"{folder} was built with embedder {built} ({manifest['embedder']['dim']}-d); --embedder {wanted} "
            f"would compare vectors from another model. Drop --embedder (the index's own is used), or build a "
            f"new index with --output")


def indexed_documents(folder: str | os.PathLike) -> list[dict]:
    """The documents of an index (read from its sidecar alone, no vectors loaded): key, source, and the file
    it was read from when that file is still there (None for JSONL records and files gone since)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise UsageError(f"{folder}: no index here (build one with `probllm index NOTES --output {folder}`)")
    root = manifest.get("root") or os.getcwd()  # indexes from before `root` was recorded: the current folder
    db = sqlite3.connect(f"file:{Path(folder) / manifest['files']['chunks']}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT key, source FROM documents ORDER BY key").fetchall()
    finally:
        db.close()
    out = []
    for key, source in rows:
        path = os.path.join(root, key)
        out.append({"key": key, "source": source, "path": path if os.path.isfile(path) else None})
    return out


class RagIndex:
    """A loaded index for queries (read-only)."""

    def __init__(self, folder: str | os.PathLike):
        import hnswlib

        self.folder = str(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise UsageError(f"{folder}: no index here (build one with `probllm index NOTES --output {folder}`)")
        self.manifest = manifest
        self.dim = int(manifest["embedder"]["dim"])
        self.count = int(manifest["chunks"])
        self.hnsw = hnswlib.Index(space="cosine", dim=self.dim)
        vectors = Path(folder) / manifest["files"]["vectors"]
        if self.count:
            self.hnsw.load_index(str(vectors))
            self.hnsw.set_ef(int(manifest["settings"]["ef"]))
        db_path = Path(folder) / manifest["files"]["chunks"]
        self.db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        self.db.row_factory = sqlite3.Row
        self.page_column = "c.page" if has_page_column(self.db) else "NULL"  # an index from before pages

    @property
    def embedder_name(self) -> str:
        return self.manifest["embedder"]["name"]

    def check_embedder(self, name: str | None) -> None:
        check_embedder(self.manifest, self.folder, name)

    def search(self, vectors, k: int, ef: int | None = None) -> list[list[dict]]:
        """Top-k chunks for each query vector: dicts with id, score (cosine similarity), text, source, heading,
        page (None for unpaged formats), start, end; best first."""
        if self.count == 0:
            return [[] for _ in range(len(vectors))]
        k = max(1, min(k, self.count))
        self.hnsw.set_ef(max(ef or int(self.manifest["settings"]["ef"]), k))
        try:
            labels, distances = self.hnsw.knn_query(vectors, k=k)
        except RuntimeError:
            # With many deleted elements the graph search can come back short: search wider once.
            self.hnsw.set_ef(max(4 * k, 4 * (ef or 64), self.count if self.count < 10000 else 10000))
            labels, distances = self.hnsw.knn_query(vectors, k=k)
        wanted = sorted({int(l) for row in labels for l in row})
        rows = self.rows(wanted)
        results = []
        for row_labels, row_dist in zip(labels, distances):
            hits = []
            for label, dist in zip(row_labels, row_dist):
                r = rows.get(int(label))
                if r is None:
                    continue
                hits.append(self._hit(r, round(1.0 - float(dist), 6)))
            results.append(hits)
        return results

    @property
    def has_keyword(self) -> bool:
        """Whether this index has its keyword (BM25) table: indexes built before keyword search do not."""
        return bool(self.manifest.get("keyword"))

    def keyword_search(self, queries: list[str], k: int) -> list[list[dict]]:
        """Top-k chunks by BM25 (SQLite FTS5) for each query text, best first; `score` is the BM25 score
        (higher is better). A query with no searchable word finds nothing."""
        from probllm.rag.search import fts_query

        results = []
        for text in queries:
            match = fts_query(text)
            if not match or self.count == 0:
                results.append([])
                continue
            # bm25() is lower-is-better; the heading counts half as much as the text.
            found = self.db.execute("SELECT rowid, bm25(chunks_fts, 1.0, 0.5) FROM chunks_fts WHERE chunks_fts "
                                    "MATCH ? ORDER BY 2 LIMIT ?", (match, k)).fetchall()
            rows = self.rows([int(label) for label, _ in found])
            results.append([self._hit(rows[int(label)], round(-float(score), 6)) for label, score in found
                            if int(label) in rows])
        return results

    @staticmethod
    def _hit(r: sqlite3.Row, score: float) -> dict:
        return {"id": r["chunk_id"], "score": score, "text": r["text"], "source": r["source"],
                "heading": r["heading"], "start": r["start"], "end": r["end"],
                "page": r["page"]}

    def rows(self, labels: list[int]) -> dict[int, sqlite3.Row]:
        out: dict[int, sqlite3.Row] = {}
        for i in range(0, len(labels), 500):
            part = labels[i:i + 500]
            q = (f"SELECT c.label, c.chunk_id, c.text, c.heading, c.start, c.end, {self.page_column} AS page, "
                 "d.source FROM chunks c "
                 f"JOIN documents d ON d.key = c.doc_key WHERE c.label IN ({','.join('?' * len(part))})")
            for r in self.db.execute(q, part):
                out[int(r["label"])] = r
        return out

    def close(self) -> None:
        self.db.close()


# -------------------------------------------------------------------------------------------------- documents


@dataclass
class Document:
    key: str
    source: str
    text: str
    markdown: bool
    metadata: dict
    blocks: list[Block] | None = None  # a paged format's extracted blocks (with pages); else `text` is parsed
    extracted: bool = False  # read through an extractor (its version is part of the content hash)
    pages: int = 0  # pages (slides) of a paged format
    scanned: tuple[int, ...] = ()  # its pages that hold images but no text


def note_pages(doc: Document, stats: Stats) -> None:
    """Pages are counted, and pages without text named, once per run for each document read."""
    if doc.pages:
        stats.notes["pages"] = stats.notes.get("pages", 0) + doc.pages
    if doc.scanned:
        log(f"{stats.command}: scanned or image-only (no text to index): {doc.source} p. "
            f"{', '.join(map(str, doc.scanned))}")
        stats.notes["scanned pages"] = stats.notes.get("scanned pages", 0) + len(doc.scanned)


def _norm_path(path: str) -> str:
    return os.path.normpath(path)


def iter_documents(paths: Iterable[str], stats: Stats, text_field: str = "text", id_field: str = "id",
                   skip_invalid: bool = False) -> Iterator[Document]:
    """Documents from files, folders and globs (expanded by io.expand_paths, like every command's paths):
    markdown and plain text files as one document each, JSONL/JSON records as one document per record (its
    `text_field`). Folders are walked recursively in sorted order; hidden entries are skipped, unsupported files
    in folders counted, an unsupported file named on its own is an error."""

    def skip_unsupported(path: str) -> None:
        stats.skip(f"unsupported file type {Path(path).suffix or '(none)'}")

    suffixes = tuple(JSONL_SUFFIXES) + tuple(TEXT_SUFFIXES) + tuple(EXTRACTORS)
    for given in expand_paths(paths, suffixes=suffixes, on_other=skip_unsupported):
        if given == "-":
            raise UsageError("index reads notes from files or folders, not stdin")
        kind = _file_kind(given)
        if kind is None:
            raise UsageError(f"{given}: unsupported file type (one of: {SUPPORTED})")
        yield from _file_documents(given, kind, stats, text_field, id_field, skip_invalid)


def _file_kind(path: str) -> str | None:
    low = path.lower()
    if low.endswith(JSONL_SUFFIXES):
        return "records"
    if extractor_for(low) is not None:
        return "extract"
    suffix = os.path.splitext(low)[1]
    if suffix in TEXT_SUFFIXES:
        return "markdown" if TEXT_SUFFIXES[suffix] else "text"
    return None


def _file_documents(path: str, kind: str, stats: Stats, text_field: str, id_field: str,
                    skip_invalid: bool) -> Iterator[Document]:
    if kind == "records":
        for rec in read_records([path], stats=stats, skip_invalid=skip_invalid, allow_empty=True):
            try:
                text = require(rec, text_field, str)
                rid = rec.get(id_field)
                rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else f"line{rec.line}"
            except RecordError as e:
                stats.reject(e, rec, skip_invalid)
                continue
            meta = {k: v for k, v in rec.items() if k != text_field and isinstance(v, (str, int, float, bool))}
            key = f"{_norm_path(path)}:{rid}"
            yield Document(key, key, text, True, meta)
        return
    stats.read += 1
    if kind == "extract":
        doc = _extracted_document(path, stats, skip_invalid)
        if doc is not None:
            yield doc
        return
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        err = RecordError("not UTF-8 text", source=path)
        stats.reject(err, skip_invalid=skip_invalid)
        return
    key = _norm_path(path)
    yield Document(key, key, text, kind == "markdown", {})


def _extracted_document(path: str, stats: Stats, skip_invalid: bool) -> Document | None:
    """A PDF, deck, notebook, LaTeX or HTML file through its extractor. A file that cannot be read is one error
    line naming it (counted and skipped with --skip-invalid); its pages without text are noted by the run
    (`note_pages`)."""
    extractor = extractor_for(path)
    try:
        got = extractor.read(path)
    except ExtractError as e:
        stats.reject(RecordError(str(e), source=path), skip_invalid=skip_invalid)
        return None
    except UnicodeDecodeError:
        stats.reject(RecordError("not UTF-8 text", source=path), skip_invalid=skip_invalid)
        return None
    key = _norm_path(path)
    return Document(key, key, got.text, got.markdown, {}, blocks=got.blocks, extracted=True, pages=got.pages,
                    scanned=tuple(got.scanned))


def content_hash(doc: Document, settings: Settings) -> str:
    h = hashlib.sha256()
    h.update(settings.chunking_key().encode())
    h.update(b"\0markdown" if doc.markdown else b"\0text")
    if doc.extracted:
        h.update(f"\0extracted/{EXTRACTION_VERSION}".encode())
    h.update(b"\0")
    h.update(doc.text.encode("utf-8"))
    for b in doc.blocks or ():
        # Structure the text alone does not show: where headings and pages begin.
        h.update(f"\0{b.kind}:{b.level}:{b.page}:{b.start}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- writing


@dataclass
class PendingDoc:
    doc: Document
    doc_hash: str
    chunks: list[Chunk]
    reuse: dict[int, int]  # chunk position -> label kept from the previous version of the document
    stale: list[int]  # labels of the previous version no longer used


class IndexWriter:
    """One update run over an index folder: open (or create), apply documents, commit generations."""

    def __init__(self, folder: str, embedder: Embedder, settings: Settings, seed: int = 0,
                 hook: Callable[[str], None] | None = None):
        import hnswlib

        self.folder = Path(folder)
        self.embedder = embedder
        self.settings = settings
        self.hook = hook or (lambda stage: None)
        self.folder.mkdir(parents=True, exist_ok=True)
        old = read_manifest(self.folder)
        self.old_manifest = old
        self._collect_garbage()
        self.generation = (old["generation"] + 1) if old else 1
        self.next_label = old["next_label"] if old else 0
        self.live = old["chunks"] if old else 0
        self.db_path = self.folder / f"chunks.{self.generation}.sqlite"
        self.vectors_path = self.folder / f"vectors.{self.generation}.bin"
        if old:
            shutil.copyfile(self.folder / old["files"]["chunks"], self.db_path)
        self.db = sqlite3.connect(str(self.db_path))
        self.db.executescript(SCHEMA)
        upgrade_schema(self.db)
        self.dirty = False
        if not (old or {}).get("keyword"):
            # A new index, or one built before keyword search: (re)build the FTS table from the chunks already
            # there; the next commit records it in the manifest.
            self.db.executescript(KEYWORD_SCHEMA)
            self.db.execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('rebuild')")
            self.db.commit()
            self.dirty = True
        self.hnsw = hnswlib.Index(space="cosine", dim=embedder.dim)
        capacity = max(1024, self.next_label)
        if old and old.get("capacity_used"):
            self.hnsw.load_index(str(self.folder / old["files"]["vectors"]), max_elements=capacity,
                                 allow_replace_deleted=True)
        else:
            self.hnsw.init_index(max_elements=capacity, M=settings.M, ef_construction=settings.ef_construction,
                                 random_seed=seed, allow_replace_deleted=True)
        self.hnsw.set_num_threads(1)  # one thread: the same inputs give the same graph (determinism)
        self.committed_generations = 0

    # ------------------------------------------------------------------ state
    def known_documents(self) -> dict[str, str]:
        return {k: h for k, h in self.db.execute("SELECT key, content_hash FROM documents")}

    def _old_chunks(self, key: str) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for label, chunk_hash in self.db.execute("SELECT label, chunk_hash FROM chunks WHERE doc_key = ? "
                                                 "ORDER BY position", (key,)):
            out.setdefault(chunk_hash, []).append(int(label))
        return out

    def plan(self, doc: Document, doc_hash: str, chunks: list[Chunk], is_update: bool) -> PendingDoc:
        reuse: dict[int, int] = {}
        stale: list[int] = []
        if is_update:
            old = self._old_chunks(doc.key)
            for c in chunks:
                labels = old.get(c.content_hash())
                if labels:
                    reuse[c.position] = labels.pop(0)
            stale = [l for labels in old.values() for l in labels]
        return PendingDoc(doc, doc_hash, chunks, reuse, stale)

    # ------------------------------------------------------------------ apply
    def apply(self, pending: list[PendingDoc]) -> int:
        """Embed the new chunks of these documents in one length-sorted pass and write them; returns the
        number of chunks embedded."""
        import numpy as np

        todo = [(p, c) for p in pending for c in p.chunks if c.position not in p.reuse]
        vectors = None
        if todo:
            texts = [c.embed_text() for _, c in todo]
            vectors = self.embedder.embed(texts)
        labels = np.arange(self.next_label, self.next_label + len(todo), dtype=np.int64)
        if todo:
            self._ensure_capacity(len(todo))
            self.hnsw.add_items(vectors, labels, replace_deleted=True)
            self.next_label += len(todo)
        new_label = {id(c): int(l) for (_, c), l in zip(todo, labels)}
        with self.db:
            for p in pending:
                for label in p.stale:
                    self.hnsw.mark_deleted(label)
                self.db.execute("DELETE FROM chunks WHERE doc_key = ?", (p.doc.key,))
                self.live -= len(p.stale) + len(p.reuse)
                self.db.execute("INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?)",
                                (p.doc.key, p.doc.source, p.doc_hash, len(p.chunks),
                                 json.dumps(p.doc.metadata, ensure_ascii=False)))
                seen_ids: set[str] = set()
                for c in p.chunks:
                    label = p.reuse.get(c.position, new_label.get(id(c)))
                    h = c.content_hash()
                    chunk_id = f"{p.doc.key}#{h[:8]}"
                    n = 2
                    while chunk_id in seen_ids:  # the same text twice in one document
                        chunk_id, n = f"{p.doc.key}#{h[:8]}-{n}", n + 1
                    seen_ids.add(chunk_id)
                    self.db.execute(f"INSERT INTO chunks ({', '.join(CHUNK_COLUMNS)}) "
                                    f"VALUES ({', '.join('?' * len(CHUNK_COLUMNS))})",
                                    (label, chunk_id, p.doc.key, h, c.position, c.text, c.heading_path,
                                     c.start, c.end, c.page))
                self.live += len(p.chunks)
        self.dirty = True
        return len(todo)

    def remove(self, keys: Iterable[str]) -> int:
        n_docs = 0
        with self.db:
            for key in keys:
                labels = [int(r[0]) for r in self.db.execute("SELECT label FROM chunks WHERE doc_key = ?", (key,))]
                for label in labels:
                    self.hnsw.mark_deleted(label)
                self.live -= len(labels)
                self.db.execute("DELETE FROM chunks WHERE doc_key = ?", (key,))
                self.db.execute("DELETE FROM documents WHERE key = ?", (key,))
                n_docs += 1
        self.dirty = self.dirty or n_docs > 0
        return n_docs

    def _ensure_capacity(self, extra: int) -> None:
        # Deleted slots are reused by replace_deleted, but only one per deletion: size for the worst case.
        needed = self.hnsw.get_current_count() + extra
        if needed > self.hnsw.get_max_elements():
            self.hnsw.resize_index(max(needed, 2 * self.hnsw.get_max_elements()))

    # ------------------------------------------------------------------ commit
    def commit(self, n_documents: int) -> None:
        """Make the current state the index: data files first (fsynced), the manifest last."""
        self.db.commit()
        self.db.close()
        self.hnsw.save_index(str(self.vectors_path))
        for path in (self.vectors_path, self.db_path):
            _fsync(path)
        self.hook("files-written")
        manifest = {
            "format": FORMAT,
            "generation": self.generation,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "embedder": {"name": self.embedder.label, "dim": self.embedder.dim,
                         "max_seq_length": int(getattr(self.embedder.model, "max_seq_length", 0) or 0)},
            "settings": asdict(self.settings),
            "space": "cosine",
            "chunks": self.live,
            "documents": n_documents,
            "next_label": self.next_label,
            "capacity_used": self.hnsw.get_current_count(),
            "keyword": KEYWORD_INDEX,
            # Document keys are file paths as given to `index`: relative ones are relative to this folder (the
            # server finds the indexed files by it to serve them).
            "root": os.getcwd(),
            "files": {"vectors": self.vectors_path.name, "chunks": self.db_path.name},
        }
        write_json(self.folder / MANIFEST, manifest)
        _fsync_dir(self.folder)
        previous = self.old_manifest
        self.old_manifest = manifest
        self.committed_generations += 1
        self.hook("manifest-written")
        if previous:
            for name in previous["files"].values():
                try:
                    (self.folder / name).unlink()
                except FileNotFoundError:
                    pass
        self.dirty = False

    def start_next_generation(self) -> None:
        """After a checkpoint commit: continue in a fresh copy, so the committed files stay untouched."""
        self.generation += 1
        new_db = self.folder / f"chunks.{self.generation}.sqlite"
        shutil.copyfile(self.db_path, new_db)
        self.db_path = new_db
        self.vectors_path = self.folder / f"vectors.{self.generation}.bin"
        self.db = sqlite3.connect(str(self.db_path))

    def abandon(self) -> None:
        """Drop this run's uncommitted files (the manifest still names the previous, complete ones)."""
        try:
            self.db.close()
        except sqlite3.Error:
            pass
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        keep = set(self.old_manifest["files"].values()) if self.old_manifest else set()
        for f in self.folder.iterdir():
            if GENERATION_FILE.match(f.name) and f.name not in keep and not f.name.startswith(
                    tuple(n + "-" for n in keep)):
                f.unlink(missing_ok=True)
        (self.folder / (MANIFEST + ".tmp")).unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:
        pass  # not every filesystem lets a directory be fsynced


# ----------------------------------------------------------------------------------------------------- driver


@dataclass
class IndexReport:
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks_embedded: int = 0
    chunks_reused: int = 0
    chunks_total: int = 0
    documents: int = 0


def _unchanged_report(paths: list[str], out: str, manifest: dict, settings: Settings, stats: Stats,
                      text_field: str, id_field: str, skip_invalid: bool) -> IndexReport | None:
    """The report of a re-index that would change nothing (same settings, same documents, same texts), read
    from the committed index without loading the embedder; None as soon as anything differs."""
    if Settings(**manifest["settings"]) != settings or not manifest.get("keyword"):
        return None  # (an index built before keyword search is rebuilt with its FTS table)
    db = sqlite3.connect(f"file:{Path(out) / manifest['files']['chunks']}?mode=ro", uri=True)
    try:
        known = {k: h for k, h in db.execute("SELECT key, content_hash FROM documents")}
    finally:
        db.close()
    scan = Stats(command=stats.command)
    seen: set[str] = set()
    read: list[Document] = []
    for doc in iter_documents(paths, scan, text_field=text_field, id_field=id_field, skip_invalid=skip_invalid):
        if doc.key in seen:
            scan.skip("duplicate document key")
            continue
        if known.get(doc.key) != content_hash(doc, settings):
            return None
        seen.add(doc.key)
        read.append(Document(doc.key, doc.source, "", doc.markdown, {}, pages=doc.pages, scanned=doc.scanned))
    if seen != set(known) or not seen:
        return None
    for doc in read:
        note_pages(doc, stats)
    stats.read += scan.read
    stats.skipped.update(scan.skipped)
    stats.invalid.update(scan.invalid)
    report = IndexReport(documents=len(seen), unchanged=len(seen), chunks_total=int(manifest["chunks"]))
    stats.written = report.chunks_total
    stats.notes.update({
        "documents": report.documents, "added": 0, "changed": 0, "unchanged": report.unchanged, "removed": 0,
        "chunks embedded": 0, "chunks reused": 0, "embedder": manifest["embedder"]["name"],
        "embedder loaded": "no (nothing changed)",
    })
    return report


def _reasons(stats: Stats) -> str:
    """Why nothing was read: the skip and error counts of the run."""
    counts = {**stats.skipped, **stats.invalid}
    if not counts:
        return f"no {SUPPORTED} file"
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def build_index(
    paths: list[str],
    out: str,
    stats: Stats | None = None,
    embedder: Embedder | str | None = None,
    chunk_tokens: int | None = None,
    overlap: int | None = None,
    M: int | None = None,
    ef_construction: int | None = None,
    ef: int | None = None,
    text_field: str = "text",
    id_field: str = "id",
    skip_invalid: bool = False,
    seed: int = 0,
    checkpoint_chunks: int = 2000,
    hook: Callable[[str], None] | None = None,
) -> IndexReport:
    """Create or update the index at `out` so that it holds exactly the documents found in `paths`.

    Settings left as None keep the index's recorded ones (or the defaults for a new index). `hook(stage)` is
    called at commit stages ("files-written", "manifest-written"): tests raise there to simulate a crash."""
    stats = stats if stats is not None else Stats(command="probllm index")
    if not paths:
        raise UsageError("name the notes to index: files or folders (markdown, text, JSONL)")
    # Check first, load later: a path that names nothing fails before the embedder loads or a folder is made.
    list(expand_paths(paths, suffixes=None))
    manifest = read_manifest(out) if os.path.isdir(out) else None
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output {out}: exists and is not an index folder")
    settings = Settings(**manifest["settings"]) if manifest else Settings()
    for name, value in (("chunk_tokens", chunk_tokens), ("overlap", overlap), ("ef", ef)):
        if value is not None:
            setattr(settings, name, value)
    for name, value in (("M", M), ("ef_construction", ef_construction)):
        if value is None:
            continue
        if manifest and manifest["chunks"] and getattr(settings, name) != value:
            raise UsageError(f"--{name.replace('_', '-')} {value}: {out} was built with {getattr(settings, name)}; "
                             f"the graph cannot change its {name} in place (build a new index with --output)")
        setattr(settings, name, value)
    if settings.chunk_tokens < 8:
        raise UsageError("--chunk-tokens must be at least 8")
    if not 0 <= settings.overlap < settings.chunk_tokens:
        raise UsageError("--overlap must be between 0 and --chunk-tokens")

    if isinstance(embedder, Embedder):
        if manifest:
            check_embedder(manifest, out, embedder.label)
    else:
        if manifest:
            check_embedder(manifest, out, embedder)
            # Check first, load later: a re-index where nothing changed needs no embedder (seconds to load).
            report = _unchanged_report(paths, out, manifest, settings, stats, text_field, id_field, skip_invalid)
            if report is not None:
                return report
            embedder = Embedder(embedder or manifest["embedder"]["name"])
        else:
            embedder = Embedder(embedder)
    if manifest and int(manifest["embedder"]["dim"]) != embedder.dim:
        raise UsageError(f"{out}: built with {manifest['embedder']['dim']}-d vectors, embedder gives {embedder.dim}")

    created = not os.path.exists(out)
    writer = IndexWriter(out, embedder, settings, seed=seed, hook=hook)
    report = IndexReport()
    known = writer.known_documents()
    seen: set[str] = set()
    pending: list[PendingDoc] = []
    pending_chunks = 0
    completed = False
    try:
        with progress("indexing", total=None) as advance:
            for doc in iter_documents(paths, stats, text_field=text_field, id_field=id_field,
                                      skip_invalid=skip_invalid):
                if doc.key in seen:
                    stats.skip("duplicate document key")
                    continue
                seen.add(doc.key)
                note_pages(doc, stats)
                doc_hash = content_hash(doc, settings)
                if known.get(doc.key) == doc_hash:
                    report.unchanged += 1
                    advance()
                    continue
                chunks = chunk_document(doc.text, embedder.count_tokens, settings.chunk_tokens, settings.overlap,
                                        markdown=doc.markdown, blocks=doc.blocks)
                is_update = doc.key in known
                p = writer.plan(doc, doc_hash, chunks, is_update)
                report.changed += is_update
                report.added += not is_update
                report.chunks_reused += len(p.reuse)
                pending.append(p)
                pending_chunks += len(chunks) - len(p.reuse)
                if pending_chunks >= checkpoint_chunks:
                    report.chunks_embedded += writer.apply(pending)
                    advance(len(pending))
                    pending, pending_chunks = [], 0
                    # A checkpoint: what is embedded so far survives an interruption.
                    writer.commit(len(known.keys() | seen))
                    writer.start_next_generation()
            if pending:
                report.chunks_embedded += writer.apply(pending)
                advance(len(pending))
                pending = []
            if not seen:
                raise UsageError(f"no document was read from {', '.join(paths)} ({_reasons(stats)}); "
                                 + ("no index was written" if created else f"{out} is left as it was"))
            gone = sorted(set(known) - seen)
            report.removed = writer.remove(gone)
            if writer.live == 0:
                # Documents were read but none had text (scans, empty files): an index of nothing helps no one.
                raise UsageError(f"the {len(seen)} document(s) read hold no text to index"
                                 + (f" ({stats.notes['scanned pages']} scanned or image-only pages)"
                                    if stats.notes.get("scanned pages") else "") + "; "
                                 + ("no index was written" if created else f"{out} is left as it was"))
            report.documents = len(seen)
            if writer.dirty or manifest is None or Settings(**manifest["settings"]) != settings:
                writer.commit(len(seen))
            else:
                writer.abandon()  # nothing changed: keep the current generation as it is
            completed = True
    except KeyboardInterrupt:
        if created and not writer.committed_generations:
            raise Interrupted("nothing was indexed yet; no index folder is left behind") from None
        raise Interrupted(f"the index keeps the last committed state ({writer.committed_generations} "
                          f"checkpoint(s) this run); run the same command again to continue") from None
    finally:
        if not completed:
            writer.abandon()
            if created and not writer.committed_generations:
                shutil.rmtree(out, ignore_errors=True)  # a failed first build leaves no empty folder behind
    report.chunks_total = writer.live
    stats.written = report.chunks_total
    stats.notes.update({
        "documents": report.documents, "added": report.added, "changed": report.changed,
        "unchanged": report.unchanged, "removed": report.removed, "chunks embedded": report.chunks_embedded,
        "chunks reused": report.chunks_reused, "embedder": embedder.label,
    })
    return report
