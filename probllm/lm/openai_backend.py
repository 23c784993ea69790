"""Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, TGI, Ollama, `probllm serve`...).

Chats go to `/v1/chat/completions` (whole or streamed), plain prompts to `/v1/completions`, and `loglikelihood`
to `/v1/completions` with `echo: true, logprobs: 1, max_tokens: 0`: the server returns the log-prob of every
prompt token, the protocol vLLM serves and lm-eval's `local-completions` model uses. A server that cannot
(OpenAI's own chat models, Ollama, transformers serve) gets one clear error naming what needs it and what works.

The `openai` client's own retries are switched off (`max_retries=0`): the `Retrying` wrapper retries, so that
every attempt is counted and Retry-After is honoured the same way for every backend. Errors are sorted into
transient (retried), per-request (reported with the record) and fatal (stop the run).
"""

from __future__ import annotations

import email.utils
import json
import os
import time

from probllm.io import UsageError
from probllm.lm.base import (CHAT, COMPLETIONS, LM, LOGLIKELIHOOD, NEXT_TOKEN_LOGPROBS, STREAM, FatalBackendError, RequestFailed,
                             Sources, TransientError)

# Request fields that vLLM, transformers serve and probllm serve take beyond OpenAI's own.
EXTENSIONS = ("repetition_penalty", "continue_final_message", "add_generation_prompt", "probllm")

NO_PROMPT_LOGPROBS = (
    "log-likelihood scoring (eval --method loglik, ask's letter choice by likelihood, judge --verdict-from "
    "likelihood) needs prompt log-probs from /v1/completions (echo: true, logprobs, max_tokens: 0), and {where} "
    "{why}; use a server that returns them (vLLM, probllm serve), or `eval --method letter|generate` (ask "
    "--letter generate, judge --verdict-from generation), which work with any endpoint")


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


