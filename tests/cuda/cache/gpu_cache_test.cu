// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::slot_table and pqkv::gpu::block_lfu_cache against their CPU
// models (cpu::slot_table, cpu::block_lfu_cache) on the same traces: the same
// slots, hit flags, inserts (key, slot, evicted, in order), counters and slot
// states, step after step, for LRU, LFU, FIFO, a user policy that runs the
// serial victim path, and PQCache's block LFU; random traces with temporal
// locality and adversarial ones (cyclic scans one larger than the cache,
// all-new selections, duplicates, padding, more distinct keys than slots,
// keys past key_bound). The full step copies the inserted rows from the
// store bit for bit, writes row pointers, and replays in a CUDA graph.
#include <pqkv/cache/block_lfu.hpp>
#include <pqkv/cache/gpu_cache.cuh>
#include <pqkv/cache/slot_table.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/random.hpp>
#include <pqkv/offload/kv_store.cuh>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

using pqkv::index_t;

template <class T>
std::vector<T> download(T const* d, std::size_t n)
{
  std::vector<T> h(n);
  if (n > 0) { PQKV_CUDA_TRY(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost)); }
  return h;
}

template <class T>
void upload(T* d, std::vector<T> const& h)
{
  PQKV_CUDA_TRY(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
}

/// A user policy without `victim_is_argmin`: the GPU asks `victim` once per
/// miss, as the CPU model does. Most recently inserted first out among
/// equal scores (a deliberately different order).
struct newest_first {
  using state_type = pqkv::cache::slot_state;
  PQKV_HD void on_insert(state_type& s, std::uint32_t slot, std::uint32_t step) const
  {
    s.score[slot] = 0.f;
    s.stamp[slot] = 0xFFFFFFFFu - step;
  }
  PQKV_HD void on_hit(state_type& s, std::uint32_t slot, std::uint32_t) const { s.score[slot] += 0.5f; }
  [[nodiscard]] PQKV_HD std::uint32_t victim(state_type const& s) const { return s.argmin(); }
};
static_assert(pqkv::CachePolicy<newest_first>);
static_assert(!pqkv::gpu::victim_is_argmin_v<newest_first>);
static_assert(pqkv::gpu::victim_is_argmin_v<pqkv::cache::lru>);

enum class trace { local, scan, fresh, dups };

/// Keys of one row at one step: [n], -1 padded, some >= key_bound when `bad`.
std::vector<std::int32_t> trace_keys(trace t, int step, int row, int n, int key_bound, std::uint32_t managed, bool bad,
                                     std::uint64_t seed)
{
  std::vector<std::int32_t> keys(static_cast<std::size_t>(n), -1);
  auto rnd = [&](std::uint64_t i, std::uint64_t bound) {
    return static_cast<std::int32_t>(pqkv::detail::random_below(
      seed, static_cast<std::uint64_t>(row * 1000 + step), i, bound));
  };
  switch (t) {
    case trace::local: {
      // A hot window that drifts: most keys near a moving centre, some anywhere.
      int const centre = (step * 7 + row * 31) % key_bound;
      for (int j = 0; j < n; ++j) {
        std::int32_t k = (j % 5 == 4) ? rnd(static_cast<std::uint64_t>(j), static_cast<std::uint64_t>(key_bound))
                                      : (centre + rnd(static_cast<std::uint64_t>(j), 3 * managed)) % key_bound;
        keys[static_cast<std::size_t>(j)] = (j % 11 == 10) ? -1 : k;
      }
      std::sort(keys.begin(), keys.end());  // the scorer's output is ascending
      keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
      keys.resize(static_cast<std::size_t>(n), -1);
      std::rotate(keys.begin(), std::find_if(keys.begin(), keys.end(), [](std::int32_t k) { return k >= 0; }),
                  keys.end());
      break;
    }
    case trace::scan: {
      // A cyclic scan over managed + 1 keys: LRU and FIFO miss on every key.
      int const span = static_cast<int>(managed) + 1;
      for (int j = 0; j < n; ++j) { keys[static_cast<std::size_t>(j)] = ((step * n + j) % span) % key_bound; }
      break;
    }
    case trace::fresh: {
      // Every step new keys, often more distinct than there are slots (bypass).
      for (int j = 0; j < n; ++j) { keys[static_cast<std::size_t>(j)] = (step * n + j) % key_bound; }
      break;
    }
    case trace::dups: {
      // Duplicates, unsorted, padding in the middle.
      for (int j = 0; j < n; ++j) {
        keys[static_cast<std::size_t>(j)] = (j % 4 == 1) ? -1 : rnd(static_cast<std::uint64_t>(j), std::max(4u, managed / 2 + 3));
      }
      break;
    }
  }
  if (bad) {
    for (int j = 3; j < n; j += 13) { keys[static_cast<std::size_t>(j)] = key_bound + j; }
  }
  return keys;
}

template <class Policy>
void compare_table(trace t, std::uint32_t capacity, pqkv::cpu::reserve reserved, int n, int steps, bool bad,
                   std::uint64_t seed, Policy policy = Policy{}, std::int32_t key_bound = 300,
                   std::int32_t max_shared_key_slots = -1)
{
  index_t const layers = 2, batch = 2, heads = 3, rows = batch * heads;
  pqkv::gpu::slot_table_shape const shape{.layers = layers, .batch = batch, .kv_heads = heads, .capacity = capacity,
                                          .key_bound = key_bound, .max_keys = n, .reserved = reserved,
                                          .max_shared_key_slots = max_shared_key_slots};
  pqkv::gpu::slot_table<Policy> gpu{shape, policy};
  std::uint32_t const managed = gpu.managed_slots();
  std::vector<pqkv::cpu::slot_table<Policy>> cpu;
  for (index_t i = 0; i < layers * rows; ++i) { cpu.emplace_back(capacity, key_bound, policy, reserved); }
  pqkv::device_buffer<std::int32_t> d_keys(static_cast<std::size_t>(rows * n)), d_slots(d_keys.size()),
    d_newest(static_cast<std::size_t>(batch));
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&stream));
  int mismatches = 0, total_inserts = 0, total_evictions = 0, total_bypassed = 0, total_hits = 0;
  for (int step = 1; step <= steps; ++step) {
    for (index_t layer = 0; layer < layers; ++layer) {
      std::vector<std::int32_t> keys(static_cast<std::size_t>(rows * n));
      std::vector<std::int32_t> newest(static_cast<std::size_t>(batch), -1);
      for (index_t r = 0; r < rows; ++r) {
        auto const k = trace_keys(t, step, static_cast<int>(r + layer * 17), n, key_bound, managed, bad, seed);
        std::copy(k.begin(), k.end(), keys.begin() + r * n);
      }
      if (reserved == pqkv::cpu::reserve::newest) {
        for (index_t b = 0; b < batch; ++b) {
          newest[static_cast<std::size_t>(b)] = keys[static_cast<std::size_t>(b * heads * n + 1)];  // a selected key
          if (newest[static_cast<std::size_t>(b)] >= key_bound) { newest[static_cast<std::size_t>(b)] = 5; }
        }
      }
      upload(d_keys.data(), keys);
      upload(d_newest.data(), newest);
      gpu.access(layer, pqkv::make_view(static_cast<std::int32_t const*>(d_keys.data()), batch, heads, n),
                 reserved == pqkv::cpu::reserve::newest
                   ? std::span<std::int32_t const>(d_newest.data(), static_cast<std::size_t>(batch))
                   : std::span<std::int32_t const>{},
                 pqkv::make_view(d_slots.data(), batch, heads, n), stream);
      PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
      auto const last = gpu.last();
      auto const slots = download(d_slots.data(), d_slots.size());
      auto const hit = download(last.hit, static_cast<std::size_t>(rows * n));
      auto const ins_key = download(last.ins_key, static_cast<std::size_t>(rows * n));
      auto const ins_slot = download(last.ins_slot, static_cast<std::size_t>(rows * n));
      auto const ins_ev = download(last.ins_evicted, static_cast<std::size_t>(rows * n));
      auto const ins_count = download(last.ins_count, static_cast<std::size_t>(rows));
      auto const counters = download(last.counters, static_cast<std::size_t>(rows * 4));
      for (index_t r = 0; r < rows; ++r) {
        std::vector<std::int32_t> cpu_keys(keys.begin() + r * n, keys.begin() + (r + 1) * n);
        int bad_keys = 0;
        for (auto& k : cpu_keys) {
          if (k >= key_bound) {
            k = -1;  // the GPU treats it as padding and counts it
            ++bad_keys;
          }
        }
        auto const& ref =
          cpu[static_cast<std::size_t>(layer * rows + r)].access(cpu_keys, static_cast<std::uint32_t>(step),
                                                                 newest[static_cast<std::size_t>(r / heads)]);
        int row_bad = 0;
        for (int j = 0; j < n; ++j) {
          auto const at = static_cast<std::size_t>(r * n + j);
          row_bad += slots[at] != ref.slots[static_cast<std::size_t>(j)];
          row_bad += hit[at] != ref.hit[static_cast<std::size_t>(j)];
        }
        row_bad += ins_count[static_cast<std::size_t>(r)] != static_cast<std::int32_t>(ref.inserts.size());
        for (std::size_t i = 0; i < ref.inserts.size() && i < static_cast<std::size_t>(n); ++i) {
          auto const at = static_cast<std::size_t>(r * n) + i;
          row_bad += ins_key[at] != ref.inserts[i].key || ins_slot[at] != ref.inserts[i].slot ||
                     ins_ev[at] != ref.inserts[i].evicted;
          total_evictions += ref.inserts[i].evicted >= 0;
        }
        auto const* c = counters.data() + r * 4;
        row_bad += c[0] != static_cast<std::int32_t>(ref.hits) || c[1] != static_cast<std::int32_t>(ref.misses) ||
                   c[2] != static_cast<std::int32_t>(ref.bypassed) || c[3] != bad_keys;
        if (row_bad != 0 && mismatches == 0) {
          MESSAGE("first mismatch: step ", step, " layer ", layer, " row ", r);
        }
        mismatches += row_bad;
        total_inserts += static_cast<int>(ref.inserts.size());
        total_bypassed += static_cast<int>(ref.bypassed);
        total_hits += static_cast<int>(ref.hits);
      }
    }
  }
  // The slot states (keys, scores, stamps) at the end.
  auto const m = static_cast<std::size_t>(managed);
  auto const keys_at = download(gpu.slot_keys(), static_cast<std::size_t>(layers * rows) * m);
  auto const scores = download(gpu.slot_scores(), keys_at.size());
  auto const stamps = download(gpu.slot_stamps(), keys_at.size());
  int state_bad = 0;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    for (std::uint32_t s = 0; s < managed; ++s) {
      std::size_t const at = i * m + s;
      state_bad += keys_at[at] != cpu[i].key_at(s);
      if (cpu[i].key_at(s) >= 0) {
        state_bad += scores[at] != cpu[i].score(s) || stamps[at] != cpu[i].stamp(s);
      }
    }
  }
  CHECK(mismatches == 0);
  CHECK(state_bad == 0);
  CHECK(total_inserts > 0);
  MESSAGE("trace ", static_cast<int>(t), " capacity ", capacity, ": hits ", total_hits, ", inserts ", total_inserts,
          ", evictions ", total_evictions, ", bypassed ", total_bypassed);
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

