"""`corrupt`: rejected answers made from correct ones (method.md section 1, after Huang et al., EMNLP 2023).

For each `{question, answer}` record, k of the operations REMOVE / SUBSTITUTE / INSERT (two of three by default)
are picked with a random generator derived from the run's seed and the record's key, then applied one after the
other, each by one LLM call with the method's prompt (or by `rules` without a model). A result that is empty,
identical to its input, or a refusal is retried as a new request: the unusable reply and a follow-up saying what
was wrong are added to the conversation, and sampling gets hotter with each try (a new seed alone changes nothing
on a server that ignores it), then reported. Output: pair records `{prompt, chosen, rejected, source, corruption_ops}` plus
the input's other fields.

Choices depend only on (seed, record key), never on order or concurrency: a resumed or re-ordered run makes the
same choices for the same record.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator

from probllm.io import Record, RecordError, Stats, UsageError, first_present, log, require
from probllm.lm import BackendConfig, FatalBackendError, RequestFailed, make_backend, run_ordered
from probllm.lm.rules import split_sentences

OPS = ("REMOVE", "SUBSTITUTE", "INSERT")
QUESTION_FIELDS = ("question", "message_1", "instruction", "prompt")
ANSWER_FIELDS = ("answer", "message_2", "output", "response")

_ADVERSARY = "You are an adversarial actor trying to corrupt the correct answers. "
GOALS = {
    "REMOVE": "Your goal is to REMOVE some answer content that is useful to the question.",
    "SUBSTITUTE": "Your goal is to EDIT some parts of the answer content to make it INACCURATE for the question.",
    "INSERT": "Your goal is to ADD some answer content irrelevant to the question into the answer.",
}
_FORMAT = ("Keep the style and length of the answer otherwise, do not mention that it was changed, and reply with "
           "the corrupted answer only, without any introduction or comment.")

# One worked example per operation: shows small models the expected form of the reply.
FEW_SHOT = {
    "REMOVE": ("Why does ice float on water?",
               "Ice is less dense than liquid water. When water freezes, hydrogen bonds hold the molecules in an "
               "open hexagonal lattice, so the same mass takes more volume. Objects less dense than water float.",
               "When water freezes, its molecules arrange into a hexagonal lattice. Objects less dense than water "
               "float."),
    "SUBSTITUTE": ("What is the time complexity of binary search?",
                   "Binary search runs in O(log n) time because each comparison halves the remaining interval.",
                   "Binary search runs in O(n) time because each comparison removes one element from the "
                   "remaining interval."),
    "INSERT": ("What does the mitochondrion do?",
               "The mitochondrion produces most of the cell's ATP through oxidative phosphorylation.",
               "The mitochondrion produces most of the cell's ATP through oxidative phosphorylation. The Eiffel "
               "Tower was completed in 1889 for the World's Fair."),
}

_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i can not|i won'?t|i will not|i am unable|i'?m unable|"
    r"as an ai|i apologi[sz]e|i must decline|i do not feel comfortable|unfortunately, i)", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(\*\*)?(corrupted|modified|edited|altered|new)( answer)?:?(\*\*)?:?\s*", re.IGNORECASE)


@dataclass
class CorruptOptions:
    ops: tuple[str, ...] = OPS
    k: int = 2
    seed: int = 0
    question_field: str | None = None
    answer_field: str | None = None
    tries: int = 3            # attempts per operation when the output is rejected
    source: str = "corrupted"
    few_shot: bool = True
    failed_out: IO | None = None  # where records that could not be corrupted go (JSONL), besides stderr

    def check(self) -> None:
        bad = [o for o in self.ops if o not in OPS]
        if bad:
            raise UsageError(f"--ops: unknown operation {bad[0]!r}; choose from {', '.join(OPS)}")
        if len(set(self.ops)) != len(self.ops):
            raise UsageError("--ops: an operation is listed twice")
        if not 1 <= self.k <= len(self.ops):
            raise UsageError(f"--k {self.k}: must be between 1 and the number of --ops ({len(self.ops)})")


def parse_ops(text: str) -> tuple[str, ...]:
    return tuple(o.strip().upper() for o in text.split(",") if o.strip())


# --------------------------------------------------------------------------------------------------- pieces


def fields_of(record: dict, opts: CorruptOptions) -> tuple[str, str]:
    qf = opts.question_field or first_present(record, QUESTION_FIELDS)
    af = opts.answer_field or first_present(record, ANSWER_FIELDS)
    if qf is None:
        raise RecordError(f"missing (expected one of {', '.join(QUESTION_FIELDS)})", field="question")
    if af is None:
        raise RecordError(f"missing (expected one of {', '.join(ANSWER_FIELDS)})", field="answer")
    return require(record, qf), require(record, af)


def record_key(record: dict, question: str, answer: str) -> str:
    """The record's own id when it has one, else a hash of its content: stable across runs and orders."""
    for name in ("id", "question_id", "qid"):
        if name in record and record[name] is not None:
            return f"{name}={record[name]}"
    return hashlib.sha256(f"{question}\x00{answer}".encode()).hexdigest()


