#!/usr/bin/env bash
# CI: test the installed artifact, not the checkout. Run after scripts/test.sh (it needs .venv).
#  1. `python -m build` makes the sdist, then a wheel from that sdist (so a file missing from the
#     sdist fails the build), against the torch in .venv (--no-isolation).
#  2. A fresh venv reuses .venv's torch and other dependencies through a .pth file pointing at a
#     view of .venv's site-packages without hmoe (nothing is downloaded); the wheel is installed
#     into it with --no-index.
#  3. From a temporary directory outside the checkout: python -m hmoe.info, an import of every
#     module of the installed package, hmoe train / eval / predict / analyze on a tiny synthetic
#     world, hmoe export of that run (with the AOTInductor package) and hmoe serve answering a
#     real HTTP client, the same run trained on 2 ranks (hmoe train --nproc 2) and evaluated,
#     and hmoe train + export on a shipped dataset config named without a path over a few rows
#     of ../shared/data (skipped when the data is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="$ROOT/.venv/bin/python"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
SECONDS=0
step() { echo "-- [${SECONDS}s] $*"; }

step "sdist, then a wheel built from it"
# (run from $WORK: in the root, the build/ folder would shadow the build module)
(cd "$WORK" && MAX_JOBS="${MAX_JOBS:-2}" HMOE_BUILD_CUDA=0 "$PY" -m build --no-isolation \
  --outdir "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1) || { tail -n 60 "$WORK/build.log"; exit 1; }
ls -l "$WORK/dist"
WHEEL="$(ls "$WORK"/dist/hmoe-*.whl)"

step "fresh venv on .venv's dependencies, wheel installed with --no-index"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir "$WORK/base"
for entry in "$SITE"/*; do
  case "$(basename "$entry")" in
    hmoe|hmoe-*|__editable__*|*.pth) ;;  # the checkout's editable hmoe stays out
    *) ln -s "$entry" "$WORK/base/" ;;
  esac
done
python3 -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# the venv's bundled setuptools would shadow .venv's newer one, which torch requires
"$WORK/venv/bin/pip" uninstall -q -y setuptools 2>/dev/null || true
echo "$WORK/base" > "$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_ci_base.pth"
"$WORK/venv/bin/pip" install -q --no-index "$WHEEL[analysis,serve]"
export PATH="$WORK/venv/bin:$PATH"

mkdir "$WORK/cwd"
cd "$WORK/cwd"
step "python -m hmoe.info"
"$VPY" -m hmoe.info
step "import every module of the installed package"
"$VPY" - "$WORK/venv" <<'PY'
import importlib
import pkgutil
import sys

import hmoe
from hmoe.ops import _extension

venv = sys.argv[1]
assert hmoe.__file__.startswith(venv), f"hmoe imported from {hmoe.__file__}, not the wheel"
assert _extension.load_error is None, f"the wheel's hmoe._C does not load: {_extension.load_error}"
names = [m.name for m in pkgutil.walk_packages(hmoe.__path__, "hmoe.")
         if m.name != "hmoe.__main__"]  # the entry point runs the CLI on import
for name in names:
    importlib.import_module(name)
for required in ("hmoe.analysis", "hmoe.configs", "hmoe.kernels", "hmoe.train", "hmoe.data",
                 "hmoe.serving"):
    assert required in names, f"{required} is not in the wheel"
print(f"hmoe {hmoe.__version__}: imported {len(names)} modules from {hmoe.__file__}")
PY
hmoe configs

step "hmoe train / eval / predict / analyze on a tiny synthetic world"
hmoe train --out runs/tiny --data.synthetic.num_rows=4000 --train.epochs=1 --train.max_steps=8 \
  --train.batch_size=256 --train.progress=off
hmoe eval runs/tiny --split valid
hmoe predict runs/tiny --output scores.parquet
"$VPY" -c "import pyarrow.parquet as pq; t = pq.read_table('scores.parquet'); assert t.num_rows > 0, t; print('predict:', t.num_rows, 'rows', t.column_names)"
hmoe analyze runs/tiny
step "hmoe train --nproc 2 (torchrun, TorchRec) and eval of that run"
hmoe train --out runs/two --nproc 2 --data.synthetic.num_rows=4000 --train.epochs=1 \
  --train.max_steps=8 --train.batch_size=256 --train.progress=off
test -f runs/two/results.json
hmoe eval runs/two --split valid
test -s runs/tiny/report/report.html

step "hmoe export (program + AOTInductor package) and hmoe serve with a real client"
hmoe export runs/tiny --out artifact
PORT="$("$VPY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
hmoe serve artifact --port "$PORT" --threads 1 --log-level warning &
SERVER=$!
"$VPY" - "$PORT" <<'PY'
import sys
import time

import httpx
import numpy as np

import hmoe.serving
from hmoe.train.trainer import load_run

url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(240):
    try:
        if httpx.get(f"{url}/health").status_code == 200:
            break
    except httpx.TransportError:
        pass
    time.sleep(0.5)
else:
    raise SystemExit("hmoe serve did not come up")
predictor = hmoe.serving.load("artifact")
assert predictor.mode == "aoti", predictor.mode
columns = {k: v.numpy() for k, v in load_run("runs/tiny").dataset.source("test").tensors.items()}
rows = predictor.encoder.rows(columns, 0, 64)
answer = httpx.post(f"{url}/predict", json={"rows": rows}, timeout=30)
assert answer.status_code == 200, answer.text
served = np.array([[p[t] for t in predictor.tasks] for p in answer.json()["predictions"]])
local = predictor.predict(rows)
assert np.abs(served - np.array([[p[t] for t in predictor.tasks] for p in local])).max() < 1e-6
bad = httpx.post(f"{url}/predict", json={"rows": [dict(rows[0], price="cheap")]})
assert bad.status_code == 422 and "rows[0].price" in bad.json()["error"], bad.text
meta = httpx.get(f"{url}/metadata").json()
print(f"served {len(rows)} rows by model {meta['model_version']} ({meta['mode']}); "
      f"a bad row answered {bad.status_code}: {bad.json()['error']}")
PY
kill -TERM "$SERVER"
wait "$SERVER"

DATA="${HMOE_DATA_DIR:-$ROOT/../shared/data}"
if [ -f "$DATA/avazu_10k/avazu_train_9000.csv" ]; then
  step "hmoe train on the shipped dataset config 'avazu', named without a path"
  head -n 2001 "$DATA/avazu_10k/avazu_train_9000.csv" > avazu_2000.csv
  hmoe train --out runs/avazu --data.source=files --data.dataset=avazu \
    --data.files=avazu_2000.csv --model.preset=dcnv2 --train.epochs=1 --train.max_steps=5 \
    --train.batch_size=256 --train.progress=off
  step "hmoe export of that run (its vocabularies) and a CSV row scored through hmoe.serving"
  hmoe export runs/avazu --out avazu-artifact --no-aoti
  "$VPY" - <<'PY'
import csv

import hmoe.serving

predictor = hmoe.serving.load("avazu-artifact")
known = set(predictor.metadata["columns"]) | set(predictor.metadata["ignored_columns"])
with open("avazu_2000.csv", newline="") as file:  # (the file's "id" column is no feature)
    rows = [{k: v for k, v in row.items() if k in known}
            for _, row in zip(range(5), csv.DictReader(file))]
scores = predictor.predict(rows)
assert len(scores) == 5 and all(0 < s[t] < 1 for s in scores for t in predictor.tasks), scores
print("avazu rows scored from the exported artifact:", scores[:2])
PY
else
  step "skipped hmoe train on a shipped dataset config: no $DATA/avazu_10k"
fi
step "installed-artifact checks passed"
