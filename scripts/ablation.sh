#!/usr/bin/env bash
# The report's ablation (method.md sections 5-7) on public MCQA items: base, +DPO (the all-data adapter of
# `make experiment`), the DPO model at 8 and 4 bits, as GGUF q4_0 (llama.cpp's format, read back by transformers'
# GGUF loader) and +RAG over course notes, all scored by `probllm eval` on the same items; `probllm report` gives
# accuracies with standard errors and every row's paired difference to base (bootstrap 95% interval, McNemar's
# exact p). Writes $OUT/ablation/ablation.md and copies the page to $RESULTS when it is set (`make ablation`
# sets docs/results).
#
#   make ablation                              # after `make experiment`: CPU, the offline SmolLM2, every item
#   make ablation MODEL=deepseek-ai/deepseek-math-7b-rl QUANT8=bnb-int8 QUANT4=bnb-nf4   # on a GPU
#
# Resumable: each finished stage leaves a stamp in $DIR/.done and is skipped when run again; an interrupted
# `eval` continues its prediction file (`eval -o`, which refuses a file made by another model or settings).
# Settings and the inputs' checksums go to $DIR/settings.txt once; running again with others is refused.
#
# Inputs (env; defaults: the public slices in $PUBLIC, ../shared/examples):
#   MMLU (MMLU test CSVs), ARC (ARC JSONL files, set from the file name), GSM8K, MATH (folders or files),
#   NOTES (course notes for +RAG, space-separated; default: the open textbook chapters of examples/course-notes on
#   astronomy, biology, chemistry and physics, and the CS231n notes), ADAPTER (default $OUT/experiment/all-data).
# Options: LIMIT (items per source, default all), QUANT8 / QUANT4 (quantize methods; CPU default torch-int8 and
#   bnb-nf4; empty: no such row), GGUF (default gguf-q4_0; empty: no GGUF row), PASSAGES (retrieved passages per question, default 1: each one
#   makes a prompt about 200 tokens longer, which on CPU is most of the run).
set -euo pipefail
PROBLLM="${PROBLLM:-.venv/bin/python -m probllm}"
PY="${PY:-${PROBLLM% -m probllm}}"
OUT="${OUT:-runs/demo}"
SEED="${SEED:-0}"
MODEL="${MODEL:-}"
PUBLIC="${PUBLIC:-../shared/examples}"
MMLU="${MMLU-$PUBLIC/mmlu/test}"
ARC="${ARC-$PUBLIC/arc/ARC-Easy-Dev.jsonl $PUBLIC/arc/ARC-Challenge-Dev.jsonl $PUBLIC/arc/ARC-Challenge-test-hf-first20.jsonl}"
GSM8K="${GSM8K-$PUBLIC/gsm8k/test-first25.jsonl}"
MATH="${MATH-$PUBLIC/math/test}"
NOTES="${NOTES-examples/course-notes/astronomy examples/course-notes/biology examples/course-notes/chemistry examples/course-notes/physics $PUBLIC/corpus/cs231n}"
ADAPTER="${ADAPTER:-$OUT/experiment/all-data}"
LIMIT="${LIMIT:-0}"
if [ -z "$MODEL" ]; then QUANT8="${QUANT8-torch-int8}"; else QUANT8="${QUANT8-bnb-int8}"; fi
QUANT4="${QUANT4-bnb-nf4}"
GGUF="${GGUF-gguf-q4_0}"
PASSAGES="${PASSAGES:-1}"
RESULTS="${RESULTS:-}"
DIR="$OUT/ablation"

for f in $MMLU $ARC $GSM8K $MATH $NOTES; do
  if [ ! -e "$f" ]; then
    echo "ablation: $f is missing (the public slices live in ../shared/examples; set PUBLIC=DIR or MMLU/ARC/GSM8K/MATH/NOTES)" >&2
    exit 1
  fi
done
if [ ! -f "$ADAPTER/adapter_config.json" ]; then
  echo "ablation: no adapter in $ADAPTER: run 'make experiment' first (or set ADAPTER=DIR)" >&2
  exit 1
fi
mkdir -p "$DIR/.done"

