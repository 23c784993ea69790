"""MCQ accuracy: score each question's choices with a causal LM, the way lm-evaluation-harness does, but faster.

Three methods:
- `loglik` (default): the log-likelihood of each continuation (" " + choice) after the prompt, summed over its
  tokens. `acc` takes the argmax; `acc_norm` the argmax of loglik / len(choice) in characters, exactly
  lm-eval's `process_results` (`completion_len = len(choice)`; ties go to the first choice, as `np.argmax`).
  Tokenisation follows lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation, the
  pair is encoded whole and the continuation tokens are what follows the context's own encoding.
- `letter`: one pass over a prompt listing the lettered options; the scores are the log-probs of the letters.
- `generate`: chain of thought, then the answer is read from the text (GSM8K number, MATH \\boxed{}, letter).

This module is the runner: it checks records, builds each question's prompt and (context, continuation)
requests, and hands batches to the model through `probllm.evaluate.scorer.MCQScorer`, over whichever `LM` it
is given (a local model, an endpoint, llama.cpp). The local backend does the packing and sorting
(`probllm.lm.hf_scoring.score_groups`: each prompt once, its choices packed after it, logits only where a choice
token is predicted; lm-eval runs prompt + choice as a separate sequence for every choice). Answer extraction is
in `extraction.py`, the summary in `summary.py`. Memory stays bounded by the batch: records stream through a
window of `batch_size * WINDOW_BATCHES` items, which is sorted by length, scored and written back in input
order.
"""

from __future__ import annotations

import time
from itertools import chain, islice
from typing import Any, Callable, Iterable, Iterator

from probllm.evaluate.extraction import extract_answer
from probllm.evaluate.options import EvalOptions
from probllm.evaluate.scorer import MCQScorer
from probllm.evaluate.summary import Summary
from probllm.evaluate.templates import Item, build_prompt, cot_prompt, resolve_template
from probllm.io import Record, RecordError, Stats, map_records
from probllm.records import LETTERS, parse_mcq, parse_passages

WINDOW_BATCHES = 16  # how many batches of records are read ahead, sorted by length and scored together


# ------------------------------------------------------------------------------------------------- validation


def parse_item(record: dict, context_field: str | None = None, max_passages: int = 5) -> Item:
    """Check an MCQ record (question, choices, answer letter, source, subject) and reduce it to an Item."""
    mcq = parse_mcq(record, need_answer=True, min_choices=2)
    source = mcq.source or "unknown"
    passages = parse_passages(record, context_field, required=True) if context_field else []
    return Item(mcq.question, mcq.choices, mcq.gold, source, mcq.subject or source,
                [p["text"] for p in passages[:max_passages]])


def select_shots(item: Item, dev: list[Item], n: int) -> list[Item]:
    """lm-eval's `first_n` sampler on MMLU's dev split: the first n dev rows of the item's subject, in file order,
    duplicates included (lm-eval keeps them; skipping one shifted a foreign row into college_physics' prompts), and
    a row equal to the item itself included too (lm-eval drops the eval doc only when the shots come from the test
    split itself; --dev is another split, so pass a dev file, not the test file). A subject with fewer than n rows
    is filled up from the same source, then from any, never with the item itself (lm-eval would refuse)."""
    if n <= 0:
        return []
    picked = [d for d in dev if d.subject == item.subject][:n]
    for pool in ([d for d in dev if d.source == item.source], dev):
        for d in pool:
            if len(picked) == n:
                return picked
            if d.subject != item.subject and d != item and d not in picked:
                picked.append(d)
    return picked


# ------------------------------------------------------------------------------------------------ the command


def _argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:  # strict: ties keep the first, like np.argmax
            best = i
    return best


def norm_scores(scores: list[float], texts: list[str]) -> list[float]:
    """lm-eval's acc_norm scores: loglik divided by the choice's length in characters."""
    return [s / float(len(t)) if len(t) else float("-inf") for s, t in zip(scores, texts)]


