// SPDX-License-Identifier: Apache-2.0
// examples/long_context_decode: pqkv's GPU parts composed end to end on a
// synthetic model with Llama-3.1-8B attention shapes (32 q heads, 8 KV heads,
// d = 128, bf16). Per layer:
//   prefill (gpu::layer_pipeline::prefill): the model's K/V (compute), their
//     offload to the pinned gpu::kv_store (d2h), gpu::kmeans_trainer +
//     gpu::pq_encoder (side), overlapping the next layer's compute;
//   decode (gpu::layer_pipeline::decode): the new token's q/k/v (compute), its
//     code appended by gpu::pq_encoder (position read on the device),
//     gpu::adc_topk selection (GQA softmax-sum, sink and window excluded),
//     gpu::slot_table lookup (compute); the gather of the misses from the store
//     into the hot cache and the attention over them (h2d) overlapping the
//     attention over the resident rows (sink, window, cache hits; compute);
//     gpu::merge_state of the two partial states; the new K/V appended to the
//     store (d2h). The attention is the example's own reference kernel
//     (decode_attention.cuh).
// With --gpus G the 8 KV heads are split over G devices, one host thread and
// one full set of objects per device. docs/long_context_decode.md explains
// the output.

#include "decode_attention.cuh"
#include "options.hpp"
#include "synthetic_model.cuh"

#include <pqkv/attend/merge_state.cuh>
#include <pqkv/cache/gpu_cache.cuh>
#include <pqkv/codebook/kmeans.cuh>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/encode/encode.cuh>
#include <pqkv/offload/gather.cuh>
#include <pqkv/offload/kv_store.cuh>
#include <pqkv/schedule/event.cuh>
#include <pqkv/schedule/layer_pipeline.cuh>
#include <pqkv/schedule/stream_set.cuh>
#include <pqkv/score/adc_topk.cuh>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#  include <unistd.h>
#endif

namespace lcd {
namespace {

using pqkv::index_t;
using bf16 = __nv_bfloat16;

constexpr int kv_heads_total = 8;
constexpr int d = head_dim;

// ---------------------------------------------------------------- results

struct prefill_result {
  double compute = 0, offload = 0, train = 0, encode = 0;  // ms summed over layers
  double wall = 0;                                         // ms, the whole pass
  double kmeans_mse = 0;                                   // last layer
};

struct stage_sums {
  double model = 0, encode = 0, score = 0, cache = 0, fetch = 0, att_fetched = 0, att_resident = 0, merge = 0,
         offload = 0;
  stage_sums& operator+=(stage_sums const& o)
  {
    model += o.model, encode += o.encode, score += o.score, cache += o.cache, fetch += o.fetch;
    att_fetched += o.att_fetched, att_resident += o.att_resident, merge += o.merge, offload += o.offload;
    return *this;
  }
  [[nodiscard]] stage_sums scaled(double s) const
  {
    stage_sums r = *this;
    for (double* p : {&r.model, &r.encode, &r.score, &r.cache, &r.fetch, &r.att_fetched, &r.att_resident, &r.merge,
                      &r.offload}) {
      *p *= s;
    }
    return r;
  }
};

struct quality {
  double recall = 0;        // sum over (sequence, KV head) rows
  long rows = 0;
  std::vector<double> mass_ratio;  // per (sequence, q head): mass(sink + window + PQ) / mass(sink + window + exact)
  double err_pq = 0, err_exact = 0;  // sums over (sequence, q head) of relative L2 error vs dense
  double pq_mass = 0, exact_mass = 0;  // sums of the captured masses
  long heads = 0;
  double self_max = 0;  // max relative difference: pipeline output vs the same selection recomputed from the store
};

struct decode_result {
  std::string label;
  std::int64_t k = 0, cache_slots = 0;
  stage_sums stages;          // ms per step (all layers), instrumented run
  double serial = 0, overlapped = 0, graph = -1;  // ms per step
  std::string graph_note;
  double hit_rate = 0;
  long long bypassed = 0, rejected = 0, bad_keys = 0;
  std::size_t hot_bytes = 0, table_bytes = 0;
  std::optional<quality> q;
};

struct device_report {
  int device = 0;
  std::string name;
  int heads = 0, head_offset = 0;
  prefill_result prefill;
  std::vector<decode_result> decodes;
  std::size_t codes_bytes = 0, centroid_bytes = 0, resident_bytes = 0, full_kv_bytes = 0, pinned_bytes = 0;
  int numa_node = -1;
  std::string error;
};

// ---------------------------------------------------------------- helpers

/// Timed events [layers][slots], created once.
class timeline {
 public:
  timeline(int layers, int slots) : slots_{slots}, ev_(static_cast<std::size_t>(layers * slots))
  {
    for (auto& e : ev_) { PQKV_CUDA_TRY(cudaEventCreate(&e)); }
  }
  timeline(timeline const&) = delete;
  timeline& operator=(timeline const&) = delete;
  ~timeline()
  {
    for (auto e : ev_) { cudaEventDestroy(e); }
  }
  void record(int layer, int slot, cudaStream_t s) { PQKV_CUDA_TRY(cudaEventRecord(at(layer, slot), s)); }
  [[nodiscard]] double ms(int layer, int from, int to) const
  {
    float t = 0;
    PQKV_CUDA_TRY(cudaEventElapsedTime(&t, at(layer, from), at(layer, to)));
    return t;
  }

 private:
  [[nodiscard]] cudaEvent_t at(int layer, int slot) const { return ev_[static_cast<std::size_t>(layer * slots_ + slot)]; }
  int slots_;
  std::vector<cudaEvent_t> ev_;
};

/// Copies the sink rows and the window rows (into the ring, slot = position % window)
/// of a prefill's K/V [batch, heads, n, d]. grid (batch * heads), block 256.
__global__ void copy_resident(bf16 const* keys, bf16 const* values, std::int64_t n, bf16* sink_k, bf16* sink_v, int sink,
                              bf16* win_k, bf16* win_v, int window)
{
  std::int64_t const row = blockIdx.x;
  std::int64_t const sc = sink < n ? sink : n;
  std::int64_t const wc = window < n - sc ? window : n - sc;
  constexpr int chunks = d * static_cast<int>(sizeof(bf16)) / 16;
  for (std::int64_t i = threadIdx.x; i < (sc + wc) * chunks; i += blockDim.x) {
    std::int64_t const r = i / chunks, c = i % chunks;
    std::int64_t const pos = r < sc ? r : n - wc + (r - sc);
    auto const* src_k = reinterpret_cast<uint4 const*>(keys + (row * n + pos) * d) + c;
    auto const* src_v = reinterpret_cast<uint4 const*>(values + (row * n + pos) * d) + c;
    std::int64_t const dst = r < sc ? (row * sink + pos) : (row * window + pos % window);
    bf16* dk = r < sc ? sink_k : win_k;
    bf16* dv = r < sc ? sink_v : win_v;
    reinterpret_cast<uint4*>(dk + dst * d)[c] = *src_k;
    reinterpret_cast<uint4*>(dv + dst * d)[c] = *src_v;
  }
}

/// One decode step's lengths: positions[b] = lengths[b] (the new token's
/// position), lengths[b] += 1. Read on the device by every stage, so a
/// captured step replays as the sequences grow.
__global__ void advance_lengths(std::int32_t* lengths, std::int64_t* positions, int batch)
{
  int const b = static_cast<int>(threadIdx.x);
  if (b < batch) {
    positions[b] = lengths[b];
    lengths[b] += 1;
  }
}

__global__ void set_lengths(std::int32_t* lengths, int batch, std::int32_t n)
{
  int const b = static_cast<int>(threadIdx.x);
  if (b < batch) { lengths[b] = n; }
}

template <class T>
pqkv::device_buffer<T> device_array(std::size_t n)
{
  return pqkv::device_buffer<T>(std::max<std::size_t>(n, 1));
}

template <class T>
std::vector<T> to_host(T const* p, std::size_t n, cudaStream_t s)
{
  std::vector<T> v(n);
  if (n > 0) {
    PQKV_CUDA_TRY(cudaMemcpyAsync(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost, s));
    PQKV_CUDA_TRY(cudaStreamSynchronize(s));
  }
  return v;
}

double host_memory_bytes()
{
#if defined(__linux__)
  long const pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && size > 0) { return static_cast<double>(pages) * static_cast<double>(size); }
#endif
  return 0;
}

double gib(double bytes) { return bytes / (1024.0 * 1024.0 * 1024.0); }

// ---------------------------------------------------------------- the per-device run

/// Everything one device holds for one batch size, and the run over the budgets.
class device_run {
 public:
  device_run(options const& o, int batch, int device, int index, std::barrier<>& sync, device_report& out)
    : o_{o}, batch_{batch}, device_{device}, sync_{sync}, out_{out}
  {
    heads_ = kv_heads_total / o.gpus;
    qheads_ = heads_ * group;
    head_offset_ = index * heads_;
    n_ = o.tokens;
    std::int64_t const modes = 4;  // warm-up + instrumented, overlapped, serial, graph: steps per mode
    cap_ = n_ + static_cast<std::int64_t>(o.budgets.size()) * (modes * o.steps + 8) + 8;
    out_.device = device;
    out_.heads = heads_;
    out_.head_offset = head_offset_;
  }

