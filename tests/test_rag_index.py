"""The notes index with the real embedder and real hnswlib: incremental updates, atomic commits, embedder
checks, and retrieval of the passage a question was written from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from probllm.io import UsageError
from probllm.rag.index import Embedder, RagIndex, build_index, read_manifest
from probllm.rag.retrieve import Retriever

ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT / "examples" / "notes"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(None)


def write_notes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.md").write_text("# Alpha\n\nThe mitochondria is the powerhouse of the cell.\n\n"
                                 "## Respiration\n\nCells turn glucose and oxygen into ATP, water and CO2.\n")
    (folder / "b.md").write_text("# Beta\n\nA prime number has exactly two divisors: one and itself.\n")
    (folder / "c.txt").write_text("Water boils at 100 degrees Celsius at sea level.\n\n"
                                  "At higher altitude it boils at a lower temperature.\n")
    return folder


def search(folder, text, embedder, k=3):
    index = RagIndex(folder)
    try:
        return index.search(embedder.embed([text]), k=k)[0]
    finally:
        index.close()


def test_incremental_reindex_embeds_only_what_changed(tmp_path, embedder):
    notes = write_notes(tmp_path / "notes")
    out = tmp_path / "n.idx"
    first = build_index([str(notes)], str(out), embedder=embedder)
    assert (first.added, first.chunks_embedded) == (3, first.chunks_total) and first.chunks_total >= 4

    # Nothing changed: nothing embedded, the generation is kept as it was.
    before = embedder.texts_embedded
    gen = read_manifest(out)["generation"]
    again = build_index([str(notes)], str(out), embedder=embedder)
    assert embedder.texts_embedded == before and again.unchanged == 3
    assert read_manifest(out)["generation"] == gen

    # Change one section of a.md, delete b.md, add d.md.
    a = notes / "a.md"
    a.write_text(a.read_text().replace("ATP, water and CO2", "ATP in the mitochondria"))
    (notes / "b.md").unlink()
    (notes / "d.md").write_text("# Delta\n\nNewton's second law: force equals mass times acceleration.\n")
    calls_before, texts_before = embedder.calls, embedder.texts_embedded
    third = build_index([str(notes)], str(out), embedder=embedder)
    assert (third.added, third.changed, third.removed, third.unchanged) == (1, 1, 1, 1)
    # Only the changed chunk of a.md and the new d.md chunk are embedded, in one batched call; the
    # unchanged first section of a.md keeps its vector.
    assert embedder.texts_embedded - texts_before == third.chunks_embedded == 2
    assert embedder.calls - calls_before == 1 and third.chunks_reused == 1

    hits = search(out, "prime number divisors", embedder, k=10)
    assert all("b.md" not in h["source"] for h in hits)  # deleted: gone
    assert any("d.md" in h["source"] for h in hits)
    top = search(out, "What do cells turn glucose into?", embedder)[0]
    assert "ATP in the mitochondria" in top["text"] and top["heading"] == "Alpha > Respiration"
    # Only the current generation's files remain.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", read_manifest(out)["files"]["vectors"], read_manifest(out)["files"]["chunks"]])
    assert read_manifest(out)["chunks"] == RagIndex(out).count == third.chunks_total


def test_deleted_slots_are_reused_and_results_stay_consistent(tmp_path, embedder):
    notes = write_notes(tmp_path / "notes")
    out = tmp_path / "n.idx"
    for i in range(3):  # churn: the same file rewritten each round
        (notes / "b.md").write_text(f"# Beta {i}\n\nRound {i}: a prime number has exactly two divisors.\n")
        build_index([str(notes)], str(out), embedder=embedder)
    manifest = read_manifest(out)
    assert manifest["capacity_used"] <= manifest["chunks"] + 1  # replace_deleted reused the freed slot
    hits = search(out, "prime number divisors", embedder, k=manifest["chunks"])
    assert len(hits) == manifest["chunks"] and len({h["id"] for h in hits}) == len(hits)
    assert hits[0]["text"].startswith("Beta 2")


def test_crash_before_the_manifest_keeps_the_old_index(tmp_path, embedder):
    notes = write_notes(tmp_path / "notes")
    out = tmp_path / "n.idx"
    build_index([str(notes)], str(out), embedder=embedder)
    old_manifest = (out / "manifest.json").read_text()
    (notes / "b.md").write_text("# Beta\n\nCompletely new text about black holes and event horizons.\n")

    def crash(stage):
        if stage == "files-written":
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        build_index([str(notes)], str(out), embedder=embedder, hook=crash)
    assert (out / "manifest.json").read_text() == old_manifest
    top = search(out, "How many divisors does a prime have?", embedder)[0]
    assert "exactly two divisors" in top["text"]  # the old content, fully loadable
    assert len(list(out.iterdir())) == 3  # the crashed run's files were removed
    build_index([str(notes)], str(out), embedder=embedder)
    assert "black holes" in search(out, "event horizon of a black hole", embedder)[0]["text"]


def test_killed_process_leaves_a_loadable_index(tmp_path, embedder):
    """SIGKILL (no cleanup code runs) after the new files are written, before the manifest: the old index
    loads, and the next run removes the orphans."""
    notes = write_notes(tmp_path / "notes")
    out = tmp_path / "n.idx"
    build_index([str(notes)], str(out), embedder=embedder)
    (notes / "b.md").write_text("# Beta\n\nEntirely different: photosynthesis makes sugar from light.\n")
    script = textwrap.dedent(f"""
        import os, signal
        from probllm.rag.index import build_index
        def die(stage):
            if stage == "files-written":
                os.kill(os.getpid(), signal.SIGKILL)
        build_index([{str(notes)!r}], {str(out)!r}, hook=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(list(out.iterdir())) == 5  # the orphans of generation 2 are there...
    top = search(out, "How many divisors does a prime have?", embedder)[0]
    assert "exactly two divisors" in top["text"]  # ...but the manifest still names generation 1
    build_index([str(notes)], str(out), embedder=embedder)
    assert len(list(out.iterdir())) == 3
    assert "photosynthesis" in search(out, "How do plants make sugar?", embedder)[0]["text"]


def test_another_embedder_is_refused(tmp_path, embedder, cli):
    notes = write_notes(tmp_path / "notes")
    out = tmp_path / "n.idx"
    build_index([str(notes)], str(out), embedder=embedder)
    with pytest.raises(UsageError, match="built with embedder all-MiniLM-L6-v2"):
        Retriever(str(out), embedder="sentence-transformers/all-mpnet-base-v2")
    with pytest.raises(UsageError, match="built with embedder all-MiniLM-L6-v2"):
        build_index([str(notes)], str(out), embedder="BAAI/bge-small-en-v1.5")
    run = cli("retrieve", "--index", out, "--embedder", "intfloat/e5-small-v2", "anything")
    assert run.code == 2 and run.stdout == ""
    assert "built with embedder all-MiniLM-L6-v2 (384-d)" in run.stderr and "Traceback" not in run.stderr
    # The index's own embedder is accepted by its name.
    Retriever(str(out), embedder="all-MiniLM-L6-v2").close()


# Questions written from one passage each of examples/notes, and the heading of that passage.
QUESTIONS = [
    ("What is the worst-case running time of heapsort?", "Heapsort > Complexity"),
    ("How are the children of a node stored in the array of a binary heap?", "Heapsort > The binary heap"),
    ("Which sort starts with quicksort and switches to heapsort when recursion is too deep?",
     "Heapsort > Heapsort compared with quicksort and merge sort"),
    ("What is the SI unit of force?", "Newtonian mechanics > Newton's laws of motion"),
    ("At what launch angle is the range of a projectile largest?", "Newtonian mechanics > Projectile motion"),
    ("What does the work-energy theorem say?", "Newtonian mechanics > Work and kinetic energy"),
    ("What does the learning rate control in gradient descent?", "Machine learning basics > Gradient descent"),
    ("How does weight decay reduce overfitting?", "Machine learning basics > Overfitting and regularization"),
]


def test_retrieve_finds_the_passage_a_question_was_written_from(tmp_path, cli, embedder):
    out = tmp_path / "notes.idx"
    build_index([str(NOTES)], str(out), embedder=embedder)
    records = "".join(json.dumps({"id": f"q{i}", "question": q, "keep": i}) + "\n"
                      for i, (q, _) in enumerate(QUESTIONS))
    run = cli("retrieve", "--index", out, "--attach", "-k", "3", input=records)
    assert run.code == 0, run.stderr
    assert len(run.records) == len(QUESTIONS)
    top1 = 0
    for rec, (_, heading) in zip(run.records, QUESTIONS):
        assert rec["keep"] == int(rec["id"][1:])  # input fields kept
        assert [set(c) for c in rec["context"]] == [{"id", "score", "text", "source", "heading", "page"}] * 3
        headings = [c["heading"] for c in rec["context"]]
        assert heading in headings, (rec["question"], headings)
        top1 += headings[0] == heading
    assert top1 >= len(QUESTIONS) - 1
    # The text mode: one record per passage, best first.
    from probllm.rag.retrieve import retrieve_text

    retriever = Retriever(str(out))
    hits = retrieve_text(retriever, QUESTIONS[0][0], k=2)
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["score"] >= hits[1]["score"]
    assert hits[0]["source"].endswith("heapsort.md") and hits[0]["heading"] == QUESTIONS[0][1]


def test_jsonl_documents_and_bad_records(tmp_path, embedder):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "x1", "body": "Entropy measures uncertainty."}) + "\n"
                    + json.dumps({"id": "x2", "title": "no body"}) + "\n")
    from probllm.io import RecordError, Stats

    with pytest.raises(RecordError) as err:
        build_index([str(docs)], str(tmp_path / "j.idx"), embedder=embedder, text_field="body")
    assert str(err.value) == f"{docs}:2: field 'body': missing"
    stats = Stats(command="probllm index")
    report = build_index([str(docs)], str(tmp_path / "j.idx"), stats=stats, embedder=embedder,
                         text_field="body", skip_invalid=True)
    assert report.documents == 1 and stats.invalid == {"body: missing": 1}
    hit = search(tmp_path / "j.idx", "uncertainty", embedder)[0]
    assert hit["source"] == f"{os.path.normpath(docs)}:x1"


