"""MCQ accuracy: score each question's choices with a causal LM, the way lm-evaluation-harness does, but faster.

Three methods:
- `loglik` (default): the log-likelihood of each continuation (" " + choice) after the prompt, summed over its
  tokens. `acc` takes the argmax; `acc_norm` the argmax of loglik / len(choice) in characters, exactly
  lm-eval's `process_results` (`completion_len = len(choice)`; ties go to the first choice, as `np.argmax`).
  Tokenisation follows lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation, the
  pair is encoded whole and the continuation tokens are what follows the context's own encoding.
- `letter`: one pass over a prompt listing the lettered options; the scores are the log-probs of the letters.
- `generate`: chain of thought, then the answer is read from the text (GSM8K number, MATH \\boxed{}, letter).

Speed (loglik): items are scored in batches sorted by prompt length; each question's prompt goes through the
model ONCE (right-padded, KV cache kept, logits only at the last prompt token), then all continuations of all
choices of the batch run together on that cache, copied per choice. lm-eval instead runs prompt + choice as a
separate sequence for every choice and computes full-vocabulary log-softmax at every position. Memory stays
bounded by the batch: records stream through a window of `batch_size * WINDOW_BATCHES` items, which is sorted,
scored and written back in input order.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

from probllm.io import Record, RecordError, Stats, map_records
from probllm.records import LETTERS, extract_letter, parse_mcq, parse_passages
from probllm.evaluate.templates import (TEMPLATES, Item, Prompt, answer_kind, build_prompt, cot_prompt,
                                       resolve_template)

METHODS = ("loglik", "letter", "generate")
WINDOW_BATCHES = 8
PASS2_TOKENS = 256  # continuation tokens per pass-2 chunk (padding included) beyond the minimum rows
PASS2_KV_TOKENS = 16384  # copied prompt positions per pass-2 chunk beyond the minimum rows
MIN_SHARED_PREFIX = 16  # tokens: below this, an extra pass for a prefix common to the batch costs more than it saves  # how many batches of records are read ahead, sorted by length and scored together


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
    """The first n dev examples of the same subject (lm-eval's `first_n` sampler on MMLU's dev split), filled up
    from the same source, then from any; never the question being asked."""
    if n <= 0:
        return []
    picked: list[Item] = []
    for pool in (
        [d for d in dev if d.subject == item.subject],
        [d for d in dev if d.source == item.source],
        dev,
    ):
        for d in pool:
            if len(picked) == n:
                return picked
            if d.question != item.question and d not in picked:
                picked.append(d)
    return picked


# --------------------------------------------------------------------------------------------------- scoring


class Scorer:
    """A model + tokenizer and the three scoring methods over batches of prompts."""

    def __init__(self, model, tokenizer, device: str | None = None):
        import torch

        self.model = model
        self.tok = tokenizer
        self.device = device or str(next(model.parameters()).device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_length = _model_max_length(model, tokenizer)
        self.cache_kwarg = _cache_kwarg(model)
        self.shared_prefix_tokens = 0  # prompt tokens not recomputed thanks to a prefix shared across a batch
        self.torch = torch

    # ---- tokenisation, as lm-eval's HFLM

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's `_encode_pair`: trailing spaces move to the continuation; encode whole, then split."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    def chat(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # ---- loglik

    def loglik(self, prompts: list[Prompt]) -> list[list[float]]:
        """Summed log-prob of every continuation of every prompt: one pass per prompt, then all continuations
        of the batch on its KV cache."""
        encoded = []
        for p in prompts:
            ctx = None
            conts = []
            for cont in p.continuations:
                c_ctx, c_cont = self.encode_pair(p.context, cont)
                if ctx is None:
                    ctx = c_ctx
                elif c_ctx != ctx:  # only when a continuation starts with spaces that differ per choice
                    raise RecordError("choices start with different whitespace; cannot share the prompt",
                                      field="choices")
                conts.append(c_cont)
            # lm-eval keeps the last max_length tokens of prompt + continuation: cut the prompt for the longest.
            overflow = len(ctx) + max(len(c) for c in conts) - 1 - self.max_length
            if overflow > 0:
                ctx = ctx[overflow:]
            encoded.append((ctx, conts))
        return self._score_encoded(encoded)

    def _score_encoded(self, encoded: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        torch = self.torch
        F = torch.nn.functional
        dev = self.device
        B = len(encoded)
        # Few-shot prompts of one subject share their description and examples: find the tokens common to every
        # prompt of the batch (on token ids, so it is exact whatever the text split) and run them once.
        shared = _common_prefix_length([c for c, _ in encoded]) if B > 1 else 0
        shared = min(shared, min(len(c) for c, _ in encoded) - 1)
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        suffix_lens = torch.tensor([len(c) - shared for c, _ in encoded])
        Ls = int(suffix_lens.max())
        suffix_ids = torch.full((B, Ls), self.pad_id, dtype=torch.long)
        ctx_mask = torch.zeros((B, shared + Ls), dtype=torch.long)
        ctx_mask[:, :shared] = 1
        for i, (c, _) in enumerate(encoded):
            suffix_ids[i, : len(c) - shared] = torch.tensor(c[shared:])
            ctx_mask[i, shared: len(c)] = 1
        ctx_lens = suffix_lens + shared
        positions = shared + torch.arange(Ls).unsqueeze(0).expand(B, Ls)
        scores = [[0.0] * len(conts) for _, conts in encoded]
        with torch.no_grad():
            cache_arg = {}
            if shared:
                out0 = self.model(input_ids=torch.tensor([encoded[0][0][:shared]]).to(dev), use_cache=True,
                                  logits_to_keep=1)
                shared_cache = getattr(out0, "cache", None) or out0.past_key_values
                _set_cache_rows(shared_cache, _cache_tensors(shared_cache), torch.zeros(B, dtype=torch.long).to(dev))
                cache_arg = {self.cache_kwarg: shared_cache}
                self.shared_prefix_tokens += shared * (B - 1)
            # Pass 1: every prompt once, right-padded; logits only at each prompt's last token.
            out = self.model(
                input_ids=suffix_ids.to(dev),
                attention_mask=ctx_mask.to(dev),
                position_ids=positions.to(dev),
                use_cache=True,
                logits_to_keep=(suffix_lens - 1).unsqueeze(1).to(dev),
                **cache_arg,
            )
            last_logprobs = F.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()  # [B, V]
            cache = getattr(out, "cache", None) or out.past_key_values
            del out
            for i, (_, conts) in enumerate(encoded):
                for j, cont in enumerate(conts):
                    if cont:
                        scores[i][j] = float(last_logprobs[i, cont[0]])
            # Pass 2: the remaining tokens of every choice, on a copy of its prompt's KV cache. Rows are sorted
            # by continuation length and run in chunks of about one batch, so short answers are not padded to
            # the longest one of the batch.
            rows = sorted(((i, j) for i, (_, conts) in enumerate(encoded) for j in range(len(conts))
                           if len(conts[j]) > 1), key=lambda r: -len(encoded[r[0]][1][r[1]]))
            if not rows:
                return scores
            prompt_kv = _cache_tensors(cache)
            lens = [[len(c) - 1 for c in conts] for _, conts in encoded]
            for chunk in _chunk_rows(rows, lens, max(B, 8), shared + Ls):
                R = len(chunk)
                Lt = len(encoded[chunk[0][0]][1][chunk[0][1]]) - 1
                inp = torch.full((R, Lt), self.pad_id, dtype=torch.long)
                tgt = torch.zeros((R, Lt), dtype=torch.long)
                tmask = torch.zeros((R, Lt), dtype=torch.long)
                for r, (i, j) in enumerate(chunk):
                    cont = encoded[i][1][j]
                    n = len(cont) - 1
                    inp[r, :n] = torch.tensor(cont[:-1])
                    tgt[r, :n] = torch.tensor(cont[1:])
                    tmask[r, :n] = 1
                item_index = torch.tensor([i for i, _ in chunk])
                _set_cache_rows(cache, prompt_kv, item_index.to(dev))
                mask = torch.cat([ctx_mask[item_index], tmask], dim=1)
                pos = ctx_lens[item_index].unsqueeze(1) + torch.arange(Lt).unsqueeze(0)
                keep = tmask.bool()
                # Logits only at the real (unpadded) continuation tokens: [N, V] with N = tmask.sum(), in row order.
                out2 = self.model(
                    input_ids=inp.to(dev),
                    attention_mask=mask.to(dev),
                    position_ids=pos.to(dev),
                    use_cache=True,
                    logits_to_keep=keep.to(dev),
                    **{self.cache_kwarg: cache},
                )
                logprobs = F.log_softmax(out2.logits.reshape(-1, out2.logits.shape[-1]).float(), dim=-1)
                picked = torch.zeros((R, Lt))
                picked[keep] = logprobs.gather(-1, tgt[keep].to(dev).unsqueeze(-1)).squeeze(-1).cpu()
                sums = (picked * tmask).sum(dim=1)
                for r, (i, j) in enumerate(chunk):
                    scores[i][j] += float(sums[r])
        return scores

    # ---- letter

    def letter_scores(self, prompts: list[Prompt]) -> list[list[float]]:
        """Log-probs of the option letters as the next token after the prompt (first token of " A" etc.)."""
        encoded = []
        for p in prompts:
            ctx, _ = self.encode_pair(p.context, p.continuations[0])
            conts = [self.encode_pair(p.context, c)[1][:1] for c in p.continuations]
            encoded.append((ctx[-self.max_length:], conts))
        return self._score_encoded(encoded)

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
                pad_token_id=self.pad_id,
            )
        new = out[:, batch["input_ids"].shape[1]:]
        return self.tok.batch_decode(new, skip_special_tokens=True)


def _chunk_rows(rows: list[tuple[int, int]], lens: list[list[int]], min_rows: int, ctx_len: int
                ) -> list[list[tuple[int, int]]]:
    """Pass-2 chunks of rows (sorted longest first): at least `min_rows` rows, more while the padded chunk stays
    within PASS2_TOKENS tokens (short answers: bigger matrix products, fewer passes), at most 4 * min_rows rows
    and PASS2_KV_TOKENS copied prompt positions (memory)."""
    max_rows = max(min_rows, min(4 * min_rows, PASS2_KV_TOKENS // max(ctx_len, 1)))
    out: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    for r in rows:
        if cur and len(cur) >= min_rows and (
                len(cur) >= max_rows or (len(cur) + 1) * lens[cur[0][0]][cur[0][1]] > PASS2_TOKENS):
            out.append(cur)
            cur = []
        cur.append(r)
    if cur:
        out.append(cur)
    return out


def _common_prefix_length(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for k in range(n):
        t = first[k]
        if any(x[k] != t for x in seqs):
            return k
    return n


def _cache_tensors(cache) -> list[tuple]:
    """The prompts' keys and values per layer, kept aside so each chunk of choices can take its own copy."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") for layer in layers):  # pragma: no cover
        raise RuntimeError("this model's KV cache type is not supported by prefix reuse")
    return [(layer.keys, layer.values) for layer in layers]