def evaluate_records(
    records: Iterable[Record],
    scorer: MCQScorer,
    options: EvalOptions,
    stats: Stats,
    summary: Summary,
    skip_invalid: bool = False,
    progress: Callable[[int], Any] | None = None,
    shard=None,
) -> Iterator[dict]:
    """Prediction records, in input order: the MCQ record + pred, correct, scores (and acc_norm fields).

    Records stream through windows of `batch_size * WINDOW_BATCHES`: each window is sorted by length (similar
    lengths share a batch: little padding), scored batch by batch and written back in input order. On Ctrl-C the
    items of the window already scored are still yielded (in input order) before KeyboardInterrupt goes on up, so
    nothing scored is lost. With `shard` (a `probllm.evaluate.parallel.Shard`), every process reads the same
    records, scores its contiguous share of each window's batches, and process 0 gathers and yields them all."""
    chat = scorer.chat if options.chat_template else None

    def prepare(rec: Record) -> dict:
        item = parse_item(rec, options.context_field, options.max_passages)
        shots = select_shots(item, options.dev, options.shots)
        if options.method == "generate":
            text = cot_prompt(item, shots)
            if chat:
                text = chat([{"role": "user", "content": text}])
            return {"record": rec, "item": item, "text": text, "group": "", "tokens": scorer.length(text)}
        template = options.template
        if options.method == "letter":  # the letters must be in the prompt: MMLU's template or our lettered one
            template = "mmlu" if resolve_template(template, item) == "mmlu" else "letter"
        prompt = build_prompt(item, template, shots, chat)
        return {"record": rec, "item": item, "prompt": prompt, "group": prompt.shared,
                "tokens": scorer.length(prompt)}

    if options.limit is not None:
        records = islice(records, options.limit)
    prepared = map_records(records, prepare, stats, skip_invalid)
    window = options.batch_size * WINDOW_BATCHES
    while True:
        chunk = list(islice(prepared, window))
        if not chunk:
            return
        # Longest first (as lm-eval): similar lengths share a batch; a too-big batch fails early. With few-shot
        # examples, prompts with the same examples first go together (the scorer runs them once for several
        # questions); so do zero-shot prompts with the same description line (MMLU: one per subject).
        order = sorted(range(len(chunk)), key=lambda k: (chunk[k]["group"], -chunk[k]["tokens"]))
        batches = [order[b: b + options.batch_size] for b in range(0, len(order), options.batch_size)]
        results: dict[int, dict] = {}
        interrupted = False
        try:
            for n, idx in enumerate(batches):
                # Each process takes a contiguous run of the window's batches: with few-shot prompts (sorted by
                # their shared examples) a subject's batches stay in one process, which runs its prefix once.
                if shard is not None and n * shard.world // len(batches) != shard.rank:
                    continue
                for k, out in zip(idx, _score_batch([chunk[k] for k in idx], scorer, options)):
                    results[k] = out
                if progress:
                    progress(len(idx) * (shard.world if shard is not None else 1))
        except KeyboardInterrupt:
            if shard is not None:  # the other processes cannot be waited for: the window is lost, nothing else
                raise
            interrupted = True
        if shard is not None:
            results = shard.gather(results)
        for k in sorted(results):
            rec = results[k]
            summary.add(rec, chunk[k]["item"])
            yield rec
        if interrupted:
            raise KeyboardInterrupt


def _score_batch(batch: list[dict], scorer: MCQScorer, options: EvalOptions) -> list[dict]:
    outs = []
    if options.method == "generate":
        texts = scorer.generate([p["text"] for p in batch], options.max_new_tokens)
        for p, text in zip(batch, texts):
            item = p["item"]
            value, idx = extract_answer(text, item)
            pred = LETTERS[idx] if idx is not None else None
            outs.append({**p["record"], "pred": pred, "correct": idx == item.gold, "generation": text,
                         "extracted": value, "method": "generate"})
        return outs
    prompts = [p["prompt"] for p in batch]
    all_scores = scorer.loglik(prompts) if options.method == "loglik" else scorer.letter_scores(prompts)
    for p, scores in zip(batch, all_scores):
        item = p["item"]
        pred = _argmax(scores)
        out = {**p["record"], "pred": LETTERS[pred], "correct": pred == item.gold,
               "scores": [round(s, 6) for s in scores], "method": options.method}
        if options.method == "loglik":
            pred_norm = _argmax(norm_scores(scores, p["prompt"].norm_texts))
            out.update({"pred_norm": LETTERS[pred_norm], "correct_norm": pred_norm == item.gold})
        outs.append(out)
    return outs


def load_dev(paths: list[str], context_field: str | None = None) -> list[Item]:
    """Few-shot examples: MCQ records from --dev files (all must be valid: a bad example would bias every prompt)."""
    from probllm.io import read_records

    items = []
    for rec in read_records(paths):
        try:
            items.append(parse_item(rec))
        except RecordError as e:
            raise e.locate(rec)
    return items


