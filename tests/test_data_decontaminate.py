"""decontaminate: a training record that shares a word 13-gram (after lower-casing and deleting punctuation) with
a benchmark question and its options is dropped, or with --flag kept and named; 12 shared words are not enough."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import ROOT
from probllm.cli import app
from probllm.data.decontaminate import NgramHasher, ngrams, normalize

QUESTION = ("Which of the following best explains why the surface temperature of Venus is higher than the "
            "surface temperature of Mercury even though Mercury is closer to the Sun?")
CHOICES = ["Venus has a thick carbon dioxide atmosphere", "Venus rotates backwards", "Mercury has no core",
           "Mercury reflects more light"]
WORDS = QUESTION.split()


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(*args):
    result = CliRunner().invoke(app, ["decontaminate", *map(str, args)], catch_exceptions=False)
    return result.exit_code, [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def shared(k: int, start: int = 4) -> str:
    """A prompt that quotes k consecutive words of the benchmark question, reworded around them (and with its
    case and punctuation changed, which the normalisation undoes)."""
    quoted = " ".join(WORDS[start:start + k]).upper().replace(" ", ", ", 1)
    return f"Homework help please! My textbook says {quoted}; I don't get it, can anyone explain?"


def test_thirteen_shared_words_drop_a_pair_and_twelve_do_not(tmp_path):
    bench = write(tmp_path / "venus-mcq.jsonl", [
        {"id": "mmlu-astro-7", "question": QUESTION, "choices": CHOICES, "answer": "A", "source": "mmlu"}])
    pairs = write(tmp_path / "pairs.jsonl", [
        {"id": "p13", "prompt": shared(13), "chosen": "Because of its atmosphere.", "rejected": "No idea."},
        {"id": "p12", "prompt": shared(12), "chosen": "Because of its atmosphere.", "rejected": "No idea."},
        {"id": "clean", "prompt": "What is a prime number?", "chosen": "One with two divisors.", "rejected": "7"},
        # the end of the question runs on into its options: caught too, in a message list
        {"id": "options", "prompt": [{"role": "user", "content": "Quiz: " + " ".join(WORDS[-8:] + CHOICES[:1])}],
         "chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]},
    ])
    assert len(normalize(shared(13)).split()) > 13  # really reworded around the quote
    code, out, err = run("--against", bench, pairs)
    assert code == 0, err
    assert [r["id"] for r in out] == ["p12", "clean"]
    assert out[0] == json.loads(pairs.read_text().splitlines()[1])  # kept records unchanged
    assert f"records sharing a 13-gram, per benchmark: {bench}: 2 (dropped)" in err
    assert f"4 in, 2 out, 2 skipped (shares a 13-gram with {bench}: 2)" in err

    code, flagged, err = run("--against", bench, "--flag", pairs)
    assert code == 0 and [r["id"] for r in flagged] == ["p13", "p12", "clean", "options"]
    [match] = flagged[0]["contamination"]
    assert match == {"benchmark": str(bench), "id": "mmlu-astro-7", "field": "prompt",
                     "ngram": " ".join(WORDS[4:17]).lower()}
    assert flagged[3]["contamination"][0]["field"] == "prompt"
    assert "contamination" not in flagged[1] and "contamination" not in flagged[2]
    assert "flagged: 2" in err

    # --ngram 12: now the 12 shared words are enough.
    code, out, _ = run("--against", bench, "--ngram", "12", pairs)
    assert [r["id"] for r in out] == ["clean"]


def test_raw_benchmark_files_as_load_reads_them(tmp_path):
    """Original ARC JSONL and a folder of header-less MMLU CSVs, as shipped, without mcqify first."""
    arc = json.loads((ROOT / "examples" / "arc.jsonl").read_text().splitlines()[1])
    pairs = write(tmp_path / "pairs.jsonl", [
        {"id": "arc", "question": "Can you answer: " + arc["question"]["stem"] + " "
         + " ".join(c["text"] for c in arc["question"]["choices"]), "answer": "friction"},
        {"id": "mmlu", "question": "Quiz time. Why do we always see the same side of the Moon? It does not "
         "rotate; its rotation period equals its orbital period.", "answer": "B"},
        {"id": "clean", "question": "What is heapsort?", "answer": "A sort."},
    ])
    code, out, err = run("--against", ROOT / "examples" / "arc.jsonl", "--against", ROOT / "examples" / "mmlu",
                         "--flag", pairs)
    assert code == 0, err
    assert out[0]["contamination"][0]["id"] == arc["id"]
    assert out[1]["contamination"][0]["benchmark"] == str(ROOT / "examples" / "mmlu")
    assert out[1]["contamination"][0]["id"].endswith("astronomy_dev.csv:1")
    assert "contamination" not in out[2]
    code, _, err = run("--against", tmp_path / "nope.jsonl", pairs)
    assert code == 2 and "--against" in err and "no such file" in err


def test_batch_hashing_agrees_with_the_plain_definition():
    """The vectorised hashes: equal n-grams hash equal wherever they stand, n-grams never span two texts."""
    texts = [normalize(t) for t in ("one two three four", "", "Two three, FOUR five six", "x", "three four five")]
    by_gram = {}
    for h, t, p in NgramHasher(3).hash_texts(texts).located():
        gram = " ".join(texts[t].decode().split()[p:p + 3])
        assert by_gram.setdefault(gram, h) == h
    assert sorted(by_gram) == sorted(set(ngrams("one two three four", 3) + ngrams("two three four five six", 3)
                                         + ngrams("three four five", 3)))
    assert len(set(by_gram.values())) == len(by_gram)
