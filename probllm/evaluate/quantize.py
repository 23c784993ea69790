"""`quantize`: write a quantized model folder that every `--model FOLDER` loads, and measure what it costs/saves.

A quantized folder is an ordinary model folder (config, tokenizer, weights) plus `QUANT_MARKER`
(probllm_quantization.json), which routes `probllm.models.load_model` to `probllm.models.load_quantized`. What each method
saves, and how it loads (never unpickling anything):

| method | saved | loaded by |
| --- | --- | --- |
| bnb-int8, bnb-nf4, bnb-fp4 | bitsandbytes' packed weights + quantization_config, safetensors | transformers `from_pretrained` |
| quanto-int8, quanto-int4 | optimum-quanto's weight data/scales, safetensors + quanto_qmap.json (JSON) | `QuantizedModelForCausalLM.from_pretrained` |
| torch-int8 | the float weights, safetensors | `from_pretrained`, then `torch.ao.quantization.quantize_dynamic` (deterministic: per-tensor min/max) |
| gguf-q8_0, gguf-q5_1, gguf-q5_0, gguf-q4_1, gguf-q4_0 | one GGUF file, llama.cpp's layout (`export --format gguf`) + the tokenizer | llama.cpp (llama-cpp-python) for speed and memory; transformers' GGUF loader (dequantized) for `--model FOLDER` everywhere |

torch's dynamic int8 packs its weights in objects that only pickle can store; re-quantizing the float weights at
load gives the same int8 weights every time, so the folder stays safetensors-only (at float size on disk).
An adapter (`--adapter`) is merged into the float weights before quantizing. A GGUF folder's size is always
measured; its memory and tokens/s only through llama.cpp (without llama-cpp-python the record says so, and its
accuracy comes from the dequantized weights).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from probllm.io import UsageError, log
# The methods and the loader of `quantize` folders live with the resolver, which every command loads through;
# this module writes the folders and measures them.
from probllm.models import QUANT_METHODS

MEASURE_PROMPT = "Question: Why does the moon have phases?\nAnswer:"
MEASURE_TOKENS = 32


def _marker_path(folder: str | Path) -> Path:
    from probllm.models import QUANT_MARKER

    return Path(folder) / QUANT_MARKER


def _lib_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover
        return "?"


def quantize_to_folder(model: str | None, method: str, output: str, adapter: str | None = None,
                       double_quant: bool = True) -> dict:
    """Quantize `model` (+ merged `adapter`) with `method` into `output`; returns the marker's metadata."""
    import torch
    from transformers import AutoModelForCausalLM

    from probllm.export.merge import save_merged
    from probllm.models import is_quantized_folder, load_model, load_tokenizer, model_label, resolve_model

    if method not in QUANT_METHODS:
        raise UsageError(f"--method {method}: choose one of {', '.join(QUANT_METHODS)}")
    source = resolve_model(model)
    if is_quantized_folder(source):
        raise UsageError(f"--model {model}: already quantized; quantize the full-precision model")
    out = Path(output)
    check_output(out, overwrite=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    merged_dir = None
    try:
        tok = load_tokenizer(model)
        if adapter:
            # bitsandbytes and quanto quantize while loading/after loading a plain folder: merge LoRA into the
            # float weights and save them first, so every method starts from the same merged model.
            merged_dir = Path(tempfile.mkdtemp(prefix=".merged-", dir=out.parent))
            merged = load_model(model, adapter=adapter, dtype="float32", device="cpu", merge_adapter=True)
            # With its tokenizer, as export's merge saves it: the GGUF writer reads tokenizer.json from the folder.
            save_merged(merged, resolve_model(model), merged_dir)
            del merged
            source = str(merged_dir)
        info = QUANT_METHODS[method]
        if info["library"] == "gguf":
            from probllm.export.gguf_file import write_gguf
            from probllm.models import QUANT_GGUF_FILE

            if not os.path.isdir(source):
                raise UsageError(f"--model {model}: a GGUF is written from a local folder; download it first")
            write_gguf(source, tmp_out / QUANT_GGUF_FILE, method.removeprefix("gguf-"), model_label(model), model)
        elif info["library"] == "bitsandbytes":
            from probllm.models import bnb_quantization_config

            config = bnb_quantization_config(method, torch.float32, double_quant)
            qmodel = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu",
                                                          use_safetensors=True)
            qmodel.save_pretrained(tmp_out, safe_serialization=True)
        elif info["library"] == "optimum-quanto":
            from optimum.quanto import QuantizedModelForCausalLM, qint4, qint8

            float_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
            qmodel = QuantizedModelForCausalLM.quantize(float_model, weights=qint8 if method == "quanto-int8"
                                                        else qint4, exclude="lm_head")
            qmodel.save_pretrained(tmp_out)
        else:  # torch-int8: float weights on disk, quantize_dynamic at load (see module docstring)
            float_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
            float_model.save_pretrained(tmp_out, safe_serialization=True)
        tok.save_pretrained(tmp_out)
        meta = {
            "method": method,
            "bits": info["bits"],
            "library": info["library"],
            "library_version": _lib_version(info["library"]),
            "base_model": model_label(model),
            "adapter": adapter,
            "double_quant": double_quant if method in ("bnb-nf4", "bnb-fp4") else None,
            **({"gguf_file": "model.gguf"} if info["library"] == "gguf" else {}),
            "format": {
                "gguf": "one GGUF file (llama.cpp's layout, `export --format gguf`); transformers loads it "
                        "dequantized, llama.cpp runs it as it is",
                "bitsandbytes": "bitsandbytes packed weights in safetensors; quantization_config in config.json",
                "optimum-quanto": "optimum-quanto weights in safetensors; quanto_qmap.json",
                "torch": "float32 weights in safetensors; torch.ao.quantization.quantize_dynamic(qint8) on Linear "
                         "layers at load",
            }[info["library"]],
            "created_by": "probllm quantize",
        }
        _marker_path(tmp_out).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        publish_permissions(tmp_out)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp_out, out)
        return meta
    finally:
        for d in (tmp_out, merged_dir):
            if d is not None and Path(d).exists():
                shutil.rmtree(d, ignore_errors=True)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing `--output` unless `--overwrite` (as `dpo` does), and never a folder that
    is not a quantize output. Called before any model is loaded."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not _marker_path(out).exists():
            raise UsageError(f"--output {out}: folder exists and is not a quantize output; refusing to overwrite")
        if not overwrite:
            raise UsageError(f"--output {out}: holds a quantized model already; pass --overwrite to replace it")


