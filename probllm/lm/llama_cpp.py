"""A GGUF file run by llama.cpp (through llama-cpp-python), behind the `LM` interface eval scores through.

`quantize --method gguf-*` and bench/bench_quantize.py measure GGUF exports with it: the engine their users run,
not a dequantized copy. llama-cpp-python is optional (`make bench-setup` builds it from the registry's source
package); `available()` says whether it can be imported. Token ids come from the model's transformers tokenizer,
which encodes as the GGUF's vocabulary does (tests/test_export.py checks that for our exports), so prompts are
tokenised exactly as for the float model and lm-eval's pair encoding carries over.
"""

from __future__ import annotations

import importlib.util
import time

from probllm.lm.base import COMPLETIONS, LM, LOGLIKELIHOOD


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


NOT_INSTALLED = "llama-cpp-python is not installed (make bench-setup builds it)"


def load(gguf_path: str, n_ctx: int = 2048, n_threads: int | None = None):
    import os

    from llama_cpp import Llama

    # logits_all: every position's logits, which a log-likelihood over a continuation needs.
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, verbose=False,
                 n_threads=n_threads or os.cpu_count() or 1)


class LlamaCppLM(LM):
    """A llama.cpp model behind the `LM` interface, for eval's scorer: lm-eval's `loglikelihood` (the pair
    encoded as lm-eval's `_encode_pair` with the transformers tokenizer; each context + continuation evaluated as
    its own sequence, left-truncated to the context length) and greedy plain completions. Calls run one at a time
    in this thread: llama.cpp holds one context."""

    name = "llama.cpp"
    capabilities = frozenset({COMPLETIONS, LOGLIKELIHOOD})

    def __init__(self, llm, tokenizer, label: str = "gguf"):
        super().__init__(label)
        self.llm = llm
        self.tok = tokenizer
        self.max_length = llm.n_ctx()

    async def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        from probllm.lm.hf_scoring import encode_pair

        self.requests += 1
        return [self._score(*encode_pair(self.tok, context, continuation)) for context, continuation in requests]

    def _score(self, context: list[int], cont: list[int]) -> tuple[float, bool]:
        import numpy as np

        tokens = (list(context) + list(cont))[-self.max_length:]
        self.llm.reset()
        self.llm.eval(tokens)
        logits = np.asarray(self.llm.scores[: len(tokens)], dtype=np.float64)
        rows = logits[len(tokens) - len(cont) - 1: len(tokens) - 1]
        peak = rows.max(axis=1, keepdims=True)
        logp = rows - peak - np.log(np.exp(rows - peak).sum(axis=1, keepdims=True))
        picked = logp[np.arange(len(cont)), cont]
        return float(picked.sum()), bool((rows.argmax(axis=1) == np.asarray(cont)).all())

    async def complete(self, prompt: str, params: dict) -> str:
        self.requests += 1
        return self.llm.create_completion(prompt, max_tokens=int(params.get("max_tokens", 256)),
                                          temperature=0.0)["choices"][0]["text"]


def greedy_speed(llm, prompt: str, tokens: int) -> float:
    """Generated tokens per second for exactly `tokens` greedy tokens after `prompt` (after one warm-up call).

    The end-of-text token is banned, as transformers' side of the comparison sets `min_new_tokens`: a model that
    ends its answer at once (q8_0 SmolLM2 on the bench prompt did) would otherwise measure 0 tokens/s."""
    no_end = {llm.token_eos(): -1e9}
    llm.create_completion(prompt, max_tokens=4, temperature=0.0, logit_bias=no_end)
    started = time.perf_counter()
    result = llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, logit_bias=no_end, stop=[])
    seconds = time.perf_counter() - started
    generated = result["usage"]["completion_tokens"]
    if generated < tokens:
        raise RuntimeError(f"llama.cpp generated {generated} of {tokens} tokens: tokens/s would not compare")
    return generated / seconds