def run_eval(
    files: list[str] | None,
    stats: Stats,
    *,
    model: str | None = None,
    adapter: str | None = None,
    method: str = EvalOptions.method,
    template: str = EvalOptions.template,
    shots: int = EvalOptions.shots,
    dev: list[str] | None = None,
    chat_template: bool = EvalOptions.chat_template,
    context_field: str | None = None,
    max_passages: int = EvalOptions.max_passages,
    batch_size: int = EvalOptions.batch_size,
    limit: int | None = None,
    max_new_tokens: int = EvalOptions.max_new_tokens,
    dtype: str = "auto",
    device: str = "auto",
    skip_invalid: bool = False,
    output: str | None = None,
    force_resume: bool = False,
    num_processes: int = 1,
    argv: list[str] | None = None,
    backend=None,
) -> dict:
    """The `eval` command: load, stream, score, write predictions; the summary on stderr and, for the
    command's --summary file, in `stats.figures`.

    `backend` (a `probllm.lm.BackendConfig`) with an endpoint backend (`openai`) scores a served model instead
    of loading one; a local one (`hf`, the default) loads the model here; both through `scorer.MCQScorer`. `output`: append to this file instead of
    stdout, skipping what it already holds (resume), which must have been written by the same model and settings
    (`eval_provenance`) unless `force_resume`; `num_processes` (with the command line `argv` to start the
    others) or a launcher's environment: shard across processes."""
    import sys

    from probllm.evaluate.parallel import Workers, shard_from_env, stdin_is_shared
    from probllm.io import UsageError
    from probllm.models import set_threads

    options = EvalOptions(method=method, template=template, shots=shots, chat_template=chat_template,
                          context_field=context_field, max_passages=max_passages, batch_size=batch_size,
                          max_new_tokens=max_new_tokens)
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    if max_passages < 1:
        raise UsageError("--max-passages must be at least 1")
    if num_processes < 1:
        raise UsageError("--num-processes must be at least 1")
    if dev:
        options.dev = load_dev(dev)
    options.check()
    if backend is not None and not backend.spec.uses_model:
        from probllm.lm import MODEL_BACKENDS

        raise UsageError(f"--backend {backend.backend}: eval takes {' or '.join(MODEL_BACKENDS)}")
    if backend is not None and not backend.spec.local and num_processes > 1:
        raise UsageError(f"--num-processes shards a local model; with --backend {backend.backend}, raise "
                         "--concurrency")
    reads_stdin = not files or list(files) == ["-"]
    workers = None
    if num_processes > 1:
        workers = Workers(num_processes, argv if argv is not None else sys.argv[1:], reads_stdin)
    else:
        set_threads()
    failed = True
    shard = None
    try:
        shard = shard_from_env()
        if shard is not None and workers is None and reads_stdin and not stdin_is_shared():
            raise UsageError("several processes (accelerate/torchrun) read the same records: give input files, "
                             "or use --num-processes, which shares stdin")
        result = _run_eval(files, stats, options, shard, model=model, adapter=adapter, dtype=dtype, device=device,
                           limit=limit, skip_invalid=skip_invalid, output=output, force_resume=force_resume,
                           backend=backend)
        failed = False
        return result
    finally:
        if workers is not None:
            workers.close(failed)
        if shard is not None:
            shard.close()


def _note_dtype(dtype: str, device: str, main: bool) -> None:
    """bfloat16 is a choice of speed over exactness: say what it costs here (it is slow on CPUs without AMX or
    AVX512-BF16, where torch emulates it)."""
    from probllm.io import log
    from probllm.models import cpu_has_fast_bf16

    if not main or dtype not in ("bfloat16", "float16"):
        return
    if device.startswith("cpu") and dtype == "bfloat16" and not cpu_has_fast_bf16():
        log("probllm eval: note: this CPU has no AMX/AVX512-BF16, so bfloat16 runs slower than float32 here")
    else:
        log(f"probllm eval: note: {dtype} weights: log-likelihoods differ from float32 "
            "in the 2nd-3rd decimal, so near-tied predictions can change (log-softmax is still taken in float32)")


def eval_provenance(options: EvalOptions, *, model: str | None, adapter: str | None, dtype: str, device: str,
                    backend=None) -> dict:
    """What decides an `eval` prediction: the model's identity and the settings that change scores or answers
    (not the batch size, the device or the number of processes, which only change how fast). Written in every
    prediction record; a resume of `-o FILE` requires the same."""
    import hashlib
    import json

    from probllm.models import device_name, endpoint_identity, model_identity, resolve_dtype

    if backend is not None and not backend.spec.local:
        prov = endpoint_identity(backend.base_url, backend.model or "").as_dict()
    else:
        prov = {**model_identity(model, adapter).as_dict(),
                "dtype": str(resolve_dtype(dtype, device_name(device))).replace("torch.", "")}
    prov.update(method=options.method, template=options.template, shots=options.shots,
                chat_template=options.chat_template, context=options.context_field)
    if options.context_field:
        prov["max_passages"] = options.max_passages
    if options.method == "generate":
        prov["max_new_tokens"] = options.max_new_tokens
    if options.shots:  # the examples themselves: another --dev file is another prompt
        dev = json.dumps([[d.question, d.choices, d.gold, d.subject] for d in options.dev], ensure_ascii=False)
        prov["dev"] = "sha256:" + hashlib.sha256(dev.encode()).hexdigest()[:16]
    return prov


