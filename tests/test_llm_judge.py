"""`judge`: verdict parsing, swap consistency, joins, retries and the summary statistics checked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from probllm.judge import JudgeSummary, combine, parse_pairwise, parse_rating, wilson_interval
from fake_server import ChatServer, last_user_text

ROOT = Path(__file__).resolve().parents[1]
A = ROOT / "examples" / "answers-a.jsonl"
B = ROOT / "examples" / "answers-b.jsonl"


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def judge_cli(cli, server, *args, input=None):
    return cli("judge", "--backend", "openai", "--model", "judge", "--base-url", server.base_url, "--no-cache",
               "--retry-base", "0.01", *args, input=input)


def test_parsing():
    assert parse_pairwise("A is more complete. [[A]]") == "A"
    assert parse_pairwise("Both fine. [[C]]") == "tie"
    assert parse_pairwise("first I thought [[A]] but finally [[B]]") == "B"   # the final verdict counts
    assert parse_pairwise("[[ b ]]") == "B"
    assert parse_pairwise("Assistant A is better.") is None
    assert parse_rating("Good answer. Rating: [[7]]") == 7.0
    assert parse_rating("Rating: [[8.5]]") == 8.5
    assert parse_rating("Rating: 6/10") == 6.0
    assert parse_rating("Rating: [[11]]") is None and parse_rating("no score") is None


def test_combine_both_orders():
    assert combine("A", "B") == "a"          # A first wins; swapped, B (= our A) wins: consistent
    assert combine("B", "A") == "b"
    assert combine("tie", "tie") == "tie"
    assert combine("A", "A") == "inconsistent"  # always the first position: position bias
    assert combine("A", "tie") == "inconsistent"


def test_wilson_interval_by_hand():
    # 7 of 10, z = 1.96: centre (0.7 + 0.19208) / 1.38416 = 0.64454; half 0.25135 -> (0.3968, 0.8922)
    lo, hi = wilson_interval(7, 10)
    assert lo == pytest.approx(0.39676, abs=1e-4) and hi == pytest.approx(0.89223, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    lo, hi = wilson_interval(8, 8)
    assert lo == pytest.approx(8 / (8 + 1.959964 ** 2), abs=1e-6)


def test_summary_counts_by_hand():
    s = JudgeSummary()
    for v in ["a", "a", "b", "tie", "inconsistent", "a"]:
        s.add_verdict(v)
    s.add_lengths("xxxx", "xx")
    s.add_lengths("xx", "xxxx")
    d = s.as_dict()
    assert (d["wins"], d["ties"], d["losses"], d["inconsistent"], d["explicit_ties"]) == (3, 2, 1, 1, 1)
    assert d["win_rate"] == 0.5 and d["inconsistency_rate"] == pytest.approx(1 / 6)
    assert d["win_rate_decisive"] == 0.75
    assert d["mean_length_a"] == 3 and d["mean_length_b"] == 3
    z = 1.959963984540054
    centre = (0.5 + z * z / 12) / (1 + z * z / 6)
    half = z * math.sqrt(0.25 / 6 + z * z / 144) / (1 + z * z / 6)
    assert d["win_rate_ci95"] == pytest.approx([centre - half, centre + half])


def test_pairwise_join_consistent_judge(cli, tmp_path):
    # The test server's judge prefers the longer answer, whatever its position: a consistent judge.
    summary = tmp_path / "summary.json"
    with ChatServer() as server:
        r = judge_cli(cli, server, "--a", str(A), "--b", str(B), "--summary", str(summary))
        assert r.code == 0, r.stderr
        assert sum(server.seen.values()) == 16   # 8 questions x 2 orders
    verdicts = r.records
    assert [v["id"] for v in verdicts] == [f"qa-0{i}" for i in range(1, 9)]  # A's order, though B is shuffled
    by_id = {json.loads(line)["id"]: json.loads(line) for line in B.read_text().splitlines()}
    for v in verdicts:
        assert v["answer_b"] == by_id[v["id"]]["answer"]
        assert [j["order"] for j in v["judgments"]] == ["ab", "ba"] and all("[[" in j["raw"] for j in v["judgments"])
        assert v["verdict"] == ("a" if len(v["answer_a"]) > len(v["answer_b"]) else "b")
    d = json.loads(summary.read_text())
    wins = sum(v["verdict"] == "a" for v in verdicts)
    assert d["wins"] == wins and d["losses"] == 8 - wins and d["ties"] == 0 and d["inconsistency_rate"] == 0
    assert d["win_rate_ci95"] == pytest.approx(list(wilson_interval(wins, 8)))
    assert d["mean_length_a"] == pytest.approx(sum(len(v["answer_a"]) for v in verdicts) / 8)
    assert "A win rate" in r.stderr and "95% CI" in r.stderr


def test_position_biased_judge_is_inconsistent(cli, tmp_path):
    records = [{"id": i, "question": f"Q{i}?", "answer_a": f"answer a{i}", "answer_b": f"answer b{i}"}
               for i in range(5)]
    path = write(tmp_path / "both.jsonl", records)
    with ChatServer(responder=lambda body: "The first one. [[A]]") as server:
        r = judge_cli(cli, server, path, "--summary", str(tmp_path / "s.json"))
    assert r.code == 0 and all(v["verdict"] == "inconsistent" for v in r.records)
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["ties"] == 5 and d["inconsistent"] == 5 and d["inconsistency_rate"] == 1.0 and d["wins"] == 0


def test_unparseable_is_retried_then_reported_with_raw_text(cli, tmp_path):
    path = write(tmp_path / "both.jsonl", [{"id": 1, "question": "Q?", "answer_a": "a", "answer_b": "bb"}])

    def responder(body):
        return "I like both of them." if body["temperature"] == 0 else "Still no verdict."

    with ChatServer(responder=responder) as server:
        r = judge_cli(cli, server, path, "--judge-tries", "3", "--summary", str(tmp_path / "s.json"))
        assert sum(server.seen.values()) == 6   # 2 orders x 3 tries
    [v] = r.records
    assert r.code == 0 and v["verdict"] is None and "unparseable" in v["error"]
    assert v["judgments"][0]["raw"] == "Still no verdict." and v["judgments"][0]["tries"] == 3
    assert ":1: no verdict" in r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["unparsed"] == 1


def test_single_mode_and_reference_guided(cli, tmp_path):
    records = [{"id": 1, "question": "2 + 2?", "answer_a": "4", "answer_b": "It is four, since two and two "
                "make four.", "reference": "4"}]
    path = write(tmp_path / "both.jsonl", records)
    seen_systems = []

    def responder(body):
        seen_systems.append(body["messages"][0]["content"])
        return "Rating: [[3]]" if "[The Start of Assistant's Answer]\n4\n" in last_user_text(body) else "[[9]]"

    with ChatServer(responder=responder) as server:
        r = judge_cli(cli, server, "--mode", "single", path)
    [v] = r.records
    assert v["score_a"] == 3 and v["score_b"] == 9 and v["verdict"] == "b" and v["reference_guided"] is True
    assert all("reference answer" in s for s in seen_systems)
    assert "mean score A 3.00, B 9.00" in r.stderr


def test_missing_partner_is_a_located_error(cli, tmp_path):
    a = write(tmp_path / "a.jsonl", [{"id": "k1", "question": "Q?", "answer": "x"},
                                     {"id": "k2", "question": "Q2?", "answer": "y"}])
    b = write(tmp_path / "b.jsonl", [{"id": "k1", "answer": "z"}])
    with ChatServer() as server:
        r = judge_cli(cli, server, "--a", a, "--b", b)
        assert r.code == 65 and f"{a}:2: field 'id': no record with id = 'k2' in --b" in r.stderr
        r = judge_cli(cli, server, "--a", a, "--b", b, "--skip-invalid")
        assert r.code == 0 and len(r.records) == 1 and r.records[0]["question"] == "Q?"
        r = judge_cli(cli, server, "--a", a)
        assert r.code == 2 and "--b" in r.stderr
