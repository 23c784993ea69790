"""Commands of the rag family: `index`, `retrieve`, `ask` (logic in probllm/rag)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from probllm.cli.app import (ForceResume, InputFiles, InputOption, Limit, Seed, SkipInvalid, SummaryFile, app,
                             command, hidden_aliases)
from probllm.cli.choices import Dtype, LetterMethod, SearchMode, value
from probllm.cli.groups import uses
from probllm.cli.options import ENDPOINT, RETRIEVAL, backend_config, retrieval_settings
from probllm.rag.search import SEARCH_MODES

IndexOpt = Annotated[Optional[str], typer.Option("--index", help="Index folder built by `probllm index`.")]
EmbedderOpt = Annotated[Optional[str], typer.Option(
    "--embedder", help="sentence-transformers model (hub id or folder); default: the index's own, or the offline "
                       "all-MiniLM-L6-v2 for a new index.")]
EfOpt = Annotated[Optional[int], typer.Option("--ef", help="hnswlib search breadth (higher: better recall, "
                                                           "slower); default: the index's.")]
KOpt = Annotated[int, typer.Option("--top-k", "-k", help="Passages per question.", min=1)]
QuestionField = Annotated[str, typer.Option("--question-field", help="Record field holding the question.")]

hidden_aliases("index", out="--output")
hidden_aliases("retrieve", field="--question-field")
hidden_aliases("ask", field="--question-field")


@app.command("index")
def index_command(
    paths: Annotated[list[str], typer.Argument(help="Course material: markdown/text, PDF, .pptx, .ipynb, .tex or "
                                                    "HTML files, folders of them, or JSONL/JSON records with a "
                                                    "text field.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Index folder (created, or updated in place).",
                                      show_default=False)],
    embedder: EmbedderOpt = None,
    chunk_tokens: Annotated[Optional[int], typer.Option("--chunk-tokens", help="Chunk budget in embedder tokens "
                                                        "[default: 200, or the index's].")] = None,
    overlap: Annotated[Optional[int], typer.Option("--overlap", help="Tokens shared by consecutive chunks of a "
                                                   "section [default: 40, or the index's].")] = None,
    M: Annotated[Optional[int], typer.Option("--M", help="hnswlib graph degree [default: 16].")] = None,
    ef_construction: Annotated[Optional[int], typer.Option("--ef-construction", help="hnswlib build breadth "
                                                           "[default: 200].")] = None,
    ef: EfOpt = None,
    text_field: Annotated[str, typer.Option("--text-field", help="JSONL input: the field holding the text.")] = "text",
    id_field: Annotated[str, typer.Option("--id-field", help="JSONL input: the field naming a record (else its "
                                          "line number).")] = "id",
    seed: Seed = 0,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Build or update an index of course material: vectors (hnswlib) and keywords (BM25, SQLite FTS5).

    The index mirrors PATHS: run it again with the same paths and only new or changed documents are embedded,
    documents no longer there are removed; an interrupted run leaves the previous index usable. Front matter,
    HTML and Liquid markup are cleaned; chunks follow headings and paragraphs, never splitting code or math.
    PDFs and slides keep their page numbers (each chunk's `page`); running headers, footers and page numbers
    are left out; pages with no text (scans) are named on stderr. A file that cannot be read (corrupt,
    encrypted) is an error, or counted and skipped with --skip-invalid; a run that read no document fails.

        probllm index examples/notes -o runs/demo/notes.idx
        probllm index lectures/ week1.pptx labs/ -o course.idx --skip-invalid
        probllm index 'notes/*/*.md' ~/lectures.jsonl --text-field body -o notes.idx
    """
    from probllm.rag.index import build_index

    with command("index", summary_file=summary) as stats:
        build_index(paths, str(output), stats, embedder=embedder, chunk_tokens=chunk_tokens, overlap=overlap, M=M,
                    ef_construction=ef_construction, ef=ef, text_field=text_field, id_field=id_field,
                    skip_invalid=skip_invalid, seed=seed)


