"""How passages are found: dense (embedding) search, keyword (BM25) search, and both fused by reciprocal rank.

- dense: the query's embedding against the chunks' (hnswlib, cosine). Finds paraphrases; blurs exact terms.
- keyword: BM25 over the chunk words (SQLite FTS5 in the index's sidecar, Porter-stemmed). Finds the exact
  name of a theorem, an algorithm, a variable; misses paraphrases.
- hybrid: both lists fused by reciprocal rank fusion (Cormack et al., SIGIR 2009): a passage's score is
  sum over the lists of 1 / (RRF_K + rank). It needs no score calibration between the two (cosine and BM25 live
  on different scales), and a passage near the top of either list comes out near the top.

An optional cross-encoder reranker (sentence-transformers `CrossEncoder`) then re-scores the fused top
candidates by reading query and passage together, which is slower and more precise than either first stage.

This module is light on purpose (no model import at load): the CLI builds its `--search` choices from
`SEARCH_MODES`.
"""

from __future__ import annotations

import re
from typing import Sequence

# The one list of search modes: name -> what it does (the CLI's choices and help come from here).
SEARCH_MODES = {
    "dense": "embedding similarity (hnswlib, cosine)",
    "keyword": "BM25 over the chunk words (SQLite FTS5)",
    "hybrid": "dense and keyword fused by reciprocal rank (k=60)",
}
DEFAULT_SEARCH = "hybrid"
RRF_K = 60  # the constant of the original paper, used as is by most hybrid-search tools


def fusion_depth(k: int) -> int:
    """How many passages each first-stage list contributes to the fusion. Elasticsearch fuses the top `size` of
    each list by default; twice k lets a passage just below the cut in both lists come up. (Chosen on the
    bench's question set: see bench/results/rag.md.)"""
    return max(10, 2 * k)


def candidates_for(k: int) -> int:
    """How many fused candidates the reranker reads: it can only promote what the first stage found."""
    return max(20, 4 * k)


# Words, not symbols: FTS5 query syntax (quotes, AND/OR/NOT, NEAR, column filters, *) must never be taken from
# a student's question. Each word is quoted and the words are OR-ed, so BM25 ranks by how many rare words match;
# adjacent pairs of content words are added as phrases, so a passage naming "the Pareto principle" or "call by
# sharing" as such outranks one that has the words apart. The same word split as FTS5's unicode61 tokenizer
# (letters and digits; `_`, `-`, `'` separate).
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Function words: kept as words (BM25 gives them little weight), never the start or end of a phrase.
_FUNCTION_WORDS = frozenset(
    "a an and are as at be by can could do does did for from had has have how i if in into is it its me my no "
    "not of on or our should so than that the their them then there these they this to was we were what when "
    "where which who whom why will with would you your".split())


def fts_query(text: str, max_terms: int = 64) -> str:
    """An FTS5 MATCH expression for a free-text question: its distinct words and content-word pairs, quoted,
    OR-ed ('' if it has no word)."""
    words = _WORD.findall(text.lower())
    terms = [f'"{w}"' for w in words]
    terms += [f'"{a} {b}"' for a, b in zip(words, words[1:])
              if a not in _FUNCTION_WORDS and b not in _FUNCTION_WORDS]
    return " OR ".join(list(dict.fromkeys(terms))[:max_terms])


def reciprocal_rank_fusion(rankings: Sequence[Sequence[dict]], k: int = RRF_K) -> list[dict]:
    """Fuse ranked hit lists (best first, hits identified by `id`) into one, best first.

    Each hit comes out once, with `score` = sum of 1/(k + rank) over the lists it is in (rank 1-based) and
    `ranks` = its rank in each list (None where absent). Ties keep the order of first appearance, lists taken
    in the order given, so the result is deterministic."""
    fused: dict[str, dict] = {}
    order: dict[str, tuple[int, int]] = {}
    for li, hits in enumerate(rankings):
        for rank, hit in enumerate(hits, 1):
            entry = fused.get(hit["id"])
            if entry is None:
                entry = fused[hit["id"]] = {**hit, "score": 0.0, "ranks": [None] * len(rankings)}
                order[hit["id"]] = (rank, li)
            if entry["ranks"][li] is None:  # a list naming the same passage twice counts it once
                entry["ranks"][li] = rank
                entry["score"] += 1.0 / (k + rank)
    ranked = sorted(fused.values(), key=lambda h: (-h["score"], order[h["id"]]))
    for h in ranked:
        h["score"] = round(h["score"], 6)
    return ranked


class Reranker:
    """A sentence-transformers CrossEncoder that re-scores (query, passage) pairs; loaded through
    probllm.models (safetensors only, no remote code)."""

    def __init__(self, name: str, device: str = "auto", batch_size: int = 16):
        from probllm.models import load_reranker

        self.name = name.rstrip("/")
        self.model = load_reranker(name, device=device)
        self.batch_size = batch_size

    def rerank(self, query: str, hits: list[dict], k: int) -> list[dict]:
        """The k best of `hits` by the cross-encoder's score (kept as `score`; the first stage's as
        `first_score`), best first; ties keep the first stage's order."""
        if not hits:
            return []
        scores = self.model.predict([(query, h["text"]) for h in hits], batch_size=self.batch_size,
                                    show_progress_bar=False, convert_to_numpy=True)
        scores = [float(s) for s in scores.reshape(len(hits), -1)[:, 0]]
        order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))
        return [{**hits[i], "first_score": hits[i]["score"], "score": round(scores[i], 6)} for i in order[:k]]
