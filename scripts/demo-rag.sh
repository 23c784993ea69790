#!/usr/bin/env bash
# Demo of the rag family: index the example course notes, retrieve, and ask one question with and without them.
# Writes $OUT/notes.idx, $OUT/rag.retrieved.jsonl and $OUT/rag.answer.*.txt (with and without the notes;
# with the DPO adapter too when $OUT/dpo exists).
set -euo pipefail

PROBLLM="${PROBLLM:-.venv/bin/python -m probllm}"
OUT="${OUT:-runs/demo}"
SEED="${SEED:-0}"
MODEL="${MODEL:-}"
MODEL_ARGS=()
if [ -n "$MODEL" ]; then MODEL_ARGS=(--model "$MODEL"); fi
mkdir -p "$OUT"

QUESTION="What is the worst-case running time of heapsort, and why?"

# Incremental: a second `make demo` embeds nothing new (the summary line says so).
$PROBLLM index examples/notes --output "$OUT/notes.idx" --seed "$SEED"

$PROBLLM retrieve --index "$OUT/notes.idx" -k 3 "$QUESTION" > "$OUT/rag.retrieved.jsonl"

echo "== ask with the notes index ==" >&2
$PROBLLM ask "$QUESTION" --index "$OUT/notes.idx" "${MODEL_ARGS[@]}" --seed "$SEED" --max-new-tokens 96 \
  | tee "$OUT/rag.answer.with-notes.txt"

echo "== ask without the index ==" >&2
$PROBLLM ask "$QUESTION" "${MODEL_ARGS[@]}" --seed "$SEED" --max-new-tokens 96 \
  | tee "$OUT/rag.answer.without-notes.txt"

# With the DPO adapter from demo-dpo, when it is there: the report's full helper (+DPO +RAG).
if [ -f "$OUT/dpo/adapter_config.json" ]; then
  echo "== ask with the notes index and the DPO adapter ($OUT/dpo) ==" >&2
  $PROBLLM ask "$QUESTION" --index "$OUT/notes.idx" --adapter "$OUT/dpo" "${MODEL_ARGS[@]}" --seed "$SEED" \
    --max-new-tokens 96 | tee "$OUT/rag.answer.with-notes.dpo.txt"
fi
