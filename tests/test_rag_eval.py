"""`probllm rag-eval`: hit@k and MRR by file and by page, for each search mode, on the example notes index."""

from __future__ import annotations

import json

import pytest

from probllm.io import RecordError
from probllm.rag.rageval import Expected, Tally, first_rank, metrics_table, parse_expected, same_file


def test_ranks_by_file_and_by_page():
    hits = [{"source": "notes/week1/intro.pdf", "page": 2}, {"source": "notes/week3/lecture3.pdf", "page": 7},
            {"source": "notes/week3/lecture3.pdf", "page": 4}]
    expected = Expected("q", ["lecture3.pdf"], {4, 5})
    assert first_rank(hits, expected, by_page=False) == 2
    assert first_rank(hits, expected, by_page=True) == 3
    assert first_rank(hits, Expected("q", ["ecture3.pdf"], None), by_page=False) is None  # whole names only
    by_file = parse_expected({"question": "q", "source": ["intro.pdf", "lecture3.pdf"],
                              "pages": {"intro.pdf": [2], "lecture3.pdf": [9]}})
    assert first_rank(hits, by_file, by_page=True) == 1 and first_rank(hits[1:], by_file, by_page=True) is None
    assert same_file("notes/week3/lecture3.pdf", "week3/lecture3.pdf") and same_file("a.md", "./a.md")
    tally = Tally()
    tally.add(2, 3, True)
    tally.add(None, None, True)
    tally.add(1, None, False)
    f = tally.figures()
    assert (f["file_hit"], f["file_mrr"]) == (round(2 / 3, 4), round((1 / 2 + 1) / 3, 4))
    assert (f["page_questions"], f["page_hit"], f["page_mrr"]) == (2, 0.5, round(1 / 3 / 2, 4))
    assert "| hybrid | 3 | 0.667 | 0.500 | 2 | 0.500 | 0.167 |" in metrics_table({"hybrid": tally}, 5)


def test_bad_expectations_name_the_field():
    with pytest.raises(RecordError, match="source"):
        parse_expected({"question": "q"})
    with pytest.raises(RecordError, match="pages"):
        parse_expected({"question": "q", "source": "a.pdf", "pages": [0]})
    assert parse_expected({"question": "q", "source": "a.pdf", "pages": 3}).pages == {3}
    with pytest.raises(RecordError, match="b.pdf"):
        parse_expected({"question": "q", "source": "a.pdf", "pages": {"b.pdf": [1]}})


def test_rag_eval_cli_on_the_notes_index(notes_index, tmp_path):
    from typer.testing import CliRunner

    from probllm.cli import app

    questions = tmp_path / "q.jsonl"
    rows = [{"id": "sym", "question": r"\leftarrow", "source": "basics.md", "topic": "ml"},
            {"id": "heap", "question": "Worst-case running time of heapsort?", "source": ["heapsort.md"]},
            {"id": "bad", "question": "No source given"}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = tmp_path / "s.json"
    # In process (the command's own code path, without a second interpreter loading torch).
    run = CliRunner().invoke(app, ["rag-eval", "--index", notes_index, str(questions), "-k", "3", "--summary",
                                   str(summary), "--skip-invalid"])
    assert run.exit_code == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(r["id"], r["search"]) for r in records] == [(i, m) for i in ("sym", "heap")
                                                        for m in ("dense", "keyword", "hybrid")]
    ranks = {(r["id"], r["search"]): r["file_rank"] for r in records}
    assert ranks[("heap", "dense")] == 1 and ranks[("sym", "keyword")] == 1 and ranks[("sym", "hybrid")] == 1
    assert records[0]["topic"] == "ml" and len(records[0]["hits"]) == 3  # unknown fields kept
    assert "| hybrid | 2 | 1.000 | 1.000 |" in run.stderr
    assert "3 in, 6 out, 1 invalid" in run.stderr
    figures = json.loads(summary.read_text())
    assert figures["command"] == "rag-eval" and figures["k"] == 3 and figures["embedder"] == "all-MiniLM-L6-v2"
    assert figures["retrieval"]["hybrid"]["file_hit"] == 1.0 and figures["retrieval"]["keyword"]["file_mrr"] == 1.0
    assert figures["retrieval"]["dense"]["page_hit"] is None
