"""`serve --feedback FILE.sqlite`: the routes through which the chat page records students' votes.

- `GET /v1/feedback/config`: what the page should offer (ratings; compare mode and how its two answers differ).
- `POST /v1/feedback/rating`: thumbs up/down (+ optional comment) on one answer.
- `POST /v1/feedback/comparison`: the verdict on two answers shown side by side (overall and the four criteria).

A router of its own, which `build_app` (probllm/serve/server.py) passes to `create_app` only when --feedback is
given. Same API key (`require_key`), JSON and size checks (the app's Guard) and error shape (pydantic bodies: a 400
naming the field) as the other /v1 routes. Each vote is committed (probllm/feedback.py) before the 200 goes out;
the write runs on a worker thread, off the event loop where answers stream. Nothing about the client (address,
agent) is stored: only what the body says, and its session is a random id the page made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends
from pydantic import Field, field_validator
from starlette.concurrency import run_in_threadpool

from probllm.feedback import CRITERIA, FeedbackStore, VoteConflict
from probllm.serve.app import require_key
from probllm.serve.protocol import APIError, OpenAIModel

# How compare mode makes its two answers: the page sends both requests itself and records each response's model.
COMPARE_MODES = {
    "samples": "two sampled answers to the same question (different seeds, temperature > 0)",
    "notes": "one answer with the retrieved notes, one without (`probllm: {retrieve: false}`)",
}
COMPARE_TEMPERATURE = 0.8  # samples mode, when the page's address sets no temperature of its own

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


class Message(OpenAIModel):  # fields a newer page may add are ignored: what is stored is listed here
    role: Literal["system", "user", "assistant"]
    content: str = Text


class _Vote(OpenAIModel):
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


class Answer(OpenAIModel):
    text: str = Field(min_length=1, max_length=200_000)
    model: str = Field(min_length=1, max_length=300)
    settings: dict[str, Any] = Field(default_factory=dict)
    sources: list[dict[str, Any]] = Field(default_factory=list, max_length=100)


class RatingVote(_Vote):
    answer: Answer
    rating: Literal["up", "down"]


class Criteria(OpenAIModel):
    correctness: Verdict
    relevance: Verdict
    clarity: Verdict
    completeness: Verdict


class ComparisonVote(_Vote):
    answers: list[Answer] = Field(min_length=2, max_length=2, description="A (shown left), B (shown right)")
    overall: Verdict
    criteria: Criteria


def feedback_router(config: FeedbackConfig) -> APIRouter:
    """The routes, bound to one store and compare setting."""
    router = APIRouter(prefix="/v1/feedback", dependencies=[Depends(require_key)])

    async def store(put: Callable, **vote) -> dict:
        try:
            return await run_in_threadpool(lambda: put(**vote))
        except VoteConflict as e:
            raise APIError(409, str(e), param="vote_id", code="vote_conflict") from None

    @router.get("/config")
    async def feedback_config():
        return {"object": "feedback.config", "ratings": True, "compare": config.compare is not None,
                "compare_by": config.compare, "compare_temperature": COMPARE_TEMPERATURE,
                "criteria": list(CRITERIA)}

    @router.post("/rating")
    async def rating(vote: RatingVote):
        saved = await store(config.store.add_rating, vote_id=vote.vote_id, session=vote.session,
                            messages=[m.model_dump() for m in vote.messages], answer=vote.answer.text,
                            model=vote.answer.model, settings=vote.answer.settings, sources=vote.answer.sources,
                            rating=1 if vote.rating == "up" else -1, comment=vote.comment)
        return {"object": "feedback.rating", **saved}

    @router.post("/comparison")
    async def comparison(vote: ComparisonVote):
        if config.compare is None:
            raise APIError(404, "compare mode is off on this server (serve --compare turns it on)",
                           code="not_found")
        saved = await store(config.store.add_comparison, vote_id=vote.vote_id, session=vote.session,
                            messages=[m.model_dump() for m in vote.messages],
                            answers=[a.model_dump() for a in vote.answers], overall=vote.overall,
                            criteria=vote.criteria.model_dump(), comment=vote.comment)
        return {"object": "feedback.comparison", **saved}

    return router
