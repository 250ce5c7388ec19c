// SPDX-License-Identifier: Apache-2.0
#pragma once
// Device helpers shared by the CUDA tests and benchmarks: std::vector <->
// device_buffer copies, a CUDA graph captured from a callable, and a
// CUDA-event timer.
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_buffer.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

namespace pqkv::test {

/// A device copy of `v` (one element when `v` is empty, so the pointer is valid).
template <class T>
pqkv::device_buffer<T> upload(std::vector<T> const& v)
{
  pqkv::device_buffer<T> d(std::max<std::size_t>(v.size(), 1));
  if (!v.empty()) { PQKV_CUDA_TRY(cudaMemcpy(d.data(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice)); }
  return d;
}

/// The first n elements of `d`, copied to the host.
template <class T>
std::vector<T> download(pqkv::device_buffer<T> const& d, std::size_t n)
{
  std::vector<T> v(n);
  if (n > 0) { PQKV_CUDA_TRY(cudaMemcpy(v.data(), d.data(), n * sizeof(T), cudaMemcpyDeviceToHost)); }
  return v;
}

/// The work `issue()` puts on `stream`, captured once (thread-local capture
/// mode) and instantiated; `launch` replays it.
class captured_graph {
 public:
  template <class F>
  captured_graph(cudaStream_t stream, F&& issue)
  {
    cudaGraph_t graph = nullptr;
    PQKV_CUDA_TRY(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    issue();
    PQKV_CUDA_TRY(cudaStreamEndCapture(stream, &graph));
    cudaError_t const status = cudaGraphInstantiate(&exec_, graph, 0);
    (void)cudaGraphDestroy(graph);  // the instance keeps what it needs
    PQKV_CUDA_TRY(status);
  }
  captured_graph(captured_graph&& other) noexcept : exec_{std::exchange(other.exec_, nullptr)} {}
  captured_graph(captured_graph const&) = delete;
  captured_graph& operator=(captured_graph const&) = delete;
  captured_graph& operator=(captured_graph&&) = delete;
  ~captured_graph()
  {
    if (exec_ != nullptr) { (void)cudaGraphExecDestroy(exec_); }
  }

  void launch(cudaStream_t stream) const { PQKV_CUDA_TRY(cudaGraphLaunch(exec_, stream)); }

 private:
  cudaGraphExec_t exec_ = nullptr;
};

/// A non-blocking stream, destroyed with the object.
class owned_stream {
 public:
  owned_stream() { PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  owned_stream(owned_stream const&) = delete;
  owned_stream& operator=(owned_stream const&) = delete;
  ~owned_stream() { (void)cudaStreamDestroy(stream_); }
  [[nodiscard]] cudaStream_t get() const noexcept { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

/// Times the work a callable issues on one stream with a pair of CUDA events.
class event_timer {
 public:
  explicit event_timer(cudaStream_t stream) : stream_{stream}
  {
    PQKV_CUDA_TRY(cudaEventCreate(&start_));
    PQKV_CUDA_TRY(cudaEventCreate(&stop_));
  }
  event_timer(event_timer const&) = delete;
  event_timer& operator=(event_timer const&) = delete;
  ~event_timer()
  {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }

  /// Milliseconds between events recorded before and after `issue()`; waits for the second.
  template <class F>
  double ms(F&& issue) const
  {
    PQKV_CUDA_TRY(cudaEventRecord(start_, stream_));
    issue();
    PQKV_CUDA_TRY(cudaEventRecord(stop_, stream_));
    PQKV_CUDA_TRY(cudaEventSynchronize(stop_));
    float t = 0.f;
    PQKV_CUDA_TRY(cudaEventElapsedTime(&t, start_, stop_));
    return static_cast<double>(t);
  }

 private:
  cudaStream_t stream_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

/// The median of `v` (sorted in place); 0 when empty.
inline double median(std::vector<double>& v)
{
  if (v.empty()) { return 0.0; }
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace pqkv::test
