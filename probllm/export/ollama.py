"""`export --format ollama`: a folder with the GGUF file and a Modelfile, for `ollama create NAME -f DIR/Modelfile`.

The Modelfile's TEMPLATE is the model's Jinja chat template translated into Ollama's Go template syntax. Chat
templates are programs, so the translation does not parse Jinja: it renders the template on marker messages and
reads off what it writes around each role's content (per-message prefix and suffix), what comes once before the
first message, the generation prompt, and a default system prompt the template adds when none is given (SmolLM2
does). It then checks that those pieces rebuild the template's own output for a test conversation; a template
that is not a per-message one (Llama 2's system prompt folded into the first user turn, say) is not translated,
and the Modelfile leaves TEMPLATE out (Ollama then uses the template it knows for the GGUF's chat template).
The default system prompt becomes SYSTEM: Ollama puts it first when a conversation has no system message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from probllm.io import UsageError, log

MODELFILE = "Modelfile"
# Ollama's context default is small; a model's full context (32k, 128k) would reserve far more memory than a
# laptop has. The user raises it with `PARAMETER num_ctx` or `/set parameter num_ctx`.
MAX_NUM_CTX = 4096
_MARK = {"system": "\x00SYSTEM\x00", "user": "\x00USER\x00", "assistant": "\x00ASSISTANT\x00"}


@dataclass
class ChatLayout:
    """A per-message chat template: prefix + content + suffix per role, a preamble, a generation prompt."""

    preamble: str
    roles: dict          # role -> (prefix, suffix)
    generation: str
    default_system: str | None


class NotPerMessage(Exception):
    """The chat template does not decompose into per-message pieces."""


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _split(piece: str, role: str) -> tuple[str, str]:
    if piece.count(_MARK[role]) != 1:
        raise NotPerMessage(f"the {role} content is not written once per message")
    before, _, after = piece.partition(_MARK[role])
    return before, after


def chat_layout(tokenizer) -> ChatLayout:
    """Read the pieces of a chat template off renderings of marker messages (see the module docstring)."""
    msg = {role: {"role": role, "content": mark} for role, mark in _MARK.items()}
    try:
        _render(tokenizer, [msg["system"], msg["user"]], False)
        has_system = True
    except Exception:  # templates that refuse a system role raise their own exception types
        has_system = False
    conversation = ([msg["system"]] if has_system else []) + [msg["user"], msg["assistant"], msg["user"]]
    # Every message after the first: what rendering one more message appends is that message's piece.
    roles: dict[str, tuple[str, str]] = {}
    previous = _render(tokenizer, conversation[:1], False)
    for k in range(2, len(conversation) + 1):
        text = _render(tokenizer, conversation[:k], False)
        if not text.startswith(previous):
            raise NotPerMessage("a later message changes what earlier ones rendered")
        role = conversation[k - 1]["role"]
        pair = _split(text[len(previous):], role)
        if roles.setdefault(role, pair) != pair:
            raise NotPerMessage(f"{role} messages are not all written the same way")
        previous = text
    # The first message also carries what comes once: a preamble (bos) and, for a user-first conversation,
    # the default system block some templates add.
    user_prefix, user_suffix = roles["user"]
    before, after = _split(_render(tokenizer, [msg["user"]], False), "user")
    if not before.endswith(user_prefix) or after != user_suffix:
        raise NotPerMessage("the first user message is written differently from the others")
    user_head = before[: len(before) - len(user_prefix)]
    default_system = None
    if has_system:
        system_before, system_suffix = _split(_render(tokenizer, conversation[:1], False), "system")
        if system_before.startswith(user_head):  # no default system block: the user-first head is the preamble
            preamble = user_head
        elif user_head.startswith(system_before) and user_head.endswith(system_suffix):
            # preamble + system prefix + DEFAULT + system suffix. Ollama always puts SYSTEM first, so where the
            # preamble ends and the system prefix begins never matters: keep them together as the prefix.
            preamble = ""
            default_system = user_head[len(system_before): len(user_head) - len(system_suffix)]
        else:
            raise NotPerMessage("a user-first conversation starts with text that is neither the preamble nor a "
                                "system block")
        roles["system"] = (system_before[len(preamble):], system_suffix)
    else:
        preamble = user_head
    with_prompt = _render(tokenizer, conversation, True)
    without = _render(tokenizer, conversation, False)
    if not with_prompt.startswith(without):
        raise NotPerMessage("the generation prompt is not appended at the end")
    layout = ChatLayout(preamble, roles, with_prompt[len(without):], default_system)
    _check(tokenizer, layout, has_system)
    return layout


def render_layout(layout: ChatLayout, messages: list[dict], generation: bool) -> str:
    """What the translated template writes (Ollama's side: SYSTEM goes first when no system message is given)."""
    if layout.default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": layout.default_system}, *messages]
    out = [layout.preamble] if messages else []
    for m in messages:
        prefix, suffix = layout.roles[m["role"]]
        out += [prefix, m["content"], suffix]
    if generation and messages and messages[-1]["role"] != "assistant":
        out.append(layout.generation)
    return "".join(out)


def _check(tokenizer, layout: ChatLayout, has_system: bool) -> None:
    tests = [[{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
              {"role": "user", "content": "And 3 + 3?"}]]
    if has_system:
        tests.append([{"role": "system", "content": "Be brief."}, *tests[0]])
    for messages in tests:
        if render_layout(layout, messages, True) != _render(tokenizer, messages, True):
            raise NotPerMessage("the pieces do not rebuild the template's own output")


def _go_literal(text: str) -> str:
    """Template text as Go's text/template writes it: literally, except `{{` which would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(layout: ChatLayout) -> str:
    """Ollama's TEMPLATE: a range over .Messages with one branch per role, no whitespace trimming (the pieces'
    newlines are the model's)."""
    branches = []
    for i, (role, (prefix, suffix)) in enumerate(layout.roles.items()):
        keyword = "if" if i == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_go_literal(prefix)}{{{{ .Content }}}}'
                        f'{_go_literal(suffix)}')
    return ("{{ range $i, $_ := .Messages }}"
            + (f"{{{{ if eq $i 0 }}}}{_go_literal(layout.preamble)}{{{{ end }}}}" if layout.preamble else "")
            + "".join(branches) + "{{ end }}"
            + f'{{{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}}}'
            + f"{_go_literal(layout.generation)}{{{{ end }}}}"
            + "{{ end }}")


