"""eval's scoring: loglik/acc/acc_norm against an independent plain forward pass, batching and prefix reuse,
letter and generate methods, templates as lm-eval writes them, summary arithmetic."""

from __future__ import annotations

import math

import pytest

from probllm.evaluate.extraction import extract_answer, extract_boxed, extract_number
from probllm.evaluate.mcqa import EvalOptions, evaluate_records, parse_item, select_shots
from probllm.evaluate.scorer import local_scorer
from probllm.evaluate.summary import Summary, mean_stderr
from probllm.records import extract_letter
from probllm.evaluate.templates import Item, build_prompt
from probllm.io import Record, RecordError, Stats

HANDMADE = [
    {"id": "a1", "question": "What is 2 + 2?", "choices": ["3", "4", "5", "6"], "answer": "B",
     "source": "arc-easy", "subject": "arithmetic"},
    {"id": "a2", "question": "Which gas do plants absorb during photosynthesis?",
     "choices": ["Oxygen", "Carbon dioxide", "Nitrogen"], "answer": "B", "source": "arc-easy", "subject": "biology"},
    {"id": "a3", "question": "Heapsort's worst-case running time is", "choices": ["O(n)", "O(n log n)", "O(n^2)",
     "O(1)", "O(log n)"], "answer": "B", "source": "arc-challenge", "subject": "cs"},
    {"id": "m1", "question": "  Water boils at sea level at  ", "choices": ["50 C", "100 C", "0 C", "200 C"],
     "answer": "B", "source": "mmlu", "subject": "conceptual_physics"},
    {"id": "m2", "question": "Newton's second law says force equals", "choices": ["mass times acceleration",
     "mass over time", "energy", "momentum squared"], "answer": "A", "source": "mmlu", "subject": "college_physics"},
    {"id": "g1", "question": "Tom has 3 apples and buys 5 more. How many apples does he have?",
     "choices": ["7", "8", "9", "10"], "answer": "B", "source": "gsm8k", "subject": "gsm8k"},
    {"id": "x1", "question": "Entropy measures", "choices": ["uncertainty", "mass", "the derivative of x squared is "
     "two x and more words to make this choice long", "heat"], "answer": "A", "source": "arc-easy",
     "subject": "physics"},
]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from probllm.models import load_model, load_tokenizer

    return load_model(tiny_model_dir, dtype="float32", device="cpu"), load_tokenizer(tiny_model_dir)


def run(lm, records, **opts):
    model, tok = lm
    summary = Summary()
    with local_scorer(model, tok) as scorer:
        preds = list(evaluate_records((Record(r) for r in records), scorer, EvalOptions(**opts), Stats(), summary))
    return preds, summary.as_dict()


def plain_loglik(model, tok, context: str, continuation: str) -> float:
    """Independent reference: lm-eval's pair encoding, one unpadded forward pass over context + continuation."""
    import torch

    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))


def test_loglik_acc_and_acc_norm_match_a_hand_computation(lm):
    model, tok = lm
    preds, summary = run(lm, HANDMADE, batch_size=3)
    assert [p["id"] for p in preds] == [r["id"] for r in HANDMADE]  # input order kept despite length sorting
    n_acc = n_norm = 0
    for rec, pred in zip(HANDMADE, preds):
        item = parse_item(rec)
        prompt = build_prompt(item)
        ref = [plain_loglik(model, tok, prompt.context, c) for c in prompt.continuations]
        assert pred["scores"] == pytest.approx(ref, abs=1e-4)
        gold = "ABCDE".index(rec["answer"])
        acc_pred = max(range(len(ref)), key=lambda k: (ref[k], -k))
        norm = [ll / len(t) for ll, t in zip(ref, prompt.norm_texts)]
        norm_pred = max(range(len(norm)), key=lambda k: (norm[k], -k))
        assert pred["pred"] == "ABCDE"[acc_pred] and pred["pred_norm"] == "ABCDE"[norm_pred]
        assert pred["correct"] == (acc_pred == gold) and pred["correct_norm"] == (norm_pred == gold)
        n_acc += acc_pred == gold
        n_norm += norm_pred == gold
        assert pred["id"] == rec["id"] and pred["subject"] == rec["subject"]  # fields kept
    assert summary["overall"]["items"] == len(HANDMADE)
    assert summary["overall"]["acc"] == pytest.approx(n_acc / len(HANDMADE))
    assert summary["overall"]["acc_norm"] == pytest.approx(n_norm / len(HANDMADE))
    assert summary["by_source"]["mmlu"]["items"] == 2 and summary["by_subject"]["gsm8k"]["items"] == 1


