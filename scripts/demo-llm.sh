#!/usr/bin/env bash
# Demo of the llm family with the offline model (hf backend): `corrupt` turns a few correct QA pairs into
# preference pairs, `judge` compares two answer sets. Kept small (few records, short answers) so it runs in
# about a minute on 2 CPU cores; the response cache in $OUT makes a second run instant.
set -euo pipefail
PROBLLM="${PROBLLM:-.venv/bin/python -m probllm}"
OUT="${OUT:-runs/demo}"
SEED="${SEED:-0}"
MODEL="${MODEL:-}"
RECORDS="${DEMO_LLM_RECORDS:-4}"
mkdir -p "$OUT"
model_args=()
if [ -n "$MODEL" ]; then model_args=(--model "$MODEL"); fi
cache="$OUT/llm-cache.sqlite"

# Rejected answers by the model (two of REMOVE / SUBSTITUTE / INSERT per record, picked with the seed).
head -n "$RECORDS" examples/qa.jsonl \
  | $PROBLLM corrupt --backend hf "${model_args[@]}" --max-new-tokens 64 --seed "$SEED" --cache "$cache" \
      --summary "$OUT/corrupt.summary.json" > "$OUT/corrupted.jsonl"

# The same recipe without a model, on every example: the baseline.
$PROBLLM corrupt --backend rules --seed "$SEED" examples/qa.jsonl > "$OUT/corrupted.rules.jsonl"

# A vs B, both orders per question. A 135M model does not write "[[A]]" reliably, so the demo scores the
# allowed verdicts instead of generating them (`--verdict-from likelihood`); with an API judge, leave it out.
$PROBLLM judge --backend hf "${model_args[@]}" --verdict-from likelihood \
    --a examples/answers-a.jsonl --b examples/answers-b.jsonl --key id --seed "$SEED" --cache "$cache" \
    --summary "$OUT/judge.summary.json" > "$OUT/verdicts.jsonl"
echo "demo-llm: $OUT/corrupted.jsonl, $OUT/corrupted.rules.jsonl, $OUT/verdicts.jsonl, $OUT/judge.summary.json" >&2
