#!/usr/bin/env bash
# Demo of the data family on the project's own examples/: preference pairs (student-annotated, split 80/20 by
# question; Stack Exchange from both input formats) and every MCQ source, run as real pipes.
set -euo pipefail
PROBLLM="${PROBLLM:-.venv/bin/python -m probllm}"
OUT="${OUT:-runs/demo}"
SEED="${SEED:-0}"
mkdir -p "$OUT"

# Student-annotated comparisons -> pairs -> one 80/20 split by question (the same hash puts every pair of a
# question on the same side; the two parts are complementary).
$PROBLLM pair-annotated examples/annotated.jsonl > "$OUT/pairs.annotated.jsonl"
$PROBLLM split --part train --test-fraction 0.2 --seed "$SEED" < "$OUT/pairs.annotated.jsonl" > "$OUT/pairs.train.jsonl"
$PROBLLM split --part test --test-fraction 0.2 --seed "$SEED" < "$OUT/pairs.annotated.jsonl" > "$OUT/pairs.test.jsonl"

# Stack Exchange: HF records (science sites only) and a raw Posts.xml dump, with the report's pm_score rule.
{
  $PROBLLM pair-stackexchange --seed "$SEED" --sites stackoverflow,math,physics,cs < examples/stackexchange.jsonl
  $PROBLLM pair-stackexchange --seed "$SEED" --site math.stackexchange.com examples/Posts.xml
} > "$OUT/pairs.extra.jsonl"

# Every MCQ source: MMLU's header-less CSVs through `load`, ARC in both formats, GSM8K and MATH.
{
  $PROBLLM load examples/mmlu --format mmlu-csv | $PROBLLM mcqify --source mmlu --subjects report
  $PROBLLM mcqify --source arc --arc-set easy examples/arc.jsonl
  cat examples/arc-hf.jsonl | $PROBLLM mcqify --source arc --arc-set challenge
  $PROBLLM mcqify --source gsm8k --seed "$SEED" < examples/gsm8k.jsonl
  $PROBLLM mcqify --source math --seed "$SEED" examples/math
} > "$OUT/mcq.jsonl"

wc -l "$OUT/pairs.train.jsonl" "$OUT/pairs.test.jsonl" "$OUT/pairs.extra.jsonl" "$OUT/mcq.jsonl" >&2
