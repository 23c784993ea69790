#!/usr/bin/env bash
# The report's Table 1 on public data: DPO on the "student" pairs only vs on all data, same settings, same 80/20
# split of the student pairs (the extra sources go to the training side only), every training record
# decontaminated against the evaluation items first. Writes $OUT/experiment/experiment.md (the table, the data,
# the settings, the machine, the commit and the time of each stage) and the 17 curves of both runs overlaid, and
# copies them to $RESULTS when it is set (`make experiment` sets docs/results).
#
#   make experiment                                   # CPU: offline SmolLM2 on the public slices, 80 steps
#   make experiment MODEL=deepseek-ai/deepseek-math-7b-rl STEPS=2000 DPO_ARGS=   # the report's run, on a GPU
#
# Resumable: each finished stage leaves a stamp in $EXP/.done and is skipped when the script runs again; an
# interrupted training run continues from its last checkpoint (`dpo --resume`). The settings of a run (model,
# steps, seed, flags, the inputs' checksums) are written once to $EXP/settings.txt: running again with other
# settings is refused, never mixed (remove $EXP or choose another OUT).
#
# Inputs (env; defaults: the public slices in $PUBLIC, ../shared/examples):
#   STUDENT  pairs in the students' role: LLaMA-Factory's dpo_en_demo (300 human-preference pairs, ShareGPT form)
#   EXTRA    other pair sources, space-separated: LLM-Dojo's ML pairs (TRL conversational; Stack Exchange's role)
#   QA       QA records corrupted by `corrupt --backend rules` into pairs (the CAMEL role): MMLU dev rows
#   AGAINST  the evaluation items the training data is decontaminated against, space-separated
#   SPLIT_KEY  the field `split` hashes (default: conversations, the ShareGPT prompt)
# Options: MODEL (empty: the offline default), STEPS (default 60), SEED, DPO_ARGS (the CPU flags below),
#   PROMPT_CHARS: pairs whose prompt (every turn before the answer) is longer are left out of every source
#   (default 600 characters, about 150 tokens, so that at --max-length 256 every pair keeps its answers; 0: keep all).
set -euo pipefail
PROBLLM="${PROBLLM:-.venv/bin/python -m probllm}"
PY="${PY:-${PROBLLM% -m probllm}}"
OUT="${OUT:-runs/demo}"
SEED="${SEED:-0}"
MODEL="${MODEL:-}"
STEPS="${STEPS:-60}"
PROMPT_CHARS="${PROMPT_CHARS:-600}"
PUBLIC="${PUBLIC:-../shared/examples}"
STUDENT="${STUDENT:-$PUBLIC/preference/dpo_en_demo.json}"
EXTRA="${EXTRA-$PUBLIC/preference/llm_dojo_rlhf.jsonl}"
QA="${QA-$PUBLIC/mmlu/dev}"
AGAINST="${AGAINST-$PUBLIC/mmlu/test $PUBLIC/arc $PUBLIC/gsm8k $PUBLIC/math/test}"
SPLIT_KEY="${SPLIT_KEY:-conversations}"
RESULTS="${RESULTS:-}"
EXP="$OUT/experiment"

if [ -z "${DPO_ARGS+x}" ]; then
  if [ -z "$MODEL" ]; then
    # CPU scale (about 20 s a step on 2 cores): the report's LoRA, beta, lr and schedule, shorter sequences and
    # batches, 5% warmup, an evaluation every 10 steps; reference log-probs computed once.
    DPO_ARGS="--max-length 256 --batch-size 4 --eval-batch-size 8 --warmup-steps 3 --eval-steps 10 --logging-steps 2 --save-steps 10 --no-bf16 --precompute-ref"
  else
    DPO_ARGS=""   # the report's defaults
  fi
fi
for f in "$STUDENT" $EXTRA $QA $AGAINST; do
  if [ ! -e "$f" ]; then
    echo "experiment: $f is missing (the public slices live in ../shared/examples; set PUBLIC=DIR or STUDENT/EXTRA/QA/AGAINST)" >&2
    exit 1
  fi
done
mkdir -p "$EXP/.done" "$EXP/data"

# The run's identity: refuse to continue a run made with other settings or other inputs.
WHO=experiment RUN_DIR="$EXP"
# shellcheck source=scripts/stages.sh
source "$(dirname "$0")/stages.sh"
check_settings "$(
  echo "model=${MODEL:-default} steps=$STEPS seed=$SEED split_key=$SPLIT_KEY prompt_chars=$PROMPT_CHARS"
  echo "dpo_args=$DPO_ARGS"
  for f in "$STUDENT" $EXTRA $QA $AGAINST; do echo "input $f $(checksum "$f")"; done
)"

against=()
for a in $AGAINST; do against+=(--against "$a"); done
model_args=()
if [ -n "$MODEL" ]; then model_args=(--model "$MODEL"); fi

# fits NAME ROLE SOURCE: pass the pairs whose prompt (a string, or the text of every message before the answer)
# fits PROMPT_CHARS; the counts of what it leaves out go to stderr and to data/NAME.fits.json (results.py's table).
fits() {
  $PY -c '
import json, sys
limit, name, role, source, out_file = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
def text(v):
    if isinstance(v, str): return v
    if isinstance(v, list): return "".join(m.get("content") or m.get("value") or "" for m in v if isinstance(m, dict))
    return ""
n = out = 0
for line in sys.stdin:
    n += 1
    r = json.loads(line)
    prompt = r.get("prompt", r.get("question", r.get("conversations")))
    if limit == 0 or len(text(prompt)) <= limit:
        out += 1
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
print(f"experiment: {name}: {n} in, {out} out, {n - out} left out (prompt over {limit} characters)", file=sys.stderr)
with open(out_file, "w") as f:
    json.dump({"name": name, "role": role, "source": source, "in": n, "out": out, "limit": limit}, f)
' "$PROMPT_CHARS" "$1" "$2" "$3" "$EXP/data/$1.fits.json"
}

