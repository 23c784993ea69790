"""The packed loglikelihood core (contract C1) against a plain forward pass per (context, continuation), the way
lm-evaluation-harness computes it: every packing path (choices after one prompt, rows packed into one line,
several questions behind one shared prefix, a few-shot prefix run once into a KV cache, left truncation, empty
continuations), is_greedy, LoRA, encode_pair."""

from __future__ import annotations

import pytest
import torch

from probllm.lm import hf_scoring
from probllm.lm.hf_scoring import encode_pair, model_max_length, score_groups


@pytest.fixture(autouse=True)
def cache_small_prefixes(monkeypatch, request):
    """The mechanism tests use prompts a few hundred tokens long: let their prefixes reach the KV cache whatever
    they save. Tests of the default rules themselves are marked `default_cache_rules`."""
    if request.node.get_closest_marker("default_cache_rules") is None:
        monkeypatch.setattr(hf_scoring, "MIN_CACHED_SAVING", 0)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from probllm.models import load_model, load_tokenizer

    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def plain(model, context, continuation, max_length):
    """lm-eval's `_loglikelihood_tokens` for one request: (context + continuation)[-(max_length + 1):][:-1]."""
    whole = (list(context) + list(continuation))[-(max_length + 1):]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    rows = logprobs[len(whole) - 1 - len(continuation):]
    return (sum(float(rows[k, t]) for k, t in enumerate(continuation)),
            all(int(rows[k].argmax()) == t for k, t in enumerate(continuation)))


def groups_for(tok):
    shots = "Question: What is the unit of force?\nAnswer: newton\n\n" * 4
    prompts = [
        ("Question: Which gas do plants absorb?\nAnswer:", [" oxygen", " carbon dioxide", " nitrogen", " oxygen"]),
        ("Q: 2+2?\nA:", [" 4", " five", " 22 (twenty-two, a long answer here)"]),
        (shots + "Question: What is the unit of energy?\nAnswer:", [" joule", " watt"]),
        (shots + "Question: What is the unit of power?\nAnswer:", [" watt", " joule", " volt"]),
        (shots + "Question: Unit of charge?\nAnswer:", [" coulomb", " ampere"]),
        ("Heapsort's worst case is ", ["O(n log n)", "O(n^2)"]),  # trailing space moves to the choices
    ]
    groups = []
    for context, choices in prompts:
        pairs = [encode_pair(tok, context, c) for c in choices]
        assert all(ctx == pairs[0][0] for ctx, _ in pairs)
        groups.append((pairs[0][0], [c for _, c in pairs]))
    groups.append(([5, 6], [[7], [], [8, 9, 10]]))  # an empty continuation scores (0.0, True)
    return groups


@pytest.mark.parametrize("tuning", [
    {},  # defaults: packed lines, shared few-shot prefix
    {"min_shared_prefix": 10 ** 9, "max_rows": 1},  # one question per pass, nothing shared
    {"batch_tokens": 64},  # tiny budget: many passes
    {"min_cached_prefix": 10 ** 9},  # no KV cache: the few-shot prompts share rows
])
def test_scores_and_greedy_match_a_plain_forward_pass(lm, tuning):
    model, tok = lm
    groups = groups_for(tok)
    max_length = model_max_length(model, tok)
    stats: dict = {}
    got = score_groups(model, groups, max_length=max_length, stats=stats, **tuning)
    assert [len(r) for r in got] == [len(c) for _, c in groups]
    for (context, conts), results in zip(groups, got):
        for cont, (score, greedy) in zip(conts, results):
            if not cont:
                assert (score, greedy) == (0.0, True)
                continue
            ref, ref_greedy = plain(model, context, cont, max_length)
            assert score == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy
    # the same text after the same prompt scores the same (lm-eval's argmax then takes the first)
    assert got[0][0][0] == pytest.approx(got[0][3][0], abs=1e-5)
    assert stats["tokens"] < sum(len(c) + len(x) - 1 for c, xs in groups for x in xs if x)  # each prompt once
    if not tuning:  # the three few-shot prompts: their prefix runs once into a cache, then one pass of the rest
        assert stats["prefix_passes"] == 1 and stats["cache_reused_tokens"] > 0 and stats["passes"] == 3
    if tuning.get("min_cached_prefix"):
        assert "prefix_passes" not in stats and stats["shared_prefix_tokens"] > 0 and stats["passes"] == 1


def test_left_truncation_is_lm_evals(lm):
    model, tok = lm
    groups = groups_for(tok)
    got = score_groups(model, groups, max_length=24)
    for (context, conts), results in zip(groups, got):
        for cont, (score, greedy) in zip(conts, results):
            if cont:
                ref, ref_greedy = plain(model, context, cont, 24)
                assert score == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy


