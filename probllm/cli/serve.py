"""`probllm serve` (logic in probllm/serve)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from probllm.cli.app import app, command
from probllm.cli.choices import CompareBy, value
from probllm.cli.groups import uses
from probllm.cli.options import ENDPOINT, LOCAL_MODEL, RETRIEVAL, retrieval_settings

# Where answers come from: the local model (default) or an OpenAI-compatible upstream (keys of
# probllm.lm.SERVING_ENGINES).
UPSTREAM = ENDPOINT.only("backend", "base_url", "api_key_env", "timeout", "concurrency").replace(
    "backend", help="hf: a local transformers model in this process; openai: the assistant in front of any "
                    "OpenAI-compatible server (vLLM, llama.cpp, Ollama, transformers serve) at --base-url, with "
                    "--model its model name.").replace(
    "base_url", help="The upstream's base URL with --backend openai, e.g. http://127.0.0.1:8001/v1 (vLLM).").replace(
    "api_key_env", help="Environment variable holding the upstream's API key (never printed).").replace(
    "timeout", default=120.0, help="Seconds an upstream request may take (connecting: at most 5).").replace(
    "concurrency", default=256, help="Requests in flight to the upstream at once (per worker).")


@app.command("serve")
@uses(LOCAL_MODEL, UPSTREAM, RETRIEVAL)
def serve_command(
    local_model: dict = None,
    backend: dict = None,
    retrieval: dict = None,
    index: Annotated[Optional[str], typer.Option("--index", help="Index folder built by `probllm index`: serve "
                                                 "the course assistant (answers grounded in the notes, with "
                                                 "their sources).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Passages retrieved per question.", min=1)] = 4,
    embedder: Annotated[Optional[str], typer.Option("--embedder", help="Embedder for --index (default: the "
                                                    "index's own).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback (e.g. 0.0.0.0) "
                                      "needs --api-key or --no-api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free port, printed).", min=0,
                                      max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="PROBLLM_API_KEY", show_envvar=True,
                                                   show_default=False,
                                                   help="Require 'Authorization: Bearer KEY' on /v1 routes.")] = None,
    no_api_key: Annotated[bool, typer.Option("--no-api-key", help="Serve a non-loopback --host without a key, "
                                             "on purpose (e.g. behind a proxy that checks access).")] = False,
    allowed_host: Annotated[Optional[list[str]], typer.Option("--allowed-host", help="A Host name clients may "
                                                              "use besides the bound address and localhost "
                                                              "(repeat; e.g. the domain of a reverse proxy). "
                                                              "Other Hosts are refused (DNS rebinding).")] = None,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="Largest request body (413 above).",
                                                min=1024)] = 4 * 1024 * 1024,
    max_prompts: Annotated[int, typer.Option("--max-prompts", help="Most prompts in one /v1/completions "
                                             "request.", min=1)] = 256,
    workers: Annotated[int, typer.Option("--workers", help="Server processes (with --backend openai, where the "
                                         "upstream does the heavy work).", min=1)] = 1,
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="The model name clients "
                                                             "send (default: the model's label, with the adapter's: "
                                                             "MODEL+ADAPTER; with --backend "
                                                             "openai, --model).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Most requests generated together (local).",
                                            min=1)] = 8,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="How long a request waits for others to "
                                               "share its batch (local).", min=0)] = 5.0,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repository's own "
                                                    "code (only for models you trust).")] = False,
    feedback: Annotated[Optional[str], typer.Option("--feedback", metavar="FILE.sqlite", help="Record students' "
                                                    "ratings (and --compare votes) from the chat page in this "
                                                    "SQLite file; `probllm feedback export` reads it.")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Compare mode: the page answers each question twice, "
                                          "side by side, and asks which is better (needs --feedback).")] = False,
    compare_by: Annotated[CompareBy, typer.Option("--compare-by", help="samples: two sampled answers; notes: "
                                                  "with and without the notes (needs --index).")]
    = CompareBy.samples,
) -> None:
    """Serve the model (with --index: the course assistant) as an OpenAI-compatible HTTP API.

    /v1/chat/completions (streamed or whole; with --index the answer's `sources` come back too),
    /v1/completions (echo + logprobs for lm-eval's `local-completions`), /v1/models, and a chat page at /.
    Concurrent requests share batched generation. With --backend openai the assistant sits in front of any
    OpenAI-compatible server (vLLM for many users). Binds 127.0.0.1:8000 by default; Ctrl-C stops it. With
    --feedback, the page offers thumbs up/down (and with --compare, blind side-by-side votes) and stores them.

        probllm serve --index runs/demo/notes.idx
        probllm serve --index runs/demo/notes.idx \\
            --feedback runs/feedback.sqlite --compare
        probllm ask "What is heapsort?" --backend openai \\
            --base-url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct
        probllm serve --backend openai --base-url http://127.0.0.1:8001/v1 \\
            --model SmolLM2-135M-Instruct --index runs/demo/notes.idx --workers 2
        probllm serve --host 0.0.0.0 --api-key "$KEY" \\
            --allowed-host course.example.org
    """
    from probllm.serve.server import ServeSettings, serve

    settings = ServeSettings(**{k: value(v) for k, v in {**local_model, **backend}.items()}, index=index,
                             top_k=top_k, embedder=embedder, **retrieval_settings(retrieval), host=host,
                             port=port, api_key=api_key,
                             no_api_key=no_api_key, allowed_hosts=list(allowed_host or []),
                             max_body_bytes=max_body_bytes, max_prompts=max_prompts, workers=workers,
                             served_model_name=served_model_name, batch_size=batch_size,
                             max_wait_ms=max_wait_ms, trust_remote_code=trust_remote_code,
                             feedback=feedback, compare=value(compare_by) if compare else None)
    with command("serve", quiet_summary=True):
        serve(settings)
