"""eval's settings: the scoring methods and the options that decide a prediction."""

from __future__ import annotations

from dataclasses import dataclass, field

from probllm.evaluate.templates import TEMPLATES, Item

METHODS = ("loglik", "letter", "generate")


@dataclass
class EvalOptions:
    """How `eval` scores: the one definition of these settings and their defaults (the CLI's EVAL options read
    theirs from here)."""

    method: str = "loglik"
    template: str = "auto"
    shots: int = 0
    dev: list[Item] = field(default_factory=list)
    chat_template: bool = False
    context_field: str | None = None
    max_passages: int = 5
    batch_size: int = 16
    max_new_tokens: int = 256
    limit: int | None = None

    def check(self) -> None:
        from probllm.io import UsageError

        if self.method not in METHODS:
            raise UsageError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.template not in TEMPLATES:
            raise UsageError(f"--template {self.template}: choose one of {', '.join(TEMPLATES)}")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.shots < 0:
            raise UsageError("--shots must be 0 or more")
        if self.shots and not self.dev:
            raise UsageError("--shots needs --dev FILE (MCQ records to draw the examples from)")
