"""The course assistant in front of a server that is not ours: `transformers serve` with the tiny model as the
upstream, `probllm serve --backend openai --index ...` in front. The official `openai` client and the chat page
(real chromium) get answers with their sources; the upstream goes away (a 503 in OpenAI's shape, the page's
unreachable notice) and comes back on the same port (both recover)."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest
from test_chat_page import PAGE_QUERY, browser, open_page  # noqa: F401  (browser: the module's fixture)

from servers import free_port, probllm_serve, transformers_serve

QUESTION = "What is the worst-case running time of heapsort?"


def test_assistant_over_transformers_serve_streams_sources_and_survives_the_upstream(browser, tiny_model_dir,  # noqa: F811
                                                                                     notes_index):
    from openai import OpenAI

    port = free_port()
    up = f"http://127.0.0.1:{port}/v1"
    with contextlib.ExitStack() as upstream, contextlib.ExitStack() as layer:
        # Both start at once (the layer needs no upstream to start): a model load each, in parallel.
        with ThreadPoolExecutor(2) as pool:
            started = pool.submit(upstream.enter_context, transformers_serve(tiny_model_dir, port=port))
            url, proc, lines = layer.enter_context(probllm_serve(
                "--backend", "openai", "--base-url", up, "--model", tiny_model_dir, "--served-model-name", "tiny",
                "--index", notes_index, "-k", "2"))
            assert started.result() == up
        c = OpenAI(base_url=url, api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        whole = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=6)
        sources = whole.model_extra["sources"]
        assert sources and sources[0]["n"] == 1 and "heapsort" in sources[0]["source"]
        assert isinstance(whole.choices[0].message.content, str) and whole.usage.completion_tokens <= 6
        chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=6, stream=True))
        assert chunks[0].model_extra["sources"] == sources
        assert sources[0]["citation"].startswith(sources[0]["location"]) and sources[0]["document"]
        # Token by token: one content chunk per upstream token (the tiny model's tokens are short).
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 2
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

        root = url[: -len("/v1")]
        page, errors, outside = open_page(browser, root + "/" + PAGE_QUERY)
        page.wait_for_selector('#status[data-state="online"]')
        page.fill("#question", QUESTION)
        page.keyboard.press("Enter")
        # (attached: the tiny model's answer may be only newlines, an empty block)
        page.wait_for_selector('.msg.assistant[data-turn="1"] .answer[data-state="done"]', state="attached",
                               timeout=60_000)
        assert page.locator('.msg.assistant[data-turn="1"] .source').count() >= 1

        upstream.close()  # the upstream goes away; the assistant stays
        body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}
        for stream in (False, True):
            r = httpx.post(url + "/chat/completions", json={**body, "stream": stream}, timeout=30)
            assert r.status_code in (502, 503), r.text
            assert r.json()["error"]["type"] == "server_error" and "model server" in r.json()["error"]["message"]
        page.fill("#question", "Is anyone there?")
        page.keyboard.press("Enter")
        page.wait_for_selector('#status[data-state="offline"]')
        assert "Cannot reach" in page.inner_text("#banner")
        assert page.input_value("#question") == "Is anyone there?"

        with transformers_serve(tiny_model_dir, port=port):  # back on the same port
            page.wait_for_selector('#status[data-state="online"]', timeout=30_000)
            page.click("#send")
            page.wait_for_function("[...document.querySelectorAll('.msg.assistant .answer')].pop().dataset.state "
                                   "=== 'done'", timeout=60_000)
            again = httpx.post(url + "/chat/completions", json=body, timeout=60)
            assert again.status_code == 200 and again.json()["sources"], again.text
        assert errors == [] and outside == [] and proc.poll() is None
        page.close()
    assert not any("Traceback" in line for line in lines)


def _layer(upstream_url: str, timeout: float = 2.0):
    from probllm.lm.upstream import UpstreamEngine
    from probllm.serve.app import create_app

    return create_app(UpstreamEngine("m", base_url=upstream_url, timeout=timeout), "m")


def test_an_erroring_or_hanging_upstream_is_a_502_or_503_in_bounded_time():
    import time

    from fake_server import ChatServer

    from servers import app_server

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    faults = {"boom": "500", "busy": "503", "slow": "timeout", "bad": "400"}
    with ChatServer(faults=lambda b, n: faults.get(b["messages"][-1]["content"]), hang=10) as upstream, \
            app_server(_layer(upstream.base_url, timeout=1.0)) as root:
        ok = httpx.post(root + "/v1/chat/completions", json=body)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
        for text, status in (("boom", 502), ("busy", 503), ("slow", 503), ("bad", 400)):
            t0 = time.monotonic()
            r = httpx.post(root + "/v1/chat/completions", timeout=10,
                           json={**body, "messages": [{"role": "user", "content": text}]})
            assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert time.monotonic() - t0 < 5  # --timeout 1: bounded
        assert "injected error 400" in r.json()["error"]["message"]  # the upstream's 4xx, with its message
    with app_server(_layer(upstream.base_url)) as root:  # nothing listens there any more
        r = httpx.post(root + "/v1/chat/completions", json={**body, "stream": True})
        assert r.status_code == 503 and "cannot be reached" in r.json()["error"]["message"]


def test_workers_share_the_port(fake_upstream_url):
    import json

    with probllm_serve("--backend", "openai", "--base-url", fake_upstream_url, "--model", "m", "--workers", "2") \
            as (url, proc, lines):
        assert "2 workers" in "".join(lines)
        answers = [httpx.post(url + "/chat/completions", timeout=30, json={
            "model": "m", "messages": [{"role": "user", "content": f"question {i}"}]}) for i in range(4)]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert json.loads(answers[0].text)["sources"] == []


@pytest.fixture
def fake_upstream_url():
    from fake_server import ChatServer

    with ChatServer() as upstream:
        yield upstream.base_url


class _SSEUpstream:
    """A plain-HTTP upstream streaming chunked SSE the hard way: every `data:` line split across two HTTP chunks,
    and each connection closed after its answer without saying so (as a server's keep-alive timeout does)."""

    TOKENS = ["Hel", "lo", " wor", "ld"]

    def __init__(self):
        import asyncio
        import threading

        self.requests = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def main():
            self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
            self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"
            started.set()

        threading.Thread(target=lambda: (self.loop.run_until_complete(main()), self.loop.run_forever()),
                         daemon=True).start()
        started.wait(10)

    async def handle(self, reader, writer):
        import json

        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        body = json.loads(await reader.readexactly(length))
        self.requests += 1
        if body["messages"][-1]["content"] == "boom":
            data = json.dumps({"error": {"message": "prompt too long", "type": "invalid_request_error"}}).encode()
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(data), data))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            docs = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}] + \
                [{"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]} for t in self.TOKENS] + \
                [{"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 4}}]
            for line in [f"data: {json.dumps(d)}\n\n".encode() for d in docs] + [b"data: [DONE]\n\n"]:
                for part in (line[:9], line[9:]):
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    def close(self):
        self.loop.call_soon_threadsafe(self.server.close)


