"""A local transformers model behind the same `chat` interface, with batched generation.

Per-record code awaits one chat at a time, as with an API; a small batcher collects the requests that are waiting
at the same moment (up to `batch_size`, same generation parameters) and runs them as one padded `generate` call
in a worker thread, so the event loop keeps scheduling records while the model works. Greedy by default; with a
temperature, sampling is seeded per batch from the request seeds (so a re-run with the same batches repeats).
"""

from __future__ import annotations

import asyncio
import threading

from probllm.llm.base import Backend, FatalBackendError


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model: str | None = None, adapter: str | None = None, batch_size: int = 8,
                 device: str = "auto", dtype: str = "auto", **kw):
        from probllm.models import model_label

        label = model_label(model) + (f"+adapter:{adapter.rstrip('/')}" if adapter else "")
        kw["concurrency"] = max(kw.get("concurrency", 1), batch_size)  # enough waiting requests to fill a batch
        super().__init__(model=label, **kw)
        self.model_name = model
        self.adapter = adapter
        self.batch_size = max(1, batch_size)
        self.device = device
        self.dtype = dtype
        self._tok = None
        self._lm = None
        self._queue: list[tuple[list[dict], dict, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.batches = 0
        # One model, used from worker threads: load it once and run one forward pass at a time (parallel passes
        # would only fight over the same cores).
        self._model_lock = threading.Lock()

    def _load(self) -> None:
        if self._lm is None:
            from probllm.models import load_model, load_tokenizer, set_threads

            set_threads()
            self._tok = load_tokenizer(self.model_name, padding_side="left")
            self._lm = load_model(self.model_name, adapter=self.adapter, dtype=self.dtype, device=self.device)

    async def _complete(self, messages: list[dict], params: dict) -> str:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((messages, params, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            # Let the other records' coroutines reach their request before a batch is cut.
            for _ in range(3):
                await asyncio.sleep(0)
            first_params = self._queue[0][1]
            batch = [q for q in self._queue if q[1] == first_params][: self.batch_size]
            for q in batch:
                self._queue.remove(q)
            try:
                texts = await asyncio.to_thread(self._generate, [q[0] for q in batch], first_params)
            except Exception as e:  # a model that cannot generate will not do better on a retry
                for q in batch:
                    if not q[2].done():
                        q[2].set_exception(FatalBackendError(f"generation failed: {e.__class__.__name__}: {e}"))
                continue
            for q, text in zip(batch, texts):
                if not q[2].done():
                    q[2].set_result(text)

    def _render(self, messages: list[dict]) -> str:
        if getattr(self._tok, "chat_template", None):
            return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # A base model without a chat template: a plain transcript it can continue.
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(lines) + "\n\nAssistant:"

    def _generate(self, batch: list[list[dict]], params: dict) -> list[str]:
        with self._model_lock:
            return self._generate_locked(batch, params)

    def _generate_locked(self, batch: list[list[dict]], params: dict) -> list[str]:
        import torch

        self._load()
        tok, lm = self._tok, self._lm
        texts = [self._render(m) for m in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
        kwargs = {"max_new_tokens": int(params["max_tokens"]), "pad_token_id": tok.pad_token_id}
        if float(params.get("temperature", 0)) > 0:
            kwargs.update(do_sample=True, temperature=float(params["temperature"]),
                          top_p=float(params.get("top_p", 1.0)), top_k=int(params.get("top_k", 50)))
            torch.manual_seed(int(params.get("seed", 0)))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = lm.generate(**enc, **kwargs)
        self.batches += 1
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        return [tok.decode(row, skip_special_tokens=True).strip() for row in new_tokens]

    # ------------------------------------------------------------------------------------ likelihood choice

    async def choose(self, messages: list[dict], options: list[str], prefix: str = "") -> list[float]:
        """Log-likelihood of each option as the start of the assistant's reply (after `prefix`).

        Small local models rarely follow an output format like `[[A]]`; scoring the allowed answers instead of
        generating makes them usable as judges (and is how MCQ scoring works too). Cached like completions."""
        import json

        from probllm.llm.cache import request_key

        key = request_key(self.name, self.model, messages, {"choose": options, "prefix": prefix})
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache_hits += 1
                return json.loads(hit)
        self.requests += 1
        scores = await asyncio.to_thread(self._score_options, messages, options, prefix)
        if self.cache is not None:
            self.cache.put(key, json.dumps(scores))
        return scores

    def _score_options(self, messages: list[dict], options: list[str], prefix: str) -> list[float]:
        with self._model_lock:
            return self._score_locked(messages, options, prefix)

    def _score_locked(self, messages: list[dict], options: list[str], prefix: str) -> list[float]:
        import torch

        self._load()
        tok, lm = self._tok, self._lm
        prompt_ids = tok(self._render(messages) + prefix, add_special_tokens=False)["input_ids"]
        option_ids = [tok(o, add_special_tokens=False)["input_ids"] for o in options]
        seqs = [prompt_ids + o for o in option_ids]
        width = max(map(len, seqs))
        pad = tok.pad_token_id or 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=lm.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=lm.device)
        with torch.no_grad():
            logprobs = torch.log_softmax(lm(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        scores = []
        for row, o in enumerate(option_ids):
            start = len(prompt_ids)
            total = sum(float(logprobs[row, start + i - 1, t]) for i, t in enumerate(o))
            scores.append(total)
        self.batches += 1
        return scores
