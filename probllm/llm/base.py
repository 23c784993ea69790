"""The backend interface every LLM-calling command uses, with the cache, retries and ordered concurrency.

A backend answers one chat (`await backend.chat(messages, params)` -> text). Everything around the raw call lives
here, once: the on-disk cache (a hit sends nothing), merging of identical requests in flight, the concurrency
limit, and retries with exponential backoff, jitter and `Retry-After` for transient failures. A backend only
implements `_complete` and says which of its errors are transient by raising `TransientError`.

Commands are plain generators of records; `run_ordered` drives an async per-record function over an input
iterator with a bounded window of records in flight and yields results in input order, so output order never
depends on which request came back first and memory does not grow with the input.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Iterable, Iterator

from probllm.llm.cache import ResponseCache, request_key


class TransientError(Exception):
    """A failure worth retrying (429, 5xx, timeout, malformed response); may carry the server's Retry-After."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(Exception):
    """One request failed for good (tries exhausted, or a per-request error such as HTTP 400): the record that
    needed it is reported, the run goes on."""


class FatalBackendError(Exception):
    """The backend cannot work at all (bad key, unknown model, no such endpoint): stop the run with one line."""


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


class Backend:
    """Subclasses set `name` and `model` (a stable label for the cache key) and implement `_complete`."""

    name = "backend"

    def __init__(self, model: str, cache: ResponseCache | None = None, retry: RetryPolicy | None = None,
                 concurrency: int = 8, seed: int = 0):
        self.model = model
        self.cache = cache
        self.retry = retry or RetryPolicy()
        self.concurrency = max(1, concurrency)
        self._jitter = random.Random(seed)  # jitter only changes timing, never outputs
        self._sem: asyncio.Semaphore | None = None
        self._inflight: dict[str, asyncio.Task] = {}
        self.requests = 0       # calls that reached the backend (the first try and every retry)
        self.retries = 0
        self.failures = 0       # requests given up on
        self.cache_hits = 0

    async def _complete(self, messages: list[dict], params: dict) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    async def aclose(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def counts(self) -> dict:
        return {"requests": self.requests, "cache hits": self.cache_hits, "retries": self.retries,
                "failed requests": self.failures}

    async def chat(self, messages: list[dict], params: GenParams | dict) -> str:
        params = params.as_dict() if isinstance(params, GenParams) else dict(params)
        key = request_key(self.name, self.model, messages, params)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache_hits += 1
                return hit
        task = self._inflight.get(key)
        if task is None:  # identical requests in flight share one call
            task = asyncio.ensure_future(self._fetch(key, messages, params))
            self._inflight[key] = task
            task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
        return await asyncio.shield(task)

    async def _fetch(self, key: str, messages: list[dict], params: dict) -> str:
        text = await self._with_retries(messages, params)
        if self.cache is not None:
            self.cache.put(key, text)  # committed now: a kill after this line loses nothing
        return text

    async def _with_retries(self, messages: list[dict], params: dict) -> str:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        last: TransientError | None = None
        for attempt in range(1, self.retry.tries + 1):
            try:
                async with self._sem:  # released while backing off: waiting costs no slot
                    self.requests += 1
                    return await self._complete(messages, params)
            except TransientError as e:
                last = e
                if attempt == self.retry.tries:
                    break
                self.retries += 1
                if e.retry_after is not None:
                    wait = min(self.retry.retry_after_cap, max(0.0, e.retry_after))
                    wait += self._jitter.uniform(0, 0.1 * wait + 0.01)
                else:
                    wait = self.retry.backoff(attempt, self._jitter)
                await asyncio.sleep(wait)
            except RequestFailed:
                self.failures += 1
                raise
        self.failures += 1
        raise RequestFailed(f"gave up after {self.retry.tries} tries ({last})")


def run_ordered(items: Iterable[Any], fn: Callable[[Any], Awaitable[Any]], window: int,
                backend: Backend | None = None) -> Iterator[Any]:
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
    pending: deque[asyncio.Future] = deque()
    try:
        for item in items:
            pending.append(asyncio.ensure_future(fn(item)))
            if len(pending) >= window:
                yield await pending.popleft()
        while pending:
            yield await pending.popleft()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
