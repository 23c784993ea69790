"""Bench: `probllm eval` (float32 and bfloat16) against lm-evaluation-harness on the same model, items, templates.

All run in this one process on models loaded once (the offline SmolLM2-135M-Instruct; ours also as a bfloat16
copy), so nobody pays model loading in its timing. Items: EVERY ARC item in ../shared/examples/arc (Easy and
Challenge dev sets in AI2's original form, the Challenge test slice in the Hugging Face form) and the
MMLU test sets in ../shared/examples/mmlu/test (631 items of 4 subjects), converted to our MCQ records by mcqify's
own converters, and given to lm-eval in its document shapes (ARC: question/choices{text,label}/answerKey; MMLU:
question/choices/answer index) through custom tasks that copy lm-eval's `arc_easy` / `mmlu_<subject>` configs
with `dataset_path: json`. With `--shots 5`, MMLU once more, 5-shot: lm-eval with `num_fewshot=5` (its MMLU
config: the `first_n` sampler on the dev split, the subject's description line), its dev split the subjects'
rows in ../shared/examples/mmlu/dev, against `eval --shots 5 --dev` on the same rows.

Prints, in one run, per setting (ARC zero-shot, MMLU zero-shot, MMLU 5-shot): lm-eval's wall time, ours in
float32 (and bfloat16 on the zero-shot settings unless --no-bf16), the ratios, and per-item prediction agreement
with lm-eval (acc and acc_norm); tokens fed to the model by each (ours counted, lm-eval's computed from its
request layout); then agreement per source and the quantize table. Writes bench/results/eval.md.

    flock /tmp/probllm-heavy.lock .venv/bin/python bench/bench_eval.py            # the official run
    .venv/bin/python bench/bench_eval.py --limit 5 --skip-quantize --output /tmp/eval-check.md   # a check

    .venv/bin/python bench/bench_eval.py --shots 5 --no-bf16 --skip-quantize    # + 5-shot MMLU

`--limit N` takes the first N items of each file / MMLU subject (checks only: timings of a slice say little).
Needs `make bench-setup` (lm-eval==0.4.13).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from offline import ROOT  # noqa: E402  (offline, and this checkout importable)

LETTERS = "ABCDE"
ARC_TEMPLATE = {
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
}
MMLU_TEMPLATE = {
    "output_type": "multiple_choice",
    "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\n"
                   "Answer:",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "answer",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
}


def shared_examples() -> Path:
    for c in (os.environ.get("PROBLLM_SHARED_EXAMPLES", ""), ROOT.parent / "shared" / "examples"):
        if c and Path(c).is_dir():
            return Path(c)
    sys.exit("bench_eval: ../shared/examples not found (set PROBLLM_SHARED_EXAMPLES)")


ARC_FILES = (  # (file, our source name, lm-eval task name)
    ("ARC-Easy-Dev.jsonl", "arc-easy", "bench_arc_easy_dev"),
    ("ARC-Challenge-Dev.jsonl", "arc-challenge", "bench_arc_challenge_dev"),
    ("ARC-Challenge-test-hf-first20.jsonl", "arc-challenge", "bench_arc_challenge_test_hf"),
)


def prepare(work: Path, limit: int | None) -> tuple[list[dict], list[dict]]:
    """Our MCQ records (each tagged with its lm-eval task and doc index), and lm-eval task configs reading the
    same items from JSONL files."""
    from probllm.data.mcq import arc_to_mcq

    ex = shared_examples()
    ours: list[dict] = []
    tasks: list[dict] = []
    for name, source, task in ARC_FILES:
        docs = []
        with open(ex / "arc" / name, encoding="utf-8") as fh:
            for line in fh:
                d = json.loads(line)
                mcq = arc_to_mcq(d, source.removeprefix("arc-"))  # what `probllm mcqify --source arc` writes
                labels = mcq.get("original_labels") or list(LETTERS[: len(mcq["choices"])])
                docs.append({"id": mcq["id"], "question": mcq["question"],
                             "choices": {"text": mcq["choices"], "label": labels},
                             "answerKey": labels[LETTERS.index(mcq["answer"])]})
                ours.append({**mcq, "_task": task, "_doc": len(docs) - 1})
                if limit and len(docs) == limit:
                    break
        f = work / f"{task}.jsonl"
        f.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        tasks.append({"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(f)}},
                      "test_split": "test", **ARC_TEMPLATE})
    mmlu_ours, mmlu_tasks = prepare_mmlu(work, limit, shots=0)
    return ours + mmlu_ours, tasks + mmlu_tasks


def read_csv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def mmlu_docs(rows: list[list[str]]) -> list[dict]:
    return [{"question": q, "choices": c, "answer": LETTERS.index(a)} for q, *c, a in rows]


def prepare_mmlu(work: Path, limit: int | None, shots: int) -> tuple[list[dict], list[dict]]:
    """The MMLU test items (each subject of mmlu/test) as our MCQ records and lm-eval tasks; with `shots`, tasks
    that copy lm-eval's MMLU few-shot config (dev split = the subject's mmlu/dev rows, `first_n`, num_fewshot)."""
    from probllm.data.mcq import mmlu_to_mcq

    ex = shared_examples() / "mmlu"
    ours: list[dict] = []
    tasks: list[dict] = []
    for csv_path in sorted((ex / "test").glob("*_test.csv")):
        subject = csv_path.name[: -len("_test.csv")]
        task = f"bench_mmlu_{subject}" + (f"_{shots}shot" if shots else "")
        rows = read_csv(csv_path)[:limit] if limit else read_csv(csv_path)
        for i, (q, *choices, ans) in enumerate(rows):
            mcq = mmlu_to_mcq({"question": q, "subject": subject, "A": choices[0], "B": choices[1],
                               "C": choices[2], "D": choices[3], "answer": ans})
            ours.append({**mcq, "_task": task, "_doc": i})
        files = {"test": work / f"{task}.jsonl"}
        if shots:
            files["dev"] = work / f"{task}_dev.jsonl"
            files["dev"].write_text("".join(json.dumps(d) + "\n" for d in mmlu_docs(
                read_csv(ex / "dev" / f"{subject}_dev.csv"))), encoding="utf-8")
        files["test"].write_text("".join(json.dumps(d) + "\n" for d in mmlu_docs(rows)), encoding="utf-8")
        cfg = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {k: str(v) for k, v in
                                                                                       files.items()}},
               "test_split": "test", "description": f"The following are multiple choice questions (with answers) "
                                                     f"about {subject.replace('_', ' ')}.\n\n", **MMLU_TEMPLATE}
        if shots:
            cfg.update(fewshot_split="dev", fewshot_config={"sampler": "first_n"}, num_fewshot=shots)
        tasks.append(cfg)
    return ours, tasks


def mmlu_dev_items(subjects: set[str]) -> list:
    """Our side's `--dev`: the dev rows of these subjects, as `mcqify --source mmlu` reads them (file order)."""
    from probllm.data.mcq import mmlu_to_mcq
    from probllm.evaluate.mcqa import parse_item

    dev = []
    for subject in sorted(subjects):
        for q, *c, a in read_csv(shared_examples() / "mmlu" / "dev" / f"{subject}_dev.csv"):
            dev.append(parse_item(mmlu_to_mcq({"question": q, "subject": subject, "A": c[0], "B": c[1], "C": c[2],
                                               "D": c[3], "answer": a})))
    return dev
    return ours, tasks


