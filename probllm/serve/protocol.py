"""The HTTP side of `probllm serve`, as data: pydantic models of every request and response, and OpenAI's error
shape `{"error": {"message", "type", "param", "code"}}`.

As OpenAI (and vLLM's `entrypoints/openai/protocol.py`) do, fields a model does not know are ignored, not
refused: clients send `user`, `logit_bias`, `stream_options`... Types are strict (`"10"` is not a number, `1` is
not `true`); a request that does not validate is a 400 whose `param` names the field (`messages[0].content`).
Unions are avoided in the request models: pydantic names the union member in an error's location, so fields
that take several shapes (`stop`, `prompt`, a message's `content`) are normalised by a validator instead.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from probllm.messages import ChatMessage  # noqa: F401  (the one message shape, shared with training data)

# ---------------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """A request answered with an error in OpenAI's shape (raised by routes, engines' errors become one)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def field_path(loc: tuple) -> str:
    """`("body", "messages", 0, "content")` -> `messages[0].content` (the `param` OpenAI's errors carry)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(errors: list[dict]) -> APIError:
    """The first of pydantic's errors for a request body, as one 400 naming the field."""
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
    param = field_path(tuple(first.get("loc", ())))
    if not param:
        return APIError(400, "the body must be a JSON object")
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "missing":
        message = "is required"
    return APIError(400, f"'{param}' {message[0].lower() + message[1:] if message else 'is invalid'}", param=param)


# ---------------------------------------------------------------------------------------------------- requests


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def _stop_list(value: Any) -> Any:
    """`stop`: a string or up to four strings, as OpenAI takes it; always a list here."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError("must be a string or an array of strings")
    if len(value) > 4:
        raise ValueError("takes at most 4 sequences")
    return [s for s in value if s]


Stop = Annotated[list[str], BeforeValidator(_stop_list)]


class ProbllmOptions(OpenAIModel):
    """probllm's own request options (`"probllm": {...}`): `retrieve: false` skips the notes for this request."""

    retrieve: bool = True


class SamplingFields(OpenAIModel):
    """What generation requests share. `null` means the default, as OpenAI reads it."""

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    stop: Stop = []
    n: int | None = Field(None, ge=1)
    stream: bool | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n > 1:
            raise ValueError("n > 1 is not supported by this server: send n requests (with different seeds)")
        return n


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    probllm: ProbllmOptions | None = None

    @field_validator("messages")
    @classmethod
    def _has_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" for m in messages):
            raise ValueError("must hold a user message")
        return messages


def _prompts(value: Any) -> Any:
    """`prompt`: a string, token ids, or an array of either; always a list of prompts here."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string, an array of strings, or token ids")
    for p in value:
        if isinstance(p, str):
            if not p:
                raise ValueError("must not be empty")
        elif not (isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)):
            raise ValueError("must be a string, an array of strings, or token ids")
    return value


class CompletionRequest(SamplingFields):
    prompt: Annotated[list[Any], BeforeValidator(_prompts)]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


# --------------------------------------------------------------------------------------------------- responses


class Source(BaseModel):
    """A passage of the notes an answer is grounded in; `n` is the number the answer cites it by."""

    n: int
    id: str | None = None
    score: float | None = None
    text: str | None = None
    source: str | None = None
    heading: str | None = None
    page: int | None = None            # 1-based page or slide of a paged document (PDF, .pptx)
    location: str | None = None        # `file, p. N`
    citation: str | None = None        # `file, p. N > heading`: what the page and the terminal show
    document: str | None = None        # the served file at that page (`documents/ID#page=N`), when it has one


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "probllm"
    max_model_len: int | None = None  # as vLLM lists it: clients size their prompts by it


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sources: list[Source] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")  # the engine's own counters

    status: str
    model: str
    generations: int | None = None
    batches: int | None = None
