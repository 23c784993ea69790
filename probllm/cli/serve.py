"""`probllm serve` (logic in probllm/serve)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from probllm.cli.app import app, command
from probllm.cli.choices import value
from probllm.cli.groups import uses
from probllm.cli.options import LOCAL_MODEL, RETRIEVAL, retrieval_settings


@app.command("serve")
@uses(LOCAL_MODEL, RETRIEVAL)
def serve_command(
    local_model: dict = None,
    retrieval: dict = None,
    index: Annotated[Optional[str], typer.Option("--index", help="Index folder built by `probllm index`: serve "
                                                 "the course assistant (answers grounded in the notes, with "
                                                 "their sources).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Passages retrieved per question.", min=1)] = 4,
    embedder: Annotated[Optional[str], typer.Option("--embedder", help="Embedder for --index (default: the "
                                                    "index's own).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes the server to the "
                                      "network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free port, printed).", min=0,
                                      max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="PROBLLM_API_KEY", show_envvar=True,
                                                   show_default=False,
                                                   help="Require 'Authorization: Bearer KEY' on /v1 routes.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="The model name clients "
                                                             "send (default: the model's label).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Most requests generated together.",
                                            min=1)] = 8,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="How long a request waits for others to "
                                               "share its batch.", min=0)] = 5.0,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repository's own "
                                                    "code (only for models you trust).")] = False,
) -> None:
    """Serve the model (with --index: the course assistant) as an OpenAI-compatible HTTP API.

    /v1/chat/completions (streamed or whole; with --index the answer's `sources` come back too),
    /v1/completions (echo + logprobs for lm-eval's `local-completions`), /v1/models, and a chat page at /.
    Concurrent requests share batched generation. Binds 127.0.0.1:8000 by default; Ctrl-C stops it.

        probllm serve --index runs/demo/notes.idx
        probllm ask "What is heapsort?" --backend openai \\
            --base-url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct
    """
    from probllm.serve.server import serve

    settings = {k: value(v) for k, v in local_model.items()}
    with command("serve", quiet_summary=True):
        serve(**settings, **retrieval_settings(retrieval), index=index, top_k=top_k, embedder=embedder, host=host, port=port, api_key=api_key,
              served_model_name=served_model_name, batch_size=batch_size, max_wait_ms=max_wait_ms,
              trust_remote_code=trust_remote_code)
