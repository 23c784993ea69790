"""The one model interface every command uses, and the wrappers that work around any backend.

An `LM` is shaped like lm-evaluation-harness's: it answers chats (whole, or streamed piece by piece), scores
`loglikelihood([(context, continuation), ...])` with lm-eval's semantics (the summed log-probability of the
continuation and whether every continuation token is the greedy one), completes plain text prompts, and declares
which of these it can do in `capabilities`. A backend (hf, openai) implements the raw calls and says which of its
errors are transient by raising `TransientError`.

Everything around the raw call is a wrapper, written once:
- `Retrying`: the concurrency limit and retries with exponential backoff, jitter and `Retry-After`. The slot is
  held only while a request is on the wire: a request backing off after a 5xx waits outside it, so the other
  records keep the endpoint busy.
- `Cached`: the on-disk response cache (a hit sends nothing) and merging of identical requests in flight.

Commands are plain generators of records; `run_ordered` drives an async per-record function over an input
iterator with a bounded window of records in flight and yields results in input order, so output order never
depends on which request came back first and memory does not grow with the input.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator

CHAT = "chat"
STREAM = "stream"
COMPLETIONS = "completions"
LOGLIKELIHOOD = "loglikelihood"
CHAT_LOGLIKELIHOOD = "chat_loglikelihood"   # score options as the start of a chat reply (needs the template)
NEXT_TOKEN_LOGPROBS = "next_token_logprobs"  # the top log-probs of the next token (an endpoint without echo)
RENDER_CHAT = "render_chat"   # a chat rendered to prompt text here, by the model's own template (a local model)


class Sources(list):
    """Passages a server retrieved for a chat (`probllm serve --index`): `stream_chat` yields them before the
    text when the server sent any. Consumers that only want text skip them (`isinstance(piece, str)`)."""


class TransientError(Exception):
    """A failure worth retrying (429, 5xx, timeout, malformed response); may carry the server's Retry-After."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(Exception):
    """One request failed for good (tries exhausted, or a per-request error such as HTTP 400): the record that
    needed it is reported, the run goes on."""


class FatalBackendError(Exception):
    """The backend cannot work at all (bad key, unknown model, no such endpoint, no prompt log-probs): stop the
    run with one line."""


@dataclass(frozen=True)
class GenParams:
    """Generation parameters; part of the cache key, so changing any of them means new requests."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RetryPolicy:
    tries: int = 5            # attempts in all, the first included
    base: float = 1.0         # first backoff in seconds; doubles each retry
    cap: float = 60.0         # longest backoff
    retry_after_cap: float = 300.0  # never sleep longer than this on a server's Retry-After

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with 'equal jitter': half fixed, half random, so clients that failed together do
        not come back together."""
        d = min(self.cap, self.base * (2 ** (attempt - 1)))
        return d / 2 + rng.uniform(0, d / 2)


class LM:
    """The interface. Backends set `name`, `model` (a stable label, part of cache keys) and `capabilities`."""

    name = "lm"
    capabilities: frozenset = frozenset()

    def __init__(self, model: str = ""):
        self.model = model
        self.requests = 0       # calls that reached the model or the endpoint (retries included)
        # Counts a local scorer keeps of its work (forward passes, tokens fed, prompt tokens shared or cached);
        # eval and the benches print them. An instance attribute, so wrappers reach the inner model's.
        self.scoring_stats: dict = {}

    async def chat(self, messages: list[dict], params: dict) -> str:
        """The assistant's reply. A last message with role `assistant` is a start of the reply to continue."""
        raise NotImplementedError

    async def stream_chat(self, messages: list[dict], params: dict) -> AsyncIterator[str]:
        """The reply in pieces as they are generated (default: one piece)."""
        yield await self.chat(messages, params)

    async def complete(self, prompt: str, params: dict) -> str:
        raise FatalBackendError(f"the {self.name} backend cannot complete plain prompts")

    async def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """lm-eval's `loglikelihood`: for each (context, continuation), (sum of log-probs, is_greedy)."""
        raise FatalBackendError(f"the {self.name} backend cannot score log-likelihoods")

    def request_length(self, context: str, continuations: list[str]) -> int:
        """How long a group of loglikelihood requests (one context, its continuations) is for this model: what a
        caller sorts batches by, so similar lengths share a pass. Characters here; a local model counts the tokens
        it will feed."""
        return len(context) + sum(len(c) for c in continuations)

    async def choose(self, messages: list[dict], options: list[str], prefix: str = "") -> list[float]:
        """Log-likelihood of each option as the start of the assistant's reply to `messages` (after `prefix`)."""
        raise FatalBackendError(f"the {self.name} backend cannot score a chat reply's options")

    async def next_token_logprobs(self, prompt: str, top: int = 20) -> dict[str, float]:
        """The `top` most likely next tokens after `prompt` (text) and their log-probs (NEXT_TOKEN_LOGPROBS)."""
        raise FatalBackendError(f"the {self.name} backend cannot give next-token log-probs")

    def render(self, messages: list[dict]) -> str:
        """The prompt text the model's own chat template makes of `messages` (RENDER_CHAT)."""
        raise FatalBackendError(f"the {self.name} backend renders no chat template here")

    @property
    def identity(self) -> str:
        """What produced an answer, as the response cache keys it: the model's content identity or the endpoint
        and served name (`probllm.models.ModelIdentity.id`), plus backend settings that change the numbers."""
        return self.model

    def counts(self) -> dict:
        return {"requests": self.requests}

    async def aclose(self) -> None:
        pass


