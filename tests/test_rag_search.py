"""Hybrid retrieval: BM25 keyword search in the index's SQLite sidecar (FTS5), dense hnswlib search, reciprocal
rank fusion of both, a cross-encoder reranker (a tiny one built here, loaded by sentence-transformers), and an
index built before keyword search existed."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from probllm.io import UsageError
from probllm.rag.search import RRF_K, candidates_for, fts_query, reciprocal_rank_fusion

ROOT = Path(__file__).resolve().parents[1]
# A LaTeX symbol of one update rule in examples/notes/ml/basics.md: an exact term an embedder blurs.
SYMBOL = r"\leftarrow"


def ids(hits: list[dict]) -> list[str]:
    return [h["id"] for h in hits]


def test_rrf_fuses_fixed_rankings_in_order():
    dense = [{"id": x, "score": 0.9} for x in "abcd"]
    keyword = [{"id": x, "score": 7.0} for x in "dbe"]
    fused = reciprocal_rank_fusion([dense, keyword])
    # b: 2/62 beats d: 1/64 + 1/61, which beats a: 1/61; c and e tie at 1/63: c ranked 3rd in the first list.
    assert ids(fused) == ["b", "d", "a", "c", "e"]
    assert fused[0]["score"] == round(2 / (RRF_K + 2), 6)
    assert fused[1]["score"] == round(1 / (RRF_K + 4) + 1 / (RRF_K + 1), 6)
    assert fused[0]["ranks"] == [2, 2] and fused[2]["ranks"] == [1, None] and fused[4]["ranks"] == [None, 3]
    # One list alone keeps its order; a passage listed twice in one list counts once.
    assert ids(reciprocal_rank_fusion([dense])) == list("abcd")
    assert reciprocal_rank_fusion([[{"id": "a"}, {"id": "a"}]])[0]["score"] == round(1 / (RRF_K + 1), 6)


def test_fts_query_takes_words_never_query_syntax():
    assert fts_query('What is "NOT" AND x_i* OR NEAR(a b)?') == \
        '"what" OR "is" OR "not" OR "and" OR "x" OR "i" OR "or" OR "near" OR "a" OR "b"'
    assert fts_query("?? -- **") == ""
    # Content-word pairs as phrases: the passage naming the principle outranks one with the words apart.
    assert '"pareto principle"' in fts_query("What does the Pareto principle say?")
    assert '"the pareto"' not in fts_query("What does the Pareto principle say?")


def test_keyword_search_finds_an_exact_term_that_dense_search_misses(notes_index):
    from probllm.rag.retrieve import Retriever

    chunk = [cid for cid, text in sqlite3.connect(f"file:{_sidecar(notes_index)}?mode=ro", uri=True)
             .execute("SELECT chunk_id, text FROM chunks") if SYMBOL in text]
    assert len(chunk) == 1
    keyword = Retriever(notes_index, search="keyword")
    assert keyword.embedder is None  # keyword search alone loads no model
    assert ids(keyword.search([SYMBOL], 3)[0])[0] == chunk[0]
    hybrid = Retriever(notes_index, search="hybrid")
    dense_hits = hybrid.index.search(hybrid.embedder.embed([SYMBOL]), k=3)[0]
    assert chunk[0] not in ids(dense_hits)
    # Fused, the keyword hit comes first; a query of plain words is still answered by both.
    assert ids(hybrid.search([SYMBOL], 3)[0])[0] == chunk[0]
    hits = hybrid.search(["worst-case running time of heapsort"], 3)[0]
    assert hits[0]["source"].endswith("heapsort.md") and all(set(h["ranks"]) != {None} for h in hits)
    assert "hybrid" in hybrid.describe() and "all-MiniLM-L6-v2" in hybrid.describe()


def _sidecar(index: str) -> Path:
    manifest = json.loads((Path(index) / "manifest.json").read_text())
    return Path(index) / manifest["files"]["chunks"]


def test_index_built_before_keyword_search_answers_dense_and_is_upgraded_by_reindexing(notes_index, tmp_path,
                                                                                      capsys):
    from probllm.rag.index import build_index
    from probllm.rag.retrieve import Retriever

    old = tmp_path / "old.idx"
    shutil.copytree(notes_index, old)
    db = sqlite3.connect(_sidecar(str(old)))  # what an index of the previous release holds: no FTS table
    db.executescript("DROP TRIGGER chunks_fts_insert; DROP TRIGGER chunks_fts_delete; DROP TABLE chunks_fts;")
    db.close()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["keyword"], manifest["root"]
    (old / "manifest.json").write_text(json.dumps(manifest))

    retriever = Retriever(str(old), search="hybrid")
    err = capsys.readouterr().err
    assert err.count("built before keyword search") == 1 and "re-index" in err
    assert retriever.mode == "dense"
    hits = retriever.search(["worst-case running time of heapsort"], 2)[0]
    assert hits and hits[0]["source"].endswith("heapsort.md")
    assert retriever.search([SYMBOL], 3)[0] and capsys.readouterr().err == ""  # said once, at load

    report = build_index([str(ROOT / "examples" / "notes")], str(old))
    assert report.chunks_embedded == 0 and report.unchanged == report.documents  # no vector is recomputed
    upgraded = Retriever(str(old), search="keyword")
    assert upgraded.mode == "keyword" and "built before" not in capsys.readouterr().err
    assert SYMBOL in upgraded.search([SYMBOL], 1)[0][0]["text"]


def test_keyword_table_follows_incremental_updates(tmp_path):
    from probllm.rag.index import build_index
    from probllm.rag.retrieve import Retriever

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("# Shellsort\n\nCiura found the gap sequence 1, 4, 10, 23, 57, 132, 301, 701.\n")
    (notes / "b.md").write_text("# Quicksort\n\nLomuto's partition scheme is simpler than Hoare's.\n")
    idx = str(tmp_path / "n.idx")
    build_index([str(notes)], idx)
    assert [h["source"] for h in Retriever(idx, search="keyword").search(["Lomuto"], 5)[0]] == [str(notes / "b.md")]
    (notes / "b.md").write_text("# Quicksort\n\nHoare's partition scheme does fewer swaps.\n")
    (notes / "a.md").unlink()
    build_index([str(notes)], idx)
    keyword = Retriever(idx, search="keyword")
    assert keyword.search(["Lomuto"], 5)[0] == [] and keyword.search(["Ciura"], 5)[0] == []
    assert [h["source"] for h in keyword.search(["swaps"], 5)[0]] == [str(notes / "b.md")]


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory) -> str:
    """A 1-layer BERT cross-encoder with a WordPiece tokenizer trained here, saved as safetensors: small enough to
    build in a second, real enough that sentence-transformers loads and runs it as any hub cross-encoder."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("cross-encoder")
    texts = [p.read_text() for p in (ROOT / "examples" / "notes").rglob("*.md")]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    BertTokenizerFast(tokenizer_object=tok, model_max_length=256).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    return str(folder)


