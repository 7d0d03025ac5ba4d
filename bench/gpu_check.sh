#!/usr/bin/env bash
# One check for a GPU machine, under 8 minutes: the GPU-marked tests, the training-step benchmark
# (ViT-T and ViT-S, SSAT and scratch, eager vs compiled, bf16) with the real-loader efficiency, and
# the loader benchmark for the engines that are installed; then one short table.
#
#   bash bench/gpu_check.sh            # PYTHON=... to pick the interpreter; OUT=... for the logs
#
# Copes with a machine that has torch but not ffcv, DALI or pytest: those parts are skipped and
# the table says so.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NUMBA_THREADING_LAYER=${NUMBA_THREADING_LAYER:-omp}

has() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: no CUDA device visible to $PYTHON; nothing to check" >&2
  exit 1
fi
"$PYTHON" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
HAVE_FFCV=no; has ffcv && HAVE_FFCV=yes
HAVE_DALI=no; has nvidia.dali && HAVE_DALI=yes
echo "gpu_check: ffcv $HAVE_FFCV, DALI $HAVE_DALI, logs in $OUT"

# 1. GPU-marked tests
if has pytest; then
  timeout 240 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
  TESTS=$(grep -E "passed|failed|skipped|error|no tests ran" "$OUT/pytest.log" | tail -1)
else
  TESTS="skipped: pytest not installed"
fi

# 2. loaders (needs ffcv to convert the benchmark JPEGs); keeps the .beton for step 3
LOADERS=()
[ "$HAVE_FFCV" = yes ] && LOADERS+=(ffcv)
[ "$HAVE_DALI" = yes ] && LOADERS+=(dali)
DATA=""
if [ "$HAVE_FFCV" = yes ]; then
  timeout 150 "$PYTHON" bench/loaders.py --images 2048 --repeats 2 --batch_size 256 --crops 1 3 \
    --loaders "${LOADERS[@]}" torch --keep "$OUT/data" 2>&1 | grep -v "it/s" | tee "$OUT/loaders.log"
  DATA=$OUT/data/bench_train.beton
else
  echo "gpu_check: loader benchmark skipped (ffcv is not installed: it converts the benchmark data)" \
    | tee "$OUT/loaders.log"
fi

# 3. training steps, eager vs compiled, and the real loader's efficiency
PIPELINE=none
if [ -n "$DATA" ] && [ -f "$DATA" ]; then PIPELINE=ffcv; fi
timeout 300 "$PYTHON" bench/train_step.py --models vit_tiny vit_small --methods ssat scratch \
  --steps 30 --pipeline "$PIPELINE" --data "${DATA:-none}" --json "$OUT/train_step.json" \
  2>&1 | tee "$OUT/train_step.log"

# 4. the table
"$PYTHON" - "$OUT" "$TESTS" <<'PY'
import json, re, sys
from pathlib import Path
out, tests = Path(sys.argv[1]), sys.argv[2]
rows = [("pytest -m gpu", tests, "")]
targets = {("mae_vit_tiny", "ssat"): 12000, ("vit_small", "scratch"): 8000}
try:
    steps = json.loads((out / "train_step.json").read_text())["rows"]
except (OSError, ValueError):
    steps = []
    rows.append(("train_step.py", "did not finish (see train_step.log)", ""))
for r in steps:
    goal = targets.get((r["model"], r["method"]))
    rows.append((f"{r['model']} {r['method']} img/s eager / compiled",
                 f"{r['eager']:.0f} / {r['compiled']:.0f}", f">= {goal}" if goal else ""))
    if "efficiency" in r:
        rows.append((f"  {r['pipeline']} loader / synthetic", f"{r['efficiency']:.2f}", ">= 0.9"))
loaders = (out / "loaders.log").read_text() if (out / "loaders.log").exists() else ""
for line in loaders.splitlines():
    m = re.match(r"(\S+)\s+(\d)\s+(\d+)\s+(\d+)$", line.strip())
    if m:
        rows.append((f"loader {m[1]}, {m[2]} crop(s): images/s", m[3], ""))
    elif "skipped" in line:
        rows.append(("loader benchmark", line.split(": ", 1)[-1], ""))
width = max(len(r[0]) for r in rows)
print(f"\n| {'check':<{width}} | result | target |\n|{'-' * (width + 2)}|--------|--------|")
for name, value, goal in rows:
    print(f"| {name:<{width}} | {value} | {goal} |")
PY
