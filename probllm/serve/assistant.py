"""The course assistant's part of a chat request: retrieve passages of the notes for the question, quote them in
the prompt the way `ask` does, and list them as the answer's `sources`. The engine behind is any `Engine`."""

from __future__ import annotations

import asyncio

from probllm.lm.serving import Engine


def with_sources(messages: list[dict], passages: list[dict]) -> list[dict]:
    """The chat with the last user message grounded in the passages, the way `ask` builds its prompt. Our system
    message (how to use the notes) comes first, then the client's own, which are kept."""
    from probllm.rag.ask import Question, build_messages

    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    ours, grounded = build_messages(Question(messages[last]["content"], passages=passages))
    theirs = [m for m in messages[:last] if m["role"] == "system"]
    history = [m for m in messages[:last] if m["role"] != "system"]
    if theirs:  # one system message: chat templates (and some engines) take only one, at the start
        ours = {"role": "system", "content": "\n\n".join([ours["content"], *(m["content"] for m in theirs)])}
    return [ours, *history, grounded, *messages[last + 1:]]


def source_records(passages: list[dict], documents=None) -> list[dict]:
    """The `sources` of a response: each passage with its page, its citation (`file, p. N > heading`) and, when
    the server serves the indexed files, the link to its document at that page."""
    from probllm.rag.retrieve import citation, location

    return [{"n": i, "id": p.get("id"), "score": p.get("score"), "text": p.get("text"), "source": p.get("source"),
             "heading": p.get("heading"), "page": p.get("page"), "location": location(p), "citation": citation(p),
             "document": documents.link(p) if documents else None} for i, p in enumerate(passages, 1)]


class ThreadRetriever:
    """A retriever living on one thread of its own: the index's SQLite connection may only be used on the thread
    that opened it, and searches of concurrent requests then run one after the other, off the event loop."""

    def __init__(self, factory):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever")
        self._retriever = self._pool.submit(factory).result()  # errors (no such index) surface here
        self.index = getattr(self._retriever, "index", None)

    async def search(self, queries: list[str], k: int) -> list[list[dict]]:
        return await asyncio.wrap_future(self._pool.submit(self._retriever.search, queries, k))

    async def call(self, fn, *args):
        """Run `fn(retriever, *args)` on the retriever's thread (other routes reading the index use this)."""
        return await asyncio.wrap_future(self._pool.submit(fn, self._retriever, *args))


async def ground(messages: list[dict], retriever: ThreadRetriever | None, engine: Engine, top_k: int,
                 room_for_answer: int, max_model_len: int | None,
                 documents=None) -> tuple[list[dict], list[dict]]:
    """(the messages to send, the sources) for a chat. The last user question is searched with the one before
    it, as `chat` does; passages the user did not write must not make the request fail, so the least relevant
    are dropped until the prompt leaves room for the answer."""
    if retriever is None:
        return messages, []
    from probllm.rag.retrieve import follow_up_query

    questions = [m["content"] for m in messages if m["role"] == "user"]
    query = follow_up_query(questions[-1], questions[-2] if len(questions) > 1 else None)
    passages = (await retriever.search([query], top_k))[0]
    while passages:
        grounded = with_sources(messages, passages)
        if max_model_len is None or \
                await engine.count_chat_tokens(grounded) + room_for_answer <= max_model_len:
            return grounded, source_records(passages, documents)
        passages = passages[:-1]
    return messages, []
