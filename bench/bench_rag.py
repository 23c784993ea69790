"""Retrieval benchmarks: indexing throughput, ANN recall and latency, `ask` time to first token.

1. Indexing throughput: `build_index` (clean, chunk, embed, hnswlib insert, SQLite, atomic commit) against plain
   `SentenceTransformer.encode` of the very same chunk texts, same model and batch size, measured in the same
   run (target: index >= 0.9x encode: the embedder is the limit). Corpus: ../shared/examples/corpus/cs231n when
   present, else examples/notes.
2. ANN: hnswlib (cosine) on synthetic clustered 384-d unit vectors (like sentence embeddings: neighbours share
   a topic) at 10k and 100k vectors; recall@10 against exact numpy search and single-query latency p50/p99
   (one thread) for several ef values (target: recall >= 0.98 and p50 < 2 ms at 100k).
3. `ask` time to first token with the default SmolLM2, with and without the notes index (model already loaded;
   retrieval, prompt building and the prefill count).
5. Search quality (`--sections search`): hit@5 and MRR, by file and by page, of dense, keyword (BM25) and hybrid
   (RRF) search on the CS231n notes and the real lecture PDFs (`--pdfs`), with our own questions located by page
   (bench/rag/questions-*.jsonl; target: page-level hit@5 >= 0.8 with hybrid on the PDFs, hybrid >= dense).
4. Formats (`--sections formats`): PDF extraction pages/s of `probllm.rag.extract.read_pdf` (PDFium text plus
   headings, header/footer and hyphen clean-up) against the raw extraction loops of pypdfium2 and pypdf on the same
   real lecture PDFs (`--pdfs`, default /work/rag-pdfs/scicomp: see docs/rag.md for where they come from), the
   text-quality counts behind the choice of PDFium, `probllm index` build time of those PDFs, and peak memory
   of extraction and chunking for 1x and 4x as many files (flat: documents stream one at a time).

    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_rag.py            # about 3-4 minutes on 2 cores
    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_rag.py --sections formats   # about 2 minutes
    .venv/bin/python bench/bench_rag.py --sizes 10000 --quick                     # a smoke run

Prints markdown tables and writes them to bench/results/rag.md; each section sits between `<!-- section: NAME -->`
markers, so a run of some `--sections` replaces only theirs and keeps the others' last results.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from offline import ROOT  # noqa: E402  (offline, and this checkout importable)

DIM = 384
K = 10


def bench_indexing(corpus: Path, repeats: int) -> dict:
    from probllm.io import Stats
    from probllm.rag.chunk import chunk_document
    from probllm.rag.index import Embedder, build_index, iter_documents, Settings

    embedder = Embedder(None)
    settings = Settings()
    texts = []
    for doc in iter_documents([str(corpus)], Stats()):
        chunks = chunk_document(doc.text, embedder.count_tokens, settings.chunk_tokens, settings.overlap,
                                markdown=doc.markdown, blocks=doc.blocks)
        texts.extend(c.embed_text() for c in chunks)
    embedder.model.encode(texts[:128], batch_size=embedder.batch_size)  # warm-up (threads, allocator)

    index_times, encode_times = [], []
    for _ in range(repeats):
        tmp = Path(tempfile.mkdtemp(prefix="bench-rag-"))
        try:
            t = time.perf_counter()
            report = build_index([str(corpus)], str(tmp / "idx"), embedder=embedder)
            index_times.append(time.perf_counter() - t)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        assert report.chunks_embedded == len(texts), (report.chunks_embedded, len(texts))
        t = time.perf_counter()
        embedder.model.encode(texts, batch_size=embedder.batch_size, normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=False)
        encode_times.append(time.perf_counter() - t)
    best_index, best_encode = min(index_times), min(encode_times)
    return {"corpus": str(corpus.relative_to(ROOT.parent) if corpus.is_relative_to(ROOT.parent) else corpus),
            "chunks": len(texts), "index_s": best_index, "encode_s": best_encode,
            "index_rate": len(texts) / best_index, "encode_rate": len(texts) / best_encode,
            "ratio": best_encode / best_index}


def clustered(n: int, rng, n_clusters: int, spread: float = 1.0):
    import numpy as np

    centers = rng.standard_normal((n_clusters, DIM)).astype(np.float32)
    assign = rng.integers(0, n_clusters, size=n)
    x = centers[assign] + spread * rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, centers


def exact_topk(x, q, k: int):
    import numpy as np

    out = np.empty((len(q), k), dtype=np.int64)
    for i in range(0, len(q), 256):
        sims = q[i:i + 256] @ x.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        out[i:i + 256] = np.take_along_axis(part, order, axis=1)
    return out


def bench_ann(n: int, n_queries: int, efs: list[int], M: int, ef_construction: int, seed: int) -> list[dict]:
    import hnswlib
    import numpy as np

    rng = np.random.default_rng(seed)
    n_clusters = max(10, n // 100)
    x, centers = clustered(n, rng, n_clusters)
    assign = rng.integers(0, n_clusters, size=n_queries)
    q = centers[assign] + rng.standard_normal((n_queries, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)

    index = hnswlib.Index(space="cosine", dim=DIM)
    index.init_index(max_elements=n, M=M, ef_construction=ef_construction, random_seed=seed)
    index.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    index.add_items(x, np.arange(n))
    build_s = time.perf_counter() - t
    truth = exact_topk(x, q, K)

    # Exact search latency for one query, for reference.
    brute = []
    for i in range(min(200, n_queries)):
        t = time.perf_counter_ns()
        sims = x @ q[i]
        np.argpartition(-sims, K)[:K]
        brute.append((time.perf_counter_ns() - t) / 1e6)

    index.set_num_threads(1)
    rows = []
    for ef in efs:
        index.set_ef(max(ef, K))
        labels, _ = index.knn_query(q, k=K)
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(labels, truth)]))
        lat = []
        for i in range(n_queries):
            qi = q[i:i + 1]
            t = time.perf_counter_ns()
            index.knn_query(qi, k=K)
            lat.append((time.perf_counter_ns() - t) / 1e6)
        lat.sort()
        rows.append({"n": n, "ef": ef, "recall": recall, "p50": lat[len(lat) // 2],
                     "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "build_s": build_s,
                     "brute_p50": statistics.median(brute)})
    return rows


def bench_ask(runs: int, max_new_tokens: int) -> dict:
    from probllm.rag.ask import Generator, ask_one
    from probllm.rag.index import build_index
    from probllm.rag.retrieve import Retriever

    tmp = Path(tempfile.mkdtemp(prefix="bench-ask-"))
    try:
        build_index([str(ROOT / "examples" / "notes")], str(tmp / "notes.idx"))
        retriever = Retriever(str(tmp / "notes.idx"))
        t = time.perf_counter()
        generator = Generator(None)
        load_s = time.perf_counter() - t
        question = "What is the worst-case running time of heapsort?"
        ask_one(question, generator, retriever, max_new_tokens=4)  # warm-up
        out = {"load_s": load_s}
        for label, r in (("with index", retriever), ("without index", None)):
            ttft, total, tokens = [], [], []
            for _ in range(runs):
                res = ask_one(question, generator, r, max_new_tokens=max_new_tokens)
                ttft.append(res.seconds_to_first_token)
                total.append(res.seconds_total)
                tokens.append(len(generator.tok(res.answer, add_special_tokens=False)["input_ids"]))
            out[label] = {"ttft": statistics.median(ttft), "total": statistics.median(total),
                          "tokens": statistics.median(tokens)}
        retriever.close()
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ formats (PDF)

DEFAULT_PDFS = Path("/work/rag-pdfs/scicomp")


def _pdfium_raw(path: str) -> tuple[int, str]:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(path)
    texts = [doc[i].get_textpage().get_text_range() for i in range(len(doc))]
    doc.close()
    return len(texts), "\n".join(texts)


def _pypdf_raw(path: str) -> tuple[int, str]:
    from pypdf import PdfReader

    texts = [page.extract_text() or "" for page in PdfReader(path).pages]
    return len(texts), "\n".join(texts)


def _probllm_pdf(path: str) -> tuple[int, str]:
    from probllm.rag.extract import read_pdf

    got = read_pdf(path)
    return got.pages, got.text


def text_quality(text: str) -> dict:
    """What the index would hold that a reader does not want: ligature code points, hyphens of line breaks
    (a lowercase word broken by `-` at the end of a line), PDFium's hyphen marks, letters split by spaces."""
    return {
        "ligatures": sum(text.count(chr(c)) for c in range(0xFB00, 0xFB07)),
        "hyphen breaks": len(re.findall(r"[a-z]-\n[a-z]", text)) + text.count("\ufffe"),
        "chars": len(text),
    }


