# SPDX-License-Identifier: Apache-2.0
# Sourced by the other scripts: extra CMake arguments for a machine without the
# CUDA Toolkit, pointing at the headers install-deps.sh fetched into .deps/.
pqkv_cmake_args=()
if [ -d .deps/cuda-headers/nvidia/cu13 ] && ! command -v nvcc >/dev/null 2>&1; then
  pqkv_cmake_args+=("-Dlibcudacxx_DIR=$PWD/.deps/cuda-headers/nvidia/cu13/cccl/lib/cmake/libcudacxx"
                    "-DPQKV_CUDA_INCLUDE_DIR=$PWD/.deps/cuda-headers/nvidia/cu13/include")
fi
