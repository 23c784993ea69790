"""export: a merged folder equals base + adapter without PEFT; GGUF files load back in transformers' own GGUF
loader; the Ollama template renders as the chat template does; the vLLM command names the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from probllm.cli import app
from probllm.io import Stats

PROMPTS = ["Question: What is 2 + 2?\nAnswer:", "Newton's second law says force", "The derivative of x squared"]


def logits(model, tok, text=PROMPTS[0]):
    import torch

    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits[0].float()


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A LoRA adapter with non-zero B (so that it changes the model), in a `dpo`-like folder: config.json with
    settings and data files, summary.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "dpo"
    peft_model.save_pretrained(out)
    (out / "config.json").write_text(json.dumps({
        "beta": 0.05, "lr": 5e-4, "max_steps": 4, "lora_r": 4, "lora_alpha": 8, "seed": 0, "model": tiny_model_dir,
        "data": [{"file": "pairs.jsonl", "sha256": "0" * 64}]}))
    (out / "summary.json").write_text(json.dumps({"pairs": 12, "steps": 4, "train_loss": 0.69}))
    return str(out)


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


# ---------------------------------------------------------------------------------------------------- merged


def test_merged_equals_base_plus_adapter_without_peft(tiny_model_dir, adapter_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probllm.export import run_export

    summary = tmp_path / "eval.json"
    summary.write_text(json.dumps({"command": "eval", "model": "dpo", "method": "loglik",
                                   "overall": {"acc": 0.625, "acc_norm": 0.5, "items": 8}}))
    out = tmp_path / "merged"
    record = run_export(Stats(), format="merged", output=str(out), model=tiny_model_dir, adapter=adapter_dir,
                        eval_summary=[str(summary)])
    assert record["output"] == str(out) and record["dtype"] == "float32"
    files = {p.name for p in out.iterdir()}
    assert "adapter_config.json" not in files and "model.safetensors" in files
    assert {"tokenizer.json", "generation_config.json", "README.md", "probllm_export.json"} <= files

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template([{"role": "user", "content": "hi"}],
                                                                          tokenize=False)
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no PEFT involved
    assert not hasattr(merged, "peft_config")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for text in PROMPTS:
        expected = logits(with_adapter, tok, text)
        assert float((logits(merged, tok, text) - expected).abs().max()) < 1e-5
    assert float((logits(base, tok) - logits(with_adapter, tok)).abs().max()) > 1e-2  # the adapter matters

    card = (out / "README.md").read_text()
    assert "base_model:" in card and adapter_dir in card and "0.05" in card  # base, adapter, dpo beta
    assert "pairs.jsonl" in card and "0.625" in card  # data files and the eval summary
    prov = json.loads((out / "probllm_export.json").read_text())
    assert len(prov["adapter"]["sha256"]) == 64 and prov["dpo_config"]["max_steps"] == 4


def test_a_quantized_base_is_refused_with_one_line(tiny_model_dir, adapter_dir, tmp_path):
    import shutil

    quantized = tmp_path / "q"
    shutil.copytree(tiny_model_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    result = run_cli("export", "--model", str(quantized), "--adapter", adapter_dir, "-o", str(tmp_path / "m"))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if "error" in line]
    assert len(lines) == 1 and "quantized" in lines[0] and "float" in lines[0], result.output
    assert not (tmp_path / "m").exists()


def test_an_existing_folder_is_not_overwritten(tiny_model_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = run_cli("export", "--model", tiny_model_dir, "-o", str(tmp_path / "mine"))
    assert result.exit_code == 2 and "refusing to overwrite" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
