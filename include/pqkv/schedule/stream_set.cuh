// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::stream_set`: the named streams the scheduler overlaps
/// work on, all on one recorded device:
///   compute  the model's kernels and the attention over resident rows
///   h2d      fetches of missed rows from the pinned store (decode's critical path)
///   d2h      offload of new K/V into the pinned store (background)
///   side     codebook training and encoding, host-pool tasks (prefill)
/// An owning set creates non-blocking streams (no implicit sync with the
/// legacy default stream) with per-role priorities; default: compute and h2d
/// high (they gate the next layer), side normal, d2h low (it only has to
/// finish before its rows are read). A wrapping set names the caller's
/// streams (an engine's current stream as compute) and owns nothing; roles
/// may share a stream, which only serializes what would overlap.
/// Destroying an owning set does not wait: CUDA releases each stream once its
/// pending work is done.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/schedule/device_guard.cuh>

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <utility>

namespace pqkv::gpu {

/// What a stream of a `stream_set` is for.
enum class stream_role : std::uint8_t { compute = 0, h2d = 1, d2h = 2, side = 3 };

/// Number of roles.
inline constexpr std::size_t stream_roles = 4;

/// A stream priority relative to the device's range.
enum class stream_priority : std::uint8_t {
  low,     ///< the device's least priority
  normal,  ///< the middle of the range (rounded toward low)
  high,    ///< the device's greatest priority
};

/// Priority of each role in an owning set.
struct stream_priorities {
  stream_priority compute = stream_priority::high;
  stream_priority h2d = stream_priority::high;
  stream_priority d2h = stream_priority::low;
  stream_priority side = stream_priority::normal;
};

/// Named streams on one device; owning or wrapping (see the file comment). Move-only.
class stream_set {
 public:
  /// Creates four non-blocking streams on `device` (-1: the current one) with
  /// the given priorities; the current device is left unchanged.
  explicit stream_set(stream_priorities const& priorities = {}, int device = -1) : owning_{true}
  {
    device_ = device < 0 ? current_device() : device;
    check_device(device_, "stream_set");
    device_guard guard{device_};
    int least = 0, greatest = 0;
    PQKV_CUDA_TRY(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    auto value = [&](stream_priority p) {
      switch (p) {
        case stream_priority::low: return least;
        case stream_priority::high: return greatest;
        default: return greatest + (least - greatest + 1) / 2;  // numerically lower is higher priority
      }
    };
    std::array<stream_priority, stream_roles> const wanted{priorities.compute, priorities.h2d, priorities.d2h,
                                                           priorities.side};
    try {
      for (std::size_t r = 0; r < stream_roles; ++r) {
        PQKV_CUDA_TRY(cudaStreamCreateWithPriority(&streams_[r], cudaStreamNonBlocking, value(wanted[r])));
      }
    } catch (...) {
      release();
      throw;
    }
  }

  /// Names the caller's streams (not owned) on `device`; `side` defaults to
  /// `d2h`'s stream. With CUDA 12.8 or later each stream's device is checked.
  [[nodiscard]] static stream_set wrap(int device, cudaStream_t compute, cudaStream_t h2d, cudaStream_t d2h,
                                       cudaStream_t side)
  {
    check_device(device, "stream_set.wrap");
    stream_set s{wrap_tag{}};
    s.device_ = device;
    s.streams_ = {compute, h2d, d2h, side};
#if CUDART_VERSION >= 12080
    char const* names[] = {"compute", "h2d", "d2h", "side"};
    device_guard guard{device};  // the legacy stream (0) reports the current device
    for (std::size_t r = 0; r < stream_roles; ++r) {
      int d = -1;
      PQKV_CUDA_TRY(cudaStreamGetDevice(s.streams_[r], &d));
      PQKV_EXPECTS(d == device, "stream_set.wrap", names[r], " stream is on device ", d, ", not device=", device);
    }
#endif
    return s;
  }
  [[nodiscard]] static stream_set wrap(int device, cudaStream_t compute, cudaStream_t h2d, cudaStream_t d2h)
  {
    return wrap(device, compute, h2d, d2h, d2h);
  }

  stream_set(stream_set&& o) noexcept
    : streams_{std::exchange(o.streams_, {})}, device_{o.device_}, owning_{std::exchange(o.owning_, false)} {}
  stream_set& operator=(stream_set&& o) noexcept
  {
    if (this != &o) {
      release();
      streams_ = std::exchange(o.streams_, {});
      device_ = o.device_;
      owning_ = std::exchange(o.owning_, false);
    }
    return *this;
  }
  stream_set(stream_set const&) = delete;
  stream_set& operator=(stream_set const&) = delete;
  ~stream_set() { release(); }

  [[nodiscard]] cudaStream_t get(stream_role role) const noexcept { return streams_[static_cast<std::size_t>(role)]; }
  [[nodiscard]] cudaStream_t compute() const noexcept { return get(stream_role::compute); }
  [[nodiscard]] cudaStream_t h2d() const noexcept { return get(stream_role::h2d); }
  [[nodiscard]] cudaStream_t d2h() const noexcept { return get(stream_role::d2h); }
  [[nodiscard]] cudaStream_t side() const noexcept { return get(stream_role::side); }
  /// The device every stream lives on.
  [[nodiscard]] int device() const noexcept { return device_; }
  /// True when the set created (and will destroy) its streams.
  [[nodiscard]] bool owning() const noexcept { return owning_; }

 private:
  struct wrap_tag {};
  explicit stream_set(wrap_tag) noexcept : owning_{false} {}

  void release() noexcept
  {
    if (owning_) {
      for (auto& s : streams_) {
        if (s != nullptr) { (void)cudaStreamDestroy(s); }
        s = nullptr;
      }
    }
  }

  std::array<cudaStream_t, stream_roles> streams_{};
  int device_ = 0;
  bool owning_ = false;
};

}  // namespace pqkv::gpu