def run_lm_eval(model, tok, tasks: list[dict], batch_size: int, shots: int = 0) -> tuple[dict, float]:
    """lm-eval's per-item results keyed by (task, doc index), and its wall time."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu", dtype="float32")
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, batch_size=batch_size, log_samples=True,
                                  bootstrap_iters=0, verbosity="ERROR", num_fewshot=shots or None)
    seconds = time.perf_counter() - t0
    per_item = {}
    for task, samples in out["samples"].items():
        for s in samples:
            lls = [r[0] for r in s["filtered_resps"]]
            per_item[(task, s["doc_id"])] = {"acc": s["acc"], "acc_norm": s["acc_norm"], "lls": lls}
    return per_item, seconds


def run_ours(model, tok, records: list[dict], batch_size: int, shots: int = 0, dev: list | None = None
             ) -> tuple[list[dict], float, dict]:
    """Our side, all of it: `probllm eval` (loglik, auto template, `--shots`/`--dev`) on these records; its
    predictions, wall time and the scorer's counters (tokens fed, passes, cached prefixes)."""
    from probllm.evaluate.mcqa import EvalOptions, evaluate_records
    from probllm.evaluate.scorer import local_scorer
    from probllm.evaluate.summary import Summary
    from probllm.io import Record, Stats

    options = EvalOptions(batch_size=batch_size, shots=shots, dev=list(dev or []))
    with local_scorer(model, tok) as scorer:  # eval's own path: the model layer's HFLM, as `probllm eval` runs it
        t0 = time.perf_counter()
        preds = list(evaluate_records((Record(r) for r in records), scorer, options, Stats(), Summary()))
        seconds = time.perf_counter() - t0
    return preds, seconds, dict(scorer.stats)