template <class Policy>
void compare_policy(Policy policy = Policy{})
{
  using pqkv::cpu::reserve;
  compare_table<Policy>(trace::local, 64, reserve::none, 48, 12, false, 1, policy);
  compare_table<Policy>(trace::local, 200, reserve::newest, 96, 10, true, 2, policy);
  compare_table<Policy>(trace::scan, 32, reserve::none, 16, 12, false, 3, policy);
  compare_table<Policy>(trace::fresh, 24, reserve::none, 40, 6, false, 4, policy);   // bypasses
  compare_table<Policy>(trace::dups, 16, reserve::newest, 40, 10, true, 5, policy);
  compare_table<Policy>(trace::local, 3000, reserve::none, 2500, 5, false, 6, policy, 20000);  // several scan tiles
}

}  // namespace

TEST_CASE("gpu::slot_table: LRU makes the CPU model's decisions")
{
  PQKV_REQUIRE_GPU();
  compare_policy<pqkv::cache::lru>();
}

TEST_CASE("gpu::slot_table: LFU makes the CPU model's decisions")
{
  PQKV_REQUIRE_GPU();
  compare_policy<pqkv::cache::lfu>();
}

TEST_CASE("gpu::slot_table: FIFO makes the CPU model's decisions")
{
  PQKV_REQUIRE_GPU();
  compare_policy<pqkv::cache::fifo>();
}

