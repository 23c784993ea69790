"""An OpenAI-compatible server as a serving engine: `probllm serve --backend openai --base-url URL --model NAME`
puts the course assistant (retrieval, sources, the chat page) in front of vLLM, llama.cpp's server, Ollama,
transformers serve or another `probllm serve`.

Streams pass through token by token: each upstream chunk's text goes out as soon as it arrives. Streams from a
plain-HTTP upstream are read over kept-alive connections on asyncio streams (`_Connections`): per token, httpx
cost most of the layer's CPU, and at a batch's first token its yields made every stream wait for all the others
(the layer's added time to first token). Other requests (whole answers, /v1/models, /v1/completions), https
upstreams and upstreams behind a proxy use httpx (what the `openai` client runs on) rather than the SDK: the
assistant only reads the delta text, finish reason and usage of each chunk, and building the SDK's pydantic
objects per token would cost more CPU than the rest of the layer. As in the openai backend, several httpx pools
of a few connections each: httpx scans all of a pool's connections per request.

Failures are bounded and say which side failed: an upstream that cannot be reached, or does not answer within
`timeout` (connecting: 5 s at most), is a 503; one that answers with a 5xx or something that is not the protocol
is a 502; its 4xx (a bad request, a context too long) go to the client with the upstream's message. Nothing is
remembered across requests but a successful model card (a few seconds): when the upstream comes back, the next
request works.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from probllm.lm.openai_backend import _short
from probllm.lm.serving import (CHAT, COMPLETIONS, STREAM, Engine, EngineRequestError, EngineUnavailable, Finish,
                                Reply, SamplingParams, StopSequences)

CARD_TTL = 5.0          # seconds a fetched model card is reused (the chat route reads max_model_len per request)
CONNECT_TIMEOUT = 5.0


class UpstreamEngine(Engine):
    name = "openai"
    capabilities = frozenset({CHAT, STREAM, COMPLETIONS})
    SLOTS_PER_CLIENT = 16

    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 concurrency: int = 256):
        from probllm.io import UsageError

        if not model:
            raise UsageError("--backend openai needs --model (the upstream's model name)")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self._api_key = os.environ.get(api_key_env) or None   # kept on the object only; never logged
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self._clients: list | None = None
        self._next = 0
        self._card: tuple[float, dict] | None = None
        self._lines = _Connections.for_url(self.base_url, self._api_key, self.timeout, self.concurrency)
        self.requests = 0
        self.failures = 0

    def __repr__(self) -> str:  # never show the key
        return f"UpstreamEngine(model={self.model!r}, base_url={self.base_url!r})"

    def _client(self):
        if self._clients is None:
            import httpx2 as httpx

            n = -(-self.concurrency // self.SLOTS_PER_CLIENT)
            per = -(-self.concurrency // n) + 2
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._clients = [httpx.AsyncClient(base_url=self.base_url + "/", headers=headers,
                                               timeout=httpx.Timeout(self.timeout,
                                                                     connect=min(CONNECT_TIMEOUT, self.timeout)),
                                               # Kept warm between bursts (httpx closes idle ones after
                                               # 5 s): a burst of students must not reopen them all.
                                               limits=httpx.Limits(max_connections=per,
                                                                   max_keepalive_connections=per,
                                                                   keepalive_expiry=300))
                             for _ in range(n)]
        self._next = (self._next + 1) % len(self._clients)
        return self._clients[self._next]

    async def aclose(self) -> None:
        for c in self._clients or []:
            await c.aclose()
        self._clients = None
        if self._lines is not None:
            self._lines.close()

    # ---------------------------------------------------------------------------------------------- errors

    def _unreachable(self, e: Exception) -> EngineUnavailable:
        import httpx2 as httpx

        self.failures += 1
        if isinstance(e, httpx.TimeoutException):
            return EngineUnavailable(f"the model server {self.base_url} did not answer in time "
                                     f"({e.__class__.__name__})", 503)
        if isinstance(e, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return EngineUnavailable(f"the model server {self.base_url} cannot be reached "
                                     f"({e.__class__.__name__})", 503)
        return EngineUnavailable(f"the model server {self.base_url} failed ({e.__class__.__name__})", 502)

    def _refused(self, status: int, text: str) -> Exception:
        """An upstream's error answer: its 4xx are the client's (with its message), the rest a 502."""
        try:
            doc = json.loads(text)
            err = doc.get("error") or doc.get("detail")  # OpenAI's shape, or FastAPI's {"detail": ...}
            message = err.get("message") if isinstance(err, dict) else (err if isinstance(err, str) else text)
            param = err.get("param") if isinstance(err, dict) else None
        except (ValueError, AttributeError):
            message, param = text, None
        message = _short(message or f"HTTP {status}", 300)
        if status in (401, 403):
            self.failures += 1
            return EngineUnavailable(f"the model server {self.base_url} refused this server's key (HTTP {status}); "
                                     "set it with --api-key-env", 502)
        if 400 <= status < 500 and status not in (408, 429):
            return EngineRequestError(f"the model server says: {message}", param=param, status=status)
        self.failures += 1
        return EngineUnavailable(f"the model server {self.base_url} answered HTTP {status}: {message}",
                                 503 if status in (408, 429, 503) else 502)

    async def _post(self, path: str, body: dict) -> dict:
        import httpx2 as httpx

        self.requests += 1
        try:
            r = await self._client().post(path, json=body)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        if r.status_code >= 400:
            raise self._refused(r.status_code, r.text)
        try:
            doc = r.json()
        except ValueError:
            self.failures += 1
            raise EngineUnavailable(f"the model server {self.base_url} answered something that is not JSON",
                                    502) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("choices"), list):
            self.failures += 1
            raise EngineUnavailable(f"the model server {self.base_url} answered without choices", 502)
        return doc

    # ------------------------------------------------------------------------------------------ requests

    async def card(self) -> dict:
        now = time.monotonic()
        if self._card and now - self._card[0] < CARD_TTL:
            return self._card[1]
        import httpx2 as httpx

        try:
            r = await self._client().get("models")
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        if r.status_code >= 400:
            raise self._refused(r.status_code, r.text)
        try:
            listed = r.json().get("data") or []
        except (ValueError, AttributeError):
            listed = []
        mine = next((m for m in listed if isinstance(m, dict) and m.get("id") == self.model), {})
        length = mine.get("max_model_len") or mine.get("context_length")  # vLLM's name, OpenRouter's
        card = {"max_model_len": length if isinstance(length, int) and length > 0 else None}
        self._card = (now, card)
        return card

    def _body(self, params: SamplingParams, **more) -> dict:
        body = {"model": self.model, **more, "temperature": params.temperature, "top_p": params.top_p}
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty   # vLLM's (and probllm serve's) extension
        return body

    async def chat(self, messages: list[dict], params: SamplingParams) -> Reply:
        doc = await self._post("chat/completions", self._body(params, messages=messages))
        try:
            choice = doc["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            self.failures += 1
            raise EngineUnavailable(f"the model server {self.base_url} answered without a message", 502) from None
        # The upstream is asked to stop there too; cut here as well, for one that ignores `stop`.
        text, stopped = StopSequences(params.stop).cut(text)
        usage = doc.get("usage") or {}
        return Reply(text, Finish("stop" if stopped else (choice.get("finish_reason") or "stop"),
                                  usage.get("prompt_tokens"), usage.get("completion_tokens")))

    @asynccontextmanager
    async def _sse(self, path: str, body: dict):
        """The `data:` lines of a streamed answer, read as they come (raises what `_post` raises)."""
        import httpx2 as httpx

        if self._lines is not None:
            async with self._lines.post(path, json.dumps(body).encode(), self) as lines:
                yield lines
            return
        try:
            async with self._client().stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    raise self._refused(r.status_code, (await r.aread()).decode("utf-8", "replace"))
                yield r.aiter_lines()
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None

    async def stream_chat(self, messages: list[dict], params: SamplingParams):
        body = self._body(params, messages=messages, stream=True)
        stops = StopSequences(params.stop)
        finish, usage = None, {}
        self.requests += 1
        async with self._sse("chat/completions", body) as lines:
            async for line in lines:
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    doc = json.loads(data)
                except ValueError:
                    continue
                if doc.get("error"):
                    err = doc["error"]
                    raise EngineUnavailable("the model server failed: " + _short(
                        err.get("message") if isinstance(err, dict) else str(err)), 502)
                usage = doc.get("usage") or usage
                for choice in doc.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        out = stops.feed(text)
                        if out:
                            yield out
                    finish = choice.get("finish_reason") or finish
                if stops.hit:
                    break   # leaving the block closes the connection: the upstream stops generating
        tail = stops.flush()
        if tail:
            yield tail
        yield Finish("stop" if stops.hit else (finish or "stop"), usage.get("prompt_tokens"),
                     usage.get("completion_tokens"))

    async def completions(self, prompts: list, params: SamplingParams, echo: bool = False,
                          logprobs: int | None = None) -> dict:
        # One prompt as a plain string: several servers (transformers serve, llama.cpp) take no list.
        body = self._body(params, prompt=prompts[0] if len(prompts) == 1 else prompts, echo=echo)
        if logprobs is not None:
            body["logprobs"] = logprobs
        doc = await self._post("completions", body)
        return {"choices": doc["choices"], "usage": doc.get("usage") or {}}

    def stats(self) -> dict:
        return {"upstream": self.base_url, "upstream_requests": self.requests, "upstream_failures": self.failures}


class _Connections:
    """Streamed answers from a plain-HTTP upstream over kept-alive HTTP/1.1 connections on asyncio streams.

    What the profile of the layer showed under 64 streams: httpx spends most of the layer's CPU per token (each
    read of a kept-alive stream passes anyio's cancel scope and a yield to the event loop, then h11), and at
    the first token, when the whole batch's streams start together, every stream yields several times before its
    first chunk goes out, so all of them wait for all the others. Here a chunk that is already read is handled
    without yielding, and reading one costs a buffered readline. https upstreams, and upstreams reached through
    a proxy (the environment's *_proxy), stay on httpx."""

    MAX_ERROR_BODY = 1 << 20

    def __init__(self, host: str, port: int, netloc: str, prefix: str, api_key: str | None, timeout: float,
                 size: int):
        self.host, self.port, self.prefix = host, port, prefix
        self.timeout = timeout
        self.size = size
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self._head = (f"Host: {netloc}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n"
                      f"User-Agent: probllm\r\n{auth}").encode("latin-1")
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    @classmethod
    def for_url(cls, base_url: str, api_key: str | None, timeout: float, size: int) -> "_Connections | None":
        from urllib.request import getproxies, proxy_bypass

        u = urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            return None
        proxies = getproxies()
        if (proxies.get("http") or proxies.get("all")) and not proxy_bypass(u.hostname):
            return None
        return cls(u.hostname, u.port or 80, u.netloc.rsplit("@", 1)[-1], u.path.rstrip("/"), api_key, timeout,
                   size)

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    async def _open(self):
        return await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                      min(CONNECT_TIMEOUT, self.timeout))

    def _reuse(self):
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    @asynccontextmanager
    async def post(self, path: str, body: bytes, engine: "UpstreamEngine"):
        """POST `body` (JSON) to `path`; yields the answer's lines. Errors as UpstreamEngine raises them."""
        request = (f"POST {self.prefix}/{path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n".encode("latin-1")
                   + self._head + b"\r\n" + body)
        conn, head = None, None
        try:
            for fresh in (False, True):
                conn = None if fresh else self._reuse()
                reused = conn is not None
                if conn is None:
                    conn = await self._open()
                try:
                    conn[1].write(request)
                    await conn[1].drain()
                    head = await _within(self.timeout, conn[0].readuntil(b"\r\n\r\n"))
                    break
                except (ConnectionError, asyncio.IncompleteReadError):
                    conn[1].close()
                    if not reused:  # a kept-alive connection the server had closed: once more on a new one
                        raise
        except asyncio.TimeoutError:
            engine.failures += 1
            if conn is not None:
                conn[1].close()
            raise EngineUnavailable(f"the model server {engine.base_url} did not answer in time", 503) from None
        except (OSError, asyncio.IncompleteReadError) as e:
            engine.failures += 1
            raise EngineUnavailable(f"the model server {engine.base_url} cannot be reached "
                                    f"({e.__class__.__name__})", 503) from None
        except asyncio.LimitOverrunError:
            conn[1].close()
            engine.failures += 1
            raise EngineUnavailable(f"the model server {engine.base_url} answered something that is not HTTP",
                                    502) from None
        reader, writer = conn
        done = False
        try:
            status, headers, keep = _parse_head(head)
            if status is None:
                engine.failures += 1
                raise EngineUnavailable(f"the model server {engine.base_url} answered something that is not "
                                        "HTTP", 502)
            body_lines = _Body(reader, headers, self.timeout)
            if status >= 400:
                text = await body_lines.read_all(self.MAX_ERROR_BODY)
                done = body_lines.complete
                raise engine._refused(status, text.decode("utf-8", "replace"))
            yield body_lines.lines()
            done = body_lines.complete
        except asyncio.TimeoutError:
            engine.failures += 1
            raise EngineUnavailable(f"the model server {engine.base_url} did not answer in time", 503) from None
        except (OSError, asyncio.IncompleteReadError) as e:
            engine.failures += 1
            raise EngineUnavailable(f"the model server {engine.base_url} cannot be reached "
                                    f"({e.__class__.__name__})", 503) from None
        except (ValueError, asyncio.LimitOverrunError):
            engine.failures += 1
            raise EngineUnavailable(f"the model server {engine.base_url} answered something that is not the "
                                    "protocol", 502) from None
        finally:
            # Kept for the next request only when read to its end; else closed (the upstream stops generating).
            if done and keep and len(self._idle) < self.size:
                self._idle.append(conn)
            else:
                writer.close()