def bench_extraction(pdfs: list[Path], repeats: int) -> list[dict]:
    rows = []
    for label, fn in (("pypdfium2 raw loop (`get_text_range` per page)", _pdfium_raw),
                      ("pypdf raw loop (`page.extract_text()` per page)", _pypdf_raw),
                      ("`probllm` PDF extractor (pypdfium2 + headings, clean-up)", _probllm_pdf)):
        if fn is _pypdf_raw and importlib.util.find_spec("pypdf") is None:
            print("pypdf is not installed (make bench-setup): its row is left out", file=sys.stderr)
            continue
        best, pages, text = None, 0, ""
        for _ in range(repeats):
            t = time.perf_counter()
            out = [fn(str(p)) for p in pdfs]
            elapsed = time.perf_counter() - t
            best = elapsed if best is None else min(best, elapsed)
            pages, text = sum(n for n, _ in out), "\n".join(t for _, t in out)
        rows.append({"label": label, "seconds": best, "pages": pages, "rate": pages / best, **text_quality(text)})
    return rows


def bench_pdf_index(pdfs: list[Path]) -> dict:
    from probllm.io import Stats
    from probllm.rag.index import Embedder, build_index

    embedder = Embedder(None)
    embedder.embed(["warm-up"] * 8)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rag-pdf-"))
    try:
        folder = tmp / "pdfs"
        folder.mkdir()
        for p in pdfs:
            (folder / p.name).symlink_to(p)
        stats = Stats(command="probllm index")
        t = time.perf_counter()
        report = build_index([str(folder)], str(tmp / "idx"), stats=stats, embedder=embedder)
        elapsed = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"seconds": elapsed, "chunks": report.chunks_total, "documents": report.documents,
            "pages": stats.notes.get("pages", 0)}


