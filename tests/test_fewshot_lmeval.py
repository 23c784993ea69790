"""`eval --shots 5` builds lm-eval 0.4.13's MMLU 5-shot prompt byte for byte: lm-eval's own task renders the
context (its `first_n` sampler over the local dev rows, offline), and build_prompt + select_shots must equal it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from probllm.data.mcq import mmlu_to_mcq
from probllm.evaluate.mcqa import parse_item, select_shots
from probllm.evaluate.templates import build_prompt

lm_task = pytest.importorskip("lm_eval.api.task")
MMLU = Path(__file__).resolve().parents[2] / "shared" / "examples" / "mmlu"
if not MMLU.is_dir():
    pytest.skip("../shared/examples/mmlu not found", allow_module_level=True)


def rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def items(subject: str, rs: list[list[str]]):
    return [parse_item(mmlu_to_mcq({"question": q, "subject": subject, "A": c[0], "B": c[1], "C": c[2], "D": c[3],
                                    "answer": a})) for q, *c, a in rs]


def lm_eval_task(tmp: Path, subject: str, test_rows, dev_rows):
    files = {}
    for split, rs in (("test", test_rows), ("dev", dev_rows)):
        files[split] = str(tmp / f"{subject}_{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps({"question": q, "choices": c, "answer": "ABCD".index(a)})
                                              + "\n" for q, *c, a in rs), encoding="utf-8")
    default = Path(lm_task.__file__).parents[1] / "tasks" / "mmlu" / "default"
    import yaml

    template = yaml.safe_load((default / "_default_template_yaml").read_text())
    own = yaml.safe_load((default / f"mmlu_{subject}.yaml").read_text())
    cfg = {**template, "task": f"t_{subject}", "description": own["description"], "dataset_path": "json",
           "dataset_kwargs": {"data_files": files}, "num_fewshot": 5}
    return lm_task.ConfigurableTask(config=cfg)


# astronomy: test items after its dev rows; college_physics: its dev rows (one duplicated) asked as test items
@pytest.mark.parametrize("subject,test_file", [("astronomy", "test/astronomy_test.csv"),
                                               ("college_physics", "dev/college_physics_dev.csv"),
                                               ("formal_logic", "dev/formal_logic_dev.csv")])
def test_five_shot_context_equals_lm_eval(tmp_path, subject, test_file):
    dev_rows = rows(MMLU / "dev" / f"{subject}_dev.csv")
    test_rows = rows(MMLU / test_file)[:4]
    task = lm_eval_task(tmp_path, subject, test_rows, dev_rows)
    # a dev file of several subjects, as `mcqify --source mmlu examples/mmlu/dev` writes it
    dev = items("abstract_algebra", rows(MMLU / "dev" / "abstract_algebra_dev.csv")) + items(subject, dev_rows)
    for doc, item in zip(task.test_docs(), items(subject, test_rows), strict=True):
        prompt = build_prompt(item, "auto", select_shots(item, dev, 5))
        assert prompt.context == task.fewshot_context(doc, 5)
        theirs = [inst.arguments for inst in task.construct_requests(doc, task.fewshot_context(doc, 5))]
        assert [(prompt.context, c) for c in prompt.continuations] == [tuple(a) for a in theirs]
