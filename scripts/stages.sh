# Resumable stages for scripts/experiment.sh and scripts/ablation.sh (sourced, not run). The caller sets WHO (its
# name in messages) and RUN_DIR (where settings.txt and the .done/ stamps live).

# checksum PATH...: the first 16 hex digits of the sha256 of every file under PATH, in sorted order.
checksum() { find "$@" -type f -print0 | sort -z | xargs -0 cat | sha256sum | cut -c1-16; }

# check_settings TEXT: the run's identity, written once; running again with other settings is refused, never mixed.
check_settings() {
  if [ -f "$RUN_DIR/settings.txt" ]; then
    if [ "$(cat "$RUN_DIR/settings.txt")" != "$1" ]; then
      echo "$WHO: $RUN_DIR was started with other settings or inputs; remove it or set another OUT. The difference:" >&2
      diff <(cat "$RUN_DIR/settings.txt") <(echo "$1") >&2 || true
      exit 1
    fi
  else
    echo "$1" > "$RUN_DIR/settings.txt"
  fi
}

# stage NAME COMMAND...: run once; the stamp holds the stage's wall seconds.
stage() {
  local name="$1"; shift
  if [ -f "$RUN_DIR/.done/$name" ]; then
    echo "$WHO: stage $name already done ($(cat "$RUN_DIR/.done/$name") s), skipped" >&2
    return
  fi
  echo "$WHO: stage $name" >&2
  local start; start=$(date +%s)
  "$@"
  echo $(( $(date +%s) - start )) > "$RUN_DIR/.done/$name"
}
