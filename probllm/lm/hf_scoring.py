"""The loglikelihood core of local (transformers) models, with lm-evaluation-harness semantics, packed.

`score_groups(model, groups, max_length=...)` takes `(context_ids, [continuation_ids, ...])` groups (one per
multiple-choice question: the prompt and every choice) and returns, for every continuation, `(sum of the
log-probs of its tokens, is_greedy)` exactly as lm-eval 0.4.13's `HFLM._loglikelihood_tokens` defines them.

lm-eval runs `context + continuation` as its own sequence for every choice, so a 4-choice question feeds its
prompt four times. Here the prompt goes through the model ONCE and the choices are packed after it in the same
row, each seeing the prompt and itself only:

    row:        [ c0 c1 c2 c3 | a0 a1 | b0 | d0 d1 d2 ]      (choice tokens but the last: the last is only a target)
    positions:    0  1  2  3  | 4  5  | 4  | 4  5  6
    a0 attends:   c0..c3 and a0;  b0: c0..c3 and b0;  ...

A 4D attention mask (block causal: the context is causal, each choice block attends to the context and causally
to itself) and per-token position ids make every choice token compute exactly what it computes in lm-eval's
separate sequence (same keys, same positions), up to float summation order. The first token of every choice is
predicted by the context's last position, shared. Logits are computed only where a choice token is predicted
(the full-vocabulary projection is a fifth of a small model's work per token).

Prompts that share a long token prefix (few-shot examples) go one level further: several groups sit in one row
behind one copy of the prefix (a tree: prefix -> each question -> its choices), when the prefix is at least as
long as each question's own part (attention in a row is dense, so sharing a short task description would cost
more than it saves).

Prompts of a cluster (5-shot MMLU: the description line and five dev examples, ~80% of every prompt of a subject;
zero-shot MMLU: the description line, ~18%) go further still: the longest common token prefix P of a cluster of
contexts (sorted, each neighbour sharing at least `min_cached_prefix` tokens, the nesting that saves the most
tokens: see `_clusters`) runs through the model ONCE with a key/value cache (unlike a shared row, a cached prefix
costs its rows nothing but P attention columns, so a short one pays too), and
the cluster's suffix rows (each context's rest and its packed choices, the block mask above) are scored in
batches against that cache expanded across the batch: a [B, 1, S, P + S] additive mask (the prefix visible to
every token, the block structure on the suffix part), positions offset by P. The prefix is cut from the token ids
of the full contexts (each tokenized whole, as lm-eval does), so a boundary inside a word changes nothing.

Rows are sorted by length; the longest pending row sets a batch's width, and shorter rows are packed several to
a line of that width (each with its own positions and mask blocks), under a padded-token budget: padding stays
small on any mix of lengths, and every batch is one forward pass and one transfer of results (no per-token
Python work on the device).
When a group does not fit `max_length`, it is split into one row per choice with lm-eval's left truncation
(`(context + continuation)[-(max_length + 1):][:-1]`), so long prompts keep lm-eval's results too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

MIN_CACHED_PREFIX = 12  # tokens a cluster of contexts must share for its prefix to run once into a KV cache: an
# MMLU description line ("The following are ... about astronomy.") is 13-16 tokens, the part that every subject's
# line shares ("... about") 11: a subject's zero-shot prompts share a prefix, two subjects' do not.
# ... and the prompt tokens the cache saves (prefix x (contexts - 1)) must reach this: a cached prefix moves a
# score by float rounding (~1e-5 on SmolLM2), worth it for a description line before half a batch of a subject's
# questions (15 x 7 tokens: a batch of 16 that holds the end of one subject and the start of the next; later
# batches reuse the kept prefix) or a few-shot block, not for two questions that happen to share a passage of up
# to 95 tokens (those stay exactly as scored whole).
MIN_CACHED_SAVING = 96
PREFIX_CACHE_ENTRIES = 8  # prefixes' keys/values a caller's `prefix_cache` keeps across calls (most recent)
MIN_SHARED_PREFIX = 16  # tokens: a shorter common prefix is not worth the wider attention of a shared row
ROW_TOKENS = 1024  # longest row built from several groups behind one shared prefix
BATCH_TOKENS = 4096  # padded tokens (rows x longest row) per forward pass
MAX_ROWS = 64  # rows per forward pass

Group = tuple[Sequence[int], Sequence[Sequence[int]]]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation; the pair is encoded
    whole and the continuation is what follows the context's own encoding. An empty context becomes lm-eval's
    prefix token (bos, else eos), as its `loglikelihood` does."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def model_max_length(model, tokenizer=None) -> int:
    """The context length lm-eval's HFLM uses: the model config's, else the tokenizer's, else 2048."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000_000 else 2048


