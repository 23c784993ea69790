"""A GGUF file run by llama.cpp (through llama-cpp-python), behind the eval Scorer's interface.

`quantize --method gguf-*` and bench/bench_quantize.py measure GGUF exports with it: the engine their users run,
not a dequantized copy. llama-cpp-python is optional (`make bench-setup` builds it from the registry's source
package); `available()` says whether it can be imported. Token ids come from the model's transformers tokenizer,
which encodes as the GGUF's vocabulary does (tests/test_export.py checks that for our exports), so prompts are
tokenised exactly as for the float model and lm-eval's pair encoding carries over.
"""

from __future__ import annotations

import importlib.util
import time

# eval's scorer (light to import: no torch until a model is scored); this class swaps its engine.
from probllm.evaluate.mcqa import Scorer


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


NOT_INSTALLED = "llama-cpp-python is not installed (make bench-setup builds it)"


def load(gguf_path: str, n_ctx: int = 2048, n_threads: int | None = None):
    import os

    from llama_cpp import Llama

    # logits_all: every position's logits, which a log-likelihood over a continuation needs.
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, verbose=False,
                 n_threads=n_threads or os.cpu_count() or 1)


class LlamaCppScorer(Scorer):
    """probllm.evaluate.mcqa.Scorer on llama.cpp: its prompt encoding (lm-eval's pair encoding, the chat
    template) and its loglik/letter methods, over this `score` and `generate`."""

    def __init__(self, llm, tokenizer):  # no torch model: Scorer's own __init__ does not apply
        self.llm = llm
        self.tok = tokenizer
        self.stats: dict = {}
        self.max_length = llm.n_ctx()

    def score(self, groups) -> list[list[tuple[float, bool]]]:
        """(summed log-prob, is greedy) of every continuation after its context, lm-eval's definition; each
        context + continuation evaluated as its own sequence, left-truncated to the context length."""
        import numpy as np

        out = []
        for context, continuations in groups:
            scored = []
            for cont in continuations:
                tokens = (list(context) + list(cont))[-self.max_length:]
                self.llm.reset()
                self.llm.eval(tokens)
                logits = np.asarray(self.llm.scores[: len(tokens)], dtype=np.float64)
                rows = logits[len(tokens) - len(cont) - 1: len(tokens) - 1]
                peak = rows.max(axis=1, keepdims=True)
                logp = rows - peak - np.log(np.exp(rows - peak).sum(axis=1, keepdims=True))
                picked = logp[np.arange(len(cont)), cont]
                scored.append((float(picked.sum()), bool((rows.argmax(axis=1) == np.asarray(cont)).all())))
            out.append(scored)
        return out

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return [self.llm.create_completion(p, max_tokens=max_new_tokens, temperature=0.0)["choices"][0]["text"]
                for p in prompts]


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
