"""A chat message, defined once: what `serve` accepts in a request's `messages` and what `dpo`/`kto` accept in a
preference pair's prompt and completions.

`{"role", "content"}` with OpenAI's roles (`developer` is its newer name for `system`), the content a string or
OpenAI's content parts of which only text is understood (joined); other fields are ignored, as OpenAI does.
Types are strict: `1` is not a string. `parse_messages` checks a record's field with the same model and reports
the first problem as a RecordError naming the field (`chosen[1].role`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator

ROLES = ("system", "developer", "user", "assistant", "tool")


def text_content(value: Any) -> Any:
    """A message's content: a string, or content parts of which only text is understood (joined)."""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    if not isinstance(value, str):
        raise ValueError(f"must be a string or text parts, got {type(value).__name__}")
    return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal[ROLES]
    content: Annotated[str, BeforeValidator(text_content)]

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, role: str) -> str:  # OpenAI's newer name for the system message
        return "system" if role == "developer" else role


def parse_messages(value: Any, field: str) -> list[dict]:
    """A record field holding a non-empty message list, as plain `{"role", "content"}` dicts; a RecordError
    naming the field and the message otherwise."""
    from probllm.io import RecordError

    if not isinstance(value, list) or not value:
        raise RecordError("expected a non-empty list of messages", field=field)
    out = []
    for i, raw in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(raw, dict):
            raise RecordError("expected a message object", field=where)
        try:
            message = ChatMessage.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            name = ".".join(str(p) for p in first.get("loc", ()))
            text = "is required" if first.get("type") == "missing" else \
                str(first.get("msg", "is invalid")).removeprefix("Value error, ")
            if first.get("type") == "literal_error":
                text = f"must be one of {', '.join(ROLES)}"
            raise RecordError(text, field=f"{where}.{name}" if name else where) from None
        out.append({"role": message.role, "content": message.content})
    return out
