#!/usr/bin/env bash
# Wheels for a GPU box that has torch and transformers but no package index: DeepSpeed (built here as a pure
# Python wheel, its ops compiled on first use there) and the dependencies torch and transformers do not bring,
# for CPython 3.10-3.13 on x86_64 Linux. Writes .gpu-wheels/ (git-ignored); on the box:
#   pip install --no-index --find-links .gpu-wheels deepspeed==0.19.8 && python bench/gpu/learner_gpu.py
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-.venv/bin/pip}
OUT=.gpu-wheels
rm -rf "$OUT" && mkdir -p "$OUT"
# DeepSpeed ships an sdist only: build it once, no ops (DS_BUILD_OPS=0), against the torch of this venv.
DS_BUILD_OPS=0 "$PIP" wheel -q --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8
PURE="einops hjson py-cpuinfo pydantic==2.14.4 annotated-types typing-inspection typing-extensions"
"$PIP" download -q --no-deps --only-binary=:all: -d "$OUT" $PURE
for version in 3.10 3.11 3.12 3.13; do
  "$PIP" download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --python-version "$version" -d "$OUT" \
    "pydantic-core==$("$PIP" show pydantic-core | sed -n 's/^Version: //p')" msgpack psutil ninja
done
du -sh "$OUT"; ls "$OUT"
