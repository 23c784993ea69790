#!/usr/bin/env bash
# The report's ablation table (method.md sections 6-7): base, +DPO, the DPO model quantized to 8 and 4 bits,
# and +RAG when a notes index exists, all scored by `probllm eval` on the same MCQ items; markdown from the
# `eval --summary` files via `probllm report`.
# Inputs: $MCQ (default $OUT/mcq.jsonl), $ADAPTER (default $OUT/dpo), $INDEX (default $OUT/notes.idx).
# Options: LIMIT (items, default 200), QUANT8 / QUANT4 (quantize methods, default bnb-int8 / bnb-nf4).
set -euo pipefail
PROBLLM="${PROBLLM:-.venv/bin/python -m probllm}"
OUT="${OUT:-runs/demo}"
SEED="${SEED:-0}"
MODEL="${MODEL:-}"
MCQ="${MCQ:-$OUT/mcq.jsonl}"
ADAPTER="${ADAPTER:-$OUT/dpo}"
INDEX="${INDEX:-$OUT/notes.idx}"
LIMIT="${LIMIT:-200}"
QUANT8="${QUANT8:-bnb-int8}"
QUANT4="${QUANT4:-bnb-nf4}"
DIR="$OUT/ablation"

if [ ! -s "$MCQ" ]; then
  echo "ablation: $MCQ is missing: run 'make demo-data' first (or set MCQ=FILE)" >&2
  exit 1
fi
mkdir -p "$DIR"
model_args=()
if [ -n "$MODEL" ]; then model_args=(--model "$MODEL"); fi

evaluate() {  # evaluate LABEL SUMMARY_NAME [eval options...]
  local label="$1" name="$2"
  shift 2
  $PROBLLM eval "$MCQ" --limit "$LIMIT" --summary "$DIR/$name.json" "$@" > "$DIR/$name.preds.jsonl"
  rows+=("$label=$DIR/$name.json")
}
rows=()
evaluate "base" base "${model_args[@]}"

adapter_args=()
if [ -f "$ADAPTER/adapter_config.json" ]; then
  adapter_args=(--adapter "$ADAPTER")
  evaluate "+DPO" dpo "${model_args[@]}" "${adapter_args[@]}"
else
  echo "ablation: no adapter in $ADAPTER: the +DPO row is left out and the quantized rows use the base model" >&2
fi
prefix=$([ ${#adapter_args[@]} -gt 0 ] && echo "+DPO " || echo "")

# Quantized copies (adapter merged first): each quantize run also prints size, memory and tokens/s.
for spec in "8-bit:$QUANT8" "4-bit:$QUANT4"; do
  label="${spec%%:*}" method="${spec#*:}"
  $PROBLLM quantize "${model_args[@]}" "${adapter_args[@]}" --method "$method" --output "$DIR/$method" \
    --no-measure > "$DIR/$method.quantize.json"
  evaluate "${prefix}${label} ($method)" "$method" --model "$DIR/$method"
done

if [ -e "$INDEX" ]; then
  $PROBLLM retrieve --index "$INDEX" --attach --input "$MCQ" > "$DIR/mcq.context.jsonl"
  MCQ="$DIR/mcq.context.jsonl" evaluate "${prefix}+RAG" rag "${model_args[@]}" "${adapter_args[@]}" --context context
else
  echo "ablation: no index at $INDEX (run 'make demo-rag'): the +RAG row is left out" >&2
fi

$PROBLLM report "${rows[@]}" --output "$DIR/ablation.md"
