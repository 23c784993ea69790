"""`eval`'s scorer interface over any `LM` of probllm.lm: how `eval --backend openai` scores a served model.

The three methods map onto the model layer:
- `loglik`: `lm.loglikelihood([(context, continuation), ...])`, one request per batch of questions (for an
  endpoint: `/v1/completions` with echo + logprobs + max_tokens 0, as vLLM serves and lm-eval's
  `local-completions` uses);
- `letter`: the log-probs of the option letters as the next token: from the echoed prompt log-probs where the
  server gives them, else from the top log-probs of a one-token completion (no echo needed);
- `generate`: plain completion of the chain-of-thought prompt, or a chat when `--chat-template` is asked (the
  server applies its own template).
"""

from __future__ import annotations

import asyncio

from probllm.evaluate.templates import Prompt
from probllm.lm.base import FatalBackendError


class ChatPrompt(str):
    """A prompt that is a chat: its text for display and length, its messages for the endpoint."""

    messages: list[dict]


class LMScorer:
    def __init__(self, lm, label: str):
        self.lm = lm
        self.label = label
        self.device = "endpoint"
        self.max_length = None
        self._no_echo = False
        self._runner = asyncio.Runner()

    def close(self) -> None:
        try:
            self._runner.run(self.lm.aclose())
        finally:
            self._runner.close()

    def _run(self, coro):
        return self._runner.run(coro)

    # Only used to sort prompts by length (batches of similar lengths); the endpoint tokenizes for itself.
    def encode(self, text: str) -> list[str]:
        return text.split()

    def chat(self, messages: list[dict]) -> str:
        prompt = ChatPrompt("\n\n".join(m["content"] for m in messages))
        prompt.messages = messages
        return prompt

    def loglik(self, prompts: list[Prompt]) -> list[list[float]]:
        requests = [(p.context, c) for p in prompts for c in p.continuations]
        flat = self._run(self.lm.loglikelihood(requests))
        out, i = [], 0
        for p in prompts:
            out.append([s for s, _ in flat[i: i + len(p.continuations)]])
            i += len(p.continuations)
        return out

    def letter_scores(self, prompts: list[Prompt]) -> list[list[float]]:
        """The option letters' log-probs as the next token: from prompt log-probs where the server echoes them
        (exact, as the local scorer), else from the top next-token log-probs of a one-token completion (a letter
        outside the server's top 20 scores -inf)."""
        if not self._no_echo:
            try:
                return self.loglik(prompts)
            except FatalBackendError:
                if not hasattr(self.lm, "next_token_logprobs"):
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

        async def all_of():
            return await asyncio.gather(*(one(p) for p in prompts))

        return self._run(all_of())

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        params = {"max_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0, "seed": 0}

        async def one(p: str) -> str:
            if isinstance(p, ChatPrompt):
                return await self.lm.chat(p.messages, params)
            return await self.lm.complete(p, params)

        async def all_of():
            return await asyncio.gather(*(one(p) for p in prompts))

        return self._run(all_of())
