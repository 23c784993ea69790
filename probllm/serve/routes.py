"""The OpenAI routes and the chat page: each one checks its request (a pydantic model), asks the engine, and
shapes the answer. No model code here (that is the engine's), no retrieval logic (the assistant's).

- `GET /v1/models`: the served name with `max_model_len`, as vLLM lists it.
- `POST /v1/chat/completions`, whole or streamed (SSE `data: {...}` lines, `data: [DONE]` last). With an index,
  `sources` is a top-level field of the response (in a stream, of the first chunk); without one, [].
- `POST /v1/completions` (echo + logprobs + max_tokens 0: prompt log-probs, what lm-eval's
  `local-completions` scores with), where the engine has it.
- `GET /health`, and `GET /` the chat page (its files under /static), without a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, PlainTextResponse, Response

from probllm.lm.serving import COMPLETIONS, DEFAULT_MAX_TOKENS, EngineUnavailable, Finish, SamplingParams
from probllm.serve.app import Serving, log_internal_error, require_key, serving
from probllm.serve.assistant import ground
from probllm.serve.protocol import (APIError, ChatCompletion, ChatCompletionRequest, Completion,
                                    CompletionRequest, Health, ModelCard, ModelList, error_body)

router = APIRouter()
v1 = [Depends(require_key)]


def check_model(name: str, s: Serving) -> None:
    if name != s.model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{s.model_name}'",
                       param="model", code="model_not_found")


def sampling(req, max_tokens: int | None) -> SamplingParams:
    """The request's settings; greedy unless a temperature is given (the server's documented default)."""
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature or 0.0,
                          top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
                          repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                          stop=tuple(req.stop))


@router.get("/", include_in_schema=False)
async def page(s: Serving = Depends(serving)):
    index = s.static_dir / "index.html"
    if index.exists():
        return FileResponse(index)
    return PlainTextResponse(f"probllm serve: {s.model_name}. OpenAI-compatible API under /v1.\n")


@router.get("/health", include_in_schema=False, response_model=Health)
async def health(s: Serving = Depends(serving)):
    return Health(status="ok", model=s.model_name, **s.engine.stats())


@router.get("/v1/models", dependencies=v1, response_model=ModelList)
async def models(s: Serving = Depends(serving)):
    card = await s.engine.card()
    return ModelList(data=[ModelCard(id=s.model_name, created=s.created, max_model_len=card.get("max_model_len"))])


@router.post("/v1/chat/completions", dependencies=v1, response_model=ChatCompletion)
async def chat_completions(req: ChatCompletionRequest, s: Serving = Depends(serving)):
    check_model(req.model, s)
    params = sampling(req, req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens)
    messages = [m.model_dump() for m in req.messages]
    retriever = s.retriever if req.probllm is None or req.probllm.retrieve else None
    if retriever is not None:
        max_len = (await s.engine.card()).get("max_model_len")
        room = min(params.max_tokens or DEFAULT_MAX_TOKENS, (max_len or 4 * DEFAULT_MAX_TOKENS) // 4)
        messages, sources = await ground(messages, retriever, s.engine, s.top_k, room, max_len, s.documents)
    else:
        sources = []
    rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if not req.stream:
        reply = await s.engine.chat(messages, params)
        f = reply.finish
        total = None if f.prompt_tokens is None or f.completion_tokens is None \
            else f.prompt_tokens + f.completion_tokens
        return {"id": rid, "created": now, "model": s.model_name, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": f.reason}],
                "usage": {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                          "total_tokens": total},
                "sources": sources}

    stream = s.engine.stream_chat(messages, params)
    # The first piece before the headers: a request the engine refuses, or an upstream that is down, is then
    # an HTTP error (4xx, 502/503) rather than a 200 whose stream says so.
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = Finish()
    except BaseException:
        await stream.aclose()
        raise

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        # Written by hand, not through a pydantic model: one of these goes out per token.
        doc = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": s.model_name,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"

    async def events():
        head = chunk({"role": "assistant", "content": ""}, sources=sources)
        piece = first
        if isinstance(piece, str) and piece:  # one write with the first token: it is what the client waits for
            head += chunk({"content": piece})
            piece = ""
        yield head
        try:
            async with contextlib.aclosing(stream):
                while True:
                    if isinstance(piece, Finish):
                        yield chunk({}, piece.reason)
                        break
                    if piece:
                        yield chunk({"content": piece})
                    piece = await anext(stream, Finish())
        except Exception as e:  # the headers are sent: report in the stream, in the same error shape
            message = e.message if isinstance(e, EngineUnavailable) else \
                f"internal error (id {log_internal_error('POST', '/v1/chat/completions (stream)')})"
            yield f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"
            return
        yield "data: [DONE]\n\n"

    return EventStream(events())


class EventStream(Response):
    """A server-sent event stream written straight to the connection, each event as soon as it is made.

    Not starlette's StreamingResponse: under ASGI 2.3 (uvicorn) that starts a task group per response to listen
    for the client leaving, and its first write waits for the event loop's next turn. When a batch's first
    tokens arrive together (dozens of streams at once), every stream then waits for all the others before its
    first token goes out: the assistant layer's added time to first token. Here the client leaving is watched
    by one plain task, read between events (a stream whose client left is closed at its next event, which
    frees the engine's row or closes the upstream's connection)."""

    media_type = "text/event-stream"

    def __init__(self, events):
        self.status_code, self.background, self.events = 200, None, events
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        gone = asyncio.ensure_future(disconnected())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with contextlib.aclosing(self.events) as events:
                async for event in events:
                    if gone.done():
                        return
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()


@router.post("/v1/completions", dependencies=v1, response_model=Completion)
async def completions(req: CompletionRequest, s: Serving = Depends(serving)):
    check_model(req.model, s)
    if COMPLETIONS not in s.engine.capabilities:
        raise APIError(404, f"the {s.engine.name} engine has no /v1/completions", code="not_found")
    if req.stream:
        raise APIError(400, "stream is not supported on /v1/completions; use /v1/chat/completions",
                       param="stream")
    if len(req.prompt) > s.limits.max_prompts:
        raise APIError(400, f"'prompt' holds {len(req.prompt)} prompts; this server takes at most "
                            f"{s.limits.max_prompts} per request (--max-prompts)", param="prompt",
                       code="too_many_prompts")
    out = await s.engine.completions(req.prompt, sampling(req, req.max_tokens), echo=req.echo,
                                     logprobs=req.logprobs)
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": s.model_name, **out}
