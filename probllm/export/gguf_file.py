"""`export --format gguf`: one GGUF file that llama.cpp loads, written with the `gguf` package.

The layout is what llama.cpp's own converter (convert_hf_to_gguf.py) writes for these architectures, so that
llama.cpp and the tools on it treat our files as theirs:

- names from `gguf.TensorNameMap` (`blk.N.attn_q.weight`, `token_embd.weight`, ...); a tied output matrix is
  not written (llama.cpp reuses token_embd);
- Llama's q and k projections reordered from Hugging Face's rotate-half layout to GGML's interleaved rotary
  pairs (Qwen2's are written as they are: llama.cpp runs it with NEOX rotary, which is rotate-half);
- 1-D tensors and norms stay f32; matrices take `--quant`; a matrix whose rows do not divide into the type's
  blocks falls back to f16; for the 4- and 5-bit types the output matrix is q8_0 (the logits are the most
  sensitive weights: llama.cpp's own quantizer keeps them at higher precision too);
- the vocabulary as `tokenizer.ggml.*`: byte-level BPE ("gpt2": tokens, token types, merges, and the
  pre-tokenizer name llama.cpp knows it by) or Llama-2-style BPE with byte fallback ("llama": tokens, scores,
  types), special token ids, add_bos/add_space_prefix and the chat template.

Memory: tensors are read one at a time from the safetensors files (`safe_open`), converted, written and dropped;
the plan (names, shapes, types, sizes) is made from the files' headers first, so nothing holds the whole model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Iterator

from probllm.export import GGUF_QUANTS
from probllm.io import UsageError, log, progress


@dataclass(frozen=True)
class Architecture:
    gguf_arch: str          # gguf.MODEL_ARCH member name
    rotary_interleave: bool  # Llama: reorder q/k rows to GGML's rotary pair layout
    llama_keys: bool        # Llama's extra keys: vocab_size, rope.dimension_count


# transformers `architectures[0]` -> how llama.cpp converts it. deepseek-llm / deepseek-math are Llama models.
ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("LLAMA", rotary_interleave=True, llama_keys=True),
    "Qwen2ForCausalLM": Architecture("QWEN2", rotary_interleave=False, llama_keys=False),
}
SUPPORTED = "Llama (Llama 2/3, SmolLM2, DeepSeek-LLM / deepseek-math) and Qwen2"

# llama.cpp names a byte-level BPE pre-tokenizer by the sha256 of how it splits one check text (llama.cpp's
# `get_vocab_base_pre`); its runtime picks the split rules by that name. These are the families we export.
_PRE_CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 '
    '333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= '
    'нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not '
    'sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",     # Llama 3
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm/math 7B
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",         # Qwen1.5 / Qwen2 / 2.5
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",        # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

QUANT_ROWS = 1024  # rows quantized at once (a 4096-wide row is 16 KB of float32)

# gguf.TokenType values (llama.cpp's llama_token_type), written as int32.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def read_config(folder: str) -> dict:
    config = json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))
    if "text_config" in config:  # multimodal wrappers: the language model's settings
        config = {**config, **config["text_config"]}
    return config


def architecture(config: dict, model: str | None) -> Architecture:
    name = (config.get("architectures") or ["?"])[0]
    if name not in ARCHITECTURES:
        raise UsageError(f"--model {model}: architecture {name} has no GGUF export yet; supported: {SUPPORTED}")
    return ARCHITECTURES[name]


def rope_theta(config: dict) -> float | None:
    """transformers 5 keeps it in rope_parameters; older configs at the top level."""
    params = config.get("rope_parameters") or {}
    return params.get("rope_theta", config.get("rope_theta"))


def rope_scaling(config: dict) -> dict | None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    return None if kind in (None, "default") else {**scaling, "kind": kind}


# ------------------------------------------------------------------------------------------------ the tensors


def _rotary_interleave(weights, n_heads: int):
    """Rows of a q/k projection (or bias), per head, from rotate-half order [x0..x(d/2-1), y0..] to the
    interleaved pairs [x0, y0, x1, y1, ...] that GGML's rotary embedding reads."""
    shape = weights.shape
    return weights.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def weight_files(folder: str) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    files = [f for f in files if f.name.startswith("model")] or files
    if not files:
        raise UsageError(f"--model {folder}: no safetensors weights (GGUF export reads safetensors only)")
    return files


