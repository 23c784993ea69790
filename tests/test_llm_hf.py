"""The hf backend for real: a tiny transformers model, batched generation, greedy determinism, cache."""

from __future__ import annotations

import json

from probllm.io import Stats, read_records
from probllm.judge import JudgeOptions, JudgeSummary, judge_records
from probllm.lm import BackendConfig, make_backend, run_ordered

PARAMS = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": 0}


def chats(backend, prompts, params=PARAMS):
    async def one(p):
        return await backend.chat([{"role": "user", "content": p}], params)

    return list(run_ordered(prompts, one, window=32, backend=backend))


def test_batched_greedy_generation_is_deterministic_and_cached(tiny_model_dir, tmp_path):
    prompts = [f"The derivative of x squared is {i}" for i in range(6)]
    config = BackendConfig(backend="hf", model=tiny_model_dir, batch_size=4, cache=tmp_path / "c.sqlite")
    backend = make_backend(config)
    first = chats(backend, prompts)
    assert len(first) == 6 and all(isinstance(t, str) for t in first)
    assert backend.batches == 2 and backend.requests == 6          # 6 prompts in batches of 4 + 2
    # Batched (padded) and one-by-one greedy generation agree.
    solo = make_backend(BackendConfig(backend="hf", model=tiny_model_dir, batch_size=1, no_cache=True))
    assert chats(solo, prompts) == first
    again = make_backend(config)
    assert chats(again, prompts) == first and again.requests == 0 and again.cache_hits == 6


def test_sampling_is_seeded(tiny_model_dir):
    sampled = {**PARAMS, "temperature": 1.0, "max_tokens": 12, "seed": 5}
    b1 = make_backend(BackendConfig(backend="hf", model=tiny_model_dir, no_cache=True))
    b2 = make_backend(BackendConfig(backend="hf", model=tiny_model_dir, no_cache=True))
    first = chats(b1, ["Heapsort runs in"], sampled)
    assert first == chats(b2, ["Heapsort runs in"], sampled)
    # ... and it is sampling: greedy decoding and other seeds give other texts (a backend that ignored the
    # temperature, or the seed, would pass the line above).
    assert first != chats(b1, ["Heapsort runs in"], {**sampled, "temperature": 0.0})
    others = {tuple(chats(b1, ["Heapsort runs in"], {**sampled, "seed": s})) for s in (6, 7, 8)}
    assert len(others | {tuple(first)}) >= 3


def test_judge_through_hf_reports_unparseable(tiny_model_dir, tmp_path):
    # A random tiny model never writes [[A]]: every record must come out with its raw text and an error.
    path = tmp_path / "both.jsonl"
    path.write_text(json.dumps({"id": 1, "question": "Q?", "answer_a": "a", "answer_b": "b"}) + "\n")
    stats, summary = Stats(), JudgeSummary()
    config = BackendConfig(backend="hf", model=tiny_model_dir, max_tokens=6, no_cache=True)
    [v] = judge_records(read_records([str(path)], stats), config, JudgeOptions(tries=2), stats, summary)
    assert v["verdict"] is None and len(v["judgments"]) == 2 and all("raw" in j for j in v["judgments"])
    assert summary.unparsed == 1 and stats.notes["requests"] == 4


def test_judge_by_likelihood_always_gives_a_verdict(tiny_model_dir, tmp_path):
    path = tmp_path / "both.jsonl"
    path.write_text("".join(json.dumps({"id": i, "question": f"Q{i}?", "answer_a": "short", "answer_b": "long " * i})
                            + "\n" for i in range(1, 4)))
    stats, summary = Stats(), JudgeSummary()
    config = BackendConfig(backend="hf", model=tiny_model_dir, cache=tmp_path / "c.sqlite")
    out = list(judge_records(read_records([str(path)], stats), config, JudgeOptions(verdict_from="likelihood"),
                             stats, summary))
    assert all(v["verdict"] in ("a", "b", "tie", "inconsistent") for v in out)
    assert all("log-likelihoods" in j["raw"] for v in out for j in v["judgments"])
    assert summary.wins + summary.ties + summary.losses == 3 and summary.unparsed == 0
    single = list(judge_records(read_records([str(path)], stats), config,
                                JudgeOptions(mode="single", verdict_from="likelihood"), stats, JudgeSummary()))
    assert all(1 <= v["score_a"] <= 10 and 1 <= v["score_b"] <= 10 for v in single)


def test_adapter_is_loaded_and_part_of_the_cache_key(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from probllm.models import load_model

    peft_model = get_peft_model(load_model(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-zero B matrix so that the adapter changes the outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = BackendConfig(backend="hf", model=tiny_model_dir, adapter=str(tmp_path / "adapter"), no_cache=True)
    backend = make_backend(config)
    assert "adapter" in backend.model
    with_adapter = chats(backend, ["Entropy measures"], {**PARAMS, "max_tokens": 12})
    without = chats(make_backend(BackendConfig(backend="hf", model=tiny_model_dir, no_cache=True)),
                    ["Entropy measures"], {**PARAMS, "max_tokens": 12})
    assert with_adapter != without
