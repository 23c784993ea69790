"""Commands of the llm family (see probllm/llm, probllm/corrupt.py, probllm/judge.py): options to functions."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from probllm.cli.app import InputFiles, Seed, SkipInvalid, SummaryFile, app, command
from probllm.io import EXIT_FAILURE, log, read_records, write_records

# ------------------------------------------------------------------------------------- shared backend options

Backend = Annotated[str, typer.Option("--backend", help="openai (any OpenAI-compatible endpoint), hf (local "
                                                        "transformers model) or rules (corrupt only, no model).")]
Model = Annotated[Optional[str], typer.Option("--model", help="Endpoint model name (openai), or hub id / folder "
                                                              "(hf; default: the offline SmolLM2).")]
BaseUrl = Annotated[Optional[str], typer.Option("--base-url", help="OpenAI-compatible base URL, e.g. "
                                                                   "http://localhost:8000/v1 (vLLM).")]
ApiKeyEnv = Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the API key "
                                                              "(never printed).")]
Adapter = Annotated[Optional[str], typer.Option("--adapter", help="LoRA adapter folder for --backend hf.")]
Concurrency = Annotated[int, typer.Option("--concurrency", help="Requests in flight at once (openai).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Prompts per generate call (hf).")]
Tries = Annotated[int, typer.Option("--tries", help="Attempts per request on 429/5xx/timeouts/malformed "
                                                    "answers, with exponential backoff and Retry-After.")]
RetryBase = Annotated[float, typer.Option("--retry-base", help="First backoff in seconds (doubles each retry).")]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds before one request counts as timed out.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="Most tokens generated per answer.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy.")]
TopP = Annotated[float, typer.Option("--top-p")]
CacheFile = Annotated[Optional[Path], typer.Option("--cache", help="Response cache (SQLite); default "
                                                                   "~/.cache/probllm/llm-cache.sqlite.")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the response cache.")]


def _config(**kw):
    from probllm.llm import BackendConfig

    return BackendConfig(**kw)


@contextmanager
def _llm_command(name: str, summary: Optional[Path] = None):
    """`command()` plus the one backend error that is not about data or options: the endpoint refusing us."""
    from probllm.llm import FatalBackendError

    failed = False
    with command(name, summary) as stats:
        try:
            yield stats
        except FatalBackendError as e:
            log(f"probllm {name}: error: {e}")
            failed = True
    if failed:
        raise typer.Exit(EXIT_FAILURE)


# ---------------------------------------------------------------------------------------------------- corrupt


@app.command()
def corrupt(
    files: InputFiles = None,
    backend: Backend = "hf",
    model: Model = None,
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
    adapter: Adapter = None,
    ops: Annotated[str, typer.Option("--ops", help="Operations to pick from, comma-separated.")] =
        "REMOVE,SUBSTITUTE,INSERT",
    k: Annotated[int, typer.Option("--k", help="Operations applied per record, one after the other.")] = 2,
    question_field: Annotated[Optional[str], typer.Option(
        "--question-field", help="Default: question, message_1 (CAMEL), instruction or prompt.")] = None,
    answer_field: Annotated[Optional[str], typer.Option(
        "--answer-field", help="Default: answer, message_2 (CAMEL), output or response.")] = None,
    source: Annotated[str, typer.Option("--source", help="`source` of pairs whose input has none.")] = "corrupted",
    rejected_tries: Annotated[int, typer.Option("--rejected-tries", help="Attempts per operation when the "
                                                "output is empty, identical or a refusal.")] = 3,
    failed: Annotated[Optional[Path], typer.Option("--failed", help="Also write records that could not be "
                                                   "corrupted, with an `error` field, to this JSONL file.")] = None,
    concurrency: Concurrency = 16,
    batch_size: BatchSize = 8,
    tries: Tries = 5,
    retry_base: RetryBase = 1.0,
    timeout: Timeout = 120.0,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    cache: CacheFile = None,
    no_cache: NoCache = False,
    seed: Seed = 0,
    skip_invalid: SkipInvalid = False,
    summary: SummaryFile = None,
) -> None:
    """Make preference pairs from correct QA records by corrupting the answer (REMOVE / SUBSTITUTE / INSERT).

    Requests run concurrently, are retried on transient errors and cached on disk: re-running, or restarting
    after a crash, sends nothing that already succeeded. Output keeps input order.

        probllm corrupt --backend rules examples/qa.jsonl | head -n 2
        probllm corrupt --backend openai --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct \\
            --concurrency 64 camel-physics.jsonl > pairs.jsonl
    """
    from probllm.corrupt import CorruptOptions, corrupt_records, parse_ops

    with _llm_command("corrupt", summary) as stats:
        config = _config(backend=backend, model=model, base_url=base_url, api_key_env=api_key_env, adapter=adapter,
                         concurrency=concurrency, batch_size=batch_size, tries=tries, retry_base=retry_base,
                         timeout=timeout, max_tokens=max_tokens, temperature=temperature, top_p=top_p, cache=cache,
                         no_cache=no_cache, seed=seed)
        failed_fh = open(failed, "w", encoding="utf-8") if failed else None
        try:
            opts = CorruptOptions(ops=parse_ops(ops), k=k, seed=seed, question_field=question_field,
                                  answer_field=answer_field, tries=rejected_tries, source=source,
                                  failed_out=failed_fh)
            write_records(corrupt_records(read_records(files, stats, skip_invalid), config, opts, stats,
                                          skip_invalid), stats)
        finally:
            if failed_fh:
                failed_fh.close()
    if stats.skipped.get("request failed"):
        # Work is incomplete: say so in the exit code. A re-run resends only what failed (the rest is cached).
        raise typer.Exit(EXIT_FAILURE)


# ------------------------------------------------------------------------------------------------------ judge


@app.command()
def judge(
    files: InputFiles = None,
    a: Annotated[Optional[list[str]], typer.Option("--a", help="Answer set A (JSONL with --key and "
                                                    "--answer-field).")] = None,
    b: Annotated[Optional[str], typer.Option("--b", help="Answer set B, joined to A on --key.")] = None,
    key: Annotated[str, typer.Option("--key", help="Join field of --a and --b.")] = "id",
    mode: Annotated[str, typer.Option("--mode", help="pairwise (both orders; A vs B) or single (grade 1-10).")] =
        "pairwise",
    question_field: Annotated[str, typer.Option("--question-field")] = "question",
    answer_field: Annotated[str, typer.Option("--answer-field", help="Answer field in --a / --b files.")] =
        "answer",
    a_field: Annotated[str, typer.Option("--a-field", help="Answer A in records holding both.")] = "answer_a",
    b_field: Annotated[str, typer.Option("--b-field", help="Answer B in records holding both.")] = "answer_b",
    reference_field: Annotated[str, typer.Option("--reference-field", help="Reference answer; when present the "
                                                 "reference-guided prompts are used.")] = "reference",
    judge_tries: Annotated[int, typer.Option("--judge-tries", help="Attempts when the judge's text holds no "
                                             "verdict.")] = 3,
    verdict_from: Annotated[str, typer.Option("--verdict-from", help="generation (the judge writes its "
                                              "reasoning and verdict) or likelihood (hf: score the allowed "
                                              "verdicts; for small models that ignore the format).")] =
        "generation",
    backend: Backend = "hf",
    model: Model = None,
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
    adapter: Adapter = None,
    concurrency: Concurrency = 16,
    batch_size: BatchSize = 8,
    tries: Tries = 5,
    retry_base: RetryBase = 1.0,
    timeout: Timeout = 120.0,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    cache: CacheFile = None,
    no_cache: NoCache = False,
    seed: Seed = 0,
    skip_invalid: SkipInvalid = False,
    summary: SummaryFile = None,
) -> None:
    """Compare two answer sets with an LLM judge (MT-Bench style), or grade answers from 1 to 10.

    Pairwise judging asks twice with the answers swapped; disagreement counts as a tie (`inconsistent`). Writes
    one verdict record per question (raw judge text kept) and a summary: wins/ties/losses, A's win rate with a
    95% Wilson interval, inconsistency rate, mean answer lengths.

        probllm judge --a examples/answers-a.jsonl --b examples/answers-b.jsonl --key id \\
            --backend openai --base-url http://localhost:8000/v1 --model judge --summary judge.json > verdicts.jsonl
    """
    from probllm.judge import JudgeOptions, JudgeSummary, judge_input, judge_records

    result = JudgeSummary(mode=mode)
    with _llm_command("judge", summary) as stats:
        config = _config(backend=backend, model=model, base_url=base_url, api_key_env=api_key_env, adapter=adapter,
                         concurrency=concurrency, batch_size=batch_size, tries=tries, retry_base=retry_base,
                         timeout=timeout, max_tokens=max_tokens, temperature=temperature, top_p=top_p, cache=cache,
                         no_cache=no_cache, seed=seed)
        opts = JudgeOptions(mode=mode, key=key, question_field=question_field, answer_field=answer_field,
                            a_field=a_field, b_field=b_field, reference_field=reference_field, tries=judge_tries,
                            seed=seed, verdict_from=verdict_from)
        opts.check()
        records = judge_input(a, b, files, opts, stats, skip_invalid)
        write_records(judge_records(records, config, opts, stats, result, skip_invalid), stats)
        log(f"probllm judge: {result.text()}")
        stats.figures.update(result.as_dict())
    if result.failed:
        raise typer.Exit(EXIT_FAILURE)