def test_greedy_continuation_is_flagged(lm):
    model, tok = lm
    context = tok.encode("Question: Which gas do plants absorb?\nAnswer:")
    greedy = []
    with torch.no_grad():
        ids = list(context)
        for _ in range(3):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            greedy.append(nxt)
            ids.append(nxt)
    other = [(greedy[0] + 1) % tok.vocab_size] + greedy[1:]
    (res,) = score_groups(model, [(context, [greedy, other])], max_length=512)
    assert res[0][1] is True and res[1][1] is False


def test_lora_adapter_layers_apply(lm):
    from peft import LoraConfig, get_peft_model

    model, tok = lm
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    try:
        groups = groups_for(tok)[:2]
        got = score_groups(peft_model, groups, max_length=512)
        with peft_model.disable_adapter():
            base_scores = [s for r in score_groups(peft_model, groups, max_length=512) for s, _ in r]
        for (context, conts), results in zip(groups, got):
            for cont, (score, _) in zip(conts, results):
                assert score == pytest.approx(plain(peft_model, context, cont, 512)[0], abs=1e-4)
        assert [s for r in got for s, _ in r] != pytest.approx(base_scores, abs=1e-3)  # the adapter mattered
    finally:
        peft_model.unload()


def test_encode_pair_is_lm_evals(lm):
    _, tok = lm
    ctx, cont = encode_pair(tok, "Answer: ", "B")
    assert ctx == tok.encode("Answer:") and ctx + cont == tok.encode("Answer: B")
    ctx, cont = encode_pair(tok, "", "hello")
    assert ctx == [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    assert cont == tok.encode("hello")


# ---- the few-shot prefix computed once (KV cache), against each prompt scored whole


def mmlu_like(subject: str, questions: list[str], shots: int = 5) -> list[str]:
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    dev = "".join(f"What is {k} + {k}?\nA. {k}\nB. {2 * k}\nC. 0\nD. 1\nAnswer: B\n\n" for k in range(shots))
    return [head + dev + f"{q}\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:" for q in questions]


def encoded(tok, prompts, choices):
    groups = []
    for context in prompts:
        pairs = [encode_pair(tok, context, c) for c in choices]
        groups.append((pairs[0][0], [c for _, c in pairs]))
    return groups


def assert_whole_prompt_scores(model, groups, got, max_length=1024):
    for (context, conts), results in zip(groups, got):
        for cont, (score, greedy) in zip(conts, results):
            ref, ref_greedy = plain(model, context, cont, max_length)
            assert score == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy


@pytest.mark.parametrize("tuning", [{}, {"batch_tokens": 200}, {"max_rows": 1}, {"batch_size": 2}])
def test_cached_prefix_equals_whole_prompts(lm, tuning):
    model, tok = lm
    groups = encoded(tok, mmlu_like("physics", ["What is 2 + 2?", "Which is 4?", "Pick four.", "2 * 2 = ?"]),
                     [" A", " B", " C", " D", " B then more"])
    stats: dict = {}
    got = score_groups(model, groups, max_length=1024, stats=stats, **tuning)
    assert_whole_prompt_scores(model, groups, got)
    assert stats["prefix_passes"] == 1  # the cache was used: the prefix fed once ...
    prefix = stats["cached_prefix_tokens"]
    assert prefix >= 64 and stats["cache_reused_tokens"] == 3 * prefix
    whole = sum(len(c) + sum(len(x) - 1 for x in xs) for c, xs in groups)
    assert stats["tokens"] == whole - 3 * prefix  # ... and never again
    if tuning.get("batch_tokens") == 200:  # the cached prefix counts against each pass's budget
        assert stats["passes"] > 2


@pytest.mark.default_cache_rules
def test_default_saving_rule_keeps_small_clusters_exact(lm):
    """At the default MIN_CACHED_SAVING, two questions that share a passage are scored exactly as without any
    cache (bit for bit: those numbers stay those of the prompt scored whole), while a few-shot block before enough
    of a subject's questions runs once into the cache."""
    model, tok = lm
    passage = "Read the passage. " + "The mitochondria is the powerhouse of the cell, it makes energy. " * 3
    small = encoded(tok, [passage + f"Question {q}?\nAnswer:" for q in ("one", "two")], [" A", " B"])
    saved = len(small[0][0]) - 8
    assert 64 <= saved < hf_scoring.MIN_CACHED_SAVING  # shares 64+ tokens, saves too few
    stats: dict = {}
    got = score_groups(model, small, max_length=1024, stats=stats)
    assert "prefix_passes" not in stats
    assert got == score_groups(model, small, max_length=1024, min_cached_prefix=10 ** 9)
    many = encoded(tok, mmlu_like("astronomy", [f"Which planet is number {k}?" for k in range(12)]),
                   [" A", " B", " C", " D"])
    assert (len(many[0][0]) - 20) * 11 >= hf_scoring.MIN_CACHED_SAVING
    stats = {}
    got = score_groups(model, many, max_length=1024, stats=stats)
    assert stats["prefix_passes"] == 1
    assert_whole_prompt_scores(model, many, got)


def test_two_subjects_and_unrelated_prompts_in_one_batch(lm):
    model, tok = lm
    prompts = (mmlu_like("astronomy", ["What is 2 + 2?", "Which is 4?", "Pick four."])
               + mmlu_like("college biology", ["Cells?", "What is 2 + 2?"])
               + ["Question: Which gas do plants absorb?\nAnswer:", "Q: 2+2?\nA:"]
               + mmlu_like("chemistry", ["Alone in its subject?"]))
    order = [0, 5, 3, 6, 1, 7, 4, 2]  # subjects interleaved in the input
    groups = encoded(tok, [prompts[i] for i in order], [" A", " B", " C", " D"])
    stats: dict = {}
    got = score_groups(model, groups, max_length=1024, stats=stats)
    assert_whole_prompt_scores(model, groups, got)
    # one prefix per subject with two or more questions; the rest (one chemistry, two unrelated) packed as before
    assert stats["prefix_passes"] == 2
    assert stats["cache_reused_tokens"] > 0
    # the prefixes are the subjects' own (all but each subject's questions), not the start of the description
    # line that all subjects share
    def common(ctxs):
        return min(next((k for k in range(len(a)) if k >= len(b) or a[k] != b[k]), len(a)) for a in ctxs for b in ctxs
                   if a is not b)
    own = [common([g[0] for g in encoded(tok, prompts[a:b], [" A"])]) for a, b in ((0, 3), (3, 5))]
    assert stats["cached_prefix_tokens"] == sum(own) and min(own) > 2 * common([groups[0][0], groups[1][0]])


@pytest.mark.parametrize("words", [("energy", "energetic"),  # the token prefix ends inside the word " ener|gy"
                                   ("gradient", "gradual")])  # the texts' common "grad" is inside one token
def test_prefix_boundary_inside_a_word(lm, words):
    model, tok = lm
    # The contexts part inside one word. The prefix is the common prefix of the full contexts' token ids (each
    # context tokenized whole, as lm-eval does), so it ends where the tokenizations diverge: inside a word, or
    # before a token that holds the texts' common characters in one context only.
    shots = "Question: What is the unit of force?\nAnswer: newton\n\n" * 5
    texts = [shots + f"Question: What is the unit of {w}?\nAnswer:" for w in words]
    groups = encoded(tok, texts, [" watt", " joule"])
    a, b = (g[0] for g in groups)
    split = next(k for k in range(len(a)) if a[k] != b[k])
    before, after = tok.decode(a[:split]), tok.decode(a[split:])
    text_common = next(k for k in range(len(texts[0])) if texts[0][k] != texts[1][k])
    if words[0] == "energy":
        assert before[-1].isalpha() and after[0].isalpha(), (before[-12:], after[:12])  # splits a word
    else:
        assert len(before) < text_common and " " not in texts[0][len(before) + 1: text_common]  # inside a token
    stats: dict = {}
    got = score_groups(model, groups, max_length=1024, stats=stats)
    assert_whole_prompt_scores(model, groups, got)
    assert stats["prefix_passes"] == 1 and stats["cached_prefix_tokens"] == split


def test_cached_prefix_without_a_separate_head(lm, monkeypatch):
    import probllm.lm.hf_scoring as hs

    model, tok = lm
    monkeypatch.setattr(hs, "_decoder_and_head", lambda m: (None, None))  # the full-model path
    groups = encoded(tok, mmlu_like("physics", ["What is 2 + 2?", "Which is 4?"]), [" A", " B two"])
    stats: dict = {}
    got = score_groups(model, groups, max_length=1024, stats=stats)
    assert_whole_prompt_scores(model, groups, got)
    assert stats["prefix_passes"] == 1


def test_cached_prefix_with_lora(lm):
    from peft import LoraConfig, get_peft_model

    model, tok = lm
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    try:
        groups = encoded(tok, mmlu_like("physics", ["What is 2 + 2?", "Which is 4?"]), [" A", " B"])
        stats: dict = {}
        got = score_groups(peft_model, groups, max_length=1024, stats=stats)
        assert_whole_prompt_scores(peft_model, groups, got)
        assert stats["prefix_passes"] == 1
    finally:
        peft_model.unload()


@pytest.mark.default_cache_rules
def test_zero_shot_description_lines_are_cached_per_subject(lm):
    """Zero-shot MMLU: a subject's prompts share only their description line (~15 tokens). At the default rules a
    batch of 16 of them runs the line once; a batch that mixes two subjects whose lines share "... about college"
    gets one prefix per subject (the nesting that saves most), and the next call's other subject runs its own line
    instead of reusing the kept "... about college" part. Scores equal each prompt scored whole."""
    model, tok = lm
    starts = ["Which", "How", "What", "Why", "Where", "When", "Name", "Pick", "Find", "Give", "Is", "Are", "Does",
              "Can", "Should", "Select"]
    questions = [f"{w} planet {k}?" for k, w in enumerate(starts)]  # nothing shared after the line
    line = len(tok.encode("The following are multiple choice questions (with answers) about college physics."))
    one = encoded(tok, mmlu_like("college physics", questions, shots=0), [" A", " B", " C", " D"])
    stats: dict = {}
    kept: dict = {}
    got = score_groups(model, one, max_length=1024, stats=stats, prefix_cache=kept)
    assert stats["prefix_passes"] == 1 and line <= stats["cached_prefix_tokens"] <= line + 3
    assert_whole_prompt_scores(model, one, got)
    mixed = encoded(tok, mmlu_like("college physics", questions[:8], shots=0)
                    + mmlu_like("college chemistry", questions[8:], shots=0), [" A", " B", " C", " D"])
    stats = {}
    got = score_groups(model, mixed, max_length=1024, stats=stats)
    assert stats["prefix_passes"] == 2 and stats["cached_prefix_tokens"] >= 2 * line
    assert_whole_prompt_scores(model, mixed, got)
    other = encoded(tok, mmlu_like("college chemistry", questions, shots=0), [" A", " B", " C", " D"])
    stats = {}
    score_groups(model, other, max_length=1024, stats=stats, prefix_cache=kept)
    assert stats["prefix_passes"] == 1 and "prefix_cache_hits" not in stats  # its own line, not physics' start
    stats = {}
    score_groups(model, one[8:], max_length=1024, stats=stats, prefix_cache=kept)
    assert stats.get("prefix_cache_hits") == 1 and "prefix_passes" not in stats  # physics' kept line serves


def test_prefix_cache_carries_a_prefix_to_the_next_call(lm):
    model, tok = lm
    # two batches of one subject: the first's questions also share "Which", so its prefix is a bit longer than the
    # second's; the second call reuses the kept keys/values, cut to what the two share
    first = encoded(tok, mmlu_like("physics", ["Which is 4?", "Which is four?"]), [" A", " B two"])
    second = encoded(tok, mmlu_like("physics", ["What is 2 + 2?", "Pick four.", "2 * 2 = ?"]), [" A", " B two"])
    kept: dict = {}
    stats: dict = {}
    got_first = score_groups(model, first, max_length=1024, stats=stats, prefix_cache=kept)
    assert stats["prefix_passes"] == 1 and len(kept) == 1 and "prefix_cache_hits" not in stats
    got = score_groups(model, second, max_length=1024, stats=stats, prefix_cache=kept)
    assert stats["prefix_passes"] == 1 and stats["prefix_cache_hits"] == 1  # not run again
    assert_whole_prompt_scores(model, first, got_first)
    assert_whole_prompt_scores(model, second, got)
    other = score_groups(model, second, max_length=1024, stats=stats, prefix_cache={})
    assert stats["prefix_passes"] == 2
    assert [s for r in other for s, _ in r] == pytest.approx([s for r in got for s, _ in r], abs=1e-5)


def test_served_prompt_logprobs_share_a_long_prefix_and_equal_each_prompt_alone(tiny_model_dir):
    """`serve`'s /v1/completions echo log-probs (HFLM.prompt_logprobs): prompts of one request behind a long
    common prefix (a question's choices after few-shot examples, as lm-eval's local-completions sends them) run
    the prefix once into a KV cache; every token's log-prob and top token equal each prompt's own pass."""
    from probllm.lm.hf_backend import HFLM

    lm = HFLM(tiny_model_dir).load()
    shots = "".join(f"Question: what is {i} plus {i}?\nAnswer: {2 * i}\n\n" for i in range(12))
    prompts = [lm.encode_prompt(shots + "Question: what is 7 plus 7?\nAnswer:" + c) for c in (" 14", " 15", " 41")]
    prompts.append(lm.encode_prompt("Unrelated text that shares nothing."))
    assert len(prompts[0]) > 100
    together = lm.prompt_logprobs(prompts, top=2)
    assert lm.scoring_stats["prompt_prefix_passes"] == 1 and lm.scoring_stats["prompt_prefix_reused_tokens"] > 0
    for toks, got in zip(prompts, together):
        [alone] = lm.prompt_logprobs([toks], top=2)
        assert got["token_logprobs"][0] is None and len(got["token_logprobs"]) == len(toks)
        assert got["token_logprobs"][1:] == pytest.approx(alone["token_logprobs"][1:], abs=1e-4)
        assert [t[0][0] for t in got["top"][1:]] == [t[0][0] for t in alone["top"][1:]]
        assert got["next_top"][0][0] == alone["next_top"][0][0]
