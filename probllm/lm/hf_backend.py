"""A local transformers model behind the `LM` interface: batched, streamed generation and lm-eval scoring.

The model loads through the one resolver (`probllm.models`: the offline default, folders, hub ids, LoRA adapters,
`quantize` folders). Callers await one chat at a time, as with an API; a batcher collects the requests that arrive
within a few milliseconds of each other (up to `batch_size`, same sampling parameters) and runs them as one
left-padded `generate` call in a worker thread, so the event loop keeps serving while the model works. Every row
streams: a batch-aware streamer hands each request its own new text as tokens come out, and a request whose row
is finished (end of text, its own token limit, or its reader gone) stops counting; the batch ends when all rows
have. `probllm serve` and the CLI commands share this code.

All model work (loading, generation, scoring) runs on one thread of the backend's own: passes never fight over
the cores, and the allocator keeps one arena, so a long-running server's memory stays flat (glibc gives one arena
per thread, and freed activations of many shapes on many threads fragment them; the heap is also trimmed whenever
the queue runs empty). With `spare_core_when_batched` (what `serve` sets) a pass of several rows uses one core
less than a single row: several streams keep the HTTP side busy, and torch's threads stall whenever one of them
is preempted, so on a small machine the batch runs faster leaving the server a core.

Greedy by default; with a temperature, each row samples with a generator of its own, seeded by its request's
seed: a request's answer is the one it gets alone, whichever requests share its batch. A model
without a chat template gets one plain transcript prompt (`render`), the same for every command.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

from probllm.lm.base import (CHAT, CHAT_LOGLIKELIHOOD, COMPLETIONS, LM, LOGLIKELIHOOD, RENDER_CHAT, STREAM,
                             FatalBackendError, RequestFailed)

_DONE = object()


@dataclass
class _GenRequest:
    prompt_ids: list[int]
    params: dict
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tokens: list[int] = field(default_factory=list)
    sent_chars: int = 0
    done: bool = False
    cancelled: bool = False


class AnswerRepetitionPenalty:
    """transformers' repetition penalty, applied only to tokens the answer itself has produced.

    The built-in `repetition_penalty` also penalises every prompt token, which for a RAG prompt means the quoted
    sources: the model is pushed away from the very terms it should copy. Left padding puts every prompt of a
    batch at the same width, so the answer starts at one column for all rows."""

    def __init__(self, prompt_len: int, penalty: float):
        self.prompt_len = prompt_len
        self.penalty = penalty

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] == 0:
            return scores
        picked = scores.gather(1, generated)
        picked = picked.where(picked < 0, picked / self.penalty).where(picked >= 0, picked * self.penalty)
        return scores.scatter(1, generated, picked)


class RowSampling:
    """Sampling done per row, each with its own seeded generator (transformers' own sampling draws every row
    from one global generator, so a request's answer would depend on the others in its batch). Used with
    greedy decoding: every score but the drawn token's is set to -inf, so the argmax is the draw. Temperature,
    top-k then top-p, in transformers' order."""

    def __init__(self, batch: list["_GenRequest"], top_k: int = 50):
        import torch

        self.rows = []
        for r in batch:
            g = torch.Generator()
            g.manual_seed(int(r.params.get("seed", 0) or 0))
            self.rows.append((float(r.params.get("temperature", 0) or 0),
                              float(r.params.get("top_p", 1.0) or 1.0), g))
        self.top_k = top_k

    def __call__(self, input_ids, scores):
        import torch

        chosen = torch.empty(scores.shape[0], dtype=torch.long)
        for i, (temperature, top_p, gen) in enumerate(self.rows):
            row = scores[i].float()
            if temperature <= 0:
                chosen[i] = int(row.argmax())
                continue
            row = row / temperature
            vals, idx = row.topk(min(self.top_k, row.shape[-1]))
            probs = vals.softmax(-1)
            if top_p < 1.0:  # the smallest set of the most likely tokens holding top_p of the probability
                keep = (probs.cumsum(-1) - probs) < top_p
                probs = probs * keep
                probs = probs / probs.sum()
            chosen[i] = idx[torch.multinomial(probs.cpu(), 1, generator=gen)[0]]
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen.to(scores.device).unsqueeze(1), 0.0)
        return out


