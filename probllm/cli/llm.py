"""Commands of the llm family (see probllm/lm, probllm/corrupt.py, probllm/judge.py): options to functions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from probllm.cli.app import InputFiles, Limit, Seed, SkipInvalid, SummaryFile, app, command, hidden_aliases
from probllm.cli.choices import JudgeMode, ModelBackend, VerdictFrom, value
from probllm.cli.groups import uses
from probllm.cli.options import BACKEND, GENERATION
from probllm.io import EXIT_FAILURE, log, read_records, write_records
from probllm.corrupt import CorruptOptions
from probllm.judge import JudgeOptions
from probllm.lm import MODEL_BACKENDS, BackendConfig, backends_help

hidden_aliases("corrupt", max_tokens="--max-new-tokens", k="--ops-per-record")
hidden_aliases("judge", max_tokens="--max-new-tokens")

JUDGE_BACKEND = BACKEND.replace("backend", type=ModelBackend, default=ModelBackend(BackendConfig().backend),
                                help=backends_help(MODEL_BACKENDS))


def _config(backend: dict, generation: dict, seed: int):
    """The backend's settings from the two option groups (the library calls generation length max_tokens)."""
    generation = dict(generation)
    return BackendConfig(**{**backend, "backend": value(backend["backend"])}, seed=seed,
                         max_tokens=generation.pop("max_new_tokens"), **generation)


# ---------------------------------------------------------------------------------------------------- corrupt


@app.command()
@uses(BACKEND, GENERATION)
def corrupt(
    files: InputFiles = None,
    backend: dict = None,
    ops: Annotated[str, typer.Option("--ops", help="Operations to pick from, comma-separated.")] =
        ",".join(CorruptOptions.ops),
    k: Annotated[int, typer.Option("--ops-per-record", help="Operations applied per record, one after the other.",
                                   min=1)] = CorruptOptions.k,
    question_field: Annotated[Optional[str], typer.Option(
        "--question-field", help="Default: question, message_1 (CAMEL), instruction or prompt.")] = None,
    answer_field: Annotated[Optional[str], typer.Option(
        "--answer-field", help="Default: answer, message_2 (CAMEL), output or response.")] = None,
    source: Annotated[str, typer.Option("--source", help="`source` of pairs whose input has none.")] = \
        CorruptOptions.source,
    rejected_tries: Annotated[int, typer.Option("--rejected-tries", help="Attempts per operation when the "
                                                "output is empty, identical or a refusal.", min=1)] = \
        CorruptOptions.tries,
    failed: Annotated[Optional[Path], typer.Option("--failed", help="Also write records that could not be "
                                                   "corrupted, with an `error` field, to this JSONL file.")] = None,
    generation: dict = None,
    seed: Seed = 0,
    limit: Limit = None,
    skip_invalid: SkipInvalid = False,
    summary: SummaryFile = None,
) -> None:
    """Make preference pairs from correct QA records by corrupting the answer (REMOVE / SUBSTITUTE / INSERT).

    Requests run concurrently, are retried on transient errors and cached on disk: re-running, or restarting
    after a crash, sends nothing that already succeeded. Output keeps input order.

        probllm corrupt --backend rules examples/qa.jsonl | head -n 2
        probllm corrupt --backend openai --base-url http://localhost:8000/v1 \\
            --model Qwen/Qwen2.5-7B-Instruct --concurrency 64 \\
            camel-physics.jsonl > pairs.jsonl
    """
    from probllm.corrupt import corrupt_records, parse_ops

    with command("corrupt", summary) as stats:
        config = _config(backend, generation, seed)
        failed_fh = open(failed, "w", encoding="utf-8") if failed else None
        try:
            opts = CorruptOptions(ops=parse_ops(ops), k=k, seed=seed, question_field=question_field,
                                  answer_field=answer_field, tries=rejected_tries, source=source,
                                  failed_out=failed_fh)
            write_records(corrupt_records(read_records(files, stats, skip_invalid, limit=limit), config, opts, stats,
                                          skip_invalid), stats)
        finally:
            if failed_fh:
                failed_fh.close()
    if stats.skipped.get("request failed"):
        # Work is incomplete: say so in the exit code. A re-run resends only what failed (the rest is cached).
        raise typer.Exit(EXIT_FAILURE)


