"""Implicit DPO rewards of preference pairs: how the report measures "test reward accuracy".

r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), summed over the completion tokens. With a LoRA adapter, pi is the
base model with the adapter and pi_ref the same model with the adapter disabled (exactly the trainer's reference);
with `--ref`, pi_ref is another model. Pairs are tokenised as TRL's DPOTrainer tokenises them (chat template,
EOS on string completions, keep-start truncation at max_length), so the accuracy equals the trainer's own
eval reward accuracy on the same pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from probllm.io import RecordError, Skip, Stats, UsageError
from probllm.train.pairs import normalize_pair, to_trl


def run_settings(adapter: str | None) -> dict:
    """The resolved settings of the `dpo` run that wrote an adapter folder (beta, max_length, model), if any."""
    if not adapter:
        return {}
    path = Path(adapter) / "config.json"
    if path.exists():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}
    return {}


def _base_model_of(adapter: str) -> str | None:
    path = Path(adapter) / "adapter_config.json"
    if not path.exists():
        raise UsageError(f"--adapter {adapter}: not a LoRA adapter folder (no adapter_config.json)")
    return json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")


class RewardScorer:
    """Loads policy and reference once; scores batches of TRL-ready pairs."""

    def __init__(self, adapter: str | None = None, model: str | None = None, ref: str | None = None,
                 beta: float | None = None, max_length: int | None = None, dtype: str = "auto",
                 device: str = "auto"):
        from probllm.models import device_name, load_model, load_tokenizer, set_threads

        if not adapter and not ref:
            raise UsageError("give --adapter (reference = adapter disabled) or --ref (a reference model)")
        set_threads()
        cfg = run_settings(adapter)
        self.beta = beta if beta is not None else cfg.get("beta", 0.05)
        self.max_length = max_length if max_length is not None else cfg.get("max_length", 1024)
        if model is None and adapter:
            model = cfg.get("model_path") or _base_model_of(adapter)
        self.device = device_name(device)
        if dtype == "auto":
            dtype = "bfloat16" if cfg.get("bf16") else "float32"
        self.dtype = dtype
        tok_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else model
        self.tokenizer = load_tokenizer(tok_source, padding_side="right")
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if adapter:
            _base_model_of(adapter)  # a clear error for a folder that is not an adapter
        # The one resolver: a `quantize` folder loads with its quantized weights, not silently as float.
        self.model = load_model(model, adapter=adapter, dtype=dtype, device=self.device)
        self.ref_model = None
        if ref:
            self.ref_model = load_model(ref, dtype=dtype, device=self.device)
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        self.collator = DataCollatorForPreference(pad_token_id=self.tokenizer.pad_token_id,
                                                  max_length=self.max_length, truncation_mode="keep_start")

    def tokenize(self, pair: dict) -> dict:
        """TRL-ready pair -> prompt/chosen/rejected ids, as DPOTrainer._prepare_dataset builds them."""
        from trl.data_utils import _tokenize, common_prefix_length, is_conversational

        tok = self.tokenizer
        if is_conversational(pair):
            prompt_ids = _tokenize(tok, pair["prompt"], add_generation_prompt=True)["input_ids"]
            chosen_ids = _tokenize(tok, pair["prompt"] + pair["chosen"])["input_ids"]
            rejected_ids = _tokenize(tok, pair["prompt"] + pair["rejected"])["input_ids"]
        else:
            eos = tok.eos_token
            chosen = pair["chosen"] if pair["chosen"].endswith(eos) else pair["chosen"] + eos
            rejected = pair["rejected"] if pair["rejected"].endswith(eos) else pair["rejected"] + eos
            prompt_ids = _tokenize(tok, pair["prompt"])["input_ids"]
            chosen_ids = _tokenize(tok, pair["prompt"] + chosen)["input_ids"]
            rejected_ids = _tokenize(tok, pair["prompt"] + rejected)["input_ids"]
        n = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
        if n >= self.max_length:
            # The trainer drops these too: truncation would leave no completion token to score.
            raise Skip("prompt fills max_length")
        return {"prompt_ids": prompt_ids[:n], "chosen_ids": chosen_ids[n:], "rejected_ids": rejected_ids[n:]}

    def _logps(self, model, batch) -> "torch.Tensor":
        import torch

        input_ids = batch["input_ids"].to(self.device)
        attention = batch["attention_mask"].to(self.device)
        mask = batch["completion_mask"][:, 1:].to(self.device)
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1]
        targets = input_ids[:, 1:]
        out = []
        for i in range(logits.size(0)):  # one row at a time: a 100k vocabulary in float32 is large
            lp = torch.log_softmax(logits[i].float(), dim=-1).gather(-1, targets[i].unsqueeze(-1)).squeeze(-1)
            out.append((lp * mask[i]).sum())
        return torch.stack(out)

    def score(self, tokenized: list[dict]) -> list[tuple[float, float]]:
        import torch

        batch = self.collator(tokenized)
        with torch.no_grad():
            logps = self._logps(self.model, batch)
            if self.ref_model is not None:
                ref_logps = self._logps(self.ref_model, batch)
            else:
                with self.model.disable_adapter():
                    ref_logps = self._logps(self.model, batch)
        n = len(tokenized)
        rewards = self.beta * (logps - ref_logps)
        return [(rewards[i].item(), rewards[n + i].item()) for i in range(n)]


def reward_eval(records: Iterable[dict], scorer: RewardScorer, stats: Stats, batch_size: int = 4,
                skip_invalid: bool = False) -> Iterator[dict]:
    """Yield each input record with reward_chosen, reward_rejected, margin and correct; tallies in stats.notes."""
    correct = 0
    margins = 0.0
    n = 0
    buffer: list[tuple[dict, dict]] = []

    def flush():
        nonlocal correct, margins, n
        scores = scorer.score([t for _, t in buffer])
        for (rec, _), (rc, rr) in zip(buffer, scores):
            margin = rc - rr
            ok = rc > rr
            n += 1
            correct += ok
            margins += margin
            yield {**rec, "reward_chosen": rc, "reward_rejected": rr, "margin": margin, "correct": ok}
        buffer.clear()
        stats.notes["pairs"] = n
        stats.notes["reward_accuracy"] = round(correct / n, 6)
        stats.notes["mean_margin"] = round(margins / n, 6)

    for rec in records:
        try:
            tokenized = scorer.tokenize(to_trl(normalize_pair(rec), scorer.has_template))
        except Skip as s:
            stats.skip(s.reason)
            continue
        except RecordError as e:
            stats.reject(e, rec, skip_invalid)
            continue
        buffer.append((dict(rec), tokenized))
        if len(buffer) >= batch_size:
            yield from flush()
    if buffer:
        yield from flush()
    if n == 0:
        raise RecordError("no pairs could be scored", source="input")
