"""Issue 23 items 1-2: students rate answers and compare two answers in the chat page (a real headless chromium
against `probllm serve --feedback` with the tiny model); the votes survive a SIGKILL of the server; two browsers
voting at once both land; `feedback export` -> `pair-annotated` -> `dpo` trains on what they collected."""

from __future__ import annotations

import json
import signal
import sqlite3

import httpx2 as httpx
import pytest
from typer.testing import CliRunner

from servers import free_port, probllm_serve
from test_chat_page import KEY, PAGE_QUERY, browser, open_page  # noqa: F401  (browser: the module's fixture)

from probllm.cli import app
from probllm.feedback import CRITERIA, SCHEMA_VERSION, FeedbackStore, export
from probllm.io import Stats, UsageError


def rows(db, table: str) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY id")]
    finally:
        conn.close()


MARKDOWN_MARKS = set("*_`~#>[]()\\")


def printable(text: str) -> str:
    """The untrained tiny model writes control characters, which a page's text does not show, and sometimes
    markdown marks (`*a*`), which the page renders (emphasis) instead of showing: compare the rest."""
    return "".join(ch for ch in text if ch.isprintable() and not ch.isspace() and ch not in MARKDOWN_MARKS)


def ask(page, question: str) -> None:
    page.fill("#question", question)
    page.keyboard.press("Enter")


def enter_key(page) -> None:
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector('#status[data-state="online"]')


def vote_in_compare(page, overall: str, ticks: dict[str, tuple[bool, bool]]) -> None:
    """Tick the criteria of answers 1 and 2 (left, right), pick the overall verdict; the caller submits."""
    page.wait_for_selector(".msg.compare .verdict", timeout=60_000)
    panes = page.locator(".msg.compare .pane")
    for name, (left, right) in ticks.items():
        for i, on in enumerate((left, right)):
            if on:
                panes.nth(i).locator(f'input[name="{name}"]').check()
    page.check(f'.verdict input[name=overall][value="{overall}"]')


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result


