"""The openai backend against a real chat-completions server on 127.0.0.1 (fake_server), with faults."""

from __future__ import annotations

import hashlib
import json

import pytest

from probllm.lm import BackendConfig, FatalBackendError, RequestFailed, make_backend, run_ordered
from probllm.lm.base import Cached, Retrying, RetryPolicy
from probllm.lm.cache import ResponseCache, request_key
from fake_server import ChatServer, body_hash, last_user_text
from probllm.lm.openai_backend import OpenAIBackend
from probllm.models import endpoint_identity

PARAMS = {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": 0}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def backend_for(server: ChatServer, tries: int = 4, timeout: float = 10.0, concurrency: int = 8, cache=None,
                **kw):
    """The openai backend with the retry and cache wrappers, as make_backend composes them."""
    lm = Retrying(OpenAIBackend("fake-model", base_url=server.base_url, timeout=timeout, concurrency=concurrency,
                                **kw), RetryPolicy(tries=tries, base=0.01, cap=0.05), concurrency=concurrency)
    return Cached(lm, cache) if cache is not None else lm


def run_all(backend, prompts: list[str]) -> list:
    async def one(p):
        try:
            return await backend.chat(user(p), PARAMS)
        except (RequestFailed, FatalBackendError) as e:
            return e

    return list(run_ordered(prompts, one, window=16, backend=backend))


def fault_on_first(kind: str):
    return lambda body, n: kind if n == 1 else None


@pytest.mark.parametrize("kind", ["500", "503", "malformed", "nochoices", "drop", "timeout"])
def test_transient_fault_is_retried_then_answered(kind):
    with ChatServer(faults=fault_on_first(kind), hang=5) as server:
        # A short timeout only where the fault is a hang: on a loaded machine a normal answer may take a while.
        backend = backend_for(server, timeout=1.5 if kind == "timeout" else 10)
        [answer] = run_all(backend, ["What is 2 + 2?"])
        assert isinstance(answer, str) and answer
        assert sum(server.seen.values()) == 2 and sum(server.succeeded.values()) == 1
        assert backend.retries == 1 and backend.requests == 2 and backend.failures == 0


def test_retry_after_is_honoured():
    with ChatServer(faults=fault_on_first("429:0.4")) as server:
        backend = backend_for(server)
        [answer] = run_all(backend, ["rate limited question"])
        assert isinstance(answer, str)
        [times] = server.times.values()
        # The backoff alone would wait at most 0.05 s: a gap of 0.4 s can only come from Retry-After.
        assert len(times) == 2 and times[1] - times[0] >= 0.4


def test_gives_up_after_n_tries_and_reports():
    with ChatServer(faults=lambda body, n: "500") as server:
        backend = backend_for(server, tries=3)
        [answer] = run_all(backend, ["always failing"])
        assert isinstance(answer, RequestFailed) and "3 tries" in str(answer) and "HTTP 500" in str(answer)
        assert sum(server.seen.values()) == 3 and backend.failures == 1


def test_client_errors_are_not_retried():
    with ChatServer(faults=lambda body, n: "400") as server:
        [answer] = run_all(backend_for(server), ["bad request"])
        assert isinstance(answer, RequestFailed) and "HTTP 400" in str(answer)
        assert sum(server.seen.values()) == 1
    with ChatServer(faults=lambda body, n: "401") as server:
        [answer] = run_all(backend_for(server), ["bad key"])
        assert isinstance(answer, FatalBackendError)


def test_output_keeps_input_order_under_concurrency():
    # Later prompts answer faster, so completions arrive out of order.
    prompts = [f"question {i}" for i in range(40)]

    def later_is_faster(body):
        return 0.002 * (40 - int(last_user_text(body).split()[-1]))

    with ChatServer(responder=lambda body: "answer to " + last_user_text(body), delay=later_is_faster) as server:
        backend = backend_for(server, concurrency=8)
        answers = run_all(backend, prompts)
        assert answers == [f"answer to {p}" for p in prompts]
        assert 1 < server.max_in_flight <= 8


def test_cache_hit_sends_nothing_and_identical_requests_share_one_call(tmp_path):
    path = tmp_path / "cache.sqlite"
    with ChatServer() as server:
        first = run_all(backend_for(server, cache=ResponseCache(path)), ["a", "b", "a", "a"])
        assert first[0] == first[2] == first[3]
        assert sum(server.seen.values()) == 2  # the three "a" in flight together were one request
        server.reset_counts()
        again = run_all(backend_for(server, cache=ResponseCache(path)), ["a", "b", "a", "a"])
        assert again == first and sum(server.seen.values()) == 0
        # A change in a generation parameter is a different request.
        served = endpoint_identity(server.base_url, "fake-model").id  # the key names the endpoint too
        key_a = request_key("openai", served, user("a"), PARAMS)
        assert key_a in ResponseCache(path).keys()
        assert request_key("openai", served, user("a"), {**PARAMS, "seed": 1}) != key_a


