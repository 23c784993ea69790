#!/usr/bin/env bash
# Demo of the train family: DPO+LoRA on the demo pairs (a few dozen steps of the offline SmolLM2 on CPU),
# implicit-reward scoring of the held-out pairs, and the report's 17 training curves.
# Inputs (from demo-data / demo-llm): $OUT/pairs.train.jsonl, $OUT/pairs.test.jsonl, and when present
# $OUT/pairs.extra.jsonl and $OUT/corrupted.jsonl (added to the training side only, as in the report).
set -euo pipefail
PROBLLM="${PROBLLM:-.venv/bin/python -m probllm}"
OUT="${OUT:-runs/demo}"
SEED="${SEED:-0}"
MODEL="${MODEL:-}"
STEPS="${STEPS:-30}"

train=("$OUT/pairs.train.jsonl")
for extra in "$OUT/pairs.extra.jsonl" "$OUT/corrupted.jsonl"; do
  if [ -s "$extra" ]; then train+=("$extra"); fi
done
model_args=()
if [ -n "$MODEL" ]; then model_args=(--model "$MODEL"); fi

# The report's settings, shortened for a CPU: 30 steps, 256 tokens, batch 4, warmup and evaluation scaled down.
# --overwrite: a demo rerun starts again rather than resuming an older run.
$PROBLLM dpo "${train[@]}" --eval "$OUT/pairs.test.jsonl" --output "$OUT/dpo" "${model_args[@]}" \
  --seed "$SEED" --max-steps "$STEPS" --max-length 256 --batch-size 4 --warmup-steps 3 \
  --eval-steps 10 --logging-steps 2 --save-steps 10 --overwrite > "$OUT/dpo.summary.json"

# Test reward accuracy, measured like the report's: rewards of the held-out pairs under the adapter.
$PROBLLM reward-eval "$OUT/pairs.test.jsonl" --adapter "$OUT/dpo" --summary "$OUT/dpo.test-rewards.json" \
  > "$OUT/pairs.test.rewards.jsonl"

$PROBLLM plot "$OUT/dpo" --output "$OUT/plots"
echo "demo-dpo: adapter in $OUT/dpo, curves in $OUT/plots/index.md" >&2
