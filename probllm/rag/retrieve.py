"""Queries to chunks: one query text, or a stream of JSONL records (each record's question field is the query).

Output is either the chunks themselves (one record per hit: `id`, `score`, `text`, `source`, `heading`, plus
`rank`, offsets and the query's record id) or, with `attach`, the input records with a `context` list of hits in
the shared shape `{"id", "score", "text", "source", "heading", "page"}` (page: the 1-based PDF page or slide, null
for unpaged formats), ready for `eval --context context` and `ask`.
Records are embedded in small batches, so memory stays flat in the input size.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable, Iterator

from probllm.io import Record, Stats, UsageError
from probllm.rag.index import Embedder, RagIndex
from probllm.records import LETTERS, parse_mcq, parsed_batches

CONTEXT_KEYS = ("id", "score", "text", "source", "heading", "page")


class Retriever:
    """An index and its embedder, loaded once; `search(texts, k)` gives hits per query, best first."""

    def __init__(self, index_path: str, embedder: str | None = None, ef: int | None = None):
        self.index = RagIndex(index_path)
        if self.index.count == 0:
            # An assistant on an empty index answers with no material and no sign of it: say so at start.
            self.index.close()
            raise UsageError(f"{index_path}: the index holds no passages (it was built from no document); index "
                             f"the course material first: probllm index NOTES -o {index_path}")
        self.index.check_embedder(embedder)  # refuse another model before spending time loading it
        self.embedder = Embedder(self.index.embedder_name)
        if self.embedder.dim != self.index.dim:
            raise UsageError(f"{index_path}: built with {self.index.dim}-d vectors, the embedder gives "
                             f"{self.embedder.dim}-d")
        self.ef = ef

    def search(self, queries: list[str], k: int) -> list[list[dict]]:
        if not queries:
            return []
        vectors = self.embedder.embed(queries)
        return self.index.search(vectors, k=k, ef=self.ef)

    def close(self) -> None:
        self.index.close()


def query_text(record: dict, field: str, with_choices: bool = False) -> str:
    """The text to embed for a record: its question, and with `with_choices` its options (an MCQ's answer is
    often named only in the options, so they help find the right passage)."""
    mcq = parse_mcq(record, field)
    if not with_choices:
        return mcq.question
    return "\n".join([mcq.question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, mcq.choices)])


def follow_up_query(question: str, previous: str | None = None) -> str:
    """What to search for a question asked in a conversation: a follow-up such as "and in the worst case?" often
    names its subject only in the question before, so that one is searched with it (`chat`, `serve --index`)."""
    return f"{previous}\n{question}" if previous else question


def context_entry(hit: dict) -> dict:
    return {key: hit[key] for key in CONTEXT_KEYS}


def hit_record(hit: dict, rank: int, query_id=None) -> dict:
    rec = {**{key: hit[key] for key in CONTEXT_KEYS}, "rank": rank, "start": hit["start"], "end": hit["end"]}
    if query_id is not None:
        rec["query_id"] = query_id
    return rec


def retrieve_text(retriever: Retriever, query: str, k: int) -> list[dict]:
    hits = retriever.search([query], k)[0]
    return [hit_record(h, rank) for rank, h in enumerate(hits, 1)]


def retrieve_records(
    records: Iterable[Record],
    retriever: Retriever,
    stats: Stats,
    k: int = 5,
    field: str = "question",
    attach: bool = False,
    context_field: str = "context",
    with_choices: bool = False,
    skip_invalid: bool = False,
    batch_size: int = 32,
) -> Iterator[dict]:
    """Hits for each record's question, in input order; bad records raise (or are counted with skip_invalid)."""

    read = partial(query_text, field=field, with_choices=with_choices)
    for good in parsed_batches(records, read, stats, skip_invalid, batch_size):
        results = retriever.search([q for _, q in good], k)
        for (rec, _), hits in zip(good, results):
            if attach:
                yield {**rec, context_field: [context_entry(h) for h in hits]}
            else:
                for rank, h in enumerate(hits, 1):
                    yield hit_record(h, rank, rec.get("id"))
