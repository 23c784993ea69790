"""A local transformers model behind the same `chat` interface, with batched generation.

Per-record code awaits one chat at a time, as with an API; a small batcher collects the requests that are waiting
at the same moment (up to `batch_size`, same generation parameters) and runs them as one padded `generate` call
in a worker thread, so the event loop keeps scheduling records while the model works. Greedy by default; with a
temperature, sampling is seeded per batch from the request seeds (so a re-run with the same batches repeats).
"""

from __future__ import annotations

import asyncio

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