def publish_permissions(folder: str | os.PathLike) -> None:
    """Give a finished output folder the modes the user's umask asks for (0755/0644 under umask 022):
    mkdtemp makes it 0700, and some writers create files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


# ------------------------------------------------------------------------------------------------ measurement


def weights_size(folder: str) -> int:
    """Bytes of weight files (safetensors, GGUF) in a model folder."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.gguf") for f in Path(folder).glob(pattern))


def _gguf_folder(model: str | None) -> str | None:
    """The GGUF file of a `quantize --method gguf-*` folder (None for any other model)."""
    from probllm.models import QUANT_GGUF_FILE, is_quantized_folder

    if model and is_quantized_folder(model):
        meta = json.loads(_marker_path(model).read_text(encoding="utf-8"))
        if QUANT_METHODS.get(meta.get("method"), {}).get("library") == "gguf":
            return str(Path(model) / meta.get("gguf_file", QUANT_GGUF_FILE))
    return None


def _evaluate(scorer, eval_file, eval_limit: int | None, batch_size: int) -> dict:
    from probllm.evaluate.mcqa import EvalOptions, evaluate_records
    from probllm.evaluate.summary import Summary
    from probllm.io import Stats, read_records

    summary = Summary()
    stats = Stats(command="probllm quantize --eval")
    files = [eval_file] if isinstance(eval_file, str) else eval_file
    try:
        for _ in evaluate_records(read_records(files, stats), scorer, EvalOptions(batch_size=batch_size,
                                                                                  limit=eval_limit), stats, summary):
            pass
    finally:
        scorer.close()
    figures = summary.as_dict()
    overall = figures["overall"]
    return {"accuracy": overall.get("acc"), "acc_norm": overall.get("acc_norm"), "eval_items": overall.get("items"),
            "eval_items_per_s": figures["items_per_s"],
            "eval": {k: figures[k] for k in ("overall", "by_source", "by_subject", "items_per_s")}}