  void run()
  {
    PQKV_CUDA_TRY(cudaSetDevice(device_));
    cudaDeviceProp prop{};
    PQKV_CUDA_TRY(cudaGetDeviceProperties(&prop, device_));
    out_.name = prop.name;
    sms_ = prop.multiProcessorCount;
    setup();
    sync_.arrive_and_wait();
    prefill();
    for (auto const& b : o_.budgets) {
      sync_.arrive_and_wait();
      decode(b);
    }
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
  }

 private:
  // ---- shapes ----
  [[nodiscard]] std::size_t rows() const { return static_cast<std::size_t>(batch_ * heads_); }
  [[nodiscard]] std::size_t ksub() const { return std::size_t{1} << o_.nbits; }
  [[nodiscard]] std::size_t centroid_elems() const
  {
    return static_cast<std::size_t>(heads_) * o_.m * ksub() * (d / o_.m);
  }
  [[nodiscard]] std::size_t code_elems() const { return rows() * static_cast<std::size_t>(cap_) * o_.m; }  // per layer
  [[nodiscard]] pqkv::pq_config pq() const
  {
    pqkv::pq_config c;
    c.dim = d;
    c.m = o_.m;
    c.nbits = o_.nbits;
    c.max_iter = o_.iters;
    c.seed = o_.seed;
    c.init = pqkv::init_method::kmeans_plus_plus;
    c.max_train_points = 0;  // the example subsamples with a strided view instead (train_stride)
    return c;
  }
  /// k-means trains on every train_stride()-th key: a strided view, so no
  /// subsample draw (the trainer's own draw is a sequential shuffle per head).
  [[nodiscard]] std::int64_t train_stride() const
  {
    return o_.train_points > 0 && o_.train_points < n_ ? n_ / o_.train_points : 1;
  }
  [[nodiscard]] std::int64_t train_count() const { return n_ / train_stride(); }
  [[nodiscard]] float* centroids(int l) const { return cent_.data() + static_cast<std::size_t>(l) * centroid_elems(); }
  [[nodiscard]] std::uint8_t* codes(int l) const { return codes_.data() + static_cast<std::size_t>(l) * code_elems(); }
  [[nodiscard]] bf16* sink_k(int l) const { return sink_k_.data() + static_cast<std::size_t>(l) * rows() * sink_rows() * d; }
  [[nodiscard]] bf16* sink_v(int l) const { return sink_v_.data() + static_cast<std::size_t>(l) * rows() * sink_rows() * d; }
  [[nodiscard]] bf16* win_k(int l) const { return win_k_.data() + static_cast<std::size_t>(l) * rows() * o_.window * d; }
  [[nodiscard]] bf16* win_v(int l) const { return win_v_.data() + static_cast<std::size_t>(l) * rows() * o_.window * d; }
  [[nodiscard]] std::size_t sink_rows() const { return static_cast<std::size_t>(std::max(o_.sink, 1)); }
  [[nodiscard]] bf16 const* store_k(int l) const
  {
    return store_->ref().keys + static_cast<std::size_t>(l) * rows() * static_cast<std::size_t>(cap_) * d;
  }
  [[nodiscard]] bf16 const* store_v(int l) const
  {
    return store_->ref().values + static_cast<std::size_t>(l) * rows() * static_cast<std::size_t>(cap_) * d;
  }

  void setup()
  {
    int const L = o_.layers;
    model_ = std::make_unique<synthetic_model>(L, heads_, head_offset_, o_.seed, n_);
    store_ = std::make_unique<pqkv::gpu::kv_store<bf16>>(
      pqkv::gpu::kv_store_shape{L, batch_, heads_, cap_, d});
    out_.numa_node = store_->numa_node();
    out_.pinned_bytes = 2 * static_cast<std::size_t>(store_->shape().elements()) * sizeof(bf16);
    codes_ = device_array<std::uint8_t>(static_cast<std::size_t>(L) * code_elems());
    PQKV_CUDA_TRY(cudaMemset(codes_.data(), 0, codes_.size_bytes()));
    cent_ = device_array<float>(static_cast<std::size_t>(L) * centroid_elems());
    sink_k_ = device_array<bf16>(static_cast<std::size_t>(L) * rows() * sink_rows() * d);
    sink_v_ = device_array<bf16>(sink_k_.size());
    win_k_ = device_array<bf16>(static_cast<std::size_t>(L) * rows() * o_.window * d);
    win_v_ = device_array<bf16>(win_k_.size());
    out_.codes_bytes = static_cast<std::size_t>(L) * rows() * static_cast<std::size_t>(n_) * o_.m;
    out_.centroid_bytes = cent_.size_bytes();
    out_.resident_bytes = static_cast<std::size_t>(L) * rows() * (static_cast<std::size_t>(o_.sink) + o_.window) * d * 2 * sizeof(bf16);
    out_.full_kv_bytes = static_cast<std::size_t>(L) * rows() * static_cast<std::size_t>(n_) * d * 2 * sizeof(bf16);
    lengths_ = device_array<std::int32_t>(static_cast<std::size_t>(batch_));
    positions_ = device_array<std::int64_t>(static_cast<std::size_t>(batch_));
    q_ = device_array<bf16>(static_cast<std::size_t>(L) * batch_ * qheads_ * d);
    new_k_ = device_array<bf16>(static_cast<std::size_t>(L) * rows() * d);
    new_v_ = device_array<bf16>(new_k_.size());
    out_v_ = device_array<float>(static_cast<std::size_t>(L) * batch_ * qheads_ * d);
    out_lse_ = device_array<float>(static_cast<std::size_t>(L) * batch_ * qheads_);
    streams_ = std::make_unique<pqkv::gpu::stream_set>(pqkv::gpu::stream_priorities{}, device_);
    serial_streams_ = std::make_unique<pqkv::gpu::stream_set>(pqkv::gpu::stream_set::wrap(
      device_, streams_->compute(), streams_->compute(), streams_->compute(), streams_->compute()));
    times_ = std::make_unique<timeline>(L, 16);
    PQKV_CUDA_TRY(cudaEventCreate(&step_begin_));
    PQKV_CUDA_TRY(cudaEventCreate(&step_end_));
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
  }

  // ---------------------------------------------------------------- prefill