@dataclass
class Planned:
    source: str   # tensor name in the safetensors file
    file: Path
    name: str     # GGUF name
    shape: tuple  # numpy order (rows, cols)
    qtype: object  # gguf.GGMLQuantizationType
    nbytes: int
    data: object = None  # a tensor computed here rather than read (rope_freqs)


def llama3_rope_factors(config: dict, scaling: dict):
    """Llama 3.1's long-context rotary scaling as llama.cpp takes it: one divisor per rotary frequency (the
    `rope_freqs` tensor). High frequencies stay, low ones are divided by `factor`, the band between is blended."""
    import numpy as np

    heads = config["num_attention_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // heads
    freqs = 1.0 / (float(rope_theta(config) or 10000.0) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings") or config.get("original_max_position_embeddings") \
        or 8192
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def plan_tensors(folder: str, config: dict, arch: Architecture, quant: str) -> list[Planned]:
    """Every tensor's GGUF name, type and size, from the safetensors headers alone (no weights read)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    blocks = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), blocks)
    wanted = getattr(gguf.GGMLQuantizationType, GGUF_QUANTS[quant]["tensor_type"])
    output_type = gguf.GGMLQuantizationType.Q8_0 if GGUF_QUANTS[quant]["bits"] < 8 else wanted
    tied = config.get("tie_word_embeddings", False)
    plan = []
    scaling = rope_scaling(config)
    if arch.llama_keys and scaling is not None and scaling["kind"] == "llama3":
        factors = llama3_rope_factors(config, scaling)
        plan.append(Planned("", None, "rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32,
                            factors.nbytes, factors))
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for source in f.keys():
                if source.endswith(".rotary_emb.inv_freq") or (tied and source == "lm_head.weight"):
                    continue  # computed at run time / the same matrix as token_embd
                name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UsageError(f"--model {folder}: tensor {source} has no GGUF name in the "
                                     f"{arch.gguf_arch.lower()} layout (not a plain {SUPPORTED} checkpoint?)")
                shape = tuple(f.get_slice(source).get_shape())
                if len(shape) <= 1 or name.endswith("_norm.weight"):
                    qtype = gguf.GGMLQuantizationType.F32
                else:
                    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
                    qtype = output_type if is_output else wanted
                    block = gguf.GGML_QUANT_SIZES[qtype][0]
                    if shape[-1] % block:
                        qtype = gguf.GGMLQuantizationType.F16
                nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
                plan.append(Planned(source, file, name, shape, qtype, nbytes))
    return plan


def convert(p: Planned, config: dict, arch: Architecture):
    """One tensor: read, reorder (Llama q/k), quantize. Returns the array the writer stores."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    if p.data is not None:
        return p.data
    with safe_open(str(p.file), framework="pt") as f:
        data = f.get_tensor(p.source).float().numpy()
    if arch.rotary_interleave:
        heads = config["num_attention_heads"]
        if p.source.endswith(("q_proj.weight", "q_proj.bias")):
            data = _rotary_interleave(data, heads)
        elif p.source.endswith(("k_proj.weight", "k_proj.bias")):
            data = _rotary_interleave(data, config.get("num_key_value_heads") or heads)
    if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return gguf.quants.quantize(data, p.qtype)
    # Block types a slab of rows at a time into the output bytes: numpy's quantizers make several float copies
    # of what they are given, which for a whole embedding matrix would be several times its size.
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty(gguf.quant_shape_to_byte_shape(rows.shape, p.qtype), dtype=np.uint8)
    for start in range(0, rows.shape[0], QUANT_ROWS):
        out[start: start + QUANT_ROWS] = gguf.quants.quantize(rows[start: start + QUANT_ROWS], p.qtype)
    return out.reshape(gguf.quant_shape_to_byte_shape(p.shape, p.qtype))


# --------------------------------------------------------------------------------------------- the vocabulary


def pre_tokenizer_name(tokenizer, folder: str) -> str:
    """llama.cpp's name for how this byte-level BPE splits text before merging."""
    digest = sha256(str(tokenizer.encode(_PRE_CHECK_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    # A tokenizer of its own (a test model, a new vocabulary) that splits with the plain GPT-2 rule: byte-level,
    # GPT-2's regex, no extra Split step. llama.cpp implements that rule as "gpt-2".
    spec = json.loads(Path(folder, "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    raise UsageError(f"--model {folder}: its tokenizer splits text in a way llama.cpp has no name for here "
                     f"(pre-tokenizer {spec.get('type')}); supported: {SUPPORTED}")


def _tokenizer_spec(folder: str) -> dict:
    path = Path(folder, "tokenizer.json")
    if not path.exists():
        raise UsageError(f"--model {folder}: no tokenizer.json (GGUF export reads fast tokenizers)")
    return json.loads(path.read_text(encoding="utf-8"))


def add_vocabulary(writer, folder: str, config: dict) -> None:
    import gguf
    from transformers import AutoTokenizer

    spec = _tokenizer_spec(folder)
    vocab_size = config.get("vocab_size")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if spec["model"].get("type") == "BPE" and spec["model"].get("byte_fallback"):
        # Llama 2 style (sentencepiece BPE in tokenizer.json): llama.cpp's "llama" tokenizer, tokens with scores.
        vocab = gguf.LlamaHfVocab(Path(folder))
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(folder), n_vocab=len(tokens))
    else:
        vocab_size = vocab_size or len(tokenizer)
        by_id = {i: t for t, i in tokenizer.get_vocab().items()}
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in by_id:  # rows the embedding has beyond the tokenizer (padded vocabularies)
                tokens.append(f"[PAD{i}]")
                types.append(UNUSED)
                continue
            token = by_id[i]
            tokens.append(token)
            if i not in added:
                types.append(NORMAL)
            elif added[i].special or (token.startswith("<|") and token.endswith("|>")):
                types.append(CONTROL)
            else:
                types.append(USER_DEFINED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, folder))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=len(tokens))
    if "bos" not in special.add_special_token:
        # Whether a bos id goes first: what the tokenizer itself does, so that llama.cpp tokenizes the same
        # (llama.cpp's own default differs by vocabulary type).
        ids = tokenizer("a")["input_ids"]
        special.add_special_token["bos"] = tokenizer.bos_token_id is not None and bool(ids) \
            and ids[0] == tokenizer.bos_token_id
    tokenizer_config = Path(folder, "tokenizer_config.json")
    prefix = (json.loads(tokenizer_config.read_text()) if tokenizer_config.exists() else {}).get("add_prefix_space")
    if prefix is None and (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        prefix = spec["pre_tokenizer"].get("add_prefix_space")
    if prefix is not None:
        writer.add_add_space_prefix(bool(prefix))
    special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------------------------- the header


def add_hyperparameters(writer, config: dict, arch: Architecture, quant: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    if rope_theta(config) is not None:
        writer.add_rope_freq_base(float(rope_theta(config)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if head_dim != config["hidden_size"] // heads:  # only then does llama.cpp need to be told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, GGUF_QUANTS[quant]["file_type"]))
    if arch.llama_keys:
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    scaling = rope_scaling(config)
    if scaling is not None:
        if scaling["kind"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(scaling["factor"])
        elif scaling["kind"] == "llama3" and arch.llama_keys:
            pass  # carried by the rope_freqs tensor (see plan_tensors), as llama.cpp reads it
        elif scaling["kind"] == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(scaling["factor"])
            writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        else:
            raise UsageError(f"rope scaling {scaling['kind']!r} (config.json) has no GGUF export yet; "
                             f"models without it, with linear or yarn scaling, or Llama 3.1's, export")


def add_general(writer, folder: str, name: str, total_params: int) -> None:
    """general.*: type, name, size label and what the folder's own model card (README.md) says (license...)."""
    import gguf

    meta = gguf.Metadata.load(None, Path(folder), name, total_params)
    meta.name = name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, 0, 0, 0)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)


# ------------------------------------------------------------------------------------------------- writing


def gguf_header(folder: str, quant: str, name: str, model: str | None = None):
    """A GGUFWriter holding every key and every tensor's info (no weights read yet), and the tensor plan."""
    import gguf
    import numpy as np

    if quant not in GGUF_QUANTS:
        raise UsageError(f"--quant {quant}: choose one of {', '.join(GGUF_QUANTS)}")
    config = read_config(folder)
    arch = architecture(config, model)
    plan = plan_tensors(folder, config, arch, quant)
    total_params = sum(math.prod(p.shape) for p in plan)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)])
    add_general(writer, folder, name, total_params)
    add_hyperparameters(writer, config, arch, quant)
    add_vocabulary(writer, folder, config)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for p in plan:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    return writer, plan, config, arch


def write_gguf(folder: str, out: Path, quant: str, name: str, model: str | None = None) -> dict:
    """Convert a float transformers folder to `out` (written to a temporary name, then renamed)."""
    writer, plan, config, arch = gguf_header(folder, quant, name, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress(f"writing {out.name}", total=len(plan)) as advance:
            for p in plan:
                writer.write_tensor_data(convert(p, config, arch))
                advance()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    types = sorted({p.qtype.name for p in plan})
    return {"tensors": len(plan), "tensor_types": types, "params": sum(math.prod(p.shape) for p in plan)}


def check_output_file(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise UsageError(f"--output {out}: a GGUF export is one file; name it *.gguf")
    if out.is_dir():
        raise UsageError(f"--output {out}: is a folder; give the .gguf file's path")
    if out.exists() and not overwrite:
        raise UsageError(f"--output {out}: exists; pass --overwrite to replace it")


def export_name(model: str | None, adapter: str | None) -> str:
    from probllm.models import model_label

    label = model_label(model).rstrip("/").split("/")[-1]
    return f"{label}-{Path(adapter).name}" if adapter else label


def export_gguf(model: str | None, adapter: str | None, output: str, quant: str = "q8_0", dtype: str = "auto",
                overwrite: bool = False) -> dict:
    """The gguf format: merge the adapter if any (into a temporary folder), then convert tensor by tensor."""
    from probllm.export.merge import merged_source
    from probllm.models import model_label

    out = Path(output)
    check_output_file(out, overwrite)
    if quant not in GGUF_QUANTS:
        raise UsageError(f"--quant {quant}: choose one of {', '.join(GGUF_QUANTS)}")
    with merged_source(model, adapter, dtype, out.parent) as folder:
        architecture(read_config(folder), model)
        log(f"probllm export: writing {out} ({quant})")
        facts = write_gguf(folder, out, quant, export_name(model, adapter), model)
    return {"output": str(out), "model": model_label(model), "adapter": adapter, "quant": quant, **facts,
            "size_mb": round(out.stat().st_size / 2**20, 1)}


def gguf_tensors(path: str) -> Iterator[tuple[str, tuple, str]]:
    """(name, shape, type) of every tensor in a GGUF file, for checks and comparisons."""
    import gguf

    for t in gguf.GGUFReader(path).tensors:
        yield t.name, tuple(int(n) for n in t.shape), t.tensor_type.name
