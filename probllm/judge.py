"""`judge`: an LLM compares or grades answers, MT-Bench style (method.md section 7; Zheng et al.).

Pairwise mode asks the judge twice per question, with the two answers in both positions. Agreeing verdicts count;
disagreeing ones are `inconsistent` and count as ties (the judge's position bias, not a preference). The judge may
also call a tie (`[[C]]`). Single mode grades each answer from 1 to 10. When a record carries a reference answer,
the reference-guided prompts are used. Every verdict record keeps the judge's raw text and the parsed verdict;
output that cannot be parsed is retried (sampling, new seed) and then reported in the record and the counts.

The summary gives wins/ties/losses of A against B, A's win rate with a 95% Wilson interval, the inconsistency
rate and the mean lengths of both answer sets.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from probllm.io import Record, RecordError, Stats, UsageError, log, read_records, require
from probllm.lm import BackendConfig, RequestFailed, make_backend, run_ordered
from probllm.lm.base import CHAT_LOGLIKELIHOOD

MODES = ("pairwise", "single")

_PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of "
    "the responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.')
_PAIR_REF_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. Your evaluation should consider correctness and helpfulness. You will be "
    "given a reference answer, assistant A's answer, and assistant B's answer. Your job is to evaluate which "
    "assistant's answer is better. Begin your evaluation by comparing both assistants' answers with the "
    "reference answer. Identify and correct any mistakes. Avoid any position biases and ensure that the order in "
    "which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.')
_SINGLE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, "
    "accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by providing a short "
    "explanation. Be as objective as possible. After providing your explanation, you must rate the response on a "
    'scale of 1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".')
_SINGLE_REF_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question displayed below. Your evaluation should consider correctness and helpfulness. You will be "
    "given a reference answer and the assistant's answer. Begin your evaluation by comparing the assistant's "
    "answer with the reference answer. Identify and correct any mistakes. Be as objective as possible. After "
    "providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this "
    'format: "[[rating]]", for example: "Rating: [[5]]".')

_PAIR_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")
_RATING_LOOSE = re.compile(r"rating\s*[:=]?\s*\[?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\]?", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------- parsing


def parse_pairwise(text: str) -> str | None:
    """'A', 'B' or 'tie' from the judge's text; the last [[...]] wins (the final verdict follows the reasoning)."""
    found = _PAIR_VERDICT.findall(text or "")
    if not found:
        return None
    v = found[-1].upper()
    return "tie" if v in ("C", "TIE") else v


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in `[[N]]` (or, failing that, `Rating: N`); None when absent or out of range."""
    found = _RATING.findall(text or "") or _RATING_LOOSE.findall(text or "")
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


def combine(first: str, second_swapped: str) -> str:
    """Verdict from the two orders. `first` judged (A, B) as shown; `second_swapped` judged (B, A), so its 'A'
    means our B. Returns 'a', 'b', 'tie' (both said tie) or 'inconsistent'."""
    v1 = {"A": "a", "B": "b", "tie": "tie"}[first]
    v2 = {"A": "b", "B": "a", "tie": "tie"}[second_swapped]
    return v1 if v1 == v2 else "inconsistent"


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (well-behaved at 0, 1 and small n)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# ---------------------------------------------------------------------------------------------------- prompts


def pairwise_messages(question: str, first: str, second: str, reference: str | None = None) -> list[dict]:
    parts = [f"[User Question]\n{question}\n"]
    if reference:
        parts.append(f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n")
    parts.append(f"[The Start of Assistant A's Answer]\n{first}\n[The End of Assistant A's Answer]\n")
    parts.append(f"[The Start of Assistant B's Answer]\n{second}\n[The End of Assistant B's Answer]")
    system = _PAIR_REF_SYSTEM if reference else _PAIR_SYSTEM
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(parts)}]


def single_messages(question: str, answer: str, reference: str | None = None) -> list[dict]:
    parts = [f"[Question]\n{question}\n"]
    if reference:
        parts.append(f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n")
    parts.append(f"[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]")
    system = _SINGLE_REF_SYSTEM if reference else _SINGLE_SYSTEM
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(parts)}]


# ------------------------------------------------------------------------------------------------ joining input


@dataclass
class JudgeOptions:
    mode: str = "pairwise"
    key: str = "id"
    question_field: str = "question"
    answer_field: str = "answer"       # the answer in each of --a/--b
    a_field: str = "answer_a"          # records already holding both answers
    b_field: str = "answer_b"
    reference_field: str = "reference"
    tries: int = 3                     # attempts when the judge's text has no verdict
    seed: int = 0
    verdict_from: str = "generation"   # or "likelihood": score the allowed verdicts (hf backend)

    def check(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode}: choose pairwise or single")
        if self.verdict_from not in ("generation", "likelihood"):
            raise UsageError(f"--verdict-from {self.verdict_from}: choose generation or likelihood")
        if self.tries < 1:
            raise UsageError("--judge-tries must be at least 1")


def join_answer_sets(a_records: Iterable[Record], b_paths: str | list[str], opts: JudgeOptions, stats: Stats,
                     skip_invalid: bool = False) -> Iterator[Record]:
    """Records of A with B's answer added as `answer_b` (A's answer becomes `answer_a`), joined on `opts.key`.

    A streams; B is held in memory as key -> (answer, reference), the only way to join files in different orders
    without sorting them."""
    b_answers: dict[str, tuple[str, object]] = {}
    b_stats = Stats(command=stats.command)
    for rec in read_records([b_paths] if isinstance(b_paths, str) else b_paths, b_stats, skip_invalid):
        try:
            key = _key_of(rec, opts.key)
            answer = require(rec, opts.answer_field, allow_empty=True)
        except RecordError as e:
            stats.reject(e, rec, skip_invalid)
            continue
        if key in b_answers:
            raise RecordError(f"duplicate key {key!r} in --b", field=opts.key, source=rec.source, line=rec.line)
        b_answers[key] = (answer, rec.get(opts.reference_field), rec.get(opts.question_field))
    used = set()
    for rec in a_records:
        out = Record({k: v for k, v in rec.items() if k != opts.answer_field}, source=rec.source, line=rec.line)
        try:
            key = _key_of(rec, opts.key)
            out[opts.a_field] = require(rec, opts.answer_field, allow_empty=True)
        except RecordError as e:
            out["__error__"] = e  # reported in order, by the caller
            yield out
            continue
        if key not in b_answers:
            out["__error__"] = RecordError(f"no record with {opts.key} = {key!r} in --b", field=opts.key)
            yield out
            continue
        used.add(key)
        b_answer, b_ref, b_question = b_answers[key]
        out[opts.b_field] = b_answer
        if opts.question_field not in out and b_question is not None:
            out[opts.question_field] = b_question
        if out.get(opts.reference_field) in (None, "") and b_ref not in (None, ""):
            out[opts.reference_field] = b_ref
        yield out
    unmatched = len(b_answers) - len(used)
    if unmatched:
        stats.notes["unmatched in --b"] = unmatched
        log(f"{stats.command}: {unmatched} record(s) of --b had no partner in --a")


def _key_of(rec: dict, key: str) -> str:
    if key not in rec or rec[key] is None:
        raise RecordError("missing (the join key)", field=key)
    return str(rec[key])


# ---------------------------------------------------------------------------------------------------- judging


@dataclass
class JudgeSummary:
    mode: str = "pairwise"
    wins: int = 0            # A better
    losses: int = 0          # B better
    ties: int = 0            # explicit ties + inconsistent
    explicit_ties: int = 0
    inconsistent: int = 0
    unparsed: int = 0        # no verdict after all tries
    failed: int = 0          # requests given up on
    len_a: list = field(default_factory=lambda: [0, 0])   # [sum of characters, count]
    len_b: list = field(default_factory=lambda: [0, 0])
    scores_a: list = field(default_factory=list)
    scores_b: list = field(default_factory=list)

    def add_lengths(self, a: str | None, b: str | None) -> None:
        if a is not None:
            self.len_a[0] += len(a)
            self.len_a[1] += 1
        if b is not None:
            self.len_b[0] += len(b)
            self.len_b[1] += 1

    def add_verdict(self, verdict: str) -> None:
        if verdict == "a":
            self.wins += 1
        elif verdict == "b":
            self.losses += 1
        elif verdict == "tie":
            self.ties += 1
            self.explicit_ties += 1
        elif verdict == "inconsistent":
            self.ties += 1
            self.inconsistent += 1

    def as_dict(self) -> dict:
        n = self.wins + self.losses + self.ties
        lo, hi = wilson_interval(self.wins, n)
        decisive = self.wins + self.losses
        dlo, dhi = wilson_interval(self.wins, decisive)
        out = {
            "mode": self.mode, "judged": n, "wins": self.wins, "ties": self.ties, "losses": self.losses,
            "explicit_ties": self.explicit_ties, "inconsistent": self.inconsistent,
            "win_rate": self.wins / n if n else None, "win_rate_ci95": [lo, hi] if n else None,
            "win_rate_decisive": self.wins / decisive if decisive else None,
            "win_rate_decisive_ci95": [dlo, dhi] if decisive else None,
            "inconsistency_rate": self.inconsistent / n if (n and self.mode == "pairwise") else None,
            "unparsed": self.unparsed, "failed": self.failed,
            "mean_length_a": self.len_a[0] / self.len_a[1] if self.len_a[1] else None,
            "mean_length_b": self.len_b[0] / self.len_b[1] if self.len_b[1] else None,
        }
        if self.mode == "single":
            out["mean_score_a"] = sum(self.scores_a) / len(self.scores_a) if self.scores_a else None
            out["mean_score_b"] = sum(self.scores_b) / len(self.scores_b) if self.scores_b else None
        return out

    def text(self) -> str:
        d = self.as_dict()
        if not d["judged"]:
            if self.mode == "single" and self.scores_a:  # one answer set graded, nothing to compare
                return (f"graded {len(self.scores_a)} answers: mean score {d['mean_score_a']:.2f}; unparsed "
                        f"{self.unparsed}, failed {self.failed}")
            return f"judged 0 records (unparsed {self.unparsed}, failed {self.failed})"
        lo, hi = d["win_rate_ci95"]
        parts = [f"A vs B: {self.wins} wins, {self.ties} ties ({self.inconsistent} inconsistent), "
                 f"{self.losses} losses; A win rate {d['win_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f})"]
        if d["inconsistency_rate"] is not None:
            parts.append(f"inconsistency rate {d['inconsistency_rate']:.3f}")
        if self.mode == "single" and d["mean_score_a"] is not None:
            parts.append(f"mean score A {d['mean_score_a']:.2f}"
                         + (f", B {d['mean_score_b']:.2f}" if d["mean_score_b"] is not None else ""))
        la, lb = d["mean_length_a"], d["mean_length_b"]
        parts.append("mean length (chars) A " + (f"{la:.0f}" if la is not None else "-")
                     + ", B " + (f"{lb:.0f}" if lb is not None else "-"))
        if self.unparsed or self.failed:
            parts.append(f"unparsed {self.unparsed}, failed {self.failed}")
        return "; ".join(parts)


@dataclass
class _Outcome:
    record: Record
    verdict_record: dict | None = None
    error: RecordError | None = None


def judge_records(records: Iterable[Record], config: BackendConfig, opts: JudgeOptions, stats: Stats,
                  summary: JudgeSummary, skip_invalid: bool = False) -> Iterator[dict]:
    """One verdict record per input record, in input order; `summary` is filled as records go out."""
    opts.check()
    backend = make_backend(config)
    if opts.verdict_from == "likelihood" and CHAT_LOGLIKELIHOOD not in backend.capabilities:
        raise UsageError("--verdict-from likelihood needs --backend hf (an API returns text, not scores)")
    label = f"{config.backend}:{backend.model}"

    async def one(rec: Record) -> _Outcome:
        try:
            return _Outcome(rec, verdict_record=await _judge_one(rec, backend, config, opts, label))
        except RecordError as e:
            return _Outcome(rec, error=e)

    try:
        for o in run_ordered(records, one, window=config.window, backend=backend):
            if o.error is not None:
                stats.reject(o.error, o.record, skip_invalid)
                continue
            v = o.verdict_record
            summary.add_lengths(v.get(opts.a_field), v.get(opts.b_field))
            if v.get("error"):
                where = f"{o.record.source}:{o.record.line}" if isinstance(o.record, Record) else "<input>"
                log(f"{stats.command}: {where}: no verdict: {v['error']}")
                if v["error"].startswith("request failed"):
                    summary.failed += 1
                else:
                    summary.unparsed += 1
            if opts.mode == "single":
                if v.get("score_a") is not None:
                    summary.scores_a.append(v["score_a"])
                if v.get("score_b") is not None:
                    summary.scores_b.append(v["score_b"])
            if v.get("verdict") is not None:
                summary.add_verdict(v["verdict"])
            yield v
    finally:
        stats.notes.update(backend.counts())


_PAIR_OPTIONS = [" [[A]]", " [[B]]", " [[C]]"]
_RATING_OPTIONS = [f" [[{i}]]" for i in range(1, 11)]


async def _ask(backend, messages: list[dict], config: BackendConfig, opts: JudgeOptions, seed: int, parse):
    """(raw texts of every try, parsed value or None). Retries with sampling when the text has no verdict.

    With `verdict_from="likelihood"` the judge does not write: the allowed verdicts are scored after a fixed
    start of the reply, and the raw text records the scores (the most likely verdict is parsed as usual)."""
    if opts.verdict_from == "likelihood":
        pairwise = parse is parse_pairwise
        options = _PAIR_OPTIONS if pairwise else _RATING_OPTIONS
        prefix = "My final verdict:" if pairwise else "Rating:"
        scores = await backend.choose(messages, options, prefix=prefix)
        best = max(range(len(options)), key=lambda i: scores[i])
        raw = prefix + options[best] + "  (log-likelihoods: " + ", ".join(
            f"{o.strip()} {sc:.3f}" for o, sc in zip(options, scores)) + ")"
        return [raw], parse(prefix + options[best])
    raws = []
    for attempt in range(opts.tries):
        params = config.gen_params(seed=seed + attempt).as_dict()
        if attempt:
            params["temperature"] = max(params["temperature"], 0.7)
        raw = await backend.chat(messages, params)
        raws.append(raw)
        parsed = parse(raw)
        if parsed is not None:
            return raws, parsed
    return raws, None


async def _judge_one(rec: Record, backend, config: BackendConfig, opts: JudgeOptions, label: str) -> dict:
    if "__error__" in rec:
        raise rec["__error__"]
    question = require(rec, opts.question_field)
    ref = rec.get(opts.reference_field)
    ref = ref if isinstance(ref, str) and ref.strip() else None
    out = {**rec, "judge_model": label, "judge_model_id": backend.identity, "judge_mode": opts.mode,
           "reference_guided": ref is not None}
    seed = opts.seed
    try:
        if opts.mode == "pairwise":
            a = require(rec, opts.a_field, allow_empty=True)
            b = require(rec, opts.b_field, allow_empty=True)
            raws1, v1 = await _ask(backend, pairwise_messages(question, a, b, ref), config, opts, seed,
                                   parse_pairwise)
            raws2, v2 = await _ask(backend, pairwise_messages(question, b, a, ref), config, opts, seed,
                                   parse_pairwise)
            out["judgments"] = [{"order": "ab", "raw": raws1[-1], "parsed": v1, "tries": len(raws1)},
                                {"order": "ba", "raw": raws2[-1], "parsed": v2, "tries": len(raws2)}]
            if v1 is None or v2 is None:
                out["verdict"] = None
                out["error"] = "unparseable judge output (no [[A]], [[B]] or [[C]])"
            else:
                out["verdict"] = combine(v1, v2)
            return out
        has_b = opts.b_field in rec
        a = require(rec, opts.a_field, allow_empty=True)
        judgments, scores = [], {}
        for side, answer in (("a", a), ("b", require(rec, opts.b_field, allow_empty=True) if has_b else None)):
            if answer is None:
                continue
            raws, score = await _ask(backend, single_messages(question, answer, ref), config, opts, seed,
                                     parse_rating)
            judgments.append({"answer": side, "raw": raws[-1], "parsed": score, "tries": len(raws)})
            scores[side] = score
        out["judgments"] = judgments
        out["score_a"] = scores.get("a")
        if has_b:
            out["score_b"] = scores.get("b")
        if any(s is None for s in scores.values()):
            out["verdict"] = None
            out["error"] = "unparseable judge output (no [[rating]] from 1 to 10)"
        elif has_b:
            out["verdict"] = "a" if scores["a"] > scores["b"] else "b" if scores["b"] > scores["a"] else "tie"
        else:
            out["verdict"] = None
        return out
    except RequestFailed as e:
        out["verdict"] = None
        out["error"] = f"request failed: {e}"
        return out


def judge_input(a: list[str] | None, b: list[str] | str | None, files: list[str] | None, opts: JudgeOptions,
                stats: Stats, skip_invalid: bool, limit: int | None = None) -> Iterator[Record]:
    """The records to judge: `--a`/`--b` joined on the key, or input records that already hold both answers
    (`limit`: the first N of A, or of the input)."""
    if b:
        if not a:
            raise UsageError("--b needs --a (or give records holding both answers as input files)")
        return join_answer_sets(read_records(a, stats, skip_invalid, limit=limit), b, opts, stats, skip_invalid)
    if a:
        if opts.mode == "pairwise":
            raise UsageError("pairwise mode needs --b as well as --a (or --mode single to grade one set)")
        opts.a_field = opts.answer_field
        return read_records(a, stats, skip_invalid, limit=limit)
    return read_records(files, stats, skip_invalid, limit=limit)
