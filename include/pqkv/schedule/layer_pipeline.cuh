// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::layer_pipeline`: the per-layer orchestration of prefill
/// and decode over a `stream_set`. The user supplies the work as stage
/// callables `(layer, stream)` that enqueue on the stream they are given; the
/// pipeline enqueues them in order and records / waits the events between
/// streams so that:
///
/// prefill (per layer i; each arrow is an event dependency):
///   compute   | compute(i) ─┬────────────── compute(i+1) ─┬── ...
///   d2h       |             └─► offload(i) ───────────────│─ (overlaps compute(i+1))
///   side      |             └─► train_encode(i) ──────────│─ (overlaps compute(i+1))
///   with `reuse` = r > 0, compute(i) also waits for offload(i-r) and
///   train_encode(i-r): the model cycles r K/V staging buffers (r = 2 is
///   double buffering; r = 1 allows no overlap).
///
/// decode (per layer i):
///   compute   | compute(i) ─┬─► attend_resident(i) ──┬─► merge(i) ─► compute(i+1)
///   h2d       |             └─► fetch(i) ─► attend_fetched(i) ─┘
///   d2h       |             └─► offload(i)     (the new token's K/V, joined at the end)
///   fetch(i) and attend_fetched(i) overlap attend_resident(i); merge(i)
///   waits for both partial states.
///
/// Every call forks: each stream it uses first waits for the work enqueued
/// so far on `origin` (inputs the caller prepared), and joins: `origin`
/// finally waits for all of them. So the call is one unit on `origin`, and
/// it can be captured into a CUDA graph by capturing `origin` (the forked
/// streams join the capture through the fork event and leave it through the
/// join). The pipeline itself never synchronizes, queries or polls: no
/// `cudaDeviceSynchronize`, no host waits, no allocation (its events are
/// made at construction and re-recorded; each wait follows its record in
/// host order, which is all CUDA needs). Stages absent (empty) are skipped
/// and their streams left untouched; `compute` is required.
///
/// Stage rules: a stage enqueues only on the stream it is given (or on
/// streams it forks and joins itself) and must be capturable when the call is
/// captured. Host work belongs in a `host_task` enqueued by the stage.
/// Calls are made with the set's device current; the caller's current device
/// is restored. If a stage throws, the pipeline still joins every forked
/// stream back into `origin` (so a capture can be ended) and rethrows.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/schedule/device_guard.cuh>
#include <pqkv/schedule/event.cuh>
#include <pqkv/schedule/stream_set.cuh>

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <functional>
#include <vector>

namespace pqkv::gpu {

/// A stage: enqueue `layer`'s work on `stream`.
using pipeline_stage = std::function<void(index_t layer, cudaStream_t stream)>;

/// The stages of a prefill pass (see the file comment).
struct prefill_stages {
  pipeline_stage compute;       ///< the layer's forward; writes its K/V (compute stream; required)
  pipeline_stage offload;       ///< D2H of the layer's K/V into the store (d2h, after compute(layer))
  pipeline_stage train_encode;  ///< codebook training + encoding of its keys (side, after compute(layer))
};

/// The stages of a decode step (see the file comment).
struct decode_stages {
  pipeline_stage compute;          ///< the layer's work up to its selection: q, scorer, cache step (compute; required)
  pipeline_stage fetch;            ///< copies the layer's misses from the store (h2d, after compute(layer))
  pipeline_stage attend_resident;  ///< attention over GPU-resident rows: sink, window, hits (compute)
  pipeline_stage attend_fetched;   ///< attention over the fetched rows (h2d, after fetch(layer))
  pipeline_stage merge;            ///< merges the two partial states (compute, after both attentions)
  pipeline_stage offload;          ///< appends the new token's K/V to the store (d2h, after compute(layer))
};

/// Options of a `layer_pipeline`.
struct pipeline_options {
  /// Prefill: K/V staging buffers the model cycles through (0: each layer
  /// has its own, no reuse wait). At most 64.
  index_t reuse = 0;
};

/// Prefill / decode orchestration over a stream set (see the file comment).
/// Holds a reference to the set, which must outlive it. Not thread-safe:
/// one call at a time.
class layer_pipeline {
 public:
  /// Creates the pipeline's events on the set's device; throws `pqkv::error`
  /// on options out of range.
  explicit layer_pipeline(stream_set const& streams, pipeline_options const& options = {})
    : streams_{&streams}, options_{checked(options)}, fork_{make_event(streams)}, ready_{make_event(streams)},
      fetched_{make_event(streams)},
      join_{make_event(streams), make_event(streams), make_event(streams), make_event(streams)}
  {
    consumed_.reserve(static_cast<std::size_t>(2 * options_.reuse));
    for (index_t i = 0; i < 2 * options_.reuse; ++i) { consumed_.push_back(make_event(streams)); }
  }
  layer_pipeline(layer_pipeline const&) = delete;
  layer_pipeline& operator=(layer_pipeline const&) = delete;

  [[nodiscard]] stream_set const& streams() const noexcept { return *streams_; }
  [[nodiscard]] pipeline_options const& options() const noexcept { return options_; }

