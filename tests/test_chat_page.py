"""The chat page in a real headless browser: Debian's chromium (installed by `make browser`, which `make test`
runs first) driven by Playwright, against `probllm serve` with the tiny model and an index of the example notes.

The page is used as a student would: the API key asked once, a question typed, the answer streaming in with its
numbered sources, a source opened (its math rendered by the KaTeX the package serves), a follow-up sent with the
history, a new conversation; then the server goes away and comes back, and the page says so and recovers."""

from __future__ import annotations

import json
import os
import socket

import pytest

from servers import probllm_serve

CHROMIUM = "/usr/bin/chromium"
# No GPU, no sandbox (containers and CI run as root), and nothing that phones home: the page must work offline.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "s3cret-test-key"
# The untrained tiny model only writes newlines when greedy: sample (the page passes these on from its address).
PAGE_QUERY = "?temperature=1&max_tokens=24&seed=1"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium (make test runs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:"))
            else None)
    page.goto(url)
    return page, errors, outside


def test_ask_stream_sources_follow_up_and_key(browser, tiny_model_dir, notes_index, tmp_path):
    with probllm_serve("--model", tiny_model_dir, "--served-model-name", "tiny", "--index", notes_index,
                       env={"PROBLLM_API_KEY": KEY}) as (url, _, _):
        root = url[: -len("/v1")]
        page, errors, outside = open_page(browser, root + "/" + PAGE_QUERY)
        chats: list[dict] = []
        page.on("request", lambda r: chats.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions")
                else None)

        # The key is asked once: a wrong one is refused and asked again, the right one is kept for the tab.
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "wrong")
        page.click("#key-form button[type=submit]")
        page.wait_for_function("document.querySelector('#key-message').textContent.includes('refused')")
        page.fill("#key-input", KEY)
        page.click("#key-form button[type=submit]")
        page.wait_for_selector('#status[data-state="online"]')
        assert page.inner_text("#status-text") == "tiny"

        page.fill("#question", "What is the worst-case running time of heapsort?")
        page.keyboard.press("Enter")
        answer = page.locator('.msg.assistant[data-turn="1"] .answer')
        page.wait_for_selector('.msg.assistant[data-turn="1"] .answer[data-state="done"]', timeout=60_000)
        # It streamed: the text arrived in several chunks, and it is there.
        assert int(answer.get_attribute("data-chunks")) >= 2
        first_answer = answer.inner_text().strip()
        assert first_answer
        # The numbered sources with their headings, from the notes; opening one shows the passage, math rendered.
        sources = page.locator('.msg.assistant[data-turn="1"] .source')
        assert sources.count() >= 1
        assert sources.first.locator(".num").inner_text() == "1"
        headings = [sources.nth(i).locator(".heading").inner_text() for i in range(sources.count())]
        assert all(h.startswith(("Heapsort", "Newtonian", "Machine")) for h in headings)
        assert "heapsort.md" in sources.first.locator(".where").inner_text()
        sources.first.locator("summary").click()
        passage = sources.first.locator(".passage")
        passage.wait_for(state="visible")
        assert "heap" in passage.inner_text().lower()
        with_math = [i for i, h in enumerate(headings) if "Complexity" in h]  # its passage has $O(n \log n)$
        if with_math:
            if with_math[0] != 0:
                sources.nth(with_math[0]).locator("summary").click()
            assert sources.nth(with_math[0]).locator(".passage .katex").count() > 0

        # The notes' own files are served with the same key as the API: the page fetches one with it and opens it
        # from memory (a plain link could not send the key).
        import httpx2 as httpx

        link = sources.first.locator("a.open-document")
        href = link.get_attribute("href")
        assert httpx.get(root + "/" + href).status_code == 401
        with page.expect_popup() as popup:
            link.click()
        opened = popup.value
        opened.wait_for_url(lambda u: u.startswith("blob:"))  # a blank tab first, the file once it is fetched
        opened.wait_for_load_state()
        assert "heap" in opened.content().lower()
        opened.close()

        # A follow-up goes with the conversation so far.
        page.fill("#question", "And what about its best case?")
        page.click("#send")
        page.wait_for_selector('.msg.assistant[data-turn="2"] .answer[data-state="done"]', timeout=60_000)
        assert [m["role"] for m in chats[-1]["messages"]] == ["user", "assistant", "user"]
        assert chats[-1]["messages"][0]["content"] == "What is the worst-case running time of heapsort?"
        assert chats[-1]["messages"][1]["content"].strip() == first_answer.strip() or \
            chats[-1]["messages"][1]["content"].split() == first_answer.split()
        assert chats[-1]["stream"] is True and chats[-1]["model"] == "tiny" and chats[-1]["temperature"] == 1

        page.screenshot(path=str(tmp_path / "chat-page.png"), full_page=True)  # to look at when it fails

        # Starting over forgets the history.
        page.click("#new-chat")
        assert page.locator(".msg").count() == 0 and page.locator("#welcome").is_visible()
        page.fill("#question", "What is overfitting?")
        page.keyboard.press("Enter")
        page.wait_for_selector('.msg.assistant[data-turn="1"] .answer[data-state="done"]', timeout=60_000)
        assert [m["role"] for m in chats[-1]["messages"]] == ["user"]

        # The markdown renderer: HTML in an answer or a note is shown as text, never run; code keeps its layout;
        # math is left for KaTeX (with its underscores untouched by emphasis).
        html = page.evaluate("(t) => ProbMarkdown.render(t)",
                             "Heap **property** $a_i \\ge a_{2i+1}$ <img src=x onerror=alert(1)> [2]\n\n"
                             "```python\ndef f(a_b):\n    return a_b  # <b>\n```")
        assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
        assert "<strong>property</strong>" in html and "$a_i \\ge a_{2i+1}$" in html
        assert '<button type="button" class="cite" data-n="2"' in html
        assert '<pre><code class="language-python">def f(a_b):\n    return a_b  # &lt;b&gt;</code></pre>' in html

        # A reload in the same tab does not ask for the key again.
        page.reload()
        page.wait_for_selector('#status[data-state="online"]')
        assert not page.locator("#key-dialog[open]").count()
        assert errors == [] and outside == []
        page.close()


