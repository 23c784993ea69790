"""Real DPO training on the tiny 2-layer Llama: metrics move, the adapter loads back, resume matches an
uninterrupted run, reward-eval agrees with the trainer's eval, plots are drawn, the CLI and accelerate work; each
--loss preset trains with the loss it names, and --load-in-4bit trains QLoRA on CPU."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from probllm.io import Stats
from probllm.train.dpo import LOSSES, resolve_settings, train

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(max_steps=8, batch_size=4, warmup_steps=2, eval_steps=4, logging_steps=2, save_steps=4, lr=1e-2,
            max_length=64, bf16=False)


def make_pairs(n: int, seed: int, swapped: int = 0) -> list[dict]:
    """Arithmetic pairs: chosen is short and right, rejected long and wrong. The first `swapped` pairs have
    chosen and rejected exchanged, so a model that learned the pattern gets them wrong (accuracy below 1)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        good, bad = f"The answer is {a + b}.", f"I think it is {a + b + rng.randint(1, 5)} or so, maybe not."
        if i < swapped:
            good, bad = bad, good
        out.append({"prompt": f"What is {a} + {b}?", "chosen": good, "rejected": bad, "source": "test", "id": i})
    return out


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return {"train": write_jsonl(d / "train.jsonl", make_pairs(32, 0)),
            "test": write_jsonl(d / "test.jsonl", make_pairs(8, 1, swapped=3))}


