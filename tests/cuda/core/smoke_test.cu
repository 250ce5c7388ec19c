// SPDX-License-Identifier: Apache-2.0
// The CUDA configuration works: a kernel using pqkv's host/device traits and
// views compiles, launches and agrees with the host.
#include <pqkv/pqkv.cuh>

#include "common/gpu.hpp"

#include <vector>

namespace {

__global__ void half_round_trip(pqkv::view<float const, 2> in, pqkv::view<float, 2> out)
{
  auto const i = static_cast<pqkv::index_t>(blockIdx.x);
  auto const j = static_cast<pqkv::index_t>(threadIdx.x);
  if (i < in.extent(0) && j < in.extent(1)) {
    out(i, j) = pqkv::to_float(pqkv::from_float<__nv_bfloat16>(in(i, j))) +
                pqkv::to_float(pqkv::from_float<__half>(in(i, j)));
  }
}

}  // namespace

TEST_CASE("cuda smoke: dtype traits and views agree between host and device")
{
  PQKV_REQUIRE_GPU();
  constexpr int rows = 4, cols = 33;
  std::vector<float> host(rows * cols);
  for (int i = 0; i < rows * cols; ++i) { host[i] = 0.37f * static_cast<float>(i) - 11.f; }
  pqkv::device_buffer<float> in(host.size()), out(host.size());
  PQKV_CUDA_TRY(cudaMemcpy(in.data(), host.data(), in.size_bytes(), cudaMemcpyHostToDevice));
  half_round_trip<<<rows, cols>>>(pqkv::make_view(static_cast<float const*>(in.data()), rows, cols),
                                  pqkv::make_view(out.data(), rows, cols));
  PQKV_CUDA_CHECK_LAST();
  std::vector<float> got(host.size());
  PQKV_CUDA_TRY(cudaMemcpy(got.data(), out.data(), out.size_bytes(), cudaMemcpyDeviceToHost));
  for (int i = 0; i < rows * cols; ++i) {
    float const want = pqkv::to_float(pqkv::from_float<__nv_bfloat16>(host[i])) +
                       pqkv::to_float(pqkv::from_float<__half>(host[i]));
    CHECK(got[i] == want);
  }
}

TEST_CASE("cuda smoke: a failing CUDA call throws pqkv::cuda_error")
{
  PQKV_REQUIRE_GPU();
  void* p = nullptr;
  CHECK_THROWS_AS(PQKV_CUDA_TRY(cudaMalloc(&p, std::size_t{1} << 62)), pqkv::cuda_error);
}
