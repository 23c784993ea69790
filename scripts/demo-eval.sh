#!/usr/bin/env bash
# Demo of the eval family: MCQ accuracy of the offline model before and after DPO on the demo MCQ set
# ($OUT/mcq.jsonl from demo-data; the adapter $OUT/dpo from demo-dpo), then the ablation table.
# A few minutes at most on 2 cores: LIMIT caps the items (default 200; the demo set has about 30).
set -euo pipefail
PROBLLM="${PROBLLM:-.venv/bin/python -m probllm}"
OUT="${OUT:-runs/demo}"
SEED="${SEED:-0}"
MODEL="${MODEL:-}"
LIMIT="${LIMIT:-200}"

MCQ="$OUT/mcq.jsonl"
if [ ! -s "$MCQ" ]; then
  echo "demo-eval: $MCQ is missing: run 'make demo-data' first" >&2
  exit 1
fi
mkdir -p "$OUT/eval"
model_args=()
if [ -n "$MODEL" ]; then model_args=(--model "$MODEL"); fi

# Base model, lm-eval's templates and scoring (loglik: acc and acc_norm), then by letter logits for contrast.
$PROBLLM eval "${model_args[@]}" "$MCQ" --limit "$LIMIT" --summary "$OUT/eval/base.json" > "$OUT/eval/base.preds.jsonl"
$PROBLLM eval "${model_args[@]}" "$MCQ" --limit "$LIMIT" --method letter --summary "$OUT/eval/base-letter.json" \
  > "$OUT/eval/base-letter.preds.jsonl"
rows=("base=$OUT/eval/base.json" "base, by letter=$OUT/eval/base-letter.json")

if [ -f "$OUT/dpo/adapter_config.json" ]; then
  $PROBLLM eval "${model_args[@]}" "$MCQ" --limit "$LIMIT" --adapter "$OUT/dpo" --summary "$OUT/eval/dpo.json" \
    > "$OUT/eval/dpo.preds.jsonl"
  rows+=("+DPO=$OUT/eval/dpo.json")
else
  echo "demo-eval: no adapter in $OUT/dpo (run 'make demo-dpo'): the +DPO row is left out" >&2
fi

echo "## Ablation (demo MCQ set, offline model)" >&2
$PROBLLM report "${rows[@]}" --output "$OUT/eval/ablation.md"