def test_reranker_rescores_the_fused_candidates(notes_index, tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    from probllm.rag.retrieve import Retriever

    query = "worst-case running time of heapsort"
    plain = Retriever(notes_index, search="hybrid")
    candidates = plain.search([query], candidates_for(3))[0]
    reranked = Retriever(notes_index, search="hybrid", reranker=tiny_cross_encoder)
    assert "reranked by" in reranked.describe()
    hits = reranked.search([query], 3)[0]
    # The cross-encoder's own scores of (query, passage) over the fused candidates decide the order.
    scores = CrossEncoder(tiny_cross_encoder).predict([(query, h["text"]) for h in candidates])
    expected = sorted(range(len(candidates)), key=lambda i: (-float(scores[i]), i))[:3]
    assert ids(hits) == [candidates[i]["id"] for i in expected]
    assert [h["score"] for h in hits] == pytest.approx([float(scores[i]) for i in expected], abs=1e-5)
    assert [h["first_score"] for h in hits] == [candidates[i]["score"] for i in expected]
    with pytest.raises(UsageError, match="--reranker .*cannot load"):
        Retriever(notes_index, search="hybrid", reranker=str(Path(tiny_cross_encoder) / "missing"))


def test_retrieve_cli_search_option(cli, notes_index):
    run = cli("retrieve", "--index", notes_index, SYMBOL, "--search", "keyword", "-k", "1")
    assert run.code == 0, run.stderr
    [hit] = run.records
    assert SYMBOL in hit["text"] and hit["rank"] == 1 and "search: keyword (BM25)" in run.stderr
    bad = cli("retrieve", "--index", notes_index, "x", "--search", "fuzzy")
    assert bad.code == 2 and "fuzzy" in bad.stderr and "Traceback" not in bad.stderr


def test_rag_eval_measures_each_mode_reranked_too(notes_index, tiny_cross_encoder, tmp_path):
    from typer.testing import CliRunner

    from probllm.cli import app

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "h", "question": "Worst case of heapsort?", "source": "heapsort.md"}) + "\n")
    run = CliRunner().invoke(app, ["rag-eval", "--index", notes_index, str(questions), "--search", "hybrid",
                                   "--reranker", tiny_cross_encoder, "-k", "3"])
    assert run.exit_code == 0, run.stderr
    assert [json.loads(line)["search"] for line in run.stdout.splitlines()] == ["hybrid", "hybrid+rerank"]
    assert "| hybrid+rerank | 1 |" in run.stderr and f"reranker {tiny_cross_encoder}" in run.stderr


def test_one_citation_format_for_every_source_list():
    from probllm.rag.ask import Question, build_messages, show_sources
    from probllm.rag.chat import format_sources_line
    from probllm.rag.retrieve import citation, location

    pdf = {"id": "w3/lecture3.pdf#ab12cd34", "source": "w3/lecture3.pdf", "page": 4, "heading": "Entropy > Gibbs",
           "text": "S = k log W", "score": 0.5}
    md = {"id": "notes/heap.md#1", "source": "notes/heap.md", "page": None, "heading": "Heapsort", "text": "x"}
    assert citation(pdf) == "w3/lecture3.pdf, p. 4 > Entropy > Gibbs" and location(pdf) == "w3/lecture3.pdf, p. 4"
    assert citation(md) == "notes/heap.md > Heapsort" and citation({"id": "r:7", "source": "r:7"}) == "r:7"
    assert "[1] w3/lecture3.pdf, p. 4 > Entropy > Gibbs" in format_sources_line([pdf])
    assert 'from="w3/lecture3.pdf, p. 4 > Entropy > Gibbs"' in build_messages(Question("q", passages=[pdf]))[1]["content"]
    err = io.StringIO()
    show_sources([pdf, md], err=err)
    assert "[1] w3/lecture3.pdf, p. 4 > Entropy > Gibbs (score 0.500)" in err.getvalue()