  void prefill()
  {
    int const L = o_.layers;
    cudaStream_t const origin = streams_->compute();
    std::size_t const stage_elems = rows() * static_cast<std::size_t>(n_) * d;
    pqkv::device_buffer<bf16> stage_k[2] = {device_array<bf16>(stage_elems), device_array<bf16>(stage_elems)};
    pqkv::device_buffer<bf16> stage_v[2] = {device_array<bf16>(stage_elems), device_array<bf16>(stage_elems)};
    pqkv::gpu::kmeans_trainer trainer{pq(), {heads_, train_count()}};
    pqkv::device_buffer<std::byte> ws = device_array<std::byte>(trainer.workspace_bytes());
    encoder_ = std::make_unique<pqkv::gpu::pq_encoder>(pq());
    pqkv::gpu::pq_encoder const& encoder = *encoder_;
    pqkv::gpu::layer_pipeline pipe{*streams_, {.reuse = 2}};
    auto const m = static_cast<index_t>(o_.m), ks = static_cast<index_t>(ksub()), dsub = static_cast<index_t>(d / o_.m);
    auto const H = static_cast<index_t>(heads_);
    pqkv::gpu::prefill_stages stages;
    stages.compute = [&](index_t li, cudaStream_t s) {
      int const l = static_cast<int>(li);
      bf16* k = stage_k[l % 2].data();
      bf16* v = stage_v[l % 2].data();
      times_->record(l, 0, s);
      model_->prefill(l, batch_, n_, k, v, s);
      copy_resident<<<static_cast<unsigned>(rows()), 256, 0, s>>>(k, v, n_, sink_k(l), sink_v(l), o_.sink, win_k(l),
                                                                   win_v(l), o_.window);
      PQKV_CUDA_CHECK_LAST();
      times_->record(l, 1, s);
    };
    stages.offload = [&](index_t li, cudaStream_t s) {
      int const l = static_cast<int>(li);
      times_->record(l, 2, s);
      for (int b = 0; b < batch_; ++b) {
        std::size_t const off = static_cast<std::size_t>(b) * heads_ * static_cast<std::size_t>(n_) * d;
        store_->append(li, b, pqkv::make_view(static_cast<bf16 const*>(stage_k[l % 2].data() + off), H, n_, index_t{d}),
                       pqkv::make_view(static_cast<bf16 const*>(stage_v[l % 2].data() + off), H, n_, index_t{d}), s);
      }
      times_->record(l, 3, s);
    };
    stages.train_encode = [&](index_t li, cudaStream_t s) {
      int const l = static_cast<int>(li);
      times_->record(l, 4, s);
      // One codebook per KV head, trained on sequence 0's keys and shared by the batch.
      trainer.train(pqkv::make_strided_view<bf16 const, 3>(stage_k[l % 2].data(), {H, train_count(), index_t{d}},
                                                           {n_ * d, train_stride() * d, index_t{1}}),
                    pqkv::make_view(centroids(l), H, m, ks, dsub), ws.span(), s);
      times_->record(l, 5, s);
      // One call per sequence: its heads' keys into the first n rows of its
      // code buffer (sized for the whole context).
      for (int b = 0; b < batch_; ++b) {
        std::size_t const row = static_cast<std::size_t>(b) * heads_;
        encoder.encode(
          pqkv::make_view(static_cast<bf16 const*>(stage_k[l % 2].data() + row * static_cast<std::size_t>(n_) * d), H, n_, d),
          pqkv::make_view(static_cast<float const*>(centroids(l)), H, m, ks, dsub),
          pqkv::make_view(codes(l) + row * static_cast<std::size_t>(cap_) * o_.m, H, cap_, m), s);
      }
      times_->record(l, 6, s);
    };
    PQKV_CUDA_TRY(cudaEventRecord(step_begin_, origin));
    pipe.prefill(L, stages, origin);
    PQKV_CUDA_TRY(cudaEventRecord(step_end_, origin));
    PQKV_CUDA_TRY(cudaEventSynchronize(step_end_));
    auto& r = out_.prefill;
    for (int l = 0; l < L; ++l) {
      r.compute += times_->ms(l, 0, 1);
      r.offload += times_->ms(l, 2, 3);
      r.train += times_->ms(l, 4, 5);
      r.encode += times_->ms(l, 5, 6);
    }
    float wall = 0;
    PQKV_CUDA_TRY(cudaEventElapsedTime(&wall, step_begin_, step_end_));
    r.wall = wall;
    r.kmeans_mse = trainer.report(ws.span(), origin).mse;
    set_lengths<<<1, 64, 0, origin>>>(lengths_.data(), batch_, static_cast<std::int32_t>(n_));
    PQKV_CUDA_CHECK_LAST();
    PQKV_CUDA_TRY(cudaStreamSynchronize(origin));
    host_len_ = n_;
  }

  // ---------------------------------------------------------------- decode

  struct per_budget {
    std::int64_t k = 0, slots = 0;
    int splits = 1;
    std::unique_ptr<pqkv::gpu::adc_topk<pqkv::gqa::softmax_sum>> select;
    std::unique_ptr<pqkv::gpu::slot_table<pqkv::cache::lru>> table;
    pqkv::device_buffer<std::byte> select_ws;
    pqkv::device_buffer<bf16> hot_k, hot_v;                 // [layers, batch, heads, slots, d]
    pqkv::device_buffer<std::int32_t> sel, slot, valid;     // [layers, batch, heads, k], [layers, batch, heads]
    pqkv::device_buffer<std::int32_t> stats;                // [layers, rows, 4]
    pqkv::device_buffer<std::int32_t> rejected;             // [1]
    pqkv::device_buffer<float> res_part, res_plse, fet_part, fet_plse;  // [batch, splits, qheads, d], [.., qheads]
    pqkv::device_buffer<float> res_v, res_lse, fet_v, fet_lse;          // [batch, qheads, d], [batch, qheads]
  };

  [[nodiscard]] attend_args args_for(per_budget const& p, int l) const
  {
    attend_args a;
    a.q = q_.data() + static_cast<std::size_t>(l) * batch_ * qheads_ * d;
    a.batch = batch_;
    a.heads = heads_;
    a.seq_lens = lengths_.data();
    a.sink = o_.sink;
    a.window = o_.window;
    a.sink_k = sink_k(l);
    a.sink_v = sink_v(l);
    a.win_k = win_k(l);
    a.win_v = win_v(l);
    a.sel = p.sel.data() + static_cast<std::size_t>(l) * rows() * static_cast<std::size_t>(p.k);
    a.slots = p.slot.data() + static_cast<std::size_t>(l) * rows() * static_cast<std::size_t>(p.k);
    a.hit = p.table->last().hit;
    a.kmax = static_cast<int>(p.k);
    a.hot_k = p.hot_k.data() + static_cast<std::size_t>(l) * rows() * static_cast<std::size_t>(p.slots) * d;
    a.hot_v = p.hot_v.data() + static_cast<std::size_t>(l) * rows() * static_cast<std::size_t>(p.slots) * d;
    a.cap = p.slots;
    a.store_k = store_k(l);
    a.store_v = store_v(l);
    a.store_cap = cap_;
    return a;
  }

