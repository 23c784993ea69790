"""`kto` on unpaired thumbs-up/down records (what `feedback export --kind ratings` writes): real KTOTrainer steps
on the tiny model through the CLI wiring, the adapter and metrics it writes, the curves `plot` draws from them, and
the record checks."""

from __future__ import annotations

import json
import pytest

from probllm.io import RecordError
from probllm.train.pairs import normalize_unpaired

# TRL's unpaired preference form, in both shapes the export writes: message lists and strings.
RATINGS = [
    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
     "completion": [{"role": "assistant", "content": "The answer is 5."}], "label": True, "id": "r1"},
    {"prompt": [{"role": "user", "content": "What is 4 + 4?"}],
     "completion": [{"role": "assistant", "content": "I think it is 9 or so."}], "label": False, "id": "r2"},
    {"prompt": "What is 1 + 6?", "completion": "The answer is 7.", "label": True, "id": "r3"},
    {"prompt": "What is 3 + 3?", "completion": "Maybe 5, maybe not.", "label": False, "id": "r4"},
]


def test_kto_trains_on_ratings_and_writes_adapter_metrics_curves_and_tensorboard(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from probllm.cli import app
    from probllm.train.plot import plot_runs

    data = tmp_path / "ratings.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RATINGS))
    out = tmp_path / "kto"
    result = CliRunner().invoke(app, ["kto", str(data), "--model", tiny_model_dir, "-o", str(out), "--max-steps",
                                      "2", "--batch-size", "2", "--logging-steps", "1", "--no-bf16", "--max-length",
                                      "64", "--lr", "1e-2", "--report-to", "tensorboard"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip())
    assert summary["method"] == "kto" and summary["examples"] == 4 and summary["steps"] == 2
    assert (summary["desirable"], summary["undesirable"]) == (2, 2)
    assert "4 in, 1 out" in result.stderr and "desirable: 2, undesirable: 2" in result.stderr
    assert "step 2/2" in result.stderr
    adapter = out / "adapter_model.safetensors"
    assert adapter.stat().st_size > 0 and not list(out.glob("*.bin"))
    from safetensors.torch import load_file

    assert all("lora_" in key for key in load_file(str(adapter)))  # the adapter alone, no base weights
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for key in ("kl", "learning_rate", "samples_per_second"):
        assert all(key in m for m in steps), key
    # Rewards are logged per label present in the step's batch (the records are shuffled, seeded, into batches).
    assert {"rewards/chosen", "rewards/rejected"} <= {k for m in steps for k in m}
    # The adapter starts at zero: policy = reference, so the first loss is KTO's 1 - sigmoid(0) = 0.5 per answer.
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-4) and steps[1]["loss"] != steps[0]["loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "kto" and config["lora_r"] == 8 and config["trl"]["beta"] == 0.1
    # --report-to tensorboard: TRL's logs also went to TensorBoard events in OUTPUT/tensorboard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tb_loss = events.Scalars("train/loss")
    assert [e.step for e in tb_loss] == [1, 2] and tb_loss[1].value == pytest.approx(steps[1]["loss"], rel=1e-5)
    pngs = plot_runs([str(out)], tmp_path / "plots")
    assert len(pngs) == 17
    index = (tmp_path / "plots" / "index.md").read_text()
    assert "## train/loss\n" in index and "## train/rewards/chosen\n" in index  # drawn, not "(no data)"


def test_unpaired_records_forms_and_errors():
    convo = normalize_unpaired(RATINGS[0])
    assert convo["form"] == "conversational" and convo["label"] is True
    hybrid = normalize_unpaired({"prompt": "q?", "completion": [{"role": "assistant", "content": "a"}],
                                 "label": False})
    assert hybrid["prompt"] == [{"role": "user", "content": "q?"}]
    assert normalize_unpaired(RATINGS[2])["form"] == "string"
    for bad, field in [({"prompt": "q", "completion": "a", "label": "yes"}, "label"),
                       ({"prompt": "q", "completion": "a", "label": 1}, "label"),
                       ({"prompt": "q", "completion": "a"}, "label"),
                       ({"prompt": "q", "completion": " ", "label": True}, "completion"),
                       ({"prompt": ["q"], "completion": [], "label": True}, "completion"),
                       ({"prompt": 3, "completion": "a", "label": True}, "prompt")]:
        with pytest.raises(RecordError) as e:
            normalize_unpaired(bad)
        assert e.value.field == field, bad


def test_kto_refuses_a_batch_of_one_and_names_a_bad_record(cli, tiny_model_dir, tmp_path):
    from probllm.io import Stats, read_records
    from probllm.train import kto

    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps(RATINGS[2]) + "\n")
    run = cli("kto", str(data), "--batch-size", "1", "-o", str(tmp_path / "o"))
    assert run.code == 2 and "--batch-size must be at least 2 for kto" in run.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RATINGS[2]) + "\n" + json.dumps({**RATINGS[3], "label": "no"}) + "\n")
    stats = Stats(command="probllm kto")
    settings = kto.resolve_settings(model=tiny_model_dir, max_steps=1, batch_size=2)
    with pytest.raises(RecordError) as e:
        kto.train(read_records([str(bad)], stats), settings, tmp_path / "o2", stats)
    assert str(e.value).startswith(f"{bad}:2: field 'label': expected a boolean")
    assert not (tmp_path / "o2" / "adapter_model.safetensors").exists()


def test_report_to_a_missing_package_says_what_to_install(tmp_path):
    import importlib.util

    from probllm.io import UsageError
    from probllm.train import kto

    if importlib.util.find_spec("trackio") is not None:
        pytest.skip("trackio is installed here")
    with pytest.raises(UsageError) as e:
        kto.resolve_settings(report_to="trackio")
    assert str(e.value) == "--report-to trackio needs the trackio package: pip install trackio"
    assert kto.resolve_settings().report_to == "none"
