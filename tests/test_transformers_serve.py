"""The openai backend against a server that is not ours: transformers' own `transformers serve` with the tiny
model. Every record comes out of `corrupt` and `judge`: corrupted / judged, or reported with its reason."""

from __future__ import annotations

import json

import pytest

from servers import transformers_serve


@pytest.fixture(scope="module")
def hf_server(tiny_model_dir):
    with transformers_serve(tiny_model_dir) as url:
        yield url, tiny_model_dir


def test_corrupt_against_transformers_serve(cli, hf_server, tmp_path):
    url, model = hf_server
    qa = "".join(json.dumps({"id": i, "question": f"Why does experiment {i} work?",
                             "answer": f"It works because the force is {i + 3} newtons. The mass is small."}) + "\n"
                 for i in range(4))
    failed = tmp_path / "failed.jsonl"
    r = cli("corrupt", "--backend", "openai", "--base-url", url, "--model", model, "--max-tokens", "12",
            "--concurrency", "4", "--rejected-tries", "2", "--no-cache", "--failed", failed, input=qa)
    reported = [json.loads(line) for line in failed.read_text().splitlines()]
    assert "Traceback" not in r.stderr
    assert sorted([p["id"] for p in r.records] + [f["id"] for f in reported]) == [0, 1, 2, 3], r.stderr
    assert all("error" in f for f in reported)
    assert "4 in" in r.stderr
    # Every failure must be the model's text judged unusable (the random tiny model writes only newlines), which
    # proves the server answered and its replies were read: a broken exchange (no server, wrong route, refused
    # model name, unparsable replies) is reported with another reason and fails here.
    assert all(f["error"].startswith("corruption rejected (") for f in reported), reported
    assert r.records or all("(empty)" in f["error"] for f in reported), reported


def test_judge_against_transformers_serve(cli, hf_server):
    url, model = hf_server
    both = "".join(json.dumps({"id": i, "question": "Q?", "answer_a": "short", "answer_b": "a longer answer"})
                   + "\n" for i in range(3))
    r = cli("judge", "--backend", "openai", "--base-url", url, "--model", model, "--max-tokens", "8",
            "--judge-tries", "2", "--no-cache", input=both)
    assert "Traceback" not in r.stderr
    assert [v["id"] for v in r.records] == [0, 1, 2], r.stderr
    # A random tiny model writes no [[A]]: every record has its verdict or says why it has none.
    assert all(v["verdict"] is not None or v.get("error") for v in r.records)
