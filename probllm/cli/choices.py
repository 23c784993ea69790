"""Every option that takes one of a fixed set of words, as an Enum: `--help` lists the words and Typer rejects
any other (one line, exit 2) before a command starts. Commands pass `.value` on to the library."""

from enum import Enum

from probllm.export import EXPORT_FORMATS, GGUF_QUANTS  # registries: importing them loads no gguf or torch
from probllm.lm import BACKENDS, MODEL_BACKENDS  # (no backend module is imported until one is made)
from probllm.evaluate.options import METHODS
from probllm.evaluate.templates import TEMPLATES
from probllm.models import QUANT_METHODS


class Choice(str, Enum):
    def __str__(self) -> str:  # in messages and defaults: the word, not `Backend.hf`
        return self.value


class LoadFormat(Choice):
    auto = "auto"
    json = "json"
    csv = "csv"
    parquet = "parquet"
    mmlu_csv = "mmlu-csv"


class PostsFormat(Choice):
    auto = "auto"
    hf = "hf"
    posts_xml = "posts-xml"


class McqSource(Choice):
    auto = "auto"
    gsm8k = "gsm8k"
    math = "math"
    arc = "arc"
    mmlu = "mmlu"


class ArcSet(Choice):
    easy = "easy"
    challenge = "challenge"


class CompareBy(Choice):
    """How `serve --compare` makes its two answers (probllm.serve.feedback.COMPARE_MODES)."""
    samples = "samples"
    notes = "notes"


class FeedbackKind(Choice):
    """What `feedback export` writes (probllm.feedback.EXPORTS)."""
    comparisons = "comparisons"
    ratings = "ratings"


class Part(Choice):
    train = "train"
    test = "test"


class JudgeMode(Choice):
    pairwise = "pairwise"
    single = "single"


class VerdictFrom(Choice):
    generation = "generation"
    likelihood = "likelihood"


class LetterMethod(Choice):
    auto = "auto"          # loglik where the backend scores a chat reply (a local model), else generate
    loglik = "loglik"
    generate = "generate"


class Dtype(Choice):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# `--search`: the modes of probllm/rag/search.py, listed there once.
from probllm.rag.search import SEARCH_MODES  # noqa: E402 (a light module: no model is imported)

SearchMode = Choice("SearchMode", [(name, name) for name in SEARCH_MODES])


def value(choice):
    """The plain string of a choice (None stays None), for library functions that take strings."""
    return choice.value if isinstance(choice, Enum) else choice


def _registry_choice(name: str, words) -> type[Choice]:
    """A Choice whose words are a registry's keys (the registry stays the one definition of the list)."""
    return Choice(name, {word.replace("-", "_"): word for word in words})


# `--backend`: every backend (corrupt), or those with a model (judge, eval, ask, chat, serve: `rules` has none).
Backend = _registry_choice("Backend", BACKENDS)
ModelBackend = _registry_choice("ModelBackend", MODEL_BACKENDS)
ExportFormat = _registry_choice("ExportFormat", EXPORT_FORMATS)
GgufQuant = _registry_choice("GgufQuant", GGUF_QUANTS)
QuantMethod = _registry_choice("QuantMethod", QUANT_METHODS)
EvalMethod = _registry_choice("EvalMethod", METHODS)
Template = _registry_choice("Template", TEMPLATES)