# ------------------------------------------------------------------------------------------------------ judge


@app.command()
@uses(JUDGE_BACKEND, GENERATION)
def judge(
    files: InputFiles = None,
    a: Annotated[Optional[list[str]], typer.Option("--a", help="Answer set A: records with --key and "
                                                    "--answer-field (repeat for several files).")] = None,
    b: Annotated[Optional[list[str]], typer.Option("--b", help="Answer set B, joined to A on --key (repeat for "
                                                    "several files).")] = None,
    key: Annotated[str, typer.Option("--key", help="Join field of --a and --b.")] = JudgeOptions.key,
    mode: Annotated[JudgeMode, typer.Option("--mode", help="pairwise: A vs B, asked in both orders; single: grade "
                                            "each answer 1-10.")] = JudgeMode(JudgeOptions.mode),
    question_field: Annotated[str, typer.Option("--question-field", help="Record field holding the question.")] =
        JudgeOptions.question_field,
    answer_field: Annotated[str, typer.Option("--answer-field", help="Answer field in --a / --b files.")] =
        JudgeOptions.answer_field,
    a_field: Annotated[str, typer.Option("--a-field", help="Answer A in records holding both.")] = \
        JudgeOptions.a_field,
    b_field: Annotated[str, typer.Option("--b-field", help="Answer B in records holding both.")] = \
        JudgeOptions.b_field,
    reference_field: Annotated[str, typer.Option("--reference-field", help="Reference answer; when present the "
                                                 "reference-guided prompts are used.")] = \
        JudgeOptions.reference_field,
    judge_tries: Annotated[int, typer.Option("--judge-tries", help="Attempts when the judge's text holds no "
                                             "verdict.", min=1)] = JudgeOptions.tries,
    verdict_from: Annotated[VerdictFrom, typer.Option("--verdict-from", help="generation: the judge writes its "
                                                      "reasoning and verdict; likelihood (hf): score the allowed "
                                                      "verdicts, for small models that ignore the format.")] =
        VerdictFrom(JudgeOptions.verdict_from),
    backend: dict = None,
    generation: dict = None,
    seed: Seed = 0,
    limit: Limit = None,
    skip_invalid: SkipInvalid = False,
    summary: SummaryFile = None,
) -> None:
    """Compare two answer sets with an LLM judge (MT-Bench style), or grade answers from 1 to 10.

    Pairwise judging asks twice with the answers swapped; disagreement counts as a tie (`inconsistent`). Writes
    one verdict record per question (raw judge text kept) and a summary: wins/ties/losses, A's win rate with a
    95% Wilson interval, inconsistency rate, mean answer lengths.

        probllm judge --a examples/answers-a.jsonl --b examples/answers-b.jsonl \\
            --key id --backend openai --base-url http://localhost:8000/v1 \\
            --model judge --summary judge.json > verdicts.jsonl
    """
    from probllm.judge import JudgeSummary, judge_input, judge_records

    mode, verdict_from = value(mode), value(verdict_from)
    result = JudgeSummary(mode=mode)
    with command("judge", summary) as stats:
        config = _config(backend, generation, seed)
        opts = JudgeOptions(mode=mode, key=key, question_field=question_field, answer_field=answer_field,
                            a_field=a_field, b_field=b_field, reference_field=reference_field, tries=judge_tries,
                            seed=seed, verdict_from=verdict_from)
        opts.check()
        records = judge_input(a, b, files, opts, stats, skip_invalid, limit=limit)
        write_records(judge_records(records, config, opts, stats, result, skip_invalid), stats)
        log(f"probllm judge: {result.text()}")
        stats.figures.update(result.as_dict())
    if result.failed:
        raise typer.Exit(EXIT_FAILURE)