TEST_CASE("gpu::slot_table: eviction keys past shared memory (global scratch) match too")
{
  PQKV_REQUIRE_GPU();
  compare_table<pqkv::cache::lru>(trace::local, 6000, pqkv::cpu::reserve::none, 2500, 4, false, 10, {}, 24000, 0);
  compare_table<pqkv::cache::lfu>(trace::local, 5200, pqkv::cpu::reserve::newest, 2000, 4, true, 11, {}, 24000, 4096);
}

TEST_CASE("gpu::slot_table: more victims in one step than a sort tile (LSD sort path) match too")
{
  PQKV_REQUIRE_GPU();
  // 2600 fresh keys a step into 3000 slots: from the second step on, 2200 victims.
  compare_table<pqkv::cache::lru>(trace::fresh, 3000, pqkv::cpu::reserve::none, 2600, 3, false, 12, {}, 100000);
  compare_table<pqkv::cache::lfu>(trace::fresh, 3000, pqkv::cpu::reserve::newest, 2600, 3, false, 13, {}, 100000, 0);
}

TEST_CASE("gpu::slot_table: a user policy runs the serial victim path and matches")
{
  PQKV_REQUIRE_GPU();
  using pqkv::cpu::reserve;
  compare_table<newest_first>(trace::local, 64, reserve::none, 48, 10, false, 7);
  compare_table<newest_first>(trace::dups, 16, reserve::newest, 40, 8, true, 8);
  compare_table<newest_first>(trace::fresh, 24, reserve::none, 40, 5, false, 9);
}

