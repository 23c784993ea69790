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


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


NOT_INSTALLED = "llama-cpp-python is not installed (make bench-setup builds it)"


def load(gguf_path: str, n_ctx: int = 2048, n_threads: int | None = None):
    import os

    from llama_cpp import Llama

    # logits_all: every position's logits, which a log-likelihood over a continuation needs.
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, verbose=False,
                 n_threads=n_threads or os.cpu_count() or 1)


class LlamaCppScorer:
    """encode / encode_pair / chat / score / generate, as probllm.evaluate.mcqa.Scorer, on llama.cpp."""

    def __init__(self, llm, tokenizer):
        self.llm = llm
        self.tok = tokenizer
        self.stats: dict = {}
        self.max_length = llm.n_ctx()

    shared_prefix_tokens = 0

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        from probllm.lm.hf_scoring import encode_pair

        return encode_pair(self.tok, context, continuation)

    def chat(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

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

    def loglik(self, prompts) -> list[list[float]]:
        groups = []
        for p in prompts:
            pairs = [self.encode_pair(p.context, c) for c in p.continuations]
            groups.append((pairs[0][0], [c for _, c in pairs]))
        return [[s for s, _ in scores] for scores in self.score(groups)]

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return [self.llm.create_completion(p, max_tokens=max_new_tokens, temperature=0.0)["choices"][0]["text"]
                for p in prompts]


def greedy_speed(llm, prompt: str, tokens: int) -> float:
    """Generated tokens per second for `tokens` greedy tokens after `prompt` (after one warm-up call)."""
    llm.create_completion(prompt, max_tokens=4, temperature=0.0)
    started = time.perf_counter()
    result = llm.create_completion(prompt, max_tokens=tokens, temperature=0.0)
    seconds = time.perf_counter() - started
    return result["usage"]["completion_tokens"] / seconds
