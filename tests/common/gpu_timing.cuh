// SPDX-License-Identifier: Apache-2.0
#pragma once
// Timing shared by the CUDA benchmarks: an owned stream and Google
// Benchmark's loop timed with CUDA events (manual time).
#include <pqkv/core/cuda_try.hpp>

#include "common/cuda_util.cuh"

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <vector>

namespace pqkv::bench {

using pqkv::test::owned_stream;

/// Runs `warmup` untimed calls, then Google Benchmark's loop, each iteration's
/// call timed with CUDA events on `timer`'s stream and reported as manual
/// time. Returns the iterations' milliseconds (for medians).
template <class F>
std::vector<double> timed_loop(benchmark::State& state, pqkv::test::event_timer const& timer, F&& call,
                               int warmup = 1)
{
  for (int i = 0; i < warmup; ++i) { (void)timer.ms(call); }
  std::vector<double> ms;
  for (auto _ : state) {
    double const t = timer.ms(call);
    state.SetIterationTime(t * 1e-3);
    ms.push_back(t);
  }
  return ms;
}

}  // namespace pqkv::bench