TEST_CASE("gpu::slot_table: step copies inserted rows from the store, writes row pointers, replays in a graph")
{
  PQKV_REQUIRE_GPU();
  using T = __nv_bfloat16;
  index_t const batch = 2, heads = 2, d = 64, n = 24;
  std::uint32_t const capacity = 32;
  std::int32_t const tokens = 100;
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&stream));
  pqkv::gpu::kv_store<T> store{{.layers = 1, .sequences = batch, .kv_heads = heads, .capacity = 128, .head_dim = d}};
  std::vector<T> src(static_cast<std::size_t>(heads * tokens * d));
  for (index_t b = 0; b < batch; ++b) {
    for (std::size_t i = 0; i < src.size(); ++i) {
      std::uint16_t const bits = static_cast<std::uint16_t>(pqkv::detail::random_bits(40 + static_cast<std::uint64_t>(b), 0, i));
      std::memcpy(static_cast<void*>(&src[i]), &bits, 2);
    }
    pqkv::device_buffer<T> d_src(src.size());
    upload(d_src.data(), src);
    auto v = pqkv::make_strided_view<T const, 3>(d_src.data(), {heads, tokens, d}, {tokens * d, d, 1});
    store.append(0, b, v, v, stream);
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  }
  pqkv::gpu::slot_table<pqkv::cache::lru> table{{.layers = 1, .batch = batch, .kv_heads = heads, .capacity = capacity,
                                                 .key_bound = 128, .max_keys = n}};
  pqkv::cpu::slot_table<pqkv::cache::lru> model_table{capacity, 128};
  std::vector<pqkv::cpu::slot_table<pqkv::cache::lru>> models(static_cast<std::size_t>(batch * heads), model_table);
  pqkv::device_buffer<std::int32_t> d_keys(static_cast<std::size_t>(batch * heads * n)), d_slots(d_keys.size()),
    rejected(1);
  pqkv::device_buffer<T const*> k_ptr(d_keys.size()), v_ptr(d_keys.size());
  pqkv::device_buffer<T> hot_k(static_cast<std::size_t>(batch * heads * capacity * d)), hot_v(hot_k.size());
  PQKV_CUDA_TRY(cudaMemset(rejected.data(), 0, sizeof(std::int32_t)));
  auto const ref = store.ref();
  bool split = false;
  SUBCASE("step, with row pointers") {}
  SUBCASE("access, then fetch_inserted on a second stream") { split = true; }
  cudaStream_t side = nullptr;
  cudaEvent_t looked_up = nullptr, fetched = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&side));
  PQKV_CUDA_TRY(cudaEventCreateWithFlags(&looked_up, cudaEventDisableTiming));
  PQKV_CUDA_TRY(cudaEventCreateWithFlags(&fetched, cudaEventDisableTiming));
  auto const keys_view = pqkv::make_view(static_cast<std::int32_t const*>(d_keys.data()), batch, heads, n);
  auto const hot_k_view = pqkv::make_view(hot_k.data(), batch, heads, static_cast<index_t>(capacity), d);
  auto const hot_v_view = pqkv::make_view(hot_v.data(), batch, heads, static_cast<index_t>(capacity), d);
  auto call = [&] {
    if (!split) {
      table.step(0, keys_view, {}, ref, hot_k_view, hot_v_view, pqkv::make_view(d_slots.data(), batch, heads, n),
                 rejected.data(), stream,
                 pqkv::gpu::row_pointers<T>{pqkv::make_view(k_ptr.data(), batch, heads, n),
                                            pqkv::make_view(v_ptr.data(), batch, heads, n)});
      return;
    }
    // The lookup on the main stream, the fetch forked onto a side stream and joined back.
    table.access(0, keys_view, {}, pqkv::make_view(d_slots.data(), batch, heads, n), stream);
    PQKV_CUDA_TRY(cudaEventRecord(looked_up, stream));
    PQKV_CUDA_TRY(cudaStreamWaitEvent(side, looked_up));
    table.fetch_inserted(ref, hot_k_view, hot_v_view, rejected.data(), side);
    PQKV_CUDA_TRY(cudaEventRecord(fetched, side));
    PQKV_CUDA_TRY(cudaStreamWaitEvent(stream, fetched));
  };
  // Capture one step; replay it with new keys written into device memory.
  pqkv::test::captured_graph const graph(stream, call);
  int bad_rows = 0, bad_slots = 0, bad_ptrs = 0, copied = 0;
  for (int step = 1; step <= 8; ++step) {
    std::vector<std::int32_t> keys(d_keys.size());
    for (std::size_t i = 0; i < keys.size(); ++i) {
      auto const j = static_cast<std::int32_t>(i % static_cast<std::size_t>(n));
      keys[i] = j == 7 ? -1 : (step * 5 + j * 3 + static_cast<std::int32_t>(i / static_cast<std::size_t>(n))) % tokens;
    }
    upload(d_keys.data(), keys);
    graph.launch(stream);
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    auto const slots = download(d_slots.data(), d_slots.size());
    auto const hk = download(hot_k.data(), hot_k.size());
    auto const hv = download(hot_v.data(), hot_v.size());
    auto const kp = download(k_ptr.data(), k_ptr.size());
    auto const vp = download(v_ptr.data(), v_ptr.size());
    for (index_t r = 0; r < batch * heads; ++r) {
      std::vector<std::int32_t> row_keys(keys.begin() + r * n, keys.begin() + (r + 1) * n);
      auto const& m = models[static_cast<std::size_t>(r)].access(row_keys, static_cast<std::uint32_t>(step));
      copied += static_cast<int>(m.inserts.size());
      index_t const b = r / heads, h = r % heads;
      for (index_t j = 0; j < n; ++j) {
        auto const at = static_cast<std::size_t>(r * n + j);
        std::int32_t const key = row_keys[static_cast<std::size_t>(j)];
        bad_slots += slots[at] != m.slots[static_cast<std::size_t>(j)];
        if (key < 0) {
          bad_ptrs += !split && (kp[at] != nullptr || vp[at] != nullptr);
          continue;
        }
        std::int32_t const slot = slots[at];
        T const* want_k = hot_k.data() + (r * capacity + slot) * d;
        T const* want_v = hot_v.data() + (r * capacity + slot) * d;
        bad_ptrs += !split && (kp[at] != want_k || vp[at] != want_v);
        // The hot row holds the store row of its key, bit for bit (K and V are the same data here).
        T const* stored = store.host_keys() + ((b * heads + h) * 128 + key) * d;
        bad_rows += std::memcmp(hk.data() + (r * capacity + slot) * d, stored, static_cast<std::size_t>(d) * sizeof(T)) != 0;
        bad_rows += std::memcmp(hv.data() + (r * capacity + slot) * d, stored, static_cast<std::size_t>(d) * sizeof(T)) != 0;
      }
    }
  }
  std::int32_t rej = -1;
  PQKV_CUDA_TRY(cudaMemcpy(&rej, rejected.data(), sizeof(rej), cudaMemcpyDeviceToHost));
  CHECK(bad_slots == 0);
  CHECK(bad_rows == 0);
  CHECK(bad_ptrs == 0);
  CHECK(rej == 0);
  CHECK(copied > 0);
  PQKV_CUDA_TRY(cudaEventDestroy(looked_up));
  PQKV_CUDA_TRY(cudaEventDestroy(fetched));
  PQKV_CUDA_TRY(cudaStreamDestroy(side));
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

