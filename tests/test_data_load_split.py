"""load (local files through `datasets`, header-less CSVs) and split (hash of seed and key)."""

import json
from pathlib import Path

import pytest

from probllm.data.load import load_records, local_files
from probllm.data.split import Splitter, key_value
from probllm.io import RecordError, Skip, Stats, UsageError

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"


def test_load_local_jsonl_and_csv_parquet_through_datasets(tmp_path):
    rows = [{"question": f"q{i}", "n": i, "tags": ["a", "b"]} for i in range(5)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = Stats()
    assert list(load_records(str(jl), stats)) == rows and stats.read == 5
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('question,n\n"a, with comma",1\n"multi\nline",2\n')
    got = list(load_records(str(csv_path), Stats()))
    assert [r["question"] for r in got] == ["a, with comma", "multi\nline"] and got[1]["n"] == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert list(load_records(str(tmp_path / "d.parquet"), Stats(), limit=2)) == rows[:2]


def test_load_mmlu_csv_folder_and_custom_columns(tmp_path):
    got = list(load_records(str(EX / "mmlu"), Stats(), fmt="mmlu-csv"))
    assert len(got) == 7 and set(got[0]) == {"question", "A", "B", "C", "D", "answer", "subject"}
    assert got[0]["subject"] == "astronomy"  # files sorted by name
    p = tmp_path / "pairs.csv"
    p.write_text("x,y\nz,w\n")
    assert list(load_records(str(p), Stats(), columns=["left", "right"])) == [
        {"left": "x", "right": "y"}, {"left": "z", "right": "w"}]


def test_load_wrong_column_count_is_a_located_error(tmp_path):
    p = tmp_path / "bad_dev.csv"
    p.write_text("q,a,b,c,d,A\nonly,three,cols\n")
    with pytest.raises(RecordError) as e:
        list(load_records(str(p), Stats(), fmt="mmlu-csv"))
    assert e.value.line == 2 and "expected 6 columns" in e.value.reason
    stats = Stats()
    assert len(list(load_records(str(p), stats, fmt="mmlu-csv", skip_invalid=True))) == 1
    assert sum(stats.invalid.values()) == 1


def test_load_missing_local_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError):
        local_files(str(tmp_path / "nope.jsonl"), "auto")
    assert local_files("allenai/ai2_arc", "auto") is None  # a hub name: not local


def test_split_is_deterministic_complementary_and_grouped_by_key():
    recs = [{"prompt": f"question {i // 3}", "chosen": str(i)} for i in range(600)]

    def part(name, seed=0, **kw):
        s = Splitter(0.2, name, seed, **kw)
        out = []
        for r in recs:
            try:
                out.append(s(r))
            except Skip:
                pass
        return out

    train, test = part("train"), part("test")
    assert len(train) + len(test) == 600
    assert {r["chosen"] for r in train}.isdisjoint({r["chosen"] for r in test})
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in test})  # a question on one side only
    assert 0.12 < len(test) / 600 < 0.28
    assert part("test") == test and part("test", seed=1) != test
    assert part("test", key="chosen") != test


def test_split_key_lookup():
    assert key_value({"question": "q"}, None) == "q"
    assert key_value({"prompt": [{"role": "user", "content": "hi"}]}, None).startswith("[{")
    assert key_value({"a": {"b": "x"}}, "a.b") == "x"
    with pytest.raises(RecordError) as e:
        key_value({"other": 1}, None)
    assert e.value.field == "prompt"
    with pytest.raises(UsageError):
        Splitter(1.5, "test")
