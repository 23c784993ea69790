"""Preference pairs in every shape users bring, normalised to what TRL's DPOTrainer takes.

Accepted input forms (detected per record):
- TRL string form: `{"prompt": str, "chosen": str, "rejected": str}`;
- TRL conversational form: the same keys holding lists of `{"role", "content"}` messages;
- implicit prompt: `chosen`/`rejected` only (strings or message lists) that share their prompt as a prefix;
- LLaMA-Factory ShareGPT form: `{"conversations": [{"from", "value"}], "chosen": {"from", "value"},
  "rejected": {"from", "value"}}` (optionally with a `system` string).

Output: `{"prompt", "chosen", "rejected"}` either as strings (models without a chat template) or as message
lists, which TRL renders with the model's chat template. Both trainer and `reward-eval` go through `to_trl`, so they see the same tokens.

Unpaired records (`kto`; what `feedback export --kind ratings` writes, TRL's unpaired preference form):
`{"prompt", "completion", "label"}` with `label` a boolean (true: a good answer), `prompt` and `completion`
strings or message lists, the same two forms (and the same string-prompt hybrid) as the pairs above; rendered
by `to_trl` the same way.
"""

from __future__ import annotations

from typing import Any

from probllm.io import RecordError, Skip
from probllm.messages import parse_messages

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool", "function_call": "assistant"}


def _sharegpt_message(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise RecordError("expected a {from, value} object", field=field)
    role = value.get("from")
    if not isinstance(role, str) or role not in SHAREGPT_ROLES:
        raise RecordError(f"unknown 'from' {role!r} (expected one of {', '.join(sorted(SHAREGPT_ROLES))})",
                          field=field)
    if not isinstance(value.get("value"), str):
        raise RecordError("missing or non-string 'value'", field=field)
    return {"role": SHAREGPT_ROLES[role], "content": value["value"]}


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pair_form(record: dict) -> str:
    """Which of the accepted forms a record is in: sharegpt, conversational, string, implicit-conversational,
    implicit-string. Raises RecordError when it is none of them."""
    if "chosen" not in record:
        raise RecordError("missing", field="chosen")
    if "rejected" not in record:
        raise RecordError("missing", field="rejected")
    chosen = record["chosen"]
    if "conversations" in record or isinstance(chosen, dict):
        return "sharegpt"
    if isinstance(chosen, list):
        return "conversational" if "prompt" in record else "implicit-conversational"
    if isinstance(chosen, str):
        return "string" if "prompt" in record else "implicit-string"
    raise RecordError("expected a string, a message list or a {from, value} object", field="chosen")


def normalize_pair(record: dict) -> dict:
    """One input record to `{"prompt", "chosen", "rejected", "form"}`; strings stay strings, messages stay messages.

    Raises RecordError (with the field) for malformed records and Skip for pairs that teach nothing
    (chosen identical to rejected)."""
    form = pair_form(record)
    if form == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise RecordError("expected a non-empty list of {from, value} turns", field="conversations")
        prompt = [_sharegpt_message(t, f"conversations[{i}]") for i, t in enumerate(turns)]
        system = record.get("system")
        if isinstance(system, str) and system and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system})
        chosen = [_sharegpt_message(record["chosen"], "chosen")]
        rejected = [_sharegpt_message(record["rejected"], "rejected")]
    elif form == "conversational":
        prompt_value = record["prompt"]
        # A string prompt with message completions is a common hybrid: treat the prompt as one user turn.
        if isinstance(prompt_value, str):
            if not prompt_value:
                raise RecordError("is empty", field="prompt")
            prompt = [{"role": "user", "content": prompt_value}]
        else:
            prompt = parse_messages(prompt_value, "prompt")
        chosen = parse_messages(record["chosen"], "chosen")
        rejected = parse_messages(record["rejected"], "rejected")
    elif form == "implicit-conversational":
        full_chosen = parse_messages(record["chosen"], "chosen")
        full_rejected = parse_messages(record["rejected"], "rejected")
        k = 0
        while k < min(len(full_chosen), len(full_rejected)) - 1 and full_chosen[k] == full_rejected[k]:
            k += 1
        if k == 0:
            raise RecordError("chosen and rejected share no prompt messages (implicit-prompt form)", field="chosen")
        prompt, chosen, rejected = full_chosen[:k], full_chosen[k:], full_rejected[k:]
    elif form == "string":
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise RecordError("expected a string (chosen is a string)", field="prompt")
        if not prompt.strip():
            raise RecordError("is empty", field="prompt")
        chosen, rejected = record["chosen"], record["rejected"]
        if not isinstance(rejected, str):
            raise RecordError("expected a string (chosen is a string)", field="rejected")
    else:  # implicit-string
        full_chosen, full_rejected = record["chosen"], record["rejected"]
        if not isinstance(full_rejected, str):
            raise RecordError("expected a string (chosen is a string)", field="rejected")
        cut = _common_prefix(full_chosen, full_rejected)
        # Back up to a whitespace boundary so that a shared first word of the answers stays in the answers.
        while cut > 0 and not full_chosen[cut - 1].isspace():
            cut -= 1
        if cut == 0:
            raise RecordError("chosen and rejected share no prompt prefix (implicit-prompt form)", field="chosen")
        prompt, chosen, rejected = full_chosen[:cut], full_chosen[cut:], full_rejected[cut:]
    _check_completion(chosen, "chosen")
    _check_completion(rejected, "rejected")
    if chosen == rejected:
        raise Skip("chosen identical to rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "form": form}


def _check_completion(value: Any, field: str) -> None:
    text = value if isinstance(value, str) else "".join(m["content"] for m in value)
    if not text.strip():
        raise RecordError("is empty", field=field)


def _flatten(messages: list[dict]) -> str:
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)


