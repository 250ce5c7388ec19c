// SPDX-License-Identifier: Apache-2.0
// The overlap scheduler on a GPU: event ordering across streams, stream sets,
// host tasks joined into streams (both joins, in graphs, with failures), and
// the layer pipeline: a decode step of real (small) attention + merge and a
// prefill pass with host-side training, each captured into a graph and
// replayed with new inputs against eager runs, and device timestamps that
// show the stages overlap and keep their order.
#include <pqkv/attend/merge_state.cuh>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/random.hpp>
#include <pqkv/schedule/event.cuh>
#include <pqkv/schedule/host_pool.hpp>
#include <pqkv/schedule/host_task.cuh>
#include <pqkv/schedule/layer_pipeline.cuh>
#include <pqkv/schedule/stream_set.cuh>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"
#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using pqkv::index_t;
using u64 = unsigned long long;

__device__ __forceinline__ u64 global_ns()
{
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

/// One thread: spins for `ns` of global time, then (optionally) stores
/// `value` at `flag` and the [start, end] times at `stamp`.
__global__ void spin(u64 ns, u64* stamp, int* flag, int value)
{
  u64 const start = global_ns();
  while (global_ns() - start < ns) {}
  if (flag != nullptr) { *flag = value; }
  if (stamp != nullptr) {
    stamp[0] = start;
    stamp[1] = global_ns();
  }
}

void launch_spin(cudaStream_t s, u64 ns, u64* stamp = nullptr, int* flag = nullptr, int value = 0)
{
  spin<<<1, 1, 0, s>>>(ns, stamp, flag, value);
  PQKV_CUDA_CHECK_LAST();
}

/// True under compute-sanitizer (its tools may serialize kernels, so overlap
/// is then reported, not required).
bool under_sanitizer()
{
  char const* inj = std::getenv("CUDA_INJECTION64_PATH");
  return (inj != nullptr && std::strstr(inj, "sanitizer") != nullptr) || std::getenv("PQKV_NO_OVERLAP_CHECK") != nullptr;
}

/// Waits (bounded) for `s` to drain; false on timeout rather than hanging the suite.
bool drains(cudaStream_t s, double seconds = 10.0)
{
  auto const until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  for (;;) {
    cudaError_t const st = cudaStreamQuery(s);
    if (st == cudaSuccess) { return true; }
    if (st != cudaErrorNotReady) { PQKV_CUDA_TRY(st); }
    if (std::chrono::steady_clock::now() > until) { return false; }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

struct interval {
  u64 start = 0, end = 0;
};

std::vector<interval> read_stamps(pqkv::device_buffer<u64> const& d, std::size_t n)
{
  auto const raw = pqkv::test::download(d, 2 * n);
  std::vector<interval> v(n);
  for (std::size_t i = 0; i < n; ++i) { v[i] = {raw[2 * i], raw[2 * i + 1]}; }
  return v;
}

bool intersects(interval a, interval b) { return a.start < b.end && b.start < a.end; }

}  // namespace

TEST_CASE("schedule: an event orders a dependent D2H copy after a slow kernel")
{
  PQKV_REQUIRE_GPU();
  pqkv::gpu::stream_set streams;
  pqkv::gpu::event e;
  pqkv::device_buffer<int> value(1);
  pqkv::pinned_buffer<int> seen(1);
  PQKV_CUDA_TRY(cudaMemset(value.data(), 0, sizeof(int)));
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  for (int round = 1; round <= 3; ++round) {
    *seen.data() = -1;
    launch_spin(streams.compute(), 300'000, nullptr, value.data(), 100 + round);  // 0.3 ms, then writes
    pqkv::gpu::depend(streams.d2h(), streams.compute(), e);
    PQKV_CUDA_TRY(cudaMemcpyAsync(seen.data(), value.data(), sizeof(int), cudaMemcpyDeviceToHost, streams.d2h()));
    PQKV_CUDA_TRY(cudaStreamSynchronize(streams.d2h()));  // only the copy's stream
    CHECK_MESSAGE(*seen.data() == 100 + round, "round ", round, ": the copy saw ", *seen.data());
  }
  CHECK(e.ready());
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
}

TEST_CASE("schedule: stream_set priorities, device, wrapping without ownership")
{
  PQKV_REQUIRE_GPU();
  int least = 0, greatest = 0;
  PQKV_CUDA_TRY(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  cudaStream_t kept = nullptr;
  {
    pqkv::gpu::stream_set s;
    CHECK(s.owning());
    CHECK(s.device() == pqkv::gpu::current_device());
    int pc = 0, ph = 0, pd = 0, ps = 0;
    PQKV_CUDA_TRY(cudaStreamGetPriority(s.compute(), &pc));
    PQKV_CUDA_TRY(cudaStreamGetPriority(s.h2d(), &ph));
    PQKV_CUDA_TRY(cudaStreamGetPriority(s.d2h(), &pd));
    PQKV_CUDA_TRY(cudaStreamGetPriority(s.side(), &ps));
    CHECK(pc == greatest);
    CHECK(ph == greatest);
    CHECK(pd == least);
    CHECK(ps <= pd);  // numerically lower is higher priority
    CHECK(ps >= pc);
    unsigned flags = 0;
    PQKV_CUDA_TRY(cudaStreamGetFlags(s.compute(), &flags));
    CHECK((flags & cudaStreamNonBlocking) != 0);
    std::array<cudaStream_t, 4> all{s.compute(), s.h2d(), s.d2h(), s.side()};
    std::sort(all.begin(), all.end());
    CHECK(std::adjacent_find(all.begin(), all.end()) == all.end());  // four distinct streams

    PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&kept, cudaStreamNonBlocking));
    {
      auto w = pqkv::gpu::stream_set::wrap(s.device(), kept, kept, kept);
      CHECK_FALSE(w.owning());
      CHECK(w.side() == kept);
    }  // the wrapper goes; `kept` must stay valid
    CHECK(cudaStreamQuery(kept) == cudaSuccess);
    auto moved = std::move(s);
    CHECK(moved.owning());
    CHECK_FALSE(s.owning());  // NOLINT(bugprone-use-after-move): a moved-from set owns nothing
  }
  PQKV_CUDA_TRY(cudaStreamDestroy(kept));
  using pqkv::test::error_message;
  CHECK(error_message([] { pqkv::gpu::stream_set bad{{}, 4096}; }).find("device=4096") != std::string::npos);
  CHECK(error_message([] { (void)pqkv::gpu::stream_set::wrap(-1, nullptr, nullptr, nullptr); }).find("device=-1") !=
        std::string::npos);
}

namespace {

/// Fills out[j] = base + j after a short spin, so that a reader not ordered
/// after it would see the poison.
__global__ void slow_fill(int* out, int n, int const* base, u64 ns)
{
  u64 const start = global_ns();
  while (global_ns() - start < ns) {}
  for (int j = static_cast<int>(threadIdx.x); j < n; j += static_cast<int>(blockDim.x)) { out[j] = *base + j; }
}

/// The device side of one host-task round trip: input made on the GPU,
/// copied to pinned memory, transformed by the host task, copied back.
struct round_trip {
  static constexpr int n = 256;
  pqkv::device_buffer<int> base{1}, in_dev{n}, out_dev{n};
  pqkv::pinned_buffer<int> base_host{1}, in_host{n}, out_host{n};
  std::atomic<int> runs_seen_input{0};

  /// The host task: out = 3 * in + 1, after a pause that a stream not
  /// waiting for it would overtake.
  void task()
  {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    for (int j = 0; j < n; ++j) { out_host.data()[j] = 3 * in_host.data()[j] + 1; }
    if (in_host.data()[1] == in_host.data()[0] + 1) { runs_seen_input.fetch_add(1); }
  }

  void enqueue(pqkv::gpu::host_task& t, cudaStream_t s)
  {
    PQKV_CUDA_TRY(cudaMemcpyAsync(base.data(), base_host.data(), sizeof(int), cudaMemcpyHostToDevice, s));
    slow_fill<<<1, 128, 0, s>>>(in_dev.data(), n, base.data(), 500'000);
    PQKV_CUDA_CHECK_LAST();
    PQKV_CUDA_TRY(cudaMemcpyAsync(in_host.data(), in_dev.data(), n * sizeof(int), cudaMemcpyDeviceToHost, s));
    t.enqueue(s);
    PQKV_CUDA_TRY(cudaMemcpyAsync(out_dev.data(), out_host.data(), n * sizeof(int), cudaMemcpyHostToDevice, s));
  }

  void poison()
  {
    std::fill_n(in_host.data(), n, -7);
    std::fill_n(out_host.data(), n, -9);
    PQKV_CUDA_TRY(cudaMemset(out_dev.data(), 0xFF, n * sizeof(int)));
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
  }

  /// Number of wrong outputs for the round's base.
  int wrong(int b) const
  {
    std::vector<int> got(n);
    PQKV_CUDA_TRY(cudaMemcpy(got.data(), out_dev.data(), n * sizeof(int), cudaMemcpyDeviceToHost));
    int bad = 0;
    for (int j = 0; j < n; ++j) {
      if (got[static_cast<std::size_t>(j)] != 3 * (b + j) + 1) {
        if (bad++ < 3) { MESSAGE("out[", j, "]=", got[static_cast<std::size_t>(j)], ", want ", 3 * (b + j) + 1); }
      }
    }
    return bad;
  }
};

char const* join_name(pqkv::gpu::host_join j)
{
  return j == pqkv::gpu::host_join::wait_value ? "wait_value" : "host_function";
}

}  // namespace

TEST_CASE("schedule: a host task runs after its input and the stream waits for it (both joins)")
{
  PQKV_REQUIRE_GPU();
  pqkv::host_pool pool{2};
  cudaStream_t s = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (auto join : {pqkv::gpu::host_join::automatic, pqkv::gpu::host_join::host_function}) {
    round_trip rt;
    pqkv::gpu::host_task task{pool, [&rt] { rt.task(); }, join};
    CAPTURE(join_name(task.join()));
    if (join == pqkv::gpu::host_join::automatic && !under_sanitizer()) {
      CHECK_MESSAGE(task.join() == pqkv::gpu::host_join::wait_value,
                    "cuStreamWaitValue32 unavailable: automatic fell back to host_function");
    }
    for (int round = 0; round < 4; ++round) {
      rt.poison();
      *rt.base_host.data() = 1000 * (round + 1);
      rt.enqueue(task, s);
      REQUIRE_MESSAGE(drains(s), "the stream did not drain: the host task's join hangs");
      CHECK(rt.wrong(1000 * (round + 1)) == 0);
    }
    CHECK(task.runs() == 4);
    CHECK(rt.runs_seen_input.load() == 4);
    CHECK_NOTHROW(task.rethrow_if_failed());
  }
  PQKV_CUDA_TRY(cudaStreamDestroy(s));
}

TEST_CASE("schedule: a host task captured in a graph runs on every replay")
{
  PQKV_REQUIRE_GPU();
  pqkv::host_pool pool{1};
  cudaStream_t s = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (auto join : {pqkv::gpu::host_join::automatic, pqkv::gpu::host_join::host_function}) {
    round_trip rt;
    pqkv::gpu::host_task task{pool, [&rt] { rt.task(); }, join};
    CAPTURE(join_name(task.capture_join()));
    if (join == pqkv::gpu::host_join::automatic) {
      WARN_MESSAGE(task.capture_join() == pqkv::gpu::host_join::wait_value,
                   "stream memory waits cannot be captured here: captured enqueues use host_function");
    }
    pqkv::test::captured_graph graph{s, [&] { rt.enqueue(task, s); }};
    CHECK(task.runs() == 0);  // capture runs nothing
    for (int round = 0; round < 4; ++round) {
      rt.poison();
      *rt.base_host.data() = 7 + 500 * round;  // read by the graph's H2D copy at replay
      graph.launch(s);
      REQUIRE_MESSAGE(drains(s), "the replay did not drain: the host task's join hangs");
      CHECK(rt.wrong(7 + 500 * round) == 0);
    }
    CHECK(task.runs() == 4);
    // Back-to-back replays without a host wait in between: each one's task
    // runs after the previous one's (they are stream-ordered).
    for (int round = 0; round < 3; ++round) { graph.launch(s); }
    REQUIRE(drains(s));
    CHECK(task.runs() == 7);
    CHECK_NOTHROW(task.rethrow_if_failed());
  }
  PQKV_CUDA_TRY(cudaStreamDestroy(s));
}

TEST_CASE("schedule: a failing host task releases its stream and reports its error")
{
  PQKV_REQUIRE_GPU();
  pqkv::host_pool pool{1};
  cudaStream_t s = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  pqkv::device_buffer<int> marker(1);
  PQKV_CUDA_TRY(cudaMemset(marker.data(), 0, sizeof(int)));
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  for (auto join : {pqkv::gpu::host_join::automatic, pqkv::gpu::host_join::host_function}) {
    pqkv::gpu::host_task task{pool, [] { throw std::runtime_error("codebook training failed"); }, join};
    CAPTURE(join_name(task.join()));
    launch_spin(s, 100'000);
    task.enqueue(s);
    launch_spin(s, 1'000, nullptr, marker.data(), 42);  // work after the failed task still runs
    REQUIRE_MESSAGE(drains(s), "a failed host task left its stream waiting");
    CHECK(pqkv::test::download(marker, 1)[0] == 42);
    CHECK_THROWS_WITH_AS(task.rethrow_if_failed(), "codebook training failed", std::runtime_error);
    PQKV_CUDA_TRY(cudaMemset(marker.data(), 0, sizeof(int)));
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
  }
  using pqkv::test::error_message;
  CHECK(error_message([&] { pqkv::gpu::host_task t{pool, {}}; }).find("fn is empty") != std::string::npos);
  PQKV_CUDA_TRY(cudaStreamDestroy(s));
}

namespace {

constexpr int heads = 2, dim = 32, resident = 24, fetched = 40, max_tokens = 64;

/// q[h][d] = tanh(x[h][d] + 0.1 * layer): the layer's "projection".
__global__ void project(float const* x, float* q, int layer)
{
  int const i = static_cast<int>(threadIdx.x);
  if (i < heads * dim) { q[i] = tanhf(x[i] + 0.1f * static_cast<float>(layer)); }
}

/// Softmax attention of q [heads, dim] over k, v [heads, n, dim]: o [heads, dim]
/// and natural-log lse [heads]. One warp per head.
__global__ void attend(float const* q, float const* k, float const* v, int n, float* o, float* lse)
{
  __shared__ float logits[max_tokens];
  int const h = static_cast<int>(blockIdx.x), lane = static_cast<int>(threadIdx.x);
  float const scale = rsqrtf(static_cast<float>(dim));
  for (int t = 0; t < n; ++t) {
    float part = q[h * dim + lane] * k[(h * n + t) * dim + lane];
    for (int off = 16; off > 0; off /= 2) { part += __shfl_xor_sync(0xffffffffu, part, off); }
    if (lane == 0) { logits[t] = part * scale; }
  }
  __syncwarp();
  float mx = -INFINITY;
  for (int t = 0; t < n; ++t) { mx = fmaxf(mx, logits[t]); }
  float z = 0.f, acc = 0.f;
  for (int t = 0; t < n; ++t) {
    float const p = expf(logits[t] - mx);
    z += p;
    acc += p * v[(h * n + t) * dim + lane];
  }
  o[h * dim + lane] = acc / z;
  if (lane == 0) { lse[h] = mx + logf(z); }
}

/// CPU model of the decode step: per layer, q = tanh(x + 0.1 l), dense
/// attention over the resident then the fetched rows, x = output.
std::vector<float> decode_reference(std::vector<float> x, std::vector<float> const& rk, std::vector<float> const& rv,
                                    std::vector<float> const& fk, std::vector<float> const& fv, int layers)
{
  for (int l = 0; l < layers; ++l) {
    std::vector<float> q(x.size()), next(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) { q[i] = std::tanh(x[i] + 0.1f * static_cast<float>(l)); }
    for (int h = 0; h < heads; ++h) {
      std::vector<double> logit(resident + fetched);
      auto row = [&](int t, bool v) -> float const* {
        auto const& a = t < resident ? (v ? rv : rk) : (v ? fv : fk);
        int const n = t < resident ? resident : fetched, tt = t < resident ? t : t - resident;
        return a.data() + ((static_cast<std::size_t>(l) * heads + static_cast<std::size_t>(h)) * n + tt) * dim;
      };
      double mx = -1e300;
      for (int t = 0; t < resident + fetched; ++t) {
        double s = 0;
        for (int d = 0; d < dim; ++d) { s += static_cast<double>(q[h * dim + d]) * row(t, false)[d]; }
        logit[static_cast<std::size_t>(t)] = s / std::sqrt(static_cast<double>(dim));
        mx = std::max(mx, logit[static_cast<std::size_t>(t)]);
      }
      double z = 0;
      std::vector<double> acc(dim, 0.0);
      for (int t = 0; t < resident + fetched; ++t) {
        double const p = std::exp(logit[static_cast<std::size_t>(t)] - mx);
        z += p;
        for (int d = 0; d < dim; ++d) { acc[static_cast<std::size_t>(d)] += p * row(t, true)[d]; }
      }
      for (int d = 0; d < dim; ++d) { next[static_cast<std::size_t>(h * dim + d)] = static_cast<float>(acc[static_cast<std::size_t>(d)] / z); }
    }
    x = next;
  }
  return x;
}

/// A small decode model wired to the layer pipeline: resident rows on the
/// device, fetched rows in pinned host memory copied in by `fetch`.
struct decode_model {
  int layers;
  pqkv::pinned_buffer<float> x0{heads * dim};                                      // step input, pinned
  pqkv::device_buffer<float> x{heads * dim}, q{heads * dim};
  pqkv::device_buffer<float> res_k, res_v;                                          // [layers, heads, resident, dim]
  pqkv::pinned_buffer<float> host_k, host_v;                                        // [layers, heads, fetched, dim]
  pqkv::device_buffer<float> stage_k{heads * fetched * dim}, stage_v{heads * fetched * dim};
  pqkv::device_buffer<float> o_r{heads * dim}, o_f{heads * dim}, lse_r{heads}, lse_f{heads}, lse_x{heads};

  explicit decode_model(int l)
    : layers{l}, res_k(static_cast<std::size_t>(l) * heads * resident * dim),
      res_v(static_cast<std::size_t>(l) * heads * resident * dim),
      host_k(static_cast<std::size_t>(l) * heads * fetched * dim),
      host_v(static_cast<std::size_t>(l) * heads * fetched * dim)
  {}

  std::vector<float> rk, rv;  // host copies of the resident rows

  void fill(std::uint64_t seed)
  {
    for (std::size_t i = 0; i < x0.size(); ++i) { x0.data()[i] = pqkv::test::noise(seed, i); }
    rk.resize(res_k.size());
    rv.resize(res_v.size());
    for (std::size_t i = 0; i < rk.size(); ++i) {
      rk[i] = 2.f * pqkv::test::noise(seed + 1, i);
      rv[i] = pqkv::test::noise(seed + 2, i);
    }
    for (std::size_t i = 0; i < host_k.size(); ++i) {
      host_k.data()[i] = 2.f * pqkv::test::noise(seed + 3, i);
      host_v.data()[i] = pqkv::test::noise(seed + 4, i);
    }
    PQKV_CUDA_TRY(cudaMemcpy(res_k.data(), rk.data(), rk.size() * sizeof(float), cudaMemcpyHostToDevice));
    PQKV_CUDA_TRY(cudaMemcpy(res_v.data(), rv.data(), rv.size() * sizeof(float), cudaMemcpyHostToDevice));
    PQKV_CUDA_TRY(cudaDeviceSynchronize());  // the pipeline's streams do not sync with the legacy stream
  }

  pqkv::gpu::decode_stages stages()
  {
    pqkv::gpu::decode_stages s;
    s.compute = [this](index_t l, cudaStream_t st) {
      project<<<1, heads * dim, 0, st>>>(x.data(), q.data(), static_cast<int>(l));
      PQKV_CUDA_CHECK_LAST();
    };
    s.fetch = [this](index_t l, cudaStream_t st) {
      std::size_t const n = static_cast<std::size_t>(heads) * fetched * dim;
      PQKV_CUDA_TRY(cudaMemcpyAsync(stage_k.data(), host_k.data() + static_cast<std::size_t>(l) * n, n * sizeof(float),
                                    cudaMemcpyHostToDevice, st));
      PQKV_CUDA_TRY(cudaMemcpyAsync(stage_v.data(), host_v.data() + static_cast<std::size_t>(l) * n, n * sizeof(float),
                                    cudaMemcpyHostToDevice, st));
    };
    s.attend_fetched = [this](index_t, cudaStream_t st) {
      attend<<<heads, 32, 0, st>>>(q.data(), stage_k.data(), stage_v.data(), fetched, o_f.data(), lse_f.data());
      PQKV_CUDA_CHECK_LAST();
    };
    s.attend_resident = [this](index_t l, cudaStream_t st) {
      std::size_t const off = static_cast<std::size_t>(l) * heads * resident * dim;
      attend<<<heads, 32, 0, st>>>(q.data(), res_k.data() + off, res_v.data() + off, resident, o_r.data(),
                                   lse_r.data());
      PQKV_CUDA_CHECK_LAST();
    };
    s.merge = [this](index_t, cudaStream_t st) {
      auto v3 = [](float* p) { return pqkv::make_view(p, 1, heads, dim); };
      auto l2 = [](float* p) { return pqkv::make_view(p, 1, heads); };
      pqkv::gpu::merge_state<float>(pqkv::as_const(v3(o_r.data())), pqkv::as_const(l2(lse_r.data())),
                                    pqkv::as_const(v3(o_f.data())), pqkv::as_const(l2(lse_f.data())), v3(x.data()),
                                    l2(lse_x.data()), st);
    };
    return s;
  }

  /// The whole step on `origin`: load x from x0, then the pipeline.
  void step(pqkv::gpu::layer_pipeline& p, pqkv::gpu::decode_stages const& s, cudaStream_t origin)
  {
    PQKV_CUDA_TRY(cudaMemcpyAsync(x.data(), x0.data(), x0.size() * sizeof(float), cudaMemcpyHostToDevice, origin));
    p.decode(layers, s, origin);
  }

  std::vector<float> result() const { return pqkv::test::download(x, static_cast<std::size_t>(heads * dim)); }
};

}  // namespace

TEST_CASE("layer_pipeline: a decode step captured in a graph replays like eager runs, and matches dense attention")
{
  PQKV_REQUIRE_GPU();
  pqkv::gpu::stream_set streams;
  pqkv::gpu::layer_pipeline pipeline{streams};
  constexpr int layers = 3;
  decode_model m{layers};
  auto const stages = m.stages();
  cudaStream_t const origin = streams.compute();
  m.fill(11);
  pqkv::test::captured_graph graph{origin, [&] { m.step(pipeline, stages, origin); }};
  for (std::uint64_t round = 0; round < 3; ++round) {
    CAPTURE(round);
    m.fill(100 + 10 * round);
    graph.launch(origin);
    PQKV_CUDA_TRY(cudaStreamSynchronize(origin));
    auto const replayed = m.result();
    PQKV_CUDA_TRY(cudaMemsetAsync(m.x.data(), 0, m.x.size_bytes(), origin));
    m.step(pipeline, stages, origin);  // eager, same inputs
    PQKV_CUDA_TRY(cudaStreamSynchronize(origin));
    auto const eager = m.result();
    CHECK_MESSAGE(std::memcmp(replayed.data(), eager.data(), eager.size() * sizeof(float)) == 0,
                  "graph replay and eager run differ");
    std::vector<float> x0(m.x0.data(), m.x0.data() + m.x0.size());
    std::vector<float> fk(m.host_k.data(), m.host_k.data() + m.host_k.size());
    std::vector<float> fv(m.host_v.data(), m.host_v.data() + m.host_v.size());
    auto const ref = decode_reference(x0, m.rk, m.rv, fk, fv, layers);
    int bad = 0;
    for (std::size_t i = 0; i < ref.size(); ++i) {
      if (!(std::abs(eager[i] - ref[i]) <= 1e-4f * (1.f + std::abs(ref[i]))) && bad++ < 3) {
        MESSAGE("x[", i, "]: gpu ", eager[i], ", dense reference ", ref[i]);
      }
    }
    CHECK(bad == 0);
  }
  // The pipeline joined everything back: no side stream is left with work or in a capture.
  for (auto r : {pqkv::gpu::stream_role::h2d, pqkv::gpu::stream_role::d2h, pqkv::gpu::stream_role::side}) {
    CHECK(cudaStreamQuery(streams.get(r)) == cudaSuccess);
  }
}

namespace {

/// keys[j] = sin(seed * 0.37 + layer * 1.3 + j * 0.05) * (1 + layer): the
/// layer's "forward", writing its K.
__global__ void make_keys(float* keys, int n, int const* seed, int layer)
{
  for (int j = static_cast<int>(threadIdx.x); j < n; j += static_cast<int>(blockDim.x)) {
    keys[j] = sinf(static_cast<float>(*seed) * 0.37f + static_cast<float>(layer) * 1.3f + static_cast<float>(j) * 0.05f) *
              (1.f + static_cast<float>(layer));
  }
}

/// codes[j] = keys[j] > centroid.
__global__ void encode_sign(float const* keys, int n, float const* centroid, std::uint8_t* codes)
{
  for (int j = static_cast<int>(threadIdx.x); j < n; j += static_cast<int>(blockDim.x)) {
    codes[j] = keys[j] > *centroid ? 1 : 0;
  }
}

}  // namespace

TEST_CASE("layer_pipeline: prefill with host-side training, eager and as a replayed graph")
{
  PQKV_REQUIRE_GPU();
  constexpr int layers = 3, n = 512;
  pqkv::host_pool pool{2};
  pqkv::gpu::stream_set streams;
  pqkv::gpu::layer_pipeline pipeline{streams};
  pqkv::pinned_buffer<int> seed_host(1);
  pqkv::device_buffer<int> seed(1);
  pqkv::device_buffer<float> keys(layers * n), centroid(layers);
  pqkv::device_buffer<std::uint8_t> codes(layers * n);
  pqkv::pinned_buffer<float> store(layers * n), scratch(layers * n), centroid_host(layers);
  // One host task per layer: layers' tasks may be in flight together.
  std::vector<pqkv::gpu::host_task> train;
  for (int l = 0; l < layers; ++l) {
    train.emplace_back(pool, [&, l] {
      double s = 0;  // the "CPU k-means": the mean of the layer's keys
      for (int j = 0; j < n; ++j) { s += scratch.data()[l * n + j]; }
      centroid_host.data()[l] = static_cast<float>(s / n);
    });
  }
  pqkv::gpu::prefill_stages st;
  st.compute = [&](index_t l, cudaStream_t s) {
    make_keys<<<1, 256, 0, s>>>(keys.data() + l * n, n, seed.data(), static_cast<int>(l));
    PQKV_CUDA_CHECK_LAST();
  };
  st.offload = [&](index_t l, cudaStream_t s) {
    PQKV_CUDA_TRY(cudaMemcpyAsync(store.data() + l * n, keys.data() + l * n, n * sizeof(float), cudaMemcpyDeviceToHost, s));
  };
  st.train_encode = [&](index_t l, cudaStream_t s) {
    PQKV_CUDA_TRY(cudaMemcpyAsync(scratch.data() + l * n, keys.data() + l * n, n * sizeof(float),
                                  cudaMemcpyDeviceToHost, s));
    train[static_cast<std::size_t>(l)].enqueue(s);
    PQKV_CUDA_TRY(cudaMemcpyAsync(centroid.data() + l, centroid_host.data() + l, sizeof(float), cudaMemcpyHostToDevice, s));
    encode_sign<<<1, 256, 0, s>>>(keys.data() + l * n, n, centroid.data() + l, codes.data() + l * n);
    PQKV_CUDA_CHECK_LAST();
  };
  cudaStream_t const origin = streams.compute();
  auto pass = [&] {
    PQKV_CUDA_TRY(cudaMemcpyAsync(seed.data(), seed_host.data(), sizeof(int), cudaMemcpyHostToDevice, origin));
    pipeline.prefill(layers, st, origin);
  };
  auto check = [&](int sd, char const* what) {
    std::vector<float> k(layers * n);
    PQKV_CUDA_TRY(cudaMemcpy(k.data(), keys.data(), k.size() * sizeof(float), cudaMemcpyDeviceToHost));
    auto const c = pqkv::test::download(codes, static_cast<std::size_t>(layers * n));
    int bad = 0;
    for (int l = 0; l < layers; ++l) {
      double s = 0;
      for (int j = 0; j < n; ++j) { s += k[static_cast<std::size_t>(l * n + j)]; }
      auto const mean = static_cast<float>(s / n);
      for (int j = 0; j < n; ++j) {
        auto const i = static_cast<std::size_t>(l * n + j);
        if (store.data()[i] != k[i] && bad++ < 3) { MESSAGE(what, ": store[", l, "][", j, "] not offloaded"); }
        if (c[i] != (k[i] > mean ? 1 : 0) && bad++ < 3) { MESSAGE(what, ": codes[", l, "][", j, "] wrong"); }
      }
      float const first = std::sin(static_cast<float>(sd) * 0.37f + static_cast<float>(l) * 1.3f) * (1.f + static_cast<float>(l));
      CHECK(std::abs(k[static_cast<std::size_t>(l * n)] - first) <= 1e-4f * (2.f + static_cast<float>(l)));
    }
    CHECK_MESSAGE(bad == 0, what);
  };
  for (int sd : {3, 8}) {
    std::fill_n(store.data(), layers * n, -1.f);
    *seed_host.data() = sd;
    pass();
    REQUIRE(drains(origin));
    check(sd, "eager");
  }
  pqkv::test::captured_graph graph{origin, pass};
  for (int sd : {21, 5, 13}) {
    std::fill_n(store.data(), layers * n, -1.f);
    *seed_host.data() = sd;
    graph.launch(origin);
    REQUIRE(drains(origin));
    check(sd, "graph");
  }
  for (auto& t : train) {
    CHECK(t.runs() == 5);
    CHECK_NOTHROW(t.rethrow_if_failed());
  }
}

TEST_CASE("layer_pipeline: stages overlap across streams and keep their order (device timestamps)")
{
  PQKV_REQUIRE_GPU();
  bool const require_overlap = !under_sanitizer();
  if (!require_overlap) { MESSAGE("under a sanitizer: overlap is reported, not required"); }
  constexpr u64 stage_ns = 200'000, gate_ns = 3'000'000;  // 0.2 ms stages behind a 3 ms gate
  pqkv::gpu::stream_set streams;
  cudaStream_t const origin = streams.compute();

  // Sanity: two spin kernels on two streams overlap on any device.
  {
    pqkv::device_buffer<u64> stamps(4);
    launch_spin(origin, gate_ns);
    pqkv::gpu::event e;
    pqkv::gpu::depend(streams.d2h(), origin, e);
    launch_spin(origin, stage_ns, stamps.data());
    launch_spin(streams.d2h(), stage_ns, stamps.data() + 2);
    pqkv::gpu::depend(origin, streams.d2h(), e);
    PQKV_CUDA_TRY(cudaStreamSynchronize(origin));
    auto const iv = read_stamps(stamps, 2);
    if (require_overlap) {
      CHECK_MESSAGE(intersects(iv[0], iv[1]), "two kernels on two streams did not overlap");
    }
  }

  SUBCASE("prefill: offload(i) and train_encode(i) overlap compute(i+1)")
  {
    for (index_t reuse : {index_t{0}, index_t{2}}) {
      CAPTURE(reuse);
      constexpr int layers = 5;
      pqkv::gpu::layer_pipeline pipeline{streams, {reuse}};
      pqkv::device_buffer<u64> stamps(3 * layers * 2);  // [stage][layer][start, end]
      auto at = [&](int stage, index_t l) { return stamps.data() + 2 * (stage * layers + l); };
      pqkv::gpu::prefill_stages st;
      st.compute = [&](index_t l, cudaStream_t s) { launch_spin(s, stage_ns, at(0, l)); };
      st.offload = [&](index_t l, cudaStream_t s) { launch_spin(s, stage_ns, at(1, l)); };
      st.train_encode = [&](index_t l, cudaStream_t s) { launch_spin(s, stage_ns, at(2, l)); };
      launch_spin(origin, gate_ns);  // the host enqueues everything while this runs
      pipeline.prefill(layers, st, origin);
      PQKV_CUDA_TRY(cudaStreamSynchronize(origin));
      auto const iv = read_stamps(stamps, 3 * layers);
      auto I = [&](int stage, int l) { return iv[static_cast<std::size_t>(stage * layers + l)]; };
      for (int l = 0; l < layers; ++l) {
        CAPTURE(l);
        CHECK(I(1, l).start >= I(0, l).end);  // offload after its compute
        CHECK(I(2, l).start >= I(0, l).end);
        if (reuse > 0 && l >= reuse) {
          CHECK(I(0, l).start >= I(1, l - static_cast<int>(reuse)).end);  // staging buffer free again
          CHECK(I(0, l).start >= I(2, l - static_cast<int>(reuse)).end);
        }
        if (l + 1 < layers && require_overlap) {
          CHECK_MESSAGE(intersects(I(1, l), I(0, l + 1)), "offload(", l, ") does not overlap compute(", l + 1, ")");
          CHECK_MESSAGE(intersects(I(2, l), I(0, l + 1)), "train_encode(", l, ") does not overlap compute(", l + 1,
                        ")");
        }
      }
    }
  }

  SUBCASE("decode: fetch(i) overlaps attend_resident(i); merge waits for both")
  {
    constexpr int layers = 4;
    pqkv::gpu::layer_pipeline pipeline{streams};
    pqkv::device_buffer<u64> stamps(6 * layers * 2);
    auto at = [&](int stage, index_t l) { return stamps.data() + 2 * (stage * layers + l); };
    pqkv::gpu::decode_stages st;
    st.compute = [&](index_t l, cudaStream_t s) { launch_spin(s, stage_ns / 4, at(0, l)); };
    st.fetch = [&](index_t l, cudaStream_t s) { launch_spin(s, stage_ns, at(1, l)); };
    st.attend_resident = [&](index_t l, cudaStream_t s) { launch_spin(s, stage_ns, at(2, l)); };
    st.attend_fetched = [&](index_t l, cudaStream_t s) { launch_spin(s, stage_ns / 4, at(3, l)); };
    st.merge = [&](index_t l, cudaStream_t s) { launch_spin(s, stage_ns / 8, at(4, l)); };
    st.offload = [&](index_t l, cudaStream_t s) { launch_spin(s, stage_ns / 4, at(5, l)); };
    pqkv::device_buffer<u64> after(2);
    launch_spin(origin, gate_ns);
    pipeline.decode(layers, st, origin);
    launch_spin(origin, 1'000, after.data());  // after the join: after every stage
    PQKV_CUDA_TRY(cudaStreamSynchronize(origin));
    auto const iv = read_stamps(stamps, 6 * layers);
    auto const end = read_stamps(after, 1)[0];
    auto I = [&](int stage, int l) { return iv[static_cast<std::size_t>(stage * layers + l)]; };
    for (int l = 0; l < layers; ++l) {
      CAPTURE(l);
      CHECK(I(1, l).start >= I(0, l).end);  // fetch after the selection
      CHECK(I(2, l).start >= I(0, l).end);
      CHECK(I(3, l).start >= I(1, l).end);  // attend_fetched after fetch
      CHECK(I(4, l).start >= I(2, l).end);  // merge after both partial states
      CHECK(I(4, l).start >= I(3, l).end);
      CHECK(I(5, l).start >= I(0, l).end);
      CHECK(end.start >= I(5, l).end);  // joined back into origin
      if (l + 1 < layers) { CHECK(I(0, l + 1).start >= I(4, l).end); }
      if (require_overlap) {
        CHECK_MESSAGE(intersects(I(1, l), I(2, l)), "fetch(", l, ") does not overlap attend_resident(", l, ")");
      }
    }
  }
}

TEST_CASE("layer_pipeline: a throwing stage under capture still joins its streams; bad arguments throw")
{
  PQKV_REQUIRE_GPU();
  pqkv::gpu::stream_set streams;
  pqkv::gpu::layer_pipeline pipeline{streams};
  cudaStream_t const origin = streams.compute();
  pqkv::gpu::decode_stages st;
  st.compute = [](index_t, cudaStream_t s) { launch_spin(s, 1'000); };
  st.fetch = [](index_t l, cudaStream_t s) {
    launch_spin(s, 1'000);
    if (l == 1) { throw std::runtime_error("fetch failed"); }
  };
  st.attend_resident = [](index_t, cudaStream_t s) { launch_spin(s, 1'000); };
  PQKV_CUDA_TRY(cudaStreamBeginCapture(origin, cudaStreamCaptureModeThreadLocal));
  CHECK_THROWS_WITH_AS(pipeline.decode(3, st, origin), "fetch failed", std::runtime_error);
  cudaGraph_t graph = nullptr;
  cudaError_t const ended = cudaStreamEndCapture(origin, &graph);
  CHECK_MESSAGE(ended == cudaSuccess, "EndCapture: ", cudaGetErrorString(ended));
  if (graph != nullptr) { PQKV_CUDA_TRY(cudaGraphDestroy(graph)); }
  (void)cudaGetLastError();
  cudaStreamCaptureStatus status{};
  PQKV_CUDA_TRY(cudaStreamIsCapturing(streams.h2d(), &status));
  CHECK(status == cudaStreamCaptureStatusNone);

  using pqkv::test::error_message;
  CHECK(error_message([&] { pipeline.decode(2, pqkv::gpu::decode_stages{}, origin); }).find("stages.compute is empty") !=
        std::string::npos);
  CHECK(error_message([&] { pipeline.prefill(-1, {st.compute, {}, {}}, origin); }).find("layers=-1") !=
        std::string::npos);
  CHECK(error_message([&] { pqkv::gpu::layer_pipeline p{streams, {65}}; }).find("options.reuse=65") !=
        std::string::npos);
  // Zero layers: fork and join only, the origin stream still works.
  pipeline.decode(0, st, origin);
  PQKV_CUDA_TRY(cudaStreamSynchronize(origin));
}
