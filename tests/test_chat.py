"""`chat`: the conversation logic with the tiny model, and the real command driven through a pseudo-terminal
(pexpect) as a person would: two turns, /sources, /save read back by `judge`, Ctrl-C in the middle of an
answer."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pexpect
import pytest

from probllm.rag.chat import ChatModel, Conversation, split_options

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "you> "


@pytest.fixture(scope="module")
def tiny_chat(tiny_model_dir):
    # Sampling (seeded): the untrained tiny model writes only newlines under greedy decoding.
    return ChatModel.local(tiny_model_dir, temperature=1.0, seed=0)


def spawn_chat(*args: str, timeout: float = 120) -> pexpect.spawn:
    env = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = pexpect.spawn(sys.executable, ["-m", "probllm", "chat", *args], env=env, cwd=str(ROOT),
                          encoding="utf-8", timeout=timeout, dimensions=(50, 200))
    child.expect_exact(PROMPT)
    return child


# ------------------------------------------------------------------------------------------------ the logic


def test_options_are_read_from_the_question():
    assert split_options("Unit of force? A) joule B) newton C) watt D) pascal") == (
        "Unit of force?", ["joule", "newton", "watt", "pascal"])
    assert split_options("Which is prime?\nA. 4\nB. 6\nC. 7") == ("Which is prime?", ["4", "6", "7"])
    assert split_options("Pick (A) one, (B) two") == ("Pick", ["one", "two"])
    # No run of letters from A: not options.
    assert split_options("What is vitamin B. complex?") == ("What is vitamin B. complex?", [])
    assert split_options("Is plan A) good?") == ("Is plan A) good?", [])


def test_history_is_sent_and_cut_oldest_first(tiny_chat, notes_index):
    from probllm.rag.retrieve import Retriever

    conv = Conversation(tiny_chat, Retriever(notes_index), k=1, max_new_tokens=8)
    first = conv.ask("What is the worst case of heapsort?")
    second = conv.ask("And its best case?")
    assert first.history == [] and first.sources and first.sources[0]["n"] == 1
    assert second.history == [{"role": "user", "content": first.question},
                              {"role": "assistant", "content": first.answer}]
    # A follow-up is retrieved with the question before it: still about heapsort.
    assert "heapsort" in second.sources[0]["source"]
    # A context that holds only the last turn: the oldest turns go first, and the turn says so.
    prompt_now = tiny_chat.count_tokens([{"role": "user", "content": "x"}])
    one_turn = tiny_chat.count_tokens([{"role": "user", "content": second.question},
                                       {"role": "assistant", "content": second.answer}])
    tiny_chat._context_tokens = 10_000
    try:
        msgs, _ = conv._messages("And the memory?", [], conv._retrieve("And the memory?", []))
        full = tiny_chat.count_tokens(msgs)
        tiny_chat._context_tokens = full - one_turn // 2 + conv.max_new_tokens
        third = conv.ask("And the memory?")
    finally:
        tiny_chat._context_tokens = None
    assert prompt_now > 0 and third.dropped_turns == 1
    assert third.history == [{"role": "user", "content": second.question},
                             {"role": "assistant", "content": second.answer}]
    records = conv.records()
    assert [r["id"] for r in records] == ["turn-1", "turn-2", "turn-3"] and records[2]["dropped_turns"] == 1
    conv.reset()
    assert conv.turns == [] and conv.ask("Hello?").history == []


def test_mcq_mode_answers_with_a_letter_and_one_line(tiny_chat):
    conv = Conversation(tiny_chat, None, max_new_tokens=200, mcq=True)
    shown: list[str] = []
    turn = conv.ask("What is the SI unit of force? A) joule B) newton C) watt D) pascal", on_text=shown.append)
    assert turn.choices == ["joule", "newton", "watt", "pascal"] and turn.letter in "ABCD"
    option = turn.choices["ABCD".index(turn.letter)]
    assert turn.answer.startswith(f"Answer: {turn.letter}. {option}\nExplanation:")
    assert len(turn.answer.splitlines()) == 2  # the letter line and one line of reason
    assert "".join(shown).startswith("Answer: ")
    plain = Conversation(tiny_chat, None, max_new_tokens=4, mcq=True).ask("No options here?")
    assert plain.choices == [] and plain.letter is None


# ----------------------------------------------------------------------------------- the command in a terminal


def test_two_turns_sources_and_a_transcript_judge_reads(tiny_model_dir, notes_index, tmp_path, cli):
    transcript = tmp_path / "talk.jsonl"
    # The tiny model's 512-token vocabulary spends a token on every few characters: room for two notes passages
    # and a turn of history takes more than its nominal 1024 positions (rotary positions go beyond).
    child = spawn_chat("--model", tiny_model_dir, "--index", notes_index, "-k", "2", "--max-new-tokens", "16",
                       "--temperature", "1", "--seed", "3", "--context-tokens", "4096")
    child.logfile_read = open(tmp_path / "terminal.log", "w")
    try:
        child.sendline("What is the worst-case running time of heapsort?")
        child.expect(r"Sources:\r\n  \[1\] \S*examples/notes/algorithms/heapsort\.md")
        child.expect_exact(PROMPT)
        child.sendline("And what about its best case?")
        child.expect("Sources:")
        child.expect_exact(PROMPT)
        child.sendline("/sources")
        child.expect(r"\[1\] \S*examples/notes/\S+ > [^\n]*\(score 0\.\d+\)\r\n    \S")  # (pexpect: . is DOTALL)
        child.expect(r"\[2\] ")
        child.expect_exact(PROMPT)
        child.sendline(f"/save {transcript}")
        child.expect_exact(f"(saved 2 turns to {transcript})")
        child.expect_exact(PROMPT)
        child.sendeof()  # Ctrl-D quits
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0

    turns = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [t["question"] for t in turns] == ["What is the worst-case running time of heapsort?",
                                              "And what about its best case?"]
    assert all(t["answer"] and t["sources"] and len(t["context_ids"]) == 2 for t in turns)
    # The second question was sent with the first turn: it can refer to it.
    assert turns[1]["history"] == [{"role": "user", "content": turns[0]["question"]},
                                   {"role": "assistant", "content": turns[0]["answer"]}]
    assert turns[0]["sources"][0]["heading"].startswith("Heapsort")

    judged = cli("judge", "--mode", "single", "--a", str(transcript), "--backend", "hf", "--model", tiny_model_dir,
                 "--verdict-from", "likelihood")
    assert judged.code == 0, judged.stderr
    verdicts = judged.records
    assert [v["id"] for v in verdicts] == ["turn-1", "turn-2"]
    assert all(1 <= v["score_a"] <= 10 for v in verdicts)


def test_ctrl_c_stops_the_answer_not_the_program(tiny_model_dir, tmp_path):
    transcript = tmp_path / "stopped.jsonl"
    # Greedy: the tiny model writes newlines until max-new-tokens, far longer than we wait.
    child = spawn_chat("--model", tiny_model_dir, "--max-new-tokens", "5000", "--context-tokens", "8192")
    try:
        child.sendline("Explain heapsort at length.")
        child.expect_exact("Explain heapsort at length.")
        child.expect("\r\n\r\n")  # the answer has started streaming
        time.sleep(0.5)
        started = time.monotonic()
        child.sendintr()
        child.expect_exact("(stopped)")
        child.expect_exact(PROMPT)
        assert time.monotonic() - started < 10
        child.sendline("/help")  # still alive and listening
        child.expect_exact("/save FILE")
        child.expect_exact(PROMPT)
        child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, not an exit
        child.expect_exact(PROMPT)
        child.sendline(f"/save {transcript}")
        child.expect_exact("(saved 1 turn to")
        child.expect_exact(PROMPT)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    [turn] = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert turn["stopped"] is True and turn["question"] == "Explain heapsort at length."


def test_against_probllm_serve_its_sources_and_a_server_that_comes_back(tiny_model_dir, notes_index, tmp_path):
    import socket

    from servers import probllm_serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transcript = tmp_path / "remote.jsonl"
    # Nothing listens yet: chat starts anyway and says so.
    child = spawn_chat("--base-url", f"http://127.0.0.1:{port}/v1", "--model", "tiny", "--max-new-tokens", "12",
                       "--temperature", "1")
    try:
        assert "unreachable" in child.before
        child.sendline("What is the worst-case running time of heapsort?")
        child.expect_exact("Cannot reach the model:")
        child.expect_exact("ask again when the server is back")
        child.expect_exact(PROMPT)
        with probllm_serve("--model", tiny_model_dir, "--served-model-name", "tiny", "--index", notes_index,
                           "--port", str(port)):
            child.sendline("What is the worst-case running time of heapsort?")
            # No --index here: the server retrieved, and its sources are listed.
            child.expect(r"Sources:\r\n  \[1\] \S*heapsort\.md > Heapsort")
            child.expect_exact(PROMPT)
            child.sendline(f"/save {transcript}")
            child.expect_exact("(saved 1 turn to")
            child.expect_exact(PROMPT)
        child.sendline("And its best case?")  # the server is gone again: said, and the conversation is kept
        child.expect_exact("Cannot reach the model:")
        child.expect_exact(PROMPT)
        child.sendline("/sources")
        child.expect(r"\[1\] \S*heapsort\.md > Heapsort[^\n]*\(score 0\.\d+\)")
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    [turn] = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert turn["answer"] and turn["sources"][0]["n"] == 1 and "heapsort" in turn["sources"][0]["source"]
    assert turn["model"] == f"tiny at http://127.0.0.1:{port}/v1"
