"""Prompt templates for MCQ scoring, written to reproduce lm-evaluation-harness (lm-eval 0.4.13) byte for byte.

lm-eval builds a multiple-choice request as (context, target_delimiter + choice) pairs:
- `arc_easy`/`arc_challenge`: context "Question: {question}\\nAnswer:", choices = the choice texts.
- `mmlu_<subject>` (default template): description "The following are multiple choice questions (with answers)
  about {subject}.\\n\\n", then "{question.strip()}\\nA. ...\\nD. ...\\nAnswer:", choices = ["A", "B", "C", "D"].
- target_delimiter " ", fewshot_delimiter "\\n\\n": a shot is its context + " " + its answer + "\\n\\n".
- with a chat template: the description becomes the system message, shots and question one user message, the
  generation prompt is added and the target delimiter becomes "" (lm-eval's `construct_requests`).

Everything here is pure string work so that tests can check prompts without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from probllm.records import LETTERS

TEMPLATES = ("auto", "arc", "mmlu", "letter")
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass
class Item:
    """A validated MCQ record, reduced to what scoring needs (the record itself rides along untouched)."""

    question: str
    choices: list[str]
    gold: int  # index of the correct choice
    source: str
    subject: str
    passages: list[str] = field(default_factory=list)


@dataclass
class Prompt:
    """What the scorer sees: one shared context and one continuation per choice (loglik), plus the strings
    whose length lm-eval divides by for acc_norm (the choices, without the delimiter)."""

    context: str
    continuations: list[str]
    norm_texts: list[str]
    shared: str = ""  # the description + few-shot part: prompts with the same one are batched together


def resolve_template(name: str, item: Item) -> str:
    """`auto`: lm-eval's MMLU template for MMLU items, its ARC template for everything else."""
    if name == "auto":
        return "mmlu" if item.source.lower().startswith("mmlu") else "arc"
    return name


def subject_phrase(subject: str) -> str:
    return subject.replace("_", " ").strip()


def description(template: str, item: Item) -> str:
    if template == "mmlu":
        return f"The following are multiple choice questions (with answers) about {subject_phrase(item.subject)}.\n\n"
    return ""


def lettered(item: Item) -> str:
    return "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))


def doc_text(template: str, item: Item) -> str:
    """lm-eval's `doc_to_text` for the template."""
    if template in ("mmlu", "letter"):
        return f"{item.question.strip()}{lettered(item)}\nAnswer:"
    return f"Question: {item.question}\nAnswer:"


def doc_choices(template: str, item: Item) -> list[str]:
    """lm-eval's `doc_to_choice`: letters for the MMLU-style templates, the choice texts for ARC."""
    if template in ("mmlu", "letter"):
        return [LETTERS[i] for i in range(len(item.choices))]
    return list(item.choices)


def sources_block(passages: list[str]) -> str:
    """Retrieved passages as quoted, numbered sources placed before the question (RAG evaluation)."""
    if not passages:
        return ""
    lines = ["Sources:"]
    for i, text in enumerate(passages, 1):
        quoted = " ".join(text.split()).replace('"', "'")
        lines.append(f'[{i}] "{quoted}"')
    return "\n".join(lines) + "\n\n"


def build_prompt(
    item: Item,
    template: str = "auto",
    shots: list[Item] | None = None,
    chat: Callable[[list[dict]], str] | None = None,
) -> Prompt:
    """The scoring prompt of one item, as lm-eval would build it (plus optional sources and a chat template)."""
    name = resolve_template(template, item)
    desc = description(name, item)
    shot_text = ""
    for shot in shots or []:
        shot_choices = doc_choices(name, shot)
        shot_text += doc_text(name, shot) + TARGET_DELIMITER + shot_choices[shot.gold] + FEWSHOT_DELIMITER
    question = sources_block(item.passages) + doc_text(name, item)
    choices = doc_choices(name, item)
    if chat is not None:
        messages = ([{"role": "system", "content": desc}] if desc else []) + [
            {"role": "user", "content": shot_text + question}
        ]
        return Prompt(chat(messages), list(choices), choices)
    return Prompt(desc + shot_text + question, [TARGET_DELIMITER + c for c in choices], choices, desc + shot_text)


# ------------------------------------------------------------------------------------------- generate (CoT)


def cot_prompt(item: Item, shots: list[Item] | None = None) -> str:
    """A chain-of-thought prompt: GSM8K and MATH ask for the final value, the others for the option letter."""
    kind = answer_kind(item)
    head = sources_block(item.passages)
    if kind == "number":
        return (head + f"Question: {item.question.strip()}\nSolve the problem step by step, then write the final "
                "answer as \"The answer is N\".\nAnswer: Let's think step by step.")
    if kind == "boxed":
        return (head + f"Problem: {item.question.strip()}\nSolve the problem step by step and put the final answer "
                "in \\boxed{}.\nSolution:")
    return (head + f"Question: {item.question.strip()}{lettered(item)}\nThink step by step, then finish with "
            "\"The answer is X\" where X is the letter of the correct option.\nAnswer: Let's think step by step.")


def answer_kind(item: Item) -> str:
    source = item.source.lower()
    if source.startswith("gsm8k"):
        return "number"
    if source.startswith("math"):
        return "boxed"
    return "letter"
