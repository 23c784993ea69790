"""quantize: every method round-trips through a folder that load_model reads, close to the float model, and
eval runs on it; an adapter is merged before quantizing."""

from __future__ import annotations

import json

import pytest

from probllm.evaluate.quantize import quantize_to_folder, weights_size
from probllm.io import UsageError
from probllm.models import QUANT_MARKER, QUANT_METHODS, load_model, load_tokenizer

PROMPT = "Question: What is 2 + 2?\nAnswer: The answer is B. Newton's second law says force"


def logits(model, tok, text=PROMPT):
    import torch

    ids = tok(text, return_tensors="pt")
    with torch.no_grad():  # not inference_mode: optimum-quanto int4 fails under it
        return model(**ids).logits[0].float()


@pytest.fixture(scope="module")
def float_logits(tiny_model_dir):
    return logits(load_model(tiny_model_dir, dtype="float32", device="cpu"), load_tokenizer(tiny_model_dir))


# Relative error bound of the quantized logits vs float (random tiny weights: a loose but failing-able bound).
TOLERANCE = {8: 0.1, 4: 0.5}


# Every method, but of the GGUF types only the two the bench compares (the others share their code path).
ROUND_TRIP = sorted(m for m in QUANT_METHODS if QUANT_METHODS[m]["library"] != "gguf") + ["gguf-q8_0", "gguf-q4_0"]


@pytest.mark.parametrize("method", ROUND_TRIP)
def test_method_round_trips_and_evaluates(method, tiny_model_dir, float_logits, tmp_path):
    from probllm.evaluate.mcqa import EvalOptions, evaluate_records
    from probllm.evaluate.scorer import local_scorer
    from probllm.evaluate.summary import Summary
    from probllm.io import Record, Stats

    folder = tmp_path / method
    meta = quantize_to_folder(tiny_model_dir, method, str(folder))
    assert meta["method"] == method and meta["bits"] == QUANT_METHODS[method]["bits"]
    assert json.loads((folder / QUANT_MARKER).read_text())["method"] == method
    files = {p.name for p in folder.iterdir()}
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files), files  # no pickle on disk
    assert any(f.endswith((".safetensors", ".gguf")) for f in files)
    model = load_model(str(folder), device="cpu")
    tok = load_tokenizer(str(folder))
    first = logits(model, tok)
    assert first.shape == float_logits.shape and bool(first.isfinite().all())
    rel = float((first - float_logits).abs().max() / float_logits.abs().max())
    assert rel < TOLERANCE[8 if meta["bits"] >= 8 else 4], rel
    if method != "torch-int8":
        assert weights_size(str(folder)) < weights_size(tiny_model_dir)
    again = logits(load_model(str(folder), device="cpu"), tok)  # loading is deterministic
    assert float((again - first).abs().max()) < 1e-3
    records = [Record({"id": "q", "question": "2 + 2 =", "choices": ["3", "4"], "answer": "B", "source": "arc-easy"})]
    preds = list(evaluate_records(records, local_scorer(model, tok), EvalOptions(), Stats(), Summary()))
    assert preds[0]["pred"] in ("A", "B") and len(preds[0]["scores"]) == 2


