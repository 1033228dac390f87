#!/usr/bin/env bash
# Writes the lock files in requirements/ from pyproject.toml (`make lock`). Every file pins exact versions with
# their hashes; `make run`, `make test`, .ci/run and the Dockerfiles install from them with pip --require-hashes.
#
#   base.txt     the front-ends (`dense-serve api`, `dense-serve grpc`): no torch
#   worker.txt   + the [worker] extra (serve, worker, predict, export on the CPU), torch excepted
#   train.txt    + the [train] extra (the fine-tune job), torch excepted
#   dev.txt      + the [dev] extra and the Python client: everything the suite needs, torch excepted
#   torch-cpu.txt  the CPU build of torch, installed beside worker/train/dev on Linux x86_64 without a GPU
#   torch-pypi.txt PyPI's torch and what it needs: the CUDA 13 build on Linux x86_64, the CPU one on macOS/aarch64
#   gpu.txt      both CUDA images (Python 3.12, Linux x86_64): CUDA torch, onnxruntime-gpu and TensorRT
#                pinned together, every other package at the version dev.txt has
#
# base/worker/train/dev are universal (CPython >= 3.11, any OS) and agree with each other: dev.txt is resolved
# first and constrains the others. torch is kept out of them because its CPU and CUDA builds are different
# files under one name; torch-cpu.txt is resolved with PyTorch's CPU wheels (TORCH_CPU_WHEELS: the index page,
# or a local folder of wheels) and records the hash of every file found there.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
TORCH_CPU_WHEELS=${TORCH_CPU_WHEELS:-https://download.pytorch.org/whl/cpu/torch/}
R=requirements
# Extra uv options for every resolution: `make lock ARGS="--upgrade-package redis"` moves one package,
# `make lock ARGS=--upgrade` everything; otherwise versions already locked are kept where they still fit.
EXTRA=("$@")

stamp() { # stamp NAME [LINE]: put what wrote NAME.txt and how to install it on top (and LINE after it)
  local body
  body=$(grep -v '^# \(Locked by\|Install:\)' "$R/$1.txt" | grep -v '^--extra-index-url')
  {
    echo "# Locked by requirements/lock.sh (make lock) from $1.in and pyproject.toml; do not edit by hand."
    echo "# Install: pip install --require-hashes --no-deps -r requirements/$1.txt"
    if [ -n "${2:-}" ]; then echo "$2"; fi
    echo "$body"
  } >"$R/$1.txt"
}
compile() { # compile NAME [uv options...]: NAME.in -> NAME.txt, universal, with hashes, the projects left out
  local name=$1
  shift
  "$UV" pip compile --quiet --universal --python-version 3.11 --generate-hashes --no-header \
    --annotation-style line --find-links "$TORCH_CPU_WHEELS" -c $R/torch-cpu.in --no-emit-package torch \
    --no-emit-package dense-serve --no-emit-package dense-serve-client "${EXTRA[@]}" "$@" "$R/$name.in" -o "$R/$name.txt"
  stamp "$name"
}

compile dev
compile base -c $R/dev.txt
compile worker -c $R/dev.txt
compile train -c $R/dev.txt

# torch alone (what it needs is in the locks above, at the same versions), so pip asks PyPI's index and
# PyTorch's for one package only. The index line lets a plain `pip install -r` find the file.
"$UV" pip compile --quiet --universal --python-version 3.11 --generate-hashes --no-header --annotation-style line \
  --find-links "$TORCH_CPU_WHEELS" "${EXTRA[@]}" -c $R/dev.txt $R/torch-cpu.in -o $R/torch-cpu.full
awk '/^[^ #]/ { keep = /^torch==/ } keep' $R/torch-cpu.full >$R/torch-cpu.txt
rm $R/torch-cpu.full
stamp torch-cpu "--extra-index-url https://download.pytorch.org/whl/cpu"

# PyPI's torch with what it needs (NVIDIA's libraries on Linux x86_64): GPU machines, macOS, aarch64.
"$UV" pip compile --quiet --universal --python-version 3.11 --generate-hashes --no-header --annotation-style line \
  "${EXTRA[@]}" -c $R/dev.txt $R/torch-pypi.in -o $R/torch-pypi.txt
stamp torch-pypi

# The CUDA image, one platform: every package it shares with dev.txt at dev.txt's version.
"$UV" pip compile --quiet --python-version 3.12 --python-platform x86_64-manylinux_2_28 --generate-hashes \
  --no-header --annotation-style line --no-emit-package dense-serve "${EXTRA[@]}" -c $R/dev.txt $R/gpu.in -o $R/gpu.txt
stamp gpu
echo "locked: $(ls $R/*.txt | tr '\n' ' ')"
