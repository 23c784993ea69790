"""`export --format vllm`: the `vllm serve` command for the model, printed and written to DIR/serve.sh.

vLLM serves a LoRA adapter on top of its base without merging (`--enable-lora --lora-modules NAME=PATH`,
with `--max-lora-rank` at least the adapter's rank), so one server can carry the base and several adapters; a
merged export (`--format merged`) or a plain model is served as it is. The script binds 127.0.0.1 unless
HOST is set, and passes VLLM_API_KEY's value as `--api-key` when it is set (vLLM refuses keyless requests then).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from probllm.io import UsageError, log

SERVE_SCRIPT = "serve.sh"
# vLLM accepts only these values for --max-lora-rank (its LoRA kernels are built for them): round up to one.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(adapter: str) -> int:
    config = json.loads(Path(adapter, "adapter_config.json").read_text(encoding="utf-8"))
    ranks = [config.get("r") or 8, *(config.get("rank_pattern") or {}).values()]
    needed = max(int(r) for r in ranks)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= needed:
            return allowed
    raise UsageError(f"--adapter {adapter}: LoRA rank {needed} is above the {VLLM_LORA_RANKS[-1]} vLLM serves")


def serve_command(base: str, served_name: str, adapter: str | None = None, adapter_name: str | None = None,
                  max_model_len: int | None = None) -> list[str]:
    """`vllm serve` arguments: the base (a folder or hub id) under a served name, the adapter as a LoRA module."""
    args = ["vllm", "serve", base, "--served-model-name", served_name]
    if adapter:
        args += ["--enable-lora", "--lora-modules", f"{adapter_name}={Path(adapter).resolve()}",
                 "--max-lora-rank", str(lora_rank(adapter))]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    return args


def serve_script(args: list[str]) -> str:
    command = " ".join(shlex.quote(a) for a in args)
    return ("#!/bin/sh\n"
            "# Written by probllm export. Serves an OpenAI-compatible API at http://$HOST:$PORT/v1 (vLLM).\n"
            "# Ask it with: probllm eval --backend openai --base-url http://127.0.0.1:8000/v1 --model NAME ...\n"
            "set -e\n"
            f'exec {command} \\\n'
            '    --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" ${VLLM_API_KEY:+--api-key "$VLLM_API_KEY"} "$@"\n')


def export_vllm(model: str | None, adapter: str | None, output: str, name: str | None = None,
                max_model_len: int | None = None, overwrite: bool = False) -> dict:
    import os
    import shutil
    import tempfile

    from probllm.export.merge import EXPORT_MARKER, check_adapter, check_output_folder, float_base, publish
    from probllm.models import model_label

    out = Path(output)
    check_output_folder(out, overwrite)
    check_adapter(adapter)
    base = float_base(model)
    base_arg = str(Path(base).resolve()) if os.path.isdir(base) else base
    base_name = model_label(model).rstrip("/").split("/")[-1]
    adapter_name = name or (f"{base_name}-{Path(adapter).resolve().name}" if adapter else None)
    if adapter:
        trained_on = json.loads(Path(adapter, "adapter_config.json").read_text()).get("base_model_name_or_path")
        if trained_on and trained_on not in (base, base_arg, model, model_label(model)):
            log(f"probllm export: note: {adapter} was trained on {trained_on}, served here on {base_arg}")
    # --name names what requests ask for: the LoRA module when there is one, else the model itself.
    served_base = name if name and not adapter else base_name
    args = serve_command(base_arg, served_base, adapter, adapter_name, max_model_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (tmp / SERVE_SCRIPT).write_text(serve_script(args), encoding="utf-8")
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": "vllm", "base_model": model_label(model),
                                                     "base_path": base_arg, "adapter": adapter, "command": args},
                                                    indent=2) + "\n", encoding="utf-8")
        publish(tmp, out)
        os.chmod(out / SERVE_SCRIPT, os.stat(out / SERVE_SCRIPT).st_mode | 0o111)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    command = " ".join(shlex.quote(a) for a in args)
    log(f"probllm export: {command}")
    log(f"probllm export: (also in {out / SERVE_SCRIPT}; requests name the model {adapter_name or served_base!r})")
    return {"output": str(out), "model": model_label(model), "adapter": adapter, "command": command,
            "served_model": adapter_name or served_base,
            "script": str(out / SERVE_SCRIPT)}