# ----------------------------------------------------------------------------------------------------- planning


@dataclass
class _Unit:
    """One context with the continuations scored after it; `outputs[k]` = (group, choice) of continuation k."""

    context: list[int]
    continuations: list[list[int]]
    outputs: list[tuple[int, int]]


@dataclass
class _Row:
    """One sequence of a batch: a shared prefix (may be empty), then per unit its context rest and choices."""

    prefix: list[int]
    units: list[_Unit] = field(default_factory=list)

    def length(self) -> int:
        return len(self.prefix) + sum(_unit_length(u, len(self.prefix)) for u in self.units)


def _unit_length(unit: _Unit, prefix: int) -> int:
    return len(unit.context) - prefix + sum(len(c) - 1 for c in unit.continuations)


def _units(groups: Sequence[Group], max_length: int, results: list[list[Any]]) -> list[_Unit]:
    """Groups to units: a group that fits the model whole is one unit; one that does not is cut into one unit per
    choice, each left-truncated as lm-eval does. Empty continuations score (0.0, True) here and go no further."""
    units: list[_Unit] = []
    for g, (context, continuations) in enumerate(groups):
        context = list(context)
        if not context:
            raise ValueError(f"group {g}: empty context (encode_pair gives the prefix token)")
        kept = [(j, list(c)) for j, c in enumerate(continuations) if len(c)]
        for j, c in enumerate(continuations):
            if not len(c):
                results[g][j] = (0.0, True)
        if not kept:
            continue
        if len(context) + max(len(c) for _, c in kept) - 1 <= max_length:
            units.append(_Unit(context, [c for _, c in kept], [(g, j) for j, _ in kept]))
            continue
        for j, c in kept:
            if len(c) > max_length:
                raise ValueError(f"group {g}: continuation {j} has {len(c)} tokens, more than max_length")
            whole = (context + c)[-(max_length + 1):]
            units.append(_Unit(whole[: len(whole) - len(c)], [c], [(g, j)]))
    return units


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _rows(units: list[_Unit], min_shared: int, row_tokens: int) -> list[_Row]:
    """Units sorted by context (common prefixes become neighbours). Neighbours go into one row behind one copy
    of their common prefix when it is worth it: at least `min_shared` tokens, at least as long as the new unit's
    own part (a row's attention is dense, so sharing a short prefix would cost more than it saves: zero-shot
    prompts that only share a task description stay apart), and the row within `row_tokens`."""
    order = sorted(range(len(units)), key=lambda i: units[i].context)
    rows: list[_Row] = []
    for i in order:
        unit = units[i]
        if rows:
            row = rows[-1]
            base = row.prefix if len(row.units) > 1 else row.units[0].context[:-1]
            # The prefix leaves every context at least its last token: it predicts the choices' first tokens.
            shared = min(_common_prefix(base, unit.context), len(unit.context) - 1)
            if shared >= min_shared and shared >= _unit_length(unit, shared):
                candidate = _Row(base[:shared], row.units + [unit])
                if candidate.length() <= row_tokens:
                    rows[-1] = candidate
                    continue
        rows.append(_Row([], [unit]))
    return rows


