"""`chat`: the course assistant as a conversation at the terminal (logic in probllm/rag/chat.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from probllm.cli.app import Seed, app, command
from probllm.cli.options import Adapter, ApiKeyEnv, BaseUrl, Device, Dtype, Model, Timeout


@app.command("chat")
def chat_command(
    index: Annotated[Optional[str], typer.Option("--index", help="Notes index (`probllm index`): passages are "
                                                 "retrieved here for every question. Without it, a `probllm "
                                                 "serve --index` server's own sources are shown.")] = None,
    model: Model = None,
    adapter: Adapter = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="hf (a local model) or openai (an "
                                                   "OpenAI-compatible server: probllm serve, vLLM, Ollama...) "
                                                   "[default: openai with --base-url, else hf].")] = None,
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = "PROBLLM_API_KEY",
    timeout: Timeout = 60.0,
    k: Annotated[int, typer.Option("-k", "--top-k", help="Passages per question.")] = 4,
    mcq: Annotated[bool, typer.Option("--mcq", help="Questions written with options (\"... A) x B) y\") get a "
                                      "letter and a one-line reason.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens per answer.")] = 256,
    context_tokens: Annotated[Optional[int], typer.Option("--context-tokens", help="The model's context, for "
                                                          "cutting old turns [default: the local model's, or "
                                                          "what the server says, else 4096].")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (default); > 0 samples, "
                                               "seeded by --seed.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="Penalty on tokens repeated "
                                                      "within the answer (1.0 = none); small models loop "
                                                      "without it.")] = 1.15,
    embedder: Annotated[Optional[str], typer.Option("--embedder", help="sentence-transformers model for --index "
                                                    "(default: the index's own).")] = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    seed: Seed = 0,
) -> None:
    """Talk with the course assistant: follow-up questions, answers streamed with their sources.

    Each question is sent with the conversation so far (the oldest turns are left out first when it no longer
    fits the model). Commands: /sources (the passages of the last answer), /reset, /save FILE (JSONL that
    `judge` reads), /help, /quit. Ctrl-C stops an answer, Ctrl-D quits.

        probllm chat --index runs/demo/notes.idx
        probllm chat --base-url http://127.0.0.1:8000/v1          # a `probllm serve --index ...`
        probllm chat --index notes.idx --mcq --model runs/x-nf4
    """
    from probllm.io import UsageError, log
    from probllm.rag.chat import ChatModel, Conversation, banner, run_terminal

    with command("chat", quiet_summary=True) as stats:
        backend = backend or ("openai" if base_url else "hf")
        if backend not in ("hf", "openai"):
            raise UsageError(f"--backend {backend}: choose hf or openai")
        if k < 1:
            raise UsageError("-k must be at least 1")
        if max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        generator_options = dict(seed=seed, temperature=temperature, repetition_penalty=repetition_penalty)
        if backend == "openai":
            if not base_url:
                raise UsageError("--backend openai needs --base-url (the server, e.g. http://127.0.0.1:8000/v1)")
            if adapter:
                raise UsageError("--adapter loads a local model: serve the adapter (`probllm serve --adapter`) "
                                 "and point --base-url at it")
            chat_model = ChatModel.remote(base_url, model, api_key_env=api_key_env, timeout=timeout,
                                          context_tokens=context_tokens, **generator_options)
        else:
            if base_url:
                raise UsageError("--base-url is for --backend openai")
            chat_model = ChatModel.local(model, context_tokens=context_tokens, adapter=adapter, dtype=dtype,
                                         device=device, **generator_options)
        retriever = None
        if index:
            from probllm.rag.retrieve import Retriever

            retriever = Retriever(index, embedder=embedder)
        problem = chat_model.connect()
        if problem:
            log(f"probllm chat: {problem}; questions will be sent when it answers")
        conversation = Conversation(chat_model, retriever, k=k, max_new_tokens=max_new_tokens, mcq=mcq)
        log(banner(conversation, index))
        stats.written = run_terminal(conversation)