def test_students_vote_in_the_browser_and_the_votes_train_dpo(browser, tiny_model_dir, tmp_path):  # noqa: F811
    db = tmp_path / "feedback.sqlite"
    port = free_port()
    args = ("--model", tiny_model_dir, "--served-model-name", "tiny", "--feedback", str(db), "--port", str(port))
    env = {"PROBLLM_API_KEY": KEY}

    # Ratings (no --compare): a thumbs up; then the server is SIGKILLed and a thumbs down with a comment is cast
    # while it is down: the page keeps it and sends it when the server is back.
    with probllm_serve(*args, env=env) as (url, proc, _):
        root = url[: -len("/v1")]
        page, errors, outside = open_page(browser, root + "/" + PAGE_QUERY)
        enter_key(page)
        page.wait_for_function("document.body.dataset.feedback === 'ratings'")
        ask(page, "What is the worst-case running time of heapsort?")
        first = page.locator('.msg.assistant[data-turn="1"]')
        first.locator(".fb-up").click()
        first.locator('.fb-status[data-state="saved"]').wait_for()
        ask(page, "And its best case?")
        second = page.locator('.msg.assistant[data-turn="2"]')
        second.locator(".fb-down").wait_for()
        assert len(rows(db, "ratings")) == 1  # answered 200 only once committed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    second.locator(".fb-down").click()
    second.locator(".fb-comment textarea").fill("It does not say what the best case is.")
    second.locator(".fb-comment button[type=submit]").click()
    second.locator('.fb-status[data-state="waiting"]').wait_for()

    with probllm_serve(*args, "--compare", env=env) as (url, proc, _):
        second.locator('.fb-status[data-state="saved"]').wait_for(timeout=30_000)  # retried by the page itself
        ratings = rows(db, "ratings")
        assert [(r["rating"], r["comment"]) for r in ratings] == [
            (1, ""), (-1, "It does not say what the best case is.")]
        assert json.loads(ratings[1]["messages"])[-1] == {"role": "user", "content": "And its best case?"}
        assert [m["role"] for m in json.loads(ratings[1]["messages"])] == ["user", "assistant", "user"]
        assert ratings[0]["answer"].strip() and ratings[0]["model"] == "tiny"
        assert json.loads(ratings[0]["settings"])["temperature"] == 1

        # Compare mode, in two browsers at once (a second context: its own storage, its own session id).
        page.reload()
        page.wait_for_function("document.body.dataset.feedback === 'compare'")
        other_context = browser.new_context(viewport={"width": 1100, "height": 900})
        other = other_context.new_page()
        other_errors: list[str] = []
        other.on("pageerror", lambda e: other_errors.append(str(e)))
        other.goto(root + "/" + PAGE_QUERY)
        enter_key(other)
        other.wait_for_function("document.body.dataset.feedback === 'compare'")
        ask(page, "What is overfitting?")
        ask(other, "State Newton's second law.")
        vote_in_compare(page, "A", {"correctness": (True, True), "clarity": (True, False)})
        vote_in_compare(other, "B", {"correctness": (False, True), "relevance": (True, True),
                                     "completeness": (False, True)})
        panes = page.locator(".msg.compare .pane")
        assert panes.count() == 2 and "tiny" not in page.locator(".msg.compare").inner_text()  # unlabelled
        shown = [printable(panes.nth(i).locator(".answer").inner_text()) for i in range(2)]
        # Both submit in the same event-loop turn of their pages: the two votes are in flight together.
        for p in (page, other):
            p.evaluate("setTimeout(() => document.querySelector('.verdict button[type=submit]').click(), 200)")
        for p in (page, other):
            p.locator('.verdict .fb-status[data-state="saved"]').wait_for()
        comparisons = rows(db, "comparisons")
        assert len(comparisons) == 2
        mine = next(c for c in comparisons if json.loads(c["messages"])[-1]["content"] == "What is overfitting?")
        theirs = next(c for c in comparisons if c is not mine)
        assert [mine[k] for k in ("overall", *CRITERIA)] == ["A", "AB", "None", "A", "None"]
        assert [theirs[k] for k in ("overall", *CRITERIA)] == ["B", "B", "AB", "None", "B"]
        assert [printable(mine["answer_a"]), printable(mine["answer_b"])] == shown  # A is the one shown left
        assert mine["model_a"] == mine["model_b"] == "tiny"
        seeds = [json.loads(mine[f"settings_{s}"])["seed"] for s in "ab"]
        assert len(set(seeds)) == 2 and json.loads(mine["settings_a"])["temperature"] == 1
        assert mine["session"] != theirs["session"] and mine["session"] == ratings[0]["session"]
        # Pseudonymous: nothing but what the page sent (no address, no agent).
        assert not any(c in {"ip", "client", "host", "user_agent", "name"} for c in comparisons[0])

        # The routes answer bad votes in OpenAI's error shape and keep serving; the key is required.
        vote = {"vote_id": "abcdefgh12", "session": "sessionid12", "messages": [{"role": "user", "content": "q"}],
                "answer": {"text": "a", "model": "tiny"}, "rating": "meh"}
        assert httpx.post(url + "/feedback/rating", json=vote).status_code == 401
        bad = httpx.post(url + "/feedback/rating", json=vote, headers={"Authorization": f"Bearer {KEY}"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
        assert httpx.get(url + "/feedback/config", headers={"Authorization": f"Bearer {KEY}"}).json()["compare"]

        # Exported while the server runs (WAL: the reader does not block it), paired, trained on.
        exported = run_cli("feedback", "export", str(db))
        assert exported.exit_code == 0, exported.stderr
        annotated = [json.loads(line) for line in exported.stdout.splitlines()]
        assert len(annotated) == 2 and "2 in, 2 out" in exported.stderr and "next time: --since 2" in exported.stderr
        (tmp_path / "annotated.jsonl").write_text(exported.stdout)
        paired = run_cli("pair-annotated", str(tmp_path / "annotated.jsonl"))
        pairs = [json.loads(line) for line in paired.stdout.splitlines()]
        assert paired.exit_code == 0 and len(pairs) == 2, paired.stderr
        by_question = {p["prompt"]: p for p in pairs}
        assert by_question["What is overfitting?"]["chosen"] == mine["answer_a"]
        assert by_question["State Newton's second law."]["chosen"] == theirs["answer_b"]
        assert by_question["What is overfitting?"]["models"] == {"A": "tiny", "B": "tiny"}
        (tmp_path / "pairs.jsonl").write_text(paired.stdout)
        kto = run_cli("feedback", "export", str(db), "--kind", "ratings", "--since", "1")
        assert kto.exit_code == 0 and [json.loads(line)["label"] for line in kto.stdout.splitlines()] == [False]
        assert errors == [] and other_errors == [] and outside == []
        other_context.close()
        page.close()
        proc.send_signal(signal.SIGKILL)  # its graceful stop is tested elsewhere: here it would only cost time
        proc.wait()

    trained = run_cli("dpo", str(tmp_path / "pairs.jsonl"), "--model", tiny_model_dir, "-o", str(tmp_path / "dpo"),
                      "--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--no-bf16",
                      "--logging-steps", "1")
    assert trained.exit_code == 0, trained.stderr
    assert json.loads(trained.stdout)["steps"] == 2
    assert (tmp_path / "dpo" / "adapter_model.safetensors").exists()


def test_store_replaces_a_vote_and_since_exports_it_again(tmp_path):
    db = tmp_path / "f.sqlite"
    store = FeedbackStore(db)
    question = [{"role": "user", "content": "Q?"}]
    store.add_rating(vote_id="v1", session="s1", messages=question, answer="A.", model="m", rating=1)
    store.add_rating(vote_id="v2", session="s1", messages=question, answer="B.", model="m", rating=-1)
    first = list(export(db, "ratings", stats := Stats()))
    assert [r["label"] for r in first] == [True, False] and "--since 2" in stats.notes["last id"]
    # A comment added to v1 later: the vote moves to the end and an incremental export sees it again.
    again = store.add_rating(vote_id="v1", session="s1", messages=question, answer="A.", model="m", rating=1,
                             comment="clear")
    assert again["replaced"] and again["id"] == 3
    later = list(export(db, "ratings", Stats(), since="2"))
    assert [(r["feedback_id"], r["comment"]) for r in later] == [("v1", "clear")]
    assert later[0]["created"] < later[0]["updated"]
    assert list(export(db, "ratings", Stats(), since=later[0]["updated"])) == []
    assert len(list(export(db, "ratings", Stats(), since="2000-01-01"))) == 2
    # Ties and both-wrong go out as the annotated format writes them; pair-annotated's rules drop them.
    for vote_id, overall, correctness in (("c1", "AB", "A"), ("c2", "A", "None"), ("c3", "B", "B")):
        store.add_comparison(vote_id=vote_id, session="s1", messages=question, overall=overall,
                             answers=[{"text": "x", "model": "m"}, {"text": "y", "model": "m"}],
                             criteria={c: correctness for c in CRITERIA})
    out = run_cli("feedback", "export", str(db))
    assert "ties (AB): 1" in out.stderr and "a winner: 2" in out.stderr
    (tmp_path / "a.jsonl").write_text(out.stdout)
    paired = run_cli("pair-annotated", str(tmp_path / "a.jsonl"))
    assert [json.loads(line)["chosen"] for line in paired.stdout.splitlines()] == ["y"]
    assert "overall tie (AB): 1" in paired.stderr and "both answers wrong (correctness None): 1" in paired.stderr


def test_store_refuses_what_it_cannot_read(tmp_path):
    newer = tmp_path / "newer.sqlite"
    FeedbackStore(newer)
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(UsageError, match="newer"):
        FeedbackStore(newer)
    notes = tmp_path / "notes.sqlite"
    notes.write_text("not a database")
    for args in (["feedback", "export", str(notes)], ["feedback", "export", str(tmp_path / "none.sqlite")],
                 ["feedback", "export", str(newer)], ["feedback", "export", str(newer), "--since", "yesterday"]):
        result = run_cli(*args)
        assert result.exit_code == 2 and "error:" in result.stderr and "Traceback" not in result.stderr
    # serve refuses what cannot work before any model loads (in-process: each of these exits at the check).
    for args, said in ((["--compare"], "give --feedback"),
                       (["--feedback", str(tmp_path / "f.sqlite"), "--compare", "--compare-by", "notes"],
                        "give --index"),
                       (["--feedback", str(tmp_path / "no" / "f.sqlite")], "does not exist"),
                       (["--feedback", str(newer)], "newer")):
        result = run_cli("serve", *args)
        assert result.exit_code == 2 and said in result.stderr, result.stderr

