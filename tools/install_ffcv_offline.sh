#!/usr/bin/env bash
# Install the ffcv bundle in this folder (tools/build_ffcv_bundle.sh made it) without network,
# into the interpreter PY (default: python3), then check that ffcv's compiled part loads.
#   PY=/opt/venv/bin/python ./install_offline.sh
# An interpreter without pip installs with the pip wheel in this folder.
set -euo pipefail
PY=${PY:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
PIP=("$PY" -m pip)
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  PIP=("$PY" "$(ls "$HERE"/pip-*.whl | head -1)/pip") # a pip wheel runs as a path
fi
"${PIP[@]}" install --no-index --find-links "$HERE" --no-cache-dir --disable-pip-version-check ffcv
"$PY" -c "from importlib.metadata import version; from ffcv.libffcv import imdecode; from ffcv.loader import Loader; import ffcv; print('ffcv', version('ffcv'), 'from', ffcv.__file__)"