def test_batching_and_prefix_reuse_give_the_scores_of_one_item_at_a_time(lm):
    one, _ = run(lm, HANDMADE, batch_size=1)
    many, _ = run(lm, HANDMADE * 3, batch_size=16)
    for a, b in zip(one * 3, many):
        assert a["id"] == b["id"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


def test_few_shot_prefix_shared_across_a_batch_gives_the_same_scores(lm):
    model, tok = lm
    dev = [parse_item(r) for r in HANDMADE]
    same_subject = [{**r, "subject": "physics", "source": "mmlu"} for r in HANDMADE]
    options = dict(shots=3, dev=[Item(d.question, d.choices, d.gold, "mmlu", "physics") for d in dev])
    with local_scorer(model, tok) as scorer:
        many = list(evaluate_records((Record(r) for r in same_subject), scorer, EvalOptions(batch_size=8, **options),
                                     Stats(), Summary()))
    assert scorer.shared_prefix_tokens > 0  # the description + examples ran once for the batch
    one, _ = run(lm, same_subject, batch_size=1, **options)
    for a, b in zip(one, many):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    prompt = build_prompt(parse_item(same_subject[0]), shots=select_shots(parse_item(same_subject[0]),
                                                                          options["dev"], 3))
    assert prompt.context.count("\nAnswer:") == 4  # three examples and the question
    ref = [plain_loglik(model, tok, prompt.context, c) for c in prompt.continuations]
    assert many[0]["scores"] == pytest.approx(ref, abs=1e-4)


def test_letter_method_scores_the_letters_as_continuations(lm):
    """letter: each option letter (" A", " B", ...) is the continuation, scored as lm-eval scores MMLU's (every
    token of it: the tiny tokenizer splits some letters in two), the same request an endpoint gets."""
    model, tok = lm
    preds, summary = run(lm, HANDMADE, method="letter", batch_size=4)
    for rec, pred in zip(HANDMADE, preds):
        item = parse_item(rec)
        prompt = build_prompt(item, "mmlu" if rec["source"] == "mmlu" else "letter")
        assert "\nA. " in prompt.context and prompt.context.endswith("Answer:")
        ref = [plain_loglik(model, tok, prompt.context, " " + L) for L in "ABCDE"[: len(item.choices)]]
        assert pred["scores"] == pytest.approx(ref, abs=1e-4)
        assert pred["correct"] == (pred["pred"] == rec["answer"])
    assert summary["overall"]["acc"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds))
    assert "acc_norm" not in summary["overall"]


def test_generate_method_extracts_and_scores(lm):
    preds, summary = run(lm, HANDMADE[:4] + HANDMADE[5:6], method="generate", max_new_tokens=8, batch_size=2)
    for pred in preds:
        assert isinstance(pred["generation"], str)
        item = parse_item(pred)
        value, idx = extract_answer(pred["generation"], item)
        assert pred["extracted"] == value
        assert pred["pred"] == (None if idx is None else "ABCDE"[idx])
        assert pred["correct"] == (pred["pred"] == pred["answer"])
    assert summary["overall"]["acc"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds))


