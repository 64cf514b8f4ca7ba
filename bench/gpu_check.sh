#!/usr/bin/env bash
# The GPU check on a bare GPU machine: python3 with torch, transformers and accelerate, no diffusers, no network.
#
#   bash bench/gpu_check.sh --prepare             here, where pip reaches PyPI: fill bench/carry/ with the
#                                                 diffusers wheel this repository's environment uses and the CLIP
#                                                 tokenizer files (about 8 MB; bench/carry/ is git-ignored)
#   bash bench/gpu_check.sh [gpu_check.py options]   there, with bench/carry/ copied along: install the wheels
#                                                 into /tmp/site (unless diffusers imports already) and run
#                                                 python3 bench/gpu_check.py with the options
#
# bench/RESULTS.md describes the one-line call on a lent GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=bench/carry

if [[ "${1:-}" == "--prepare" ]]; then
    PY=${PYTHON:-.venv/bin/python}
    version=$("$PY" -c 'import diffusers; print(diffusers.__version__)')
    rm -rf "$CARRY"
    mkdir -p "$CARRY/wheels" "$CARRY/rslib_cache"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/wheels" "diffusers==$version"
    RSLIB_CACHE="$CARRY/rslib_cache" PYTHONPATH="$PWD" "$PY" -c \
        'from rslib.models.text import clip_tokenizer_dir; print("tokenizer:", clip_tokenizer_dir())'
    ls -l "$CARRY/wheels"
    exit 0
fi

has() {  # whether python3 finds the package (without importing it)
    python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"
}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ! has diffusers; then
    if ! ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
        echo "gpu_check.sh: diffusers is not installed and $CARRY/wheels/ holds no wheel: run" \
             "'bash bench/gpu_check.sh --prepare' where pip reaches PyPI, and bring $CARRY along" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$CARRY"/wheels/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
# the CLIP tokenizer is built from open_clip_torch's BPE file: a machine without it reads the carried copy
if [[ -f "$CARRY/rslib_cache/clip_tokenizer/vocab.json" ]] && ! has open_clip; then
    export RSLIB_CACHE="$PWD/$CARRY/rslib_cache"
fi
exec python3 bench/gpu_check.py "$@"