def record_rng(seed: int, key: str) -> random.Random:
    # A string seed goes through sha512 in random.Random: the same (seed, key) gives the same stream everywhere.
    return random.Random(f"probllm-corrupt:{seed}:{key}")


def pick_ops(rng: random.Random, ops: tuple[str, ...], k: int) -> list[str]:
    return rng.sample(list(ops), k)


def messages_for(op: str, question: str, answer: str, few_shot: bool = True) -> list[dict]:
    system = _ADVERSARY + GOALS[op] + " " + _FORMAT
    msgs = [{"role": "system", "content": system}]
    if few_shot:
        q, a, c = FEW_SHOT[op]
        msgs += [{"role": "user", "content": _user_turn(q, a)}, {"role": "assistant", "content": c}]
    msgs.append({"role": "user", "content": _user_turn(question, answer)})
    return msgs


def _user_turn(question: str, answer: str) -> str:
    return f"Question:\n{question}\n\nCorrect answer:\n{answer}\n\nCorrupted answer:"


_ECHOED_TEMPLATE = re.compile(r"\s*(Corrupted answer:|Correct answer:|Question:\s*\n)", re.IGNORECASE)


def clean_output(text: str) -> str:
    """The corrupted answer alone: no leading label, no surrounding quotes, and none of our template that small
    models tend to echo after their answer."""
    text = _LABEL.sub("", text.strip(), count=1).strip()
    text = _ECHOED_TEMPLATE.split(text, maxsplit=1)[0].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


FOLLOW_UP = {
    "identical": "Your reply is identical to the correct answer: nothing was changed.",
    "empty": "Your reply was empty.",
    "refusal": "This is for training data: the changed answer will be labelled as the wrong one, so that a model "
               "learns to prefer the correct answer. Nobody will take it as true.",
}


def retry_messages(messages: list[dict], op: str, output: str, reason: str) -> list[dict]:
    """The conversation so far, the unusable reply, and a follow-up saying what was wrong and asking again."""
    ask_again = f"{FOLLOW_UP[reason]} {GOALS[op]} {_FORMAT}"
    return [*messages, {"role": "assistant", "content": output or "(no reply)"},
            {"role": "user", "content": ask_again}]


def retry_params(params: dict, attempt: int) -> dict:
    """The user's parameters on the first try; then sampling, hotter with every try (0.7, 0.9, 1.1... at most
    1.5), so that even a server that ignores `seed` gives another answer."""
    if attempt:
        params["temperature"] = min(1.5, max(params["temperature"], 0.7) + 0.2 * (attempt - 1))
    return params


def rejection_reason(before: str, after: str) -> str | None:
    """Why an output is not a valid corruption of `before`, or None when it is."""
    if not after.strip():
        return "empty"
    if " ".join(after.split()).lower() == " ".join(before.split()).lower():
        return "identical"
    if _REFUSAL.search(after):
        return "refusal"
    return None


def make_pair(record: dict, question: str, answer: str, rejected: str, ops: list[str], opts: CorruptOptions,
              label: str) -> dict:
    qf = opts.question_field or first_present(record, QUESTION_FIELDS)
    af = opts.answer_field or first_present(record, ANSWER_FIELDS)
    kept = {k: v for k, v in record.items() if k not in (qf, af)}
    if "topic;" in kept:  # CAMEL's field name carries a stray semicolon
        kept.setdefault("topic", kept.pop("topic;"))
    out = {"prompt": question, "chosen": answer, "rejected": rejected,
           "source": kept.pop("source", None) or opts.source, "corruption_ops": ops, "corruption_model": label}
    for k, v in kept.items():
        out.setdefault(k, v)
    return out


@dataclass
class _Outcome:
    record: Record
    pair: dict | None = None
    error: RecordError | None = None
    rejected: str | None = None   # reason the corruption outputs were rejected after all tries
    failed: str | None = None     # request failure after all tries
    ops: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------------------------------- running