  /// Enqueues a prefill pass over `layers` layers, forked from and joined
  /// back into `origin`. Throws `pqkv::error` before enqueuing anything when
  /// `compute` is empty or `layers` < 0.
  void prefill(index_t layers, prefill_stages const& s, cudaStream_t origin)
  {
    constexpr char const* where = "layer_pipeline.prefill";
    PQKV_EXPECTS(layers >= 0, where, "layers=", layers, " must be non-negative");
    PQKV_EXPECTS(static_cast<bool>(s.compute), where, "stages.compute is empty");
    device_guard guard{streams_->device()};
    bool const offload = static_cast<bool>(s.offload), encode = static_cast<bool>(s.train_encode);
    use_ = {true, false, offload, encode};
    index_t const r = options_.reuse;
    run(origin, [&] {
      cudaStream_t const c = streams_->compute(), d2h = streams_->d2h(), side = streams_->side();
      for (index_t i = 0; i < layers; ++i) {
        if (r > 0 && i >= r) {
          // The staging buffer layer i writes was last read by layer i - r.
          auto const slot = static_cast<std::size_t>(2 * (i % r));
          if (offload) { consumed_[slot].wait(c); }
          if (encode) { consumed_[slot + 1].wait(c); }
        }
        s.compute(i, c);
        if (offload || encode) { ready_.record(c); }
        if (offload) {
          ready_.wait(d2h);
          s.offload(i, d2h);
        }
        if (encode) {
          ready_.wait(side);
          s.train_encode(i, side);
        }
        if (r > 0) {
          auto const slot = static_cast<std::size_t>(2 * (i % r));
          if (offload) { consumed_[slot].record(d2h); }
          if (encode) { consumed_[slot + 1].record(side); }
        }
      }
    });
  }

  /// Enqueues a decode step over `layers` layers, forked from and joined
  /// back into `origin`. Throws `pqkv::error` before enqueuing anything when
  /// `compute` is empty or `layers` < 0.
  void decode(index_t layers, decode_stages const& s, cudaStream_t origin)
  {
    constexpr char const* where = "layer_pipeline.decode";
    PQKV_EXPECTS(layers >= 0, where, "layers=", layers, " must be non-negative");
    PQKV_EXPECTS(static_cast<bool>(s.compute), where, "stages.compute is empty");
    device_guard guard{streams_->device()};
    bool const fetch_side = static_cast<bool>(s.fetch) || static_cast<bool>(s.attend_fetched);
    bool const offload = static_cast<bool>(s.offload);
    use_ = {true, fetch_side, offload, false};
    run(origin, [&] {
      cudaStream_t const c = streams_->compute(), h2d = streams_->h2d(), d2h = streams_->d2h();
      for (index_t i = 0; i < layers; ++i) {
        s.compute(i, c);
        if (fetch_side || offload) { ready_.record(c); }
        if (fetch_side) {
          ready_.wait(h2d);
          if (s.fetch) { s.fetch(i, h2d); }
          if (s.attend_fetched) { s.attend_fetched(i, h2d); }
        }
        if (offload) {
          ready_.wait(d2h);
          s.offload(i, d2h);
        }
        if (s.attend_resident) { s.attend_resident(i, c); }
        if (fetch_side) { depend(c, h2d, fetched_); }
        if (s.merge) { s.merge(i, c); }
      }
    });
  }

 private:
  static pipeline_options const& checked(pipeline_options const& o)
  {
    PQKV_EXPECTS(o.reuse >= 0 && o.reuse <= 64, "layer_pipeline", "options.reuse=", o.reuse, " is outside [0, 64]");
    return o;
  }
  static event make_event(stream_set const& streams) { return event{streams.device(), cudaEventDisableTiming}; }

  /// Forks the used streams from `origin`, runs `body`, joins them back
  /// (also when `body` throws).
  template <class Body>
  void run(cudaStream_t origin, Body&& body)
  {
    fork_.record(origin);
    std::size_t forked = 0;
    try {
      for (; forked < stream_roles; ++forked) {
        cudaStream_t const s = streams_->get(static_cast<stream_role>(forked));
        if (use_[forked] && s != origin) { fork_.wait(s); }
      }
      body();
    } catch (...) {
      join(origin, forked, true);
      throw;
    }
    join(origin, forked, false);
  }

  void join(cudaStream_t origin, std::size_t forked, bool quiet)
  {
    for (std::size_t r = 0; r < forked; ++r) {
      cudaStream_t const s = streams_->get(static_cast<stream_role>(r));
      if (!use_[r] || s == origin) { continue; }
      if (quiet) {
        (void)cudaEventRecord(join_[r].get(), s);
        (void)cudaStreamWaitEvent(origin, join_[r].get(), 0);
      } else {
        join_[r].record(s);
        join_[r].wait(origin);
      }
    }
  }

  stream_set const* streams_;
  pipeline_options options_;
  event fork_, ready_, fetched_;
  std::array<event, stream_roles> join_;
  std::vector<event> consumed_;  // [reuse][offload, train_encode]
  std::array<bool, stream_roles> use_{};
};

}  // namespace pqkv::gpu
