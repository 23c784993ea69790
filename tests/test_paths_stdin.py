"""Issue 14 items 1 and 3: every path argument takes files, folders, `~`, globs (relative or absolute, quoted or
expanded by the shell), `.gz` and `-`; stdin accepts what files accept (JSON arrays, gzip, a BOM), detected from
the bytes; a path that names nothing is a one-line error."""

import gzip
import json

import pytest

from probllm.io import UsageError, expand_paths, read_records


def _jsonl(path, *values):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"x": v}) + "\n" for v in values), encoding="utf-8")
    return path


def test_expand_paths_globs_home_folders_and_errors(tmp_path, monkeypatch):
    _jsonl(tmp_path / "fold" / "a.jsonl", 1)
    _jsonl(tmp_path / "fold" / "b.jsonl", 2)
    _jsonl(tmp_path / "fold" / "sub" / "c.jsonl", 3)
    (tmp_path / "fold" / "notes.txt").write_text("not records")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert list(expand_paths(["fold/*.jsonl"])) == ["fold/a.jsonl", "fold/b.jsonl"]
    assert list(expand_paths([f"{tmp_path}/fold/*.jsonl"])) == [f"{tmp_path}/fold/a.jsonl",
                                                                 f"{tmp_path}/fold/b.jsonl"]
    assert list(expand_paths(["fold/**/c.jsonl"])) == ["fold/sub/c.jsonl"]
    assert list(expand_paths(["~/fold/a.jsonl"])) == [f"{tmp_path}/fold/a.jsonl"]
    assert list(expand_paths(["fold"])) == ["fold/a.jsonl", "fold/b.jsonl", "fold/sub/c.jsonl"]
    assert list(expand_paths(["-"])) == ["-"]
    with pytest.raises(UsageError, match=r"^fold/\*\.csv: no file matches$"):
        list(expand_paths(["fold/*.csv"]))
    with pytest.raises(UsageError, match="nope.jsonl: no such file or folder"):
        list(expand_paths(["nope.jsonl"]))


def test_bom_file_and_bom_gzip_and_json_array_files(tmp_path):
    bom = tmp_path / "excel.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"x": 1}\n{"x": 2}\n')
    gz = tmp_path / "data.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\xef\xbb\xbf" + b'{"x": 3}\n'))
    arr = tmp_path / "arr.json"
    arr.write_bytes(b"\xef\xbb\xbf" + b'[{"x": 4}]')
    recs = list(read_records([str(bom), str(gz), str(arr)]))
    assert [r["x"] for r in recs] == [1, 2, 3, 4]
    assert (recs[1].source, recs[1].line) == (str(bom), 2)


STDIN_FORMS = {
    "jsonl": b'{"x": 1}\n{"x": 2}\n',
    "bom": b'\xef\xbb\xbf{"x": 1}\n{"x": 2}\n',
    "array": b'  \n[{"x": 1},\n {"x": 2}]\n',
    "gzip": gzip.compress(b'{"x": 1}\n{"x": 2}\n'),
    "gzip-bom-array": gzip.compress(b'\xef\xbb\xbf[{"x": 1}, {"x": 2}]'),
}


@pytest.mark.parametrize("form", sorted(STDIN_FORMS))
def test_stdin_accepts_what_files_accept(cli, tmp_path, form):
    data = STDIN_FORMS[form]
    piped = cli("split", "--test-fraction", "0", "--key", "x", input=data)
    assert piped.code == 0, piped.stderr
    assert [r["x"] for r in piped.records] == [1, 2]
    name = tmp_path / {"array": "in.json", "gzip": "in.jsonl.gz", "gzip-bom-array": "in.json.gz"}.get(form, "in.jsonl")
    name.write_bytes(data)
    named = cli("split", "--test-fraction", "0", "--key", "x", str(name))
    assert named.code == 0, named.stderr
    assert named.records == piped.records
    dash = cli("split", "--test-fraction", "0", "--key", "x", "-", input=data)
    assert dash.records == piped.records


def test_quoted_globs_work_in_every_reading_command(cli, tmp_path):
    fold = tmp_path / "fold"
    fold.mkdir()
    for i, name in enumerate(["a", "b"]):
        (fold / f"{name}.jsonl").write_text(json.dumps(
            {"question": f"What is {i} + 1?", "answer": f"It is {i + 1}. #### {i + 1}"}) + "\n")
    mcq = cli("mcqify", "--source", "gsm8k", f"{fold}/*.jsonl")
    assert mcq.code == 0, mcq.stderr
    assert len(mcq.records) == 2
    rel = cli("mcqify", "--source", "gsm8k", "fold/*.jsonl")  # relative to the cwd of the test runner
    assert rel.code == 2 and "probllm mcqify: error: fold/*.jsonl: no file matches\n" in rel.stderr


def test_load_takes_several_sources_and_absolute_globs(cli, tmp_path):
    _jsonl(tmp_path / "one.jsonl", 1, 2)
    _jsonl(tmp_path / "two.jsonl", 3)
    glob = cli("load", f"{tmp_path}/*.jsonl")
    assert glob.code == 0, glob.stderr
    assert [r["x"] for r in glob.records] == [1, 2, 3]
    shell_expanded = cli("load", str(tmp_path / "one.jsonl"), str(tmp_path / "two.jsonl"), "--limit", "2")
    assert shell_expanded.code == 0, shell_expanded.stderr
    assert [r["x"] for r in shell_expanded.records] == [1, 2]
    missing = cli("load", f"{tmp_path}/*.csv")
    assert missing.code == 2 and "Traceback" not in missing.stderr
    assert "*.csv: no file matches\n" in missing.stderr


def test_index_takes_a_quoted_glob_of_notes(cli, tmp_path):
    notes = tmp_path / "notes" / "week1"
    notes.mkdir(parents=True)
    (notes / "heaps.md").write_text("# Heaps\n\nHeapsort runs in O(n log n) time in the worst case.\n")
    (notes / "graphs.md").write_text("# Graphs\n\nBreadth-first search visits nodes level by level.\n")
    run = cli("index", f"{tmp_path}/notes/*/*.md", "-o", str(tmp_path / "g.idx"))
    assert run.code == 0, run.stderr
    assert "2 in" in run.stderr


def test_notes_with_a_bom_read_like_notes_without(tmp_path):
    from probllm.io import Stats
    from probllm.rag.index import iter_documents

    text = "---\ntitle: Heaps\n---\n# Heaps\n\nHeapsort runs in O(n log n).\n"
    (tmp_path / "plain.md").write_text(text, encoding="utf-8")
    (tmp_path / "bom.md").write_bytes(b"\xef\xbb\xbf" + text.encode())
    docs = {d.source.rsplit("/", 1)[-1]: d.text for d in iter_documents([str(tmp_path / "*.md")], Stats())}
    assert docs["bom.md"] == docs["plain.md"] == text