def test_interrupted_run_keeps_its_checkpoints_and_the_next_run_continues(tmp_path, embedder):
    notes = tmp_path / "notes"
    notes.mkdir()
    topics = ["photosynthesis in plants", "the heart pumps blood", "volcanoes erupt lava", "stars fuse hydrogen",
              "rivers carve valleys", "bees pollinate flowers"]
    for i, topic in enumerate(topics):
        (notes / f"n{i}.md").write_text(f"# Note {i}\n\nThis note is about {topic}.\n")
    out = tmp_path / "n.idx"
    commits = []

    def interrupt_at_second_checkpoint(stage):
        if stage == "files-written":
            commits.append(stage)
            if len(commits) == 2:
                raise KeyboardInterrupt

    before = embedder.texts_embedded
    with pytest.raises(KeyboardInterrupt):
        build_index([str(notes)], str(out), embedder=embedder, checkpoint_chunks=2, hook=interrupt_at_second_checkpoint)
    first_run = embedder.texts_embedded - before
    kept = read_manifest(out)
    assert kept["documents"] == 2 and kept["chunks"] == 2  # the first checkpoint survived the interruption
    assert len(list(out.iterdir())) == 3
    before = embedder.texts_embedded
    report = build_index([str(notes)], str(out), embedder=embedder, checkpoint_chunks=2)
    # Nothing lost, nothing done twice: the committed documents are not embedded again.
    assert (report.unchanged, report.added) == (2, 4)
    assert embedder.texts_embedded - before == 4 and first_run == 4
    assert "volcanoes" in search(out, "lava eruption", embedder)[0]["text"]
