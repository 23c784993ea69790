"""The serving protocol: what `probllm serve` asks of a model, and the local model behind it.

`probllm serve`'s routes talk to an `Engine`, never to a model's internals. An engine answers chats whole or
streamed with per-request sampling (`SamplingParams`: temperature, top_p, seed, stop, max_tokens), scores and
completes raw prompts (`/v1/completions`: echo + log-probs, what lm-eval's `local-completions` uses), counts a
chat's prompt tokens (so the assistant can fit retrieved passages), and says what it can do (`capabilities`)
and what it serves (`card()`: max_model_len...). Two engines implement it:

- `LocalEngine` (here): a transformers model in this process (`HFLM`: batched, streamed generation).
- `UpstreamEngine` (probllm/lm/upstream.py): any OpenAI-compatible server (vLLM, llama.cpp, Ollama, transformers
  serve, another `probllm serve`), streams passed through token by token.

`SERVING_ENGINES` in probllm/lm/__init__.py is the registry `--backend` chooses from.

Engines report a request they cannot take with `EngineRequestError` (a 4xx, e.g. a prompt longer than the
context) and a model they cannot reach with `EngineUnavailable` (a 502/503); the server turns both into
OpenAI's error shape.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator

# Capabilities an engine declares (routes dispatch on these, never on hasattr).
CHAT = "chat"
STREAM = "stream"
COMPLETIONS = "completions"            # /v1/completions: raw prompts, echo + logprobs
COUNT_TOKENS = "count_tokens"          # exact prompt token counts (else the assistant estimates)

DEFAULT_MAX_TOKENS = 256               # a chat reply when the request does not say
DEFAULT_COMPLETION_TOKENS = 16         # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings. `max_tokens` None: as many as fit, up to the endpoint's default."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()

    def generation(self, max_tokens: int) -> dict:
        """The dict `HFLM` and `OpenAIBackend` take."""
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": 0 if self.seed is None else self.seed, "repetition_penalty": self.repetition_penalty}


@dataclass
class Finish:
    """The end of a streamed reply: why it ended and how many tokens went in and out (None: not known)."""

    reason: str = "stop"               # "stop" (end of text or a stop sequence) or "length"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class Reply:
    text: str
    finish: Finish = field(default_factory=Finish)


class EngineRequestError(Exception):
    """The engine refuses this request (a 4xx in OpenAI's shape): too long for the context, bad token ids..."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


class EngineUnavailable(Exception):
    """The model cannot be reached or failed (a 502 when an upstream answered with an error, 503 when it is
    unreachable or timed out): the request failed, the server keeps serving, and the next request tries again."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.message, self.status = message, status


class Engine:
    """The interface `probllm serve` uses. Subclasses set `capabilities` and implement the calls they declare."""

    name = "engine"
    capabilities: frozenset = frozenset()

    async def start(self) -> None:
        """Load the model or open the connection (called before the first request, and cheap afterwards)."""

    async def card(self) -> dict:
        """What the model card adds to its id, e.g. `{"max_model_len": 2048}` (raises EngineUnavailable)."""
        return {}

    async def count_chat_tokens(self, messages: list[dict]) -> int:
        """Prompt tokens of a chat; an estimate (4 characters a token) unless COUNT_TOKENS is declared."""
        return sum(len(m["content"]) for m in messages) // 4 + 8 * len(messages)

    def stream_chat(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[str | Finish]:
        """The reply in pieces of text as they are generated, then one `Finish`."""
        raise NotImplementedError

    async def chat(self, messages: list[dict], params: SamplingParams) -> Reply:
        pieces, finish = [], Finish()
        async with contextlib.aclosing(self.stream_chat(messages, params)) as stream:
            async for piece in stream:
                if isinstance(piece, Finish):
                    finish = piece
                else:
                    pieces.append(piece)
        return Reply("".join(pieces), finish)

    async def completions(self, prompts: list, params: SamplingParams, echo: bool = False,
                          logprobs: int | None = None) -> dict:
        """`/v1/completions` for prompts (strings or token id lists): `{"choices": [...], "usage": {...}}`."""
        raise EngineRequestError(f"the {self.name} engine has no /v1/completions", code="unsupported", status=404)

    def stats(self) -> dict:
        """Counters for /health."""
        return {}

    async def aclose(self) -> None:
        pass


class StopSequences:
    """Cuts streamed text at the first of the stop sequences, which never reach the client: text that may be
    the start of one is held back until the next piece says whether it is."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        """The text that can go out now (after a hit: what came before the stop sequence, then nothing)."""
        if not self.stops:
            return piece
        if self.hit:
            return ""
        self.buffer += piece
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.buffer = self.buffer[:cut], ""
            return out
        safe = len(self.buffer) - self.hold
        if safe <= 0:
            return ""
        out, self.buffer = self.buffer[:safe], self.buffer[safe:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.hit else self.buffer), ""
        return out

    def cut(self, text: str) -> tuple[str, bool]:
        """A whole text cut at the first stop sequence, and whether one was found."""
        out = self.feed(text) + self.flush()
        return out, self.hit


# ----------------------------------------------------------------------------------------------- local model


class LocalEngine(Engine):
    """A transformers model in this process (`HFLM`): concurrent requests share batched generate calls."""

    name = "hf"
    capabilities = frozenset({CHAT, STREAM, COMPLETIONS, COUNT_TOKENS})

    def __init__(self, lm):
        self.lm = lm

    async def start(self) -> None:
        await self.lm.ensure_loaded()

    async def card(self) -> dict:
        await self.start()
        return {"max_model_len": self.lm.max_length}

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.lm.encode_prompt(self.lm.render(messages))

    async def count_chat_tokens(self, messages: list[dict]) -> int:
        await self.start()
        return len(self._prompt_ids(messages))

    def _room(self, n_prompt: int, max_tokens: int | None, default: int, param: str) -> int:
        """The tokens this request may generate: the prompt must leave room in the context."""
        limit = self.lm.max_length
        if n_prompt >= limit:
            raise EngineRequestError(f"this model's maximum context length is {limit} tokens, but the prompt has "
                                     f"{n_prompt} tokens", param=param, code="context_length_exceeded")
        room = limit - n_prompt
        if max_tokens is None:
            return min(default, room)
        if max_tokens > room:
            raise EngineRequestError(f"this model's maximum context length is {limit} tokens: {n_prompt} in the "
                                     f"prompt plus max_tokens {max_tokens} is too many", param="max_tokens",
                                     code="context_length_exceeded")
        return max_tokens

    def _n_tokens(self, text: str) -> int:
        return len(self.lm.tok.encode(text, add_special_tokens=False)) if text else 0

    async def stream_chat(self, messages: list[dict], params: SamplingParams):
        await self.start()
        prompt_ids = self._prompt_ids(messages)
        max_tokens = self._room(len(prompt_ids), params.max_tokens, DEFAULT_MAX_TOKENS, "messages")
        stops = StopSequences(params.stop)
        text = ""
        # aclosing: leaving early (a stop sequence, a client gone) frees the request's row in its batch at once.
        async with contextlib.aclosing(self.lm.stream_ids(prompt_ids, params.generation(max_tokens))) as pieces:
            async for piece in pieces:
                out = stops.feed(piece)
                if out:
                    text += out
                    yield out
                if stops.hit:
                    break
        tail = stops.flush()
        if tail:
            text += tail
            yield tail
        n_out = self._n_tokens(text)
        yield Finish("stop" if stops.hit or n_out < max_tokens else "length", len(prompt_ids), n_out)

    def _encode(self, prompt) -> tuple[str, list[int], list[int]]:
        """(text, token ids, start offset of every token in the text) of a string or of token ids."""
        tok = self.lm.tok
        if isinstance(prompt, str):
            enc = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)
            return prompt, list(enc["input_ids"]), [int(s) for s, _ in enc["offset_mapping"]]
        vocab = len(tok)
        if any(t < 0 or t >= vocab for t in prompt):
            raise EngineRequestError(f"'prompt' holds token ids outside the vocabulary (0..{vocab - 1})",
                                     param="prompt")
        pieces = [tok.decode([t]) for t in prompt]
        return "".join(pieces), list(prompt), _offsets_after(0, pieces)

    async def completions(self, prompts: list, params: SamplingParams, echo: bool = False,
                          logprobs: int | None = None) -> dict:
        lm = self.lm
        await self.start()
        encoded = [self._encode(p) for p in prompts]
        max_tokens = DEFAULT_COMPLETION_TOKENS if params.max_tokens is None else params.max_tokens
        for _, ids, _ in encoded:
            self._room(len(ids), max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt")
        gen = params.generation(max_tokens)
        # Greedy and at most one new token (lm-eval's `local-completions` scoring asks for max_tokens 1): that
        # token is the argmax of the scoring pass itself, so no generate call is needed.
        greedy_one = max_tokens <= 1 and params.temperature == 0 and (echo or logprobs is not None)
        scored_all: list = [None] * len(encoded)
        if greedy_one:
            scored_all = await lm.in_model_thread(lm.prompt_logprobs, [ids for _, ids, _ in encoded],
                                                 max(1, logprobs or 1))
        stops = params.stop
        choices, total_prompt, total_out = [], 0, 0
        for index, (text, ids, offsets) in enumerate(encoded):
            gen_ids: list[int] = []
            scored = scored_all[index]
            if greedy_one and max_tokens == 1:
                gen_ids = [scored["next_top"][0][0]]
            elif max_tokens > 0:
                gen_ids = await lm.generate_ids(ids, gen)
            gen_text = lm.tok.decode(gen_ids, skip_special_tokens=True)
            stopped = False
            if stops:
                gen_text, stopped = StopSequences(stops).cut(gen_text)
                if stopped:
                    gen_ids = lm.tok.encode(gen_text, add_special_tokens=False) if gen_text else []
            lp = None
            if logprobs is not None and (echo or gen_ids):
                if scored is None:  # one pass over prompt + generated tokens: the log-prob of every token
                    [scored] = await lm.in_model_thread(lm.prompt_logprobs, [ids + gen_ids], max(1, logprobs))
                elif gen_ids:  # the greedy token, scored by the prompt's own pass
                    scored = {"token_logprobs": scored["token_logprobs"] + [scored["next_top"][0][1]],
                              "top": scored["top"] + [scored["next_top"]]}
                start = 0 if echo else len(ids)
                all_ids = ids + gen_ids
                gen_pieces = [lm.tok.decode([t]) for t in gen_ids]
                lp = {"tokens": [lm.tok.decode([t]) for t in all_ids[start:]],
                      "token_logprobs": scored["token_logprobs"][start:],
                      "top_logprobs": [None if t is None else {lm.tok.decode([i]): v for i, v in t}
                                       for t in scored["top"][start:]],
                      "text_offset": (offsets if echo else []) + _offsets_after(len(text) if echo else 0,
                                                                                gen_pieces)}
            choices.append({"index": index, "text": (text if echo else "") + gen_text, "logprobs": lp,
                            "finish_reason": "length" if not stopped and max_tokens and len(gen_ids) >= max_tokens
                            else "stop"})
            total_prompt += len(ids)
            total_out += len(gen_ids)
        return {"choices": choices, "usage": {"prompt_tokens": total_prompt, "completion_tokens": total_out,
                                              "total_tokens": total_prompt + total_out}}

    def stats(self) -> dict:
        return {"generations": self.lm.requests, "batches": self.lm.batches}


def _offsets_after(start: int, pieces: list[str]) -> list[int]:
    out, pos = [], start
    for p in pieces:
        out.append(pos)
        pos += len(p)
    return out
