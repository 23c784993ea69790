"""Public benchmark items are kept as published: repeated option texts, 3 or 5 options, numeric labels.
`mcqify` keeps every one and `eval` scores every one (ties between equal options go to the first, as lm-eval's
np.argmax)."""

from __future__ import annotations

import json

from probllm.data.mcq import arc_to_mcq, gsm8k_to_mcq, mmlu_to_mcq

MMLU = [  # hub form (cais/mmlu) and CSV-column form, each with a repeated option text
    {"question": "Which of these is a vector quantity?", "subject": "conceptual_physics",
     "choices": ["speed", "velocity", "velocity", "mass"], "answer": 1},
    {"question": "The SI unit of force is the", "subject": "conceptual_physics",
     "A": "newton", "B": "joule", "C": "newton", "D": "watt", "answer": "A"},
    {"question": "All of the above?", "subject": "formal_logic", "choices": ["True", "True", "True", "True"],
     "answer": 3},
]
ARC = [  # Hugging Face export, 3 and 5 options, numeric labels, a repeated option
    {"id": "arc-3", "question": "Which state of matter has a fixed shape?",
     "choices": {"text": ["solid", "liquid", "gas"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"id": "arc-5", "question": "Which planet is closest to the Sun?",
     "choices": {"text": ["Venus", "Mercury", "Earth", "Mars", "Jupiter"], "label": ["A", "B", "C", "D", "E"]},
     "answerKey": "B"},
    {"id": "arc-num", "question": "Plants make food by",
     "choices": {"text": ["photosynthesis", "respiration", "digestion", "photosynthesis"],
                 "label": ["1", "2", "3", "4"]}, "answerKey": "1"},
    {"id": "arc-orig", "question": {"stem": "Sound travels fastest through", "choices": [
        {"text": "air", "label": "1"}, {"text": "water", "label": "2"}, {"text": "steel", "label": "3"}]},
     "answerKey": "3"},
]


def test_converters_keep_repeated_options_and_any_option_count():
    out = [mmlu_to_mcq(r) for r in MMLU]
    assert [r["choices"] for r in out] == [["speed", "velocity", "velocity", "mass"],
                                          ["newton", "joule", "newton", "watt"], ["True"] * 4]
    assert [r["answer"] for r in out] == ["B", "A", "D"]
    arc = [arc_to_mcq(r, "easy") for r in ARC]
    assert [len(r["choices"]) for r in arc] == [3, 5, 4, 3]
    assert [r["answer"] for r in arc] == ["A", "B", "A", "C"]
    assert arc[2]["choices"] == ["photosynthesis", "respiration", "digestion", "photosynthesis"]
    assert arc[2]["original_labels"] == ["1", "2", "3", "4"]


def test_generated_options_stay_distinct():
    import random

    for seed in range(20):
        rec = gsm8k_to_mcq({"question": "q", "answer": "so\n#### 3"}, random.Random(seed))
        assert len(set(rec["choices"])) == 4


def test_mcqify_and_eval_keep_and_score_every_item(cli, tiny_model_dir, tmp_path):
    src = tmp_path / "bench.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in MMLU + ARC))
    r = cli("mcqify", "--source", "auto", src)
    assert r.code == 0, r.stderr
    mcq = r.records
    assert len(mcq) == len(MMLU) + len(ARC)
    assert "repeats an option text; kept" in r.stderr and "skipped" not in r.stderr
    path = tmp_path / "mcq.jsonl"
    path.write_text(r.stdout)
    r = cli("eval", "--model", tiny_model_dir, "--batch-size", "3", path)
    assert r.code == 0, r.stderr
    preds = r.records
    assert [p["id"] for p in preds] == [m["id"] for m in mcq]
    for m, p in zip(mcq, preds):
        assert len(p["scores"]) == len(m["choices"])
        best = max(p["scores"])
        # lm-eval's argmax: the first of the highest scores
        assert p["pred"] == "ABCDEFGHIJ"[p["scores"].index(best)]
        for i, text in enumerate(m["choices"] if m["source"].startswith("arc") else []):
            j = m["choices"].index(text)  # the same text after the same prompt: the same loglik (ARC scores texts)
            assert abs(p["scores"][i] - p["scores"][j]) < 1e-4
    assert "7 in, 7 out" in r.stderr