@dataclass
class _Cluster:
    """Units whose contexts all start with `prefix` (a cached prefix: run once, its keys/values reused); `units`
    hold the contexts' rests after it."""

    prefix: list[int]
    units: list[_Unit]


def _clusters(units: list[_Unit], min_cached: int, min_saving: int | None = None,
              ) -> tuple[list[_Cluster], list[_Unit]]:
    """Units sorted by context, then cut into the clusters that save the most prompt tokens: a run of neighbours
    whose contexts all share P >= `min_cached` tokens (P leaves every context at least its last token: it predicts
    the choices' first tokens) saves P x (units - 1) when P runs once. Runs nest (all of a test's prompts share
    the start of MMLU's description line, each subject's prompts its whole line, two questions of a subject maybe
    a passage more): each run is either one cluster behind its common prefix or its sub-runs, whichever saves
    more, so two subjects in one batch get one prefix each, not the description's first words. Units in no
    cluster, and clusters saving fewer than `min_saving` tokens, are returned as they are (the packed rows take
    them)."""
    if min_saving is None:
        min_saving = MIN_CACHED_SAVING
    order = sorted(units, key=lambda u: u.context)
    # shared[i]: the tokens units i and i + 1 share, each keeping its last one
    shared = [min(_common_prefix(a.context, b.context), len(a.context) - 1, len(b.context) - 1)
              for a, b in zip(order, order[1:])]

    def worth(members: list[int], P: int) -> int:  # tokens saved by these units behind P cached tokens
        saving = P * (len(members) - 1)
        return saving if P >= min_cached and saving >= min_saving else 0

    def plan(lo: int, hi: int, depth: int = 0) -> tuple[int, list[tuple[list[int], int]]]:
        """(tokens saved, [(members, P) clusters]) at best for units lo..hi, all sharing at least min_cached."""
        if hi == lo:
            return 0, []
        P = min(shared[lo:hi])
        members = list(range(lo, hi + 1))
        whole = worth(members, P)
        if depth > 64:  # runs nested this deep (each level shares more) are one cluster: no recursion limit hit
            return whole, [(members, P)] if whole else []
        split, parts = 0, []
        start = lo
        for k in range(lo, hi + 1):  # sub-runs: cut where neighbours share only P
            if k == hi or shared[k] == P:
                if k > start:
                    saved, sub = plan(start, k, depth + 1)
                    split += saved
                    parts += sub
                start = k + 1
        # the units no sub-run took (a subject's questions around a passage that six of them share) keep P
        taken = {m for sub_members, _ in parts for m in sub_members}
        left = [m for m in members if m not in taken]
        left_saving = worth(left, P)
        if left_saving:
            split += left_saving
            parts.append((left, P))
        if whole >= split and whole:
            return whole, [(members, P)]
        return split, parts

    clusters: list[_Cluster] = []
    chosen: list[tuple[list[int], int]] = []
    start = 0
    for k in range(len(order)):  # top-level runs: neighbours sharing at least min_cached tokens
        if k == len(order) - 1 or shared[k] < min_cached:
            chosen += plan(start, k)[1]
            start = k + 1
    in_cluster = set()
    for members, P in chosen:
        clusters.append(_Cluster(order[members[0]].context[:P], [
            _Unit(order[m].context[P:], order[m].continuations, order[m].outputs) for m in members]))
        in_cluster.update(members)
    rest = [u for k, u in enumerate(order) if k not in in_cluster]
    return clusters, rest


