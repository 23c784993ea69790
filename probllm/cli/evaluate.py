"""Commands of the evaluate family: `eval`, `quantize`, `report` (logic in probllm/evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from probllm.cli.app import (ForceResume, InputFiles, Limit, Seed, SkipInvalid, SummaryFile, app, command,
                             hidden_aliases)
from probllm.cli.choices import Dtype, QuantMethod, value
from probllm.cli.groups import uses
from probllm.cli.options import ENDPOINT, EVAL, LOCAL_MODEL, backend_config
from probllm.evaluate.options import EvalOptions

hidden_aliases("quantize", eval_limit="--limit", force="--overwrite")

# quantize takes the model and the adapter to merge; it loads them in float32 on the CPU itself (no --dtype, --device).
QUANTIZE_MODEL = LOCAL_MODEL.only("model", "adapter").replace(
    "adapter", help="LoRA adapter folder, merged before quantizing.")


@app.command("eval")
@uses(EVAL, ENDPOINT)
def eval_command(
    files: InputFiles = None,
    evaluation: dict = None,
    backend: dict = None,
    limit: Limit = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Append predictions to this file "
                                                   "instead of stdout, as they are scored; run again to resume "
                                                   "(items already there are skipped, if the same model and "
                                                   "settings wrote them).")] = None,
    force_resume: ForceResume = False,
    num_processes: Annotated[int, typer.Option("--num-processes", min=1, help="Shard the items across N "
                                               "processes (CPU threads split between them); one ordered output. "
                                               "`accelerate launch -m probllm eval` works too.")] = 1,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Score MCQ records with a causal LM: one prediction record per item on stdout, accuracy on stderr.

    Prompts reproduce lm-evaluation-harness's ARC and MMLU tasks; `loglik` reports acc and acc_norm as lm-eval
    does. Each question runs as one sequence: its prompt once, its choices packed after it.

        probllm eval --limit 50 --summary base.json runs/demo/mcq.jsonl > base.jsonl
        probllm eval --model runs/q8 --method letter mcq.jsonl \\
            | jq -c '{id, pred, correct}'
        probllm eval --num-processes 2 -o base.jsonl runs/demo/mcq.jsonl
        probllm eval mcq.jsonl --backend openai \\
            --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B

    With `--backend openai`, loglik needs a server that returns prompt log-probs on /v1/completions (vLLM,
    `probllm serve`); letter and generate work with more servers.
    """
    from probllm.evaluate.mcqa import run_eval

    settings = {name: value(v) for name, v in evaluation.items()}
    config = backend_config(backend, model=settings["model"], adapter=settings["adapter"],
                            batch_size=settings["batch_size"], dtype=settings["dtype"], device=settings["device"])
    with command("eval", summary) as stats:
        run_eval(files, stats, **settings, limit=limit, skip_invalid=skip_invalid, backend=config,
                 output=str(output) if output else None, force_resume=force_resume, num_processes=num_processes)


@app.command("quantize")
@uses(QUANTIZE_MODEL)
def quantize_command(
    local_model: dict,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the quantized model to.",
                                         show_default=False)],
    method: Annotated[QuantMethod, typer.Option("--method", help="torch-int8: dynamic, fastest on CPU.")]
    = QuantMethod.torch_int8,
    double_quant: Annotated[bool, typer.Option("--double-quant/--no-double-quant", help="bnb 4-bit: quantize "
                                               "the quantization constants too.")] = True,
    eval_file: Annotated[Optional[list[str]], typer.Option("--eval", help="MCQ records: also report accuracy of "
                                                           "the quantized and the full-precision model (repeat "
                                                           "for several files).")] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N records of --eval.",
                                                      min=0)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size for --eval.", min=1)]
    = EvalOptions.batch_size,
    measure: Annotated[bool, typer.Option("--measure/--no-measure", help="Measure memory and tokens/s (each "
                                          "model loaded in a fresh process).")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output quantize folder.")]
    = False,
    summary: SummaryFile = None,
) -> None:
    """Write a quantized copy of a model (LoRA adapter merged first) that `--model FOLDER` loads everywhere.

    Prints one record: method, bits, size on disk, resident memory, tokens/s (and accuracy with --eval) next to
    the full-precision model's.

        probllm quantize --method bnb-nf4 -o runs/q4 --adapter runs/demo/dpo \\
            --eval runs/demo/mcq.jsonl
        probllm eval --model runs/q4 runs/demo/mcq.jsonl > preds.jsonl
    """
    from probllm.evaluate.quantize import run_quantize

    with command("quantize", summary_file=summary) as stats:
        run_quantize(stats, output=str(output), method=value(method), **local_model,
                     double_quant=double_quant, eval_file=eval_file, eval_limit=eval_limit, batch_size=batch_size,
                     measure=measure, overwrite=overwrite)


@app.command("report")
def report_command(
    summaries: Annotated[list[str], typer.Argument(help="`eval --summary` JSON files or `eval` prediction files "
                                                   "(JSONL), as LABEL=FILE or FILE; the first is the baseline.",
                                                   show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the markdown here.")] = None,
    seed: Seed = 0,
    resamples: Annotated[int, typer.Option("--resamples", help="Paired-bootstrap resamples for the 95% "
                                           "intervals.", min=1)] = 10_000,
) -> None:
    """Build the ablation table (markdown): one row per variant, each compared with the first on the same items.

    Rows that scored the same items as the first get the paired difference in accuracy with a 95% bootstrap
    interval (over items, seeded) and McNemar's exact p-value, and are marked where p < 0.05.

        probllm report base=runs/base.json dpo=runs/dpo.json 8-bit=runs/q8.json \\
            -o runs/ablation.md
        probllm report base=base-preds.jsonl dpo=dpo-preds.jsonl --seed 1
    """
    from probllm.evaluate.report import run_report

    with command("report", quiet_summary=True):
        run_report(summaries, output, seed=seed, resamples=resamples)