class Wrapper(LM):
    """Forwards everything to `inner`; subclasses override the calls they wrap."""

    def __init__(self, inner: LM):
        self.inner = inner

    name = property(lambda self: self.inner.name)
    model = property(lambda self: self.inner.model)
    identity = property(lambda self: self.inner.identity)
    capabilities = property(lambda self: self.inner.capabilities)

    def __getattr__(self, attr):  # backend-specific attributes (batches, tokenizer...) stay reachable
        return getattr(self.inner, attr)

    async def chat(self, messages, params):
        return await self.inner.chat(messages, params)

    async def stream_chat(self, messages, params):
        async for piece in self.inner.stream_chat(messages, params):
            yield piece

    async def complete(self, prompt, params):
        return await self.inner.complete(prompt, params)

    async def loglikelihood(self, requests):
        return await self.inner.loglikelihood(requests)

    async def choose(self, messages, options, prefix=""):
        return await self.inner.choose(messages, options, prefix)

    async def next_token_logprobs(self, prompt, top=20):
        return await self.inner.next_token_logprobs(prompt, top)

    def render(self, messages):
        return self.inner.render(messages)

    def request_length(self, context, continuations):
        return self.inner.request_length(context, continuations)

    def counts(self) -> dict:
        return self.inner.counts()

    async def aclose(self) -> None:
        await self.inner.aclose()


class Retrying(Wrapper):
    """At most `concurrency` requests on the wire; transient failures retried with backoff outside the slot."""

    def __init__(self, inner: LM, retry: RetryPolicy | None = None, concurrency: int = 8, seed: int = 0):
        super().__init__(inner)
        self.retry = retry or RetryPolicy()
        self.concurrency = max(1, concurrency)
        self._jitter = random.Random(seed)  # jitter only changes timing, never outputs
        self._sem: asyncio.Semaphore | None = None
        self.retries = 0
        self.failures = 0       # requests given up on

    def counts(self) -> dict:
        return {**self.inner.counts(), "retries": self.retries, "failed requests": self.failures}

    async def _call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        for attempt in range(1, self.retry.tries + 1):
            try:
                async with self._sem:  # released before the backoff below: waiting costs no slot
                    return await fn()
            except TransientError as e:
                await self._retry_or_give_up(attempt, e)
            except RequestFailed:
                self.failures += 1
                raise

    async def _retry_or_give_up(self, attempt: int, error: TransientError) -> None:
        """After a transient failure (outside the request slot): give up after the last try, else back off."""
        if attempt >= self.retry.tries:
            self.failures += 1
            raise RequestFailed(f"gave up after {self.retry.tries} tries ({error})") from None
        self.retries += 1
        if error.retry_after is not None:
            wait = min(self.retry.retry_after_cap, max(0.0, error.retry_after))
            wait += self._jitter.uniform(0, 0.1 * wait + 0.01)
        else:
            wait = self.retry.backoff(attempt, self._jitter)
        await asyncio.sleep(wait)

    async def chat(self, messages, params):
        return await self._call(lambda: self.inner.chat(messages, params))

    async def complete(self, prompt, params):
        return await self._call(lambda: self.inner.complete(prompt, params))

    async def loglikelihood(self, requests):
        return await self._call(lambda: self.inner.loglikelihood(requests))

    async def choose(self, messages, options, prefix=""):
        return await self._call(lambda: self.inner.choose(messages, options, prefix))

    async def stream_chat(self, messages, params):
        # Retried only until the first piece arrives: after that the caller has shown text already, and a second
        # attempt would repeat it, so a failure mid-stream is the caller's to see.
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        for attempt in range(1, self.retry.tries + 1):
            started = False
            try:
                async with self._sem:
                    async for piece in self.inner.stream_chat(messages, params):
                        started = True
                        yield piece
                return
            except TransientError as e:
                if started:
                    raise
                await self._retry_or_give_up(attempt, e)
            except RequestFailed:
                self.failures += 1
                raise


