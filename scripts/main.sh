#!/usr/bin/env bash
# The main job: sets up .venv on first use (see _env.sh), then runs the demo.
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
"$PY" -m hmoe.info
"$PY" examples/multi_embedding_demo.py "$@"