if hasattr(asyncio, "timeout"):  # 3.11+: a deadline on the running task, no task of its own (no yield)
    async def _within(seconds: float, awaitable):
        async with asyncio.timeout(seconds):
            return await awaitable
else:  # pragma: no cover  (3.10)
    async def _within(seconds: float, awaitable):
        return await asyncio.wait_for(awaitable, seconds)


def _parse_head(head: bytes) -> tuple[int | None, dict, bool]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        return None, {}, False
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    keep = parts[0] == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    return int(parts[1]), headers, keep


class _Body:
    """An HTTP/1.1 response body (chunked, with a length, or up to the end of the connection), as lines."""

    def __init__(self, reader: asyncio.StreamReader, headers: dict, timeout: float):
        self.reader, self.timeout = reader, timeout
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.left = int(length) if length is not None and not self.chunked else None
        self.complete = False

    async def _read(self, awaitable):
        return await _within(self.timeout, awaitable)

    async def pieces(self):
        reader = self.reader
        if self.chunked:
            while True:
                size = int((await self._read(reader.readuntil(b"\r\n"))).split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await self._read(reader.readuntil(b"\r\n"))) != b"\r\n":  # trailers
                        pass
                    self.complete = True
                    return
                data = await self._read(reader.readexactly(size + 2))
                yield data[:-2]
        elif self.left is not None:
            while self.left > 0:
                data = await self._read(reader.read(min(self.left, 65536)))
                if not data:
                    raise asyncio.IncompleteReadError(b"", self.left)
                self.left -= len(data)
                yield data
            self.complete = True
        else:
            while data := await self._read(reader.read(65536)):
                yield data
            self.complete = True

    async def lines(self):
        rest = b""
        async for data in self.pieces():
            rest += data
            if b"\n" in data:
                *whole, rest = rest.split(b"\n")
                for line in whole:
                    yield line.rstrip(b"\r").decode("utf-8", "replace")
        if rest:
            yield rest.rstrip(b"\r").decode("utf-8", "replace")

    async def read_all(self, limit: int) -> bytes:
        out = b""
        async for data in self.pieces():
            out += data
            if len(out) > limit:
                break
        return out[:limit]