  /// The decode stages of one step; `instrument` records the timeline, `offload` includes the store append
  /// (at the device's committed count when `in_graph`, so that replays append at the new end).
  pqkv::gpu::decode_stages stages_for(per_budget& p, bool instrument, bool offload, bool in_graph = false)
  {
    auto const H = static_cast<index_t>(heads_), B = static_cast<index_t>(batch_), K = static_cast<index_t>(p.k);
    auto const m = static_cast<index_t>(o_.m), ks = static_cast<index_t>(ksub()), dsub = static_cast<index_t>(d / o_.m);
    auto mark = [this, instrument](int l, int slot, cudaStream_t s) {
      if (instrument) { times_->record(l, slot, s); }
    };
    pqkv::gpu::decode_stages st;
    st.compute = [this, &p, mark, H, B, K, m, ks, dsub](index_t li, cudaStream_t s) {
      int const l = static_cast<int>(li);
      mark(l, 0, s);
      bf16* q = q_.data() + static_cast<std::size_t>(l) * batch_ * qheads_ * d;
      bf16* nk = new_k_.data() + static_cast<std::size_t>(l) * rows() * d;
      bf16* nv = new_v_.data() + static_cast<std::size_t>(l) * rows() * d;
      model_->decode(l, batch_, positions_.data(), nk, nv, win_k(l), win_v(l), o_.window, q, s);
      mark(l, 1, s);
      auto const cent = pqkv::make_view(static_cast<float const*>(centroids(l)), H, m, ks, dsub);
      for (int b = 0; b < batch_; ++b) {
        encoder_->append(pqkv::make_view(static_cast<bf16 const*>(nk + static_cast<std::size_t>(b) * heads_ * d), H, 1, d),
                         cent, pqkv::make_view(codes(l) + static_cast<std::size_t>(b) * heads_ * static_cast<std::size_t>(cap_) * o_.m, H, cap_, m),
                         std::span<index_t const>(positions_.data() + b, 1), s);
      }
      mark(l, 2, s);
      std::int32_t* sel = p.sel.data() + static_cast<std::size_t>(l) * rows() * static_cast<std::size_t>(p.k);
      (*p.select)(pqkv::make_view(static_cast<bf16 const*>(q), B, static_cast<index_t>(qheads_), index_t{d}),
                  pqkv::make_view(static_cast<std::uint8_t const*>(codes(l)), B, H, cap_, m), cent,
                  std::span<std::int32_t const>(lengths_.data(), static_cast<std::size_t>(batch_)),
                  pqkv::make_view(sel, B, H, K), pqkv::make_view(p.valid.data() + static_cast<std::size_t>(l) * rows(), B, H),
                  p.select_ws.span(), s);
      mark(l, 3, s);
      std::int32_t* slot = p.slot.data() + static_cast<std::size_t>(l) * rows() * static_cast<std::size_t>(p.k);
      p.table->access(li, pqkv::make_view(static_cast<std::int32_t const*>(sel), B, H, K), {},
                      pqkv::make_view(slot, B, H, K), s);
      PQKV_CUDA_TRY(cudaMemcpyAsync(p.stats.data() + static_cast<std::size_t>(l) * rows() * 4, p.table->last().counters,
                                    rows() * 4 * sizeof(std::int32_t), cudaMemcpyDeviceToDevice, s));
      mark(l, 4, s);
    };
    st.fetch = [this, &p, mark, H, B](index_t li, cudaStream_t s) {
      int const l = static_cast<int>(li);
      mark(l, 5, s);
      std::size_t const hot = static_cast<std::size_t>(l) * rows() * static_cast<std::size_t>(p.slots) * d;
      p.table->fetch_inserted(store_->ref(),
                              pqkv::make_view(p.hot_k.data() + hot, B, H, static_cast<index_t>(p.slots), index_t{d}),
                              pqkv::make_view(p.hot_v.data() + hot, B, H, static_cast<index_t>(p.slots), index_t{d}),
                              p.rejected.data(), s);
      mark(l, 6, s);
    };
    st.attend_fetched = [this, &p, mark](index_t li, cudaStream_t s) {
      int const l = static_cast<int>(li);
      attend<row_set::fetched>(args_for(p, l), p.splits, p.fet_part.data(), p.fet_plse.data(), p.fet_v.data(),
                               p.fet_lse.data(), s);
      mark(l, 7, s);
    };
    st.attend_resident = [this, &p, mark](index_t li, cudaStream_t s) {
      int const l = static_cast<int>(li);
      mark(l, 8, s);
      attend<row_set::resident>(args_for(p, l), p.splits, p.res_part.data(), p.res_plse.data(), p.res_v.data(),
                                p.res_lse.data(), s);
      mark(l, 9, s);
    };
    st.merge = [this, &p, mark, B](index_t li, cudaStream_t s) {
      int const l = static_cast<int>(li);
      auto const Q = static_cast<index_t>(qheads_);
      float* ov = out_v_.data() + static_cast<std::size_t>(l) * batch_ * qheads_ * d;
      float* ol = out_lse_.data() + static_cast<std::size_t>(l) * batch_ * qheads_;
      pqkv::gpu::merge_state<float>(pqkv::make_view(static_cast<float const*>(p.res_v.data()), B, Q, index_t{d}),
                                    pqkv::make_view(static_cast<float const*>(p.res_lse.data()), B, Q),
                                    pqkv::make_view(static_cast<float const*>(p.fet_v.data()), B, Q, index_t{d}),
                                    pqkv::make_view(static_cast<float const*>(p.fet_lse.data()), B, Q),
                                    pqkv::make_view(ov, B, Q, index_t{d}), pqkv::make_view(ol, B, Q), s);
      mark(l, 10, s);
    };
    if (offload) {
      st.offload = [this, mark, in_graph](index_t li, cudaStream_t s) {
        int const l = static_cast<int>(li);
        mark(l, 11, s);
        append_new(l, s, in_graph);
        mark(l, 12, s);
      };
    }
    return st;
  }

  /// The new token's K/V of layer l into the store (d2h): at the host's size,
  /// or at the device's committed count (`device_side`, capturable).
  void append_new(int l, cudaStream_t s, bool device_side = false)
  {
    auto const H = static_cast<index_t>(heads_);
    for (int b = 0; b < batch_; ++b) {
      std::size_t const off = (static_cast<std::size_t>(l) * rows() + static_cast<std::size_t>(b) * heads_) * d;
      auto const k = pqkv::make_view(static_cast<bf16 const*>(new_k_.data() + off), H, 1, d);
      auto const v = pqkv::make_view(static_cast<bf16 const*>(new_v_.data() + off), H, 1, d);
      if (device_side) {
        store_->append_at_committed(l, b, k, v, s);
      } else {
        store_->append(l, b, k, v, s);
      }
    }
  }

  /// Enqueues one step (eager) on `origin` through `pipe`.
  void eager_step(pqkv::gpu::layer_pipeline& pipe, pqkv::gpu::decode_stages const& st, cudaStream_t origin)
  {
    advance_lengths<<<1, 64, 0, origin>>>(lengths_.data(), positions_.data(), batch_);
    PQKV_CUDA_CHECK_LAST();
    pipe.decode(o_.layers, st, origin);
    ++host_len_;
  }

  double elapsed(cudaEvent_t a, cudaEvent_t b) const
  {
    PQKV_CUDA_TRY(cudaEventSynchronize(b));
    float t = 0;
    PQKV_CUDA_TRY(cudaEventElapsedTime(&t, a, b));
    return t;
  }

