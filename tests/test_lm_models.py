"""Every command loads models through the one resolver: a `quantize` folder is read with its quantized weights."""

from __future__ import annotations

import json


def test_reward_eval_scores_with_the_quantized_weights(cli, tiny_model_dir, tmp_path):
    q8 = tmp_path / "q8"
    r = cli("quantize", "--model", tiny_model_dir, "--method", "torch-int8", "-o", q8, "--no-measure")
    assert r.code == 0, r.stderr
    pairs = "".join(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": f"It is {2 * i}.",
                                "rejected": f"It is {2 * i + 1}."}) + "\n" for i in range(3))
    # Policy and reference the same float model: every implicit reward is exactly 0.
    same = cli("reward-eval", "--model", tiny_model_dir, "--ref", tiny_model_dir, input=pairs)
    assert same.code == 0, same.stderr
    assert all(rec["reward_chosen"] == 0 and rec["reward_rejected"] == 0 for rec in same.records)
    # The int8 folder as the policy against its float original: rewards move, so the int8 weights were used.
    quant = cli("reward-eval", "--model", q8, "--ref", tiny_model_dir, input=pairs)
    assert quant.code == 0, quant.stderr
    assert any(rec["reward_chosen"] != 0 for rec in quant.records)