def run_train(model, data, out, resume=False, **over):
    settings = resolve_settings(model=model, **{**FAST, **over})
    recs = [json.loads(line) for line in Path(data["train"]).read_text().splitlines()]
    evals = [json.loads(line) for line in Path(data["test"]).read_text().splitlines()]
    return train(iter(recs), settings, out, Stats(command="t"), eval_records=iter(evals), resume=resume,
                 overwrite=not resume)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    summary = run_train(tiny_model_dir, data, out)
    return out, summary


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_and_rewards_move_after_real_steps(trained):
    out, summary = trained
    train_logs = [m for m in read_metrics(out) if "loss" in m]
    evals = [m for m in read_metrics(out) if "eval_loss" in m]
    assert [m["step"] for m in train_logs] == [1, 2, 4, 6, 8] and [m["step"] for m in evals] == [4, 8]
    assert train_logs[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the adapter starts at zero
    assert train_logs[-1]["loss"] < train_logs[0]["loss"] - 0.05
    assert train_logs[-1]["rewards/margins"] > 0.05 and train_logs[-1]["rewards/chosen"] != 0
    for key in ("rewards/rejected", "rewards/accuracies", "learning_rate", "grad_norm", "epoch",
                "samples_per_second"):
        assert key in train_logs[-1], key
    assert evals[-1]["eval_rewards/margins"] != evals[0]["eval_rewards/margins"]
    assert summary["steps"] == 8 and summary["eval"]["eval_rewards/accuracies"] < 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["beta"] == 0.05 and config["lora_r"] == 8 and config["trl"]["learning_rate"] == 1e-2


def test_adapter_is_safetensors_and_loads_back(trained, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = trained
    assert (out / "adapter_model.safetensors").stat().st_size > 0 and not list(out.glob("*.bin"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(out))
    assert not torch.allclose(model(ids).logits, before)
    with model.disable_adapter():
        assert torch.allclose(model(ids).logits, before)


def test_resume_gives_the_uninterrupted_result(trained, tiny_model_dir, data, tmp_path):
    import torch
    from safetensors.torch import load_file

    out, summary = trained
    crashed = tmp_path / "b"
    shutil.copytree(out, crashed)
    # What a crash after the step-4 checkpoint leaves: no later checkpoint, no final adapter.
    shutil.rmtree(crashed / "checkpoints" / "checkpoint-8")
    (crashed / "adapter_model.safetensors").unlink()
    resumed = run_train(tiny_model_dir, data, crashed, resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-4")
    for key in ("loss", "rewards/margins", "rewards/chosen", "grad_norm"):
        assert resumed["last"][key] == pytest.approx(summary["last"][key], rel=1e-5, abs=1e-7), key
    assert resumed["eval"]["eval_loss"] == pytest.approx(summary["eval"]["eval_loss"], rel=1e-5)
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(crashed / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # metrics.jsonl was cut back to the checkpoint and continued: same steps as the uninterrupted run.
    assert [m["step"] for m in read_metrics(crashed)] == [m["step"] for m in read_metrics(out)]


def test_reward_eval_agrees_with_trainer_eval(trained, data):
    from probllm.train.reward import RewardScorer, reward_eval

    out, summary = trained
    stats = Stats(command="t")
    recs = [json.loads(line) for line in Path(data["test"]).read_text().splitlines()]
    scored = list(reward_eval(iter(recs), RewardScorer(adapter=str(out)), stats))
    assert [r["id"] for r in scored] == [r["id"] for r in recs] and all(r["source"] == "test" for r in scored)
    accuracy = sum(r["correct"] for r in scored) / len(scored)
    assert 0 < accuracy < 1
    assert accuracy == summary["eval"]["eval_rewards/accuracies"] == stats.notes["reward_accuracy"]
    margin = sum(r["margin"] for r in scored) / len(scored)
    assert margin == pytest.approx(summary["eval"]["eval_rewards/margins"], rel=0.02)
    assert all(r["margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"]) for r in scored)


def test_plot_writes_the_17_curves(trained, tmp_path):
    from probllm.train.plot import CURVES, plot_runs

    out, _ = trained
    pngs = plot_runs([str(out), str(out / "metrics.jsonl")], tmp_path / "plots", labels=["a", "a-again"])
    assert len(pngs) == len(CURVES) == 17
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    index = (tmp_path / "plots" / "index.md").read_text()
    assert "eval-rewards-accuracies.png" in index and "(no data)" not in index
    assert (tmp_path / "plots" / "index.html").exists()


def test_cli_pipe_contract_and_bad_input(cli, tiny_model_dir, data, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        run = cli("dpo", str(data["train"]), "--model", tiny_model_dir, "--out", str(tmp_path / "c"), "--max-steps",
                  "2", "--batch-size", "4", "--logging-steps", "1", "--no-bf16", "--max-length", "64")
    finally:
        os.umask(umask)
    assert run.code == 0, run.stderr
    # The adapter folder as the umask asks (issue 14 item 8): others can read what a run wrote.
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "c" / "adapter_model.safetensors").stat().st_mode) == 0o644
    assert len(run.records) == 1 and run.records[0]["steps"] == 2
    assert "step 2/2" in run.stderr and "32 in, 1 out" in run.stderr
    again = cli("dpo", str(data["train"]), "--model", tiny_model_dir, "--out", str(tmp_path / "c"))
    assert again.code == 2 and "--resume" in again.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": 5, "rejected": "b"}\n')
    # The records are checked before the model is looked at: a bad line is the error even with no such model.
    run = cli("dpo", str(bad), "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "d"))
    assert run.code == 65 and f"{bad}:2: field 'chosen'" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "d").exists()
    run = cli("reward-eval", str(data["test"]), "--adapter", str(tmp_path / "c"), "--summary",
              str(tmp_path / "s.json"))
    assert run.code == 0, run.stderr
    assert len(run.records) == 8 and "reward_accuracy" in json.loads((tmp_path / "s.json").read_text())
    run = cli("plot", str(tmp_path / "c"), "--out", str(tmp_path / "p"))
    assert run.code == 0 and len(list((tmp_path / "p").glob("*.png"))) == 17


def test_accelerate_two_processes(tiny_model_dir, data, tmp_path):
    # On CPU, `accelerate launch --cpu` starts one process; `--multi_gpu` without GPUs starts 2 over gloo.
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed")
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "probllm", "dpo", str(data["train"]),
         "--model", tiny_model_dir, "--out", str(out), "--max-steps", "2", "--batch-size", "2",
         "--logging-steps", "1", "--no-bf16", "--max-length", "64"],
        capture_output=True, text=True, timeout=300, cwd=str(ROOT),
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(records) == 1  # only the main process writes
    # 2 steps x 2 pairs x 2 processes = 8 of 32 pairs: a quarter epoch (one process would make it an eighth).
    assert records[0]["epochs"] == pytest.approx(0.25)
    assert (out / "adapter_model.safetensors").exists()
    assert len([m for m in read_metrics(out) if "loss" in m]) == 2


def test_reference_logps_cached_on_disk_across_hyperparameters(tiny_model_dir, data, tmp_path, monkeypatch,
                                                               trained):
    monkeypatch.setenv("PROBLLM_CACHE", str(tmp_path / "cache"))
    first = run_train(tiny_model_dir, data, tmp_path / "p1", precompute_ref=True)
    assert first["ref_cache_hits"] == {"train": False, "eval": False}
    assert len(list((tmp_path / "cache" / "ref-logps").glob("*.safetensors"))) == 2
    # Same model and tokens, other LoRA rank, learning rate and beta: the reference pass is read back.
    second = run_train(tiny_model_dir, data, tmp_path / "p2", precompute_ref=True, lora_r=4, lr=5e-3, beta=0.1)
    assert second["ref_cache_hits"] == {"train": True, "eval": True}
    # Precomputed references give the same training as references computed on the fly.
    _, plain = trained
    assert first["last"]["loss"] == pytest.approx(plain["last"]["loss"], rel=1e-4)
    assert first["eval"]["eval_rewards/margins"] == pytest.approx(plain["eval"]["eval_rewards/margins"], rel=1e-4)
    # A different max length changes the tokens seen, so it misses the cache.
    third = run_train(tiny_model_dir, data, tmp_path / "p3", precompute_ref=True, max_length=32, max_steps=2)
    assert third["ref_cache_hits"]["train"] is False


def test_ctrl_c_checkpoints_the_last_finished_step(tiny_model_dir, data, tmp_path):
    """The first Ctrl-C saves a checkpoint at the end of the running step and exits 130, so --resume (whose
    equality with an uninterrupted run is tested above) loses no finished step."""
    import signal
    import time

    out = tmp_path / "int"
    proc = subprocess.Popen(
        [sys.executable, "-m", "probllm", "dpo", str(data["train"]), "--model", tiny_model_dir, "--out", str(out),
         "--max-steps", "200", "--batch-size", "4", "--logging-steps", "1", "--save-steps", "1000",
         "--max-length", "64", "--no-bf16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert stdout == b"" and b"continue with --resume" in err
    checkpoints = list((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.split("-")[1])
    assert 2 <= step < 200 and read_metrics(out)[-1]["step"] == step


# --------------------------------------------------------------------------------------------------- loss presets

def _sigmoid(x: float) -> float:
    import math

    return 1 / (1 + math.exp(-x))


# Each preset's loss from what TRL logs for a batch of one pair: rewards r = beta * (log pi - log pi_ref) summed
# over the answer tokens, logps/chosen (summed), and the answer lengths in tokens. Written from the definitions
# in docs/train.md, not from TRL's code, so a preset that sent TRL the wrong loss type or weight fails.
PRESET_LOSS = {
    "sigmoid": lambda r_c, r_r, **_: -math.log(_sigmoid(r_c - r_r)),
    "sigmoid_norm": lambda r_c, r_r, n_c, n_r, **_: -math.log(_sigmoid(r_c / n_c - r_r / n_r)),
    "ipo": lambda r_c, r_r, n_c, n_r, beta, **_: ((r_c / n_c - r_r / n_r) / beta - 1 / (2 * beta)) ** 2,
    "rpo": lambda r_c, r_r, logp_c, n_c, alpha, **_: -math.log(_sigmoid(r_c - r_r)) + alpha * -logp_c / n_c,
    "apo_zero": lambda r_c, r_r, **_: 1 - _sigmoid(r_c) + _sigmoid(r_r),
    "hinge": lambda r_c, r_r, **_: max(0.0, 1 - (r_c - r_r)),
}
ONE_PAIR = {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "I think it is 7 or so, maybe not."}


def _answer_tokens(model_dir: str, prompt: str, answer: str) -> int:
    """Answer length in tokens as the trainer counts it: what the chat template adds after the prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True,
                                   return_dict=True)["input_ids"]
    assert full[:len(head)] == head
    return len(full) - len(head)


def test_every_loss_preset_has_its_formula_here():
    assert set(PRESET_LOSS) == set(LOSSES) == {"sigmoid", "sigmoid_norm", "ipo", "rpo", "apo_zero", "hinge"}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_loss_preset_trains_with_the_loss_it_names(loss, tiny_model_dir, tmp_path):
    beta, alpha = 0.5, 0.5
    over = {"rpo_alpha": alpha} if loss == "rpo" else {}
    settings = resolve_settings(model=tiny_model_dir, loss=loss, beta=beta, max_steps=2, batch_size=1,
                                logging_steps=1, lr=1e-2, max_length=64, bf16=False, **over)
    train(iter([dict(ONE_PAIR)]), settings, tmp_path, Stats(command="t"))
    steps = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    n_c = _answer_tokens(tiny_model_dir, ONE_PAIR["prompt"], ONE_PAIR["chosen"])
    n_r = _answer_tokens(tiny_model_dir, ONE_PAIR["prompt"], ONE_PAIR["rejected"])
    assert steps[1]["rewards/margins"] > 0.05  # the second step sees a moved policy: the formulas are not at 0
    for m in steps:
        expected = PRESET_LOSS[loss](r_c=m["rewards/chosen"], r_r=m["rewards/rejected"], logp_c=m["logps/chosen"],
                                     n_c=n_c, n_r=n_r, beta=beta, alpha=alpha)
        assert m["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6), (loss, m["step"])
    trl = json.loads((tmp_path / "config.json").read_text())
    assert trl["loss"] == loss and trl["trl"]["loss_type"] == list(LOSSES[loss].losses)
    assert trl["trl"]["loss_weights"] == ([1.0, alpha] if loss == "rpo" else [1.0])


def test_loss_settings_old_spelling_and_rpo_alpha_checks(cli, tmp_path):
    from probllm.io import UsageError

    cfg = tmp_path / "old.yaml"
    cfg.write_text("loss_type: ipo\n")  # the raw TRL string of earlier versions, when it names a preset
    assert resolve_settings(str(cfg)).loss == "ipo"
    with pytest.raises(UsageError, match="--rpo-alpha weighs the NLL term of --loss rpo"):
        resolve_settings(rpo_alpha=0.3)
    cfg.write_text("loss: dpo_plus\n")
    with pytest.raises(UsageError, match="--loss dpo_plus: choose one of sigmoid, sigmoid_norm, ipo, rpo"):
        resolve_settings(str(cfg))
    run = cli("dpo", "x.jsonl", "--loss-type", "robust", "--output", str(tmp_path / "o"))
    assert run.code == 2 and "--loss" in run.stderr and "robust" in run.stderr and "Traceback" not in run.stderr


# ------------------------------------------------------------------------------------------------ QLoRA (4-bit)

def test_load_in_4bit_trains_qlora_on_cpu_and_saves_the_adapter_alone(tiny_model_dir, tmp_path):
    """bitsandbytes 0.50 quantizes to NF4 and trains through its 4-bit layers on CPU (tried: it does), so
    --load-in-4bit runs here as on a GPU, only slower."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    settings = resolve_settings(model=tiny_model_dir, load_in_4bit=True, max_steps=2, batch_size=2, logging_steps=1,
                                lr=1e-2, max_length=64, bf16=False)
    summary = train(iter(make_pairs(4, 0)), settings, tmp_path, Stats(command="t"))
    assert summary["steps"] == 2
    q = summary["base_quantization"]
    assert q["load_in_4bit"] and q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"]
    steps = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and steps[1]["rewards/margins"] != 0
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)  # the adapter alone: no (quantized) base weights
    # It fits the full-precision base it was trained on (quantized), as any dpo adapter does.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    assert not torch.allclose(PeftModel.from_pretrained(base, str(tmp_path))(ids).logits, before)
    assert json.loads((tmp_path / "config.json").read_text())["load_in_4bit"] is True


def test_config_records_the_data_files_and_their_hashes(tmp_path):
    """What `export` quotes in a model card: every input file of the run with its sha256 (stdin as '-')."""
    import hashlib

    from probllm.train.run import data_files

    (tmp_path / "train.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "test.jsonl").write_text('{"prompt": "q", "chosen": "c", "rejected": "d"}\n')
    entries = data_files([str(tmp_path / "train.jsonl")], [str(tmp_path / "test.jsonl")])
    assert [(e["part"], Path(e["file"]).name) for e in entries] == [("train", "train.jsonl"), ("eval", "test.jsonl")]
    assert entries[0]["sha256"] == hashlib.sha256((tmp_path / "train.jsonl").read_bytes()).hexdigest()
    assert data_files(None) == [{"part": "train", "file": "-", "sha256": None}]
