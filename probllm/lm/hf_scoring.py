"""The hf loglikelihood core (contract C1): `score_groups` and lm-eval's `encode_pair`.

Thin, plain version (one padded forward pass over context + continuation per continuation, full log-softmax at
the continuation positions), kept until the eval helper's fast implementation replaces this file; callers only
rely on the signatures and the semantics below.
"""

from __future__ import annotations


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation; the pair is
    encoded whole and the continuation is what follows the context's own encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def score_groups(model, groups, *, max_length: int, device=None, pad_id: int = 0, batch_size: int = 16,
                 **tuning) -> list[list[tuple[float, bool]]]:
    """For every continuation of every `(context_ids, [continuation_ids, ...])` group: (sum of the continuation's
    log-probs given everything before it, is_greedy), in input order. Like lm-eval, the last `max_length` tokens
    of context + continuation are kept (the continuation's last token is never an input)."""
    import torch

    dev = device or next(model.parameters()).device
    rows = []
    for g, (ctx, conts) in enumerate(groups):
        for j, cont in enumerate(conts):
            seq = (list(ctx) + list(cont))[-(max_length + 1):]
            rows.append((g, j, seq, len(cont)))
    out: list[list[tuple[float, bool]]] = [[(0.0, True)] * len(conts) for _, conts in groups]
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][2]))
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            chunk = [rows[r] for r in order[b: b + batch_size]]
            width = max(len(s) for _, _, s, _ in chunk) - 1
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (_, _, s, _) in enumerate(chunk):
                ids[i, : len(s) - 1] = torch.tensor(s[:-1])
                mask[i, : len(s) - 1] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            for i, (g, j, s, n) in enumerate(chunk):
                if n == 0:
                    continue
                positions = torch.arange(len(s) - 1 - n, len(s) - 1)
                targets = torch.tensor(s[-n:])
                lp = logprobs[i, positions]
                total = float(lp.gather(-1, targets.unsqueeze(-1)).sum())
                greedy = bool((lp.argmax(-1) == targets).all())
                out[g][j] = (total, greedy)
    return out
