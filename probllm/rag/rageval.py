"""`rag-eval`: does the index find the passage that answers each question? How a course team checks an index
before opening it to students.

Each question record names where its answer is: `source` (a file name, a path ending, or a list of them) and
optionally `pages` (1-based page numbers of a paged format: a PDF page, a slide), either one list for every
source or a mapping from each source to its pages (`{"notes.pdf": [57], "lecture7.pdf": [15, 16]}`: the
same answer in the notes and on the slides). For every search mode (and with
the reranker) the top-k passages are retrieved and the rank of the first passage from an expected file (file
level) and from an expected file at an expected page (page level) is recorded. Reported per mode:

- hit@k: the share of questions with such a passage in the top k;
- MRR: the mean of 1/rank of the first such passage (0 when none is in the top k).

Page-level figures count only the questions that give `pages`. Output: one record per question and mode on
stdout (the input record with `search`, `file_rank`, `page_rank` and the retrieved `hits`), the table on stderr,
the figures in `--summary`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Iterable, Iterator

from probllm.io import Record, RecordError, Stats
from probllm.records import parsed_batches


@dataclass
class Expected:
    question: str
    sources: list[str]
    pages: set[int] | dict[str, set[int]] | None  # for every source, or by source


def parse_expected(rec: dict, field: str = "question", source_field: str = "source",
                   pages_field: str = "pages") -> Expected:
    question = rec.get(field)
    if not isinstance(question, str) or not question.strip():
        raise RecordError("missing or not a non-empty string", field=field)
    sources = rec.get(source_field)
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise RecordError("missing: the file (or list of files) holding the answer", field=source_field)
    pages = rec.get(pages_field)
    if pages is not None:
        if isinstance(pages, dict):  # the same answer at other pages of other files (slides and notes)
            unknown = set(pages) - set(sources)
            if unknown:
                raise RecordError(f"names a file not in '{source_field}': {sorted(unknown)[0]}", field=pages_field)
            pages = {name: _page_set(v, pages_field) for name, v in pages.items()}
        else:
            pages = _page_set(pages, pages_field)
    return Expected(question, sources, pages)


def _page_set(pages, field: str) -> set[int]:
    if isinstance(pages, int) and not isinstance(pages, bool):
        pages = [pages]
    if not isinstance(pages, list) or not pages or not all(
            isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in pages):
        raise RecordError("must be a page number or a list of them (1-based), or a mapping of files to those",
                          field=field)
    return set(pages)


def same_file(hit_source: str, expected: str) -> bool:
    """A hit's source is the expected file when it is that path or ends with it (`lecture3.pdf` names
    `notes/week3/lecture3.pdf`; a JSONL record's source `FILE:ID` is matched whole)."""
    hit = os.path.normpath(hit_source)
    want = os.path.normpath(expected)
    return hit == want or hit.endswith(os.sep + want)


def first_rank(hits: list[dict], expected: Expected, by_page: bool) -> int | None:
    for rank, hit in enumerate(hits, 1):
        for source in expected.sources:
            if not same_file(str(hit.get("source", "")), source):
                continue
            pages = expected.pages.get(source, set()) if isinstance(expected.pages, dict) else expected.pages
            if not by_page or hit.get("page") in pages:
                return rank
    return None


@dataclass
class Tally:
    """hit@k and MRR for one search mode, at file and page level."""

    questions: int = 0
    file_hits: int = 0
    file_rr: float = 0.0
    page_questions: int = 0
    page_hits: int = 0
    page_rr: float = 0.0
    ranks: list = field(default_factory=list)

    def add(self, file_rank: int | None, page_rank: int | None, has_pages: bool) -> None:
        self.questions += 1
        if file_rank:
            self.file_hits += 1
            self.file_rr += 1.0 / file_rank
        if has_pages:
            self.page_questions += 1
            if page_rank:
                self.page_hits += 1
                self.page_rr += 1.0 / page_rank

    def figures(self) -> dict:
        def share(x, n):
            return round(x / n, 4) if n else None

        return {"questions": self.questions, "file_hit": share(self.file_hits, self.questions),
                "file_mrr": share(self.file_rr, self.questions), "page_questions": self.page_questions,
                "page_hit": share(self.page_hits, self.page_questions),
                "page_mrr": share(self.page_rr, self.page_questions)}


def run_label(mode: str, reranked: bool) -> str:
    return f"{mode}+rerank" if reranked else mode


def evaluate_retrieval(records: Iterable[Record], retriever, runs: list[tuple[str, bool]], tallies: dict,
                       stats: Stats, k: int = 5, field: str = "question", source_field: str = "source",
                       pages_field: str = "pages", skip_invalid: bool = False,
                       batch_size: int = 32) -> Iterator[dict]:
    """For each question (in input order) and each (mode, reranked) run: its record with the ranks found.
    `tallies` (label -> Tally) is filled as the records stream."""
    read = partial(parse_expected, field=field, source_field=source_field, pages_field=pages_field)
    for label in (run_label(m, r) for m, r in runs):
        tallies.setdefault(label, Tally())
    for good in parsed_batches(records, read, stats, skip_invalid, batch_size):
        queries = [e.question for _, e in good]
        results = {(m, r): retriever.search(queries, k, mode=m, rerank=r) for m, r in runs}
        for i, (rec, expected) in enumerate(good):
            for (mode, reranked), found in results.items():
                hits = found[i]
                file_rank = first_rank(hits, expected, by_page=False)
                page_rank = first_rank(hits, expected, by_page=True) if expected.pages else None
                label = run_label(mode, reranked)
                tallies[label].add(file_rank, page_rank, expected.pages is not None)
                yield {**rec, "search": label, "file_rank": file_rank, "page_rank": page_rank,
                       "hits": [{"rank": n, "id": h["id"], "source": h["source"], "page": h.get("page"),
                                 "score": h["score"]} for n, h in enumerate(hits, 1)]}


def metrics_table(tallies: dict, k: int) -> str:
    """The figures as a markdown table (stderr, and bench/results/rag.md)."""
    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"| search | questions | file hit@{k} | file MRR | with pages | page hit@{k} | page MRR |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, tally in tallies.items():
        f = tally.figures()
        lines.append(f"| {label} | {f['questions']} | {cell(f['file_hit'])} | {cell(f['file_mrr'])} | "
                     f"{f['page_questions']} | {cell(f['page_hit'])} | {cell(f['page_mrr'])} |")
    return "\n".join(lines)
