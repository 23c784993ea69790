"""`chat`: the course assistant as a conversation at the terminal (logic in probllm/rag/chat.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from probllm.cli.app import Seed, app, command
from probllm.cli.groups import uses
from probllm.cli.options import ENDPOINT, LOCAL_MODEL, RETRIEVAL, retrieval_settings

# One conversation sends one request at a time: the endpoint's concurrency means nothing here.
CHAT_ENDPOINT = ENDPOINT.without("concurrency").replace(
    "backend", default=None,
    help="hf: a local transformers model; openai: any OpenAI-compatible server (probllm serve, vLLM, Ollama, "
         "llama.cpp, OpenAI) given by --base-url. Default: openai with --base-url, else hf.")


@app.command("chat")
@uses(CHAT_ENDPOINT, LOCAL_MODEL, RETRIEVAL)
def chat_command(
    index: Annotated[Optional[str], typer.Option("--index", help="Notes index (`probllm index`): passages are "
                                                 "retrieved here for every question. Without it, a `probllm "
                                                 "serve --index` server's own sources are shown.")] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", help="Passages per question.", min=1)] = 4,
    mcq: Annotated[bool, typer.Option("--mcq", help="Questions written with options (\"... A) x B) y\") get a "
                                      "letter and a one-line reason.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens per answer.", min=1)] = 256,
    context_tokens: Annotated[Optional[int], typer.Option("--context-tokens", help="The model's context, for "
                                                          "leaving out old turns [default: the local model's, or "
                                                          "what the server says, else 4096].", min=64)] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (default); > 0 samples, "
                                               "seeded by --seed.", min=0.0)] = 0.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="Penalty on tokens repeated "
                                                      "within the answer (1.0 = none); small models loop "
                                                      "without it.")] = 1.15,
    embedder: Annotated[Optional[str], typer.Option("--embedder", help="sentence-transformers model for --index "
                                                    "(default: the index's own).")] = None,
    backend: dict = None,
    local_model: dict = None,
    retrieval: dict = None,
    seed: Seed = 0,
) -> None:
    """Talk with the course assistant: follow-up questions, answers streamed with their sources.

    Each question is sent with the conversation so far (the oldest turns are left out first when it no longer
    fits the model). Commands: /sources (the passages of the last answer), /reset, /save FILE (JSONL that
    `judge` reads), /help, /quit. Ctrl-C stops an answer, Ctrl-D quits.

        probllm chat --index runs/demo/notes.idx
        probllm chat --base-url http://127.0.0.1:8000/v1
        probllm chat --index notes.idx --mcq --model runs/x-nf4

    With --base-url and a server started with `probllm serve --index`, leave out --index here: the server
    retrieves, and the sources it used are listed the same way.
    """
    from probllm.cli.choices import value
    from probllm.io import UsageError, log
    from probllm.rag.chat import ChatModel, Conversation, banner, run_terminal

    from probllm.lm import backend_spec

    base_url = backend["base_url"]
    # No --backend: an endpoint when --base-url names one, else a model in this process.
    remote = not backend_spec(value(backend["backend"])).local if backend["backend"] else bool(base_url)
    model, adapter = local_model["model"], local_model["adapter"]
    with command("chat", quiet_summary=True) as stats:
        generator_options = dict(seed=seed, temperature=temperature, repetition_penalty=repetition_penalty)
        if remote:
            if not base_url:
                raise UsageError("--backend openai needs --base-url (the server, e.g. http://127.0.0.1:8000/v1)")
            if adapter:
                raise UsageError("--adapter loads a local model: serve the adapter (`probllm serve --adapter`) "
                                 "and point --base-url at it")
            chat_model = ChatModel.remote(base_url, model, api_key_env=backend["api_key_env"],
                                          timeout=backend["timeout"], tries=backend["tries"],
                                          context_tokens=context_tokens, **generator_options)
        else:
            if base_url:
                raise UsageError("--base-url is for --backend openai")
            chat_model = ChatModel.local(model, context_tokens=context_tokens, adapter=adapter,
                                         dtype=value(local_model["dtype"]), device=local_model["device"],
                                         **generator_options)
        retriever = None
        if index:
            from probllm.rag.retrieve import Retriever

            retriever = Retriever(index, embedder=embedder, **retrieval_settings(retrieval))
        problem = chat_model.connect()
        if problem:
            log(f"probllm chat: {problem}; questions will be sent when it answers")
        conversation = Conversation(chat_model, retriever, k=k, max_new_tokens=max_new_tokens, mcq=mcq)
        log(banner(conversation, index))
        stats.written = run_terminal(conversation)
