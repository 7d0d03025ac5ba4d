#!/usr/bin/env bash
# The one setup step behind `make test` and `make demo`: system packages, a .venv in the
# repository root, the project installed editable. Idempotent: when nothing changed since the
# last successful run it only checks and returns (a second or two).
set -euo pipefail
cd "$(dirname "$0")/.."

# ffcv compiles against OpenCV and libjpeg-turbo, found through pkg-config.
APT_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev)
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-stamp

missing=()
if command -v dpkg-query >/dev/null; then
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
else
  echo "setup: not a Debian/Ubuntu system; make sure these (or their equivalents) are installed: ${APT_PACKAGES[*]}" >&2
fi
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]}" >&2
    echo "setup: install them first, e.g.: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

# The environment is current when it was built from exactly this pyproject.toml and this script.
want=$(cat pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "setup: building $VENV (a few minutes the first time; about 7 GB)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -U pip wheel setuptools
# one DALI build at a time, the one pyproject.toml names (for torch's CUDA major): another left
# from before would share its files
dali=$(grep -o 'nvidia-dali-cuda[0-9]*' pyproject.toml)
stale=$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null |
  grep -o '^nvidia-dali-cuda[0-9]*' | grep -vx "$dali" || true)
[ -z "$stale" ] || "$VENV/bin/python" -m pip uninstall -y -q $stale
"$VENV/bin/python" -m pip install -q -e '.[test]'
echo "$want" >"$STAMP"
echo "setup: $VENV is ready"
