# SPDX-License-Identifier: Apache-2.0
# Sourced by the quality scripts (run_quality_sweep.sh, run_sale_quality.sh):
# the tools and include flags for building a quality program as a plain g++
# program. Sets root (the repository), cxx (CXX, default g++), python
# (PYTHON, default python3), threads (THREADS, default 0: all) and includes
# (the library, the tests' helpers, and CCCL_INCLUDE or the CUDA Toolkit's
# folder holding cuda/std/mdspan).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cxx=${CXX:-g++}
python=${PYTHON:-python3}
threads=${THREADS:-0}
includes=(-I"$root/include" -I"$root/tests")
if [[ -n "${CCCL_INCLUDE:-}" ]]; then
  includes+=(-I"$CCCL_INCLUDE")
else
  for d in /usr/local/cuda/include/cccl /usr/local/cuda/include; do
    [[ -d "$d" ]] && includes+=(-I"$d")
  done
fi