class OpenAIBackend(LM):
    name = "openai"
    capabilities = frozenset({CHAT, STREAM, COMPLETIONS, LOGLIKELIHOOD, NEXT_TOKEN_LOGPROBS})

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, concurrency: int = 8, **_ignored):
        if not model:
            raise UsageError("--backend openai needs --model (the endpoint's model name)")
        super().__init__(model)
        self.concurrency = max(1, concurrency)
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

    @property
    def identity(self) -> str:
        from probllm.models import endpoint_identity

        return endpoint_identity(self.base_url, self.model).id

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

    @property
    def where(self) -> str:
        return self.base_url or "api.openai.com"

    def _chat_body(self, messages: list[dict], params: dict) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": params["max_tokens"],
                "temperature": params["temperature"], "top_p": params.get("top_p", 1.0)}
        if params.get("seed") is not None:
            body["seed"] = params["seed"]
        if params.get("repetition_penalty", 1.0) != 1.0 and self.base_url:
            body["repetition_penalty"] = params["repetition_penalty"]  # vLLM's and probllm serve's extension
        if isinstance(params.get("probllm"), dict) and self.base_url:
            body["probllm"] = params["probllm"]  # probllm serve's options, e.g. {"retrieve": false} (chat)
        if messages and messages[-1].get("role") == "assistant":
            # A start of the reply to continue (vLLM's and transformers' `continue_final_message`).
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    async def _post(self, path: str, body: dict, cast_to):
        import openai
        import pydantic

        client = self._get_client()
        self.requests += 1
        try:
            # client.post (the client's documented way to call an endpoint with a plain JSON body) rather than
            # chat.completions.create: the latter re-walks the parameters through the SDK's type transforms,
            # about 1-2 ms of CPU per request, which at hundreds of requests/s is what limits the client.
            return await client.post(path, body=body, cast_to=cast_to)
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
                raise FatalBackendError(f"HTTP 404 from {self.where}: no such model {self.model!r} or no "
                                        f"{path} endpoint there") from None
            raise RequestFailed(f"HTTP {status}: {_short(e.message)}") from None
        except (openai.APIResponseValidationError, json.JSONDecodeError, pydantic.ValidationError, ValueError) as e:
            raise TransientError(f"malformed response ({e.__class__.__name__})") from None

    async def chat(self, messages: list[dict], params: dict) -> str:
        from openai.types.chat import ChatCompletion

        resp = await self._post("/chat/completions", self._chat_body(messages, params), ChatCompletion)
        try:
            text = resp.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            raise TransientError("malformed response (no choices)") from None
        if not isinstance(text, str):
            raise TransientError("malformed response (no message content)")
        return text

    async def stream_chat(self, messages: list[dict], params: dict):
        import openai

        client = self._get_client()
        self.requests += 1
        try:
            body = self._chat_body(messages, params)
            extra = {k: body.pop(k) for k in EXTENSIONS if k in body}  # not in the SDK's signature
            stream = await client.chat.completions.create(stream=True, extra_body=extra or None, **body)
            async for chunk in stream:
                sources = (chunk.model_extra or {}).get("sources")
                if sources and isinstance(sources, list):  # probllm serve --index: what the answer is based on
                    yield Sources(sources)
                if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except openai.APIStatusError as e:
            if e.status_code in (401, 403, 404):
                raise FatalBackendError(f"HTTP {e.status_code} from {self.where}: {_short(e.message)}") from None
            raise RequestFailed(f"HTTP {e.status_code}: {_short(e.message)}") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise RequestFailed(f"{self.where} unreachable ({e.__class__.__name__})") from None

    async def _completions(self, body: dict) -> dict:
        resp = await self._post("/completions", {"model": self.model, **body}, cast_to=object)
        if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list):
            raise TransientError("malformed response (no choices)")
        return resp

    async def complete(self, prompt: str, params: dict) -> str:
        resp = await self._completions({"prompt": prompt, "max_tokens": params["max_tokens"],
                                        "temperature": params["temperature"], "top_p": params.get("top_p", 1.0),
                                        "seed": params.get("seed")})
        try:
            return resp["choices"][0]["text"]
        except (KeyError, IndexError, TypeError):
            raise TransientError("malformed response (no text)") from None

    async def next_token_logprobs(self, prompt: str, top: int = 20) -> dict[str, float]:
        """The `top` most likely next tokens after a prompt, with their log-probs (no echo needed)."""
        resp = await self._completions({"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": top})
        try:
            tops = resp["choices"][0]["logprobs"]["top_logprobs"][0]
        except (KeyError, IndexError, TypeError):
            raise FatalBackendError(NO_PROMPT_LOGPROBS.format(where=self.where,
                                                              why="returned no top log-probs")) from None
        return {str(k): float(v) for k, v in tops.items()}

    async def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        contexts, prompts = [], []
        for context, continuation in requests:
            # lm-eval's split: the context's trailing whitespace belongs to the continuation.
            stripped = context.rstrip()
            contexts.append(stripped)
            prompts.append(stripped + context[len(stripped):] + continuation)
        try:
            resp = await self._completions({"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1,
                                            "temperature": 0})
        except RequestFailed as e:  # typically 400/422: echo or max_tokens 0 refused
            raise FatalBackendError(NO_PROMPT_LOGPROBS.format(where=self.where, why=f"refused it ({e})")) from None
        except FatalBackendError as e:
            if "404" in str(e):
                raise FatalBackendError(NO_PROMPT_LOGPROBS.format(where=self.where,
                                                                  why="has no /v1/completions")) from None
            raise
        choices = sorted(resp["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise TransientError(f"malformed response ({len(choices)} choices for {len(prompts)} prompts)")
        out = []
        for ctx, choice in zip(contexts, choices):
            lp = choice.get("logprobs") or {}
            tokens, token_lps, offsets = lp.get("tokens"), lp.get("token_logprobs"), lp.get("text_offset")
            tops = lp.get("top_logprobs") or []
            if not tokens or not token_lps or not offsets:
                raise FatalBackendError(NO_PROMPT_LOGPROBS.format(where=self.where,
                                                                  why="returned no prompt log-probs"))
            total, greedy, n = 0.0, True, 0
            for i, (tok, tlp, off) in enumerate(zip(tokens, token_lps, offsets)):
                if off < len(ctx) or i == 0:
                    continue
                if tlp is None:
                    raise FatalBackendError(NO_PROMPT_LOGPROBS.format(where=self.where,
                                                                      why="returned no prompt log-probs"))
                total += float(tlp)
                n += 1
                top = tops[i] if i < len(tops) else None
                if top:
                    best = max(top.items(), key=lambda kv: kv[1])[0]
                    greedy = greedy and best == tok
            if n == 0:
                raise RequestFailed("the continuation has no tokens of its own in the server's tokenization")
            out.append((total, greedy))
        return out


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."
