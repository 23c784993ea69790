"""`probllm serve`: our model (and, with an index, the course assistant) behind the OpenAI HTTP protocol.

FastAPI + uvicorn, the stack vLLM and transformers' own server use. Routes:
- `GET /v1/models`
- `POST /v1/chat/completions`, whole or streamed (SSE `data: {...}` lines, `data: [DONE]` last). With an index,
  passages for the last user message (with the one before it, as `chat` searches) are retrieved and quoted in the prompt as `ask` does, and come back as
  `sources` (top-level field of the response; in a stream, of the first chunk). Without one, `sources` is [].
- `POST /v1/completions`, including `echo` + `logprobs` + `max_tokens: 0`: the log-prob of every prompt token,
  which is how lm-eval's `local-completions` model and probllm's own openai backend score log-likelihoods.
- `GET /` the chat page (`static/index.html`) and `/static/...` its files, without a key.

Concurrent chat requests share batched `generate` calls (see `HFLM`): each request streams its own row. Bad
requests get a 4xx with OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`; the server
keeps serving.
"""


import asyncio
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ------------------------------------------------------------------------------------------------- validation


def _field(body: dict, name: str, kinds: tuple, default: Any = None, check=None, what: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise APIError(400, f"'{name}' must be {what or kinds[0].__name__}, got a boolean", param=name)
    if not isinstance(value, kinds):
        raise APIError(400, f"'{name}' must be {what or kinds[0].__name__}, got {type(value).__name__}", param=name)
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' is out of range: {value!r}", param=name)
    return value


def gen_params(body: dict) -> dict:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    body = {**body, "max_tokens": max_tokens}
    return {
        "max_tokens": _field(body, "max_tokens", (int,), None, lambda v: v >= 0, "an integer"),
        "temperature": float(_field(body, "temperature", (int, float), 0.0, lambda v: 0 <= v <= 2, "a number")),
        "top_p": float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number")),
        "seed": _field(body, "seed", (int,), 0, None, "an integer"),
        "repetition_penalty": float(_field(body, "repetition_penalty", (int, float), 1.0, lambda v: v > 0,
                                           "a number")),
    }


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required", param="messages")
    if not isinstance(messages, list):
        raise APIError(400, f"'messages' must be an array, got {type(messages).__name__}", param="messages")
    if not messages:
        raise APIError(400, "'messages' must hold at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"'{where}' must be an object", param=where)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"'{where}.role' must be system, user or assistant, got {role!r}",
                           param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"'{where}.content': only text parts are supported", param=f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(400, f"'{where}.content' must be a string", param=f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


# ---------------------------------------------------------------------------------------------------- sources


def with_sources(messages: list[dict], passages: list[dict]) -> list[dict]:
    """The chat with the last user message grounded in the passages, the way `ask` builds its prompt."""
    from probllm.rag.ask import Question, build_messages

    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    grounded = build_messages(Question(messages[last]["content"], passages=passages))
    history = [m for m in messages[:last] if m["role"] != "system"]
    return [grounded[0], *history, grounded[1], *messages[last + 1:]]


def source_records(passages: list[dict], documents=None) -> list[dict]:
    from probllm.rag.retrieve import citation, location

    return [{"n": i, "id": p.get("id"), "score": p.get("score"), "text": p.get("text"), "source": p.get("source"),
             "heading": p.get("heading"), "page": p.get("page"), "location": location(p), "citation": citation(p),
             "document": documents.link(p) if documents else None} for i, p in enumerate(passages, 1)]


class ThreadRetriever:
    """A retriever living on one thread of its own: the index's SQLite connection may only be used on the thread
    that opened it, and searches of concurrent requests then run one after the other, off the event loop."""

    def __init__(self, factory):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever")
        self._retriever = self._pool.submit(factory).result()  # errors (no such index) surface here

    async def search(self, queries: list[str], k: int) -> list[list[dict]]:
        return await asyncio.wrap_future(self._pool.submit(self._retriever.search, queries, k))


# ------------------------------------------------------------------------------------------------------- app


def create_app(lm, model_name: str, *, api_key: str | None = None, retriever: ThreadRetriever | None = None,
               top_k: int = 4, static_dir: Path | None = None, documents=None):
    """The FastAPI app around an `HFLM` (loaded by the caller, or on the first request)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="probllm serve", docs_url=None, redoc_url=None, openapi_url=None)
    static_dir = Path(static_dir or STATIC)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return JSONResponse(error_body(f"no route {request.method} {request.url.path}", code="not_found"), 404)

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc):
        return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}"), 405)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug of ours: still an answer in the same shape
        return JSONResponse(error_body(f"internal error: {exc.__class__.__name__}: {exc}", "server_error"), 500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                           type="authentication_error")
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key", type="authentication_error")

    async def read_body(request: Request) -> dict:
        check_key(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is None:
            raise APIError(400, "'model' is required", param="model")
        if model != model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return body

    def fit(prompt_ids: list[int], params: dict, default_max: int) -> dict:
        limit = lm.max_length
        if len(prompt_ids) >= limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has "
                                f"{len(prompt_ids)} tokens", param="messages", code="context_length_exceeded")
        room = limit - len(prompt_ids)
        if params["max_tokens"] is None:
            params["max_tokens"] = min(default_max, room)
        elif params["max_tokens"] > room:
            raise APIError(400, f"this model's maximum context length is {limit} tokens: {len(prompt_ids)} in the "
                                f"prompt plus max_tokens {params['max_tokens']} is too many",
                           param="max_tokens", code="context_length_exceeded")
        return params

    # ------------------------------------------------------------------------------------------- routes

    if documents is not None:  # the indexed files, for the page's source links (probllm/serve/documents.py)
        app.include_router(documents.router(check_key))

    @app.get("/", include_in_schema=False)
    async def index():
        page = static_dir / "index.html"
        if page.exists():
            return FileResponse(page)
        return PlainTextResponse(f"probllm serve: {model_name}. OpenAI-compatible API under /v1.\n")

    if static_dir.is_dir():
        app.mount("/static", StaticFiles(directory=str(static_dir)), name="static")

    @app.get("/health", include_in_schema=False)
    async def health():
        return {"status": "ok", "model": model_name, "generations": lm.requests, "batches": lm.batches}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        # `max_model_len` as vLLM lists it: clients size their prompts by it.
        await lm.ensure_loaded()
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "probllm", "max_model_len": lm.max_length}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = parse_messages(body)
        params = gen_params(body)
        stream = _field(body, "stream", (bool,), False, None, "a boolean")
        options = body.get("probllm") if isinstance(body.get("probllm"), dict) else {}
        if not any(m["role"] == "user" for m in messages):
            raise APIError(400, "'messages' must hold a user message", param="messages")
        passages: list[dict] = []
        if retriever is not None and options.get("retrieve", True):
            from probllm.rag.retrieve import follow_up_query

            questions = [m["content"] for m in messages if m["role"] == "user"]
            query = follow_up_query(questions[-1], questions[-2] if len(questions) > 1 else None)
            passages = (await retriever.search([query], top_k))[0]
        await lm.ensure_loaded()
        room_for_answer = min(params["max_tokens"] or DEFAULT_MAX_TOKENS, lm.max_length // 4)
        while True:
            prompt_ids = lm.encode_prompt(lm.render(with_sources(messages, passages) if passages else messages))
            # Passages the user did not write must not make the request fail: the least relevant go first.
            if not passages or len(prompt_ids) + room_for_answer <= lm.max_length:
                break
            passages = passages[:-1]
        sources = source_records(passages, documents)
        params = fit(prompt_ids, params, DEFAULT_MAX_TOKENS)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        if not stream:
            pieces = [p async for p in lm.stream_ids(prompt_ids, params)]
            text = "".join(pieces)
            n_out = len(lm.tok.encode(text, add_special_tokens=False)) if text else 0
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "length" if n_out >= params["max_tokens"] else "stop"}],
                    "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n_out,
                              "total_tokens": len(prompt_ids) + n_out},
                    "sources": sources}

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            doc = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""}, sources=sources)
            text = ""
            try:
                async for piece in lm.stream_ids(prompt_ids, params):
                    text += piece
                    yield chunk({"content": piece})
            except Exception as e:  # the headers are sent: report in the stream, in the same error shape
                yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
                return
            n_out = len(lm.tok.encode(text, add_special_tokens=False)) if text else 0
            yield chunk({}, "length" if n_out >= params["max_tokens"] else "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        params = gen_params(body)
        if params["max_tokens"] is None:
            params["max_tokens"] = 16  # OpenAI's default for this endpoint
        echo = _field(body, "echo", (bool,), False, None, "a boolean")
        logprobs = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 20, "an integer from 0 to 20")
        if _field(body, "stream", (bool,), False, None, "a boolean"):
            raise APIError(400, "stream is not supported on /v1/completions; use /v1/chat/completions",
                           param="stream")
        await lm.ensure_loaded()
        prompts = _prompts(body.get("prompt"), lm)
        choices = []
        total_prompt = total_out = 0
        # Greedy and at most one new token (lm-eval's `local-completions` scoring asks for max_tokens 1): that
        # token is the argmax of the scoring pass itself, so no generate call is needed.
        greedy_one = params["max_tokens"] <= 1 and params["temperature"] == 0 and (echo or logprobs is not None)
        for text, ids, _ in prompts:
            fit(ids, params, 16)
        scored_all: list = [None] * len(prompts)
        if greedy_one:
            scored_all = await lm.in_model_thread(lm.prompt_logprobs, [ids for _, ids, _ in prompts],
                                                 max(1, logprobs or 1))
        for index, (text, ids, offsets) in enumerate(prompts):
            gen_ids: list[int] = []
            scored = scored_all[index]
            if greedy_one and params["max_tokens"] == 1:
                gen_ids = [scored["next_top"][0][0]]
            elif params["max_tokens"] > 0:
                gen_ids = await lm.generate_ids(ids, params)
            gen_text = lm.tok.decode(gen_ids, skip_special_tokens=True)
            lp = None
            if logprobs is not None and (echo or gen_ids):
                if scored is None:  # one pass over prompt + generated tokens: the log-prob of every token
                    [scored] = await lm.in_model_thread(lm.prompt_logprobs, [ids + gen_ids], max(1, logprobs))
                elif gen_ids:  # the greedy token, scored by the prompt's own pass
                    scored = {"token_logprobs": scored["token_logprobs"] + [scored["next_top"][0][1]],
                              "top": scored["top"] + [scored["next_top"]]}
                start = 0 if echo else len(ids)
                all_ids = ids + gen_ids
                gen_pieces = [lm.tok.decode([t]) for t in gen_ids]
                lp = {"tokens": [lm.tok.decode([t]) for t in all_ids[start:]],
                      "token_logprobs": scored["token_logprobs"][start:],
                      "top_logprobs": [None if t is None else {lm.tok.decode([i]): v for i, v in t}
                                       for t in scored["top"][start:]],
                      "text_offset": (offsets if echo else []) + _offsets_after(len(text) if echo else 0,
                                                                                gen_pieces)}
            choices.append({"index": index, "text": (text if echo else "") + gen_text, "logprobs": lp,
                            "finish_reason": "length" if params["max_tokens"] and len(gen_ids) >= params["max_tokens"]
                            else "stop"})
            total_prompt += len(ids)
            total_out += len(gen_ids)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": total_prompt, "completion_tokens": total_out,
                          "total_tokens": total_prompt + total_out}}

    return app


def _offsets_after(start: int, pieces: list[str]) -> list[int]:
    out, pos = [], start
    for p in pieces:
        out.append(pos)
        pos += len(p)
    return out


def _prompts(prompt: Any, lm) -> list[tuple[str, list[int], list[int]]]:
    """(text, token ids, start offset of every token in the text) for a string, token ids, or a list of either."""
    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, "'prompt' must be a string, an array of strings, or token ids", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise APIError(400, "'prompt' must not be empty", param="prompt")
            enc = lm.tok(p, add_special_tokens=True, return_offsets_mapping=True)
            out.append((p, list(enc["input_ids"]), [int(s) for s, _ in enc["offset_mapping"]]))
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            vocab = len(lm.tok)
            if any(t < 0 or t >= vocab for t in p):
                raise APIError(400, f"'prompt' holds token ids outside the vocabulary (0..{vocab - 1})",
                               param="prompt")
            pieces = [lm.tok.decode([t]) for t in p]
            out.append(("".join(pieces), list(p), _offsets_after(0, pieces)))
        else:
            raise APIError(400, "'prompt' must be a string, an array of strings, or token ids", param="prompt")
    return out
