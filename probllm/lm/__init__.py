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
from typing import Callable

from probllm.io import UsageError
from probllm.lm.base import (LM, Cached, FatalBackendError, GenParams, RequestFailed, Retrying,  # noqa: F401
                             RetryPolicy, TransientError, run_ordered)

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
        slots = self.batch_size if self.spec.local else self.concurrency
        return max(16, 4 * slots)

    @property
    def spec(self) -> "BackendSpec":
        """What `backend` names, from the registry (an unknown word is a usage error, listing the known ones)."""
        return backend_spec(self.backend)

    def gen_params(self, seed: int | None = None) -> GenParams:
        return GenParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                         seed=self.seed if seed is None else seed)

    def model_label(self) -> str:
        if not self.spec.uses_model:
            return self.backend
        if self.spec.local:
            from probllm.models import model_label

            return model_label(self.model)
        return self.model or ""


def make_backend(config: BackendConfig, allow_rules: bool = False):
    """The backend the options describe: a model backend wrapped in retries and the response cache, or a
    model-free one (`rules`: no model, no requests, nothing to retry or cache) where the command can use it."""
    spec = config.spec
    if not spec.uses_model:
        if not allow_rules:
            raise UsageError(f"--backend {config.backend} only works with `corrupt`: use "
                             f"{' or '.join(MODEL_BACKENDS)}")
        return spec.make(config)
    if config.concurrency < 1 or config.tries < 1 or config.max_tokens < 1:
        raise UsageError("--concurrency, --tries and --max-tokens must be at least 1")
    lm = make_lm(config)
    # A local model answers --batch-size prompts per call: let at least that many wait for it at once.
    lm = Retrying(lm, RetryPolicy(tries=config.tries, base=config.retry_base),
                  concurrency=max(config.concurrency, config.batch_size) if spec.local else config.concurrency,
                  seed=config.seed)
    if not config.no_cache:
        from probllm.lm.cache import ResponseCache, default_cache_path

        lm = Cached(lm, ResponseCache(config.cache or default_cache_path()))
    return lm


def make_lm(config: BackendConfig) -> LM:
    """The bare backend (no cache, no retries): what `serve` and scoring commands use."""
    spec = config.spec
    if not spec.uses_model:
        raise UsageError(f"--backend {config.backend}: this command needs {' or '.join(MODEL_BACKENDS)}")
    return spec.make(config)


def _openai_lm(config: BackendConfig) -> LM:
    from probllm.lm.openai_backend import OpenAIBackend

    return OpenAIBackend(config.model or "", base_url=config.base_url, api_key_env=config.api_key_env,
                         timeout=config.timeout, concurrency=config.concurrency)


def _hf_lm(config: BackendConfig) -> LM:
    from probllm.lm.hf_backend import HFLM

    if config.base_url:
        raise UsageError("--base-url is for --backend openai")
    return HFLM(config.model, adapter=config.adapter, batch_size=config.batch_size, device=config.device,
                dtype=config.dtype)


def _rules_lm(config: BackendConfig) -> LM:
    from probllm.lm.rules import RulesLM

    return RulesLM()


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


# ------------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class BackendSpec:
    """One `--backend` word: how its LM is made, what `--help` says of it, and what it can do. Commands decide by
    these capabilities, never by the word."""

    make: Callable[[BackendConfig], LM]
    help: str
    # A model loaded in this process: it answers --batch-size prompts per call, and is identified by its content
    # (probllm.models.model_identity); otherwise an endpoint, identified by its URL and served name.
    local: bool = False
    # False: no model and no requests (`rules`), so nothing to retry or cache; only `corrupt` can use it.
    uses_model: bool = True
    # What `probllm serve --backend` runs (probllm/lm/serving.py: the interface engines implement); None: not served.
    engine: Callable | None = None


# Every `--backend` word, in the order `--help` lists them: the one definition that probllm/cli/choices.py's
# choices, `--backend` validation and the serving engines come from.
BACKENDS: dict[str, BackendSpec] = {
    "openai": BackendSpec(_openai_lm, "any OpenAI-compatible endpoint", engine=_upstream_engine),
    "hf": BackendSpec(_hf_lm, "a local transformers model", local=True, engine=_local_engine),
    "rules": BackendSpec(_rules_lm, "no model", uses_model=False),
}
MODEL_BACKENDS = tuple(name for name, spec in BACKENDS.items() if spec.uses_model)
SERVING_ENGINES = {name: spec.engine for name, spec in BACKENDS.items() if spec.engine is not None}


def backend_spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise UsageError(f"--backend {name}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def backends_help(names=None) -> str:
    """`--help` text of a `--backend` option that offers `names` (default: all), from the registry."""
    return "; ".join(f"{name}: {BACKENDS[name].help}" for name in (names or BACKENDS)) + "."


def make_engine(backend: str, **settings):
    """The serving engine `--backend` names, from the settings that apply to it (others are ignored)."""
    if backend not in SERVING_ENGINES:
        raise UsageError(f"--backend {backend}: choose one of {', '.join(SERVING_ENGINES)}")
    return SERVING_ENGINES[backend](**settings)
