"""`corrupt`: rules determinism, per-record choices, rejection retries, and resuming after `kill -9`."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probllm.corrupt import CorruptOptions, clean_output, corrupt_records, messages_for, rejection_reason
from probllm.io import RecordError, Stats, read_records
from probllm.lm import BackendConfig
from probllm.lm.cache import request_key
from fake_server import ChatServer, last_user_text
from probllm.lm.rules import remove, substitute
from probllm.models import endpoint_identity

ROOT = Path(__file__).resolve().parents[1]
QA = ROOT / "examples" / "qa.jsonl"


def qa_records() -> list[dict]:
    return [json.loads(line) for line in QA.read_text().splitlines() if line.strip()]


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def openai_config(server: ChatServer, **kw) -> BackendConfig:
    return BackendConfig(backend="openai", model="fake", base_url=server.base_url, retry_base=0.01,
                         no_cache=kw.pop("no_cache", True), **kw)


# ------------------------------------------------------------------------------------------------------ rules


def test_rules_are_deterministic_and_make_real_pairs(cli):
    a = cli("corrupt", "--backend", "rules", "--seed", "3", str(QA))
    b = cli("corrupt", "--backend", "rules", "--seed", "3", str(QA))
    assert a.code == 0 and a.stdout == b.stdout
    pairs = a.records
    assert len(pairs) == 20 and "20 in, 20 out" in a.stderr
    for p, src in zip(pairs, qa_records()):
        assert p["prompt"] == src["question"] and p["chosen"] == src["answer"]
        assert p["rejected"] != p["chosen"] and p["rejected"].strip()
        assert len(p["corruption_ops"]) == 2 and len(set(p["corruption_ops"])) == 2
        assert p["source"] == "corrupted" and p["id"] == src["id"] and p["subject"] == src["subject"]
    other = cli("corrupt", "--backend", "rules", "--seed", "4", str(QA)).records
    assert [p["corruption_ops"] for p in other] != [p["corruption_ops"] for p in pairs]


def test_rule_operations_by_hand():
    rng = random.Random(0)
    text = "Water boils at 100 degrees. Heat breaks hydrogen bonds between molecules. The pot gets warm."
    removed = remove(text, "Why do hydrogen bonds break when water boils?", rng)
    assert removed == "Water boils at 100 degrees. The pot gets warm."  # the sentence about the question's words
    changed = substitute("The sum is 10 and it increases.", random.Random(1))
    assert changed != "The sum is 10 and it increases." and ("decreases" in changed or "10" not in changed)
    assert substitute("no numbers and nothing to flip here", rng) is None


def test_choices_do_not_depend_on_order_or_concurrency(tmp_path):
    records = qa_records()
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    with ChatServer() as server:
        def run(recs, concurrency):
            stats = Stats()
            out = corrupt_records(read_records([write(tmp_path / f"in{concurrency}.jsonl", recs)], stats),
                                  openai_config(server, concurrency=concurrency), CorruptOptions(seed=7), stats)
            return {p["id"]: (p["corruption_ops"], p["rejected"]) for p in out}

        assert run(records, 1) == run(shuffled, 16)


def test_camel_fields_and_overrides(tmp_path):
    camel = {"role_1": "Mathematician", "topic;": "Algebra", "sub_topic": "Linear equations",
             "message_1": "Solve 2x + 3 = 7.", "message_2": "Subtract 3 to get 2x = 4, then divide by 2: x = 2."}
    custom = {"q": "What is 3 * 3?", "a": "3 * 3 = 9 because three groups of three make nine."}
    with ChatServer() as server:
        stats = Stats()
        [pair] = corrupt_records(read_records([write(tmp_path / "camel.jsonl", [camel])], stats),
                                 openai_config(server), CorruptOptions(), stats)
        assert pair["prompt"] == camel["message_1"] and pair["chosen"] == camel["message_2"]
        assert pair["topic"] == "Algebra" and pair["sub_topic"] == "Linear equations" and "message_1" not in pair
        [pair] = corrupt_records(read_records([write(tmp_path / "custom.jsonl", [custom])], stats),
                                 openai_config(server), CorruptOptions(question_field="q", answer_field="a",
                                                                       ops=("REMOVE",), k=1), stats)
        assert pair["prompt"] == custom["q"] and pair["corruption_ops"] == ["REMOVE"]


def test_prompts_follow_the_method():
    msgs = messages_for("SUBSTITUTE", "Q?", "A.")
    assert "adversarial actor" in msgs[0]["content"] and "INACCURATE" in msgs[0]["content"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "Q?" in msgs[-1]["content"] and "A." in msgs[-1]["content"]
    assert rejection_reason("Same text.", "  same   TEXT. ") == "identical"
    assert rejection_reason("x", "I'm sorry, but I can't help with that.") == "refusal"
    assert rejection_reason("x", "") == "empty"
    assert clean_output("Corrupted answer: The sky is green.") == "The sky is green."


def test_rejected_outputs_are_retried_then_reported(tmp_path):
    records = qa_records()[:3]

    # Like transformers serve as a new user met it: seed and temperature change nothing, the same request gets
    # the same echo back. Only a request that says what was wrong gets a usable answer.
    def responder(body):
        task = [m["content"] for m in body["messages"] if "Correct answer:" in m["content"]][-1]
        answer = task.split("Correct answer:\n", 1)[1].rsplit("\n\nCorrupted answer:", 1)[0]
        if "binary search" in task.lower():
            return "I'm sorry, but I cannot help with corrupting answers."   # always a refusal
        told = last_user_text(body)
        if "identical to the correct answer" not in told:
            return answer                                                    # an echo, whatever the seed
        assert body["temperature"] >= 0.7 and body["messages"][-2]["content"] == answer
        return answer + " Also, the moon is made of basalt."                 # fine once told

    failed = tmp_path / "failed.jsonl"
    with ChatServer(responder=responder) as server, open(failed, "w") as fh:
        stats = Stats()
        out = list(corrupt_records(read_records([write(tmp_path / "in.jsonl", records)], stats),
                                   openai_config(server), CorruptOptions(tries=3, failed_out=fh), stats))
    assert [p["id"] for p in out] == ["qa-02", "qa-03"]
    assert all("basalt" in p["rejected"] for p in out)
    assert stats.skipped == {"corruption rejected (refusal)": 1}
    [reported] = [json.loads(line) for line in failed.read_text().splitlines()]
    assert reported["id"] == "qa-01" and "refusal" in reported["error"]


def test_bad_record_names_file_line_field(cli, tmp_path):
    path = write(tmp_path / "bad.jsonl", [qa_records()[0], {"id": "x", "question": "Q only"}])
    r = cli("corrupt", "--backend", "rules", path)
    assert r.code == 65 and f"{path}:2: field 'answer': missing" in r.stderr and "Traceback" not in r.stderr
    assert len(r.records) == 1
    r = cli("corrupt", "--backend", "rules", "--skip-invalid", path)
    assert r.code == 0 and len(r.records) == 1 and "1 invalid" in r.stderr
    r = cli("corrupt", "--backend", "rules", "--ops", "REMOVE,FOO", path)
    assert r.code == 2 and "FOO" in r.stderr


def test_request_failures_are_reported_and_exit_nonzero(cli, tmp_path):
    path = write(tmp_path / "in.jsonl", qa_records()[:4])

    def faults(body, n):
        return "500" if "quicksort" in last_user_text(body) else None

    with ChatServer(faults=faults) as server:
        r = cli("corrupt", "--backend", "openai", "--model", "m", "--base-url", server.base_url, "--tries", "2",
                "--retry-base", "0.01", "--no-cache", path)
    assert r.code == 1
    assert [p["id"] for p in r.records] == ["qa-01", "qa-03", "qa-04"]
    assert f"{path}:2: not corrupted" in r.stderr and "gave up after 2 tries (HTTP 500)" in r.stderr
    assert "1 skipped (request failed: 1)" in r.stderr


def _cache_keys(path: Path) -> set[str]:
    db = sqlite3.connect(str(path))
    try:
        return {k for (k,) in db.execute("SELECT key FROM responses")}
    finally:
        db.close()


def _key_of_body(body: dict, base_url: str) -> str:
    params = {k: body[k] for k in ("max_tokens", "temperature", "top_p", "seed")}
    return request_key("openai", endpoint_identity(base_url, body["model"]).id, body["messages"], params)


def test_kill_9_and_restart_resends_nothing_loses_nothing(tmp_path):
    records = [{"id": f"r{i:03d}", "question": f"Question number {i}?",
                "answer": f"The answer to question {i} has several words in it. It ends here {i}."}
               for i in range(60)]
    path = write(tmp_path / "in.jsonl", records)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start(server, cache, out):
        args = [sys.executable, "-m", "probllm", "corrupt", "--backend", "openai", "--model", "fake",
                "--base-url", server.base_url, "--concurrency", "4", "--cache", str(cache), path]
        return subprocess.Popen(args, stdout=open(out, "w"), stderr=subprocess.PIPE, env=env, cwd=str(ROOT))

    with ChatServer(delay=0.03) as server:
        reference = tmp_path / "reference.jsonl"
        proc = start(server, tmp_path / "ref.sqlite", reference)
        assert proc.wait(60) == 0, proc.stderr.read().decode()
        total_requests = sum(server.succeeded.values())
        assert total_requests == 2 * len(records)
        server.reset_counts()

        cache = tmp_path / "run.sqlite"
        proc = start(server, cache, tmp_path / "killed.jsonl")
        deadline = time.monotonic() + 60
        while sum(server.succeeded.values()) < total_requests // 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        cached_before = _cache_keys(cache)
        assert 0 < len(cached_before) < total_requests
        while server.in_flight and time.monotonic() < deadline:  # the dead client's last requests drain
            time.sleep(0.01)

        server.reset_counts()
        final = tmp_path / "final.jsonl"
        proc = start(server, cache, final)
        assert proc.wait(60) == 0, proc.stderr.read().decode()
        resent = {_key_of_body(b, server.base_url) for b in server.bodies.values()} & cached_before
        assert resent == set()                                   # nothing that had succeeded was sent again
        assert sum(server.succeeded.values()) == total_requests - len(cached_before)
        assert final.read_text() == reference.read_text()        # nothing missing, nothing duplicated, same order
        assert [json.loads(line)["id"] for line in final.read_text().splitlines()] == [r["id"] for r in records]
