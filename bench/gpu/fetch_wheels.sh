#!/usr/bin/env bash
# Download into the ignored .whl/ folder the wheels that the GPU suite needs beyond what the GPU
# machine has (it reaches no package registry). Target: its Python 3.12, manylinux x86_64.
# bench/gpu_suite.sh installs whatever it finds there (--target /tmp/site, first on PYTHONPATH).
#
#   bash bench/gpu/fetch_wheels.sh [--with-pyarrow]
#
# The machine has torch 2.11, triton 3.6, numpy, safetensors, tokenizers, transformers, tqdm,
# matplotlib, pytest, hypothesis, pyarrow, pandas, xxhash, fsspec, huggingface_hub and jinja2, but no
# `datasets` (corpora in llm/train/data.py, its tests) nor dill and multiprocess, which it needs, no
# `gguf` (imported by `import llm`: without it every step fails), and no starlette or uvicorn (the
# server's tests).
# datasets 5.2 wants pyarrow >= 24: if the suite's versions.txt shows an older one, fetch it too
# with --with-pyarrow (49 MB of the 64 MB that may travel with the checkout).
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 starlette==1.10.0 uvicorn==0.55.0)
case "${1:-}" in
    "") ;;
    --with-pyarrow) WHEELS+=(pyarrow==24.0.0) ;;
    *) echo "fetch_wheels.sh: unknown argument $1 (only --with-pyarrow)" >&2; exit 2 ;;
esac

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$TMP/whl" "${WHEELS[@]}"
rm -rf .whl
mv "$TMP/whl" .whl  # all or nothing: a failed download leaves the previous .whl/ as it was
ls -l .whl
du -sh .whl
