"""Student-annotated comparisons to preference pairs (method.md section 1).

Each input record is one question with a list of comparisons of two answers A and B, each annotated on several
criteria whose values are `A`, `B`, `AB` (both) or `None` (neither):

    {"question_id": 7, "question_complete": "...",
     "preference": [{"A": "...", "B": "...", "ranking_criteria": {"overall": "A", "correctness": "AB", ...}}]}

Rules: chosen = the `overall` winner; comparisons whose `overall` is a tie (`AB`), `None` or missing are dropped;
comparisons whose `correctness` is `None` (both answers wrong: the report's filter) are dropped. A JSON `null`
counts as `None` (the course export writes both). Each drop is counted by reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from probllm.io import RecordError, Stats, require

SOURCE = "student-annotated"
VALUES = {"A", "B", "AB", "None"}


@dataclass
class AnnotatedFields:
    """Field names of the course format; every one can be renamed from the command line."""

    question: str = "question_complete"
    question_id: str = "question_id"
    comparisons: str = "preference"
    a: str = "A"
    b: str = "B"
    criteria: str = "ranking_criteria"
    overall: str = "overall"
    correctness: str = "correctness"


def _criterion(criteria: dict, key: str, where: str) -> str | None:
    """A criterion's value normalised to A/B/AB/None, or None when the key is absent."""
    if key not in criteria:
        return None
    value = criteria[key]
    if value is None:
        return "None"
    if not isinstance(value, str) or value.strip() not in VALUES:
        raise RecordError(f"expected one of A, B, AB, None, got {value!r}"[:120], field=f"{where}.{key}")
    return value.strip()


def pairs_from_annotated(record: dict, stats: Stats, f: AnnotatedFields = AnnotatedFields()) -> list[dict]:
    """All kept pairs of one annotated question; drops are counted on `stats` by reason."""
    question = require(record, f.question, str)
    comparisons = require(record, f.comparisons, list, allow_empty=True)
    kept_fields = {k: v for k, v in record.items() if k not in (f.question, f.comparisons)}
    pairs, checked = [], []
    for i, comp in enumerate(comparisons):
        where = f"{f.comparisons}[{i}]"
        if not isinstance(comp, dict):
            raise RecordError("expected an object", field=where)
        criteria = comp.get(f.criteria)
        if not isinstance(criteria, dict):
            raise RecordError("missing" if criteria is None else "expected an object", field=f"{where}.{f.criteria}")
        overall = _criterion(criteria, f.overall, f"{where}.{f.criteria}")
        correctness = _criterion(criteria, f.correctness, f"{where}.{f.criteria}")
        answers = {}
        for side, name in (("A", f.a), ("B", f.b)):
            value = comp.get(name)
            if not isinstance(value, str):
                raise RecordError("missing" if value is None else "expected a string", field=f"{where}.{name}")
            answers[side] = value
        checked.append((i, criteria, overall, correctness, answers))
    # Count only once the whole record is valid, so an invalid record adds nothing to the drop counts.
    for i, criteria, overall, correctness, answers in checked:
        stats.notes["comparisons"] = stats.notes.get("comparisons", 0) + 1
        if overall is None:
            stats.skip("overall missing")
            continue
        if overall == "AB":
            stats.skip("overall tie (AB)")
            continue
        if overall == "None":
            stats.skip("overall None (neither)")
            continue
        if correctness == "None":
            stats.skip("both answers wrong (correctness None)")
            continue
        chosen, rejected = answers[overall], answers["B" if overall == "A" else "A"]
        if not chosen.strip() or not rejected.strip():
            stats.skip("empty answer")
            continue
        if chosen.strip() == rejected.strip():
            stats.skip("identical answers")
            continue
        pairs.append({
            **kept_fields,
            "prompt": question,
            "chosen": chosen,
            "rejected": rejected,
            "source": SOURCE,
            "comparison": i,
            "criteria": criteria,
        })
    if not comparisons:
        stats.skip("no comparisons")
    return pairs