def test_unreachable_server_is_said_and_the_page_recovers(browser, tiny_model_dir):
    port = free_port()
    args = ("--model", tiny_model_dir, "--served-model-name", "tiny", "--port", str(port))
    with probllm_serve(*args) as (url, _, _):
        root = url[: -len("/v1")]
        page, errors, _ = open_page(browser, root + "/" + PAGE_QUERY)
        page.wait_for_selector('#status[data-state="online"]')
    # The server is gone: the question is not lost, the page says what happened.
    page.fill("#question", "Is anyone there?")
    page.keyboard.press("Enter")
    page.wait_for_selector('#status[data-state="offline"]')
    assert "Cannot reach" in page.inner_text("#banner")
    assert page.input_value("#question") == "Is anyone there?"
    assert page.locator("#send").is_disabled()
    # It comes back on the same port: the page notices by itself and the question goes through.
    with probllm_serve(*args):
        page.wait_for_selector('#status[data-state="online"]', timeout=30_000)
        assert "back" in page.inner_text("#banner")
        page.click("#send")
        page.wait_for_selector('.msg.assistant .answer[data-state="done"]', timeout=60_000)
        assert page.locator(".msg.assistant .answer").last.inner_text().strip()
    assert errors == []
    page.close()


def test_sources_cite_file_and_page_and_open_the_served_pdf(browser, tiny_model_dir, tmp_path):
    """A source reads `file, p. N > heading` and links to the indexed PDF at that page, which the server sends
    from the index's own list of documents; nothing else can be fetched."""
    import httpx2 as httpx

    from probllm.rag.index import build_index
    from test_rag_formats import write_lecture_pdf  # the 4-page lecture the format tests index

    notes = tmp_path / "notes"
    notes.mkdir()
    pdf = write_lecture_pdf(notes / "lecture3.pdf")
    (tmp_path / "secret.txt").write_text("not indexed")
    index = tmp_path / "lecture.idx"
    build_index([str(notes)], str(index))
    # Keyword search: the server needs no embedder (a faster start), and --search reaches the server.
    with probllm_serve("--model", tiny_model_dir, "--served-model-name", "tiny", "--index", str(index),
                       "--search", "keyword") as (url, _, _):
        root = url[: -len("/v1")]
        page, errors, outside = open_page(browser, root + "/" + PAGE_QUERY)
        page.wait_for_selector('#status[data-state="online"]')
        page.fill("#question", "What does the efficiency of a Carnot engine depend on?")
        page.keyboard.press("Enter")
        page.wait_for_selector('.msg.assistant[data-turn="1"] .answer[data-state="done"]', timeout=60_000)
        sources = page.locator('.msg.assistant[data-turn="1"] .source')
        wheres = [sources.nth(i).locator(".where").inner_text() for i in range(sources.count())]
        carnot = [i for i, w in enumerate(wheres) if w.endswith("lecture3.pdf, p. 2")]
        assert carnot, wheres
        summary = sources.nth(carnot[0]).locator("summary")
        assert summary.locator(".heading").inner_text() == "Carnot cycle"
        assert summary.get_attribute("title").endswith("lecture3.pdf, p. 2 > Carnot cycle")
        link = sources.nth(carnot[0]).locator("a.open-document")
        href = link.get_attribute("href")
        assert href.startswith("documents/") and href.endswith("#page=2")
        # Opening the link fetches the PDF itself (headless chromium may show or download it: either way the
        # response is the indexed file).
        with page.context.expect_event("response", lambda r: "/documents/" in r.url, timeout=30_000) as got:
            link.click()
        response = got.value
        assert response.status == 200 and response.headers["content-type"] == "application/pdf"
        served = httpx.get(root + "/" + href.split("#")[0])
        assert served.status_code == 200 and served.content == pdf.read_bytes()
        # Only indexed documents, by id: an unknown id, a path, a traversal are 404 in the API's error shape.
        for path in ("/documents/0123456789abcdef", "/documents/secret.txt", "/documents/..%2Fsecret.txt",
                     "/documents/../secret.txt", "/documents/%2e%2e/%2e%2e/etc/passwd", "/documents/"):
            bad = httpx.get(root + path)
            assert bad.status_code == 404, path
            assert bad.json()["error"]["code"] == "not_found" and "not indexed" not in bad.text
        assert errors == [] and outside == []
        page.close()