MEMORY_PROBE = """
import sys
sys.path.insert(0, {root!r})
from probllm.io import Stats
from probllm.rag.chunk import chunk_document, token_counter
from probllm.rag.index import iter_documents
from types import SimpleNamespace
from tokenizers import Tokenizer
from probllm.models import resolve_embedder
# The embedder's own tokenizer, without importing torch (whose 1 GB would hide what the documents cost).
count = token_counter(SimpleNamespace(_tokenizer=Tokenizer.from_file(resolve_embedder(None) + "/tokenizer.json")))
count(["warm-up"])
def peak_kb():
    # VmHWM is this program's own high-water mark (ru_maxrss would carry the forking parent's over exec).
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1])
base = peak_kb()
n = 0
for doc in iter_documents([{folder!r}], Stats()):
    n += len(chunk_document(doc.text, count, 200, 40, markdown=doc.markdown, blocks=doc.blocks))
print(n, base, peak_kb())
"""


def bench_memory(pdfs: list[Path], factors=(1, 4)) -> list[dict]:
    """Peak memory of reading, extracting and chunking the PDFs, and of 4x as many files (the same PDFs under
    other names): flat, since `iter_documents` yields one document at a time."""
    import subprocess

    rows = []
    for factor in factors:
        tmp = Path(tempfile.mkdtemp(prefix="bench-rag-mem-"))
        try:
            for copy in range(factor):
                for p in pdfs:
                    (tmp / f"{copy}-{p.name}").symlink_to(p)
            code = MEMORY_PROBE.format(root=str(ROOT), folder=str(tmp))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            chunks, base_kb, peak_kb = map(int, out.stdout.split()[-3:])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append({"files": factor * len(pdfs), "chunks": chunks, "base_mb": base_kb / 1024,
                     "peak_mb": peak_kb / 1024})
    return rows