def to_trl(pair: dict, has_chat_template: bool, answers: tuple[str, ...] = ("chosen", "rejected")) -> dict:
    """A normalised record in the form TRL tokenises: messages when the model has a chat template (explicit string
    prompts become one user turn), plain text otherwise (messages flattened as `Role: content`). `answers` names
    its answer fields: chosen and rejected for a pair, completion for an unpaired record."""
    prompt = pair["prompt"]
    if has_chat_template:
        # Every record becomes messages (one dataset cannot mix strings and message lists): string prompts,
        # implicit ones included, become one user turn.
        if isinstance(prompt, str):
            return {"prompt": [{"role": "user", "content": prompt}],
                    **{k: [{"role": "assistant", "content": pair[k]}] for k in answers}}
        return {"prompt": prompt, **{k: pair[k] for k in answers}}
    if isinstance(prompt, list):
        return {"prompt": _flatten(prompt) + "Assistant: ",
                **{k: "".join(m["content"] for m in pair[k]) for k in answers}}
    return {"prompt": prompt, **{k: pair[k] for k in answers}}


# ---------------------------------------------------------------------------------------------- unpaired records


def normalize_unpaired(record: dict) -> dict:
    """One unpaired record (`prompt`, `completion`, `label`) to `{"prompt", "completion", "label", "form"}`.

    String or message-list prompt and completion as for pairs (a string prompt with a message completion is one
    user turn); `label` must be a boolean. Raises RecordError naming the field."""
    for name in ("prompt", "completion", "label"):
        if name not in record:
            raise RecordError("missing", field=name)
    label = record["label"]
    if not isinstance(label, bool):
        raise RecordError("expected a boolean (true: a good answer, false: a bad one)", field="label")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(completion, list):
        form = "conversational"
        completion = parse_messages(completion, "completion")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RecordError("is empty", field="prompt")
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = parse_messages(prompt, "prompt")
    elif isinstance(completion, str):
        form = "string"
        if not isinstance(prompt, str):
            raise RecordError("expected a string (completion is a string)", field="prompt")
        if not prompt.strip():
            raise RecordError("is empty", field="prompt")
    else:
        raise RecordError("expected a string or a message list", field="completion")
    _check_completion(completion, "completion")
    return {"prompt": prompt, "completion": completion, "label": label, "form": form}
