"""`chat`: the course assistant as a conversation at the terminal (logic in probllm/rag/chat.py)."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from probllm.cli.app import Seed, app, command


@app.command("chat")
def chat_command(
    index: Annotated[Optional[str], typer.Option("--index", help="Notes index (`probllm index`): passages are "
                                                 "retrieved here for every question. Without it, a `probllm "
                                                 "serve --index` server's own sources are shown.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Local: hub id, folder (also a `quantize` "
                                                 "output) or nothing for the offline SmolLM2-135M-Instruct. With "
                                                 "--base-url: the server's model name (default: its first).")]
        = None,
    adapter: Annotated[Optional[str], typer.Option("--adapter", help="LoRA adapter folder (a `dpo` output).")]
        = None,
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="An OpenAI-compatible server (`probllm "
                                                    "serve`, vLLM, ...), e.g. http://127.0.0.1:8000/v1; "
                                                    "without it the model runs here.")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the server's "
                                             "API key (never given on the command line).")] = "PROBLLM_API_KEY",
    k: Annotated[int, typer.Option("-k", "--top-k", help="Passages per question.")] = 4,
    mcq: Annotated[bool, typer.Option("--mcq", help="Questions written with options (\"... A) x B) y\") get a "
                                      "letter and a one-line reason.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens per answer.")] = 256,
    context_tokens: Annotated[Optional[int], typer.Option("--context-tokens", help="The model's context, for "
                                                          "cutting old turns [default: the model's, or what the "
                                                          "server says, else 4096].")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (default); > 0 samples, "
                                               "seeded by --seed.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="Local model: penalty on "
                                                      "tokens repeated within the answer (1.0 = none).")] = 1.15,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the server.")] = 60.0,
    embedder: Annotated[Optional[str], typer.Option("--embedder", help="sentence-transformers model; default: "
                                                    "the index's own.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU), float32, bfloat16, float16.")] =
        "auto",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda ...")] = "auto",
    seed: Seed = 0,
) -> None:
    """Talk with the course assistant: follow-up questions, answers streamed with their sources.

    Each question is sent with the conversation so far (oldest turns dropped first when it no longer fits the
    model). Commands: /sources (the passages of the last answer), /reset, /save FILE (JSONL that `judge`
    reads), /help, /quit. Ctrl-C stops an answer, Ctrl-D quits.

        probllm chat --index runs/demo/notes.idx
        probllm chat --base-url http://127.0.0.1:8000/v1          # a `probllm serve --index ...`
        probllm chat --index notes.idx --mcq --model runs/x-nf4
    """
    from probllm.io import UsageError, log
    from probllm.rag.chat import Conversation, LocalChat, RemoteChat, banner, run_terminal

    with command("chat", quiet_summary=True) as stats:
        if k < 1:
            raise UsageError("-k must be at least 1")
        if max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        if base_url and adapter:
            raise UsageError("--adapter loads a local model: not with --base-url (serve the adapter instead)")
        retriever = None
        if index:
            from probllm.rag.retrieve import Retriever

            retriever = Retriever(index, embedder=embedder)
        if base_url:
            backend = RemoteChat(base_url, model=model, api_key=os.environ.get(api_key_env), timeout=timeout,
                                 temperature=temperature, seed=seed, context_tokens=context_tokens)
            problem = backend.check()
            if problem:
                log(f"probllm chat: {problem}; questions will be sent when it answers")
        else:
            from probllm.models import model_label
            from probllm.rag.ask import Generator

            generator = Generator(model, adapter=adapter, dtype=dtype, device=device, seed=seed,
                                  temperature=temperature, repetition_penalty=repetition_penalty)
            name = model_label(model) + (f" + {adapter}" if adapter else "")
            backend = LocalChat(generator, name, context_tokens=context_tokens)
        conversation = Conversation(backend, retriever, k=k, max_new_tokens=max_new_tokens, mcq=mcq)
        log(banner(conversation, index))
        stats.written = run_terminal(conversation)
