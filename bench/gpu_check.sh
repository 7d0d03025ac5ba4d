#!/usr/bin/env bash
# One check for a GPU machine, in at most 7 minutes, ending with one table: the GPU-marked tests;
# the training step (ViT-T SSAT, ViT-S and ViT-B scratch; eager and compiled bf16; MFU; the real
# ffcv loader's share of the synthetic speed); the loader benchmark; the published recipe end to
# end against this project's, on the same JPEGs.
#
#   bash bench/gpu_check.sh [--wheels DIR] [--dry-run]
#
#   --wheels DIR  first install ffcv offline from a folder of wheels (what
#                 tools/build_ffcv_bundle.sh makes: the ffcv wheel and the pure-Python packages
#                 it needs that the machine lacks), with the interpreter's pip, or the pip wheel
#                 in DIR if it has none
#   --dry-run     every step at tiny sizes on the CPU (CUDA hidden): the plumbing, not the speed
#
# PYTHON=... picks the interpreter (default .venv/bin/python, else python3); the project runs
# from this checkout through PYTHONPATH (nothing else is installed). OUT=... keeps the logs, the
# figures (JSON) and table.md (default: a new temporary folder); WORK=... the photos and the
# compiled kernels (default /tmp/ssat_gpu_check, so a rerun on the same machine reuses them).
# Each step has a time limit; those of the steps that run one after another add up to 390 s
# (install 30, tests 145, training steps 140, loaders 25, end to end 50; the photos are written
# during the tests), which leaves half a minute for the rest. A step that fails or runs out of
# time leaves its rows saying so, and the rest go on. Parts that need ffcv, DALI, pytest or
# torchvision are skipped where those are missing, and the table says so.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="" DRY=0
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "gpu_check: unknown argument $1 (use --wheels DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-$(mktemp -d)}
WORK=${WORK:-/tmp/ssat_gpu_check$([ $DRY = 1 ] && echo -dry)}
mkdir -p "$OUT" "$WORK"
: >"$OUT/steps.tsv"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor
# a dry run: the CPU alone, one thread per process (tiny tensors; and on a busy machine
# several OpenMP threads per process wait on each other far longer than they compute), and
# time limits three times as long (they are sized for the GPU machine's 16 cores)
SCALE=1
[ $DRY = 1 ] && export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 && SCALE=3

# step NAME LIMIT CMD...: run CMD under a time limit, its output also in $OUT/NAME.log, and
# record its exit status (124: out of time) for the table
step() {
  local name=$1 limit=$(($2 * SCALE)) start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout -k 2 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\t\n' "$name" "$rc" $((SECONDS - start)) "$limit" >>"$OUT/steps.tsv"
  return "$rc"
}
# side_by_side CMD...: a dry run starts the tests and the measuring steps together (its figures
# mean nothing; it waits for them before the table), a real run one after another
side_by_side() {
  if [ $DRY = 1 ]; then "$@" >/dev/null & else "$@"; fi
}
skip() {  # skip NAME REASON
  echo "== $1 skipped: $2"
  printf '%s\tskip\t0\t0\t%s\n' "$1" "$2" >>"$OUT/steps.tsv"
}

# 0. ffcv from a folder of wheels, offline
if [ -n "$WHEELS" ]; then
  PIP=("$PYTHON" -m pip)
  if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    PIP=("$PYTHON" "$(ls "$WHEELS"/pip-*.whl | head -1)/pip")  # a pip wheel runs as a path
  fi
  step install 30 "${PIP[@]}" install --no-index --find-links "$WHEELS" --no-cache-dir \
    --disable-pip-version-check ffcv
fi

# numba's OpenMP threads for ffcv, as the Docker image has them, where its OpenMP layer loads
# (it needs libgomp); else numba picks its own
if [ -z "${NUMBA_THREADING_LAYER:-}" ] && "$PYTHON" -c "import numba.np.ufunc.omppool" 2>/dev/null
then
  export NUMBA_THREADING_LAYER=omp
fi
read -r CUDA FFCV DALI PYTEST <<<"$("$PYTHON" -m bench.gpu_table probe "$OUT" | tr ' ' '\n' |
  cut -d= -f2 | tr '\n' ' ')"
[ -n "${CUDA:-}" ] || { echo "gpu_check: $PYTHON cannot import torch and the project" >&2; exit 1; }
if [ "$CUDA" != yes ] && [ $DRY = 0 ]; then
  echo "gpu_check: no CUDA device visible to $PYTHON (--dry-run runs the steps on the CPU)" >&2
  exit 1