TEST_CASE("gpu::slot_table: host misuse throws before any launch")
{
  PQKV_REQUIRE_GPU();
  CHECK_THROWS_AS(pqkv::gpu::slot_table<>({.key_bound = 0}), pqkv::error);
  CHECK_THROWS_AS(pqkv::gpu::slot_table<>({.capacity = 1, .key_bound = 10, .reserved = pqkv::cpu::reserve::newest}),
                  pqkv::error);
  pqkv::gpu::slot_table<> t{{.layers = 1, .batch = 1, .kv_heads = 2, .capacity = 8, .key_bound = 10, .max_keys = 4}};
  pqkv::device_buffer<std::int32_t> k(16), s(16);
  CHECK_THROWS_WITH_AS(t.fetch_inserted(pqkv::gpu::kv_store_ref<float>{}, pqkv::view<float, 4>{},
                                        pqkv::view<float, 4>{}, nullptr, nullptr),
                       doctest::Contains("no access or step call precedes it"), pqkv::error);
  auto keys = pqkv::make_view(static_cast<std::int32_t const*>(k.data()), 1, 2, 4);
  auto slots = pqkv::make_view(s.data(), 1, 2, 4);
  CHECK_THROWS_AS(t.access(1, keys, {}, slots, nullptr), pqkv::error);  // layer
  CHECK_THROWS_WITH_AS(t.access(0, pqkv::make_view(static_cast<std::int32_t const*>(k.data()), 1, 2, 5), {},
                                pqkv::make_view(s.data(), 1, 2, 5), nullptr),
                       doctest::Contains("max_keys=4"), pqkv::error);
  CHECK_THROWS_AS(t.access(0, pqkv::make_view(static_cast<std::int32_t const*>(k.data()), 1, 3, 4), {},
                           pqkv::make_view(s.data(), 1, 3, 4), nullptr),
                  pqkv::error);  // heads
  CHECK_THROWS_AS(t.access(0, keys, {}, pqkv::make_view(s.data(), 1, 2, 3), nullptr), pqkv::error);  // slots shape
  CHECK_THROWS_AS(t.access(0, keys, std::span<std::int32_t const>(k.data(), 2), slots, nullptr), pqkv::error);
}

