#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into a folder (default .whl/, ignored by git), so
# tests/gpu/check.sh can install them there without a network.
#   tests/gpu/fetch-wheels.sh [--dest DIR] [--python-version 3.12] [EXTRA_DIST ...]
# Versions are pinned to the ones the project's environment has ($PYTHON, default .venv/bin/python),
# so the GPU runs what CI tested; a distribution missing there is fetched at its latest.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.whl
pyver=3.12  # the GPU image's Python
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) dest=$2; shift 2 ;;
    --python-version) pyver=$2; shift 2 ;;
    *) break ;;
  esac
done
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
# What the engine, the benches and the server import that the image (image-packages.txt) lacks.
dists=(fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection
       opentelemetry-api gguf pyzmq msgspec "$@")
mkdir -p "$dest"
specs=()
for d in "${dists[@]}"; do
  v=$("$py" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$d")
  specs+=("$d${v:+==$v}")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d "$dest" "${specs[@]}"
du -sh "$dest"