fi
echo "gpu_check: $(tr -d '\n' <"$OUT/env.json"); numba threading layer" \
  "${NUMBA_THREADING_LAYER:-the default}; logs in $OUT, photos in $WORK"
df -h /dev/shm 2>/dev/null | tail -1  # the DataLoader's workers pass batches through it

if [ $DRY = 1 ]; then
  PHOTOS=(--images 20 --size 64 48)
  SIZES=(--img_size 16 --patch_size 8 --batch_size 4 --repeats 1 --no-compile)
  STEP=(--steps 1 --workers 1)
  E2E=(--published_steps 1 --workers 1)
  LOADERS=(--images 20 --size 16 --batch_size 4 --repeats 1 --crops 1 --workers 1)
else
  PHOTOS=(--images 8192)
  SIZES=(--img_size 224 --patch_size 16 --batch_size 256 --repeats 2)
  STEP=(--steps 10 --fed_steps 30)
  E2E=(--published_steps 20)
  LOADERS=(--images 8192 --size 224 --batch_size 256 --repeats 2 --crops 1 3)
fi
RUNS=(mae_vit_tiny:ssat vit_small:scratch vit_base:scratch)

# 1. GPU-marked tests; meanwhile the photos are written (CPU work) and the training steps of step 2
# are compiled once into $WORK/inductor, which step 2 then loads instead of compiling again
step photos 60 "$PYTHON" -m bench.photos --out "$WORK/photos" "${PHOTOS[@]}" >/dev/null &
PHOTOS_PID=$!
if [ $DRY = 0 ]; then
  step compile 145 "$PYTHON" -m bench.train_step --runs "${RUNS[@]}" "${SIZES[@]}" \
    --compile_only >/dev/null &
  COMPILE_PID=$!
else
  skip compile "dry run: nothing is compiled" >/dev/null
  COMPILE_PID=""
fi
if [ "$PYTEST" = yes ]; then
  side_by_side step pytest 145 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
else
  skip pytest "pytest is not installed"
fi
wait $PHOTOS_PID
cp "$WORK/photos/photos.json" "$OUT/" 2>/dev/null
# the .beton, or why there is none
BETON=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['beton'] or '')" \
  "$WORK/photos/photos.json" 2>/dev/null)
NO_BETON=""
if [ ! -f "$OUT/photos.json" ]; then
  NO_BETON="no photos (photos.log)"
elif [ -z "$BETON" ]; then
  NO_BETON="no .beton: ffcv is not installed (it writes and reads the .beton)"
fi

# 2. training steps (synthetic, then fed by the ffcv loader)
PIPELINE=(--pipeline none)
if [ -n "$BETON" ]; then
  PIPELINE=(--pipeline ffcv --data "$BETON")
else
  skip train_step_loader "$NO_BETON"
fi
[ -n "$COMPILE_PID" ] && wait "$COMPILE_PID"
side_by_side step train_step 140 "$PYTHON" -m bench.train_step --runs "${RUNS[@]}" "${SIZES[@]}" \
  "${STEP[@]}" "${PIPELINE[@]}" --json "$OUT/train_step.json"

# 3. the loaders alone, for the engines installed
ENGINES=()
[ "$FFCV" = yes ] && ENGINES+=(ffcv ffcv-engine)
[ "$DALI" = yes ] && [ $DRY = 0 ] && ENGINES+=(dali)
if [ -z "$BETON" ]; then
  skip loaders "$NO_BETON"
elif [ ${#ENGINES[@]} -eq 0 ]; then
  skip loaders "neither ffcv nor DALI is installed"
else
  side_by_side step loaders 25 "$PYTHON" -m bench.loaders --data "$WORK/photos" "${LOADERS[@]}" \
    --loaders "${ENGINES[@]}" --json "$OUT/loaders.json"
fi

# 4. end to end: the published recipe on the same JPEGs (skipped without torchvision); ours is
# the ViT-T SSAT row of step 2 fed by the ffcv loader, and the table divides the two
if [ -f "$OUT/photos.json" ]; then
  side_by_side step end_to_end 50 "$PYTHON" -m bench.end_to_end --data "$WORK/photos" \
    "${PHOTOS[@]:0:2}" "${SIZES[@]}" "${E2E[@]}" --sides published --json "$OUT/end_to_end.json"
else
  skip end_to_end "$NO_BETON"
fi

# 5. the table
wait
"$PYTHON" -m bench.gpu_table table "$OUT" --runs "${RUNS[@]}" --seconds $SECONDS \
  $([ $DRY = 1 ] && echo --dry_run)
