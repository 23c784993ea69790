"""Issue 14 items 2, 5, 6, 8 and 9: what a new user trips on, each reproduced through the real CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, read_jsonl_text


def run_watching_imports(args: list[str], cwd: Path, stdin: bytes = b"") -> tuple[int, str, dict]:
    """Run `probllm ARGS` in a fresh interpreter and report which heavy libraries it imported: "no model was
    loaded" without timing anything (a model load needs torch; an embedder needs sentence_transformers)."""
    report = cwd / "imports.json"
    script = textwrap.dedent(f"""
        import atexit, json, sys
        def report():
            mods = {{m: m in sys.modules for m in ("torch", "transformers", "trl", "sentence_transformers")}}
            open({str(report)!r}, "w").write(json.dumps(mods))
        atexit.register(report)
        sys.argv = ["probllm", *{args!r}]
        from probllm.cli import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, input=stdin, capture_output=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc.returncode, proc.stderr.decode(), json.loads(report.read_text())


# ------------------------------------------------------------------------------------------- 2. ask -> judge


def test_ask_writes_the_reference_judge_reads(cli, tiny_model_dir, tmp_path):
    """`ask` keeps an MCQ's gold answer as `reference`, so `judge` grades reference-guided without flags."""
    answers = cli("ask", "-i", "examples/questions.jsonl", "--limit", "2", "--model", tiny_model_dir,
                  "--max-new-tokens", "4")
    assert answers.code == 0, answers.stderr
    assert [r["reference"] for r in answers.records] == ["B", "C"]
    (tmp_path / "a.jsonl").write_text(answers.stdout)
    (tmp_path / "b.jsonl").write_text(answers.stdout)
    verdicts = cli("judge", "--a", str(tmp_path / "a.jsonl"), "--b", str(tmp_path / "b.jsonl"), "--model",
                   tiny_model_dir, "--verdict-from", "likelihood", "--no-cache")
    assert verdicts.code == 0, verdicts.stderr
    assert [v["reference_guided"] for v in verdicts.records] == [True, True]


# ------------------------------------------------------------------------------------------------- 5. index


def test_failed_index_leaves_no_folder(cli, tmp_path):
    run = cli("index", str(tmp_path / "nope"), "-o", str(tmp_path / "nope.idx"))
    assert run.code == 2 and "no such file or folder" in run.stderr
    assert not (tmp_path / "nope.idx").exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    run = cli("index", str(notes), "-o", str(tmp_path / "bad.idx"))
    assert run.code == 65 and "bad.jsonl:2" in run.stderr
    assert not (tmp_path / "bad.idx").exists()


def test_interrupted_index_says_so_once_and_leaves_no_empty_folder(tmp_path, capsys):
    from probllm.cli.app import command
    from probllm.rag.index import build_index

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("# A\n\nHeaps are trees.\n")

    def ctrl_c(stage):
        if stage == "files-written":
            raise KeyboardInterrupt

    with pytest.raises(BaseException) as exit_info:
        with command("index") as stats:
            build_index([str(notes)], str(tmp_path / "n.idx"), stats, hook=ctrl_c)
    assert getattr(exit_info.value, "exit_code", None) == 130
    err = capsys.readouterr().err
    assert err.count("interrupted") == 1, err
    assert not (tmp_path / "n.idx").exists()


# ------------------------------------------------------------------------------------------ 6. one vocabulary


def test_old_spellings_still_work_but_are_not_shown(cli, tmp_path):
    qa = '{"id": 1, "question": "Why is the sky blue?", "answer": "Rayleigh scattering of sunlight by air."}\n'
    new = cli("corrupt", "--backend", "rules", "--ops-per-record", "1", "--max-new-tokens", "8", input=qa)
    old = cli("corrupt", "--backend", "rules", "--k", "1", "--max-tokens", "8", input=qa)
    assert new.code == old.code == 0, old.stderr
    assert new.records == old.records
    for command, old_flag, new_flag in [("dpo", "--out", "--output"), ("plot", "--out", "--output"),
                                        ("index", "--out", "--output"), ("corrupt", "--max-tokens",
                                                                         "--max-new-tokens"),
                                        ("corrupt", "--k ", "--ops-per-record"), ("ask", "--field",
                                                                                  "--question-field"),
                                        ("retrieve", "--field", "--question-field")]:
        help_text = cli(command, "--help", env={"COLUMNS": "200"}).stdout
        assert new_flag in help_text and old_flag not in help_text.replace(new_flag, ""), (command, old_flag)


READERS = ["pair-annotated", "pair-stackexchange", "mcqify", "split", "corrupt", "judge", "dpo", "reward-eval",
           "eval", "retrieve", "ask", "load"]


@pytest.mark.parametrize("command", READERS)
def test_every_command_that_reads_records_takes_limit_and_input(cli, command):
    help_text = cli(command, "--help", env={"COLUMNS": "200"}).stdout
    assert "--limit" in help_text
    assert "-i" in help_text  # -i/--input, as an option or as another name of the positional files


def test_input_option_and_limit_in_a_positional_command(cli):
    run = cli("split", "--test-fraction", "0", "-i", "examples/qa.jsonl", "--input=examples/qa.jsonl", "--limit",
              "3", "--key", "id")
    assert run.code == 0, run.stderr
    assert [r["id"] for r in run.records] == ["qa-01", "qa-02", "qa-03"]


def test_bad_choice_is_rejected_before_the_command_starts(cli):
    run = cli("split", "--part", "validation", input='{"id": 1}\n')
    assert run.code == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "validation" in run.stderr


def test_judge_b_takes_several_files_like_a(tmp_path):
    from probllm.judge import JudgeOptions, judge_input
    from probllm.io import Stats

    for name, rows in {"a": [1, 2], "b1": [1], "b2": [2]}.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": i, "question": f"q{i}", "answer": f"{name}{i}"}) + "\n" for i in rows))
    records = list(judge_input([str(tmp_path / "a.jsonl")], [str(tmp_path / "b1.jsonl"), str(tmp_path / "b2.jsonl")],
                               None, JudgeOptions(), Stats(), False))
    assert [(r["answer_a"], r["answer_b"]) for r in records] == [("a1", "b11"), ("a2", "b22")]


# ------------------------------------------------------------------------------------------------- 8. noise


def test_local_looking_model_path_that_does_not_exist(cli, tmp_path):
    (tmp_path / "runs").mkdir()
    code, err, _ = run_watching_imports(["eval", "--model", "runs/nope", "x.jsonl"], tmp_path)
    (tmp_path / "x.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": "A"}\n')
    code, err, _ = run_watching_imports(["eval", "--model", "runs/nope", "x.jsonl"], tmp_path)
    assert code == 2 and "--model runs/nope: no such folder" in err, err


def test_dpo_scales_the_default_warmup_for_short_runs(capsys):
    from probllm.train.dpo import resolve_settings

    assert resolve_settings(max_steps=30).warmup_steps == 1
    assert "warmup scaled" in capsys.readouterr().err
    assert resolve_settings(max_steps=30, warmup_steps=50).warmup_steps == 50
    assert "never reaches" in capsys.readouterr().err
    assert resolve_settings().warmup_steps == 100


def test_quantize_output_modes_overwrite_refusal_and_quiet_load(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "q8"
    old_umask = os.umask(0o022)
    try:
        run = cli("quantize", "--method", "torch-int8", "--model", tiny_model_dir, "-o", str(out), "--no-measure")
    finally:
        os.umask(old_umask)
    assert run.code == 0, run.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}
    again = cli("quantize", "--method", "torch-int8", "--model", tiny_model_dir, "-o", str(out), "--no-measure")
    assert again.code == 2 and "--overwrite" in again.stderr
    forced = cli("quantize", "--method", "torch-int8", "--model", tiny_model_dir, "-o", str(out), "--no-measure",
                 "--force")
    assert forced.code == 0, forced.stderr
    import warnings

    from probllm.models import load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(str(out), device="cpu")
    assert not [w for w in caught if "deprecat" in str(w.message).lower()], [str(w.message) for w in caught]


# ----------------------------------------------------------------------------------- 9. check first, load later


def test_dpo_refusal_loads_nothing(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    code, err, imported = run_watching_imports(["dpo", str(ROOT / "examples" / "annotated.jsonl"), "-o", str(out)],
                                               tmp_path)
    assert code == 2 and "--resume" in err
    assert not imported["torch"] and not imported["trl"], imported


def test_ask_rerun_with_everything_answered_loads_no_model(tmp_path):
    done = tmp_path / "answers.jsonl"
    done.write_text("".join(json.dumps({"id": f"q{i}", "answer": "x"}) + "\n" for i in range(1, 5)))
    code, err, imported = run_watching_imports(
        ["ask", "-i", str(ROOT / "examples" / "questions.jsonl"), "-o", str(done), "--index", "nowhere.idx"],
        tmp_path)
    assert code == 0, err
    assert "nothing to do" in err and "4 skipped" in err
    assert not imported["torch"], imported


def test_noop_reindex_loads_no_embedder(cli, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("# Heaps\n\nHeapsort runs in O(n log n) time.\n")
    first = cli("index", str(notes), "-o", str(tmp_path / "n.idx"))
    assert first.code == 0, first.stderr
    code, err, imported = run_watching_imports(["index", str(notes), "-o", str(tmp_path / "n.idx")], tmp_path)
    assert code == 0, err
    assert "unchanged: 1" in err and "added: 0" in err
    assert not imported["sentence_transformers"] and not imported["torch"], imported
    (notes / "b.md").write_text("# Graphs\n\nBFS visits nodes level by level.\n")
    changed = cli("index", str(notes), "-o", str(tmp_path / "n.idx"))
    assert changed.code == 0 and "added: 1" in changed.stderr, changed.stderr


# ------------------------------------------------------------------------------- issue 13.3: options as data


def test_option_groups_take_a_config_file(cli, tmp_path):
    qa = ROOT / "examples" / "qa.jsonl"
    flags = cli("corrupt", "--backend", "rules", "--ops-per-record", "1", "--limit", "3", str(qa))
    config = tmp_path / "corrupt.yaml"
    config.write_text("backend: rules\nops-per-record: 1\nlimit: 3\n")
    from_file = cli("corrupt", "--config", str(config), str(qa))
    assert flags.code == from_file.code == 0, from_file.stderr
    assert from_file.records == flags.records and len(flags.records) == 3
    config.write_text("backend: openai\nops_per_record: 1\nlimit: 3\n")
    flag_wins = cli("corrupt", "--config", str(config), "--backend", "rules", str(qa))
    assert flag_wins.code == 0 and flag_wins.records == flags.records, flag_wins.stderr
    for text, needle in [("bogus: 1\n", "unknown option 'bogus'"), ("backend: nope\n", "'nope'"),
                         ("concurrency: 0\n", "concurrency"), ("- a list\n", "expected a mapping"),
                         ("a: [\n", "not valid YAML")]:
        config.write_text(text)
        bad = cli("corrupt", "--config", str(config), str(qa))
        assert bad.code == 2 and len(bad.stderr.strip().splitlines()) == 1 and needle in bad.stderr, bad.stderr