def test_answer_extraction():
    assert extract_number("so 3 + 5 = 8.\n#### 8") == "8"
    assert extract_number("The answer is 1,234.") == "1,234"
    assert extract_number("first 3 then 12") == "12"
    assert extract_boxed("thus $\\boxed{\\frac{1}{2}}$ and") == "\\frac{1}{2}"
    assert extract_letter("Let's see... The answer is (C).", 4) == "C"
    assert extract_letter("no letter here", 4) is None
    gsm = Item("q", ["7", "8", "1,000", "10"], 1, "gsm8k", "gsm8k")
    assert extract_answer("3 + 5 = 8. The answer is 8.", gsm) == ("8", 1)
    assert extract_answer("#### 1000", gsm) == ("1000", 2)
    assert extract_answer("The answer is 11", gsm) == ("11", None)
    math_item = Item("q", ["\\frac{1}{3}", "\\frac{1}{2}", "2", "3"], 1, "math", "algebra")
    assert extract_answer("so \\boxed{\\dfrac{1}{2}}", math_item)[1] == 1


def test_templates_reproduce_lm_eval():
    arc = Item("Which is a mammal?", ["shark", "whale"], 1, "arc-easy", "arc-easy")
    p = build_prompt(arc)
    assert p.context == "Question: Which is a mammal?\nAnswer:"
    assert p.continuations == [" shark", " whale"] and p.norm_texts == ["shark", "whale"]
    mmlu = Item(" What is 1+1? ", ["1", "2", "3", "4"], 1, "mmlu", "high_school_mathematics")
    shot = Item("What is 2+2?", ["4", "5", "6", "7"], 0, "mmlu", "high_school_mathematics")
    p = build_prompt(mmlu, shots=[shot])
    assert p.context == (
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
        "What is 2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: A\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert p.continuations == [" A", " B", " C", " D"]
    rag = Item("Why?", ["a", "b"], 0, "arc-easy", "x", passages=['The "moon"\nshines.', "Second."])
    assert build_prompt(rag).context.startswith("Sources:\n[1] \"The 'moon' shines.\"\n[2] \"Second.\"\n\nQuestion: Why?")
    chat = build_prompt(mmlu, chat=lambda msgs: repr(msgs))
    assert chat.continuations == ["A", "B", "C", "D"]  # lm-eval drops the target delimiter under a chat template
    assert "'role': 'system'" in chat.context


def test_shots_are_first_n_of_the_same_subject():
    dev = [Item(f"q{i}", ["a", "b"], 0, "mmlu", s) for i, s in enumerate(["x", "y", "x", "y", "x"])]
    item = Item("q", ["a", "b"], 0, "mmlu", "y")
    assert [d.question for d in select_shots(item, dev, 3)] == ["q1", "q3", "q0"]


@pytest.mark.parametrize("record, field", [
    ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "answer"),
    ({"question": "q", "choices": ["a"], "answer": "A"}, "choices"),
    ({"question": "q", "choices": "ab", "answer": "A"}, "choices"),
    ({"choices": ["a", "b"], "answer": "A"}, "question"),
    ({"question": "q", "choices": ["a", 3], "answer": "A"}, "choices"),
])
def test_bad_records_name_the_field(record, field):
    with pytest.raises(RecordError) as e:
        parse_item(record)
    assert e.value.field == field


def test_context_field_is_validated():
    with pytest.raises(RecordError) as e:
        parse_item({"question": "q", "choices": ["a", "b"], "answer": "A", "ctx": "text"}, "ctx")
    assert e.value.field == "ctx"
    item = parse_item({"question": "q", "choices": ["a", "b"], "answer": "a", "ctx": [{"text": "p1"}, "p2", "p3"]},
                      "ctx", max_passages=2)
    assert item.passages == ["p1", "p2"] and item.gold == 0


def test_stderr_is_lm_evals_mean_stderr():
    values = [1.0, 0.0, 1.0, 1.0]
    mu = 0.75
    assert mean_stderr(values) == pytest.approx(math.sqrt(sum((v - mu) ** 2 for v in values) / 3 / 4))
