"""Commands of the data family: load, pair-annotated, pair-stackexchange, mcqify, split (logic in probllm/data)."""

from __future__ import annotations

import random
from typing import Annotated, Optional

import typer

from probllm.cli.app import InputFiles, Seed, SkipInvalid, SummaryFile, app, command


@app.command("load")
def load_command(
    source: Annotated[str, typer.Argument(help="Hub dataset name, or a local file, folder or glob "
                                          "(json, jsonl, csv, parquet).", show_default=False)],
    config: Annotated[Optional[str], typer.Option("--config", help="Hub dataset configuration (subset).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Split to read; none: every split, each "
                                                 "record tagged with `split`.")] = None,
    streaming: Annotated[bool, typer.Option("--streaming", help="Stream a hub dataset instead of downloading "
                                            "it whole (local files always stream).")] = False,
    fmt: Annotated[str, typer.Option("--format", help="auto (from the extension), json, csv, parquet, or "
                                     "mmlu-csv (header-less question,A,B,C,D,answer; subject from the file "
                                     "name).")] = "auto",
    columns: Annotated[Optional[str], typer.Option("--columns", help="Column names of a header-less CSV, "
                                                   "comma-separated.")] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Hub dataset data_dir.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N records.")] = None,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Read a dataset with the `datasets` library (or a header-less CSV) and write it as JSONL.

        probllm load examples/mmlu --format mmlu-csv | probllm mcqify --source mmlu
        probllm load examples/gsm8k.jsonl --limit 5
        probllm load allenai/ai2_arc --config ARC-Easy --split test --streaming
    """
    from probllm.cli.app import fail
    from probllm.data.load import LoadError, load_records
    from probllm.io import write_records

    with command("load", summary) as stats:
        cols = [c.strip() for c in columns.split(",")] if columns else None
        records = load_records(source, stats, fmt=fmt, config=config, split=split, streaming=streaming,
                               columns=cols, data_dir=data_dir, limit=limit, skip_invalid=skip_invalid)
        try:
            write_records(records, stats)
        except LoadError as e:
            fail(str(e))


@app.command("pair-annotated")
def pair_annotated_command(
    files: InputFiles = None,
    question_field: Annotated[str, typer.Option("--question-field", help="Field with the question text.")]
    = "question_complete",
    comparisons_field: Annotated[str, typer.Option("--comparisons-field", help="Field with the list of "
                                                   "comparisons.")] = "preference",
    a_field: Annotated[str, typer.Option("--a-field", help="Answer A's field in a comparison.")] = "A",
    b_field: Annotated[str, typer.Option("--b-field", help="Answer B's field in a comparison.")] = "B",
    criteria_field: Annotated[str, typer.Option("--criteria-field", help="Criteria object in a comparison.")]
    = "ranking_criteria",
    overall_key: Annotated[str, typer.Option("--overall-key", help="Criterion that picks the chosen answer.")]
    = "overall",
    correctness_key: Annotated[str, typer.Option("--correctness-key", help="Criterion whose `None` (both "
                                                 "wrong) drops a comparison.")] = "correctness",
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Student-annotated comparisons to preference pairs: chosen = the `overall` winner.

    Drops ties, missing `overall`, and comparisons where `correctness` is `None` (both wrong); counts each
    reason on stderr. Input fields are kept (the comparisons list is replaced by the pair).

        probllm pair-annotated examples/annotated.jsonl | probllm split --part train > pairs.train.jsonl
    """
    from probllm.data.annotated import AnnotatedFields, pairs_from_annotated
    from probllm.io import map_records, read_records, write_records

    fields = AnnotatedFields(question=question_field, comparisons=comparisons_field, a=a_field, b=b_field,
                             criteria=criteria_field, overall=overall_key, correctness=correctness_key)
    with command("pair-annotated", summary) as stats:
        records = read_records(files, stats, skip_invalid)
        write_records(map_records(records, lambda r: pairs_from_annotated(r, stats, fields), stats, skip_invalid),
                      stats)


@app.command("pair-stackexchange")
def pair_stackexchange_command(
    files: InputFiles = None,
    chosen_min: Annotated[int, typer.Option("--chosen-min", help="Lowest pm_score of the chosen (best) "
                                            "answer.")] = 10,
    rejected_min: Annotated[int, typer.Option("--rejected-min", help="Lowest pm_score of a rejected answer.")]
    = 3,
    rejected_max: Annotated[int, typer.Option("--rejected-max", help="Highest pm_score of a rejected answer.")]
    = 5,
    sites: Annotated[Optional[str], typer.Option("--sites", help="Keep only these sites (comma-separated: "
                                                 "`stackoverflow,math,physics` or full hosts).")] = None,
    site: Annotated[Optional[str], typer.Option("--site", help="Posts.xml: the dump's site (default: its "
                                                "folder name, e.g. math.stackexchange.com).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto (Posts.xml by the .xml/.xml.gz name, else HF JSONL), "
                                     "hf, or posts-xml (e.g. a dump piped on stdin).")] = "auto",
    html: Annotated[bool, typer.Option("--html", help="Keep the HTML instead of converting to markdown.")]
    = False,
    seed: Seed = 0,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Stack Exchange answers to preference pairs (the report's pm_score rule).

    Reads HuggingFaceH4/stack-exchange-preferences JSONL records, or raw dump files (`Posts.xml`, `.xml.gz`;
    read twice with a small on-disk state, so memory stays flat). chosen = the highest pm_score if >=
    `--chosen-min`; rejected = one answer (seeded pick) scored within `--rejected-min`..`--rejected-max`.
    HTML becomes markdown with code blocks and LaTeX kept.

        probllm pair-stackexchange --sites stackoverflow,math examples/stackexchange.jsonl
        probllm pair-stackexchange --chosen-min 3 --rejected-min 0 --rejected-max 2 examples/Posts.xml
        gzip -dc Posts.xml.gz | probllm pair-stackexchange --format posts-xml --site physics.stackexchange.com
    """
    from probllm.data.stackexchange import PairRule, is_posts_xml, pair_from_hf, pairs_from_posts_xml, \
        parse_sites
    from probllm.io import UsageError, map_records, read_records, write_records

    with command("pair-stackexchange", summary) as stats:
        if fmt not in ("auto", "hf", "posts-xml"):
            raise UsageError("--format must be auto, hf or posts-xml")
        rule = PairRule(chosen_min=chosen_min, rejected_min=rejected_min, rejected_max=rejected_max,
                        sites=parse_sites(sites), markdown=not html)
        rng = random.Random(seed)
        paths = list(files or ["-"])
        for path in paths:
            if fmt == "posts-xml" or (fmt == "auto" and is_posts_xml(path)):
                write_records(pairs_from_posts_xml(path, rule, rng, stats, site=site, skip_invalid=skip_invalid),
                              stats)
            else:
                records = read_records([path], stats, skip_invalid)
                write_records(map_records(records, lambda r: pair_from_hf(r, rule, rng), stats, skip_invalid),
                              stats)


@app.command("mcqify")
def mcqify_command(
    files: InputFiles = None,
    source: Annotated[str, typer.Option("--source", help="gsm8k, math, arc, mmlu, or auto (per record, from "
                                        "its fields).")] = "auto",
    subjects: Annotated[Optional[str], typer.Option("--subjects", help="MMLU: `report` (the 23 subjects of "
                                                    "the report), or a comma list; default: all.")] = None,
    arc_set: Annotated[Optional[str], typer.Option("--arc-set", help="ARC: easy or challenge (default: from "
                                                   "the file name).")] = None,
    seed: Seed = 0,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """GSM8K, MATH, ARC and MMLU items to MCQ records (`question`, `choices`, `answer` letter, `source`,
    `subject`, `id`).

    GSM8K and MATH get three numeric distractors and a seeded shuffle; ARC and MMLU are normalised (labels to
    letters, true number of ARC choices kept). MMLU header-less CSV files and folders are read directly.

        probllm mcqify --source gsm8k examples/gsm8k.jsonl
        probllm mcqify --source mmlu --subjects report examples/mmlu/
        probllm load examples/arc.jsonl | probllm mcqify --source arc --arc-set easy
    """
    from probllm.data.load import read_inputs
    from probllm.data.mcq import SOURCES, converter, parse_subjects
    from probllm.io import UsageError, log, map_records, write_records

    with command("mcqify", summary) as stats:
        if source not in SOURCES:
            raise UsageError(f"--source must be one of {', '.join(SOURCES)}")
        if arc_set not in (None, "easy", "challenge"):
            raise UsageError("--arc-set must be easy or challenge")
        rng = random.Random(seed)
        convert = converter(source, rng, parse_subjects(subjects), arc_set)
        reported = [0]

        def convert_and_report(record):
            from probllm.io import Skip

            try:
                return convert(record)
            except Skip as s:
                # MATH answers without a number cannot be made into options: name the first few.
                if s.reason.startswith("math:") and reported[0] < 10:
                    reported[0] += 1
                    where = f"{getattr(record, 'source', '?')}:{getattr(record, 'line', '?')}"
                    log(f"probllm mcqify: {where}: {s.reason.removeprefix('math: ')}: "
                        f"{str(record.get('solution', ''))[-60:]!r}")
                raise

        records = read_inputs(files, stats, skip_invalid)
        write_records(map_records(records, convert_and_report, stats, skip_invalid), stats)


@app.command("split")
def split_command(
    files: InputFiles = None,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Share of keys in the test part.")]
    = 0.2,
    part: Annotated[str, typer.Option("--part", help="train or test.")] = "train",
    key: Annotated[Optional[str], typer.Option("--key", help="Field hashed to decide the side (default: "
                                               "prompt, else question, problem, id).")] = None,
    seed: Seed = 0,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Deterministic train/test split by a hash of (seed, key): two runs give complementary parts.

    All records with the same key (e.g. every pair of one question) land on the same side; it streams.

        probllm pair-annotated examples/annotated.jsonl | probllm split --part test --test-fraction 0.2
    """
    from probllm.data.split import Splitter
    from probllm.io import map_records, read_records, write_records

    with command("split", summary) as stats:
        splitter = Splitter(test_fraction, part, seed, key)
        records = read_records(files, stats, skip_invalid)
        write_records(map_records(records, splitter, stats, skip_invalid), stats)