def measure_gguf(model: str, gguf_path: str, eval_file=None, eval_limit: int | None = None,
                 batch_size: int = 16) -> dict:
    """A GGUF folder in THIS process: through llama.cpp when llama-cpp-python is installed (memory, tokens/s and
    accuracy of the engine its users run); otherwise accuracy alone, from transformers' dequantized copy (the
    same quantized weights at float speed: its memory and speed would say nothing about llama.cpp)."""
    import psutil

    from probllm.lm import llama_cpp
    from probllm.models import load_model, load_tokenizer, set_threads

    tok = load_tokenizer(model)
    if not llama_cpp.available():
        result = {"rss_mb": None, "load_s": None, "tokens_per_s": None,
                  "engine": f"transformers (dequantized); {llama_cpp.NOT_INSTALLED}"}
        if eval_file:
            from probllm.evaluate.scorer import local_scorer

            set_threads()
            result.update(_evaluate(local_scorer(load_model(model, device="cpu"), tok), eval_file, eval_limit,
                                    batch_size))
        return result
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    llm = llama_cpp.load(gguf_path)
    load_s = time.perf_counter() - t0
    tokens_per_s = llama_cpp.greedy_speed(llm, MEASURE_PROMPT, MEASURE_TOKENS)
    result = {"rss_mb": round((proc.memory_info().rss - rss0) / 2**20, 1), "load_s": round(load_s, 2),
              "tokens_per_s": round(tokens_per_s, 2), "engine": "llama.cpp (llama-cpp-python)"}
    if eval_file:
        from probllm.evaluate.scorer import MCQScorer

        result.update(_evaluate(MCQScorer(llama_cpp.LlamaCppLM(llm, tok)), eval_file, eval_limit, batch_size))
    return result


def measure(model: str | None, adapter: str | None = None, eval_file: list[str] | str | None = None,
            eval_limit: int | None = None, batch_size: int = 16) -> dict:
    """In THIS process (call it in a fresh one): resident memory added by loading, greedy tokens/s, accuracy."""
    import psutil
    import torch

    from probllm.models import load_model, load_tokenizer, set_threads

    gguf_path = _gguf_folder(model)
    if gguf_path:
        return measure_gguf(model, gguf_path, eval_file, eval_limit, batch_size)
    set_threads()
    # Import every library a method may load before the first reading: the RSS delta is then the model alone.
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    for lib in ("bitsandbytes", "optimum.quanto", "peft"):
        try:
            __import__(lib)
        except ImportError:  # pragma: no cover
            pass
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    lm = load_model(model, adapter=adapter, device="cpu")
    tok = load_tokenizer(model)
    load_s = time.perf_counter() - t0
    ids = tok(MEASURE_PROMPT, return_tensors="pt")
    pad = tok.pad_token_id
    with torch.no_grad():  # not inference_mode: optimum-quanto int4 fails under it
        lm.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=pad)  # warm-up
        # Read memory after a forward pass: safetensors weights are memory-mapped and only become resident
        # once touched, so a reading right after loading undercounts.
        rss = proc.memory_info().rss - rss0
        t1 = time.perf_counter()
        out = lm.generate(**ids, max_new_tokens=MEASURE_TOKENS, min_new_tokens=MEASURE_TOKENS, do_sample=False,
                          pad_token_id=pad)
        gen_s = time.perf_counter() - t1
    n_new = out.shape[1] - ids["input_ids"].shape[1]
    result = {"rss_mb": round(rss / 2**20, 1), "load_s": round(load_s, 2),
              "tokens_per_s": round(n_new / gen_s, 2)}
    if eval_file:
        from probllm.evaluate.scorer import local_scorer

        result.update(_evaluate(local_scorer(lm, tok), eval_file, eval_limit, batch_size))
    return result


