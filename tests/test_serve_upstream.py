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
