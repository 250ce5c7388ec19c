// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::event`: an owning CUDA event (timing off by default, the
/// cheap kind for dependencies) on a recorded device, and `depend`, the
/// record-then-wait that orders one stream after another.
///
/// Semantics (CUDA's): `wait(stream)` makes the stream's later work wait for
/// the work captured by the event's most recent `record` *at the time of the
/// wait call*; a later record does not affect waits already issued, so one
/// event may be re-recorded for every layer as long as each wait follows its
/// record in host order. Waiting on a never-recorded event is a no-op. Both
/// calls are asynchronous and capturable: under stream capture a record marks
/// the capture's current nodes and a wait on them joins the waiting stream to
/// the capture (how side streams fork from and join back to an origin stream).

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/schedule/device_guard.cuh>

#include <cuda_runtime_api.h>

#include <utility>

namespace pqkv::gpu {

/// Owning CUDA event; move-only.
class event {
 public:
  /// Creates an event on the current device; `flags` as `cudaEventCreateWithFlags`
  /// (default `cudaEventDisableTiming`).
  explicit event(unsigned flags = cudaEventDisableTiming) : device_{current_device()}
  {
    PQKV_CUDA_TRY(cudaEventCreateWithFlags(&event_, flags));
  }
  /// Creates an event on `device` (the current device is left unchanged).
  event(int device, unsigned flags) : device_{device}
  {
    check_device(device, "event");
    device_guard guard{device};
    PQKV_CUDA_TRY(cudaEventCreateWithFlags(&event_, flags));
  }
  /// An event with timing enabled, for `cudaEventElapsedTime`.
  [[nodiscard]] static event timed() { return event{cudaEventDefault}; }

  event(event&& o) noexcept : event_{std::exchange(o.event_, nullptr)}, device_{o.device_} {}
  event& operator=(event&& o) noexcept
  {
    if (this != &o) {
      reset();
      event_ = std::exchange(o.event_, nullptr);
      device_ = o.device_;
    }
    return *this;
  }
  event(event const&) = delete;
  event& operator=(event const&) = delete;
  /// Destroying an event whose work is pending is safe (CUDA releases it later).
  ~event() { reset(); }

  [[nodiscard]] cudaEvent_t get() const noexcept { return event_; }
  [[nodiscard]] int device() const noexcept { return device_; }

  /// Records the work enqueued so far on `stream` (a stream of this event's device).
  event& record(cudaStream_t stream)
  {
    PQKV_EXPECTS(event_ != nullptr, "event.record", "the event was moved from");
    PQKV_CUDA_TRY(cudaEventRecord(event_, stream));
    return *this;
  }
  /// Makes `stream`'s later work wait for the last record; never blocks the host.
  void wait(cudaStream_t stream) const
  {
    PQKV_EXPECTS(event_ != nullptr, "event.wait", "the event was moved from");
    PQKV_CUDA_TRY(cudaStreamWaitEvent(stream, event_, 0));
  }
  /// True when the last record's work is done (or nothing was recorded);
  /// does not block. Not for use while the event is in a capture.
  [[nodiscard]] bool ready() const
  {
    cudaError_t const s = cudaEventQuery(event_);
    if (s == cudaErrorNotReady) {
      (void)cudaGetLastError();
      return false;
    }
    PQKV_CUDA_TRY(s);
    return true;
  }
  /// Blocks the host until the last record's work is done (set-up, tests and
  /// teardown; never in a decode step).
  void synchronize() const { PQKV_CUDA_TRY(cudaEventSynchronize(event_)); }

 private:
  void reset() noexcept
  {
    if (event_ != nullptr) { (void)cudaEventDestroy(event_); }
    event_ = nullptr;
  }
  cudaEvent_t event_ = nullptr;
  int device_ = 0;
};

/// Orders `consumer`'s later work after the work enqueued so far on
/// `producer`, through `e` (recorded on producer, waited on by consumer).
/// Nothing is done when the two streams are the same.
inline void depend(cudaStream_t consumer, cudaStream_t producer, event& e)
{
  if (consumer == producer) { return; }
  e.record(producer);
  e.wait(consumer);
}

/// Milliseconds between two recorded timed events (waits for `stop`).
[[nodiscard]] inline float elapsed_ms(event const& start, event const& stop)
{
  stop.synchronize();
  float ms = 0.f;
  PQKV_CUDA_TRY(cudaEventElapsedTime(&ms, start.get(), stop.get()));
  return ms;
}

}  // namespace pqkv::gpu