def measure_in_subprocess(model: str | None, adapter: str | None, eval_file: list[str] | None, eval_limit: int | None,
                          batch_size: int) -> dict:
    """Resident memory only means something in a fresh process: run `measure` in one and read its JSON."""
    args = [sys.executable, "-m", "probllm.evaluate.quantize", "measure", json.dumps(
        {"model": model, "adapter": adapter, "eval_file": eval_file, "eval_limit": eval_limit,
         "batch_size": batch_size})]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"measuring {model or 'the default model'} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_quantize(stats, *, output: str, method: str, model: str | None = None, adapter: str | None = None,
                 double_quant: bool = True, eval_file: list[str] | str | None = None, eval_limit: int | None = None,
                 batch_size: int = 16, measure: bool = True, overwrite: bool = False) -> dict:
    """The `quantize` command: write the folder, measure it and the full-precision model, print one record."""
    from probllm.io import expand_paths, write_records
    from probllm.models import model_label, resolve_model

    # Check first, load later: a refusal or a typo in a path costs no model load.
    check_output(Path(output), overwrite)
    if isinstance(eval_file, str):
        eval_file = [eval_file]
    eval_file = list(expand_paths(eval_file)) if eval_file else None
    resolve_model(model)
    t0 = time.perf_counter()
    meta = quantize_to_folder(model, method, output, adapter=adapter, double_quant=double_quant)
    quantize_s = time.perf_counter() - t0
    base_dir = resolve_model(model)
    record = {
        "method": method, "bits": meta["bits"], "model": model_label(model), "adapter": adapter, "output": output,
        "size_mb": round(weights_size(output) / 2**20, 1),
        "base_size_mb": round(weights_size(base_dir) / 2**20, 1) if os.path.isdir(base_dir) else None,
        "quantize_s": round(quantize_s, 2),
    }
    if measure:
        log(f"probllm quantize: measuring {output} and the full-precision model (fresh processes)")
        q = measure_in_subprocess(output, None, eval_file, eval_limit, batch_size)
        base = measure_in_subprocess(model, adapter, eval_file, eval_limit, batch_size)
        record.update({"rss_mb": q["rss_mb"], "base_rss_mb": base["rss_mb"],
                       "tokens_per_s": q["tokens_per_s"], "base_tokens_per_s": base["tokens_per_s"]})
        if "engine" in q:  # GGUF: which engine measured it (llama.cpp, or accuracy only without it)
            record["engine"] = q["engine"]
        if eval_file:
            record.update({"accuracy": q["accuracy"], "base_accuracy": base["accuracy"],
                           "acc_norm": q["acc_norm"], "base_acc_norm": base["acc_norm"],
                           "eval_items": q["eval_items"]})
            # The --summary file: the quantized model's evaluation in the shape `eval --summary` writes (what
            # `report` tabulates), the full-precision model's beside it.
            stats.figures.update({**q["eval"], "model": output, "method": "loglik", "quantization": method,
                                  "base": {"model": record["model"], **base["eval"]}})
    stats.figures["record"] = record
    write_records([record], stats)
    return record


if __name__ == "__main__":  # `python -m probllm.evaluate.quantize measure JSON`: used by measure_in_subprocess
    if len(sys.argv) == 3 and sys.argv[1] == "measure":
        opts = json.loads(sys.argv[2])
        print(json.dumps(measure(opts["model"], opts["adapter"], opts["eval_file"], opts["eval_limit"],
                                 opts["batch_size"])))
    else:
        sys.exit("usage: python -m probllm.evaluate.quantize measure JSON")
