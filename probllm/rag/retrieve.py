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

from probllm.io import Record, Stats, UsageError, log
from probllm.rag.index import Embedder, RagIndex
from probllm.rag.search import DEFAULT_SEARCH, SEARCH_MODES, Reranker, candidates_for, fusion_depth, \
    reciprocal_rank_fusion
from probllm.records import LETTERS, parse_mcq, parsed_batches

CONTEXT_KEYS = ("id", "score", "text", "source", "heading", "page")


class Retriever:
    """An index, its embedder and the search mode (see probllm/rag/search.py), loaded once; `search(texts, k)`
    gives hits per query, best first."""

    def __init__(self, index_path: str, embedder: str | None = None, ef: int | None = None,
                 search: str = DEFAULT_SEARCH, reranker: str | None = None):
        if search not in SEARCH_MODES:
            raise UsageError(f"--search {search}: choose one of {', '.join(SEARCH_MODES)}")
        self.index = RagIndex(index_path)
        if self.index.count == 0:
            # An assistant on an empty index answers with no material and no sign of it: say so at start.
            self.index.close()
            raise UsageError(f"{index_path}: the index holds no passages (it was built from no document); index "
                             f"the course material first: probllm index NOTES -o {index_path}")
        self.index.check_embedder(embedder)  # refuse another model before spending time loading it
        self.mode = search
        if search != "dense" and not self.index.has_keyword:
            # Built before keyword search existed: it still answers, by its vectors.
            log(f"probllm: {index_path} was built before keyword search, so it is searched by embeddings only "
                f"(--search dense); re-index it (`probllm index NOTES --output {index_path}`, only the keyword "
                f"table is added) for --search {search}")
            self.mode = "dense"
        self.embedder = None
        if self.mode != "keyword":  # keyword search alone needs no embedder
            self.embedder = Embedder(self.index.embedder_name)
            if self.embedder.dim != self.index.dim:
                raise UsageError(f"{index_path}: built with {self.index.dim}-d vectors, the embedder gives "
                                 f"{self.embedder.dim}-d")
        self.reranker = Reranker(reranker) if reranker else None
        self.ef = ef

    def describe(self) -> str:
        """The search as a note for stderr and summaries (what produced the passages)."""
        parts = {"dense": f"dense ({self.index.embedder_name})", "keyword": "keyword (BM25)",
                 "hybrid": f"hybrid (dense {self.index.embedder_name} + BM25, RRF)"}[self.mode]
        return parts + (f", reranked by {self.reranker.name}" if self.reranker else "")

    def search(self, queries: list[str], k: int, mode: str | None = None, rerank: bool = True) -> list[list[dict]]:
        """Hits for each query, best first. `mode` and `rerank` override the retriever's own for one call
        (`rag-eval` compares the modes with one loaded retriever)."""
        if not queries:
            return []
        mode = mode or self.mode
        reranker = self.reranker if rerank else None
        if mode != "dense" and not self.index.has_keyword or mode != "keyword" and self.embedder is None:
            raise UsageError(f"--search {mode} is not available with this retriever ({self.describe()})")
        # Fusion and reranking choose among more candidates than they return.
        n = candidates_for(k) if reranker else fusion_depth(k) if mode == "hybrid" else k
        dense = keyword = None
        if mode in ("dense", "hybrid"):
            dense = self.index.search(self.embedder.embed(queries), k=n, ef=self.ef)
        if mode in ("keyword", "hybrid"):
            keyword = self.index.keyword_search(queries, k=n)
        results = []
        for i, query in enumerate(queries):
            if mode == "hybrid":
                hits = reciprocal_rank_fusion([dense[i], keyword[i]])[:n]
            else:
                hits = (dense or keyword)[i]
            hits = reranker.rerank(query, hits, k) if reranker else hits[:k]
            results.append(hits)
        return results

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


def location(passage: dict) -> str:
    """The file and page of a passage: `file, p. N` (just `file` for unpaged formats)."""
    where = str(passage.get("source") or passage.get("id") or "")
    return f"{where}, p. {passage['page']}" if passage.get("page") is not None else where


def citation(passage: dict) -> str:
    """Where a passage is, as a student looks it up: `file, p. N > heading` (no page for unpaged formats, no
    heading when the text has none). The one format of every source list: ask, chat, serve and the chat page
    (which shows the `citation` the server sends)."""
    heading = passage.get("heading")
    return f"{location(passage)} > {heading}" if heading else location(passage)


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
