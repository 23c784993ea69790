"""Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, TGI, Ollama...).

The `openai` client's own retries are switched off (`max_retries=0`): `Backend` retries itself, so that every
attempt is counted, Retry-After is honoured the same way for every backend, and tests can check it. Errors are
sorted into transient (retried), per-request (reported with the record) and fatal (stop the run).
"""

from __future__ import annotations

import email.utils
import json
import os
import time

from probllm.io import UsageError
from probllm.llm.base import Backend, FatalBackendError, RequestFailed, TransientError


def _retry_after(headers) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), or from OpenAI's retry-after-ms."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, **kw):
        if not model:
            raise UsageError("--backend openai needs --model (the endpoint's model name)")
        super().__init__(model=model, **kw)
        self.base_url = base_url
        api_key = os.environ.get(api_key_env)
        if not api_key:
            if base_url is None:
                raise UsageError(f"--backend openai: set the API key in ${api_key_env} (or name another "
                                 "variable with --api-key-env), or point --base-url at a local server")
            api_key = "none"  # local servers (vLLM, the test server) ignore the key
        self._api_key = api_key  # kept on the object only; never logged or put in records
        self.timeout = timeout
        self._clients = None
        self._next = 0

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r})"

    # Request slots per HTTP client. httpx's connection pool scans all its connections for every request, so one
    # pool of 128 connections costs more CPU per request than 8 pools of 16; requests are spread over the pools.
    SLOTS_PER_CLIENT = 16

    def _get_client(self):
        if self._clients is None:
            from openai import AsyncOpenAI, DefaultAsyncHttpxClient

            try:  # the HTTP library under openai: httpx2 in openai 3, httpx before
                from httpx2 import Limits
            except ImportError:  # pragma: no cover - older openai
                from httpx import Limits
            n = -(-self.concurrency // self.SLOTS_PER_CLIENT)
            per = -(-self.concurrency // n) + 2
            # A warm connection per request slot (the default pool keeps 100 alive: above that, connections
            # would be closed and reopened all the time).
            self._clients = [
                AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, max_retries=0, timeout=self.timeout,
                            http_client=DefaultAsyncHttpxClient(
                                limits=Limits(max_connections=per, max_keepalive_connections=per),
                                timeout=self.timeout))
                for _ in range(n)]
        self._next = (self._next + 1) % len(self._clients)
        return self._clients[self._next]

    async def aclose(self) -> None:
        for client in self._clients or []:
            await client.close()
        self._clients = None
        await super().aclose()

    async def _complete(self, messages: list[dict], params: dict) -> str:
        import openai
        import pydantic
        from openai.types.chat import ChatCompletion

        client = self._get_client()
        kwargs = {"model": self.model, "messages": messages, "max_tokens": params["max_tokens"],
                  "temperature": params["temperature"], "top_p": params["top_p"]}
        if params.get("seed") is not None:
            kwargs["seed"] = params["seed"]
        try:
            # client.post (the client's documented way to call an endpoint with a plain JSON body) rather than
            # chat.completions.create: the latter re-walks the parameters through the SDK's type transforms,
            # about 1-2 ms of CPU per request, which at hundreds of requests/s is what limits the client.
            resp = await client.post("/chat/completions", body=kwargs, cast_to=ChatCompletion)
        except openai.APITimeoutError:
            raise TransientError(f"timeout after {self.timeout:g} s") from None
        except openai.APIConnectionError as e:
            raise TransientError(f"connection error ({e.__class__.__name__})") from None
        except openai.APIStatusError as e:
            status = e.status_code
            if status == 429 or status >= 500 or status in (408, 409):
                raise TransientError(f"HTTP {status}", retry_after=_retry_after(e.response.headers)) from None
            if status in (401, 403):
                raise FatalBackendError(f"HTTP {status}: the endpoint refused the API key") from None
            if status == 404:
                raise FatalBackendError(f"HTTP 404 from {self.base_url or 'api.openai.com'}: no such model "
                                        f"{self.model!r} or no chat-completions endpoint there") from None
            raise RequestFailed(f"HTTP {status}: {_short(e.message)}") from None
        except (openai.APIResponseValidationError, json.JSONDecodeError, pydantic.ValidationError, ValueError) as e:
            raise TransientError(f"malformed response ({e.__class__.__name__})") from None
        try:
            choice = resp.choices[0]
            text = choice.message.content
        except (AttributeError, IndexError, TypeError):
            raise TransientError("malformed response (no choices)") from None
        if not isinstance(text, str):
            raise TransientError("malformed response (no message content)")
        return text


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."