def _set_cache_rows(cache, prompt_kv: list[tuple], index) -> None:
    """Point the cache at one copy of each row's prompt keys/values (rows repeat: indexing copies). The forward
    pass then appends the choice tokens to these copies, never to the kept originals."""
    for layer, (keys, values) in zip(cache.layers, prompt_kv):
        layer.keys = keys.index_select(0, index)
        layer.values = values.index_select(0, index)


def _cache_kwarg(model) -> str:
    """transformers 5 renamed `past_key_values` to `cache` (the old name warns); older models keep the old one."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _model_max_length(model, tokenizer) -> int:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else 2048


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
) -> Iterator[dict]:
    """Prediction records, in input order: the MCQ record + pred, correct, scores (and acc_norm fields)."""
    chat = scorer.chat if options.chat_template else None

    def prepare(rec: Record) -> dict:
        item = parse_item(rec, options.context_field, options.max_passages)
        shots = select_shots(item, options.dev, options.shots)
        if options.method == "generate":
            text = cot_prompt(item, shots)
            if chat:
                text = chat([{"role": "user", "content": text}])
            return {"record": rec, "item": item, "text": text, "group": "", "tokens": 0, "size": len(text)}
        template = options.template
        if options.method == "letter":  # the letters must be in the prompt: MMLU's template or our lettered one
            template = "mmlu" if resolve_template(template, item) == "mmlu" else "letter"
        prompt = build_prompt(item, template, shots, chat)
        # Batches are cut by prompt length in tokens: pass 1 pads every prompt to the longest of its batch.
        return {"record": rec, "item": item, "prompt": prompt, "group": prompt.shared,
                "tokens": len(scorer.encode(prompt.context)),
                "size": len(prompt.context) + max(len(c) for c in prompt.continuations)}

    if options.limit is not None:
        records = islice(records, options.limit)
    prepared = map_records(records, prepare, stats, skip_invalid)
    window = options.batch_size * WINDOW_BATCHES
    while True:
        chunk = list(islice(prepared, window))
        if not chunk:
            return
        # Prompts with the same few-shot prefix together (it is then computed once per batch), and within them
        # longest first (as lm-eval): similar lengths share a batch, little padding; a too-big batch fails early.
        order = sorted(range(len(chunk)), key=lambda k: (chunk[k]["group"], -chunk[k]["tokens"], -chunk[k]["size"]))
        results: dict[int, dict] = {}
        for b in range(0, len(order), options.batch_size):
            idx = order[b: b + options.batch_size]
            batch = [chunk[k] for k in idx]
            for k, out in zip(idx, _score_batch(batch, scorer, options)):
                results[k] = out
            if progress:
                progress(len(idx))
        for k in range(len(chunk)):
            rec = results[k]
            summary.add(rec, chunk[k]["item"])
            yield rec


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

    def add(self, rec: dict, item: Item) -> None:
        self.items += 1
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
            "items_per_s": round(self.items / seconds, 3) if seconds > 0 else None,
            "overall": self._metrics(self.groups[("overall", "all")]) if self.items else {"items": 0},
            "by_source": {},
            "by_subject": {},
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
    backend=None,
) -> dict:
    """The `eval` command: load, stream, score, write predictions; the summary on stderr and, for the
    command's --summary file, in `stats.figures`.

    `backend` (a `probllm.lm.BackendConfig`) with `backend="openai"` scores a served model instead of loading
    one (see lm_scorer.py); `hf` (the default) loads the model here."""
    from probllm.io import UsageError, log, progress, read_records, write_records
    from probllm.models import load_model, load_tokenizer, model_label, set_threads

    options = EvalOptions(method=method, template=template, shots=shots, chat_template=chat_template,
                          context_field=context_field, max_passages=max_passages, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, limit=limit)
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    if max_passages < 1:
        raise UsageError("--max-passages must be at least 1")
    if dev:
        options.dev = load_dev(dev)
    options.check()
    t0 = time.perf_counter()
    if backend is not None and backend.backend == "openai":
        from probllm.evaluate.lm_scorer import LMScorer
        from probllm.lm import make_backend

        if chat_template and method != "generate":
            raise UsageError(f"--chat-template with --method {method} and --backend openai: a server applies its "
                             "template to chats only; score plain prompts, or use --method generate")
        backend.no_cache = True  # scores are cheap to ask again and must reflect the model served now
        scorer = LMScorer(make_backend(backend), backend.model or "")
        described = {"model": backend.model, "backend": "openai", "base_url": backend.base_url}
    else:
        if backend is not None and backend.backend != "hf":
            raise UsageError(f"--backend {backend.backend}: eval takes hf or openai")
        set_threads()
        lm = load_model(model, adapter=adapter, dtype=dtype, device=device)
        tok = load_tokenizer(model)
        if chat_template and not getattr(tok, "chat_template", None):
            raise UsageError("--chat-template: this model's tokenizer has no chat template")
        scorer = Scorer(lm, tok)
        import torch

        described = {"model": model_label(model), "adapter": adapter,
                     "dtype": str(next(lm.parameters()).dtype).replace("torch.", ""), "device": scorer.device,
                     "threads": torch.get_num_threads()}
    load_s = time.perf_counter() - t0
    summary = Summary()
    records = read_records(files, stats, skip_invalid)
    try:
        with progress("eval") as advance:
            write_records(evaluate_records(records, scorer, options, stats, summary, skip_invalid, advance), stats)
    finally:
        if hasattr(scorer, "close"):
            scorer.close()

    result = summary.as_dict(
        **described, method=method, template=template, shots=shots,
        chat_template=chat_template, context=context_field, batch_size=batch_size, load_seconds=round(load_s, 3),
    )
    log(summary.table(result))
    log(f"probllm eval: {result['items']} items in {result['seconds']:.1f} s ({result['items_per_s']} items/s), "
        f"model loaded in {load_s:.1f} s")
    stats.figures.update(result)
    return result
