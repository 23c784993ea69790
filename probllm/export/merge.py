"""`export --format merged`: the LoRA adapter merged into its base, saved as a plain transformers folder.

The folder needs no PEFT: safetensors weights, the tokenizer with its chat template, the generation config, and
a README.md model card that says where it came from (base model, adapter and its hash, the `dpo` settings and data
the adapter folder recorded, and any `eval --summary` files given), plus the same facts as probllm_export.json.
The other formats (gguf, ollama) merge the same way into a temporary folder first (`merged_source`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from probllm.io import UsageError, log, sha256_file

# What an export folder carries besides the model: its provenance as JSON (the model card is written from it).
EXPORT_MARKER = "probllm_export.json"
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def quantized_reason(path: str) -> str | None:
    """Why a model folder is not a float base (None when it is one): a `quantize` output, or a hub checkpoint
    saved with a quantization_config (bitsandbytes, GPTQ, AWQ...)."""
    from probllm.models import QUANT_MARKER, is_quantized_folder

    if is_quantized_folder(path):
        meta = json.loads(Path(path, QUANT_MARKER).read_text(encoding="utf-8"))
        return f"a `probllm quantize` output ({meta.get('method')})"
    config = Path(path, "config.json")
    if config.exists():
        quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
        if quant:
            return f"saved quantized ({quant.get('quant_method') or 'quantization_config in config.json'})"
    return None


def float_base(model: str | None) -> str:
    """The resolved base folder or hub id, refused (one line) when its weights are quantized."""
    from probllm.models import resolve_model

    path = resolve_model(model)
    reason = quantized_reason(path)
    if reason:
        raise UsageError(f"--model {model}: is {reason}; merging into quantized weights rounds the adapter's update "
                         f"away and cannot be saved as plain weights: export from the float model the adapter was "
                         f"trained on, then quantize the export (--format gguf --quant q4_0)")
    return path


def check_adapter(adapter: str | None) -> None:
    if adapter and not Path(adapter, "adapter_config.json").exists():
        raise UsageError(f"--adapter {adapter}: not a LoRA adapter folder (no adapter_config.json)")


def check_output_folder(out: Path, overwrite: bool, marker: str = EXPORT_MARKER) -> None:
    """Refuse to replace an existing folder unless --overwrite, and never one that is not an export of ours."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not (out / marker).exists():
            raise UsageError(f"--output {out}: folder exists and is not a probllm export; refusing to overwrite")
        if not overwrite:
            raise UsageError(f"--output {out}: holds an export already; pass --overwrite to replace it")


def torch_dtype(dtype: str, path: str):
    """`auto` keeps the dtype the base was saved in (a bf16 7B stays 14 GB, not 28); else the one asked for."""
    import torch

    if dtype == "auto":
        config = _read_json(Path(path, "config.json")) or {}
        saved = config.get("dtype") or config.get("torch_dtype")
        dtype = saved if saved in DTYPES else "float32"
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of auto, {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


def load_merged(base: str, adapter: str | None, dtype: str):
    """The base on the CPU with the adapter merged in (PEFT `merge_and_unload`): a plain transformers model."""
    from transformers import AutoModelForCausalLM

    from probllm.models import attach_adapter

    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(dtype, base), use_safetensors=True)
    except OSError as e:
        raise UsageError(f"--model {base}: cannot load ({str(e).splitlines()[0]})") from None
    if adapter:
        model = attach_adapter(model, adapter, merge=True)
    model.eval()
    return model