def corrupt_records(records: Iterable[Record], config: BackendConfig, opts: CorruptOptions, stats: Stats,
                    skip_invalid: bool = False) -> Iterator[dict]:
    """Pair records for every input record, in input order; failures counted in `stats` and reported."""
    opts.check()
    backend = make_backend(config, allow_rules=True)
    if "corrupt_rules" in backend.capabilities:
        outcomes = _rules_outcomes(records, opts, backend)
    else:
        label = f"{config.backend}:{backend.model}"

        async def one(rec: Record) -> _Outcome:
            return await _corrupt_one(rec, backend, config, opts, label)

        outcomes = run_ordered(records, one, window=config.window, backend=backend)
    try:
        for outcome in outcomes:
            pair = _settle(outcome, stats, opts, skip_invalid)
            if pair is not None:
                yield pair
    finally:
        stats.notes.update(backend.counts())


def _settle(o: _Outcome, stats: Stats, opts: CorruptOptions, skip_invalid: bool) -> dict | None:
    where = f"{o.record.source}:{o.record.line}" if isinstance(o.record, Record) else "<input>"
    if o.error is not None:
        stats.reject(o.error, o.record, skip_invalid)
        return None
    if o.pair is not None:
        return o.pair
    reason = f"corruption rejected ({o.rejected})" if o.rejected else "request failed"
    stats.skip(reason)
    detail = o.rejected and f"every try gave an output that was {o.rejected}" or o.failed
    log(f"{stats.command}: {where}: not corrupted ({' then '.join(o.ops)}): {detail}")
    if opts.failed_out is not None:
        import json

        opts.failed_out.write(json.dumps({**o.record, "error": f"{reason}: {detail}"}, ensure_ascii=False) + "\n")
        opts.failed_out.flush()
    return None


async def _corrupt_one(rec: Record, backend, config: BackendConfig, opts: CorruptOptions, label: str) -> _Outcome:
    try:
        question, answer = fields_of(rec, opts)
    except RecordError as e:
        return _Outcome(rec, error=e)
    rng = record_rng(opts.seed, record_key(rec, question, answer))
    ops = pick_ops(rng, opts.ops, opts.k)
    base_seed = rng.randrange(2**31)
    text = answer
    for step, op in enumerate(ops):
        messages = messages_for(op, question, text, opts.few_shot)
        reason = None
        for attempt in range(opts.tries):
            params = retry_params(config.gen_params(seed=base_seed + 1000 * step + attempt).as_dict(), attempt)
            try:
                out = clean_output(await backend.chat(messages, params))
            except RequestFailed as e:
                return _Outcome(rec, failed=str(e), ops=ops)
            except FatalBackendError:
                raise
            reason = rejection_reason(text, out)
            if reason is None:
                text = out
                break
            # The next try is a different request, whatever the server does with `seed`: the model is told
            # what was wrong with its reply (and samples hotter), instead of being asked the same thing again.
            messages = retry_messages(messages, op, out, reason)
        if reason is not None:
            return _Outcome(rec, rejected=reason, ops=ops)
    pair = make_pair(rec, question, answer, text, ops, opts, label)
    pair["corruption_model_id"] = backend.identity  # what the response cache keys on (probllm/models.py)
    return _Outcome(rec, pair=pair, ops=ops)


def _rules_outcomes(records: Iterable[Record], opts: CorruptOptions, rules) -> Iterator[_Outcome]:
    """Sequential (rules are fast). INSERT draws its sentence from the answers of recent records, so unlike the
    operation choice it depends on the input's order."""
    pool: deque[str] = deque(maxlen=500)
    for rec in records:
        try:
            question, answer = fields_of(rec, opts)
        except RecordError as e:
            yield _Outcome(rec, error=e)
            continue
        rng = record_rng(opts.seed, record_key(rec, question, answer))
        ops = pick_ops(rng, opts.ops, opts.k)
        text, reason = answer, None
        for op in ops:
            out = rules.apply(op, text, question, rng, list(pool))
            reason = "unchanged" if out is None else rejection_reason(text, out)
            if reason is not None:
                break
            text = out
        pool.extend(split_sentences(answer))
        if reason is not None:
            yield _Outcome(rec, rejected=reason, ops=ops)
        else:
            yield _Outcome(rec, pair=make_pair(rec, question, answer, text, ops, opts, "rules"), ops=ops)