def lm_eval_tokens(tok, records: list[dict], shots: int = 0, dev: list | None = None) -> int:
    """Positions lm-eval's HFLM feeds for these items (padding not counted): (context + choice)[:-1] for every
    choice, except that choices of one token after one context run once (its one-token-continuation cache)."""
    from probllm.evaluate.mcqa import parse_item, select_shots
    from probllm.evaluate.templates import build_prompt
    from probllm.lm.hf_scoring import encode_pair

    total = 0
    for rec in records:
        item = parse_item(rec)
        prompt = build_prompt(item, shots=select_shots(item, dev or [], shots))
        pairs = [encode_pair(tok, prompt.context, c) for c in prompt.continuations]
        if all(len(c) == 1 for _, c in pairs):
            total += len(pairs[0][0])
        else:
            total += sum(len(ctx) + len(c) - 1 for ctx, c in pairs)
    return total


def compare(records, preds, theirs) -> dict:
    """Agreement per item: our pred vs lm-eval's argmax (acc and acc_norm), and the largest loglik difference."""
    agree = agree_norm = 0
    max_diff = 0.0
    ours_acc = theirs_acc = ours_norm = theirs_norm = 0.0
    for rec, pred in zip(records, preds):
        t = theirs[(rec["_task"], rec["_doc"])]
        their_pred = max(range(len(t["lls"])), key=lambda k: (t["lls"][k], -k))
        texts = rec["choices"] if rec["source"].startswith("arc") else "ABCD"
        norm = [ll / len(c) for ll, c in zip(t["lls"], texts)]
        their_norm = max(range(len(norm)), key=lambda k: (norm[k], -k))
        agree += LETTERS[their_pred] == pred["pred"]
        agree_norm += LETTERS[their_norm] == pred["pred_norm"]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(pred["scores"], t["lls"])))
        ours_acc += pred["correct"]
        ours_norm += pred["correct_norm"]
        theirs_acc += t["acc"]
        theirs_norm += t["acc_norm"]
    n = max(len(records), 1)
    return {"items": len(records), "agree": agree / n, "agree_norm": agree_norm / n, "max_loglik_diff": max_diff,
            "ours_acc": ours_acc / n, "theirs_acc": theirs_acc / n, "ours_acc_norm": ours_norm / n,
            "theirs_acc_norm": theirs_norm / n}


def same_preds(a: list[dict], b: list[dict]) -> tuple[float, float]:
    n = max(len(a), 1)
    return (sum(x["pred"] == y["pred"] for x, y in zip(a, b)) / n,
            sum(x["pred_norm"] == y["pred_norm"] for x, y in zip(a, b)) / n)


