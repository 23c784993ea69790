"""The backend options, defined once: every model-using command (corrupt, judge, eval, ask, serve, reward-eval,
quantize) takes the same names with the same meaning. Commands declare the ones they use as parameters with
these types and pass them to `backend_config`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Backend = Annotated[str, typer.Option("--backend", help="openai (any OpenAI-compatible endpoint: vLLM, Ollama, "
                                                        "llama.cpp, OpenAI, probllm serve), hf (local "
                                                        "transformers model) or rules (corrupt only, no model).")]
Model = Annotated[Optional[str], typer.Option("--model", help="hf: hub id, folder or `quantize` output (default: "
                                                              "the offline SmolLM2); openai: the endpoint's model "
                                                              "name.")]
BaseUrl = Annotated[Optional[str], typer.Option("--base-url", help="OpenAI-compatible base URL, e.g. "
                                                                   "http://localhost:8000/v1 (vLLM, probllm serve).")]
ApiKeyEnv = Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the API key "
                                                              "(never printed).")]
Adapter = Annotated[Optional[str], typer.Option("--adapter", help="LoRA adapter folder (a `dpo` output) on the "
                                                                  "local model.")]
Concurrency = Annotated[int, typer.Option("--concurrency", help="Requests in flight at once (openai).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Prompts per model call (hf).")]
Tries = Annotated[int, typer.Option("--tries", help="Attempts per request on 429/5xx/timeouts/malformed "
                                                    "answers, with exponential backoff and Retry-After.")]
RetryBase = Annotated[float, typer.Option("--retry-base", help="First backoff in seconds (doubles each retry).")]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds before one request counts as timed out.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "--max-new-tokens", help="Most tokens generated per "
                                                                                  "answer.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy.")]
TopP = Annotated[float, typer.Option("--top-p")]
CacheFile = Annotated[Optional[Path], typer.Option("--cache", help="Response cache (SQLite); default "
                                                                   "~/.cache/probllm/llm-cache.sqlite.")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the response cache.")]
Dtype = Annotated[str, typer.Option("--dtype", help="hf: auto (float32 on CPU, bfloat16 on a GPU that has it), "
                                                    "float32, bfloat16, float16.")]
Device = Annotated[str, typer.Option("--device", help="hf: auto, cpu, cuda, cuda:1...")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="hf: run the model repository's own "
                                                                           "code (only for models you trust).")]


def backend_config(**kw):
    """The options as the `BackendConfig` that `probllm.lm.make_backend` / `make_lm` take."""
    from probllm.lm import BackendConfig

    return BackendConfig(**kw)
