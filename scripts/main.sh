#!/usr/bin/env bash
# The main job: sets up .venv on first use (see _env.sh), trains configs/quickstart.yaml (STEM
# with TIM on the synthetic ads world) into a fresh run directory under runs/, then writes the
# analysis report of that run. Extra arguments go to `hmoe train` (e.g. --train.epochs=1).
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
"$PY" -m hmoe.info
RUN="${HMOE_RUN_DIR:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}"
"$PY" -m hmoe train --config quickstart --out "$RUN" "$@"  # the shipped configs/quickstart.yaml
"$PY" -m hmoe analyze "$RUN"
echo "run directory: $RUN (open $RUN/report/report.html)"