def _run_eval(files, stats: Stats, options: EvalOptions, shard, *, model, adapter, dtype, device, limit,
              skip_invalid, output, force_resume=False, backend=None) -> dict:
    from probllm.evaluate.output import ResumableOutput
    from probllm.io import UsageError, log, progress, read_records, write_records
    from probllm.models import model_label
    from probllm.provenance import stamp

    main = shard is None or shard.is_main
    records = read_records(files, stats, skip_invalid)
    if shard is None:
        # The first record is read before the model is looked at: input that is not JSON lines (another file, a
        # garbled pipe) is an error in a second, not after the load. (Not with several processes: they share
        # the input.)
        first = next(records, None)
        if first is not None:
            records = chain([first], records)
    if shard is not None and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{shard.local_rank}"  # one GPU per process, as accelerate/torchrun lay them out
    summary = Summary()
    provenance = eval_provenance(options, model=model, adapter=adapter, dtype=dtype, device=device, backend=backend)
    resume = None
    if output is not None:
        # Process 0 reads (and repairs) the file and checks who wrote it; every process skips the same records
        # (so shards stay aligned) and stops on a refusal (so none waits for the others forever).
        resume = ResumableOutput(output) if main else None
        refusal = resume.refusal(provenance, force_resume) if main else None
        if shard is not None:
            done, refusal = shard.broadcast((resume.done, refusal) if main else None)
            resume = resume or ResumableOutput(output, done=done)
        if refusal:
            raise UsageError(refusal)
        for rec in resume.existing() if main else []:
            try:
                summary.add(rec, parse_item(rec, options.context_field, options.max_passages))
                summary.prior += 1
            except (RecordError, KeyError):
                pass  # not a prediction of this input: left in the file, counted nowhere
    t0 = time.perf_counter()
    if backend is not None and not backend.spec.local:
        from probllm.lm import make_backend

        if options.chat_template and options.method != "generate":
            raise UsageError(f"--chat-template with --method {options.method} and --backend {backend.backend}: a "
                             "server applies its template to chats only; score plain prompts, or use --method "
                             "generate")
        backend.no_cache = True  # scores are cheap to ask again and must reflect the model served now
        scorer = MCQScorer(make_backend(backend), backend.model or "")
        described = {"model": backend.model, "model_id": provenance["model_id"], "backend": backend.backend,
                     "base_url": backend.base_url}
    else:
        from probllm.lm.hf_backend import HFLM

        lm = HFLM(model, adapter=adapter, dtype=dtype, device=device).load()
        hardware = lm.describe()
        if options.chat_template and not hardware["chat_template"]:
            raise UsageError("--chat-template: this model's tokenizer has no chat template")
        scorer = MCQScorer(lm)
        _note_dtype(hardware["dtype"], hardware["device"], main)
        described = {"model": model_label(model), "model_id": provenance["model_id"], "adapter": adapter,
                     "dtype": hardware["dtype"], "device": hardware["device"], "threads": hardware["threads"],
                     "processes": shard.world if shard else 1}
    load_s = time.perf_counter() - t0
    summary.started = time.perf_counter()
    if limit is not None:
        records = islice(records, limit)
    if resume is not None:
        records = resume.skip_done(records, stats)
    try:
        with progress("eval") as advance:
            predictions = stamp(evaluate_records(records, scorer, options, stats, summary, skip_invalid,
                                                 advance if main else None, shard=shard), provenance)
            if not main:
                for _ in predictions:  # other processes score their share; process 0 writes
                    pass
            elif resume is not None:
                resume.append(predictions, stats)
                resume.finish()
            else:
                write_records(predictions, stats)
    finally:
        scorer.close()

    result = summary.as_dict(
        **described, method=options.method, template=options.template, shots=options.shots,
        chat_template=options.chat_template, context=options.context_field, batch_size=options.batch_size,
        load_seconds=round(load_s, 3),
    )
    if main:
        log(summary.table(result))
        log(f"probllm eval: {result['items']} items in {result['seconds']:.1f} s ({result['items_per_s']} items/s), "
            f"model loaded in {load_s:.1f} s")
        stats.figures.update(result)
    return result
