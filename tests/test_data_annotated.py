"""pair-annotated: method.md section 1 rules on handmade records and on examples/annotated.jsonl."""

import json
from pathlib import Path

import pytest

from probllm.data.annotated import AnnotatedFields, pairs_from_annotated
from probllm.io import RecordError, Stats

ROOT = Path(__file__).resolve().parents[1]


def comp(overall, correctness="AB", a="answer A", b="answer B", **extra):
    crit = {"correctness": correctness, "clarity": "A", **extra}
    if overall is not ...:
        crit["overall"] = overall
    return {"A": a, "B": b, "ranking_criteria": crit}


def record(*comparisons, **extra):
    return {"question_id": 1, "question_complete": "Q?", "preference": list(comparisons), **extra}


def test_chosen_is_the_overall_winner_and_fields_are_kept():
    stats = Stats()
    pairs = pairs_from_annotated(record(comp("A"), comp("B"), course_id=7), stats)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("answer A", "answer B"), ("answer B", "answer A")]
    assert all(p["prompt"] == "Q?" and p["source"] == "student-annotated" for p in pairs)
    assert pairs[0]["course_id"] == 7 and pairs[0]["question_id"] == 1 and "preference" not in pairs[0]
    assert pairs[1]["comparison"] == 1 and pairs[1]["criteria"]["overall"] == "B"


def test_ties_missing_overall_and_both_wrong_are_dropped_and_counted():
    stats = Stats()
    pairs = pairs_from_annotated(record(comp("AB"), comp(...), comp("None"), comp("A", correctness="None"),
                                        comp("B", correctness=None), comp("A", correctness="A"),
                                        comp("A", correctness="B")), stats)
    # correctness B with overall A is kept: only "both wrong" is the report's filter
    assert len(pairs) == 2
    assert stats.skipped == {"overall tie (AB)": 1, "overall missing": 1, "overall None (neither)": 1,
                             "both answers wrong (correctness None)": 2}
    assert stats.notes["comparisons"] == 7


def test_field_names_can_be_renamed():
    rec = {"q": "Why?", "cmp": [{"first": "x", "second": "y", "crit": {"best": "B", "right": "AB"}}]}
    f = AnnotatedFields(question="q", comparisons="cmp", a="first", b="second", criteria="crit", overall="best",
                        correctness="right")
    (pair,) = pairs_from_annotated(rec, Stats(), f)
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ("Why?", "y", "x")


@pytest.mark.parametrize("bad, field", [
    ({"question_complete": 3, "preference": []}, "question_complete"),
    ({"question_complete": "Q", "preference": {"A": 1}}, "preference"),
    ({"question_complete": "Q", "preference": [comp("C")]}, "preference[0].ranking_criteria.overall"),
    ({"question_complete": "Q", "preference": [{"A": "x", "ranking_criteria": {"overall": "A"}}]},
     "preference[0].B"),
    ({"question_complete": "Q", "preference": [{"A": "x", "B": "y"}]}, "preference[0].ranking_criteria"),
])
def test_bad_records_name_the_field(bad, field):
    stats = Stats()
    with pytest.raises(RecordError) as e:
        pairs_from_annotated({"question_id": 1, **bad}, stats)
    assert e.value.field == field
    assert not stats.skipped  # an invalid record adds nothing to the drop counts


def test_examples_file_gives_about_forty_pairs_with_every_drop_reason():
    stats = Stats()
    pairs = []
    for line in (ROOT / "examples" / "annotated.jsonl").read_text().splitlines():
        pairs += pairs_from_annotated(json.loads(line), stats)
    assert 35 <= len(pairs) <= 45
    assert {"overall tie (AB)", "both answers wrong (correctness None)", "overall missing"} <= set(stats.skipped)
    assert all(p["chosen"] != p["rejected"] and p["chosen"] and p["rejected"] for p in pairs)