TEST_CASE("gpu::slot_table, gpu::block_lfu_cache: record their device and throw when called from another")
{
  PQKV_REQUIRE_GPU();
  int device = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  pqkv::gpu::slot_table<> table{{.layers = 1, .batch = 1, .kv_heads = 2, .capacity = 8, .key_bound = 10, .max_keys = 4}};
  pqkv::gpu::block_lfu_cache cache{
    {.capacity_blocks = 4, .block_tokens = 8, .blocks_per_step = 4, .max_tokens = 64}, 1, 1, 2, 4};
  CHECK(table.device() == device);
  CHECK(cache.device() == device);
  int const other = pqkv::test::other_device();
  if (other < 0) {
    MESSAGE("cross-device part skipped: it needs 2 GPUs");
    return;
  }
  {
    pqkv::test::device_scope on_other{other};
    pqkv::device_buffer<std::int32_t> k(8), s(8);  // on the other device: only the table's device is checked
    auto keys = pqkv::make_view(static_cast<std::int32_t const*>(k.data()), 1, 2, 4);
    CHECK_THROWS_WITH_AS(table.access(0, keys, {}, pqkv::make_view(s.data(), 1, 2, 4), nullptr),
                         doctest::Contains("the object was built on device"), pqkv::error);
    CHECK_THROWS_WITH_AS(table.reset(nullptr), doctest::Contains("the object was built on device"), pqkv::error);
    CHECK_THROWS_WITH_AS(cache.reset(nullptr), doctest::Contains("the object was built on device"), pqkv::error);
  }
  int now = -1;
  PQKV_CUDA_TRY(cudaGetDevice(&now));
  CHECK(now == device);
}

