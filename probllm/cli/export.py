"""`probllm export`: a model (+ its LoRA adapter) for transformers, llama.cpp, Ollama or vLLM (logic in
probllm/export)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from probllm.cli.app import SummaryFile, app, command
from probllm.cli.choices import Dtype, ExportFormat, GgufQuant, value
from probllm.cli.groups import uses
from probllm.cli.options import LOCAL_MODEL

EXPORT_MODEL = LOCAL_MODEL.only("model", "adapter").replace(
    "model", help="Base model: folder, hub id or nothing for the offline SmolLM2-135M-Instruct (a float model, "
                  "not a `quantize` output).").replace(
    "adapter", help="LoRA adapter folder (a `dpo` output), merged into the base first.")


@app.command("export")
@uses(EXPORT_MODEL)
def export_command(
    local_model: dict,
    output: Annotated[Path, typer.Option("--output", "-o", help="merged, ollama, vllm: a folder; gguf: the "
                                         ".gguf file.", show_default=False)],
    format: Annotated[ExportFormat, typer.Option("--format", help="merged: transformers folder; gguf: one file "
                                                 "for llama.cpp; ollama: GGUF + Modelfile; vllm: serve.sh.")]
    = ExportFormat.merged,
    quant: Annotated[GgufQuant, typer.Option("--quant", help="gguf, ollama: weight type of the matrices (norms "
                                             "stay f32).")] = GgufQuant.q8_0,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Weights of the merge: auto keeps the base's saved "
                                         "dtype.")] = Dtype.auto,
    eval_summary: Annotated[Optional[list[str]], typer.Option("--eval-summary", help="merged: `eval --summary` "
                                                              "files quoted in the model card (repeat).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="vllm: the LoRA module's served name; ollama: "
                                                "the model name in the printed `ollama create`.")] = None,
    max_model_len: Annotated[Optional[int], typer.Option("--max-model-len", help="vllm: context length to "
                                                         "serve (default: the model's).", min=1)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export at --output.")] = False,
    summary: SummaryFile = None,
) -> None:
    """Export a model, with its LoRA adapter merged, for the engines people run: one record on stdout.

        probllm export --adapter runs/demo/dpo --format merged -o runs/merged
        probllm export --adapter runs/demo/dpo --format gguf --quant q4_0 \\
            -o runs/assistant.q4_0.gguf
        probllm export --adapter runs/demo/dpo --format ollama -o runs/ollama
        probllm export --model deepseek-ai/deepseek-math-7b-rl --adapter runs/dpo \\
            --format vllm -o runs/vllm

    GGUF files are laid out as llama.cpp's converter writes them (Llama, SmolLM2, DeepSeek-LLM and Qwen2
    architectures), converted a tensor at a time.
    """
    from probllm.export import run_export

    with command("export", summary_file=summary) as stats:
        run_export(stats, format=value(format), output=str(output), **local_model, quant=value(quant),
                   dtype=value(dtype), eval_summary=eval_summary, name=name, max_model_len=max_model_len,
                   overwrite=overwrite)