def _quoted(text: str) -> str:
    if '"""' in text:
        raise UsageError('the chat template contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def stop_words(tokenizer, layout: ChatLayout | None, folder: str) -> list[str]:
    """The end-of-turn strings: the eos token(s) of the tokenizer and generation config, and special tokens
    that close an assistant turn in the template."""
    stops: list[str] = []
    ids = []
    config = Path(folder, "generation_config.json")
    if config.exists():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    for token in [tokenizer.eos_token, *tokenizer.convert_ids_to_tokens([i for i in ids if i is not None])]:
        if token and token not in stops:
            stops.append(token)
    if layout is not None:
        suffix = layout.roles["assistant"][1]
        for token in tokenizer.all_special_tokens:
            if token in suffix and token not in stops:
                stops.append(token)
    return stops


def parameters(folder: str) -> list[tuple[str, object]]:
    """Sampling settings the model ships (generation_config.json) in Ollama's names, and a context length."""
    config = json.loads(Path(folder, "config.json").read_text())
    gen_path = Path(folder, "generation_config.json")
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    params: list[tuple[str, object]] = []
    for hf, ollama in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                       ("repetition_penalty", "repeat_penalty")):
        if gen.get(hf) is not None and gen.get("do_sample", True):
            params.append((ollama, gen[hf]))
    context = config.get("max_position_embeddings")
    if context:
        params.append(("num_ctx", min(int(context), MAX_NUM_CTX)))
    return params


def modelfile(gguf_name: str, folder: str) -> tuple[str, ChatLayout | None]:
    from probllm.models import load_tokenizer

    tokenizer = load_tokenizer(folder, padding_side="right")
    layout = None
    lines = [f"# Written by probllm export. Create the model with: ollama create NAME -f {MODELFILE}",
             f"FROM ./{gguf_name}", ""]
    if getattr(tokenizer, "chat_template", None):
        try:
            layout = chat_layout(tokenizer)
        except NotPerMessage as e:
            log(f"probllm export: the chat template is not translated to an Ollama TEMPLATE ({e}); Ollama will "
                f"use the template it knows for this GGUF's chat template, if any")
    if layout is not None:
        lines += [f"TEMPLATE {_quoted(go_template(layout))}", ""]
        if layout.default_system is not None:
            lines += [f"SYSTEM {_quoted(layout.default_system)}", ""]
    for stop in stop_words(tokenizer, layout, folder):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    for key, val in parameters(folder):
        lines.append(f"PARAMETER {key} {val}")
    return "\n".join(lines) + "\n", layout


def export_ollama(model: str | None, adapter: str | None, output: str, quant: str = "q8_0", dtype: str = "auto",
                  name: str | None = None, overwrite: bool = False) -> dict:
    """GGUF + Modelfile in `output` (a folder, written under a temporary name and then renamed)."""
    import shutil
    import tempfile

    from probllm.export import GGUF_QUANTS
    from probllm.export.gguf_file import architecture, export_name, read_config, write_gguf
    from probllm.export.merge import EXPORT_MARKER, check_output_folder, merged_source, provenance, publish
    from probllm.models import model_label

    if quant not in GGUF_QUANTS:
        raise UsageError(f"--quant {quant}: choose one of {', '.join(GGUF_QUANTS)}")
    out = Path(output)
    check_output_folder(out, overwrite)
    label = export_name(model, adapter)
    name = name or label.lower().replace("_", "-")
    gguf_name = f"{label}.{quant}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with merged_source(model, adapter, dtype, out.parent) as folder:
            architecture(read_config(folder), model)
            prov = provenance(model, folder, adapter, None)
            log(f"probllm export: writing {out / gguf_name} ({quant}) and {out / MODELFILE}")
            facts = write_gguf(folder, tmp / gguf_name, quant, label, model)
            text, layout = modelfile(gguf_name, folder)
        (tmp / MODELFILE).write_text(text, encoding="utf-8")
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": "ollama", "quant": quant, "gguf": gguf_name,
                                                     **prov}, indent=2) + "\n", encoding="utf-8")
        publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    create = f"ollama create {name} -f {out / MODELFILE}"
    log(f"probllm export: then `{create}` and `ollama run {name}`")
    return {"output": str(out), "model": model_label(model), "adapter": adapter, "quant": quant,
            "gguf": str(out / gguf_name), "modelfile": str(out / MODELFILE), "template": layout is not None,
            "create": create, "size_mb": round((out / gguf_name).stat().st_size / 2**20, 1),
            "tensors": facts["tensors"]}