  void decode(budget const& bud)
  {
    int const L = o_.layers;
    decode_result res;
    res.label = bud.label();
    per_budget p;
    p.k = bud.resolve(n_);
    p.slots = o_.cache_slots > 0 ? o_.cache_slots : p.k;
    res.k = p.k;
    res.cache_slots = p.slots;
    auto const B = static_cast<index_t>(batch_);
    pqkv::selection_params params;
    params.k = p.k;
    params.sink = o_.sink;
    params.window = o_.window;
    pqkv::gpu::adc_limits limits;
    limits.max_batch = B;
    limits.max_tokens = cap_;
    p.select = std::make_unique<pqkv::gpu::adc_topk<pqkv::gqa::softmax_sum>>(
      pqkv::adc_shape{qheads_, heads_, d, o_.m, o_.nbits}, params, limits);
    p.select_ws = device_array<std::byte>(p.select->workspace_bytes());
    pqkv::gpu::slot_table_shape ts;
    ts.layers = L;
    ts.batch = B;
    ts.kv_heads = heads_;
    ts.capacity = static_cast<std::uint32_t>(p.slots);
    ts.key_bound = static_cast<std::int32_t>(cap_);
    ts.max_keys = p.k;
    p.table = std::make_unique<pqkv::gpu::slot_table<pqkv::cache::lru>>(ts);
    std::size_t const hot = static_cast<std::size_t>(L) * rows() * static_cast<std::size_t>(p.slots) * d;
    p.hot_k = device_array<bf16>(hot);
    p.hot_v = device_array<bf16>(hot);
    std::size_t const selections = static_cast<std::size_t>(L) * rows() * static_cast<std::size_t>(p.k);
    p.sel = device_array<std::int32_t>(selections);
    p.slot = device_array<std::int32_t>(selections);
    p.valid = device_array<std::int32_t>(static_cast<std::size_t>(L) * rows());
    p.stats = device_array<std::int32_t>(static_cast<std::size_t>(L) * rows() * 4);
    p.rejected = device_array<std::int32_t>(1);
    PQKV_CUDA_TRY(cudaMemset(p.stats.data(), 0, p.stats.size_bytes()));
    PQKV_CUDA_TRY(cudaMemset(p.rejected.data(), 0, sizeof(std::int32_t)));
    // Split each (sequence, KV head) row set over enough blocks to fill the device twice.
    p.splits = static_cast<int>(std::clamp<std::int64_t>((2 * sms_ + static_cast<std::int64_t>(rows()) - 1) /
                                                           static_cast<std::int64_t>(rows()),
                                                         1, std::max<std::int64_t>(1, (p.k + o_.sink + o_.window) / 64)));
    std::size_t const part = static_cast<std::size_t>(batch_) * p.splits * qheads_;
    p.res_part = device_array<float>(part * d);
    p.fet_part = device_array<float>(part * d);
    p.res_plse = device_array<float>(part);
    p.fet_plse = device_array<float>(part);
    p.res_v = device_array<float>(static_cast<std::size_t>(batch_) * qheads_ * d);
    p.fet_v = device_array<float>(p.res_v.size());
    p.res_lse = device_array<float>(static_cast<std::size_t>(batch_) * qheads_);
    p.fet_lse = device_array<float>(p.res_lse.size());
    res.hot_bytes = 2 * hot * sizeof(bf16);
    res.table_bytes = p.table->state_bytes();
    PQKV_CUDA_TRY(cudaDeviceSynchronize());

    cudaStream_t const origin = streams_->compute();
    pqkv::gpu::layer_pipeline pipe{*streams_};
    pqkv::gpu::layer_pipeline serial{*serial_streams_};
    auto const plain = stages_for(p, false, true);
    auto const timed = stages_for(p, true, true);

    // warm-up (fills the cache once)
    for (int s = 0; s < 2; ++s) { eager_step(pipe, plain, origin); }
    PQKV_CUDA_TRY(cudaStreamSynchronize(origin));

    // 1. instrumented: per-stage times; quality on the first check_steps steps
    std::vector<int> check_layers;
    for (int l : {0, L / 2, L - 1}) {
      if (std::find(check_layers.begin(), check_layers.end(), l) == check_layers.end()) { check_layers.push_back(l); }
    }
    if (o_.check) { res.q.emplace(); }
    std::vector<std::int32_t> stats_sum(4, 0);
    long long hits = 0, misses = 0;
    for (int s = 0; s < o_.steps; ++s) {
      eager_step(pipe, timed, origin);
      PQKV_CUDA_TRY(cudaStreamSynchronize(origin));
      stage_sums st;
      for (int l = 0; l < L; ++l) {
        st.model += times_->ms(l, 0, 1);
        st.encode += times_->ms(l, 1, 2);
        st.score += times_->ms(l, 2, 3);
        st.cache += times_->ms(l, 3, 4);
        st.fetch += times_->ms(l, 5, 6);
        st.att_fetched += times_->ms(l, 6, 7);
        st.att_resident += times_->ms(l, 8, 9);
        st.merge += times_->ms(l, 9, 10);
        st.offload += times_->ms(l, 11, 12);
      }
      res.stages += st.scaled(1.0 / o_.steps);
      auto const stats = to_host(p.stats.data(), p.stats.size(), origin);
      for (std::size_t i = 0; i < stats.size(); i += 4) {
        hits += stats[i];
        misses += stats[i + 1];
        res.bypassed += stats[i + 2];
        res.bad_keys += stats[i + 3];
      }
      if (res.q && s < o_.check_steps) {
        for (int l : check_layers) { check(p, l, *res.q); }
      }
    }
    res.hit_rate = hits + misses > 0 ? static_cast<double>(hits) / static_cast<double>(hits + misses) : 0.0;

    // 2. overlapped eager steps, 3. serial (every role on one stream)
    sync_.arrive_and_wait();
    res.overlapped = timed_steps(pipe, plain, origin);
    sync_.arrive_and_wait();
    res.serial = timed_steps(serial, plain, origin);

    // 4. CUDA graph of the whole step (the store append stays eager: see below)
    sync_.arrive_and_wait();
    if (o_.graph) { graph_steps(pipe, p, res); }
    res.rejected = to_host(p.rejected.data(), 1, origin)[0];
    out_.decodes.push_back(std::move(res));
  }

  double timed_steps(pqkv::gpu::layer_pipeline& pipe, pqkv::gpu::decode_stages const& st, cudaStream_t origin)
  {
    double total = 0;
    for (int s = 0; s < o_.steps; ++s) {
      PQKV_CUDA_TRY(cudaEventRecord(step_begin_, origin));
      eager_step(pipe, st, origin);
      PQKV_CUDA_TRY(cudaEventRecord(step_end_, origin));
      total += elapsed(step_begin_, step_end_);
    }
    return total / o_.steps;
  }

  /// Captures one whole step, the store append included: it appends at the
  /// device's committed count (`kv_store::append_at_committed`), so every
  /// replay appends at the new end. Afterwards the host takes the store's
  /// sizes back (`truncate` to the committed counts) for the eager steps.
  void graph_steps(pqkv::gpu::layer_pipeline& pipe, per_budget& p, decode_result& res)
  {
    cudaStream_t const origin = streams_->compute();
    auto const st = stages_for(p, false, true, true);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    PQKV_CUDA_TRY(cudaStreamSynchronize(origin));
    PQKV_CUDA_TRY(cudaStreamBeginCapture(origin, cudaStreamCaptureModeThreadLocal));
    try {
      advance_lengths<<<1, 64, 0, origin>>>(lengths_.data(), positions_.data(), batch_);
      PQKV_CUDA_CHECK_LAST();
      pipe.decode(o_.layers, st, origin);
    } catch (std::exception const& e) {
      cudaGraph_t g = nullptr;
      (void)cudaStreamEndCapture(origin, &g);
      if (g != nullptr) { cudaGraphDestroy(g); }
      (void)cudaGetLastError();
      res.graph_note = std::string("capture failed: ") + e.what();
      return;
    }
    PQKV_CUDA_TRY(cudaStreamEndCapture(origin, &graph));
    PQKV_CUDA_TRY(cudaGraphInstantiate(&exec, graph, 0));
    double total = 0;
    for (int s = 0; s < o_.steps + 1; ++s) {  // the first replay uploads the graph: not timed
      PQKV_CUDA_TRY(cudaEventRecord(step_begin_, origin));
      PQKV_CUDA_TRY(cudaGraphLaunch(exec, origin));
      PQKV_CUDA_TRY(cudaEventRecord(step_end_, origin));
      ++host_len_;
      double const t = elapsed(step_begin_, step_end_);
      if (s > 0) { total += t; }
    }
    PQKV_CUDA_TRY(cudaStreamSynchronize(origin));
    res.graph = total / o_.steps;
    res.graph_note = "the store append inside the graph (at the device's committed count)";
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    // The host takes the sizes back: every (layer, sequence) holds host_len_ rows.
    std::vector<std::int32_t> committed(static_cast<std::size_t>(o_.layers) * static_cast<std::size_t>(batch_));
    PQKV_CUDA_TRY(cudaMemcpy(committed.data(), store_->committed(), committed.size() * sizeof(std::int32_t),
                             cudaMemcpyDeviceToHost));
    for (int l = 0; l < o_.layers; ++l) {
      for (int b = 0; b < batch_; ++b) {
        auto const c = committed[static_cast<std::size_t>(l) * static_cast<std::size_t>(batch_) + static_cast<std::size_t>(b)];
        PQKV_EXPECTS(c == host_len_, "long_context_decode", "layer ", l, ", sequence ", b, ": the store holds ", c,
                     " rows after the graph steps, expected ", host_len_);
        store_->truncate(l, b, c, origin);
      }
    }
  }

