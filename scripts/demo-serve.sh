#!/usr/bin/env bash
# Demo of `probllm serve`: the course assistant (the offline model + the notes index from demo-rag) as an
# OpenAI-compatible server on 127.0.0.1, started in the background, used by one command through the openai
# backend (the server retrieves and sends back its sources), then stopped. Writes $OUT/serve.log and
# $OUT/serve.answer.txt.
set -euo pipefail

PROBLLM="${PROBLLM:-.venv/bin/python -m probllm}"
OUT="${OUT:-runs/demo}"
SEED="${SEED:-0}"
MODEL="${MODEL:-}"
MODEL_ARGS=()
if [ -n "$MODEL" ]; then MODEL_ARGS=(--model "$MODEL"); fi
mkdir -p "$OUT"
if [ ! -d "$OUT/notes.idx" ]; then
  $PROBLLM index examples/notes --out "$OUT/notes.idx" --seed "$SEED"
fi

# --port 0: any free port (the URL is printed on stderr, which goes to the log).
$PROBLLM serve --index "$OUT/notes.idx" "${MODEL_ARGS[@]}" --port 0 --served-model-name assistant \
  2> "$OUT/serve.log" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT

URL=""
for _ in $(seq 1 240); do
  URL=$(grep -o 'http://[^ ;]*/v1' "$OUT/serve.log" | head -n 1 || true)
  if [ -n "$URL" ]; then break; fi
  if ! kill -0 $SERVER 2>/dev/null; then cat "$OUT/serve.log" >&2; exit 1; fi
  sleep 0.5
done
if [ -z "$URL" ]; then echo "demo-serve: the server did not start" >&2; cat "$OUT/serve.log" >&2; exit 1; fi
echo "== probllm serve is up at $URL (chat page: ${URL%/v1}/) ==" >&2

echo "== ask through the server (it retrieves from the notes and returns its sources) ==" >&2
$PROBLLM ask "What is the worst-case running time of heapsort, and why?" --backend openai --base-url "$URL" \
  --model assistant --max-new-tokens 64 | tee "$OUT/serve.answer.txt"

kill -TERM $SERVER
wait $SERVER
trap - EXIT
echo "demo-serve: stopped. To chat in the browser, run \`bin/probllm serve --index $OUT/notes.idx\` and open" \
  "http://127.0.0.1:8000/" >&2
