"""The I/O core: formats, streaming, error locations, skip counting."""

import gzip
import json

import pytest

from probllm.io import RecordError, Skip, Stats, map_records, read_records, require, write_records


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_reads_jsonl_gz_json_array_object_and_folders(tmp_path):
    a = _write(tmp_path / "a.jsonl", '{"x": 1}\n\n{"x": 2, "extra": [1]}\n')
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write('{"x": 3}\n')
    arr = _write(tmp_path / "c.json", '[{"x": 4}, {"x": 5}]')
    sub = tmp_path / "math" / "algebra"
    sub.mkdir(parents=True)
    _write(sub / "1.json", '{"x": 6}')
    stats = Stats()
    recs = list(read_records([a, str(gz), arr, str(tmp_path / "math")], stats))
    assert [r["x"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[1]["extra"] == [1]
    assert (recs[1].source, recs[1].line) == (a, 3)
    assert stats.read == 6


def test_bad_json_names_file_and_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", '{"x": 1}\n{"x": \n')
    with pytest.raises(RecordError) as e:
        list(read_records([p]))
    assert str(e.value).startswith(f"{p}:2:") and "invalid JSON" in str(e.value)


def test_skip_invalid_goes_on_and_counts(tmp_path):
    p = _write(tmp_path / "bad.jsonl", '{"x": 1}\n{"x": \n[1, 2]\n{"x": 4}\n')
    stats = Stats()
    assert [r["x"] for r in read_records([p], stats, skip_invalid=True)] == [1, 4]
    assert sum(stats.invalid.values()) == 2 and stats.read == 4


def test_binary_file_is_a_clear_error_even_with_skip_invalid(tmp_path):
    p = tmp_path / "blob.jsonl"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(RecordError, match="binary"):
        list(read_records([str(p)], skip_invalid=True))


def test_empty_input_is_an_error_unless_allowed(tmp_path):
    p = _write(tmp_path / "empty.jsonl", "\n")
    with pytest.raises(RecordError, match="empty input"):
        list(read_records([p]))
    assert list(read_records([p], allow_empty=True)) == []


def test_require_names_field_and_type():
    with pytest.raises(RecordError) as e:
        require({"question": 3}, "question")
    assert e.value.field == "question" and "expected a string, got a number" in e.value.reason
    with pytest.raises(RecordError, match="missing"):
        require({"q": {}}, "q.stem")
    assert require({"q": {"stem": "s"}}, "q.stem") == "s"
    assert require({"n": 3}, "n", float) == 3


def test_map_records_locates_errors_and_counts_skips(tmp_path):
    p = _write(tmp_path / "in.jsonl", '{"v": 1}\n{"v": "x"}\n{"v": 0}\n')

    def fn(r):
        if require(r, "v", int) == 0:
            raise Skip("zero")
        return {**r, "double": r["v"] * 2}

    stats = Stats(command="t")
    with pytest.raises(RecordError) as e:
        list(map_records(read_records([p], stats), fn, stats))
    assert str(e.value).startswith(f"{p}:2: field 'v':")
    stats = Stats(command="t")
    out = list(map_records(read_records([p], stats), fn, stats, skip_invalid=True))
    assert out == [{"v": 1, "double": 2}]
    assert stats.skipped["zero"] == 1 and sum(stats.invalid.values()) == 1
    assert "3 in" in stats.summary() and "1 skipped (zero: 1)" in stats.summary()


def test_write_records_keeps_unicode_and_counts(capsys):
    stats = Stats()
    write_records([{"q": "énergie ∆"}], stats)
    assert json.loads(capsys.readouterr().out) == {"q": "énergie ∆"}
    assert stats.written == 1


def test_cli_errors_are_one_line_without_traceback(cli, tmp_path):
    run = cli("--version")
    assert run.code == 0 and "probllm" in run.stdout


def test_adapter_for_another_model_is_a_usage_error(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from probllm.io import UsageError
    from probllm.models import load_model

    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    peft = get_peft_model(other, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    peft.save_pretrained(tmp_path / "adapter")
    with pytest.raises(UsageError, match="does not fit this model"):
        load_model(tiny_model_dir, adapter=str(tmp_path / "adapter"))