namespace {

void compare_block_lfu(pqkv::cpu::block_lfu_config cfg, int k, int steps, std::uint64_t seed, bool partial_offload)
{
  index_t const layers = 2, batch = 2, heads = 4;
  pqkv::gpu::block_lfu_cache gpu{cfg, layers, batch, heads, k};
  std::vector<pqkv::cpu::block_lfu_cache> cpu(static_cast<std::size_t>(layers * batch), pqkv::cpu::block_lfu_cache{cfg});
  pqkv::device_buffer<std::int32_t> d_sel(static_cast<std::size_t>(batch * heads * k)), d_rows(d_sel.size()),
    d_off(static_cast<std::size_t>(batch));
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&stream));
  auto const per = static_cast<std::size_t>(cfg.blocks_per_step);
  int mismatches = 0, inserts = 0, evictions = 0, copies = 0;
  for (int step = 1; step <= steps; ++step) {
    for (index_t layer = 0; layer < layers; ++layer) {
      std::vector<std::int32_t> sel(d_sel.size());
      std::vector<std::int32_t> off(static_cast<std::size_t>(batch));
      for (index_t b = 0; b < batch; ++b) {
        auto const cell = static_cast<std::uint64_t>((layer * batch + b) * 10000 + step);
        off[static_cast<std::size_t>(b)] =
          partial_offload ? static_cast<std::int32_t>(cfg.max_tokens - 1 - static_cast<std::int64_t>(step) * 37 % 300)
                          : static_cast<std::int32_t>(cfg.max_tokens);
        for (index_t h = 0; h < heads; ++h) {
          for (int j = 0; j < k; ++j) {
            auto const i = static_cast<std::size_t>((b * heads + h) * k + j);
            // Temporal locality: a drifting centre, plus noise and padding.
            std::int64_t const centre = (static_cast<std::int64_t>(step) * 97 + h * 500) % cfg.max_tokens;
            auto const r = pqkv::detail::random_below(seed, cell, static_cast<std::uint64_t>(h * k + j), 1000);
            std::int64_t pos = r < 700 ? (centre + static_cast<std::int64_t>(r) * 3) % cfg.max_tokens
                                       : static_cast<std::int64_t>(pqkv::detail::random_below(
                                           seed + 1, cell, static_cast<std::uint64_t>(h * k + j),
                                           static_cast<std::uint64_t>(cfg.max_tokens)));
            sel[i] = (j % 9 == 8) ? -1 : static_cast<std::int32_t>(pos);
          }
        }
      }
      upload(d_sel.data(), sel);
      upload(d_off.data(), off);
      gpu.step(layer, pqkv::make_view(static_cast<std::int32_t const*>(d_sel.data()), batch, heads, k),
               std::span<std::int32_t const>(d_off.data(), static_cast<std::size_t>(batch)),
               pqkv::make_view(d_rows.data(), batch, heads, k), stream);
      PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
      auto const last = gpu.last();
      auto const rows = download(d_rows.data(), d_rows.size());
      auto const promoted = download(last.promoted, static_cast<std::size_t>(batch) * per);
      auto const ib = download(last.ins_block, static_cast<std::size_t>(batch) * per);
      auto const is = download(last.ins_slot, ib.size());
      auto const ie = download(last.ins_evicted, ib.size());
      auto const ic = download(last.ins_copy, ib.size());
      auto const counters = download(last.counters, static_cast<std::size_t>(batch * 5));
      auto const copy_count = download(last.copy_count, static_cast<std::size_t>(batch * heads));
      for (index_t b = 0; b < batch; ++b) {
        std::vector<std::int32_t> cpu_rows(static_cast<std::size_t>(heads * k));
        auto const& ref = cpu[static_cast<std::size_t>(layer * batch + b)].step(
          pqkv::make_view(static_cast<std::int32_t const*>(sel.data()) + b * heads * k, heads, k),
          off[static_cast<std::size_t>(b)], pqkv::make_view(cpu_rows.data(), heads, k));
        int bad = 0;
        for (std::size_t i = 0; i < cpu_rows.size(); ++i) {
          bad += rows[static_cast<std::size_t>(b * heads * k) + i] != cpu_rows[i];
        }
        auto const* c = counters.data() + b * 5;
        bad += c[0] != ref.token_hits || c[1] != ref.token_misses ||
               c[2] != static_cast<std::int32_t>(ref.promoted.size()) ||
               c[3] != static_cast<std::int32_t>(ref.inserts.size());
        for (std::size_t i = 0; i < ref.promoted.size(); ++i) { bad += promoted[b * per + i] != ref.promoted[i]; }
        int ref_copies = 0;
        for (std::size_t i = 0; i < ref.inserts.size(); ++i) {
          auto const& in = ref.inserts[i];
          bad += ib[b * per + i] != in.block || is[b * per + i] != in.slot || ie[b * per + i] != in.evicted ||
                 (ic[b * per + i] != 0) != in.copy;
          ref_copies += in.copy ? 1 : 0;
          evictions += in.evicted >= 0;
        }
        for (index_t h = 0; h < heads; ++h) {
          bad += copy_count[static_cast<std::size_t>(b * heads + h)] != ref_copies * static_cast<int>(cfg.block_tokens);
        }
        if (bad != 0 && mismatches == 0) { MESSAGE("first block-LFU mismatch: step ", step, " layer ", layer, " seq ", b); }
        mismatches += bad;
        inserts += static_cast<int>(ref.inserts.size());
        copies += ref_copies;
      }
    }
  }
  CHECK(mismatches == 0);
  CHECK(inserts > 0);
  MESSAGE("block LFU: inserts ", inserts, ", evictions ", evictions, ", copies ", copies);
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

}  // namespace