class _RowStreamer:
    """A transformers streamer for a whole batch: `put` gets the prompt first, then one new token per row."""

    def __init__(self, lm: "HFLM", batch: list[_GenRequest]):
        self.lm = lm
        self.batch = batch
        self.first = True

    def put(self, value) -> None:
        if self.first:  # the prompt
            self.first = False
            return
        tokens = value.tolist() if value.dim() == 1 else value[:, 0].tolist()
        for req, tok_id in zip(self.batch, tokens):
            if req.done or req.cancelled:
                continue
            if tok_id in self.lm.eos_ids:
                self.lm._finish(req)
                continue
            req.tokens.append(tok_id)
            self.lm._emit(req)
            if len(req.tokens) >= int(req.params.get("max_tokens", 256)):
                self.lm._finish(req)

    def end(self) -> None:
        for req in self.batch:
            if not req.done:
                self.lm._finish(req)


class _RowsDone:
    """Stopping criterion: a row is done when its request is (so the batch stops when every row has)."""

    def __init__(self, batch: list[_GenRequest]):
        self.batch = batch

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.tensor([r.done or r.cancelled for r in self.batch], dtype=torch.bool, device=input_ids.device)


class HFLM(LM):
    name = "hf"
    capabilities = frozenset({CHAT, STREAM, COMPLETIONS, LOGLIKELIHOOD, CHAT_LOGLIKELIHOOD, RENDER_CHAT})

    def __init__(self, model: str | None = None, adapter: str | None = None, batch_size: int = 8,
                 device: str = "auto", dtype: str = "auto", max_wait: float = 0.005,
                 trust_remote_code: bool = False, spare_core_when_batched: bool = False,
                 scoring_tuning: dict | None = None, **_ignored):
        from probllm.models import model_label

        super().__init__(model_label(model, adapter))
        self.model_name = model
        self.adapter = adapter
        self.batch_size = max(1, batch_size)
        self.device = device
        self.dtype = dtype
        self.max_wait = max_wait
        self.regroup_wait = max(max_wait, 0.05)
        self._last_batch = 1
        self.trust_remote_code = trust_remote_code
        self.tok = None
        self.lm = None
        self._identity: str | None = None
        self.eos_ids: set[int] = set()
        self.batches = 0
        self._pending: list[_GenRequest] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.spare_core_when_batched = spare_core_when_batched
        # One model, used from one worker thread (see the module's note): passes run one at a time, in order
        # (parallel passes would only fight over the cores). Every pass goes through `in_model_thread`.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probllm-model")
        self._load_lock = threading.Lock()
        self._threads: int | None = None
        # The packed scorer's knobs (probllm.lm.hf_scoring.score_groups: batch_tokens, max_rows, ...); its counts
        # of passes and tokens go to `scoring_stats`.
        self.scoring_tuning = dict(scoring_tuning or {})
        self._pairs: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        # The keys/values of the last few shared prompt prefixes (few-shot examples), reused from one loglikelihood
        # call to the next (probllm.lm.hf_scoring's `prefix_cache`): valid while the weights are, which for this
        # object is its lifetime (one model, one adapter, loaded once).
        self._prefix_cache: dict = {}
        self._cacheable: bool | None = None  # whether the model's layers take an expanded prefix cache

    @classmethod
    def from_loaded(cls, model, tokenizer, label: str = "", **settings) -> "HFLM":
        """A model and tokenizer already loaded (quantize measures the model it just quantized; tests and benches
        load once for many runs). Its identity is its label: such an object is not for cached or resumed work."""
        lm = cls(None, **settings)
        lm.model = label or getattr(getattr(model, "config", None), "_name_or_path", "") or "loaded-model"
        lm._identity = lm.model
        lm.tok, lm.lm = tokenizer, model
        lm._set_eos()
        import torch

        lm._threads = torch.get_num_threads()  # the caller's setting, for the model thread too
        return lm

    @property
    def identity(self) -> str:
        """The content identity of the weights and adapter, and the dtype they compute in (bfloat16 answers
        differ from float32 ones). Hashing needs no loaded model; a file's hash is remembered across runs."""
        if self._identity is None:
            from probllm.models import device_name, model_identity, resolve_dtype

            dtype = str(resolve_dtype(self.dtype, device_name(self.device))).replace("torch.", "")
            self._identity = f"{model_identity(self.model_name, self.adapter).id}|{dtype}"
        return self._identity

    async def aclose(self) -> None:
        """End the batching worker now, not when its idle timer runs out (a loop closed under a waiting worker
        prints "Task was destroyed but it is pending" on the user's terminal)."""
        worker, self._worker = self._worker, None
        if worker is None or worker.done():
            return
        loop = worker.get_loop()
        if loop is not asyncio.get_running_loop():  # another thread's loop: Task.cancel is not thread-safe
            if not loop.is_closed():
                loop.call_soon_threadsafe(worker.cancel)
            return
        worker.cancel()
        try:
            await worker
        except asyncio.CancelledError:
            pass

    async def ensure_loaded(self) -> "HFLM":
        """Load on the model thread if not yet loaded (once loaded, no wait behind a running pass)."""
        if self.lm is None:
            await self.in_model_thread(self.load)
        return self

    async def in_model_thread(self, fn, *args):
        """Run `fn(*args)` on the model's own thread (every pass of an async caller goes through here)."""
        return await asyncio.wrap_future(self._model_thread.submit(fn, *args))

    # ------------------------------------------------------------------------------------------ loading

    def load(self) -> "HFLM":
        with self._load_lock:
            if self.lm is None:
                from probllm.models import load_model, load_tokenizer, set_threads

                set_threads()
                import torch

                self._threads = torch.get_num_threads()
                self.tok = load_tokenizer(self.model_name, padding_side="left",
                                          trust_remote_code=self.trust_remote_code)
                self.lm = load_model(self.model_name, adapter=self.adapter, dtype=self.dtype, device=self.device,
                                     trust_remote_code=self.trust_remote_code)
                self._set_eos()
        return self

    def _set_eos(self) -> None:
        config = getattr(self.lm, "generation_config", None)
        eos = config.eos_token_id if config is not None else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in eos + [self.tok.eos_token_id] if e is not None}

    @property
    def _pad_id(self) -> int:
        """The id that fills rows to a batch's width (masked out, so any id does; 0 without a pad token)."""
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def describe(self) -> dict:
        """What the loaded model computes with, for summaries: dtype, device, threads, whether it has a chat
        template."""
        self.load()
        import torch

        param = next(self.lm.parameters())
        return {"dtype": str(param.dtype).replace("torch.", ""), "device": str(param.device),
                "threads": self._threads or torch.get_num_threads(),
                "chat_template": bool(getattr(self.tok, "chat_template", None))}

    @property
    def max_length(self) -> int:
        from probllm.lm.hf_scoring import model_max_length

        self.load()
        return model_max_length(self.lm, self.tok)

    # ------------------------------------------------------------------------------------------ prompts

    def render(self, messages: list[dict]) -> str:
        """The prompt text of a chat. A last `assistant` message is the start of the reply, continued as is."""
        self.load()
        prefix = ""
        if messages and messages[-1].get("role") == "assistant":
            prefix = str(messages[-1].get("content") or "")
            messages = messages[:-1]
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model without a chat template: a plain transcript it can continue
            lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
            text = "\n\n".join(lines) + "\n\nAssistant:"
            prefix = (" " + prefix) if prefix else ""
        return text + prefix

    def encode_prompt(self, text: str) -> list[int]:
        self.load()
        return self.tok(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------------------------------ generation

    async def chat(self, messages: list[dict], params: dict) -> str:
        return "".join([p async for p in self.stream_chat(messages, params)]).strip()

    async def complete(self, prompt: str, params: dict) -> str:
        await self.ensure_loaded()
        return "".join([p async for p in self.stream_ids(self.encode_prompt(prompt), params)])

    async def stream_chat(self, messages: list[dict], params: dict):
        await self.ensure_loaded()
        async for piece in self.stream_ids(self.encode_prompt(self.render(messages)), params):
            yield piece

    def _submit(self, prompt_ids: list[int], params: dict) -> _GenRequest:
        loop = asyncio.get_running_loop()
        req = _GenRequest(list(prompt_ids), dict(params), loop, asyncio.Queue())
        self.requests += 1
        self._pending.append(req)
        if self._wakeup is None or self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.ensure_future(self._batch_loop())
        self._wakeup.set()
        return req

    async def generate_ids(self, prompt_ids: list[int], params: dict) -> list[int]:
        """The generated token ids (end of text excluded), batched like every generation."""
        req = self._submit(prompt_ids, params)
        async for _ in self._pieces(req):
            pass
        return req.tokens

    async def stream_ids(self, prompt_ids: list[int], params: dict):
        """Pieces of generated text for one prompt (token ids), batched with whatever else is waiting."""
        async for piece in self._pieces(self._submit(prompt_ids, params)):
            yield piece

    async def _pieces(self, req: _GenRequest):
        try:
            while True:
                item = await req.queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancelled = True  # a reader that went away frees its row at the next token
            if req in self._pending:
                self._pending.remove(req)

    def _batch_key(self, req: _GenRequest) -> tuple:
        p = req.params
        return (float(p.get("temperature", 0) or 0), float(p.get("top_p", 1.0) or 1.0),
                float(p.get("repetition_penalty", 1.0) or 1.0))

    async def _batch_loop(self) -> None:
        while True:
            if not self._pending:
                # Idle: after a quiet half second give the freed heap back (not between requests that follow
                # each other, where it would only cost time), and end the worker after 30 s.
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    await self.in_model_thread(release_free_memory)
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=30)
                    except asyncio.TimeoutError:
                        if not self._pending:
                            return
                continue
            # Let requests that arrive together (the other records' coroutines, other HTTP clients) join. Right
            # after a batch, its clients come back with their next request within a few tens of milliseconds:
            # wait (a little longer) for as many as the last batch had, or a batch of one would make the others
            # wait for all of its tokens (a generate call cannot take rows once started).
            start = time.monotonic()
            want = min(self.batch_size, max(1, self._last_batch))
            while len(self._pending) < self.batch_size:
                waited = time.monotonic() - start
                if waited >= self.max_wait and (len(self._pending) >= want or waited >= self.regroup_wait):
                    break
                await asyncio.sleep(0.001)
            key = self._batch_key(self._pending[0])
            batch = [r for r in self._pending if self._batch_key(r) == key and not r.cancelled][: self.batch_size]
            for r in list(self._pending):
                if r in batch or r.cancelled:
                    self._pending.remove(r)
            if not batch:
                continue
            self._last_batch = len(batch)
            try:
                await self.in_model_thread(self._generate, batch)
            except Exception as e:  # a model that cannot generate will not do better on a retry
                err = FatalBackendError(f"generation failed: {e.__class__.__name__}: {e}")
                for r in batch:
                    if not r.done:
                        r.done = True
                        r.loop.call_soon_threadsafe(r.queue.put_nowait, err)

    def _emit(self, req: _GenRequest) -> None:
        text = self.tok.decode(req.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            return
        piece = text[req.sent_chars:]
        if piece:
            req.sent_chars = len(text)
            req.loop.call_soon_threadsafe(req.queue.put_nowait, piece)

    def _finish(self, req: _GenRequest) -> None:
        if req.done:
            return
        text = self.tok.decode(req.tokens, skip_special_tokens=True)
        if len(text) > req.sent_chars:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, text[req.sent_chars:])
            req.sent_chars = len(text)
        req.done = True
        req.loop.call_soon_threadsafe(req.queue.put_nowait, _DONE)

    def _generate(self, batch: list[_GenRequest]) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        tok, lm = self.tok, self.lm
        width = max(len(r.prompt_ids) for r in batch)
        pad = self._pad_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every answer starts at the same column
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - len(r.prompt_ids):] = 1
        params = batch[0].params
        kwargs = {"max_new_tokens": max(int(r.params.get("max_tokens", 256)) for r in batch),
                  "pad_token_id": pad}
        penalty = float(params.get("repetition_penalty", 1.0) or 1.0)
        processors = [AnswerRepetitionPenalty(width, penalty)] if penalty != 1.0 else []
        if any(float(r.params.get("temperature", 0) or 0) > 0 for r in batch):
            processors.append(RowSampling(batch))  # last: it draws from the penalised scores
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        streamer = _RowStreamer(self, batch)
        self._set_threads(len(batch))
        with torch.no_grad():
            lm.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_RowsDone(batch)]), **kwargs)
        streamer.end()
        self.batches += 1

    def _set_threads(self, rows: int) -> None:
        """Called on the model thread (OpenMP's thread count is a per-thread setting)."""
        import torch

        if self._threads:
            want = max(1, self._threads - 1) if self.spare_core_when_batched and rows > 1 else self._threads
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)

    # ------------------------------------------------------------------------------------------ scoring

    async def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        self.requests += 1
        return await self.in_model_thread(self._loglikelihood, requests)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's pair encoding, remembered for the pairs of the last few batches (a caller that sorts by
        `request_length` asks for the same pairs again when it scores them)."""
        from probllm.lm.hf_scoring import encode_pair

        key = (context, continuation)
        hit = self._pairs.get(key)
        if hit is None:
            if len(self._pairs) >= 8192:
                self._pairs.clear()
            hit = self._pairs[key] = encode_pair(self.tok, context, continuation)
        return hit

    def request_length(self, context: str, continuations: list[str]) -> int:
        """The tokens the packed scorer feeds for this group: the context once, each continuation but its last
        token (which is only a target)."""
        self.load()
        pairs = [self._encode_pair(context, c) for c in continuations]
        return len(pairs[0][0]) + sum(max(len(c) - 1, 0) for _, c in pairs) if pairs else 0

    def _loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        from probllm.lm.hf_scoring import score_groups

        self.load()
        # Consecutive requests with the same context (a question's choices) form one group: the scorer runs that
        # context once, packs its continuations after it, and sorts and packs the groups into batches itself. A
        # continuation the group already has starts a new group (the same question twice in a row is two
        # questions, each scored exactly as it is alone).
        groups: list[tuple[list[int], list[list[int]]]] = []
        last_ctx = None
        for context, continuation in requests:
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                raise RequestFailed("empty continuation: nothing to score")
            if groups and ctx == last_ctx and cont not in groups[-1][1]:
                groups[-1][1].append(cont)
            else:
                groups.append((ctx, [cont]))
                last_ctx = ctx
        pad = self._pad_id
        self._set_threads(1)
        scored = score_groups(self.lm, groups, max_length=self.max_length, pad_id=pad, stats=self.scoring_stats,
                              prefix_cache=self._prefix_cache, **self.scoring_tuning)
        return [x for g in scored for x in g]

    async def choose(self, messages: list[dict], options: list[str], prefix: str = "") -> list[float]:
        """Small local models rarely follow an output format like `[[A]]`; scoring the allowed answers instead
        of generating makes them usable as judges (and is how MCQ scoring works too)."""
        await self.ensure_loaded()
        context = self.render(messages + ([{"role": "assistant", "content": prefix}] if prefix else []))
        return [s for s, _ in await self.loglikelihood([(context, o) for o in options])]

    def prompt_logprobs(self, token_lists: list[list[int]], top: int = 1, max_batch_tokens: int = 0) -> list[dict]:
        """Per-token log-probs of whole prompts (what `/v1/completions` with echo returns): for each prompt,
        `token_logprobs` (None for the first token), the `top` most likely tokens at every position, and
        `next_top` after the last one. A pass of the model: run it through `in_model_thread`.

        Prompts of one request that share a token prefix long enough to be worth caching (lm-eval's
        `local-completions` sends a question's choices together, each behind the same few-shot prompt) run that
        prefix once into a key/value cache, and each prompt's rest is scored against it (probllm.lm.hf_scoring's clusters and cache). Otherwise one
        prompt per forward pass by default: padded batches (`max_batch_tokens`) are faster but move float32 sums
        by ~1e-4 on SmolLM2, and a client comparing against a local evaluation (lm-eval, `eval --backend
        openai`) should get the same numbers."""
        import torch

        from probllm.lm.hf_scoring import _prefix_cacheable, prompt_clusters

        self.load()
        pad = self._pad_id
        results: list = [None] * len(token_lists)
        k = max(1, top)
        if self._cacheable is None:  # asked once per model, not per request (it builds a cache to look)
            self._cacheable = _prefix_cacheable(self.lm)
        clusters, alone = (prompt_clusters(token_lists) if len(token_lists) > 1 and
                           self._cacheable else ([], list(range(len(token_lists)))))
        with torch.no_grad():
            for prefix, members in clusters:
                out = self.lm(input_ids=torch.tensor([prefix], device=self.lm.device), use_cache=True)
                prefix_logits = out.logits[0]
                cache = getattr(out, "cache", None) or out.past_key_values
                kv = [(layer.keys, layer.values) for layer in cache.layers]
                stats = self.scoring_stats
                stats["prompt_prefix_passes"] = stats.get("prompt_prefix_passes", 0) + 1
                stats["prompt_prefix_reused_tokens"] = (stats.get("prompt_prefix_reused_tokens", 0)
                                                        + len(prefix) * (len(members) - 1))
                DynamicCache = type(cache)  # a fresh cache per prompt from the prefix's keys/values
                for i in members:
                    rest = token_lists[i][len(prefix):]
                    logits = self.lm(input_ids=torch.tensor([rest], device=self.lm.device), use_cache=True,
                                     cache=DynamicCache(ddp_cache_data=kv)).logits[0]
                    results[i] = _logprob_entry(torch.cat([prefix_logits, logits]), token_lists[i], k)
            order = sorted(alone, key=lambda i: -len(token_lists[i]))
            start = 0
            while start < len(order):
                width = len(token_lists[order[start]])
                rows = max(1, max_batch_tokens // max(1, width)) if max_batch_tokens else 1
                idx = order[start: start + rows]
                start += len(idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, : len(token_lists[i])] = torch.tensor(token_lists[i], dtype=torch.long)
                    mask[r, : len(token_lists[i])] = 1
                # No mask for a single prompt: the unmasked causal path is the one local scoring matches best.
                masked = {"attention_mask": mask.to(self.lm.device)} if len(idx) > 1 else {}
                logits = self.lm(input_ids=ids.to(self.lm.device), **masked).logits
                for r, i in enumerate(idx):
                    results[i] = _logprob_entry(logits[r, : len(token_lists[i])], token_lists[i], k)
        self.requests += 1
        return results


def _logprob_entry(logits, toks: list[int], k: int) -> dict:
    """One prompt's entry of `prompt_logprobs` from its logits at every position ([len(toks), vocab])."""
    import torch

    # log_softmax, as local scoring does: logit - logsumexp differs by ~2e-5 per token in float32.
    row = torch.log_softmax(logits.float(), dim=-1)
    vals, tops = row.topk(k, dim=-1)
    vals, tops = vals.cpu().tolist(), tops.cpu().tolist()
    targets = torch.tensor(toks[1:], device=row.device, dtype=torch.long)
    picked = row[:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu().tolist()
    return {"token_logprobs": [None] + picked,
            "top": [None] + [list(zip(tops[p], vals[p])) for p in range(len(toks) - 1)],
            "next_top": list(zip(tops[-1], vals[-1]))}


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c") if os.name == "posix" else None
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc only; elsewhere a no-op)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
