"""The option groups that several commands share, each defined once (see probllm/cli/groups.py for how a group
becomes Typer options and `--config` keys).

- BACKEND: where answers come from (an OpenAI-compatible endpoint, a local transformers model, or rules), and
  how requests are sent (concurrency, retries, cache). Used by `corrupt` and `judge`.
- GENERATION: how long and how random an answer is. `--max-new-tokens` is the one name for generation length.
- EVAL: the model and how MCQ items are scored (`eval`).
- RETRIEVAL: how passages are found in a notes index (`--search`, `--reranker`): retrieve, ask, chat, serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from probllm.cli.choices import Backend, Dtype, EvalMethod, ModelBackend, SearchMode, Template
from probllm.cli.groups import Opt, OptionGroup
from probllm.lm import BackendConfig, backends_help

# The library's defaults are the CLI's: one definition (BackendConfig), read here rather than written twice.
_DEFAULT = BackendConfig()
from probllm.rag.search import DEFAULT_SEARCH, SEARCH_MODES

BACKEND = OptionGroup("backend", (
    Opt("backend", Backend, Backend(_DEFAULT.backend), backends_help()),
    Opt("model", Optional[str], None, "Endpoint model name (openai), or hub id / folder (hf; default: the "
                                      "offline SmolLM2)."),
    Opt("base_url", Optional[str], None, "OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (vLLM)."),
    Opt("api_key_env", str, _DEFAULT.api_key_env, "Environment variable holding the API key (never printed)."),
    Opt("adapter", Optional[str], None, "LoRA adapter folder for --backend hf."),
    Opt("concurrency", int, _DEFAULT.concurrency, "Requests in flight at once (openai).", settings={"min": 1}),
    Opt("batch_size", int, _DEFAULT.batch_size, "Prompts per generate call (hf).", settings={"min": 1}),
    Opt("tries", int, _DEFAULT.tries, "Attempts per request on 429/5xx/timeouts/malformed answers, with "
                                      "exponential backoff and Retry-After.", settings={"min": 1}),
    Opt("retry_base", float, _DEFAULT.retry_base, "First backoff in seconds (doubles each retry)."),
    Opt("timeout", float, _DEFAULT.timeout, "Seconds before one request counts as timed out."),
    Opt("cache", Optional[Path], None, "Response cache (SQLite); default ~/.cache/probllm/llm-cache.sqlite."),
    Opt("no_cache", bool, False, "Neither read nor write the response cache."),
))

GENERATION = OptionGroup("generation", (
    Opt("max_new_tokens", int, 512, "Most tokens generated per answer.", settings={"min": 1}),
    Opt("temperature", float, 0.0, "0 = greedy; > 0 samples, seeded by --seed.", settings={"min": 0.0}),
    Opt("top_p", float, 1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability.",
        settings={"min": 0.0, "max": 1.0}),
))

# eval's defaults are EvalOptions' (the library's), read here rather than written twice.
from probllm.evaluate.options import EvalOptions as _EvalDefaults  # noqa: E402

EVAL = OptionGroup("evaluation", (
    Opt("model", Optional[str], None, "Hub id, folder (also a `quantize` output) or nothing for the offline "
                                      "SmolLM2-135M-Instruct."),
    Opt("adapter", Optional[str], None, "LoRA adapter folder (a `dpo` output)."),
    Opt("method", EvalMethod, EvalMethod(_EvalDefaults.method), "loglik: acc + acc_norm as lm-eval; generate: chain of thought, "
                                                 "then the number / boxed answer / letter."),
    Opt("template", Template, Template(_EvalDefaults.template), "auto: lm-eval's MMLU template for MMLU items, its ARC template "
                                             "otherwise."),
    Opt("shots", int, _EvalDefaults.shots, "Few-shot examples per question, from --dev.", settings={"min": 0}),
    Opt("dev", Optional[list[str]], None, "MCQ records for few-shot examples: the first N of the same subject "
                                          "(lm-eval's first_n)."),
    Opt("chat_template", bool, _EvalDefaults.chat_template, "Wrap prompts in the model's chat template."),
    Opt("context_field", Optional[str], None, "Record field with retrieved passages (strings or {text,...}) to "
                                              "quote before the question.", flags=("--context",)),
    Opt("max_passages", int, _EvalDefaults.max_passages, "Passages used from --context.", settings={"min": 1}),
    Opt("batch_size", int, _EvalDefaults.batch_size, "Questions per forward pass.", settings={"min": 1}),
    Opt("max_new_tokens", int, _EvalDefaults.max_new_tokens, "generate: tokens per answer.", settings={"min": 1}),
    Opt("dtype", Dtype, Dtype.auto, "auto: float32 on CPU (exact); bfloat16 is fast on CPUs with "
                                    "AMX/AVX512-BF16 and on GPUs."),
    Opt("device", str, "auto", "auto, cpu, cuda, cuda:1 ..."),
))

# `eval` and `ask` on an endpoint: the part of BACKEND that says where requests go and how they are sent (the model
# name itself is their own --model). A local model (hf) is the default.
ENDPOINT = BACKEND.only("backend", "base_url", "api_key_env", "concurrency", "tries", "timeout").replace(
    "backend", type=ModelBackend, default=ModelBackend(_DEFAULT.backend),
    help="hf: a local transformers model; openai: any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp, "
         "OpenAI, probllm serve) given by --base-url, with --model its model name.").replace(
    "concurrency", default=8)

# A model loaded in this process (serve, ask).
LOCAL_MODEL = OptionGroup("local_model", (
    Opt("model", Optional[str], None, "Hub id, folder (also a `quantize` output) or nothing for the offline "
                                      "SmolLM2-135M-Instruct; with --backend openai, the endpoint's model name."),
    Opt("adapter", Optional[str], None, "LoRA adapter folder (a `dpo` output)."),
    Opt("dtype", Dtype, Dtype.auto, "auto: float32 on CPU, bfloat16 on a GPU that has it."),
    Opt("device", str, "auto", "auto, cpu, cuda, cuda:1 ..."),
))


# How passages are found in a notes index (`retrieve`, `ask`, `chat`, `serve`).
RETRIEVAL = OptionGroup("retrieval", (
    Opt("search", SearchMode, SearchMode(DEFAULT_SEARCH),
        "; ".join(f"{name}: {what}" for name, what in SEARCH_MODES.items()) + ". An index built before keyword "
        "search is searched dense until re-indexed."),
    Opt("reranker", Optional[str], None, "A sentence-transformers CrossEncoder (hub id or folder) that re-scores "
                                         "the top candidates, e.g. cross-encoder/ms-marco-MiniLM-L6-v2."),
))


def retrieval_settings(retrieval: dict) -> dict:
    """The RETRIEVAL group's values as `Retriever` keyword arguments (the Enum to its word)."""
    from probllm.cli.choices import value

    return {"search": value(retrieval["search"]), "reranker": retrieval["reranker"]}


def backend_config(backend: dict, **more):
    """A `probllm.lm.BackendConfig` from an option group's values (Enums to their words) and more settings."""
    from probllm.cli.choices import value
    from probllm.lm import BackendConfig

    return BackendConfig(**{k: value(v) for k, v in {**backend, **more}.items()})
