"""Commands of the data family: load, pair-annotated, pair-stackexchange, mcqify, split, decontaminate (logic in
probllm/data)."""

from __future__ import annotations

import itertools
import random
from typing import Annotated, Optional

import typer

from probllm.cli.app import InputFiles, Limit, Seed, SkipInvalid, SummaryFile, app, command
from probllm.io import JSON_SUFFIXES
from probllm.cli.choices import ArcSet, LoadFormat, McqSource, Part, PostsFormat, value


@app.command("load")
def load_command(
    sources: Annotated[list[str], typer.Argument(help="Hub dataset names, local files, folders or globs (json, "
                                                "jsonl, csv, parquet; quoted or not), or '-' for JSON records "
                                                "on stdin; several are read in turn.", show_default=False,
                                                metavar="SOURCE...")],
    config: Annotated[Optional[str], typer.Option("--config", help="Hub dataset configuration (subset).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Split to read; none: every split, each "
                                                 "record tagged with `split`.")] = None,
    streaming: Annotated[bool, typer.Option("--streaming", help="Stream a hub dataset instead of downloading "
                                            "it whole (local files always stream).")] = False,
    fmt: Annotated[LoadFormat, typer.Option("--format", help="auto: from the extension; mmlu-csv: header-less "
                                            "question,A,B,C,D,answer, subject from the file name.")]
    = LoadFormat.auto,
    columns: Annotated[Optional[str], typer.Option("--columns", help="Column names of a header-less CSV, "
                                                   "comma-separated.")] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Hub dataset data_dir.")] = None,
    limit: Limit = None,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Read a dataset with the `datasets` library (or a header-less CSV) and write it as JSONL.

        probllm load examples/mmlu --format mmlu-csv | probllm mcqify --source mmlu
        probllm load examples/gsm8k.jsonl --limit 5
        probllm load 'examples/*.jsonl' ~/data/extra.jsonl.gz
        probllm load allenai/ai2_arc --config ARC-Easy --split test --streaming
    """
    from probllm.cli.app import fail
    from probllm.data.load import LoadError, load_records
    from probllm.io import write_records

    with command("load", summary) as stats:
        cols = [c.strip() for c in columns.split(",")] if columns else None
        records = load_records(sources, stats, fmt=value(fmt), config=config, split=split, streaming=streaming,
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
    limit: Limit = None,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Student-annotated comparisons to preference pairs: chosen = the `overall` winner.

    Drops ties, missing `overall`, and comparisons where `correctness` is `None` (both wrong); counts each
    reason on stderr. Input fields are kept (the comparisons list is replaced by the pair).

        probllm pair-annotated examples/annotated.jsonl \\
            | probllm split --part train > pairs.train.jsonl
    """
    from probllm.data.annotated import AnnotatedFields, pairs_from_annotated
    from probllm.io import map_records, read_records, write_records

    fields = AnnotatedFields(question=question_field, comparisons=comparisons_field, a=a_field, b=b_field,
                             criteria=criteria_field, overall=overall_key, correctness=correctness_key)
    with command("pair-annotated", summary) as stats:
        records = read_records(files, stats, skip_invalid, limit=limit)
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
    fmt: Annotated[PostsFormat, typer.Option("--format", help="auto: Posts.xml by the .xml/.xml.gz name, else HF "
                                             "JSONL; posts-xml: e.g. a dump piped on stdin.")] = PostsFormat.auto,
    html: Annotated[bool, typer.Option("--html", help="Keep the HTML instead of converting to markdown.")]
    = False,
    seed: Seed = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N input records (Posts.xml: the "
                                                 "first N pairs).", show_default=False, min=0)] = None,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Stack Exchange answers to preference pairs (the report's pm_score rule).

    Reads HuggingFaceH4/stack-exchange-preferences JSONL records, or raw dump files (`Posts.xml`, `.xml.gz`;
    read twice with a small on-disk state, so memory stays flat). chosen = the highest pm_score if >=
    `--chosen-min`; rejected = one answer (seeded pick) scored within `--rejected-min`..`--rejected-max`.
    HTML becomes markdown with code blocks and LaTeX kept.

        probllm pair-stackexchange --sites math examples/stackexchange.jsonl
        probllm pair-stackexchange --chosen-min 3 --rejected-min 0 \\
            --rejected-max 2 examples/Posts.xml
        gzip -dc Posts.xml.gz \\
            | probllm pair-stackexchange --format posts-xml \\
                --site physics.stackexchange.com
    """
    from probllm.data.stackexchange import PairRule, is_posts_xml, pair_from_hf, pairs_from_posts_xml, \
        parse_sites
    from probllm.io import expand_paths, map_records, read_records, write_records

    fmt = value(fmt)
    with command("pair-stackexchange", summary) as stats:
        rule = PairRule(chosen_min=chosen_min, rejected_min=rejected_min, rejected_max=rejected_max,
                        sites=parse_sites(sites), markdown=not html)
        rng = random.Random(seed)
        paths = list(expand_paths(files or ["-"], suffixes=JSON_SUFFIXES + (".xml", ".xml.gz")))
        for path in paths:
            left = None if limit is None else limit - stats.written
            if left is not None and left <= 0:
                break
            if fmt == "posts-xml" or (fmt == "auto" and is_posts_xml(path)):
                pairs = pairs_from_posts_xml(path, rule, rng, stats, site=site, skip_invalid=skip_invalid)
                write_records(itertools.islice(pairs, left), stats)
            else:
                records = read_records([path], stats, skip_invalid, limit=None if limit is None else
                                       limit - stats.read)
                write_records(map_records(records, lambda r: pair_from_hf(r, rule, rng), stats, skip_invalid),
                              stats)


@app.command("mcqify")
def mcqify_command(
    files: InputFiles = None,
    source: Annotated[McqSource, typer.Option("--source", help="Benchmark of the input; auto: per record, from "
                                              "its fields.")] = McqSource.auto,
    subjects: Annotated[Optional[str], typer.Option("--subjects", help="MMLU: `report` (the 23 subjects of "
                                                    "the report), or a comma list; default: all.")] = None,
    arc_set: Annotated[Optional[ArcSet], typer.Option("--arc-set", help="ARC: which set (default: from the file "
                                                      "name).")] = None,
    seed: Seed = 0,
    limit: Limit = None,
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
    from probllm.data.mcq import converter, parse_subjects
    from probllm.io import log, map_records, write_records

    with command("mcqify", summary) as stats:
        rng = random.Random(seed)
        convert = converter(value(source), rng, parse_subjects(subjects), value(arc_set))
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

        records = itertools.islice(read_inputs(files, stats, skip_invalid), limit)
        write_records(map_records(records, convert_and_report, stats, skip_invalid), stats)


@app.command("split")
def split_command(
    files: InputFiles = None,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Share of keys in the test part.")]
    = 0.2,
    part: Annotated[Part, typer.Option("--part", help="Which part to write.")] = Part.train,
    key: Annotated[Optional[str], typer.Option("--key", help="Field hashed to decide the side (default: "
                                               "prompt, else question, problem, id).")] = None,
    seed: Seed = 0,
    limit: Limit = None,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Deterministic train/test split by a hash of (seed, key): two runs give complementary parts.

    All records with the same key (e.g. every pair of one question) land on the same side; it streams.

        probllm pair-annotated examples/annotated.jsonl \\
            | probllm split --part test --test-fraction 0.2
    """
    from probllm.data.split import Splitter
    from probllm.io import map_records, read_records, write_records

    with command("split", summary) as stats:
        splitter = Splitter(test_fraction, value(part), seed, key)
        records = read_records(files, stats, skip_invalid, limit=limit)
        write_records(map_records(records, splitter, stats, skip_invalid), stats)


@app.command("decontaminate")
def decontaminate_command(
    files: InputFiles = None,
    against: Annotated[list[str], typer.Option("--against", help="Benchmark file or folder: MCQ records from "
                                               "`mcqify`, or the raw benchmark (ARC/GSM8K JSONL, MATH JSON, "
                                               "MMLU CSV). Repeat for several.", show_default=False)] = None,
    ngram: Annotated[int, typer.Option("--ngram", help="Words in a shared n-gram that marks contamination "
                                       "(13: lm-eval and GPT-3).", min=1)] = 13,
    flag: Annotated[bool, typer.Option("--flag", help="Keep every record; add `contamination` (benchmark, item "
                                       "id, field, shared n-gram) to those that overlap, instead of dropping "
                                       "them.")] = False,
    fields: Annotated[Optional[list[str]], typer.Option("--field", help="Record field to check (repeat); "
                                                        "default: prompt, question, chosen, rejected, answer, "
                                                        "conversations, messages.", show_default=False)] = None,
    limit: Limit = None,
    summary: SummaryFile = None,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Drop training records (pairs, QA) that share a word 13-gram with a benchmark question and its options.

    Text is lower-cased and stripped of punctuation first, as lm-eval's decontamination does; the count of
    records that overlap each benchmark goes to stderr. Streams.

        probllm decontaminate --against examples/arc.jsonl \\
            --against examples/mmlu examples/stackexchange.jsonl
        probllm mcqify --source gsm8k examples/gsm8k.jsonl > gsm8k-mcq.jsonl
        probllm pair-stackexchange examples/stackexchange.jsonl \\
            | probllm decontaminate --against gsm8k-mcq.jsonl --flag \\
            | jq -c 'select(.contamination)'
    """
    from probllm.data.decontaminate import run_decontaminate

    with command("decontaminate", summary) as stats:
        run_decontaminate(files, stats, against=list(against or []), ngram=ngram, fields=fields, flag=flag,
                          skip_invalid=skip_invalid, limit=limit)