def prompt_clusters(prompts: Sequence[Sequence[int]], min_cached: int = MIN_CACHED_PREFIX,
                    min_saving: int | None = None) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Whole prompts (token ids) as `_clusters` groups contexts: [(shared prefix, indices of its prompts)], and the
    indices left alone. Each prompt keeps at least its last token after the prefix."""
    units = [_Unit(list(p), [], [(i, 0)]) for i, p in enumerate(prompts)]
    clusters, rest = _clusters(units, min_cached, min_saving)
    return ([(c.prefix, [u.outputs[0][0] for u in c.units]) for c in clusters],
            sorted(u.outputs[0][0] for u in rest))


def _batches(rows: list[_Row], batch_tokens: int, max_rows: int, extra: int = 0) -> list[list[list[_Row]]]:
    """Length buckets, then packing: the longest pending row sets a batch's width T and its number of lines
    (within the token budget); the pending rows, longest first, fill the lines first-fit, several short rows in
    one line when they fit (each keeps its own positions and block of the mask). Padding stays small whatever
    the mix of lengths; attention is never wider than the longest row. `extra`: tokens of a cached prefix every
    line also holds (its expanded keys/values and attention columns count against the budget)."""
    pending = sorted(rows, key=lambda r: -r.length())
    batches: list[list[list[_Row]]] = []
    while pending:
        width = pending[0].length()
        n_lines = max(1, min(max_rows, batch_tokens // max(width + extra, 1)))
        lines: list[list] = []  # [rows, used tokens]
        rest: list[_Row] = []
        for row in pending:
            n = row.length()
            for line in lines:
                if line[1] + n <= width:
                    line[0].append(row)
                    line[1] += n
                    break
            else:
                if len(lines) < n_lines:
                    lines.append([[row], n])
                else:
                    rest.append(row)
        batches.append([line[0] for line in lines])
        pending = rest
    return batches


# ------------------------------------------------------------------------------------------------------ scoring


@dataclass
class _Layout:
    """Flat tensors' worth of Python lists for one batch."""

    input_ids: list[list[int]]
    positions: list[list[int]]
    segments: list[list[int]]  # per token: its block (a shared prefix, a unit's context, a choice); -1 padding
    parents: list[list[int]]  # per token: the block its block hangs from (-1: none)
    grands: list[list[int]]  # per token: its parent's parent (-1: none)
    pred_rows: list[int]
    pred_cols: list[int]
    target_pred: list[int]  # per scored token: index into the predicting positions
    targets: list[int]
    target_cont: list[int]  # per scored token: index of its continuation in `outputs`
    outputs: list[tuple[int, int]]


def _layout(batch: list[list[_Row]], pad_id: int, offset: int = 0) -> _Layout:
    """Token ids, positions and the block structure of each line (one or more packed rows). A block's tokens
    attend causally within it and to every token of its ancestors: shared prefix <- unit context <- each of its
    choices. Rows packed in one line share nothing: each starts again at position `offset` (the length of a
    cached prefix in front of every line, else 0); the units' contexts are then the parts after that prefix."""
    T = max(sum(r.length() for r in line) for line in batch)
    lay = _Layout([], [], [], [], [], [], [], [], [], [], [])
    for b, line in enumerate(batch):
        ids: list[int] = []
        pos: list[int] = []
        seg: list[int] = []
        par: list[int] = []
        grand: list[int] = []
        next_seg = 0
        for row in line:
            P = len(row.prefix)
            prefix_seg = -1
            if P:
                prefix_seg = next_seg
                next_seg += 1
                ids += row.prefix
                pos += range(offset, offset + P)
                seg += [prefix_seg] * P
                par += [-1] * P
                grand += [-1] * P
            for unit in row.units:
                ctx_seg = next_seg
                next_seg += 1
                rest = unit.context[P:]
                ids += rest
                pos += range(offset + P, offset + len(unit.context))
                seg += [ctx_seg] * len(rest)
                par += [prefix_seg] * len(rest)
                grand += [-1] * len(rest)
                last = len(ids) - 1  # the context's last token predicts every choice's first token
                last_pred = len(lay.pred_rows)
                lay.pred_rows.append(b)
                lay.pred_cols.append(last)
                for cont, out in zip(unit.continuations, unit.outputs):
                    k = len(lay.outputs)
                    lay.outputs.append(out)
                    lay.target_pred.append(last_pred)
                    lay.targets.append(cont[0])
                    lay.target_cont.append(k)
                    body = cont[:-1]
                    if not body:
                        continue
                    choice_seg = next_seg
                    next_seg += 1
                    start = len(ids)
                    ids += body
                    pos += range(offset + len(unit.context), offset + len(unit.context) + len(body))
                    seg += [choice_seg] * len(body)
                    par += [ctx_seg] * len(body)
                    grand += [prefix_seg] * len(body)
                    for t in range(len(body)):
                        lay.pred_rows.append(b)
                        lay.pred_cols.append(start + t)
                        lay.target_pred.append(len(lay.pred_rows) - 1)
                        lay.targets.append(cont[t + 1])
                        lay.target_cont.append(k)
        n = len(ids)
        lay.input_ids.append(ids + [pad_id] * (T - n))
        lay.positions.append(pos + [offset] * (T - n))
        lay.segments.append(seg + [-1] * (T - n))
        lay.parents.append(par + [-1] * (T - n))
        lay.grands.append(grand + [-1] * (T - n))
    return lay


