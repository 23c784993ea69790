"""Running the app: make the engine (a local model, or an OpenAI-compatible upstream), bind (127.0.0.1 by
default), print the URL on stderr, stop cleanly on Ctrl-C / SIGTERM (uvicorn finishes the requests in flight,
then returns). With `--workers N` (an upstream engine only: N copies of a local model would not fit) several
uvicorn processes share the socket, each with its own engine and retriever."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field

from probllm.io import UsageError, log

API_KEY_ENV = "PROBLLM_API_KEY"
_WORKER_SETTINGS_ENV = "PROBLLM_SERVE_WORKER_SETTINGS"   # the settings each worker process builds its app from


@dataclass
class ServeSettings:
    """Everything `probllm serve` was told, in one place (and, for --workers, what each worker gets)."""

    backend: str = "hf"
    model: str | None = None
    adapter: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    concurrency: int = 256
    index: str | None = None
    top_k: int = 4
    embedder: str | None = None
    search: str = "hybrid"             # a key of probllm.rag.search.SEARCH_MODES
    reranker: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    no_api_key: bool = False
    allowed_hosts: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompts: int = 256
    workers: int = 1
    served_model_name: str | None = None
    batch_size: int = 8
    max_wait_ms: float = 5.0
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    feedback: str | None = None     # the students' votes (probllm/serve/feedback.py)
    compare: str | None = None      # compare mode: a key of COMPARE_MODES, None for off


def announced_name(settings: ServeSettings) -> str:
    """The model name clients send and /v1/models lists."""
    if settings.served_model_name:
        return settings.served_model_name
    if settings.backend == "openai":
        return settings.model or ""
    from probllm.models import model_label

    # With an adapter the served model is another model: clients (and their caches) must be able to tell.
    return model_label(settings.model, settings.adapter)


def check(settings: ServeSettings) -> None:
    """Refuse what cannot or should not start, before anything loads."""
    from probllm.lm import SERVING_ENGINES
    from probllm.serve.app import is_loopback

    if settings.backend not in SERVING_ENGINES:
        raise UsageError(f"--backend {settings.backend}: choose one of {', '.join(SERVING_ENGINES)}")
    if not 0 <= settings.port <= 65535:
        raise UsageError(f"--port {settings.port}: choose 0 to 65535")
    if settings.top_k < 1 or settings.batch_size < 1 or settings.workers < 1:
        raise UsageError("--top-k, --batch-size and --workers must be at least 1")
    if settings.max_body_bytes < 1024 or settings.max_prompts < 1:
        raise UsageError("--max-body-bytes must be at least 1024 and --max-prompts at least 1")
    if settings.workers > 1 and settings.backend != "openai":
        raise UsageError("--workers N needs --backend openai (each worker would load its own copy of a local "
                         "model); put vLLM or another engine behind it for many users")
    if settings.api_key and settings.no_api_key:
        raise UsageError("--api-key and --no-api-key contradict each other")
    check_feedback(settings.feedback, settings.compare, settings.index)
    if not is_loopback(settings.host) and not settings.api_key and not settings.no_api_key:
        raise UsageError(f"--host {settings.host} faces the network: set --api-key (or ${API_KEY_ENV}), or give "
                         "--no-api-key to serve it without one on purpose")


def build_app(settings: ServeSettings):
    """The app these settings describe (engine made, index opened)."""
    from probllm.lm import make_engine
    from probllm.serve.app import Limits, allowed_hosts, create_app

    retriever = documents = None
    if settings.index:
        from probllm.rag.retrieve import Retriever
        from probllm.serve.assistant import ThreadRetriever
        from probllm.serve.documents import Documents

        index, embedder, search, reranker = settings.index, settings.embedder, settings.search, settings.reranker
        retriever = ThreadRetriever(lambda: Retriever(index, embedder=embedder, search=search, reranker=reranker))
        documents = Documents.from_index(index)
    # The model after the index: an empty or unreadable index is refused before a model load is paid for.
    engine = make_engine(settings.backend, model=settings.model, adapter=settings.adapter,
                         base_url=settings.base_url, api_key_env=settings.api_key_env, timeout=settings.timeout,
                         concurrency=settings.concurrency, batch_size=settings.batch_size,
                         max_wait=settings.max_wait_ms / 1000, dtype=settings.dtype, device=settings.device,
                         trust_remote_code=settings.trust_remote_code)
    routers = []
    if settings.feedback:  # mounted only when asked for: a server without --feedback has no such routes
        from probllm.serve.feedback import FeedbackConfig, FeedbackStore, feedback_router

        routers.append(feedback_router(FeedbackConfig(FeedbackStore(settings.feedback), settings.compare)))
    return create_app(engine, announced_name(settings), api_key=settings.api_key, retriever=retriever,
                      top_k=settings.top_k,
                      limits=Limits(max_body_bytes=settings.max_body_bytes, max_prompts=settings.max_prompts),
                      hosts=allowed_hosts(settings.host, settings.allowed_hosts), routers=routers,
                      documents=documents)


def worker_app():
    """The app of one `--workers` process (uvicorn's factory), from the settings the parent left in the env."""
    return build_app(ServeSettings(**json.loads(os.environ[_WORKER_SETTINGS_ENV])))


def serve(settings: ServeSettings) -> None:
    import uvicorn

    settings.api_key = settings.api_key or os.environ.get(API_KEY_ENV) or None
    check(settings)
    name = announced_name(settings)
    common = dict(host=settings.host, port=settings.port, log_level="warning", access_log=False,
                  timeout_graceful_shutdown=5)

    def announce(port: int) -> None:
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        # The upstream after our own URL: scripts take the first URL of this line as the server's.
        via = f" in front of {settings.base_url}" if settings.backend == "openai" else ""
        log(f"probllm serve: {name} at http://{shown}:{port}/v1{via}"
            f"{' with the notes of ' + settings.index + f' ({settings.search} search)' if settings.index else ''}"
            f"{' (API key required)' if settings.api_key else ''}"
            f"{f', {settings.workers} workers' if settings.workers > 1 else ''}"
            f"{'; votes to ' + settings.feedback if settings.feedback else ''}"
            f"{' (compare: ' + settings.compare + ')' if settings.compare else ''}"
            f"; chat page at http://{shown}:{port}/ ; Ctrl-C stops")
        sys.stderr.flush()

    if settings.workers > 1:
        _serve_workers(settings, common, announce)
        return

    config = uvicorn.Config(build_app(settings), **common)
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            announce(server.servers[0].sockets[0].getsockname()[1])
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
        raise UsageError(f"cannot listen on {settings.host}:{settings.port} (in use, or not an address of this "
                         "machine)")
    log("probllm serve: stopped")


def _serve_workers(settings: ServeSettings, common: dict, announce) -> None:
    """uvicorn's own supervisor: the parent binds the socket (so --port 0 is known before the workers start)
    and restarts a worker that dies."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    os.environ[_WORKER_SETTINGS_ENV] = json.dumps(asdict(settings))
    config = uvicorn.Config("probllm.serve.server:worker_app", factory=True, workers=settings.workers, **common)
    try:
        sock = config.bind_socket()
    except SystemExit:
        raise UsageError(f"cannot listen on {settings.host}:{settings.port} (in use, or not an address of this "
                         "machine)") from None
    sock.listen(config.backlog)  # clients queue from now on, not refused while the workers start
    announce(sock.getsockname()[1])
    Multiprocess(config, sockets=[sock]).run()
    log("probllm serve: stopped")


def check_feedback(path: str | None, compare: str | None, index: str | None) -> None:
    if path is None:
        if compare is not None:
            raise UsageError("--compare records votes: give --feedback FILE.sqlite too")
        return
    from probllm.serve.feedback import COMPARE_MODES, FeedbackStore

    if compare is not None and compare not in COMPARE_MODES:
        raise UsageError(f"--compare-by {compare}: choose one of {', '.join(COMPARE_MODES)}")
    if compare == "notes" and not index:
        raise UsageError("--compare-by notes compares answers with and without the notes: give --index too")
    FeedbackStore(path)  # created (or its schema checked) now: a bad path is refused before the model loads


class _StopRequested(Exception):
    pass


def _stop_requested(signum, frame):
    raise _StopRequested()