  // ---------------------------------------------------------------- quality check

  /// After a step: for layer l, exact logits of every token (from the store),
  /// dense attention, the exact top-k under the same rule (softmax per q head
  /// over the candidates, summed over the group), and the attention over
  /// sink + window + that top-k, against the pipeline's output.
  void check(per_budget const& p, int l, quality& q)
  {
    cudaStream_t const s = streams_->compute();
    std::int64_t const n = host_len_;
    auto const Q = static_cast<std::size_t>(qheads_);
    if (check_logits_.size() < static_cast<std::size_t>(batch_) * Q * static_cast<std::size_t>(n)) {
      check_logits_ = device_array<float>(static_cast<std::size_t>(batch_) * Q * static_cast<std::size_t>(n) + 4096 * Q);
    }
    int const splits = static_cast<int>(std::clamp<std::int64_t>(4 * sms_ / static_cast<std::int64_t>(rows()), 1, 256));
    std::size_t const part = static_cast<std::size_t>(batch_) * splits * Q;
    if (check_part_.size() < part * d) {
      check_part_ = device_array<float>(part * d);
      check_plse_ = device_array<float>(part);
    }
    if (check_out_.size() < 3 * static_cast<std::size_t>(batch_) * Q * d) {
      check_out_ = device_array<float>(3 * static_cast<std::size_t>(batch_) * Q * d);
      check_lse_ = device_array<float>(3 * static_cast<std::size_t>(batch_) * Q);
    }
    std::size_t const sel_elems = rows() * static_cast<std::size_t>(p.k);
    if (check_list_.size() < sel_elems) { check_list_ = device_array<std::int32_t>(sel_elems); }
    PQKV_EXPECTS((n + 63) / 64 <= 65535, "long_context_decode.check", "n=", n, " exceeds the logits kernel's grid");

    attend_args a = args_for(p, l);
    std::size_t const bq = static_cast<std::size_t>(batch_) * Q;
    float* dense_v = check_out_.data();
    float* exact_v = dense_v + bq * d;
    float* self_v = exact_v + bq * d;
    logits(a, check_logits_.data(), n, s);
    attend<row_set::dense>(a, splits, check_part_.data(), check_plse_.data(), dense_v, check_lse_.data(), s);
    attend<row_set::listed>(a, splits, check_part_.data(), check_plse_.data(), self_v, check_lse_.data() + 2 * bq, s);
    auto const logit = to_host(check_logits_.data(), bq * static_cast<std::size_t>(n), s);
    auto const sel = to_host(a.sel, sel_elems, s);

    // exact selection, per (sequence, KV head)
    std::int64_t const first = o_.sink, last = n - o_.window;  // candidates [first, last)
    std::int64_t const cand = std::max<std::int64_t>(0, last - first);
    std::int64_t const k_eff = std::min<std::int64_t>(p.k, cand);
    std::vector<std::int32_t> exact(sel_elems, -1);
    std::vector<double> score(static_cast<std::size_t>(cand));
    std::vector<std::int32_t> order(static_cast<std::size_t>(cand));
    std::vector<std::vector<std::int32_t>> exact_rows(rows());
    for (int b = 0; b < batch_; ++b) {
      for (int g = 0; g < heads_; ++g) {
        std::fill(score.begin(), score.end(), 0.0);
        for (int h = 0; h < group; ++h) {
          float const* x = logit.data() + ((static_cast<std::size_t>(b) * Q + static_cast<std::size_t>(g) * group + h) *
                                           static_cast<std::size_t>(n));
          float mx = -INFINITY;
          for (std::int64_t t = first; t < last; ++t) { mx = std::max(mx, x[t]); }
          double z = 0;
          for (std::int64_t t = first; t < last; ++t) { z += std::exp(static_cast<double>(x[t] - mx)); }
          for (std::int64_t t = first; t < last; ++t) {
            score[static_cast<std::size_t>(t - first)] += std::exp(static_cast<double>(x[t] - mx)) / z;
          }
        }
        std::iota(order.begin(), order.end(), static_cast<std::int32_t>(first));
        auto const better = [&](std::int32_t x, std::int32_t y) {
          double const sx = score[static_cast<std::size_t>(x - first)], sy = score[static_cast<std::size_t>(y - first)];
          return sx != sy ? sx > sy : x < y;
        };
        std::nth_element(order.begin(), order.begin() + k_eff, order.end(), better);
        std::size_t const row = static_cast<std::size_t>(b) * heads_ + g;
        auto& er = exact_rows[row];
        er.assign(order.begin(), order.begin() + k_eff);
        std::sort(er.begin(), er.end());
        std::copy(er.begin(), er.end(), exact.begin() + static_cast<std::ptrdiff_t>(row * static_cast<std::size_t>(p.k)));
        // recall@k of the exact top-k
        std::int64_t common = 0;
        std::size_t i = 0;
        std::int32_t const* pr = sel.data() + row * static_cast<std::size_t>(p.k);
        std::vector<std::int32_t> mine(pr, pr + p.k);
        mine.erase(std::remove(mine.begin(), mine.end(), -1), mine.end());
        std::sort(mine.begin(), mine.end());
        for (std::int32_t t : mine) {
          while (i < er.size() && er[i] < t) { ++i; }
          if (i < er.size() && er[i] == t) { ++common; }
        }
        q.recall += k_eff > 0 ? static_cast<double>(common) / static_cast<double>(k_eff) : 1.0;
        ++q.rows;
        // attention mass (full softmax over all n tokens) captured per q head
        for (int h = 0; h < group; ++h) {
          float const* x = logit.data() + ((static_cast<std::size_t>(b) * Q + static_cast<std::size_t>(g) * group + h) *
                                           static_cast<std::size_t>(n));
          float mx = -INFINITY;
          for (std::int64_t t = 0; t < n; ++t) { mx = std::max(mx, x[t]); }
          double z = 0, always = 0;
          for (std::int64_t t = 0; t < n; ++t) {
            double const e = std::exp(static_cast<double>(x[t] - mx));
            z += e;
            if (t < first || t >= last) { always += e; }
          }
          double mp = always, me = always;
          for (std::int32_t t : mine) { mp += std::exp(static_cast<double>(x[t] - mx)); }
          for (std::int32_t t : er) { me += std::exp(static_cast<double>(x[t] - mx)); }
          q.pq_mass += mp / z;
          q.exact_mass += me / z;
          q.mass_ratio.push_back(me > 0 ? mp / me : 1.0);
        }
      }
    }
    PQKV_CUDA_TRY(cudaMemcpyAsync(check_list_.data(), exact.data(), sel_elems * sizeof(std::int32_t),
                                  cudaMemcpyHostToDevice, s));
    attend_args ax = a;
    ax.sel = check_list_.data();
    attend<row_set::listed>(ax, splits, check_part_.data(), check_plse_.data(), exact_v, check_lse_.data() + bq, s);
    auto const outs = to_host(check_out_.data(), 3 * bq * d, s);
    auto const pipe_out = to_host(out_v_.data() + static_cast<std::size_t>(l) * bq * d, bq * d, s);
    for (std::size_t r = 0; r < bq; ++r) {
      double nd = 0, ep = 0, ee = 0, es = 0, np = 0;
      for (int c = 0; c < d; ++c) {
        std::size_t const i = r * d + static_cast<std::size_t>(c);
        double const dv = outs[i], xv = outs[bq * d + i], sv = outs[2 * bq * d + i], pv = pipe_out[i];
        nd += dv * dv;
        ep += (pv - dv) * (pv - dv);
        ee += (xv - dv) * (xv - dv);
        es += (pv - sv) * (pv - sv);
        np += sv * sv;
      }
      q.err_pq += std::sqrt(ep / std::max(nd, 1e-30));
      q.err_exact += std::sqrt(ee / std::max(nd, 1e-30));
      q.self_max = std::max(q.self_max, std::sqrt(es / std::max(np, 1e-30)));
      ++q.heads;
    }
  }

