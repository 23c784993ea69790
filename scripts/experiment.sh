#!/usr/bin/env bash
# The report's Table 1: DPO on student pairs only vs on all data, same settings, same 80/20 split of the student
# pairs (the extra sources go to the training side only). Prints a markdown table of eval loss, train reward
# accuracy and test reward accuracy, and writes it to $OUT/experiment/table.md.
#
#   make experiment                                   # CPU: offline SmolLM2, the demo data, a few dozen steps
#   make experiment MODEL=deepseek-ai/deepseek-math-7b-rl STEPS=2000   # the report's run, on a GPU
#
# Env: OUT (demo-data outputs: pairs.annotated.jsonl or pairs.train/test.jsonl, pairs.extra.jsonl,
# corrupted.jsonl), MODEL (empty: default), STEPS (default 30 on CPU; 2000 is the report's), SEED,
# DPO_ARGS (extra `probllm dpo` flags, e.g. "--max-length 256 --batch-size 4").
set -euo pipefail
PROBLLM="${PROBLLM:-.venv/bin/python -m probllm}"
OUT="${OUT:-runs/demo}"
SEED="${SEED:-0}"
MODEL="${MODEL:-}"
STEPS="${STEPS:-30}"
EXP="$OUT/experiment"
mkdir -p "$EXP"

if [ -z "${DPO_ARGS+x}" ]; then
  if [ -z "$MODEL" ]; then
    DPO_ARGS="--max-length 256 --batch-size 4 --warmup-steps 3 --eval-steps 10 --logging-steps 2 --save-steps 10"
  else
    DPO_ARGS=""   # the report's defaults
  fi
fi

# 1. One uniformly random 80/20 split of the student pairs (by question, so no question is on both sides).
if [ -s "$OUT/pairs.annotated.jsonl" ]; then
  $PROBLLM split --part train --test-fraction 0.2 --seed "$SEED" "$OUT/pairs.annotated.jsonl" > "$EXP/student.train.jsonl"
  $PROBLLM split --part test --test-fraction 0.2 --seed "$SEED" "$OUT/pairs.annotated.jsonl" > "$EXP/student.test.jsonl"
else  # demo-data already split them
  cp "$OUT/pairs.train.jsonl" "$EXP/student.train.jsonl"
  cp "$OUT/pairs.test.jsonl" "$EXP/student.test.jsonl"
fi
all=("$EXP/student.train.jsonl")
for extra in "$OUT/pairs.extra.jsonl" "$OUT/corrupted.jsonl"; do
  if [ -s "$extra" ]; then all+=("$extra"); fi
done
model_args=()
if [ -n "$MODEL" ]; then model_args=(--model "$MODEL"); fi

# 2. Two runs with the same settings; only the training data differ.
run() {  # name, training files...
  local name="$1"; shift
  # shellcheck disable=SC2086
  $PROBLLM dpo "$@" --eval "$EXP/student.test.jsonl" --output "$EXP/$name" "${model_args[@]}" --seed "$SEED" \
    --max-steps "$STEPS" --overwrite $DPO_ARGS > "$EXP/$name.summary.json"
  # Train reward accuracy on the student training pairs (the report's column), test on the held-out 20%.
  $PROBLLM reward-eval "$EXP/student.train.jsonl" --adapter "$EXP/$name" --summary "$EXP/$name.train-rewards.json" > /dev/null
  $PROBLLM reward-eval "$EXP/student.test.jsonl" --adapter "$EXP/$name" --summary "$EXP/$name.test-rewards.json" > /dev/null
}
run student-only "$EXP/student.train.jsonl"
run all-data "${all[@]}"

# 3. The table, and the two runs' curves overlaid.
${PY:-${PROBLLM% -m probllm}} - "$EXP" <<'PY' | tee "$EXP/table.md"
import json, sys
from pathlib import Path
exp = Path(sys.argv[1])
print("| model | train pairs | steps | eval loss | train reward acc | test reward acc |")
print("| --- | --- | --- | --- | --- | --- |")
for name, label in (("student-only", "student data only"), ("all-data", "all data")):
    s = json.loads((exp / f"{name}.summary.json").read_text())
    tr = json.loads((exp / f"{name}.train-rewards.json").read_text())
    te = json.loads((exp / f"{name}.test-rewards.json").read_text())
    print(f"| {label} | {s['pairs']} | {s['steps']} | {s['eval']['eval_loss']:.4f} | "
          f"{tr['reward_accuracy']:.4f} | {te['reward_accuracy']:.4f} |")
PY
$PROBLLM plot "$EXP/student-only" "$EXP/all-data" --output "$EXP/plots"
