"""Running the app: load the model, bind (127.0.0.1 by default), print the URL on stderr, stop cleanly on
Ctrl-C / SIGTERM (uvicorn finishes the requests in flight, then returns)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from probllm.io import UsageError, log

API_KEY_ENV = "PROBLLM_API_KEY"


def serve(*, model: str | None, adapter: str | None = None, index: str | None = None, top_k: int = 4,
          embedder: str | None = None, search: str = "hybrid", reranker: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, batch_size: int = 8, max_wait_ms: float = 5.0,
          dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False) -> None:
    import uvicorn

    from probllm.lm.hf_backend import HFLM
    from probllm.models import model_label
    from probllm.serve.app import create_app

    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: choose 0 to 65535")
    if top_k < 1 or batch_size < 1:
        raise UsageError("--top-k and --batch-size must be at least 1")
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    lm = HFLM(model, adapter=adapter, batch_size=batch_size, dtype=dtype, device=device,
              max_wait=max_wait_ms / 1000, trust_remote_code=trust_remote_code,
              spare_core_when_batched=True).load()
    retriever = documents = None
    if index:
        from probllm.rag.retrieve import Retriever
        from probllm.serve.app import ThreadRetriever

        from probllm.serve.documents import Documents

        retriever = ThreadRetriever(lambda: Retriever(index, embedder=embedder, search=search, reranker=reranker))
        documents = Documents.from_index(index)
    name = served_model_name or model_label(model)
    app = create_app(lm, name, api_key=api_key, retriever=retriever, top_k=top_k, documents=documents)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            log(f"probllm serve: {name} at http://{shown}:{bound}/v1"
                f"{' with the notes of ' + index + f' ({search} search)' if index else ''}"
                f"{' (API key required)' if api_key else ''}; chat page at http://{shown}:{bound}/ ; Ctrl-C stops")
            sys.stderr.flush()
        await task

    # uvicorn catches SIGINT/SIGTERM, finishes the requests in flight, then raises the signal again once it has
    # stopped: that is the normal end of a server, not an interruption of work.
    previous = signal.signal(signal.SIGTERM, _stop_requested)
    try:
        asyncio.run(main())
    except (KeyboardInterrupt, _StopRequested):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise UsageError(f"cannot listen on {host}:{port} (in use, or not an address of this machine)")
    log("probllm serve: stopped")


class _StopRequested(Exception):
    pass


def _stop_requested(signum, frame):
    raise _StopRequested()
