"""Commands of the evaluate family: `eval`, `quantize`, `report` (logic in probllm/evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from probllm.cli.app import InputFiles, SkipInvalid, SummaryFile, app, command

ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Hub id, folder (also a `quantize` output) or "
                                                 "nothing for the offline SmolLM2-135M-Instruct.")]
AdapterOpt = Annotated[Optional[str], typer.Option("--adapter", help="LoRA adapter folder (a `dpo` output).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU), float32, bfloat16 (fast on CPUs "
                                       "with AMX/AVX512-BF16 and on GPUs), float16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")]


@app.command("eval")
def eval_command(
    files: InputFiles = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    method: Annotated[str, typer.Option("--method", help="loglik (acc + acc_norm as lm-eval), letter, generate "
                                        "(chain of thought, then the number / boxed answer / letter).")] = "loglik",
    template: Annotated[str, typer.Option("--template", help="auto (lm-eval's MMLU template for MMLU items, its ARC "
                                          "template otherwise), arc, mmlu, letter.")] = "auto",
    shots: Annotated[int, typer.Option("--shots", help="Few-shot examples per question, from --dev.")] = 0,
    dev: Annotated[Optional[list[str]], typer.Option("--dev", help="MCQ records for few-shot examples: the first "
                                                     "N of the same subject (lm-eval's first_n).")] = None,
    chat_template: Annotated[bool, typer.Option("--chat-template", help="Wrap prompts in the model's chat "
                                                "template.")] = False,
    context: Annotated[Optional[str], typer.Option("--context", help="Record field with retrieved passages "
                                                   "(strings or {text,...}) to quote before the question.")] = None,
    max_passages: Annotated[int, typer.Option("--max-passages", help="Passages used from --context.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Questions per forward pass.")] = 16,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N records.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="generate: tokens per answer.")] = 256,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Append predictions to this file "
                                                   "instead of stdout, as they are scored; run again to resume "
                                                   "(items already there are skipped).")] = None,
    num_processes: Annotated[int, typer.Option("--num-processes", help="Shard the items across N processes "
                                               "(CPU threads split between them); one ordered output. "
                                               "`accelerate launch -m probllm eval` works too.")] = 1,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Score MCQ records with a causal LM: one prediction record per item on stdout, accuracy on stderr.

    Prompts reproduce lm-evaluation-harness's ARC and MMLU tasks; `loglik` reports acc and acc_norm as lm-eval
    does. Each question runs as one sequence: its prompt once, its choices packed after it.

        probllm eval --limit 50 --summary runs/base.json runs/demo/mcq.jsonl > runs/base.preds.jsonl
        probllm eval --model runs/q8 --method letter mcq.jsonl | jq -c '{id, pred, correct}'
        probllm eval --num-processes 2 -o runs/base.preds.jsonl runs/demo/mcq.jsonl   # resumable
    """
    from probllm.evaluate.mcqa import run_eval

    with command("eval", quiet_summary=False) as stats:
        run_eval(files, stats, model=model, adapter=adapter, method=method, template=template, shots=shots,
                 dev=dev, chat_template=chat_template, context_field=context, max_passages=max_passages,
                 batch_size=batch_size, limit=limit, max_new_tokens=max_new_tokens, dtype=dtype, device=device,
                 summary_file=summary, skip_invalid=skip_invalid, output=str(output) if output else None,
                 num_processes=num_processes)


@app.command("quantize")
def quantize_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the quantized model to.")],
    method: Annotated[str, typer.Option("--method", help="bnb-int8, bnb-nf4, bnb-fp4, quanto-int8, quanto-int4, "
                                        "torch-int8 (dynamic; fastest on CPU).")] = "torch-int8",
    model: ModelOpt = None,
    adapter: Annotated[Optional[str], typer.Option("--adapter", help="LoRA adapter folder, merged before "
                                                   "quantizing.")] = None,
    double_quant: Annotated[bool, typer.Option("--double-quant/--no-double-quant", help="bnb 4-bit: quantize "
                                               "the quantization constants too.")] = True,
    eval_file: Annotated[Optional[str], typer.Option("--eval", help="MCQ file: also report accuracy of the "
                                                     "quantized and the full-precision model.")] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", help="Only the first N of --eval.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size for --eval.")] = 16,
    measure: Annotated[bool, typer.Option("--measure/--no-measure", help="Measure memory and tokens/s (each "
                                          "model loaded in a fresh process).")] = True,
    summary: SummaryFile = None,
) -> None:
    """Write a quantized copy of a model (LoRA adapter merged first) that `--model FOLDER` loads everywhere.

    Prints one record: method, bits, size on disk, resident memory, tokens/s (and accuracy with --eval) next to
    the full-precision model's.

        probllm quantize --method bnb-nf4 --output runs/q4 --adapter runs/demo/dpo --eval runs/demo/mcq.jsonl
        probllm eval --model runs/q4 runs/demo/mcq.jsonl > preds.jsonl
    """
    from probllm.evaluate.quantize import run_quantize

    with command("quantize", summary_file=summary) as stats:
        run_quantize(stats, output=str(output), method=method, model=model, adapter=adapter,
                     double_quant=double_quant, eval_file=eval_file, eval_limit=eval_limit, batch_size=batch_size,
                     measure=measure)


@app.command("report")
def report_command(
    summaries: Annotated[list[str], typer.Argument(help="`eval --summary` JSON files, as LABEL=FILE or FILE.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the markdown here.")] = None,
) -> None:
    """Build the ablation table (markdown) from `eval --summary` files: one row per variant.

        probllm report base=runs/base.json dpo=runs/dpo.json 8-bit=runs/q8.json -o runs/ablation.md
    """
    from probllm.evaluate.report import run_report

    with command("report", quiet_summary=True):
        run_report(summaries, output)