  // ---------------------------------------------------------------- state

  options const& o_;
  int batch_, device_;
  std::barrier<>& sync_;
  device_report& out_;
  int heads_ = 8, qheads_ = 32, head_offset_ = 0, sms_ = 132;
  std::int64_t n_ = 0, cap_ = 0, host_len_ = 0;
  std::unique_ptr<synthetic_model> model_;
  std::unique_ptr<pqkv::gpu::kv_store<bf16>> store_;
  std::unique_ptr<pqkv::gpu::pq_encoder> encoder_;
  std::unique_ptr<pqkv::gpu::stream_set> streams_, serial_streams_;
  std::unique_ptr<timeline> times_;
  cudaEvent_t step_begin_ = nullptr, step_end_ = nullptr;
  pqkv::device_buffer<std::uint8_t> codes_;            // [layers, batch, heads, cap, m]
  pqkv::device_buffer<float> cent_;                    // [layers, heads, m, ksub, dsub]
  pqkv::device_buffer<bf16> sink_k_, sink_v_;          // [layers, batch, heads, sink, d]
  pqkv::device_buffer<bf16> win_k_, win_v_;            // [layers, batch, heads, window, d] rings
  pqkv::device_buffer<std::int32_t> lengths_;          // [batch]
  pqkv::device_buffer<std::int64_t> positions_;        // [batch]
  pqkv::device_buffer<bf16> q_, new_k_, new_v_;        // [layers, batch, qheads, d], [layers, batch, heads, d]
  pqkv::device_buffer<float> out_v_, out_lse_;         // [layers, batch, qheads, d], [layers, batch, qheads]
  pqkv::device_buffer<float> check_logits_, check_part_, check_plse_, check_out_, check_lse_;
  pqkv::device_buffer<std::int32_t> check_list_;

