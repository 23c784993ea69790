"""Pair normalisation for `dpo` and `reward-eval`: every accepted input form, and located errors for bad ones."""

from __future__ import annotations

import pytest

from probllm.io import RecordError, Skip
from probllm.train.dpo import load_config_file, resolve_settings
from probllm.train.pairs import normalize_pair, pair_form, to_trl
from probllm.io import UsageError


def test_string_form_becomes_chat_messages_when_model_has_template():
    pair = normalize_pair({"prompt": "2+2?", "chosen": "4", "rejected": "5", "source": "x"})
    assert pair["form"] == "string"
    assert to_trl(pair, True) == {"prompt": [{"role": "user", "content": "2+2?"}],
                                  "chosen": [{"role": "assistant", "content": "4"}],
                                  "rejected": [{"role": "assistant", "content": "5"}]}
    assert to_trl(pair, False) == {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


def test_conversational_form_kept_and_flattened_without_template():
    rec = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
           "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    pair = normalize_pair(rec)
    assert pair["form"] == "conversational"
    assert to_trl(pair, True)["prompt"] == rec["prompt"]
    flat = to_trl(pair, False)
    assert flat == {"prompt": "System: Be brief.\n\nUser: 2+2?\n\nAssistant: ", "chosen": "4", "rejected": "5"}


def test_implicit_prompt_string_and_conversational():
    pair = normalize_pair({"chosen": "Human: 2+2?\n\nAssistant: The answer is 4",
                           "rejected": "Human: 2+2?\n\nAssistant: The answer is 5"})
    assert pair["form"] == "implicit-string"
    # The shared first words of the answers stay in the answers only up to a whitespace boundary.
    assert pair["prompt"] == "Human: 2+2?\n\nAssistant: The answer is "
    assert (pair["chosen"], pair["rejected"]) == ("4", "5")
    user = {"role": "user", "content": "2+2?"}
    pair = normalize_pair({"chosen": [user, {"role": "assistant", "content": "4"}],
                           "rejected": [user, {"role": "assistant", "content": "5"}]})
    assert pair["form"] == "implicit-conversational"
    assert pair["prompt"] == [user] and pair["chosen"] == [{"role": "assistant", "content": "4"}]


def test_llama_factory_sharegpt_form():
    rec = {"conversations": [{"from": "human", "value": "2+2?"}], "system": "Be brief.",
           "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}
    pair = normalize_pair(rec)
    assert pair_form(rec) == "sharegpt"
    assert pair["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "4"}]


def test_shared_example_files_parse(shared_examples):
    import json

    from probllm.io import read_records

    for name in ("preference/llm_dojo_rlhf.jsonl", "preference/dpo_en_demo.json"):
        recs = list(read_records([str(shared_examples / name)]))
        forms = {normalize_pair(r)["form"] for r in recs if r.get("chosen") != r.get("rejected")}
        assert forms <= {"conversational", "sharegpt", "implicit-conversational"}, (name, forms)
        assert json.dumps(to_trl(normalize_pair(recs[0]), True))


@pytest.mark.parametrize("rec, field", [
    ({"prompt": "q", "rejected": "b"}, "chosen"),
    ({"prompt": "q", "chosen": "a"}, "rejected"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen"),
    ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, "rejected"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen"),
    ({"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "prompt[0].content"),
    ({"prompt": [{"role": "bot", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "prompt[0].role"),
    ({"conversations": [{"from": "alien", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, "conversations[0]"),
    ({"chosen": "abc", "rejected": "xyz"}, "chosen"),
])
def test_bad_pairs_name_the_field(rec, field):
    with pytest.raises(RecordError) as e:
        normalize_pair(rec)
    assert e.value.field == field


def test_messages_are_checked_as_serve_checks_them():
    """One message shape (probllm.messages): OpenAI's text content parts are joined, `developer` is `system`."""
    parts = [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]
    pair = normalize_pair({"prompt": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}],
                           "chosen": [{"role": "assistant", "content": "4"}],
                           "rejected": [{"role": "assistant", "content": "5"}]})
    assert pair["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def test_identical_answers_are_skipped_with_a_reason():
    with pytest.raises(Skip):
        normalize_pair({"prompt": "q", "chosen": "a", "rejected": "a"})


def test_settings_defaults_yaml_and_cli_precedence(tmp_path):
    s = resolve_settings()
    assert (s.seed, s.bf16, s.optim, s.max_steps, s.lr, s.lr_scheduler, s.warmup_steps, s.weight_decay,
            s.max_grad_norm, s.adam_beta1, s.adam_beta2, s.adam_epsilon, s.beta, s.lora_r, s.lora_alpha,
            s.lora_dropout, s.batch_size, s.eval_steps) == (
        0, True, "paged_adamw_32bit", 2000, 5e-4, "cosine", 100, 0.05, 1.0, 0.9, 0.999, 1e-8, 0.05, 8, 16, 0.05, 8,
        100)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.001\nlora-r: 4\nbeta: 0.2\n")
    s = resolve_settings(str(cfg), beta=0.3)
    assert (s.lr, s.lora_r, s.beta) == (0.001, 4, 0.3)
    assert resolve_settings(epochs=2.0).max_steps == -1
    cfg.write_text("learning_rate: 1\n")
    with pytest.raises(UsageError, match="unknown setting 'learning_rate'"):
        load_config_file(cfg)
    cfg.write_text("- lr\n")  # the same reader as every other command's --config (probllm.io.read_config)
    with pytest.raises(UsageError, match="expected a mapping of option names"):
        load_config_file(cfg)