TEST_CASE("gpu::block_lfu_cache: PQCache's block LFU makes the CPU model's decisions")
{
  PQKV_REQUIRE_GPU();
  compare_block_lfu({.capacity_blocks = 8, .block_tokens = 16, .blocks_per_step = 8, .max_tokens = 2000}, 64, 12, 1,
                    false);
  compare_block_lfu({.capacity_blocks = 6, .block_tokens = 16, .blocks_per_step = 10, .max_tokens = 2000}, 96, 10, 2,
                    true);  // more kept blocks than slots: a step evicts its own inserts
  compare_block_lfu({.capacity_blocks = 32, .block_tokens = 128, .blocks_per_step = 32, .max_tokens = 40000}, 512, 6,
                    3, true);
}

TEST_CASE("gpu::block_lfu_cache: copy_blocks moves the marked blocks from the store")
{
  PQKV_REQUIRE_GPU();
  using T = __half;
  pqkv::cpu::block_lfu_config const cfg{.capacity_blocks = 4, .block_tokens = 8, .blocks_per_step = 4, .max_tokens = 64};
  index_t const heads = 2, d = 16, k = 12;
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&stream));
  pqkv::gpu::kv_store<T> store{{.layers = 1, .sequences = 1, .kv_heads = heads, .capacity = 64, .head_dim = d}};
  std::vector<T> src(static_cast<std::size_t>(heads * 64 * d));
  for (std::size_t i = 0; i < src.size(); ++i) { src[i] = __float2half(static_cast<float>(i % 2048)); }
  pqkv::device_buffer<T> d_src(src.size());
  upload(d_src.data(), src);
  auto v = pqkv::make_strided_view<T const, 3>(d_src.data(), {heads, 64, d}, {64 * d, d, 1});
  store.append(0, 0, v, v, stream);
  pqkv::gpu::block_lfu_cache cache{cfg, 1, 1, heads, k};
  std::vector<std::int32_t> sel(static_cast<std::size_t>(heads * k));
  for (std::size_t i = 0; i < sel.size(); ++i) { sel[i] = static_cast<std::int32_t>((i * 5) % 64); }
  pqkv::device_buffer<std::int32_t> d_sel(sel.size());
  upload(d_sel.data(), sel);
  pqkv::device_buffer<T> hot(static_cast<std::size_t>(heads * 4 * 8 * d));
  PQKV_CUDA_TRY(cudaMemset(hot.data(), 0, hot.size_bytes()));
  cache.step(0, pqkv::make_view(static_cast<std::int32_t const*>(d_sel.data()), 1, heads, k),
             std::span<std::int32_t const>(store.committed(), 1), pqkv::make_view<std::int32_t>(nullptr, 0, 0, 0),
             stream);
  auto hv = pqkv::make_view(hot.data(), 1, heads, 32, d);
  cache.copy_blocks(store.ref(), 0, hv, hv, nullptr, stream);
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  pqkv::cpu::block_lfu_cache model{cfg};
  auto const& ref = model.step(pqkv::make_view(static_cast<std::int32_t const*>(sel.data()), heads, k), 64);
  auto const h = download(hot.data(), hot.size());
  int bad = 0, copied = 0;
  for (auto const& in : ref.inserts) {
    if (!in.copy) { continue; }
    ++copied;
    for (index_t g = 0; g < heads; ++g) {
      bad += std::memcmp(h.data() + (g * 32 + in.slot * 8) * d, src.data() + (g * 64 + in.block * 8) * d,
                         static_cast<std::size_t>(8 * d) * sizeof(T)) != 0;
    }
  }
  CHECK(copied > 0);
  CHECK(bad == 0);
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}
