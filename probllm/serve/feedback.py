"""`serve --feedback FILE.sqlite`: the routes through which the chat page records students' votes.

- `GET /v1/feedback/config`: what the page should offer (ratings; compare mode and how its two answers differ).
- `POST /v1/feedback/rating`: thumbs up/down (+ optional comment) on one answer.
- `POST /v1/feedback/comparison`: the verdict on two answers shown side by side (overall and the four criteria).

Same API key and error shape as the other /v1 routes (`check_key` and `APIError` come from the app). Each vote is
committed (probllm/feedback.py) before the 200 goes out; the write runs on a worker thread, off the event loop
where generation streams. Nothing about the client (address, agent) is stored: only what the body says, and its
session is a random id the page made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from starlette.concurrency import run_in_threadpool

from probllm.feedback import CRITERIA, FeedbackStore, VoteConflict

# How compare mode makes its two answers: the page sends both requests itself and records each response's model.
COMPARE_MODES = {
    "samples": "two sampled answers to the same question (different seeds, temperature > 0)",
    "notes": "one answer with the retrieved notes, one without (`probllm: {retrieve: false}`)",
}
COMPARE_TEMPERATURE = 0.8  # samples mode, when the page's address sets no temperature of its own
MAX_BODY_BYTES = 2_000_000  # a vote with its conversation and passages is a few kB; refuse what cannot be one

Verdict = Literal["A", "B", "AB", "None"]
Id = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$", description="random, made by the page")
Text = Field(max_length=200_000)


@dataclass(frozen=True)
class FeedbackConfig:
    """What `serve --feedback/--compare/--compare-by` asked for: the store, and the compare mode (None: off)."""

    store: FeedbackStore
    compare: str | None = None

    def __post_init__(self):
        if self.compare is not None and self.compare not in COMPARE_MODES:
            raise ValueError(f"compare mode is one of {', '.join(COMPARE_MODES)}")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # a newer page may send more; what is stored is listed here


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str = Text


class _Vote(_Body):
    vote_id: str = Id
    session: str = Id
    messages: list[Message] = Field(min_length=1, max_length=200,
                                    description="the conversation up to the question, which is the last message")
    comment: str = Field("", max_length=4000)

    @field_validator("messages")
    @classmethod
    def _ends_with_question(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "user" or not messages[-1].content.strip():
            raise ValueError("the last message must be the user's question")
        return messages


class Answer(_Body):
    text: str = Field(min_length=1, max_length=200_000)
    model: str = Field(min_length=1, max_length=300)
    settings: dict[str, Any] = Field(default_factory=dict)
    sources: list[dict[str, Any]] = Field(default_factory=list, max_length=100)


class RatingVote(_Vote):
    answer: Answer
    rating: Literal["up", "down"]


class Criteria(_Body):
    correctness: Verdict
    relevance: Verdict
    clarity: Verdict
    completeness: Verdict


class ComparisonVote(_Vote):
    answers: list[Answer] = Field(min_length=2, max_length=2, description="A (shown left), B (shown right)")
    overall: Verdict
    criteria: Criteria


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def feedback_router(config: FeedbackConfig, check_key: Callable, api_error: type):
    """The routes, bound to the app's key check and error class (an exception the app answers in OpenAI's
    shape: `api_error(status, message, param=..., code=...)`)."""
    router = APIRouter(prefix="/v1/feedback")

    async def parse(request: Request, model: type[BaseModel]):
        check_key(request)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise api_error(413, f"a vote is at most {MAX_BODY_BYTES} bytes", code="too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise api_error(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise api_error(400, "the body must be a JSON object")
        try:
            return model.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = _where(first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            raise api_error(400, f"'{where}': {message}" if where else message, param=where or None) from None

    async def store(put: Callable, **vote) -> dict:
        try:
            return await run_in_threadpool(lambda: put(**vote))
        except VoteConflict as e:
            raise api_error(409, str(e), param="vote_id", code="vote_conflict") from None

    @router.get("/config")
    async def feedback_config(request: Request):
        check_key(request)
        return {"object": "feedback.config", "ratings": True, "compare": config.compare is not None,
                "compare_by": config.compare, "compare_temperature": COMPARE_TEMPERATURE,
                "criteria": list(CRITERIA)}

    @router.post("/rating")
    async def rating(request: Request):
        vote: RatingVote = await parse(request, RatingVote)
        saved = await store(config.store.add_rating, vote_id=vote.vote_id, session=vote.session,
                            messages=[m.model_dump() for m in vote.messages], answer=vote.answer.text,
                            model=vote.answer.model, settings=vote.answer.settings, sources=vote.answer.sources,
                            rating=1 if vote.rating == "up" else -1, comment=vote.comment)
        return {"object": "feedback.rating", **saved}

    @router.post("/comparison")
    async def comparison(request: Request):
        if config.compare is None:
            raise api_error(404, "compare mode is off on this server (serve --compare turns it on)",
                            code="not_found")
        vote: ComparisonVote = await parse(request, ComparisonVote)
        saved = await store(config.store.add_comparison, vote_id=vote.vote_id, session=vote.session,
                            messages=[m.model_dump() for m in vote.messages],
                            answers=[a.model_dump() for a in vote.answers], overall=vote.overall,
                            criteria=vote.criteria.model_dump(), comment=vote.comment)
        return {"object": "feedback.comparison", **saved}

    return router