def save_merged(model, base: str, folder: Path) -> None:
    """Weights, tokenizer (chat template included) and generation config into `folder`. The tokenizer is the
    base's as saved (not probllm's loading of it, which adds a pad token for batching)."""
    from transformers import AutoTokenizer

    model.save_pretrained(str(folder), safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(str(folder))


@contextmanager
def merged_source(model: str | None, adapter: str | None, dtype: str, near: Path) -> Iterator[str]:
    """A float folder to convert from: the base itself, or (with an adapter) a temporary merged copy next to the
    output, removed afterwards. Converters then read it a tensor at a time."""
    base = float_base(model)
    check_adapter(adapter)
    if not adapter:
        if not Path(base).is_dir():
            raise UsageError(f"--model {model}: export reads a local folder; download it first "
                             f"(huggingface-cli download {model} --local-dir DIR)")
        yield base
        return
    near.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=near))
    try:
        log(f"probllm export: merging {adapter} into {model or 'the default model'}")
        merged = load_merged(base, adapter, dtype)
        save_merged(merged, base, tmp)
        del merged
        yield str(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- provenance


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# dpo settings worth a line in a model card (the full resolved config is kept in probllm_export.json).
CARD_SETTINGS = ("beta", "loss_type", "lr", "lr_scheduler", "max_steps", "epochs", "batch_size", "grad_accum",
                 "lora_r", "lora_alpha", "lora_dropout", "lora_target", "max_length", "seed", "bf16", "optim")


def provenance(model: str | None, base: str, adapter: str | None, eval_summary: list[str] | None) -> dict:
    """What produced an export: the base, the adapter (content hash), what its `dpo` run recorded (config.json:
    settings, and data files with their hashes where it lists them; summary.json), and eval summaries."""
    from probllm import __version__
    from probllm.models import model_label

    record: dict = {"created_by": f"probllm {__version__} export", "base_model": model_label(model),
                    "base_path": base}
    if adapter:
        folder = Path(adapter)
        weights = folder / "adapter_model.safetensors"
        lora = _read_json(folder / "adapter_config.json") or {}
        record["adapter"] = {
            "path": str(folder),
            "sha256": sha256_file(weights) if weights.exists() else None,
            "peft_type": lora.get("peft_type"), "r": lora.get("r"), "lora_alpha": lora.get("lora_alpha"),
            "target_modules": lora.get("target_modules"),
            "trained_on": lora.get("base_model_name_or_path"),
        }
        config = _read_json(folder / "config.json")
        if config:
            record["dpo"] = {k: config[k] for k in CARD_SETTINGS if k in config}
            record["dpo_config"] = config
            # Data files as the run recorded them ({"file", "sha256", ...} entries); older runs did not.
            data = config.get("data")
            if data:
                record["data"] = data
        summary = _read_json(folder / "summary.json")
        if summary:
            record["dpo_summary"] = {k: summary.get(k) for k in ("pairs", "eval_pairs", "steps", "epochs",
                                                                  "train_loss", "eval", "seconds")}
    evals = []
    for path in eval_summary or []:
        figures = _read_json(Path(path))
        if figures is None:
            raise UsageError(f"--eval-summary {path}: cannot read it as JSON")
        overall = figures.get("overall") or {}
        evals.append({"file": str(path), "sha256": sha256_file(path), "model": figures.get("model"),
                      "method": figures.get("method"), "acc": overall.get("acc"),
                      "acc_norm": overall.get("acc_norm"), "stderr": overall.get("acc_stderr"),
                      "items": overall.get("items")})
    if evals:
        record["evaluations"] = evals
    return record


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def model_card(prov: dict, title: str) -> str:
    """README.md of an export: hub-style YAML front matter, then the provenance in prose and tables."""
    # base_model (hub convention, which llama.cpp's converter turns into general.base_model.* keys) only for a hub
    # id: a local path is no model anyone else can find.
    hub_id = prov["base_model"].count("/") == 1 and not os.path.exists(prov["base_model"])
    lines = ["---", *([f"base_model: {prov['base_model']}"] if hub_id else []), "library_name: transformers",
             "tags:", "- probllm", "- dpo" if prov.get("adapter") else "- export", "---", "", f"# {title}", "",
             f"Written by `{prov['created_by']}` from the base model `{prov['base_model']}`"
             + (f" with the LoRA adapter `{prov['adapter']['path']}` merged in (PEFT `merge_and_unload`)."
                if prov.get("adapter") else "."), ""]
    adapter = prov.get("adapter")
    if adapter:
        lines += ["## Adapter", "", "| | |", "| --- | --- |",
                  f"| adapter_model.safetensors sha256 | `{adapter['sha256']}` |",
                  f"| LoRA r / alpha | {adapter['r']} / {adapter['lora_alpha']} |",
                  f"| target modules | {_fmt(adapter['target_modules'])} |",
                  f"| trained on | {_fmt(adapter['trained_on'])} |", ""]
    if prov.get("dpo"):
        lines += ["## DPO settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in prov["dpo"].items()] + [""]
    summary = prov.get("dpo_summary")
    if summary:
        lines += [f"Trained {summary.get('steps')} steps on {summary.get('pairs')} pairs "
                  f"(final train loss {_fmt(summary.get('train_loss'))}"
                  + (f", eval loss {_fmt((summary.get('eval') or {}).get('eval_loss'))}" if summary.get("eval") else "")
                  + ").", ""]
    lines += ["## Training data", ""]
    if prov.get("data"):
        lines += ["| part | file | sha256 |", "| --- | --- | --- |"]
        for entry in prov["data"]:
            entry = entry if isinstance(entry, dict) else {"file": entry}
            lines.append(f"| {_fmt(entry.get('part'))} | {entry.get('file')} | `{_fmt(entry.get('sha256'))}` |")
        lines.append("")
    else:
        lines += ["Not recorded by the adapter folder (its config.json lists no data files).", ""]
    if prov.get("evaluations"):
        lines += ["## Evaluations", "", "| summary file | model | method | acc | acc_norm | items |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {e['file']} | {_fmt(e['model'])} | {_fmt(e['method'])} | {_fmt(e['acc'])} | "
                  f"{_fmt(e['acc_norm'])} | {_fmt(e['items'])} |" for e in prov["evaluations"]] + [""]
    lines += [f"All of the above, and the full resolved `dpo` config, is in `{EXPORT_MARKER}`.", ""]
    return "\n".join(lines)


def publish(tmp: Path, out: Path) -> None:
    """Give a finished temporary folder its final name (replacing an old export) with the umask's modes."""
    from probllm.evaluate.quantize import publish_permissions

    publish_permissions(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def export_merged(model: str | None, adapter: str | None, output: str, dtype: str = "auto",
                  eval_summary: list[str] | None = None, overwrite: bool = False) -> dict:
    """Write the merged folder; returns what the command prints."""
    from probllm.evaluate.quantize import weights_size

    out = Path(output)
    check_output_folder(out, overwrite)
    base = float_base(model)
    check_adapter(adapter)
    prov = provenance(model, base, adapter, eval_summary)  # bad --eval-summary files fail before any load
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged = load_merged(base, adapter, dtype)
        save_merged(merged, base, tmp)
        prov["dtype"] = str(merged.dtype).removeprefix("torch.")
        del merged
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": "merged", **prov}, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(prov, f"{prov['base_model']}"
                                                  + (" + DPO adapter (merged)" if adapter else "")), encoding="utf-8")
        publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(out), "model": prov["base_model"], "adapter": adapter, "dtype": prov["dtype"],
            "size_mb": round(weights_size(str(out)) / 2**20, 1)}
