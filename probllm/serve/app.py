"""`probllm serve`: a model (and, with an index, the course assistant) behind the OpenAI HTTP protocol.

FastAPI + uvicorn, the stack vLLM and transformers' own server use. The app is assembled here; the routes are
thin routers (`probllm/serve/routes.py`: /v1/models, /v1/chat/completions, /v1/completions, /health, the chat
page) over an `Engine` (probllm/lm/serving.py: a local model or any OpenAI-compatible upstream), with requests
and responses as pydantic models (`probllm/serve/protocol.py`).

Adding a feature's routes: write `probllm/serve/NAME.py` with `router = APIRouter()`, add its module to
`ROUTERS` below; a route reads what it needs through `Depends(serving)` (the engine, model name, retriever,
top_k) and takes `Depends(require_key)` where the API key applies.

Every request passes `Guard` first (the hardening): its Host must be one this server answers to (a DNS-rebinding
page on the same laptop names its own host), a POST must say it is JSON (a cross-site `text/plain` form post
cannot start generation: 415), and a body is at most `max_body_bytes` (413). Errors of every kind, ours
included, come back in OpenAI's shape; a 500 says "internal error" with an id that is in the server's log,
never the exception's text.
"""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import json
import secrets
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from starlette.requests import Request

from probllm.lm.serving import Engine, EngineRequestError, EngineUnavailable
from probllm.serve.assistant import ThreadRetriever
from probllm.serve.protocol import APIError, error_body, validation_error

STATIC = Path(__file__).resolve().parent / "static"

# The routers create_app includes, in order (each module defines `router`). Other features add theirs here.
ROUTERS = (
    "probllm.serve.routes",
)

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})


@dataclass(frozen=True)
class Limits:
    """What one request may be: the flags `--max-body-bytes` and `--max-prompts` set these."""

    max_body_bytes: int = 4 * 1024 * 1024     # a long conversation with a long context is well under this
    max_prompts: int = 256                    # prompts in one /v1/completions request


@dataclass
class Serving:
    """What routes need, on `app.state.serving` (a route takes it with `Depends(serving)`)."""

    engine: Engine
    model_name: str
    api_key: str | None = None
    retriever: ThreadRetriever | None = None
    top_k: int = 4
    documents: object | None = None           # the indexed files sources link to (probllm/serve/documents.py)
    static_dir: Path = STATIC
    limits: Limits = field(default_factory=Limits)
    created: int = field(default_factory=lambda: int(time.time()))


# Dependencies are coroutines: FastAPI runs a plain `def` dependency in its thread pool, a hand-off to a worker
# thread and back for every request (two per /v1 request, the most of the layer's cost per request in a burst).
async def serving(request: Request) -> Serving:
    return request.app.state.serving


async def require_key(request: Request) -> None:
    """The API key check (a dependency of the /v1 routes; the chat page and its files need no key)."""
    key = request.app.state.serving.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not given:
        raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                       type="authentication_error")
    if not secrets.compare_digest(given.encode(), key.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key", type="authentication_error")


def allowed_hosts(bound: str, extra: Sequence[str] = ()) -> frozenset[str] | None:
    """The Host names requests may carry: the bound address, the localhost names, and `--allowed-host` names.
    None (any Host) for a wildcard bind without `--allowed-host`: its names are not known, and a key is
    required there anyway."""
    extra = {h.lower().strip("[]") for h in extra}
    if _is_wildcard(bound) and not extra:
        return None
    return frozenset(LOCAL_NAMES | {bound.lower().strip("[]")} | extra)


def _is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _json_type(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class Guard:
    """Plain ASGI middleware (no buffering of responses: streams stay token by token) checking Host, the
    Content-Type of POSTs and the size of bodies before any route runs."""

    def __init__(self, app, hosts: frozenset[str] | None, max_body_bytes: int):
        self.app = app
        self.hosts = hosts
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.hosts is not None and _host_name(headers.get("host", "")) not in self.hosts:
            return await _reply(send, 400, f"the Host {headers.get('host', '')!r} is not one this server answers "
                                           "to (start it with --allowed-host NAME to add one)", "host_not_allowed")
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if not _json_type(headers.get("content-type", "")):
            return await _reply(send, 415, "send the body as JSON with 'Content-Type: application/json'",
                                "unsupported_media_type")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _reply(send, 413, f"the body is larger than {self.max_body} bytes", "body_too_large")
        # Read the (bounded) body here, so a chunked upload without a length is capped the same way.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await _reply(send, 413, f"the body is larger than {self.max_body} bytes", "body_too_large")
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _reply(send, status: int, message: str, code: str) -> None:
    data = json.dumps(error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None,
               retriever: ThreadRetriever | None = None, top_k: int = 4, static_dir: Path | None = None,
               limits: Limits | None = None, hosts: frozenset[str] | None = None,
               routers: Sequence = (), documents=None):
    """The FastAPI app around an engine. `hosts`: the Host names accepted (None: any; see `allowed_hosts`).
    `routers`: more routers to include after those of `ROUTERS`. `documents`: the index's files
    (`Documents`), served at /documents/{id} and linked from the sources."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    limits = limits or Limits()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await engine.aclose()  # an upstream's connections

    app = FastAPI(title="probllm serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.serving = Serving(engine, model_name, api_key=api_key, retriever=retriever, top_k=top_k,
                                documents=documents, static_dir=Path(static_dir or STATIC), limits=limits)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(EngineRequestError)
    async def _engine_refused(request: Request, exc: EngineRequestError):
        return JSONResponse(error_body(exc.message, param=exc.param, code=exc.code), status_code=exc.status)

    @app.exception_handler(EngineUnavailable)
    async def _engine_down(request: Request, exc: EngineUnavailable):
        return JSONResponse(error_body(exc.message, "server_error", code="upstream_unavailable"),
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return await _api_error(request, validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            return JSONResponse(error_body(f"no route {request.method} {request.url.path}", code="not_found"), 404)
        if exc.status_code == 405:
            return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}"), 405)
        return JSONResponse(error_body(str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # A bug of ours: the client gets an id to quote, the log gets the id with the traceback.
        return JSONResponse(error_body(f"internal error (id {log_internal_error(request.method, request.url.path)})",
                                       "server_error"), 500)

    if app.state.serving.static_dir.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=str(app.state.serving.static_dir)), name="static")
    for name in ROUTERS:
        app.include_router(importlib.import_module(name).router)
    if documents is not None:  # the indexed files, for the page's source links, with the API's key
        app.include_router(documents.router(require_key))
    for router in routers:
        app.include_router(router)
    app.add_middleware(Guard, hosts=hosts, max_body_bytes=limits.max_body_bytes)
    return app


def log_internal_error(method: str, path: str) -> str:
    """Log the exception being handled under a new id; the id (never the text) is what the client sees."""
    eid = f"err-{uuid.uuid4().hex[:12]}"
    print(f"probllm serve: internal error {eid} on {method} {path}:\n{traceback.format_exc()}", file=sys.stderr,
          flush=True)
    return eid
