"""`probllm export`: the model `dpo` trained, in the engines people run it with.

| format | writes | run it with |
| --- | --- | --- |
| merged | a transformers folder, the LoRA adapter merged in (safetensors, tokenizer, chat template, generation config, a README.md model card with provenance) | transformers, vLLM, TGI, `probllm --model DIR` |
| gguf | one GGUF file (f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1), laid out as llama.cpp's own converter writes it | llama.cpp, llama-cpp-python, LM Studio |
| ollama | a folder with the GGUF and a Modelfile (chat template as an Ollama template, stop tokens, system prompt, parameters) | `ollama create NAME -f DIR/Modelfile` |
| vllm | DIR/serve.sh: the `vllm serve` command (base + `--enable-lora` for an adapter, plain for a merged folder) | vLLM |

Each format is one function in `FORMATS`; the CLI (probllm/cli/export.py) only wires options to `run_export`.
"""

from __future__ import annotations

# GGUF quantization types we write, by their `--quant` name: the gguf package's GGMLQuantizationType and
# LlamaFileType member names (looked up when the gguf package is imported, not at CLI start-up), and bits per
# weight of the 2-D tensors (a 32-weight block of q4_0 holds 16 bytes of nibbles and one f16 scale: 4.5 bits).
GGUF_QUANTS = {
    "f16": {"tensor_type": "F16", "file_type": "MOSTLY_F16", "bits": 16},
    "bf16": {"tensor_type": "BF16", "file_type": "MOSTLY_BF16", "bits": 16},
    "q8_0": {"tensor_type": "Q8_0", "file_type": "MOSTLY_Q8_0", "bits": 8.5},
    "q5_1": {"tensor_type": "Q5_1", "file_type": "MOSTLY_Q5_1", "bits": 6},
    "q5_0": {"tensor_type": "Q5_0", "file_type": "MOSTLY_Q5_0", "bits": 5.5},
    "q4_1": {"tensor_type": "Q4_1", "file_type": "MOSTLY_Q4_1", "bits": 5},
    "q4_0": {"tensor_type": "Q4_0", "file_type": "MOSTLY_Q4_0", "bits": 4.5},
}

EXPORT_FORMATS = ("merged", "gguf", "ollama", "vllm")


def run_export(stats, *, format: str, output: str, model: str | None = None, adapter: str | None = None,
               quant: str = "q8_0", dtype: str = "auto", eval_summary: list[str] | None = None,
               name: str | None = None, overwrite: bool = False, max_model_len: int | None = None) -> dict:
    """The `export` command: write `output` in `format`, print one record saying what was written."""
    import time

    from probllm.io import UsageError, write_records

    if format not in EXPORT_FORMATS:
        raise UsageError(f"--format {format}: choose one of {', '.join(EXPORT_FORMATS)}")
    started = time.perf_counter()
    if format == "merged":
        from probllm.export.merge import export_merged

        record = export_merged(model, adapter, output, dtype=dtype, eval_summary=eval_summary, overwrite=overwrite)
    elif format == "gguf":
        from probllm.export.gguf_file import export_gguf

        record = export_gguf(model, adapter, output, quant=quant, dtype=dtype, overwrite=overwrite)
    elif format == "ollama":
        from probllm.export.ollama import export_ollama

        record = export_ollama(model, adapter, output, quant=quant, dtype=dtype, name=name, overwrite=overwrite)
    else:
        from probllm.export.vllm import export_vllm

        record = export_vllm(model, adapter, output, name=name, max_model_len=max_model_len, overwrite=overwrite)
    record = {"format": format, **record, "export_s": round(time.perf_counter() - started, 2)}
    stats.figures["record"] = record
    write_records([record], stats)
    return record
