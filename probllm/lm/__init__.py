"""The one model layer: backends behind one interface (base.py), `openai` (any OpenAI-compatible endpoint), `hf`
(a local transformers model) and `rules` (no model; `corrupt` only), with the response cache and retries as
wrappers (`Cached`, `Retrying`) around any of them. `probllm serve` (probllm/serve) is the other side: our model
behind the OpenAI protocol.

    config = BackendConfig(backend="openai", model="gpt-4o-mini", concurrency=32)
    backend = make_backend(config)
    for out in run_ordered(records, per_record_coroutine, window=config.window, backend=backend): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from probllm.io import UsageError
from probllm.lm.base import (LM, Cached, FatalBackendError, GenParams, RequestFailed, Retrying,  # noqa: F401
                             RetryPolicy, TransientError, run_ordered)

BACKENDS = ("openai", "hf", "rules")


@dataclass
class BackendConfig:
    """Everything the CLI options say about the backend; commands pass it to `make_backend`."""

    backend: str = "hf"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    adapter: str | None = None
    concurrency: int = 16
    batch_size: int = 8
    tries: int = 5
    retry_base: float = 1.0
    timeout: float = 120.0
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    cache: Path | None = None
    no_cache: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"

    @property
    def window(self) -> int:
        """Records in flight: several per request slot, so a slow or retrying record does not idle the others,
        and bounded, so memory does not grow with the input."""
        slots = self.batch_size if self.backend == "hf" else self.concurrency
        return max(16, 4 * slots)

    def gen_params(self, seed: int | None = None) -> GenParams:
        return GenParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                         seed=self.seed if seed is None else seed)

    def model_label(self) -> str:
        if self.backend == "rules":
            return "rules"
        if self.backend == "hf":
            from probllm.models import model_label

            return model_label(self.model)
        return self.model or ""


def make_backend(config: BackendConfig, allow_rules: bool = False):
    """The backend the options describe: openai or hf wrapped in retries and the response cache, or the `rules`
    backend (no model, no requests) where the command can use it."""
    if config.backend not in BACKENDS:
        raise UsageError(f"--backend {config.backend}: choose one of {', '.join(BACKENDS)}")
    if config.backend == "rules":
        if not allow_rules:
            raise UsageError("--backend rules only works with `corrupt`: use openai or hf")
        from probllm.lm.rules import RulesLM

        return RulesLM()
    if config.concurrency < 1 or config.tries < 1 or config.max_tokens < 1:
        raise UsageError("--concurrency, --tries and --max-tokens must be at least 1")
    lm = make_lm(config)
    lm = Retrying(lm, RetryPolicy(tries=config.tries, base=config.retry_base),
                  concurrency=max(config.concurrency, config.batch_size) if config.backend == "hf"
                  else config.concurrency, seed=config.seed)
    if not config.no_cache:
        from probllm.lm.cache import ResponseCache, default_cache_path

        lm = Cached(lm, ResponseCache(config.cache or default_cache_path()))
    return lm


def make_lm(config: BackendConfig) -> LM:
    """The bare backend (no cache, no retries): what `serve` and scoring commands use."""
    if config.backend == "openai":
        from probllm.lm.openai_backend import OpenAIBackend

        return OpenAIBackend(config.model or "", base_url=config.base_url, api_key_env=config.api_key_env,
                             timeout=config.timeout, concurrency=config.concurrency)
    if config.backend != "hf":
        raise UsageError(f"--backend {config.backend}: this command needs openai or hf")
    from probllm.lm.hf_backend import HFLM

    if config.base_url:
        raise UsageError("--base-url is for --backend openai")
    return HFLM(config.model, adapter=config.adapter, batch_size=config.batch_size, device=config.device,
                dtype=config.dtype)


# ------------------------------------------------------------------------------------ engines for `probllm serve`


def _local_engine(*, model=None, adapter=None, batch_size=8, max_wait=0.005, dtype="auto", device="auto",
                  trust_remote_code=False, base_url=None, **_other):
    from probllm.lm.hf_backend import HFLM
    from probllm.lm.serving import LocalEngine

    if base_url:
        raise UsageError("--base-url is for --backend openai (the local backend loads --model here)")

    # Loaded now: a model that cannot load stops `serve` before it listens.
    return LocalEngine(HFLM(model, adapter=adapter, batch_size=batch_size, dtype=dtype, device=device,
                            max_wait=max_wait, trust_remote_code=trust_remote_code,
                            spare_core_when_batched=True).load())


def _upstream_engine(*, model=None, base_url=None, api_key_env="OPENAI_API_KEY", timeout=120.0, concurrency=256,
                     adapter=None, **_other):
    from probllm.lm.upstream import UpstreamEngine

    if not base_url:
        raise UsageError("--backend openai needs --base-url (the upstream server, e.g. http://127.0.0.1:8001/v1)")
    if adapter:
        raise UsageError("--adapter is for the local backend; an upstream serves its adapters itself (vLLM: "
                         "--enable-lora --lora-modules NAME=FOLDER, then --model NAME here)")
    return UpstreamEngine(model or "", base_url=base_url, api_key_env=api_key_env, timeout=timeout,
                          concurrency=concurrency)


# What `probllm serve --backend` chooses from (probllm/lm/serving.py: the interface both implement).
SERVING_ENGINES = {"hf": _local_engine, "openai": _upstream_engine}


def make_engine(backend: str, **settings):
    """The serving engine `--backend` names, from the settings that apply to it (others are ignored)."""
    if backend not in SERVING_ENGINES:
        raise UsageError(f"--backend {backend}: choose one of {', '.join(SERVING_ENGINES)}")
    return SERVING_ENGINES[backend](**settings)