class Cached(Wrapper):
    """Answers from the on-disk cache when it has them; identical requests in flight share one call."""

    def __init__(self, inner: LM, cache):
        super().__init__(inner)
        self.cache = cache
        self.cache_hits = 0
        self._inflight: dict[str, asyncio.Future] = {}

    def counts(self) -> dict:
        return {**self.inner.counts(), "cache hits": self.cache_hits}

    async def _cached(self, kind: str, payload: Any, params: dict, fn: Callable[[], Awaitable[Any]]) -> Any:
        from probllm.lm.cache import request_key

        # Keyed by the model's identity, not its name: a folder retrained in place, another adapter or another
        # --base-url serving the same model name are other models, whose answers must not be read back.
        key = request_key(self.inner.name, self.inner.identity, payload,
                          params if kind == "chat" else {**params, "kind": kind})
        hit = self.cache.get(key)
        if hit is not None:
            self.cache_hits += 1
            return json.loads(hit) if kind != "chat" else hit
        task = self._inflight.get(key)
        if task is None:
            async def fetch():
                value = await fn()
                # committed now: a kill after this line loses nothing
                self.cache.put(key, value if kind == "chat" else json.dumps(value))
                return value

            task = asyncio.ensure_future(fetch())
            self._inflight[key] = task
            task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
        return await asyncio.shield(task)

    async def chat(self, messages, params):
        return await self._cached("chat", messages, dict(params), lambda: self.inner.chat(messages, params))

    async def complete(self, prompt, params):
        return await self._cached("complete", prompt, dict(params), lambda: self.inner.complete(prompt, params))

    async def loglikelihood(self, requests):
        out = await self._cached("loglikelihood", [list(r) for r in requests], {},
                                 lambda: self.inner.loglikelihood(requests))
        return [tuple(x) for x in out]

    async def choose(self, messages, options, prefix=""):
        from probllm.lm.cache import request_key

        key = request_key(self.inner.name, self.inner.identity, messages, {"choose": options, "prefix": prefix})
        hit = self.cache.get(key)
        if hit is not None:
            self.cache_hits += 1
            return json.loads(hit)
        scores = await self.inner.choose(messages, options, prefix)
        self.cache.put(key, json.dumps(scores))
        return scores

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            self.cache.close()


def run_ordered(items: Iterable[Any], fn: Callable[[Any], Awaitable[Any]], window: int,
                backend: LM | None = None) -> Iterator[Any]:
    """Run `fn` over `items` with at most `window` items in flight; yield the results in input order.

    A plain generator, so commands stay generators of records. The event loop runs while this waits for the next
    result; `fn` should catch per-item failures and return them, since an exception ends the run (the pending
    items are cancelled, their finished requests are already in the cache)."""
    runner = asyncio.Runner()
    agen = _amap(iter(items), fn, max(1, window))
    try:
        while True:
            try:
                yield runner.run(agen.__anext__())
            except StopAsyncIteration:
                break
    finally:
        try:
            runner.run(agen.aclose())
            if backend is not None:
                runner.run(backend.aclose())
        finally:
            runner.close()


async def _amap(items: Iterator[Any], fn: Callable[[Any], Awaitable[Any]], window: int):
    """At most `window` items unfinished at once, results in input order.

    A finished item does not hold a place in the window while it waits for an older one to be written: a record
    backing off after a 429/5xx would otherwise stop new records from starting, and leave request slots idle
    (head-of-line blocking). Finished results waiting for their turn are bounded too (8 windows), so memory
    stays bounded whatever the stall."""
    pending: deque[asyncio.Future] = deque()
    unfinished = 0
    progress = asyncio.Event()
    exhausted = False
    buffer = 8 * window

    def finished(_task) -> None:
        nonlocal unfinished
        unfinished -= 1
        progress.set()

    try:
        while True:
            while not exhausted and unfinished < window and len(pending) < buffer:
                try:
                    item = next(items)
                except StopIteration:
                    exhausted = True
                    break
                task = asyncio.ensure_future(fn(item))
                unfinished += 1
                task.add_done_callback(finished)
                pending.append(task)
            if not pending:
                return
            if pending[0].done():
                yield pending.popleft().result()
                continue
            progress.clear()
            await progress.wait()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