def test_adapter_is_merged_before_quantizing(tiny_model_dir, float_logits, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_model_dir, dtype="float32", device="cpu")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules="all-linear",
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tok = load_tokenizer(tiny_model_dir)
    peft_loaded = load_model(tiny_model_dir, adapter=str(tmp_path / "adapter"), device="cpu")
    with_adapter = logits(peft_loaded, tok)
    # eval's KV-cache scoring works through the PEFT wrapper: same scores as the merged model.
    from probllm.evaluate.mcqa import EvalOptions, evaluate_records
    from probllm.evaluate.scorer import local_scorer
    from probllm.evaluate.summary import Summary
    from probllm.io import Record, Stats

    recs = [{"id": "q", "question": "Which is a mammal?", "choices": ["shark fish", "whale"], "answer": "B"}]
    merged = load_model(tiny_model_dir, adapter=str(tmp_path / "adapter"), device="cpu", merge_adapter=True)
    s_peft, s_merged = (list(evaluate_records((Record(r) for r in recs), local_scorer(m, tok), EvalOptions(), Stats(),
                                              Summary()))[0]["scores"] for m in (peft_loaded, merged))
    assert s_peft == pytest.approx(s_merged, abs=1e-3)
    assert float((with_adapter - float_logits).abs().max()) > 0.01  # the adapter changes the model
    quantize_to_folder(tiny_model_dir, "torch-int8", str(tmp_path / "q"), adapter=str(tmp_path / "adapter"))
    q = logits(load_model(str(tmp_path / "q"), device="cpu"), tok)
    assert float((q - with_adapter).abs().max()) < float((q - float_logits).abs().max())
    # GGUF from an adapter: the merged folder carries the tokenizer the GGUF writer reads (make ablation's row
    # failed without it), and transformers' GGUF loader reads back the adapter's model, not the base.
    quantize_to_folder(tiny_model_dir, "gguf-q8_0", str(tmp_path / "g"), adapter=str(tmp_path / "adapter"))
    g = logits(load_model(str(tmp_path / "g"), device="cpu"), tok)
    assert float((g - with_adapter).abs().max()) < float((g - float_logits).abs().max())


def test_refuses_to_overwrite_a_foreign_folder(tiny_model_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UsageError):
        quantize_to_folder(tiny_model_dir, "torch-int8", str(tmp_path))
    with pytest.raises(UsageError):
        quantize_to_folder(tiny_model_dir, "gptq-3bit", str(tmp_path / "x"))


def test_gguf_folder_is_measured_by_llama_cpp_or_says_it_is_missing(tiny_model_dir, tmp_path):
    """Size always; memory and speed only from llama.cpp; accuracy from llama.cpp, else the dequantized weights."""
    from probllm.evaluate.quantize import measure
    from probllm.lm import llama_cpp

    folder = tmp_path / "gguf"
    quantize_to_folder(tiny_model_dir, "gguf-q4_0", str(folder))
    assert weights_size(str(folder)) == (folder / "model.gguf").stat().st_size
    items = tmp_path / "mcq.jsonl"
    items.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i} + 2 =", "choices": ["3", "4", "5", "6"],
                                         "answer": "B", "source": "arc-easy"}) + "\n" for i in range(3)))
    result = measure(str(folder), eval_file=str(items))
    assert result["eval_items"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    if llama_cpp.available():
        assert result["engine"].startswith("llama.cpp") and result["tokens_per_s"] > 0
    else:
        assert "not installed" in result["engine"] and result["tokens_per_s"] is None and result["rss_mb"] is None


def test_llama_cpp_scores_the_gguf_as_transformers_scores_it(tiny_model_dir, tmp_path):
    """LlamaCppLM on llama.cpp itself (llama-cpp-python, which `make bench-setup` builds; skipped where it is
    not installed) against the transformers backend on the same q8_0 weights read back dequantized."""
    pytest.importorskip("llama_cpp")
    import asyncio

    from probllm.lm.hf_backend import HFLM
    from probllm.lm.llama_cpp import LlamaCppLM, load

    folder = tmp_path / "gguf"
    quantize_to_folder(tiny_model_dir, "gguf-q8_0", str(folder))
    tok = load_tokenizer(tiny_model_dir)
    requests = [("Question: What is 2 + 2?\nAnswer:", c) for c in (" 3", " 4", " four")]
    llm = load(folder / "model.gguf", n_ctx=256)
    try:
        theirs = asyncio.run(LlamaCppLM(llm, tok).loglikelihood(requests))
    finally:
        llm.close()  # before interpreter exit: llama-cpp-python's __del__ fails once its library is unloaded
    ours = asyncio.run(HFLM.from_loaded(load_model(str(folder), dtype="float32", device="cpu"), tok)
                       .loglikelihood(requests))
    # llama.cpp multiplies q8_0 weights with 8-bit activations: close to, not equal to, the float pass.
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=2e-2) and ga == gb
    assert [a for a, _ in ours].index(max(a for a, _ in ours)) == [b for b, _ in theirs].index(max(b for b, _ in theirs))