def formats_section(emit, pdf_dir: Path, repeats: int) -> None:
    pdfs = sorted(pdf_dir.glob("*.pdf")) if pdf_dir.is_dir() else []
    emit("## Formats: PDF extraction, on real lecture PDFs")
    emit()
    if not pdfs:
        emit(f"_No PDFs in {pdf_dir} (pass --pdfs DIR): section not measured._")
        return
    ext = bench_extraction(pdfs, repeats)
    reference = ext[0]["rate"]
    emit(f"{len(pdfs)} PDFs, {ext[0]['pages']} pages ({pdf_dir}: lecture slides exported by LibreOffice and "
         f"pdfTeX lecture notes, CC BY-SA 4.0; docs/rag.md names the repository); best of {repeats}.")
    emit()
    emit("| extraction | seconds | pages/s | vs pypdfium2 raw | ligature code points left | hyphenated line "
         "breaks left | characters |")
    emit("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in ext:
        emit(f"| {r['label']} | {r['seconds']:.2f} | {r['rate']:.0f} | {r['rate'] / reference:.2f}x | "
             f"{r['ligatures']} | {r['hyphen breaks']} | {r['chars']:,} |")
    emit()
    ix = bench_pdf_index(pdfs)
    emit(f"`probllm index` of these PDFs into a new index (extract, chunk, embed with all-MiniLM-L6-v2, hnswlib, "
         f"SQLite, commit): {ix['seconds']:.1f} s for {ix['pages']} pages, {ix['chunks']} chunks "
         f"({ix['pages'] / ix['seconds']:.1f} pages/s; the embedder takes most of it).")
    emit()
    emit("| files | chunks | peak memory (MB) | before the first file (MB) | growth (MB) |")
    emit("| ---: | ---: | ---: | ---: | ---: |")
    for r in bench_memory(pdfs):
        emit(f"| {r['files']} | {r['chunks']} | {r['peak_mb']:.0f} | {r['base_mb']:.0f} | "
             f"{r['peak_mb'] - r['base_mb']:.0f} |")
    emit()
    emit("Peak memory of `iter_documents` + `chunk_document` (real tokenizer) in a fresh process; the 4x row reads "
         "each PDF four times under other names.")


QUESTION_SETS = (  # (name, questions file); the material is --corpus / --pdfs (never committed: see docs/rag.md)
    ("CS231n notes (markdown)", "corpus", ROOT / "bench" / "rag" / "questions-cs231n.jsonl"),
    ("scicomp lecture PDFs (slides, exercises, notes)", "pdfs", ROOT / "bench" / "rag" / "questions-pdf.jsonl"),
)
SEARCH_RUNS = [("dense", False), ("keyword", False), ("hybrid", False)]


def bench_search(folder: Path, questions: Path, k: int) -> dict:
    """Index `folder`, then rag-eval's hit@k and MRR (file and page level) of each search mode on `questions`,
    and the median search time per question of each mode (one query per call, model loaded)."""
    from probllm.io import Stats, read_records
    from probllm.rag.index import build_index
    from probllm.rag.rageval import evaluate_retrieval
    from probllm.rag.retrieve import Retriever

    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        t = time.perf_counter()
        report = build_index([str(folder)], str(tmp / "idx"))
        build_s = time.perf_counter() - t
        retriever = Retriever(str(tmp / "idx"), search="hybrid")
        tallies: dict = {}
        stats = Stats(command="bench")
        records = list(evaluate_retrieval(read_records([str(questions)], stats=stats), retriever, SEARCH_RUNS,
                                          tallies, stats, k=k))
        texts = sorted({r["question"] for r in records})
        times: dict[str, list[float]] = {mode: [] for mode, _ in SEARCH_RUNS}
        for q in texts:  # the modes interleaved, question by question: load on the machine hits all alike
            for mode, _ in SEARCH_RUNS:
                t = time.perf_counter()
                retriever.search([q], k, mode=mode)
                times[mode].append((time.perf_counter() - t) * 1000)
        latency = {mode: statistics.median(ts) for mode, ts in times.items()}
        retriever.close()
        return {"chunks": report.chunks_total, "documents": report.documents, "build_s": build_s,
                "figures": {label: t.figures() for label, t in tallies.items()}, "latency_ms": latency,
                "misses": sorted({r["id"] for r in records if r["search"] == "hybrid" and
                                  (r["page_rank"] is None and r.get("pages") or r["file_rank"] is None)})}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def search_section(emit, folders: dict[str, Path], k: int = 5) -> None:
    emit(f"## Search quality: dense, keyword (BM25) and hybrid (RRF) on real course material, top {k}")
    emit()
    emit("Our own questions, each with the file (and for PDFs the page) where we located its answer: "
         "`bench/rag/questions-*.jsonl`. hit@5: share of questions with a passage from that file (page) in the top "
         "5; MRR: mean 1/rank of the first such passage. Same index (all-MiniLM-L6-v2, 200-token chunks) for the "
         "three modes, measured in this run.")
    emit()
    emit("| material | questions | search | file hit@5 | file MRR | page hit@5 | page MRR | ms/query |")
    emit("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    notes = []
    for name, kind, questions in QUESTION_SETS:
        folder = folders[kind]
        if not folder.is_dir() or not any(folder.iterdir()):
            notes.append(f"- {name}: {folder} is missing, not measured.")
            continue
        r = bench_search(folder, questions, k)
        for mode, f in r["figures"].items():
            def cell(v):
                return "-" if v is None else f"{v:.3f}"
            emit(f"| {name} | {f['questions']} | {mode} | {cell(f['file_hit'])} | {cell(f['file_mrr'])} | "
                 f"{cell(f['page_hit'])} | {cell(f['page_mrr'])} | {r['latency_ms'][mode]:.1f} |")
        notes.append(f"- {name}: {r['documents']} documents, {r['chunks']} chunks, indexed in {r['build_s']:.0f} s; "
                     f"hybrid misses: {', '.join(r['misses']) or 'none'}.")
    emit()
    for line in notes:
        emit(line)
    emit()
    emit("_Honesty notes: the fusion depth (top 2k of each list) and the keyword query's phrase pairs were chosen "
         "while looking at the first 33 PDF questions; the last 8 (pdf-immutable-math ... pdf-sympy) were written "
         "afterwards and not tuned on. The CS231n questions are file-level only (markdown has no pages) and too "
         "easy to separate the modes. ms/query: median over the questions, one query per call, modes interleaved; "
         "hybrid costs one embedding (as dense) plus one FTS5 query (as keyword), the rest is noise of a shared "
         "machine._")


def update_sections(path: Path, sections: dict[str, list[str]], order: list[str]) -> str:
    """The results file with these sections replaced (or added), the other sections as they were."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    kept = dict(re.findall(r"<!-- section: (\w+) -->\n(.*?)<!-- /section -->\n", old, re.S))
    # A file from before sections keeps its text above them, until a run of every section rewrites it.
    header = old.split("<!-- section:")[0] if kept else old
    if set(sections) == set(order):
        kept, header = {}, ""
    kept.update({name: "\n".join(lines) + "\n" for name, lines in sections.items()})
    header = header or "# Retrieval benchmarks (`bench/bench_rag.py`)\n\n"
    names = [n for n in order if n in kept] + [n for n in kept if n not in order]
    return header + "".join(f"<!-- section: {n} -->\n{kept[n]}<!-- /section -->\n" for n in names)


SECTIONS = ("indexing", "ann", "ask", "formats", "search")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"some of {', '.join(SECTIONS)}")
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--efs", default="10,20,40,80,160")
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pdfs", default=str(DEFAULT_PDFS), help="folder of real lecture PDFs (formats section)")
    ap.add_argument("--quick", action="store_true", help="fewer queries, no repeats: a smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rag.md"))
    args = ap.parse_args()
    if args.quick:
        args.queries, args.repeats = 200, 1
    wanted = [s for s in args.sections.split(",") if s]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"--sections: unknown {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS)})")

    shared = ROOT.parent / "shared" / "examples" / "corpus" / "cs231n"
    corpus = shared if shared.is_dir() else ROOT / "examples" / "notes"
    sections: dict[str, list[str]] = {}
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    import torch

    machine = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with "
               f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
               f"Shared, noisy VM: read orders of magnitude.")

    def section(name: str) -> bool:
        """Start section `name` if it was asked for (each section says when and where it was measured)."""
        nonlocal lines
        if name not in wanted:
            return False
        lines = sections.setdefault(name, [])
        emit(f"_{machine}_")
        emit()
        return True

    if section("indexing"):
        ix = bench_indexing(corpus, args.repeats)
        emit(f"## Indexing throughput ({ix['chunks']} chunks of {ix['corpus']}, all-MiniLM-L6-v2, batch 64, "
             f"best of {args.repeats})")
        emit()
        emit("| pipeline | seconds | chunks/s | vs encode |")
        emit("| --- | ---: | ---: | ---: |")
        emit(f"| `SentenceTransformer.encode` (reference) | {ix['encode_s']:.2f} | {ix['encode_rate']:.0f} | 1.00x |")
        emit(f"| `probllm index` (clean, chunk, embed, hnswlib, SQLite, commit) | {ix['index_s']:.2f} | "
             f"{ix['index_rate']:.0f} | {ix['ratio']:.2f}x |")
        emit()

    if section("ann"):
        sizes = [int(s) for s in args.sizes.split(",") if s]
        efs = [int(e) for e in args.efs.split(",") if e]
        emit(f"## ANN search: hnswlib cosine, M={args.M}, ef_construction={args.ef_construction}, k={K}, "
             f"{args.queries} queries, one query per call on one thread")
        emit()
        emit("Synthetic clustered 384-d unit vectors (n/100 topics, neighbours share a topic); recall@10 against "
             "exact numpy search.")
        emit()
        emit("| vectors | build (s, all cores) | ef | recall@10 | p50 (ms) | p99 (ms) | exact numpy p50 (ms) |")
        emit("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        chosen = {}
        for n in sizes:
            for r in bench_ann(n, args.queries, efs, args.M, args.ef_construction, args.seed):
                emit(f"| {n:,} | {r['build_s']:.1f} | {r['ef']} | {r['recall']:.3f} | {r['p50']:.3f} | "
                     f"{r['p99']:.3f} | {r['brute_p50']:.2f} |")
                if r["recall"] >= 0.98 and n not in chosen:
                    chosen[n] = r
        emit()
        for n, r in chosen.items():
            emit(f"- {n:,} vectors: smallest ef reaching recall >= 0.98 is {r['ef']} "
                 f"(recall {r['recall']:.3f}, p50 {r['p50']:.3f} ms, p99 {r['p99']:.3f} ms).")
        emit()

    if section("ask"):
        a = bench_ask(runs=1 if args.quick else 3, max_new_tokens=32)
        emit(f"## `ask` time to first token (SmolLM2-135M-Instruct, float32, greedy; model load {a['load_s']:.1f} s "
             f"not included; median of {1 if args.quick else 3})")
        emit()
        emit("| mode | time to first token (s) | total for the answer (s) | answer tokens |")
        emit("| --- | ---: | ---: | ---: |")
        for label in ("with index", "without index"):
            r = a[label]
            emit(f"| {label} (k=4) | {r['ttft']:.2f} | {r['total']:.2f} | {r['tokens']:.0f} |"
                 if label == "with index" else f"| {label} | {r['ttft']:.2f} | {r['total']:.2f} | {r['tokens']:.0f} |")
        emit()

    if section("search"):
        search_section(emit, {"corpus": corpus, "pdfs": Path(args.pdfs)})

    if section("formats"):
        formats_section(emit, Path(args.pdfs), args.repeats)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(update_sections(out, sections, list(SECTIONS)), encoding="utf-8")
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