def quantize_table(model_dir: str, records: list[dict], methods: list[str], limit: int, work: Path) -> list[dict]:
    """One `probllm quantize` run per method (each measured in fresh processes), on the first `limit` items."""
    mcq = work / "quant_eval.jsonl"
    mcq.write_text("".join(json.dumps(r) + "\n" for r in records[:limit]), encoding="utf-8")
    rows = []
    for method in methods:
        out = work / f"q-{method}"
        proc = subprocess.run([sys.executable, "-m", "probllm", "quantize", "--method", method, "--output", str(out),
                               "--eval", str(mcq)], capture_output=True, text=True, cwd=str(ROOT))
        if proc.returncode != 0:
            rows.append({"method": method, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def machine() -> str:
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from probllm.models import cpu_has_fast_bf16

    return f"{name}, {os.cpu_count()} cores, fast bf16 (AMX/AVX512-BF16): {'yes' if cpu_has_fast_bf16() else 'no'}"


def our_cell(st: dict) -> str:
    cell = f"{st.get('tokens', 0)} ({st.get('padded_tokens', 0)} with padding, {st.get('passes', 0)} passes"
    if st.get("prefix_passes"):
        cell += (f"; {st['prefix_passes']} prefixes of {st['cached_prefix_tokens']} tokens cached, "
                 f"{st['cache_reused_tokens']} prefix tokens not fed again")
    return cell + ")"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N items of each file / subject (checks only)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shots", type=int, default=0, help="also MMLU N-shot (lm-eval num_fewshot=N vs eval --shots N)")
    ap.add_argument("--no-bf16", action="store_true", help="skip our bfloat16 run")
    ap.add_argument("--quant-limit", type=int, default=120, help="items for the quantize table's accuracy")
    ap.add_argument("--quant-methods", default="torch-int8,quanto-int8,quanto-int4,bnb-int8,bnb-nf4,bnb-fp4")
    ap.add_argument("--skip-quantize", action="store_true")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "eval.md"))
    args = ap.parse_args()

    import torch
    from probllm.models import load_model, load_tokenizer, resolve_model, set_threads

    set_threads()
    model_dir = resolve_model(None)
    model = load_model(model_dir, dtype="float32", device="cpu")
    tok = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        work = Path(tmp)
        records, tasks = prepare(work, args.limit)
        arc_tasks = {t for _, _, t in ARC_FILES}
        # (name, records, lm-eval tasks, shots, our --dev items)
        settings = [("ARC zero-shot", [r for r in records if r["_task"] in arc_tasks],
                     [t for t in tasks if t["task"] in arc_tasks], 0, []),
                    ("MMLU zero-shot", [r for r in records if r["_task"] not in arc_tasks],
                     [t for t in tasks if t["task"] not in arc_tasks], 0, [])]
        if args.shots:
            few, few_tasks = prepare_mmlu(work, args.limit, args.shots)
            dev = mmlu_dev_items({r["subject"] for r in few})
            settings.append((f"MMLU {args.shots}-shot", few, few_tasks, args.shots, dev))
        # Warm-up (first-call allocations) for both, on a few items, so neither pays it in the timing.
        for _, recs, _, shots, dev_items in settings:
            run_ours(model, tok, recs[:8], args.batch_size, shots, dev_items)
        # per setting: lm-eval's per-item results and seconds, then ours [(dtype, preds, seconds, stats)]
        results = []
        for name, recs, task_cfgs, shots, dev_items in settings:
            theirs, their_s = run_lm_eval(model, tok, task_cfgs, args.batch_size, shots)
            preds, our_s, our_stats = run_ours(model, tok, recs, args.batch_size, shots, dev_items)
            results.append([theirs, their_s, [("float32", preds, our_s, our_stats)]])
        if not args.no_bf16:
            model_bf16 = load_model(model_dir, dtype="bfloat16", device="cpu")
            for (name, recs, _, shots, dev_items), res in zip(settings, results):
                if shots:  # bf16 is emulated on CPUs without AMX: zero-shot figures only
                    continue
                run_ours(model_bf16, tok, recs[:8], args.batch_size)
                preds_bf16, bf16_s, bf16_stats = run_ours(model_bf16, tok, recs, args.batch_size)
                res[2].append(("bfloat16", preds_bf16, bf16_s, bf16_stats))
            del model_bf16
        n = sum(len(recs) for _, recs, *_ in settings)
        scope = "a `--limit` slice: a check, not a measurement" if args.limit else "every item"
        lines = [
            f"## `probllm eval` vs lm-evaluation-harness {lm_eval_version()}",
            "",
            f"{n} scored items ({scope}): " + ", ".join(f"{name} {len(recs)}" for name, recs, *_ in settings)
            + ". Model: offline SmolLM2-135M-Instruct, CPU, "
            f"{torch.get_num_threads()} threads; machine: {machine()}. Batch size {args.batch_size} for all "
            "(ours: questions per pass; lm-eval: requests, i.e. question-choice pairs, per pass); lm-eval's ARC and "
            "MMLU templates (MMLU: the 4 subjects' test sets; few-shot: lm-eval's MMLU config, `first_n` on the "
            "subjects' dev rows, description line); models loaded once, same process; lm-eval in float32.",
            "",
            "| setting | run | wall s | items/s | vs lm-eval | tokens fed | agreement acc | agreement acc_norm "
            "| same preds as ours fp32 (acc / acc_norm) | acc | acc_norm | max abs loglik diff |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for (name, recs, _, shots, dev_items), (theirs, their_s, runs) in zip(settings, results):
            m = max(len(recs), 1)
            lines.append(
                f"| {name} | lm-eval 0.4.13 float32 | {their_s:.1f} | {m / their_s:.1f} | 1.00x | "
                f"{lm_eval_tokens(tok, recs, shots, dev_items)} (computed) | | | | "
                f"{sum(t['acc'] for t in theirs.values()) / m:.4f} | "
                f"{sum(t['acc_norm'] for t in theirs.values()) / m:.4f} | |")
            for dtype, p, secs, st in runs:
                c = compare(recs, p, theirs)
                same = same_preds(runs[0][1], p)
                lines.append(
                    f"| {name} | probllm eval {dtype} | {secs:.1f} | {m / secs:.1f} | {their_s / secs:.2f}x | "
                    f"{our_cell(st)} | {c['agree']:.2%} | {c['agree_norm']:.2%} | {same[0]:.2%} / {same[1]:.2%} | "
                    f"{c['ours_acc']:.4f} | {c['ours_acc_norm']:.4f} | {c['max_loglik_diff']:.2e} |")
        dtypes = [d for d, *_ in results[0][2]]
        lines += ["", "Agreement with lm-eval per source:", "",
                  "| setting | source | items | " + " | ".join(f"{d} acc / acc_norm" for d in dtypes) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in dtypes) + " |"]
        for (name, recs, *_), (theirs, _, runs) in zip(settings, results):
            for source in sorted({r["source"] for r in recs}):
                idx = [i for i, r in enumerate(recs) if r["source"] == source]
                cells = []
                for _, p, _, _ in runs:
                    c = compare([recs[i] for i in idx], [p[i] for i in idx], theirs)
                    cells.append(f"{c['agree']:.2%} / {c['agree_norm']:.2%}")
                cells += [""] * (len(dtypes) - len(cells))
                lines.append(f"| {name} | {source} | {len(idx)} | " + " | ".join(cells) + " |")
        if not args.skip_quantize:
            zero = [r for _, recs, _, shots, _ in settings if not shots for r in recs]
            rows = quantize_table(model_dir, [{k: v for k, v in r.items() if not k.startswith("_")}
                                              for r in zero], args.quant_methods.split(","), args.quant_limit, work)
            lines += ["", f"## `probllm quantize` on SmolLM2-135M-Instruct (accuracy: loglik acc on the first "
                      f"{args.quant_limit} bench items)", "", quant_markdown(rows)]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text, encoding="utf-8")


def quant_markdown(rows: list[dict]) -> str:
    from probllm.evaluate.report import quantize_table_markdown

    return quantize_table_markdown(rows)


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


if __name__ == "__main__":
    main()
