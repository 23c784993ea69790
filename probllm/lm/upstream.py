"""An OpenAI-compatible server as a serving engine: `probllm serve --backend openai --base-url URL --model NAME`
puts the course assistant (retrieval, sources, the chat page) in front of vLLM, llama.cpp's server, Ollama,
transformers serve or another `probllm serve`.

Streams pass through token by token: each upstream chunk's text goes out as soon as it arrives. Streams are read
with aiohttp (asyncio-native; what vLLM's benchmark clients stream with): per token, httpx cost most of the
layer's CPU (each read passes anyio's cancel scope and a yield to the event loop), and at a batch's first token
those yields made every stream wait for all the others (the layer's added time to first token), while aiohttp's
buffered reader hands over a line already read without yielding. Other requests (whole answers, /v1/models,
/v1/completions) use httpx (what the `openai` client runs on) rather than the SDK: the
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

import json
import os
import time
from contextlib import asynccontextmanager

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
        self._streams = None  # aiohttp.ClientSession for streamed answers (`_stream_session`)
        self._proxy: tuple = (None, None)  # its proxy and proxy auth, from the environment
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
        if self._streams is not None:
            await self._streams.close()
            self._streams = None

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

    def _stream_session(self):
        """The aiohttp session streams are read on (made on first use, inside the server's event loop): one
        connection pool of `concurrency` kept-alive connections; the environment's proxy settings apply, read
        once here (with `trust_env`, aiohttp reads them, and parses ~/.netrc, again for every request)."""
        if self._streams is None:
            import aiohttp
            from aiohttp.helpers import get_env_proxy_for_url
            from yarl import URL

            try:
                self._proxy = get_env_proxy_for_url(URL(self.base_url))
            except LookupError:  # no proxy for this URL (none set, or no_proxy names it)
                self._proxy = (None, None)
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._streams = aiohttp.ClientSession(
                headers=headers, trust_env=False,
                # Kept warm between bursts: a burst of students must not reopen them all.
                connector=aiohttp.TCPConnector(limit=self.concurrency + 2, keepalive_timeout=300),
                # As httpx's Timeout(timeout): the wait for each read, not for the whole answer.
                timeout=aiohttp.ClientTimeout(total=None, connect=min(CONNECT_TIMEOUT, self.timeout),
                                              sock_read=self.timeout))
        return self._streams

    @asynccontextmanager
    async def _sse(self, path: str, body: dict):
        """The lines of a streamed answer, read as they come; failures as `_post` reports them (503: cannot be
        reached or no answer in time; 502: not the protocol; the upstream's 4xx passed on)."""
        import aiohttp

        try:
            session = self._stream_session()
            proxy, proxy_auth = self._proxy
            async with session.post(f"{self.base_url}/{path}", json=body, headers={"Accept": "text/event-stream"},
                                    proxy=proxy, proxy_auth=proxy_auth) as r:
                if r.status >= 400:
                    raise self._refused(r.status, (await r.read()).decode("utf-8", "replace"))
                yield _lines(r.content)
        except TimeoutError:
            self.failures += 1
            raise EngineUnavailable(f"the model server {self.base_url} did not answer in time", 503) from None
        except aiohttp.ClientConnectionError as e:  # refused, reset, closed before the end of the answer
            self.failures += 1
            raise EngineUnavailable(f"the model server {self.base_url} cannot be reached "
                                    f"({e.__class__.__name__})", 503) from None
        except (aiohttp.ClientError, ValueError) as e:  # a broken chunked body, a line past the reader's limit
            self.failures += 1
            raise EngineUnavailable(f"the model server {self.base_url} answered something that is not the "
                                    f"protocol ({e.__class__.__name__})", 502) from None

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


async def _lines(content):
    """An aiohttp body's lines as text (the buffered reader hands over a line already read without waiting)."""
    async for raw in content:
        yield raw.decode("utf-8", "replace").rstrip("\r\n")