def test_a_plain_http_upstreams_stream_is_read_line_by_line_cut_at_stop_and_reconnected():
    """Streams from an upstream are read line by line (aiohttp, in probllm/lm/upstream.py):
    lines split across HTTP chunks come out whole, `stop` cuts the stream, a kept-alive connection the upstream
    has closed is replaced, and the upstream's 4xx reaches the client with its message."""
    import json

    from servers import app_server

    upstream = _SSEUpstream()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}

    def stream(**more):
        r = httpx.post(root + "/v1/chat/completions", json={**body, **more}, timeout=10)
        assert r.status_code == 200, r.text
        docs = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
        assert r.text.rstrip().endswith("data: [DONE]")
        return "".join(d["choices"][0]["delta"].get("content") or "" for d in docs), docs[-1]["choices"][0]

    try:
        with app_server(_layer(upstream.url, timeout=5)) as root:
            for _ in range(3):  # each time on a connection the upstream closed after the last answer
                text, last = stream()
                assert text == "Hello world" and last["finish_reason"] == "length"
            text, last = stream(stop=[" wo"])
            assert text == "Hello" and last["finish_reason"] == "stop"
            r = httpx.post(root + "/v1/chat/completions", timeout=10,
                           json={**body, "messages": [{"role": "user", "content": "boom"}]})
            assert r.status_code == 400 and "prompt too long" in r.json()["error"]["message"]
            assert upstream.requests == 5
    finally:
        upstream.close()
