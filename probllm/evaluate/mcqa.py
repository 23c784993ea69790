"""MCQ accuracy: score each question's choices with a causal LM, the way lm-evaluation-harness does, but faster.

Three methods:
- `loglik` (default): the log-likelihood of each continuation (" " + choice) after the prompt, summed over its
  tokens. `acc` takes the argmax; `acc_norm` the argmax of loglik / len(choice) in characters, exactly
  lm-eval's `process_results` (`completion_len = len(choice)`; ties go to the first choice, as `np.argmax`).
  Tokenisation follows lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation, the
  pair is encoded whole and the continuation tokens are what follows the context's own encoding.
- `letter`: one pass over a prompt listing the lettered options; the scores are the log-probs of the letters.
- `generate`: chain of thought, then the answer is read from the text (GSM8K number, MATH \\boxed{}, letter).

Speed (loglik): `probllm.lm.hf_scoring.score_groups` runs each question in ONE sequence: the prompt once, every
choice packed after it behind a block attention mask with its own position ids, logits only where a choice token
is predicted. lm-eval instead runs prompt + choice as a separate sequence for every choice and computes the
full-vocabulary log-softmax at every position. Memory stays bounded by the batch: records stream through a
window of `batch_size * WINDOW_BATCHES` items, which is sorted by length, scored and written back in input
order.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

from probllm.io import Record, RecordError, Stats, map_records
from probllm.records import LETTERS, extract_letter, parse_mcq, parse_passages
from probllm.evaluate.templates import (TEMPLATES, Item, Prompt, answer_kind, build_prompt, cot_prompt,
                                       resolve_template)

METHODS = ("loglik", "letter", "generate")
WINDOW_BATCHES = 16  # how many batches of records are read ahead, sorted by length and scored together


@dataclass
class EvalOptions:
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


# ------------------------------------------------------------------------------------------------- validation


def parse_item(record: dict, context_field: str | None = None, max_passages: int = 5) -> Item:
    """Check an MCQ record (question, choices, answer letter, source, subject) and reduce it to an Item."""
    mcq = parse_mcq(record, need_answer=True, min_choices=2)
    source = mcq.source or "unknown"
    passages = parse_passages(record, context_field, required=True) if context_field else []
    return Item(mcq.question, mcq.choices, mcq.gold, source, mcq.subject or source,
                [p["text"] for p in passages[:max_passages]])


def select_shots(item: Item, dev: list[Item], n: int) -> list[Item]:
    """lm-eval's `first_n` sampler on MMLU's dev split: the first n dev rows of the item's subject, in file order,
    duplicates included (lm-eval keeps them; skipping one shifted a foreign row into college_physics' prompts), and
    a row equal to the item itself included too (lm-eval drops the eval doc only when the shots come from the test
    split itself; --dev is another split, so pass a dev file, not the test file). A subject with fewer than n rows
    is filled up from the same source, then from any, never with the item itself (lm-eval would refuse)."""
    if n <= 0:
        return []
    picked = [d for d in dev if d.subject == item.subject][:n]
    for pool in ([d for d in dev if d.source == item.source], dev):
        for d in pool:
            if len(picked) == n:
                return picked
            if d.subject != item.subject and d != item and d not in picked:
                picked.append(d)
    return picked


# --------------------------------------------------------------------------------------------------- scoring


class Scorer:
    """A model + tokenizer and the three scoring methods over batches of prompts. Log-likelihoods come from the
    packed core `probllm.lm.hf_scoring.score_groups` (each prompt once, its choices packed after it)."""

    def __init__(self, model, tokenizer, device: str | None = None, **tuning):
        import torch

        from probllm.lm.hf_scoring import model_max_length

        self.model = model
        self.tok = tokenizer
        self.device = device or str(next(model.parameters()).device)
        self.max_length = model_max_length(model, tokenizer)
        self.tuning = tuning  # score_groups' knobs (batch_tokens, max_rows, min_shared_prefix, row_tokens)
        self.stats: dict = {}  # forward passes, tokens fed, padded tokens, prompt tokens shared across questions
        self.torch = torch

    @property
    def shared_prefix_tokens(self) -> int:
        return self.stats.get("shared_prefix_tokens", 0)

    # ---- tokenisation, as lm-eval's HFLM

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        from probllm.lm.hf_scoring import encode_pair

        return encode_pair(self.tok, context, continuation)

    def chat(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # ---- loglik

    def score(self, groups) -> list[list[tuple[float, bool]]]:
        from probllm.lm.hf_scoring import score_groups

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.tok.eos_token_id or 0)
        return score_groups(self.model, groups, max_length=self.max_length, device=self.device, pad_id=pad,
                            stats=self.stats, **self.tuning)

    def loglik(self, prompts: list[Prompt]) -> list[list[float]]:
        """Summed log-prob of every continuation of every prompt (lm-eval's loglikelihood)."""
        return [[s for s, _ in scores] for scores in self.loglik_greedy(prompts)]

    def loglik_greedy(self, prompts: list[Prompt]) -> list[list[tuple[float, bool]]]:
        groups = []
        for p in prompts:
            # The context part of lm-eval's pair encoding is the same for every choice (only the context's own
            # trailing spaces move), so the prompt is encoded once and shared by the choices.
            pairs = [self.encode_pair(p.context, cont) for cont in p.continuations]
            groups.append((pairs[0][0], [c for _, c in pairs]))
        return self.score(groups)

    # ---- letter

    def letter_scores(self, prompts: list[Prompt]) -> list[list[float]]:
        """Log-probs of the option letters as the next token after the prompt (first token of " A" etc.)."""
        groups = []
        for p in prompts:
            pairs = [self.encode_pair(p.context, c) for c in p.continuations]
            groups.append((pairs[0][0], [c[:1] for _, c in pairs]))
        return [[s for s, _ in scores] for scores in self.score(groups)]

    # ---- generate

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        torch = self.torch
        old_side = self.tok.padding_side
        self.tok.padding_side = "left"
        try:
            batch = self.tok(prompts, return_tensors="pt", padding=True)
        finally:
            self.tok.padding_side = old_side
        with torch.no_grad():
            out = self.model.generate(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id,
            )
        new = out[:, batch["input_ids"].shape[1]:]
        return self.tok.batch_decode(new, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- answer extraction

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _num(text: str) -> float | None:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(text)
    except ValueError:
        pass
    m = re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", text)
    if m and int(m.group(2)):
        return int(m.group(1)) / int(m.group(2))
    return None


def extract_number(text: str) -> str | None:
    """GSM8K style: '#### N', else 'the answer is N', else the last number in the text."""
    for pattern in (r"####\s*(" + _NUMBER + ")", r"[Tt]he (?:final )?answer is:?\s*(" + _NUMBER + ")"):
        m = re.findall(pattern, text)
        if m:
            return m[-1]
    found = re.findall(_NUMBER, text)
    return found[-1] if found else None


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces nest), else 'the answer is X'."""
    start = text.rfind("\\boxed")
    if start >= 0:
        i = text.find("{", start)
        if i >= 0:
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1: j]
    m = re.findall(r"[Tt]he (?:final )?answer is:?\s*\$?([^\n$]+?)\$?\s*(?:\.|$)", text)
    return m[-1].strip() if m else None


def _norm_math(s: str) -> str:
    s = s.strip().strip("$").replace(" ", "").replace("\\!", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    return s.rstrip(".")


def match_choice(value: str | None, item: Item) -> int | None:
    """The index of the choice an extracted answer names: same number, or same normalised text."""
    if value is None:
        return None
    v_num = _num(value)
    if v_num is not None:
        for i, c in enumerate(item.choices):
            c_num = _num(c)
            if c_num is not None and math.isclose(v_num, c_num, rel_tol=1e-9, abs_tol=1e-9):
                return i
    v = _norm_math(value)
    for i, c in enumerate(item.choices):
        if _norm_math(c) == v:
            return i
    return None


def extract_answer(text: str, item: Item) -> tuple[str | None, int | None]:
    """What the generation answered, and which choice that is (None when it names none)."""
    kind = answer_kind(item)
    if kind == "number":
        value = extract_number(text)
        return value, match_choice(value, item)
    if kind == "boxed":
        value = extract_boxed(text)
        idx = match_choice(value, item)
        return value, idx
    letter = extract_letter(text, len(item.choices))
    return letter, (LETTERS.index(letter) if letter else None)


# ------------------------------------------------------------------------------------------------ the command


def _argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:  # strict: ties keep the first, like np.argmax
            best = i
    return best


def norm_scores(scores: list[float], texts: list[str]) -> list[float]:
    """lm-eval's acc_norm scores: loglik divided by the choice's length in characters."""
    return [s / float(len(t)) if len(t) else float("-inf") for s, t in zip(scores, texts)]


def evaluate_records(
    records: Iterable[Record],
    scorer: Scorer,
    options: EvalOptions,
    stats: Stats,
    summary: "Summary",
    skip_invalid: bool = False,
    progress: Callable[[int], Any] | None = None,
    shard=None,
) -> Iterator[dict]:
    """Prediction records, in input order: the MCQ record + pred, correct, scores (and acc_norm fields).

    Records stream through windows of `batch_size * WINDOW_BATCHES`: each window is sorted by length (similar
    lengths share a batch: little padding), scored batch by batch and written back in input order. On Ctrl-C the
    items of the window already scored are still yielded (in input order) before KeyboardInterrupt goes on up, so
    nothing scored is lost. With `shard` (a `probllm.evaluate.parallel.Shard`), every process reads the same
    records, scores every world-th batch of each window, and process 0 gathers and yields them all."""
    chat = scorer.chat if options.chat_template else None

    def prepare(rec: Record) -> dict:
        item = parse_item(rec, options.context_field, options.max_passages)
        shots = select_shots(item, options.dev, options.shots)
        if options.method == "generate":
            text = cot_prompt(item, shots)
            if chat:
                text = chat([{"role": "user", "content": text}])
            return {"record": rec, "item": item, "text": text, "group": "", "tokens": len(text)}
        template = options.template
        if options.method == "letter":  # the letters must be in the prompt: MMLU's template or our lettered one
            template = "mmlu" if resolve_template(template, item) == "mmlu" else "letter"
        prompt = build_prompt(item, template, shots, chat)
        if not hasattr(scorer, "score"):  # a served model (LMScorer) scores text; its server tokenizes
            return {"record": rec, "item": item, "prompt": prompt, "group": prompt.shared, "tokens_ids": None,
                    "tokens": len(scorer.encode(prompt.context))}
        # Tokenised once here (lm-eval's pair encoding); batches are cut by the packed length in tokens.
        pairs = [scorer.encode_pair(prompt.context, cont) for cont in prompt.continuations]
        context = pairs[0][0]
        continuations = [c for _, c in pairs]
        if options.method == "letter":
            continuations = [c[:1] for c in continuations]
        tokens = len(context) + sum(max(len(c) - 1, 0) for c in continuations)
        return {"record": rec, "item": item, "prompt": prompt, "group": prompt.shared,
                "tokens_ids": (context, continuations), "tokens": tokens}

    if options.limit is not None:
        records = islice(records, options.limit)
    prepared = map_records(records, prepare, stats, skip_invalid)
    window = options.batch_size * WINDOW_BATCHES
    while True:
        chunk = list(islice(prepared, window))
        if not chunk:
            return
        # Longest first (as lm-eval): similar lengths share a batch; a too-big batch fails early. With few-shot
        # examples, prompts with the same examples first go together (the scorer runs them once for several
        # questions); zero-shot prompts are sorted by length only (a shared task description is not worth it).
        order = sorted(range(len(chunk)), key=lambda k: (chunk[k]["group"] if options.shots else "",
                                                         -chunk[k]["tokens"]))
        batches = [order[b: b + options.batch_size] for b in range(0, len(order), options.batch_size)]
        results: dict[int, dict] = {}
        interrupted = False
        try:
            for n, idx in enumerate(batches):
                if shard is not None and n % shard.world != shard.rank:
                    continue
                for k, out in zip(idx, _score_batch([chunk[k] for k in idx], scorer, options)):
                    results[k] = out
                if progress:
                    progress(len(idx) * (shard.world if shard is not None else 1))
        except KeyboardInterrupt:
            if shard is not None:  # the other processes cannot be waited for: the window is lost, nothing else
                raise
            interrupted = True
        if shard is not None:
            results = shard.gather(results)
        for k in sorted(results):
            rec = results[k]
            summary.add(rec, chunk[k]["item"])
            yield rec
        if interrupted:
            raise KeyboardInterrupt


def _score_batch(batch: list[dict], scorer: Scorer, options: EvalOptions) -> list[dict]:
    outs = []
    if options.method == "generate":
        texts = scorer.generate([p["text"] for p in batch], options.max_new_tokens)
        for p, text in zip(batch, texts):
            item = p["item"]
            value, idx = extract_answer(text, item)
            pred = LETTERS[idx] if idx is not None else None
            outs.append({**p["record"], "pred": pred, "correct": idx == item.gold, "generation": text,
                         "extracted": value, "method": "generate"})
        return outs
    if batch[0]["tokens_ids"] is not None:
        all_scores = [[s for s, _ in scored] for scored in scorer.score([p["tokens_ids"] for p in batch])]
    else:
        prompts = [p["prompt"] for p in batch]
        all_scores = scorer.loglik(prompts) if options.method == "loglik" else scorer.letter_scores(prompts)
    for p, scores in zip(batch, all_scores):
        item = p["item"]
        pred = _argmax(scores)
        out = {**p["record"], "pred": LETTERS[pred], "correct": pred == item.gold,
               "scores": [round(s, 6) for s in scores], "method": options.method}
        if options.method == "loglik":
            pred_norm = _argmax(norm_scores(scores, p["prompt"].norm_texts))
            out.update({"pred_norm": LETTERS[pred_norm], "correct_norm": pred_norm == item.gold})
        outs.append(out)
    return outs


# ---------------------------------------------------------------------------------------------------- summary


def mean_stderr(values: list[float]) -> float:
    """lm-eval's `mean_stderr`: sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    if n < 2:
        return 0.0
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


class Summary:
    """Accuracy (acc, acc_norm) with standard errors overall, per source and per subject; items/s."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.started = time.perf_counter()
        self.items = 0
        self.prior = 0  # items read back from a resumed --output: in the accuracy, not in the speed
        # Per item: correct or not, keyed by item id (and occurrence), for `report`'s paired tests.
        self.correct: dict[str, bool] = {}
        self._occurrences: Counter = Counter()

    def add(self, rec: dict, item: Item) -> None:
        from probllm.evaluate.output import item_key

        self.items += 1
        key = item_key(rec, self._occurrences)
        self.correct[key] = bool(rec["correct"])
        for key in (("overall", "all"), ("source", item.source), ("subject", item.subject)):
            g = self.groups[key]
            g["acc"].append(1.0 if rec["correct"] else 0.0)
            if "correct_norm" in rec:
                g["acc_norm"].append(1.0 if rec["correct_norm"] else 0.0)

    @staticmethod
    def _metrics(g: dict[str, list[float]]) -> dict:
        out: dict[str, Any] = {"items": len(g["acc"])}
        for name in ("acc", "acc_norm"):
            vals = g.get(name)
            if vals:
                out[name] = round(sum(vals) / len(vals), 6)
                out[f"{name}_stderr"] = round(mean_stderr(vals), 6)
        return out

    def as_dict(self, **extra: Any) -> dict:
        seconds = time.perf_counter() - self.started
        result: dict[str, Any] = {
            **extra,
            "items": self.items,
            "seconds": round(seconds, 3),
            "items_per_s": round((self.items - self.prior) / seconds, 3) if seconds > 0 else None,
            "overall": self._metrics(self.groups[("overall", "all")]) if self.items else {"items": 0},
            "by_source": {},
            "by_subject": {},
            "item_correct": dict(self.correct),
        }
        for (kind, name), g in sorted(self.groups.items()):
            if kind == "source":
                result["by_source"][name] = self._metrics(g)
            elif kind == "subject":
                result["by_subject"][name] = self._metrics(g)
        return result

    def table(self, data: dict | None = None) -> str:
        """A short plain-text table for stderr."""
        data = data or self.as_dict()
        lines = [f"{'group':32} {'items':>6} {'acc':>14} {'acc_norm':>14}"]

        def row(name: str, m: dict) -> str:
            acc = f"{m['acc']:.4f}±{m['acc_stderr']:.4f}" if "acc" in m else "-"
            accn = f"{m['acc_norm']:.4f}±{m['acc_norm_stderr']:.4f}" if "acc_norm" in m else "-"
            return f"{name[:32]:32} {m['items']:>6} {acc:>14} {accn:>14}"

        lines.append(row("overall", data["overall"]))
        for name, m in data["by_source"].items():
            lines.append(row(f"source {name}", m))
        if len(data["by_subject"]) > 1:
            for name, m in data["by_subject"].items():
                lines.append(row(f"  subject {name}", m))
        return "\n".join(lines)


def load_dev(paths: list[str], context_field: str | None = None) -> list[Item]:
    """Few-shot examples: MCQ records from --dev files (all must be valid: a bad example would bias every prompt)."""
    from probllm.io import read_records

    items = []
    for rec in read_records(paths):
        try:
            items.append(parse_item(rec))
        except RecordError as e:
            raise e.locate(rec)
    return items


def run_eval(
    files: list[str] | None,
    stats: Stats,
    *,
    model: str | None = None,
    adapter: str | None = None,
    method: str = "loglik",
    template: str = "auto",
    shots: int = 0,
    dev: list[str] | None = None,
    chat_template: bool = False,
    context_field: str | None = None,
    max_passages: int = 5,
    batch_size: int = 16,
    limit: int | None = None,
    max_new_tokens: int = 256,
    dtype: str = "auto",
    device: str = "auto",
    skip_invalid: bool = False,
    output: str | None = None,
    force_resume: bool = False,
    num_processes: int = 1,
    argv: list[str] | None = None,
    backend=None,
) -> dict:
    """The `eval` command: load, stream, score, write predictions; the summary on stderr and, for the
    command's --summary file, in `stats.figures`.

    `backend` (a `probllm.lm.BackendConfig`) with `backend="openai"` scores a served model instead of loading
    one (see lm_scorer.py); `hf` (the default) loads the model here. `output`: append to this file instead of
    stdout, skipping what it already holds (resume), which must have been written by the same model and settings
    (`eval_provenance`) unless `force_resume`; `num_processes` (with the command line `argv` to start the
    others) or a launcher's environment: shard across processes."""
    import sys

    from probllm.evaluate.parallel import Workers, shard_from_env, stdin_is_shared
    from probllm.io import UsageError
    from probllm.models import set_threads

    options = EvalOptions(method=method, template=template, shots=shots, chat_template=chat_template,
                          context_field=context_field, max_passages=max_passages, batch_size=batch_size,
                          max_new_tokens=max_new_tokens)
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    if max_passages < 1:
        raise UsageError("--max-passages must be at least 1")
    if num_processes < 1:
        raise UsageError("--num-processes must be at least 1")
    if dev:
        options.dev = load_dev(dev)
    options.check()
    openai = backend is not None and backend.backend == "openai"
    if backend is not None and backend.backend not in ("hf", "openai"):
        raise UsageError(f"--backend {backend.backend}: eval takes hf or openai")
    if openai and num_processes > 1:
        raise UsageError("--num-processes shards a local model; with --backend openai, raise --concurrency")
    reads_stdin = not files or list(files) == ["-"]
    workers = None
    if num_processes > 1:
        workers = Workers(num_processes, argv if argv is not None else sys.argv[1:], reads_stdin)
    else:
        set_threads()
    failed = True
    shard = None
    try:
        shard = shard_from_env()
        if shard is not None and workers is None and reads_stdin and not stdin_is_shared():
            raise UsageError("several processes (accelerate/torchrun) read the same records: give input files, "
                             "or use --num-processes, which shares stdin")
        result = _run_eval(files, stats, options, shard, model=model, adapter=adapter, dtype=dtype, device=device,
                           limit=limit, skip_invalid=skip_invalid, output=output, force_resume=force_resume,
                           backend=backend)
        failed = False
        return result
    finally:
        if workers is not None:
            workers.close(failed)
        if shard is not None:
            shard.close()


def _note_dtype(model, device: str, main: bool) -> None:
    """bfloat16 is a choice of speed over exactness: say what it costs here (it is slow on CPUs without AMX or
    AVX512-BF16, where torch emulates it)."""
    import torch

    from probllm.io import log
    from probllm.models import cpu_has_fast_bf16

    dtype = getattr(model, "dtype", None)
    if not main or dtype not in (torch.bfloat16, torch.float16):
        return
    if device.startswith("cpu") and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        log("probllm eval: note: this CPU has no AMX/AVX512-BF16, so bfloat16 runs slower than float32 here")
    else:
        log(f"probllm eval: note: {str(dtype).replace('torch.', '')} weights: log-likelihoods differ from float32 "
            "in the 2nd-3rd decimal, so near-tied predictions can change (log-softmax is still taken in float32)")


def eval_provenance(options: EvalOptions, *, model: str | None, adapter: str | None, dtype: str, device: str,
                    backend=None) -> dict:
    """What decides an `eval` prediction: the model's identity and the settings that change scores or answers
    (not the batch size, the device or the number of processes, which only change how fast). Written in every
    prediction record; a resume of `-o FILE` requires the same."""
    import hashlib
    import json

    from probllm.models import device_name, endpoint_identity, model_identity, resolve_dtype

    if backend is not None and backend.backend == "openai":
        prov = endpoint_identity(backend.base_url, backend.model or "").as_dict()
    else:
        prov = {**model_identity(model, adapter).as_dict(),
                "dtype": str(resolve_dtype(dtype, device_name(device))).replace("torch.", "")}
    prov.update(method=options.method, template=options.template, shots=options.shots,
                chat_template=options.chat_template, context=options.context_field)
    if options.context_field:
        prov["max_passages"] = options.max_passages
    if options.method == "generate":
        prov["max_new_tokens"] = options.max_new_tokens
    if options.shots:  # the examples themselves: another --dev file is another prompt
        dev = json.dumps([[d.question, d.choices, d.gold, d.subject] for d in options.dev], ensure_ascii=False)
        prov["dev"] = "sha256:" + hashlib.sha256(dev.encode()).hexdigest()[:16]
    return prov


def _run_eval(files, stats: Stats, options: EvalOptions, shard, *, model, adapter, dtype, device, limit,
              skip_invalid, output, force_resume=False, backend=None) -> dict:
    from probllm.evaluate.output import ResumableOutput
    from probllm.io import UsageError, log, progress, read_records, write_records
    from probllm.models import load_model, load_tokenizer, model_label
    from probllm.provenance import stamp

    main = shard is None or shard.is_main
    if shard is not None and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{shard.local_rank}"  # one GPU per process, as accelerate/torchrun lay them out
    summary = Summary()
    provenance = eval_provenance(options, model=model, adapter=adapter, dtype=dtype, device=device, backend=backend)
    resume = None
    if output is not None:
        # Process 0 reads (and repairs) the file and checks who wrote it; every process skips the same records
        # (so shards stay aligned) and stops on a refusal (so none waits for the others forever).
        resume = ResumableOutput(output) if main else None
        refusal = resume.refusal(provenance, force_resume) if main else None
        if shard is not None:
            done, refusal = shard.broadcast((resume.done, refusal) if main else None)
            resume = resume or ResumableOutput(output, done=done)
        if refusal:
            raise UsageError(refusal)
        for rec in resume.existing() if main else []:
            try:
                summary.add(rec, parse_item(rec, options.context_field, options.max_passages))
                summary.prior += 1
            except (RecordError, KeyError):
                pass  # not a prediction of this input: left in the file, counted nowhere
    t0 = time.perf_counter()
    if backend is not None and backend.backend == "openai":
        from probllm.evaluate.lm_scorer import LMScorer
        from probllm.io import UsageError
        from probllm.lm import make_backend

        if options.chat_template and options.method != "generate":
            raise UsageError(f"--chat-template with --method {options.method} and --backend openai: a server "
                             "applies its template to chats only; score plain prompts, or use --method generate")
        backend.no_cache = True  # scores are cheap to ask again and must reflect the model served now
        scorer = LMScorer(make_backend(backend), backend.model or "")
        described = {"model": backend.model, "model_id": provenance["model_id"], "backend": "openai",
                     "base_url": backend.base_url}
    else:
        import torch

        lm = load_model(model, adapter=adapter, dtype=dtype, device=device)
        tok = load_tokenizer(model)
        if options.chat_template and not getattr(tok, "chat_template", None):
            raise UsageError("--chat-template: this model's tokenizer has no chat template")
        scorer = Scorer(lm, tok)
        _note_dtype(lm, scorer.device, main)
        described = {"model": model_label(model), "model_id": provenance["model_id"], "adapter": adapter,
                     "dtype": str(next(lm.parameters()).dtype).replace("torch.", ""), "device": scorer.device,
                     "threads": torch.get_num_threads(), "processes": shard.world if shard else 1}
    load_s = time.perf_counter() - t0
    summary.started = time.perf_counter()
    records = read_records(files, stats, skip_invalid)
    if limit is not None:
        records = islice(records, limit)
    if resume is not None:
        records = resume.skip_done(records, stats)
    try:
        with progress("eval") as advance:
            predictions = stamp(evaluate_records(records, scorer, options, stats, summary, skip_invalid,
                                                 advance if main else None, shard=shard), provenance)
            if not main:
                for _ in predictions:  # other processes score their share; process 0 writes
                    pass
            elif resume is not None:
                resume.append(predictions, stats)
                resume.finish()
            else:
                write_records(predictions, stats)
    finally:
        if hasattr(scorer, "close"):
            scorer.close()

    result = summary.as_dict(
        **described, method=options.method, template=options.template, shots=options.shots,
        chat_template=options.chat_template, context=options.context_field, batch_size=options.batch_size,
        load_seconds=round(load_s, 3),
    )
    if main:
        log(summary.table(result))
        log(f"probllm eval: {result['items']} items in {result['seconds']:.1f} s ({result['items_per_s']} items/s), "
            f"model loaded in {load_s:.1f} s")
        stats.figures.update(result)
    return result