# 1. The training data: every source decontaminated (13-gram overlap with an evaluation item drops a record).
data() {
  local d="$EXP/data"
  $PROBLLM load "$STUDENT" | fits student "student-annotated comparisons" "$(basename "$STUDENT")" | $PROBLLM decontaminate "${against[@]}" --summary "$d/student.decontaminate.json" \
    > "$d/student.jsonl.tmp"
  : > "$d/extra.jsonl.tmp"
  for f in $EXTRA; do
    $PROBLLM load "$f" | fits "extra.$(basename "$f")" "other preference sources" "$(basename "$f")" | $PROBLLM decontaminate "${against[@]}" --summary "$d/extra.$(basename "$f").decontaminate.json" \
      >> "$d/extra.jsonl.tmp"
  done
  : > "$d/corrupted.jsonl.tmp"
  for f in $QA; do
    # MMLU rows become QA records (the question and the text of its right option); other QA files pass as they are.
    if [ -d "$f" ] || [[ "$f" == *.csv ]]; then
      $PROBLLM load "$f" --format mmlu-csv | $PY -c '
import json, sys
for n, line in enumerate(sys.stdin, 1):
    r = json.loads(line)
    print(json.dumps({"id": r["subject"] + "/dev/" + str(n), "subject": r["subject"], "question": r["question"],
                      "answer": r[r["answer"]]}))
'
    else
      cat "$f"
    fi | fits "corrupted.$(basename "$f")" "QA answers corrupted by rules" "$(basename "$f")" | $PROBLLM corrupt --backend rules --seed "$SEED" --failed "$d/corrupt.failed.jsonl" \
           --summary "$d/corrupt.$(basename "$f").json" \
       | $PROBLLM decontaminate "${against[@]}" --summary "$d/corrupted.$(basename "$f").decontaminate.json" \
       >> "$d/corrupted.jsonl.tmp"
  done
  for part in student extra corrupted; do mv "$d/$part.jsonl.tmp" "$d/$part.jsonl"; done
}
stage data data

# 2. One uniformly random 80/20 split of the student pairs (by prompt: no prompt on both sides).
split() {
  $PROBLLM split --key "$SPLIT_KEY" --part train --test-fraction 0.2 --seed "$SEED" "$EXP/data/student.jsonl" \
    > "$EXP/student.train.jsonl"
  $PROBLLM split --key "$SPLIT_KEY" --part test --test-fraction 0.2 --seed "$SEED" "$EXP/data/student.jsonl" \
    > "$EXP/student.test.jsonl"
}
stage split split
all=("$EXP/student.train.jsonl")
for extra in "$EXP/data/extra.jsonl" "$EXP/data/corrupted.jsonl"; do
  if [ -s "$extra" ]; then all+=("$extra"); fi
done

# 3. Two runs with the same settings; only the training data differ.
train() {  # name, training files...
  local name="$1"; shift
  local continue=(--overwrite)
  if compgen -G "$EXP/$name/checkpoints/checkpoint-*" > /dev/null; then continue=(--resume); fi
  # shellcheck disable=SC2086
  $PROBLLM dpo "$@" --eval "$EXP/student.test.jsonl" --output "$EXP/$name" "${model_args[@]}" --seed "$SEED" \
    --max-steps "$STEPS" "${continue[@]}" $DPO_ARGS > "$EXP/$name.summary.json.tmp"
  mv "$EXP/$name.summary.json.tmp" "$EXP/$name.summary.json"
}
rewards() {  # name: train reward accuracy on the student training pairs (the report's column), test on the 20%
  local name="$1"
  $PROBLLM reward-eval "$EXP/student.train.jsonl" --adapter "$EXP/$name" --summary "$EXP/$name.train-rewards.json" > /dev/null
  # Per pair on the test side: results.py pairs the two runs on the same held-out pairs (McNemar, bootstrap).
  $PROBLLM reward-eval "$EXP/student.test.jsonl" --adapter "$EXP/$name" --summary "$EXP/$name.test-rewards.json" \
    > "$EXP/$name.test-rewards.jsonl"
}
stage train-student-only train student-only "$EXP/student.train.jsonl"
stage rewards-student-only rewards student-only
stage train-all-data train all-data "${all[@]}"
stage rewards-all-data rewards all-data

# 4. The curves overlaid, the table and the record of the run (always rebuilt: cheap).
$PROBLLM plot "$EXP/student-only" "$EXP/all-data" --label "student data only" --label "all data" --output "$EXP/plots"
$PY - "$EXP" <<'PY' | tee "$EXP/table.md"
import json, sys
from pathlib import Path
exp = Path(sys.argv[1])
print("| model | train pairs | steps | epochs | eval loss | train reward acc | test reward acc |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name, label in (("student-only", "student data only"), ("all-data", "all data")):
    s = json.loads((exp / f"{name}.summary.json").read_text())
    tr = json.loads((exp / f"{name}.train-rewards.json").read_text())
    te = json.loads((exp / f"{name}.test-rewards.json").read_text())
    print(f"| {label} | {s['pairs']} | {s['steps']} | {s['epochs']:.2f} | {s['eval']['eval_loss']:.4f} | "
          f"{tr['reward_accuracy']:.4f} | {te['reward_accuracy']:.4f} |")
PY
$PY scripts/results.py experiment "$EXP" ${RESULTS:+--results "$RESULTS"}