 public:
  ~device_run()
  {
    if (step_begin_ != nullptr) { cudaEventDestroy(step_begin_); }
    if (step_end_ != nullptr) { cudaEventDestroy(step_end_); }
  }
  device_run(device_run const&) = delete;
  device_run& operator=(device_run const&) = delete;
};

// ---------------------------------------------------------------- printing

/// "%.3f", or "n/a" for a negative value.
std::string fixed3(double x)
{
  if (x < 0) { return "n/a"; }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f", x);
  return buf;
}

double percentile(std::vector<double> v, double pct)
{
  if (v.empty()) { return 0; }
  std::sort(v.begin(), v.end());
  auto const i = static_cast<std::size_t>(pct / 100.0 * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

void print_header(options const& o, int devices_visible)
{
  std::printf("long_context_decode: synthetic Llama-3.1-8B attention (%d layers, 32 q heads, 8 KV heads, d=128, bf16)\n",
              o.layers);
  std::printf("  model: per-layer random projections of a drifting rank-%d latent state, generated on the GPU\n"
              "         (RoPE theta 500000 with Llama 3.1 scaling, 4 outlier channels, 4 sink tokens, %d-token topic\n"
              "         clumps from %d recurring topics, %d needles per head); queries aim at a topic or a needle\n",
              latent_rank, clump_tokens, topics, needles);
  std::printf("  context %lld tokens, %d decode steps per timing mode, sink %d, window %d, PQ m=%d nbits=%d (%d B per token and KV head)\n",
              static_cast<long long>(o.tokens), o.steps, o.sink, o.window, o.m, o.nbits, o.m * ((o.nbits + 7) / 8));
  long long const stride = o.train_points > 0 && o.train_points < o.tokens ? o.tokens / o.train_points : 1;
  std::printf("  k-means on the GPU: k-means++, %d iterations, on every %lld-th key of sequence 0 (%lld per head;"
              " a strided view; codebooks shared by the batch)\n",
              o.iters, stride, static_cast<long long>(o.tokens) / stride);
  std::printf("  selection: gpu::adc_topk, GQA softmax-sum; cache: gpu::slot_table LRU; attention: the example's reference kernel\n");
  std::printf("  GPUs: %d of %d visible (KV heads split %d per GPU, one host thread each)\n", o.gpus, devices_visible,
              kv_heads_total / o.gpus);
}

void print_batch(options const& o, int batch, std::vector<device_report> const& reps)
{
  int const L = o.layers;
  double const scale32 = 32.0 / L;
  std::printf("\n=== batch %d, %lld tokens, %d layers ===\n", batch, static_cast<long long>(o.tokens), L);
  for (auto const& r : reps) {
    std::printf("GPU %d: %s, KV heads %d..%d, pinned store on NUMA node %d\n", r.device, r.name.c_str(), r.head_offset,
                r.head_offset + r.heads - 1, r.numa_node);
    if (!r.error.empty()) { std::printf("  FAILED: %s\n", r.error.c_str()); }
  }
  for (auto const& r : reps) {
    if (!r.error.empty()) { return; }
  }
  // prefill
  std::printf("prefill, per layer (ms):        model K/V   offload(d2h)   k-means   encode   | wall    overlap achieved\n");
  for (auto const& r : reps) {
    auto const& p = r.prefill;
    double const side = p.offload + p.train + p.encode;
    double const hidden = std::max(0.0, p.compute + side - p.wall);
    std::printf("  GPU %d                         %9.3f   %12.3f   %7.3f   %6.3f   | %7.3f  %5.1f%% of offload+train+encode hidden\n",
                r.device, p.compute / L, p.offload / L, p.train / L, p.encode / L, p.wall / L,
                side > 0 ? 100.0 * hidden / side : 0.0);
    std::printf("    prefill total %.1f ms (%.1f ms scaled to 32 layers); k-means MSE (last layer) %.4g\n", p.wall,
                p.wall * scale32, p.kmeans_mse);
    double const attn_ms = 2.0 * static_cast<double>(o.tokens) * static_cast<double>(o.tokens) * d * 32.0 *
                           batch / (600e12) * 1e3;
    std::printf("    for scale: a causal prefill attention of this length at 600 TFLOP/s takes ~%.1f ms per layer;"
                " offload+train+encode %.1f ms per layer (%.1f%%)\n",
                attn_ms, side / L, 100.0 * side / L / attn_ms);
  }
  // memory
  std::size_t codes = 0, cents = 0, resident = 0, full = 0, pinned = 0;
  for (auto const& r : reps) {
    codes += r.codes_bytes, cents += r.centroid_bytes, resident += r.resident_bytes, full += r.full_kv_bytes;
    pinned += r.pinned_bytes;
  }
  std::printf("memory: full K+V bf16 %.2f GiB (%.2f GiB at 32 layers); pinned host store %.2f GiB\n", gib(full),
              gib(full) * scale32, gib(pinned));

  for (std::size_t i = 0; i < reps.front().decodes.size(); ++i) {
    auto const& d0 = reps.front().decodes[i];
    std::printf("\n--- decode, k = %s = %lld per KV head, hot cache %lld rows per (layer, sequence, KV head) ---\n",
                d0.label.c_str(), static_cast<long long>(d0.k), static_cast<long long>(d0.cache_slots));
    std::size_t hot = 0, table = 0;
    for (auto const& r : reps) {
      hot += r.decodes[i].hot_bytes;
      table += r.decodes[i].table_bytes;
    }
    std::size_t const held = codes + cents + hot + resident;
    std::printf("GPU bytes held: codes %.3f GiB + codebooks %.3f GiB + hot cache %.3f GiB + sink/window %.3f GiB = %.3f GiB"
                " = %.2f%% of full K+V (cache index %.3f GiB more: %.2f%% with it)\n",
                gib(codes), gib(cents), gib(hot), gib(resident), gib(held),
                100.0 * static_cast<double>(held) / static_cast<double>(full), gib(table),
                100.0 * static_cast<double>(held + table) / static_cast<double>(full));
    std::printf("per step (all %d layers), ms, instrumented:\n", L);
    std::printf("  GPU   model  code-append   score   cache  | fetch  attn-fetched | attn-resident  merge | offload(d2h)\n");
    double worst_overlapped = 0, worst_serial = 0, worst_graph = -1;
    for (auto const& r : reps) {
      auto const& x = r.decodes[i];
      auto const& s = x.stages;
      std::printf("  %3d  %6.3f  %11.3f  %6.3f  %6.3f  | %5.3f  %12.3f | %13.3f  %5.3f | %12.3f\n", r.device, s.model,
                  s.encode, s.score, s.cache, s.fetch, s.att_fetched, s.att_resident, s.merge, s.offload);
    }
    std::printf("step time (ms per step, all %d layers):\n", L);
    for (auto const& r : reps) {
      auto const& x = r.decodes[i];
      auto const& s = x.stages;
      // hideable: the shorter of the two branches per step, plus the offload
      double const hideable = std::min(s.fetch + s.att_fetched, s.att_resident) + s.offload;
      double const hidden = x.serial - x.overlapped;
      std::printf("  GPU %d: serial %.3f | overlapped %.3f | graph %s | overlap achieved %.0f%% of %.3f ms hideable"
                  " | cache hit rate %.1f%%, bypassed %lld, rejected %lld\n",
                  r.device, x.serial, x.overlapped, fixed3(x.graph).c_str(),
                  hideable > 0 ? 100.0 * hidden / hideable : 0.0, hideable, 100.0 * x.hit_rate, x.bypassed, x.rejected);
      if (!x.graph_note.empty()) { std::printf("         graph: %s\n", x.graph_note.c_str()); }
      if (x.bad_keys != 0) { std::printf("         WARNING: %lld selected keys out of range (slot_table bad keys)\n", x.bad_keys); }
      worst_overlapped = std::max(worst_overlapped, x.overlapped);
      worst_serial = std::max(worst_serial, x.serial);
      if (x.graph >= 0) { worst_graph = std::max(worst_graph, x.graph); }
    }
    double const best = worst_graph >= 0 ? std::min(worst_graph, worst_overlapped) : worst_overlapped;
    std::printf("  total (slowest GPU): overlapped %.3f ms, graph %s ms; per layer %.1f us; scaled to 32 layers %.3f ms per step\n",
                worst_overlapped, fixed3(worst_graph).c_str(), 1e3 * best / L,
                best * scale32);
    // quality
    quality all;
    bool any = false;
    for (auto const& r : reps) {
      auto const& x = r.decodes[i];
      if (!x.q) { continue; }
      any = true;
      all.recall += x.q->recall, all.rows += x.q->rows;
      all.mass_ratio.insert(all.mass_ratio.end(), x.q->mass_ratio.begin(), x.q->mass_ratio.end());
      all.err_pq += x.q->err_pq, all.err_exact += x.q->err_exact, all.heads += x.q->heads;
      all.pq_mass += x.q->pq_mass, all.exact_mass += x.q->exact_mass;
      all.self_max = std::max(all.self_max, x.q->self_max);
    }
    if (any && all.rows > 0 && all.heads > 0) {
      double const mr = std::accumulate(all.mass_ratio.begin(), all.mass_ratio.end(), 0.0) /
                        static_cast<double>(all.mass_ratio.size());
      double const ep = all.err_pq / static_cast<double>(all.heads), ee = all.err_exact / static_cast<double>(all.heads);
      std::printf("quality (layers 0, L/2, L-1; first %d steps; %ld (sequence, q head) pairs):\n", o.check_steps, all.heads);
      std::printf("  recall@k of the exact top-k: %.3f\n", all.recall / static_cast<double>(all.rows));
      std::printf("  attention mass on sink+window+selection: PQ %.4f, exact top-k %.4f; PQ / exact: mean %.4f, p5 %.4f (goal >= 0.97)\n",
                  all.pq_mass / static_cast<double>(all.heads), all.exact_mass / static_cast<double>(all.heads), mr,
                  percentile(all.mass_ratio, 5.0));
      std::printf("  output error vs dense (relative L2): PQ %.4f, exact top-k %.4f (goal: PQ <= 1.5 x exact + 0.02 = %.4f: %s)\n",
                  ep, ee, 1.5 * ee + 0.02, ep <= 1.5 * ee + 0.02 ? "met" : "not met");
      std::printf("  self-check: pipeline output (split + cache + merge) vs the same selection from the store: max rel. diff %.2e %s\n",
                  all.self_max, all.self_max < 1e-3 ? "(ok)" : "(MISMATCH)");
    }
  }
}

}  // namespace
}  // namespace lcd

int main(int argc, char** argv)
{
  using namespace lcd;
  options o;
  try {
    if (!parse(argc, argv, o)) {
      print_usage(stdout);
      return 0;
    }
    int visible = 0;
    cudaError_t const st = cudaGetDeviceCount(&visible);
    if (st != cudaSuccess || visible == 0) {
      std::fprintf(stderr, "long_context_decode: no usable CUDA device (%s)\n",
                   st != cudaSuccess ? cudaGetErrorString(st) : "none visible");
      return 2;
    }
    if (o.gpus > visible) {
      std::fprintf(stderr, "long_context_decode: --gpus=%d but %d device(s) visible\n", o.gpus, visible);
      return 2;
    }
    print_header(o, visible);
    double const host = host_memory_bytes();
    for (int batch : o.batches) {
      std::int64_t const cap = o.tokens + static_cast<std::int64_t>(o.budgets.size()) * (4 * o.steps + 8) + 8;
      double const pinned = 2.0 * o.layers * batch * kv_heads_total * static_cast<double>(cap) * d * 2.0;
      if (host > 0 && pinned > 0.85 * host) {
        std::fprintf(stderr,
                     "long_context_decode: the pinned store for batch %d needs %.1f GiB of the host's %.1f GiB; use fewer "
                     "--layers (per-layer figures are scaled to 32)\n",
                     batch, gib(pinned), gib(host));
        return 2;
      }
      std::vector<device_report> reps(static_cast<std::size_t>(o.gpus));
      std::barrier<> sync(o.gpus);
      std::vector<std::thread> threads;
      for (int g = 0; g < o.gpus; ++g) {
        threads.emplace_back([&, g] {
          auto& rep = reps[static_cast<std::size_t>(g)];
          try {
            device_run run{o, batch, g, g, sync, rep};
            run.run();
          } catch (std::exception const& e) {
            rep.error = e.what();
            sync.arrive_and_drop();
          }
        });
      }
      for (auto& t : threads) { t.join(); }
      print_batch(o, batch, reps);
      std::fflush(stdout);
      for (auto const& r : reps) {
        if (!r.error.empty()) { return 1; }
      }
    }
  } catch (std::exception const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  return 0;
}