@app.command("retrieve")
@uses(RETRIEVAL)
def retrieve_command(
    query: Annotated[Optional[str], typer.Argument(help="A question; without it, JSONL records are read from "
                                                        "--input files or stdin.", show_default=False)] = None,
    index: Annotated[str, typer.Option("--index", help="Index folder built by `probllm index`.")] = ...,
    files: InputOption = None,
    k: KOpt = 5,
    field: QuestionField = "question",
    limit: Limit = None,
    attach: Annotated[bool, typer.Option("--attach", help="Write the input records with a `context` list "
                                         "instead of one record per passage.")] = False,
    context_field: Annotated[str, typer.Option("--context-field", help="Name of the attached field.")] = "context",
    with_choices: Annotated[bool, typer.Option("--with-choices", help="MCQ records: query with the question "
                                               "and its options.")] = False,
    embedder: EmbedderOpt = None,
    ef: EfOpt = None,
    retrieval: dict = None,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Find the passages of an index that answer a question, as JSONL.

    One record per passage (`id`, `score`, `text`, `source`, `heading`, `page`, `rank`, offsets), or with
    `--attach` the input records with a `context` list, which `eval --context context` and `ask` read. Passages
    are found by embeddings and by keywords (BM25) fused (`--search hybrid`, the default), or by either alone.

        probllm retrieve --index notes.idx "Worst case of heapsort?" -k 3
        probllm retrieve --index notes.idx "Master theorem" --search keyword
        probllm retrieve --index notes.idx --attach --with-choices -i mcq.jsonl \\
            | probllm eval --context context
    """
    from probllm.io import read_records, write_records
    from probllm.rag.retrieve import Retriever, retrieve_records, retrieve_text

    with command("retrieve", summary_file=summary) as stats:
        retriever = Retriever(index, embedder=embedder, ef=ef, **retrieval_settings(retrieval))
        stats.notes["search"] = retriever.describe()
        if query is not None:
            if files:
                from probllm.io import UsageError

                raise UsageError("give either a QUERY or --input records, not both")
            stats.read = 1
            write_records(retrieve_text(retriever, query, k), stats)
        else:
            records = read_records(files, stats=stats, skip_invalid=skip_invalid, limit=limit)
            write_records(retrieve_records(records, retriever, stats, k=k, field=field, attach=attach,
                                           context_field=context_field, with_choices=with_choices,
                                           skip_invalid=skip_invalid), stats)


@app.command("ask")
@uses(ENDPOINT, RETRIEVAL)
def ask_command(
    question: Annotated[Optional[str], typer.Argument(help="A question; without it, JSONL records are answered "
                                                           "(--input files or stdin).", show_default=False)] = None,
    index: IndexOpt = None,
    choice: Annotated[Optional[list[str]], typer.Option("--choice", "-c", help="An option of a multiple-choice "
                                                        "question (repeat: A, B, C...).")] = None,
    files: InputOption = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Hub id, folder (also a `quantize` output) or "
                                                 "nothing for the offline SmolLM2-135M-Instruct.")] = None,
    adapter: Annotated[Optional[str], typer.Option("--adapter", help="LoRA adapter folder (a `dpo` output).")] = None,
    k: KOpt = 4,
    field: QuestionField = "question",
    limit: Limit = None,
    context_field: Annotated[str, typer.Option("--context", help="Without --index: record field with passages "
                                               "(from `retrieve --attach`) to quote.")] = "context",
    letter: Annotated[LetterMethod, typer.Option("--letter", help="Options: pick the letter by each option's "
                                                 "likelihood (loglik; reliable for small models) or let the model "
                                                 "write it (generate); auto: loglik with a local model, generate "
                                                 "with an endpoint.")] = LetterMethod.auto,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens per answer.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (default); > 0 samples, "
                                               "seeded by --seed.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="Penalty on repeated tokens "
                                                      "(1.0 = none); small models loop without it.")] = 1.15,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Records per generate call.")] = 4,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Records mode: append answers to this "
                                                   "file instead of stdout; run again to resume (records whose "
                                                   "--key is already there are skipped).")] = None,
    key: Annotated[str, typer.Option("--key", help="With --output: the field that names a record.")] = "id",
    force_resume: ForceResume = False,
    embedder: EmbedderOpt = None,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="auto: float32 on CPU.")] = Dtype.auto,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda ...")] = "auto",
    backend: dict = None,
    retrieval: dict = None,
    seed: Seed = 0,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Answer questions about the course, grounded in the notes index when `--index` is given.

    With a QUESTION, the sources used are listed on stderr and the answer streams to stdout as it is
    generated. Without one, JSONL records are read and written back with `answer` and `context_ids` (an input
    `answer` is kept as `reference`), for `judge`. Greedy decoding unless --temperature.

        probllm ask "What is the worst case of heapsort?" --index notes.idx
        probllm ask "Unit of force?" -c joule -c newton -c watt -c pascal
        probllm retrieve --index notes.idx --attach -i questions.jsonl \\
            | probllm ask > rag.jsonl
        probllm ask --index notes.idx -i examples/questions.jsonl -o rag.jsonl
        probllm ask "What is heapsort?" --backend openai \\
            --base-url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct

    With `--backend openai` and a server started with `probllm serve --index`, leave out --index here: the
    server retrieves, and the sources it used are listed the same way.
    """
    from probllm.io import log, read_records, write_records
    from probllm.rag.ask import (Generator, ask_one, ask_records, check_options, resolve_letter_method,
                                 show_sources)

    letter, dtype = value(letter), value(dtype)
    with command("ask", summary_file=summary, quiet_summary=question is not None) as stats:
        check_options(letter, k, max_new_tokens, batch_size)
        if question is not None and files:
            from probllm.io import UsageError

            raise UsageError("give either a QUESTION or --input records, not both")
        records = None
        if question is None:
            from probllm.rag.ask import answered_keys, ask_provenance, refuse_mixed_output, skip_answered

            records = read_records(files, stats=stats, skip_invalid=skip_invalid, limit=limit)
            if output is not None:
                records = skip_answered(records, answered_keys(str(output), key), key, stats)
                # Check first, load later: a rerun with everything answered loads no model and no index.
                first = next(records, None)
                if first is None:
                    log(f"probllm ask: every record is already in {output}; nothing to do")
                    return
                records = itertools.chain([first], records)
            provenance = ask_provenance(
                backend=value(backend["backend"]), model=model, adapter=adapter, base_url=backend["base_url"],
                dtype=dtype, device=device, index=index,
                settings={"letter": letter, "top_k": k if index else None, "max_new_tokens": max_new_tokens,
                          "temperature": temperature, "repetition_penalty": repetition_penalty, "seed": seed,
                          "question_field": field, "context": None if index else context_field,
                          # how passages were found decides which are quoted: another search is another answer
                          **({"retrieval": retrieval_settings(retrieval)} if index else {})})
            if output is not None:  # appending: only to answers of the same model, index and settings
                refuse_mixed_output(str(output), provenance, force_resume)
        retriever = None
        if index:
            from probllm.rag.retrieve import Retriever

            retriever = Retriever(index, embedder=embedder, **retrieval_settings(retrieval))
            stats.notes["search"] = retriever.describe()
        lm = None
        from probllm.lm import backend_spec

        if not backend_spec(value(backend["backend"])).local:
            from probllm.lm import Retrying, RetryPolicy, make_lm

            config = backend_config(backend, model=model)
            lm = Retrying(make_lm(config), RetryPolicy(tries=config.tries))
        elif backend["base_url"]:
            from probllm.io import UsageError

            raise UsageError("--base-url is for --backend openai")
        generator = Generator(model, adapter=adapter, dtype=dtype, device=device, seed=seed,
                              temperature=temperature, repetition_penalty=repetition_penalty, lm=lm)
        letter = resolve_letter_method(letter, generator)
        if question is not None:
            def write(text: str) -> None:
                sys.stdout.write(text)
                sys.stdout.flush()

            stats.read = 1
            ask_one(question, generator, retriever, choices=choice, k=k, max_new_tokens=max_new_tokens,
                    letter_method=letter, on_text=write, on_sources=show_sources)
            sys.stdout.write("\n")
            stats.written = 1
        else:
            from probllm.provenance import stamp
            from probllm.rag.ask import append_records

            answers = stamp(ask_records(records, generator, stats, retriever=retriever, field=field,
                                        context_field=context_field, k=k, max_new_tokens=max_new_tokens,
                                        letter_method=letter, batch_size=batch_size, skip_invalid=skip_invalid),
                            provenance)
            if output is not None:
                append_records(answers, str(output), stats)
            else:
                write_records(answers, stats)


@app.command("rag-eval")
@uses(RETRIEVAL.without("search"))
def rag_eval_command(
    files: InputFiles = None,
    index: Annotated[str, typer.Option("--index", help="Index folder built by `probllm index`.")] = ...,
    search: Annotated[Optional[list[SearchMode]], typer.Option(
        "--search", help="Search modes to compare (repeat) [default: every mode].", show_default=False)] = None,
    k: KOpt = 5,
    field: QuestionField = "question",
    source_field: Annotated[str, typer.Option("--source-field", help="Record field naming the file (or list of "
                                              "files) that holds the answer; a name or a path ending.")] = "source",
    pages_field: Annotated[str, typer.Option("--pages-field", help="Record field with the answer's pages "
                                             "(1-based; optional per record).")] = "pages",
    limit: Limit = None,
    embedder: EmbedderOpt = None,
    ef: EfOpt = None,
    retrieval: dict = None,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Check an index before students use it: hit@k and MRR of each search mode, by file and by page.

    Each question record names its answer's `source` (file name or path ending, or a list) and optionally its
    `pages`. One record per question and mode goes to stdout (with `file_rank`, `page_rank` and the hits), the
    table to stderr, the figures to --summary. With --reranker, every mode is also measured reranked.

        probllm rag-eval examples/rag-questions.jsonl --index notes.idx -k 3
        probllm rag-eval --index notes.idx -i questions.jsonl --search hybrid \\
            --reranker cross-encoder/ms-marco-MiniLM-L6-v2 --summary rag-eval.json
    """
    from probllm.io import log, read_records, write_records
    from probllm.rag.rageval import evaluate_retrieval, metrics_table
    from probllm.rag.retrieve import Retriever

    modes = [value(m) for m in search] if search else list(SEARCH_MODES)
    with command("rag-eval", summary_file=summary) as stats:
        # One retriever (one embedder load) for every mode: keyword alone needs no embedder.
        retriever = Retriever(index, embedder=embedder, ef=ef, search="keyword" if modes == ["keyword"] else "hybrid",
                              reranker=retrieval["reranker"])
        if not retriever.index.has_keyword:
            modes = ["dense"]  # the retriever said why, once
        runs = [(m, False) for m in modes] + ([(m, True) for m in modes] if retriever.reranker else [])
        tallies: dict = {}
        records = read_records(files, stats=stats, skip_invalid=skip_invalid, limit=limit)
        write_records(evaluate_retrieval(records, retriever, runs, tallies, stats, k=k, field=field,
                                         source_field=source_field, pages_field=pages_field,
                                         skip_invalid=skip_invalid), stats)
        reranker = retriever.reranker.name if retriever.reranker else None
        log(f"rag-eval of {index} (embedder {retriever.index.embedder_name}"
            f"{', reranker ' + reranker if reranker else ''}), top {k}:\n{metrics_table(tallies, k)}")
        stats.figures.update({"k": k, "index": str(index), "embedder": retriever.index.embedder_name,
                              "reranker": reranker,
                              "retrieval": {label: t.figures() for label, t in tallies.items()}})