WHO=ablation RUN_DIR="$DIR"
# shellcheck source=scripts/stages.sh
source "$(dirname "$0")/stages.sh"
check_settings "$(
  echo "model=${MODEL:-default} seed=$SEED limit=$LIMIT quant8=$QUANT8 quant4=$QUANT4 gguf=$GGUF passages=$PASSAGES"
  echo "adapter $ADAPTER $(checksum "$ADAPTER/adapter_model.safetensors" "$ADAPTER/adapter_config.json")"
  for f in $MMLU $ARC $GSM8K $MATH $NOTES; do echo "input $f $(checksum "$f")"; done
)"

model_args=()
if [ -n "$MODEL" ]; then model_args=(--model "$MODEL"); fi
limit_args=()
if [ "$LIMIT" != 0 ]; then limit_args=(--limit "$LIMIT"); fi

# 1. Every item of the public slices as MCQ records (mcqify never drops or changes a benchmark item).
items() {
  local part="$DIR/items.parts" n
  rm -rf "$part"; mkdir -p "$part"
  for f in $MMLU; do
    $PROBLLM load "$f" --format mmlu-csv "${limit_args[@]}" | $PROBLLM mcqify --source mmlu >> "$part/mmlu.jsonl"
  done
  for f in $ARC; do
    $PROBLLM mcqify --source arc "${limit_args[@]}" "$f" >> "$part/arc.jsonl"
  done
  for f in $GSM8K; do $PROBLLM mcqify --source gsm8k --seed "$SEED" "${limit_args[@]}" "$f" >> "$part/gsm8k.jsonl"; done
  for f in $MATH; do $PROBLLM mcqify --source math --seed "$SEED" "${limit_args[@]}" "$f" >> "$part/math.jsonl"; done
  cat "$part"/mmlu.jsonl "$part"/arc.jsonl "$part"/gsm8k.jsonl "$part"/math.jsonl > "$DIR/mcq.jsonl"
  {
    printf '{'
    sep=""
    for s in mmlu arc gsm8k math; do n=$(wc -l < "$part/$s.jsonl"); printf '%s"%s": %d' "$sep" "$s" "$n"; sep=", "; done
    printf '}\n'
  } > "$DIR/items.json"
  rm -rf "$part"
}
stage items items

evaluate() {  # evaluate NAME [eval options...]: predictions in $DIR/NAME.preds.jsonl (resumable), summary NAME.json
  local name="$1"; shift
  $PROBLLM eval "$DIR/mcq.jsonl" -o "$DIR/$name.preds.jsonl" --summary "$DIR/$name.json" "$@"
}
rows=()
stage eval-base evaluate base "${model_args[@]}"
rows+=("base=$DIR/base.json")
stage eval-dpo evaluate dpo "${model_args[@]}" --adapter "$ADAPTER"
rows+=("+DPO=$DIR/dpo.json")

# 2. The DPO model (adapter merged) at lower precision; each `quantize` record says size and method.
for spec in "8-bit:$QUANT8" "4-bit:$QUANT4" "GGUF:$GGUF"; do
  label="${spec%%:*}" method="${spec#*:}"
  if [ -z "$method" ]; then continue; fi
  stage "quantize-$method" $PROBLLM quantize "${model_args[@]}" --adapter "$ADAPTER" --method "$method" \
    --output "$DIR/$method" --no-measure --overwrite --summary "$DIR/$method.quantize.json"
  stage "eval-$method" evaluate "$method" --model "$DIR/$method"
  rows+=("+DPO $label ($method)=$DIR/$method.json")
done

# 3. +RAG: an index of the course notes, the top passages of each question attached, the DPO model reading them.
rag() {
  # shellcheck disable=SC2086
  $PROBLLM index $NOTES --output "$DIR/notes.idx" --seed "$SEED" --summary "$DIR/index.json"
  $PROBLLM retrieve --index "$DIR/notes.idx" --attach --top-k "$PASSAGES" --input "$DIR/mcq.jsonl" \
    --summary "$DIR/retrieve.json" > "$DIR/mcq.context.jsonl"
}
stage rag-index rag
stage eval-rag $PROBLLM eval "$DIR/mcq.context.jsonl" -o "$DIR/rag.preds.jsonl" --summary "$DIR/rag.json" \
  "${model_args[@]}" --adapter "$ADAPTER" --context context --max-passages "$PASSAGES"
rows+=("+DPO +RAG (top $PASSAGES)=$DIR/rag.json")

$PROBLLM report "${rows[@]}" --seed "$SEED" --output "$DIR/ablation.md"
# shellcheck disable=SC2086
$PY scripts/results.py ablation "$DIR" ${RESULTS:+--results "$RESULTS"} --notes $NOTES
