#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs what building pqkv needs on a Debian machine, skipping what is there:
# a C++20 compiler, CMake, Eigen, doctest, Google Benchmark, and, when no CUDA
# Toolkit is installed, the CCCL and CUDA runtime headers (header-only use; no
# GPU or nvcc needed) from their PyPI wheels into .deps/.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi

missing=()
for pkg in g++ cmake make libeigen3-dev doctest-dev libbenchmark-dev python3-numpy; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The CUDA Toolkit ships CCCL (cuda::std::mdspan) and cuda_fp16.h / cuda_bf16.h.
# Without it, fetch the same headers from the NVIDIA wheels on PyPI.
if ! command -v nvcc >/dev/null 2>&1 && [ ! -d /usr/local/cuda/include ]; then
  if [ ! -f .deps/cuda-headers/nvidia/cu13/include/cuda_fp16.h ]; then
    echo "install-deps: no CUDA Toolkit; fetching the CCCL and CUDA runtime headers into .deps/"
    command -v python3 >/dev/null || "${sudo_cmd[@]}" apt-get install -y -qq python3-pip >/dev/null
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps -d "$tmp" "nvidia-cuda-cccl>=13" "nvidia-cuda-runtime==13.0.*"
    mkdir -p .deps/cuda-headers
    for whl in "$tmp"/*.whl; do python3 -m zipfile -e "$whl" .deps/cuda-headers; done
    rm -rf "$tmp"
    # The wheel keeps the headers in include/cccl but its CMake files look for
    # them in cccl/include.
    ln -sfn ../include/cccl .deps/cuda-headers/nvidia/cu13/cccl/include
  fi
fi