def _attention_mask(segments, parents, grand, dtype, cached: int = 0):
    """[B, 1, T, cached + T] additive mask: query t sees key s <= t when s is in t's block, its parent's, or its
    grandparent's (choice -> unit context -> shared prefix). Padding sees itself only (no empty softmax rows).
    The first `cached` key columns (a cached prefix in front of every line) are visible to every query."""
    import torch

    T = segments.shape[1]
    seg_q = segments.unsqueeze(2)
    seg_k = segments.unsqueeze(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    related = (seg_k == seg_q) | (seg_k == parents.unsqueeze(2)) | (seg_k == grand.unsqueeze(2))
    allowed = causal & related & (seg_k >= 0)
    allowed |= torch.eye(T, dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    if cached:
        mask = torch.cat([torch.zeros(mask.shape[0], T, cached, dtype=dtype, device=mask.device), mask], dim=2)
    return mask.unsqueeze(1)


def _decoder_and_head(model):
    """The transformer body (hidden states) and the output projection, so logits are computed only at the
    positions that predict a choice token. PEFT models forward these lookups to the wrapped model (the LoRA
    layers sit inside the body, so they apply)."""
    try:
        decoder = model.get_decoder()
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    if decoder is None or head is None or decoder is model:
        return None, None
    return decoder, head


def _cache_layer_class():
    """transformers' plain (full-attention, growing) cache layer, or None where this transformers has none."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None, None
    return DynamicCache, DynamicLayer


def _prefix_cacheable(model) -> bool:
    """Whether every layer of the model keeps a plain full-attention cache (no sliding window, chunked or shared
    layers, whose masks the expanded prefix would not reproduce)."""
    DynamicCache, DynamicLayer = _cache_layer_class()
    config = getattr(model, "config", None)
    if DynamicCache is None or config is None:
        return False
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config transformers cannot read layer types from
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _run_prefix(model, decoder, prefix: list[int], device):
    """The prefix through the model once, with the cache on: its keys/values per layer, [1, heads, P, dim]."""
    import torch

    ids = torch.tensor([prefix], device=device)
    if decoder is not None:
        out = decoder(input_ids=ids, use_cache=True)
    else:
        try:  # the logits of the prefix are not needed: only the last position's, if the model allows
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        except TypeError:
            out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _kept_prefix(prefix_cache: dict | None, model, prefix: list[int], min_cached: int, users: int = 1):
    """The longest usable start of `prefix` among the kept prefixes of this model: (its length, its keys/values
    cut to that length), or (0, None). Usable: at least `min_cached` tokens, and what it leaves out (fed again
    with each of the `users` contexts) costs no more than running the whole prefix once (a subject's description
    line kept from the batch before serves the next batch of that subject; another subject, which shares only
    "... about college", runs its own). A hit moves to the end (most recent)."""
    if not prefix_cache:
        return 0, None
    best, best_key = 0, None
    for key in prefix_cache:
        if key[0] == id(model):
            n = _common_prefix(key[1], prefix)
            if n > best:
                best, best_key = n, key
    if best_key is None or best < min_cached or (len(prefix) - best) * users > len(prefix):
        return 0, None
    kv = prefix_cache.pop(best_key)
    prefix_cache[best_key] = kv
    return best, [(k[:, :, :best], v[:, :, :best]) for k, v in kv]


def score_groups(model, groups: Sequence[Group], *, max_length: int, device=None,
                 batch_tokens: int = BATCH_TOKENS, max_rows: int = MAX_ROWS, min_shared_prefix: int = MIN_SHARED_PREFIX,
                 row_tokens: int = ROW_TOKENS, min_cached_prefix: int = MIN_CACHED_PREFIX,
                 min_cached_saving: int | None = None, pad_id: int = 0,
                 stats: dict | None = None, prefix_cache: dict | None = None, **tuning) -> list[list[tuple[float, bool]]]:
    """For every continuation of every group, `(sum of its tokens' log-probs, is_greedy)`, in input order.

    Tuning (all optional): `batch_tokens` padded tokens per forward pass (a cached prefix counts once per line),
    `max_rows` rows per pass, `min_cached_prefix` tokens of common context prefix that make a cluster of groups
    run that prefix once into a key/value cache (a huge value turns it off) when it saves at least
    `min_cached_saving` prompt tokens, `min_shared_prefix` tokens of common
    prompt prefix that put several groups in one row (a huge value turns sharing off), `row_tokens` longest such
    row; `batch_size` (rows per pass) is read as `max_rows`. `stats` (a dict) receives counts: passes, tokens fed,
    padded tokens, shared_prefix_tokens (prompt tokens not fed again thanks to sharing: shared rows and cached
    prefixes), prefix_passes and cached_prefix_tokens (prefixes run once into a cache), cache_reused_tokens (the
    part of shared_prefix_tokens the cache saved).

    `prefix_cache` (a dict the caller keeps, empty at first) carries the last PREFIX_CACHE_ENTRIES prefixes'
    keys/values from one call to the next: a cluster whose prefix starts with a kept one's tokens reuses
    that part instead of running it again, unless what it leaves out costs more than a new pass (`_kept_prefix`;
    an eval calls this once per batch of questions, all of a subject behind the same examples or description). Only for calls on the same model with the same weights and
    adapter state (entries are keyed by the model object, not by its weights); `stats` counts prefix_cache_hits."""
    import torch

    if "batch_size" in tuning:
        max_rows = int(tuning.pop("batch_size"))
    if tuning:
        raise TypeError(f"score_groups: unknown tuning {sorted(tuning)}")

    results: list[list[Any]] = [[None] * len(conts) for _, conts in groups]
    units = _units(groups, max_length, results)
    if not units:
        return results
    if device is None:
        device = next(model.parameters()).device
    mask_dtype = getattr(model, "dtype", None)
    if not isinstance(mask_dtype, torch.dtype) or not mask_dtype.is_floating_point:
        mask_dtype = torch.float32
    decoder, head = _decoder_and_head(model)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    clusters: list[_Cluster] = []
    if min_cached_prefix < max_length and len(units) > 1 and _prefix_cacheable(model):
        clusters, units = _clusters(units, min_cached_prefix, min_cached_saving)

    def add(key: str, value: int) -> None:
        if stats is not None:
            stats[key] = stats.get(key, 0) + value

    def run(batch: list[list[_Row]], prefix_kv=None, P: int = 0) -> None:
        lay = _layout(batch, pad_id, offset=P)
        ids = torch.tensor(lay.input_ids, device=device)
        positions = torch.tensor(lay.positions, device=device)
        segments = torch.tensor(lay.segments, device=device)
        parents = torch.tensor(lay.parents, device=device)
        grand = torch.tensor(lay.grands, device=device)
        mask = _attention_mask(segments, parents, grand, mask_dtype, cached=P)
        pred_rows = torch.tensor(lay.pred_rows, device=device)
        pred_cols = torch.tensor(lay.pred_cols, device=device)
        kw: dict = {"use_cache": False}
        if prefix_kv is not None:  # the prefix's keys/values, one view per line (copied once, by the update)
            DynamicCache, _ = _cache_layer_class()
            B = ids.shape[0]
            kw = {"use_cache": True, "cache": DynamicCache(ddp_cache_data=[
                (k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix_kv])}
        if decoder is not None:
            hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, **kw)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state
            logits = head(hidden[pred_rows, pred_cols])
        else:  # a model without a separate body/head: full logits, then pick (slower, same numbers)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kw)
            logits = out.logits[pred_rows, pred_cols]
        del kw
        logits = logits.float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logprobs = torch.log_softmax(logits, dim=-1)
        target_pred = torch.tensor(lay.target_pred, device=device)
        targets = torch.tensor(lay.targets, device=device)
        target_cont = torch.tensor(lay.target_cont, device=device)
        token_lp = logprobs[target_pred, targets]
        missed = (logprobs.argmax(dim=-1)[target_pred] != targets).to(torch.int64)
        n = len(lay.outputs)
        sums = torch.zeros(n, dtype=torch.float32, device=device).index_add_(0, target_cont, token_lp)
        misses = torch.zeros(n, dtype=torch.int64, device=device).index_add_(0, target_cont, missed)
        for (g, j), s, m in zip(lay.outputs, sums.tolist(), misses.tolist()):
            results[g][j] = (s, m == 0)
        add("passes", 1)
        add("tokens", sum(r.length() for line in batch for r in line))
        add("padded_tokens", ids.numel())
        add("shared_prefix_tokens", sum(len(r.prefix) * (len(r.units) - 1) for line in batch for r in line))

    # no_grad, not inference_mode: optimum-quanto updates its packed weights in place on first use, which
    # inference tensors forbid.
    with torch.no_grad():
        for cluster in clusters:
            P, prefix_kv = _kept_prefix(prefix_cache, model, cluster.prefix, min_cached_prefix,
                                        len(cluster.units))
            if prefix_kv is not None:  # a kept prefix: its first P tokens; the rest goes back to the units
                cluster = _Cluster(cluster.prefix[:P], [_Unit(cluster.prefix[P:] + u.context, u.continuations,
                                                              u.outputs) for u in cluster.units])
                add("prefix_cache_hits", 1)
                add("cache_reused_tokens", P * len(cluster.units))
                add("shared_prefix_tokens", P * len(cluster.units))
            else:
                P = len(cluster.prefix)
                prefix_kv = _run_prefix(model, decoder, cluster.prefix, device)
                if prefix_cache is not None:
                    prefix_cache[(id(model), tuple(cluster.prefix))] = prefix_kv
                    while len(prefix_cache) > PREFIX_CACHE_ENTRIES:
                        prefix_cache.pop(next(iter(prefix_cache)))
                add("passes", 1)
                add("prefix_passes", 1)
                add("tokens", P)
                add("padded_tokens", P)
                add("cached_prefix_tokens", P)
                add("cache_reused_tokens", P * (len(cluster.units) - 1))
                add("shared_prefix_tokens", P * (len(cluster.units) - 1))
            rows = _rows(cluster.units, min_shared_prefix, row_tokens)
            for batch in _batches(rows, batch_tokens, max_rows, extra=P):
                run(batch, prefix_kv, P)
            del prefix_kv
        for batch in _batches(_rows(units, min_shared_prefix, row_tokens), batch_tokens, max_rows):
            run(batch)
    return results