def test_failures_are_not_cached(tmp_path):
    path = tmp_path / "cache.sqlite"
    with ChatServer(faults=lambda body, n: "500" if n <= 2 else None) as server:
        [failed] = run_all(backend_for(server, tries=2, cache=ResponseCache(path)), ["flaky"])
        assert isinstance(failed, RequestFailed)
        [ok] = run_all(backend_for(server, tries=2, cache=ResponseCache(path)), ["flaky"])
        assert isinstance(ok, str) and sum(server.succeeded.values()) == 1


def test_api_key_from_named_env_is_sent_and_never_printed(cli, tmp_path):
    secret = "sk-test-" + hashlib.sha256(b"x").hexdigest()[:20]
    rec = {"id": 1, "question": "What is 1 + 1?", "answer": "It is 2, since one plus one makes two."}
    with ChatServer(faults=lambda body, n: "401") as server:
        r = cli("corrupt", "--backend", "openai", "--model", "m", "--base-url", server.base_url, "--api-key-env",
                "MY_KEY", "--no-cache", input=json.dumps(rec) + "\n", env={"MY_KEY": secret})
        assert r.code == 1 and "refused the API key" in r.stderr
        assert secret not in r.stderr and secret not in r.stdout
        assert server.authorizations == {f"Bearer {secret}"}


def test_make_backend_rejects_bad_options(monkeypatch):
    from probllm.io import UsageError

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UsageError, match="OPENAI_API_KEY"):
        make_backend(BackendConfig(backend="openai", model="gpt-x", no_cache=True))
    with pytest.raises(UsageError, match="--model"):
        make_backend(BackendConfig(backend="openai", base_url="http://127.0.0.1:1/v1", no_cache=True))
    with pytest.raises(UsageError, match="corrupt"):
        make_backend(BackendConfig(backend="rules"))
    with pytest.raises(UsageError, match="choose one"):
        make_backend(BackendConfig(backend="nope"))


def test_backend_choices_come_from_the_registry(cli):
    """One definition: `--backend` choices, their help and the serving engines are the registry's keys, and a word
    the registry lacks is refused before anything starts."""
    from probllm.cli.choices import Backend, ModelBackend
    from probllm.lm import BACKENDS, MODEL_BACKENDS, SERVING_ENGINES

    assert [b.value for b in Backend] == list(BACKENDS)
    assert [b.value for b in ModelBackend] == list(MODEL_BACKENDS) and "rules" not in MODEL_BACKENDS
    assert set(SERVING_ENGINES) <= set(MODEL_BACKENDS)
    assert BackendConfig(backend="hf").window == 4 * 8 and BackendConfig(backend="openai").window == 4 * 16
    r = cli("judge", "--backend", "rules", input="")
    assert r.code == 2 and "rules" in r.stderr and "openai" in r.stderr


def test_body_hash_is_order_independent():
    assert body_hash({"a": 1, "b": [1, 2]}) == body_hash({"b": [1, 2], "a": 1})


class _FlakyStream:
    """An inner LM whose stream fails `fail_before` times before its first piece, then once after `fail_after`
    pieces: what a proxy or an overloaded server does to a stream."""

    name, model, capabilities = "flaky", "flaky-model", frozenset({"chat", "stream"})

    def __init__(self, fail_before: int = 0, fail_after: int | None = None):
        from probllm.lm.base import TransientError

        self.error, self.fail_before, self.fail_after, self.calls = TransientError, fail_before, fail_after, 0

    async def stream_chat(self, messages, params):
        self.calls += 1
        if self.calls <= self.fail_before:
            raise self.error("HTTP 503 before the first piece")
        for i, piece in enumerate(["The ", "answer ", "is 4."]):
            if self.fail_after is not None and i == self.fail_after:
                raise self.error("connection dropped mid-stream")
            yield piece


def _collect(backend) -> list:
    import asyncio

    async def go():
        return [p async for p in backend.stream_chat(user("2 + 2?"), PARAMS)]

    return asyncio.run(go())


def test_stream_is_retried_until_its_first_piece_and_never_after():
    inner = _FlakyStream(fail_before=2)
    backend = Retrying(inner, RetryPolicy(tries=4, base=0.01, cap=0.02))
    assert "".join(_collect(backend)) == "The answer is 4." and inner.calls == 3 and backend.retries == 2
    # Once text has been shown, a retry would repeat it: the failure goes to the caller, after one attempt.
    inner = _FlakyStream(fail_after=1)
    backend = Retrying(inner, RetryPolicy(tries=4, base=0.01, cap=0.02))
    with pytest.raises(Exception, match="mid-stream"):
        _collect(backend)
    assert inner.calls == 1 and backend.retries == 0
    gave_up = Retrying(_FlakyStream(fail_before=9), RetryPolicy(tries=3, base=0.01, cap=0.02))
    with pytest.raises(RequestFailed, match="3 tries"):
        _collect(gave_up)
