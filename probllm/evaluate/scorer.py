"""eval's three scoring methods over any `LM` of probllm.lm: a local model (`HFLM`), an endpoint
(`--backend openai`) or llama.cpp (a GGUF export) all go through the same calls, chosen by what the model
declares in `capabilities`, never by which class it is.

- `loglik`: `lm.loglikelihood([(context, continuation), ...])` for every choice of every question of a batch.
  The backend does the rest, as lm-eval's HFLM does: the local one encodes each pair as lm-eval's
  `_encode_pair`, runs every prompt once with its choices packed after it, and sorts and packs the batch
  itself (probllm/lm/hf_scoring.py); an endpoint gets `/v1/completions` with echo + logprobs + max_tokens 0
  (what vLLM serves and lm-eval's `local-completions` uses).
- `letter`: the same request, with the option letters (" A", " B", ...) as the continuations. An endpoint that
  does not echo prompt log-probs but declares `next_token_logprobs` is asked for the top log-probs of a
  one-token completion instead (a letter outside its top 20 scores -inf).
- `generate`: a plain completion of the chain-of-thought prompt; with `--chat-template`, the chat is rendered
  by the model's own template where the model is local (`render_chat` capability) or sent as a chat to an
  endpoint, which applies its own.

The `LM` interface is asynchronous (the same objects serve HTTP); eval is a plain loop over batches, so each
call runs to completion on one event loop kept for the scorer's lifetime (a local model's batcher lives on it).
"""

from __future__ import annotations

import asyncio

from probllm.evaluate.templates import Prompt
from probllm.lm.base import (COMPLETIONS, LOGLIKELIHOOD, NEXT_TOKEN_LOGPROBS, RENDER_CHAT, FatalBackendError)

GREEDY = {"temperature": 0.0, "top_p": 1.0, "seed": 0}


class ChatPrompt(str):
    """A prompt that is a chat, for an endpoint that applies its own template: its text for display and length,
    its messages for the request."""

    messages: list[dict]


class MCQScorer:
    """An `LM` seen as eval needs it. `scoring_stats` are the backend's counts of passes and tokens (a local
    model's packed scorer fills them; an endpoint has none)."""

    def __init__(self, lm, label: str = ""):
        self.lm = lm
        self.label = label or getattr(lm, "model", "")
        self._no_echo = False
        self._runner = asyncio.Runner()

    @property
    def stats(self) -> dict:
        return self.lm.scoring_stats

    @property
    def shared_prefix_tokens(self) -> int:
        return self.stats.get("shared_prefix_tokens", 0)

    def __enter__(self) -> "MCQScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._runner.run(self.lm.aclose())
        finally:
            self._runner.close()

    def _run(self, coro):
        return self._runner.run(coro)

    def _gather(self, coros):
        async def all_of():
            return await asyncio.gather(*coros)

        return self._run(all_of())

    # ---- prompts

    def length(self, prompt: Prompt | str) -> int:
        """What batches are sorted by (similar lengths together): the model's own measure of the requests (a
        local model's tokens; an endpoint's characters); a generation prompt's characters."""
        if isinstance(prompt, str):
            return len(prompt)
        return self.lm.request_length(prompt.context, prompt.continuations)

    def chat(self, messages: list[dict]) -> str:
        """The prompt text of a chat: rendered by the model's template where the model is local, else a chat the
        endpoint templates itself (which only a generation can use)."""
        if RENDER_CHAT in self.lm.capabilities:
            return self.lm.render(messages)
        prompt = ChatPrompt("\n\n".join(m["content"] for m in messages))
        prompt.messages = messages
        return prompt

    # ---- loglik and letter

    def loglik_greedy(self, prompts: list[Prompt]) -> list[list[tuple[float, bool]]]:
        """(summed log-prob, is greedy) of every continuation of every prompt: one request for the batch."""
        if LOGLIKELIHOOD not in self.lm.capabilities:
            raise FatalBackendError(f"the {self.lm.name} backend cannot score log-likelihoods: use --method generate")
        requests = [(p.context, c) for p in prompts for c in p.continuations]
        flat = self._run(self.lm.loglikelihood(requests))
        out, i = [], 0
        for p in prompts:
            out.append(flat[i: i + len(p.continuations)])
            i += len(p.continuations)
        return out

    def loglik(self, prompts: list[Prompt]) -> list[list[float]]:
        return [[s for s, _ in scored] for scored in self.loglik_greedy(prompts)]

    def letter_scores(self, prompts: list[Prompt]) -> list[list[float]]:
        """The option letters' log-probs as the continuation of the prompt (exact where the model scores
        log-likelihoods); else from the top next-token log-probs of a one-token completion."""
        if not self._no_echo:
            try:
                return self.loglik(prompts)
            except FatalBackendError:
                if NEXT_TOKEN_LOGPROBS not in self.lm.capabilities:
                    raise
                self._no_echo = True

        async def one(p: Prompt) -> list[float]:
            context = p.context.rstrip()
            moved = p.context[len(context):]
            tops = await self.lm.next_token_logprobs(context)
            scores = []
            for c in p.continuations:
                token = moved + c
                scores.append(max((v for k, v in tops.items() if k == token or k.strip() == token.strip()),
                                  default=float("-inf")))
            return scores

        return self._gather([one(p) for p in prompts])

    # ---- generate

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers, all prompts of the batch at once (a local model batches them into one generate)."""
        params = {"max_tokens": max_new_tokens, **GREEDY}

        async def one(p: str) -> str:
            if isinstance(p, ChatPrompt):
                return await self.lm.chat(p.messages, params)
            if COMPLETIONS not in self.lm.capabilities:
                raise FatalBackendError(f"the {self.lm.name} backend cannot complete plain prompts")
            return await self.lm.complete(p, params)

        return self._gather([one(p) for p in prompts])


def local_scorer(model, tokenizer, label: str = "", **tuning) -> MCQScorer:
    """An already loaded transformers model (and its tokenizer) as eval's scorer; `tuning` goes to the packed
    scorer (`probllm.lm.hf_scoring.score_groups`: batch_tokens, max_rows, min_shared_prefix, row_tokens)."""
    from probllm.lm.hf_backend import HFLM

    return MCQScorer(HFLM.from_loaded(model, tokenizer, label=label, scoring_tuning=tuning))
