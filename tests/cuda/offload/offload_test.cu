// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::kv_store and the gathers: appended rows land bit for bit (HND and
// NHD sources, prefill chunks and single tokens); gathered rows equal the
// stored ones bit for bit for every dtype, row size and padding pattern;
// bad indices are rejected and counted, never read; appends racing with
// gathers on another stream never expose a half-written row; graph replays
// follow indices in device memory; the copy-engine path agrees.
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/random.hpp>
#include <pqkv/offload/gather.cuh>
#include <pqkv/offload/kv_store.cuh>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using pqkv::index_t;

template <class T>
std::vector<T> random_rows(std::size_t count, std::uint64_t seed)
{
  // Raw random bytes: every bit pattern (NaN payloads included) must survive.
  std::vector<T> out(count);
  auto* bytes = reinterpret_cast<unsigned char*>(out.data());
  for (std::size_t i = 0; i < count * sizeof(T); ++i) {
    bytes[i] = static_cast<unsigned char>(pqkv::detail::random_bits(seed, 7, i));
  }
  return out;
}

template <class T>
void upload(pqkv::device_buffer<T>& d, std::vector<T> const& h)
{
  PQKV_CUDA_TRY(cudaMemcpy(d.data(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
}

template <class T>
std::vector<T> download(pqkv::device_buffer<T> const& d)
{
  std::vector<T> h(d.size());
  PQKV_CUDA_TRY(cudaMemcpy(h.data(), d.data(), d.size_bytes(), cudaMemcpyDeviceToHost));
  return h;
}

/// A store filled by appends, with the host copy of what was appended:
/// ref_k[layer][seq] = [kv_heads, tokens, dim].
template <class T>
struct filled_store {
  pqkv::gpu::kv_store<T> store;
  std::vector<std::vector<std::vector<T>>> ref_k, ref_v;
};

template <class T>
filled_store<T> fill_store(pqkv::gpu::kv_store_shape const& shape, index_t tokens, std::uint64_t seed,
                           cudaStream_t stream)
{
  filled_store<T> f{pqkv::gpu::kv_store<T>{shape}, {}, {}};
  index_t const h = shape.kv_heads, d = shape.head_dim;
  f.ref_k.assign(static_cast<std::size_t>(shape.layers), std::vector<std::vector<T>>(static_cast<std::size_t>(shape.sequences)));
  f.ref_v = f.ref_k;
  index_t const prefill = tokens * 2 / 3;
  for (index_t l = 0; l < shape.layers; ++l) {
    for (index_t s = 0; s < shape.sequences; ++s) {
      auto const cell = static_cast<std::uint64_t>(l * shape.sequences + s);
      auto hk = random_rows<T>(static_cast<std::size_t>(h * tokens * d), seed * 1000 + cell * 2);
      auto hv = random_rows<T>(static_cast<std::size_t>(h * tokens * d), seed * 1000 + cell * 2 + 1);
      // Prefill chunk in HND [h, prefill, d] (a slice of the [h, tokens, d] arrays).
      pqkv::device_buffer<T> dk(hk.size()), dv(hv.size());
      upload(dk, hk);
      upload(dv, hv);
      auto chunk = [&](T const* base, index_t t0, index_t nt) {
        return pqkv::make_strided_view<T const, 3>(base + t0 * d, {h, nt, d}, {tokens * d, d, 1});
      };
      f.store.append(l, s, chunk(dk.data(), 0, prefill), chunk(dv.data(), 0, prefill), stream);
      // Decode tokens one at a time from an NHD buffer [tokens, h, d].
      std::vector<T> nk(hk.size()), nv(hv.size());
      for (index_t t = 0; t < tokens; ++t) {
        for (index_t g = 0; g < h; ++g) {
          std::copy_n(hk.begin() + (g * tokens + t) * d, d, nk.begin() + (t * h + g) * d);
          std::copy_n(hv.begin() + (g * tokens + t) * d, d, nv.begin() + (t * h + g) * d);
        }
      }
      pqkv::device_buffer<T> nhd_k(nk.size()), nhd_v(nv.size());
      upload(nhd_k, nk);
      upload(nhd_v, nv);
      for (index_t t = prefill; t < tokens; ++t) {
        auto one = [&](T const* base) {
          return pqkv::make_strided_view<T const, 3>(base + t * h * d, {h, 1, d}, {d, h * d, 1});
        };
        f.store.append(l, s, one(nhd_k.data()), one(nhd_v.data()), stream);
      }
      PQKV_CUDA_TRY(cudaStreamSynchronize(stream));  // the staging buffers go out of scope
      f.ref_k[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)] = std::move(hk);
      f.ref_v[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)] = std::move(hv);
    }
  }
  return f;
}

enum class pad { none, interleaved, trailing, all, bad };

/// Indices [batch, h, n] over `tokens` rows with a padding pattern; `bad`
/// mixes in entries at or past the committed count.
std::vector<std::int32_t> make_indices(index_t batch, index_t h, index_t n, index_t tokens, pad p, std::uint64_t seed,
                                       index_t capacity)
{
  std::vector<std::int32_t> idx(static_cast<std::size_t>(batch * h * n));
  for (std::size_t i = 0; i < idx.size(); ++i) {
    auto const j = static_cast<index_t>(i) % n;
    auto v = static_cast<std::int32_t>(pqkv::detail::random_below(seed, 3, i, static_cast<std::uint64_t>(tokens)));
    switch (p) {
      case pad::none: break;
      case pad::interleaved: v = (i % 3 == 1) ? -1 : v; break;
      case pad::trailing: v = j >= n / 2 ? -1 : v; break;
      case pad::all: v = -1; break;
      case pad::bad: {
        std::int32_t const bad[] = {static_cast<std::int32_t>(tokens), static_cast<std::int32_t>(capacity),
                                    static_cast<std::int32_t>(capacity + 1000), 0x7FFFFFFF, -5};
        if (i % 4 == 0) { v = bad[(i / 4) % 5]; }
        break;
      }
    }
    idx[i] = v;
  }
  return idx;
}

template <class T>
void check_gather(index_t head_dim, pad p, bool graph)
{
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&stream));
  pqkv::gpu::kv_store_shape const shape{.layers = 2, .sequences = 2, .kv_heads = 3, .capacity = 80, .head_dim = head_dim};
  index_t const tokens = 50, n = 37, batch = 2, h = shape.kv_heads;
  auto f = fill_store<T>(shape, tokens, 11 + static_cast<std::uint64_t>(head_dim), stream);
  index_t const layer = 1;
  auto const idx = make_indices(batch, h, n, tokens, p, 5 + static_cast<std::uint64_t>(p), shape.capacity);
  pqkv::device_buffer<std::int32_t> d_idx(idx.size()), rejected(1);
  upload(d_idx, idx);
  PQKV_CUDA_TRY(cudaMemset(rejected.data(), 0, sizeof(std::int32_t)));
  auto const out_count = static_cast<std::size_t>(batch * h * n * head_dim);
  pqkv::device_buffer<T> k_out(out_count), v_out(out_count);
  PQKV_CUDA_TRY(cudaMemset(k_out.data(), 0xA5, k_out.size_bytes()));  // poison: untouched rows keep it
  PQKV_CUDA_TRY(cudaMemset(v_out.data(), 0x5A, v_out.size_bytes()));
  auto const ref = f.store.ref();
  auto call = [&] {
    pqkv::gpu::gather(ref, layer, pqkv::make_view(static_cast<std::int32_t const*>(d_idx.data()), batch, h, n),
                      pqkv::make_view(k_out.data(), batch, h, n, head_dim),
                      pqkv::make_view(v_out.data(), batch, h, n, head_dim), rejected.data(), stream);
  };
  if (graph) {
    pqkv::test::captured_graph(stream, call).launch(stream);
  } else {
    call();
  }
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  auto const hk = download(k_out), hv = download(v_out);
  std::int32_t rej = 0;
  PQKV_CUDA_TRY(cudaMemcpy(&rej, rejected.data(), sizeof(rej), cudaMemcpyDeviceToHost));
  std::vector<T> poison_k(static_cast<std::size_t>(head_dim)), poison_v(static_cast<std::size_t>(head_dim));
  std::memset(static_cast<void*>(poison_k.data()), 0xA5, poison_k.size() * sizeof(T));
  std::memset(static_cast<void*>(poison_v.data()), 0x5A, poison_v.size() * sizeof(T));
  std::size_t const row_bytes = static_cast<std::size_t>(head_dim) * sizeof(T);
  int expected_rejects = 0, mismatches = 0;
  for (index_t b = 0; b < batch; ++b) {
    for (index_t g = 0; g < h; ++g) {
      for (index_t j = 0; j < n; ++j) {
        std::int32_t const src = idx[static_cast<std::size_t>((b * h + g) * n + j)];
        auto const out_off = static_cast<std::size_t>(((b * h + g) * n + j) * head_dim);
        T const* want_k = poison_k.data();
        T const* want_v = poison_v.data();
        if (src >= tokens) { ++expected_rejects; }
        if (src >= 0 && src < tokens) {
          auto const& rk = f.ref_k[layer][static_cast<std::size_t>(b)];
          auto const& rv = f.ref_v[layer][static_cast<std::size_t>(b)];
          want_k = rk.data() + (g * tokens + src) * head_dim;
          want_v = rv.data() + (g * tokens + src) * head_dim;
        }
        mismatches += std::memcmp(hk.data() + out_off, want_k, row_bytes) != 0;
        mismatches += std::memcmp(hv.data() + out_off, want_v, row_bytes) != 0;
      }
    }
  }
  CHECK(mismatches == 0);
  CHECK(rej == expected_rejects);
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

}  // namespace

TEST_CASE("kv_store: appends of prefill chunks (HND) and decode tokens (NHD) land bit for bit")
{
  PQKV_REQUIRE_GPU();
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&stream));
  pqkv::gpu::kv_store_shape const shape{.layers = 2, .sequences = 2, .kv_heads = 3, .capacity = 40, .head_dim = 24};
  index_t const tokens = 31;
  auto f = fill_store<__nv_bfloat16>(shape, tokens, 3, stream);
  CHECK(f.store.size(1, 1) == tokens);
  CHECK(f.store.row_bytes() == 48);
  for (index_t l = 0; l < shape.layers; ++l) {
    for (index_t s = 0; s < shape.sequences; ++s) {
      for (index_t g = 0; g < shape.kv_heads; ++g) {
        auto const* host = f.store.host_keys() + ((l * shape.sequences + s) * shape.kv_heads + g) * shape.capacity * shape.head_dim;
        auto const* want = f.ref_k[static_cast<std::size_t>(l)][static_cast<std::size_t>(s)].data() + g * tokens * shape.head_dim;
        CHECK(std::memcmp(host, want, static_cast<std::size_t>(tokens * shape.head_dim) * 2) == 0);
      }
    }
  }
  std::int32_t committed[4] = {};
  PQKV_CUDA_TRY(cudaMemcpy(committed, f.store.committed(), sizeof(committed), cudaMemcpyDeviceToHost));
  for (auto c : committed) { CHECK(c == tokens); }
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

template <class T>
void check_append_at_committed(index_t head_dim)
{
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  index_t const capacity = 9, tokens = 2, replays = 5;  // the fifth replay would pass capacity
  pqkv::gpu::kv_store_shape const shape{.layers = 2, .sequences = 2, .kv_heads = 3, .capacity = capacity,
                                        .head_dim = head_dim};
  pqkv::gpu::kv_store<T> store{shape};
  // One prefill row on the host path first, then the device appends go after it.
  auto const first = random_rows<T>(static_cast<std::size_t>(shape.kv_heads * head_dim), 40);
  pqkv::device_buffer<T> first_d(first.size());
  upload(first_d, first);
  auto const first_v = pqkv::make_strided_view<T const, 3>(first_d.data(), {shape.kv_heads, 1, head_dim},
                                                           {head_dim, head_dim, 1});
  store.append(1, 1, first_v, first_v, stream);
  // A decode token buffer [tokens, kv_heads, head_dim] (NHD), rewritten before each replay.
  std::size_t const elems = static_cast<std::size_t>(tokens * shape.kv_heads * head_dim);
  pqkv::device_buffer<T> k_d(elems), v_d(elems);
  auto const kv = [&](pqkv::device_buffer<T>& b) {
    return pqkv::make_strided_view<T const, 3>(b.data(), {shape.kv_heads, tokens, head_dim},
                                               {head_dim, shape.kv_heads * head_dim, 1});
  };
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  PQKV_CUDA_TRY(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  store.append_at_committed(1, 1, kv(k_d), kv(v_d), stream);
  PQKV_CUDA_TRY(cudaStreamEndCapture(stream, &graph));
  PQKV_CUDA_TRY(cudaGraphInstantiate(&exec, graph, 0));
  std::vector<std::vector<T>> sent_k, sent_v;
  for (index_t r = 0; r < replays; ++r) {
    sent_k.push_back(random_rows<T>(elems, 50 + static_cast<std::uint64_t>(r)));
    sent_v.push_back(random_rows<T>(elems, 60 + static_cast<std::uint64_t>(r)));
    upload(k_d, sent_k.back());
    upload(v_d, sent_v.back());
    PQKV_CUDA_TRY(cudaGraphLaunch(exec, stream));
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  }
  std::int32_t committed[4] = {}, overflows = 0;
  PQKV_CUDA_TRY(cudaMemcpy(committed, store.committed(), sizeof(committed), cudaMemcpyDeviceToHost));
  PQKV_CUDA_TRY(cudaMemcpy(&overflows, store.overflows(), sizeof(overflows), cudaMemcpyDeviceToHost));
  CHECK(committed[3] == 1 + 4 * tokens);  // 1 + 4 * 2 = 9 = capacity; the fifth replay wrote nothing
  CHECK(committed[0] == 0);
  CHECK(overflows == 1);
  auto const row = static_cast<std::size_t>(head_dim) * sizeof(T);
  for (index_t g = 0; g < shape.kv_heads; ++g) {
    auto const* base_k = reinterpret_cast<unsigned char const*>(
      store.host_keys() + ((1 * shape.sequences + 1) * shape.kv_heads + g) * capacity * head_dim);
    auto const* base_v = reinterpret_cast<unsigned char const*>(
      store.host_values() + ((1 * shape.sequences + 1) * shape.kv_heads + g) * capacity * head_dim);
    CHECK(std::memcmp(base_k, first.data() + g * head_dim, row) == 0);
    for (index_t r = 0; r < 4; ++r) {
      for (index_t t = 0; t < tokens; ++t) {
        auto const pos = static_cast<std::size_t>(1 + r * tokens + t);
        auto const src = static_cast<std::size_t>((t * shape.kv_heads + g) * head_dim);
        CHECK(std::memcmp(base_k + pos * row, sent_k[static_cast<std::size_t>(r)].data() + src, row) == 0);
        CHECK(std::memcmp(base_v + pos * row, sent_v[static_cast<std::size_t>(r)].data() + src, row) == 0);
      }
    }
  }
  // The host no longer knows this (layer, seq)'s size: host appends and size() refuse until a truncate.
  CHECK_THROWS_AS(store.append(1, 1, first_v, first_v, stream), pqkv::error);
  CHECK_THROWS_AS((void)store.size(1, 1), pqkv::error);
  CHECK(store.size(0, 0) == 0);
  store.truncate(1, 1, 3, stream);
  CHECK(store.size(1, 1) == 3);
  store.append(1, 1, first_v, first_v, stream);
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  PQKV_CUDA_TRY(cudaMemcpy(committed, store.committed(), sizeof(committed), cudaMemcpyDeviceToHost));
  CHECK(committed[3] == 4);
  PQKV_CUDA_TRY(cudaGraphExecDestroy(exec));
  PQKV_CUDA_TRY(cudaGraphDestroy(graph));
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

TEST_CASE("kv_store: append_at_committed replays from a graph at the device's count, bit for bit, and stops at capacity")
{
  PQKV_REQUIRE_GPU();
  check_append_at_committed<__nv_bfloat16>(128);  // 16-byte stores
  check_append_at_committed<float>(5);            // 4-byte stores
  check_append_at_committed<__nv_fp8_e4m3>(7);    // byte stores
}

TEST_CASE("gather: rows equal the stored originals bit for bit, every dtype and padding pattern")
{
  PQKV_REQUIRE_GPU();
  for (pad p : {pad::none, pad::interleaved, pad::trailing, pad::all, pad::bad}) {
    CAPTURE(static_cast<int>(p));
    check_gather<float>(128, p, false);
    check_gather<float>(5, p, false);  // 20-byte rows: 4-byte vectors
    check_gather<__half>(128, p, false);
    check_gather<__half>(3, p, false);  // 6-byte rows: 2-byte vectors
    check_gather<__nv_bfloat16>(128, p, false);
    check_gather<__nv_bfloat16>(64, p, false);
    check_gather<__nv_fp8_e4m3>(128, p, false);
    check_gather<__nv_fp8_e4m3>(7, p, false);  // 7-byte rows: byte copies
  }
}

TEST_CASE("gather: a captured graph replays with indices changed in device memory")
{
  PQKV_REQUIRE_GPU();
  check_gather<__nv_bfloat16>(128, pad::interleaved, true);
  check_gather<__nv_bfloat16>(128, pad::bad, true);
}

TEST_CASE("gather: destination rows and row counts from device memory")
{
  PQKV_REQUIRE_GPU();
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&stream));
  using T = __nv_bfloat16;
  pqkv::gpu::kv_store_shape const shape{.layers = 1, .sequences = 1, .kv_heads = 2, .capacity = 64, .head_dim = 128};
  index_t const tokens = 60, n = 10, slots = 16, d = 128;
  auto f = fill_store<T>(shape, tokens, 21, stream);
  // Row 0 reads its first 6 entries, row 1 its first 3; entry j goes to slot 15 - j; dst -1 skips.
  std::vector<std::int32_t> src(2 * n), dst(2 * n);
  for (int i = 0; i < 2 * n; ++i) {
    src[static_cast<std::size_t>(i)] = (i * 7) % tokens;
    dst[static_cast<std::size_t>(i)] = (i % n == 4) ? -1 : static_cast<std::int32_t>(slots - 1 - i % n);
  }
  std::vector<std::int32_t> const counts{6, 3};
  pqkv::device_buffer<std::int32_t> d_src(src.size()), d_dst(dst.size()), d_counts(2);
  upload(d_src, src);
  upload(d_dst, dst);
  upload(d_counts, counts);
  pqkv::device_buffer<T> k_out(static_cast<std::size_t>(2 * slots * d)), v_out(k_out.size());
  PQKV_CUDA_TRY(cudaMemset(k_out.data(), 0xA5, k_out.size_bytes()));
  PQKV_CUDA_TRY(cudaMemset(v_out.data(), 0xA5, v_out.size_bytes()));
  pqkv::gpu::gather(f.store.ref(), 0, pqkv::make_view(static_cast<std::int32_t const*>(d_src.data()), 1, 2, n),
                    pqkv::make_view(static_cast<std::int32_t const*>(d_dst.data()), 1, 2, n),
                    std::span<std::int32_t const>(d_counts.data(), 2), pqkv::make_view(k_out.data(), 1, 2, slots, d),
                    pqkv::make_view(v_out.data(), 1, 2, slots, d), nullptr, stream);
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  auto const hk = download(k_out);
  std::vector<T> poison(static_cast<std::size_t>(d));
  std::memset(static_cast<void*>(poison.data()), 0xA5, poison.size() * sizeof(T));
  for (index_t g = 0; g < 2; ++g) {
    for (index_t slot = 0; slot < slots; ++slot) {
      T const* want = poison.data();
      for (index_t j = 0; j < counts[static_cast<std::size_t>(g)]; ++j) {
        if (dst[static_cast<std::size_t>(g * n + j)] == slot) {
          want = f.ref_k[0][0].data() + (g * tokens + src[static_cast<std::size_t>(g * n + j)]) * d;
        }
      }
      CHECK(std::memcmp(hk.data() + (g * slots + slot) * d, want, static_cast<std::size_t>(d) * sizeof(T)) == 0);
    }
  }
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

TEST_CASE("gather: appends racing on another stream never expose a half-written row")
{
  PQKV_REQUIRE_GPU();
  using T = float;
  index_t const h = 2, d = 256, capacity = 512, batch = 1;  // 1 KiB rows: a torn copy would show
  pqkv::gpu::kv_store<T> store{{.layers = 1, .sequences = 1, .kv_heads = h, .capacity = capacity, .head_dim = d}};
  // Row t of head g is filled with the value t * 16 + g + 1 (never the poison).
  std::vector<T> src(static_cast<std::size_t>(h * capacity * d));
  for (index_t g = 0; g < h; ++g) {
    for (index_t t = 0; t < capacity; ++t) {
      std::fill_n(src.begin() + (g * capacity + t) * d, d, static_cast<T>(t * 16 + g + 1));
    }
  }
  pqkv::device_buffer<T> d_src(src.size());
  upload(d_src, src);
  cudaStream_t copy = nullptr, compute = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&copy));
  PQKV_CUDA_TRY(cudaStreamCreate(&compute));
  index_t const n = capacity;
  std::vector<std::int32_t> idx(static_cast<std::size_t>(h * n));
  for (index_t i = 0; i < h * n; ++i) { idx[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i % n); }
  pqkv::device_buffer<std::int32_t> d_idx(idx.size()), rejected(1);
  upload(d_idx, idx);
  int const rounds = 24;
  pqkv::device_buffer<T> outs(static_cast<std::size_t>(rounds * h * n * d));
  PQKV_CUDA_TRY(cudaMemset(outs.data(), 0, outs.size_bytes()));  // poison 0.0f
  PQKV_CUDA_TRY(cudaMemset(rejected.data(), 0, sizeof(std::int32_t)));
  // Appends of 32, 1, 32, 1, ... rows on `copy`; a gather of every row per round on `compute`, unordered.
  index_t appended = 0;
  for (int r = 0; r < rounds; ++r) {
    index_t const nt = std::min<index_t>(r % 2 == 0 ? 32 : 1, capacity - appended);
    if (nt > 0) {
      store.append(0, 0, pqkv::make_strided_view<T const, 3>(d_src.data() + appended * d, {h, nt, d}, {capacity * d, d, 1}),
                   pqkv::make_strided_view<T const, 3>(d_src.data() + appended * d, {h, nt, d}, {capacity * d, d, 1}),
                   copy);
      appended += nt;
    }
    T* out = outs.data() + static_cast<std::size_t>(r) * h * n * d;
    pqkv::gpu::gather(store.ref(), 0, pqkv::make_view(static_cast<std::int32_t const*>(d_idx.data()), batch, h, n),
                      pqkv::make_view(out, batch, h, n, d), pqkv::make_view(out, batch, h, n, d), rejected.data(),
                      compute);
  }
  // Ordered after the last append, every row must come through.
  store.wait(compute);
  pqkv::device_buffer<T> last(static_cast<std::size_t>(h * n * d));
  pqkv::gpu::gather(store.ref(), 0, pqkv::make_view(static_cast<std::int32_t const*>(d_idx.data()), batch, h, n),
                    pqkv::make_view(last.data(), batch, h, n, d), pqkv::make_view(last.data(), batch, h, n, d), nullptr,
                    compute);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const host = download(outs);
  int torn = 0, complete = 0, absent = 0;
  for (int r = 0; r < rounds; ++r) {
    for (index_t g = 0; g < h; ++g) {
      for (index_t t = 0; t < n; ++t) {
        T const* row = host.data() + ((static_cast<index_t>(r) * h + g) * n + t) * d;
        auto const want = static_cast<T>(t * 16 + g + 1);
        auto const good = std::count(row, row + d, want), zero = std::count(row, row + d, T{0});
        if (good == d) {
          ++complete;
        } else if (zero == d) {
          ++absent;
        } else {
          ++torn;
        }
      }
    }
  }
  CHECK(torn == 0);
  CHECK(complete > 0);
  MESSAGE("racing gathers: ", complete, " complete rows, ", absent, " not yet committed, ", torn, " torn");
  auto const hl = download(last);
  int bad_last = 0;
  for (index_t g = 0; g < h; ++g) {
    for (index_t t = 0; t < appended; ++t) {
      bad_last += hl[static_cast<std::size_t>((g * n + t) * d)] != static_cast<T>(t * 16 + g + 1);
    }
  }
  CHECK(bad_last == 0);
  PQKV_CUDA_TRY(cudaStreamDestroy(copy));
  PQKV_CUDA_TRY(cudaStreamDestroy(compute));
}

TEST_CASE("kv_store: capacity overflow, bad shapes and layers throw before any copy; truncate rejects old rows")
{
  PQKV_REQUIRE_GPU();
  using T = __half;
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&stream));
  pqkv::gpu::kv_store<T> store{{.layers = 2, .sequences = 1, .kv_heads = 2, .capacity = 8, .head_dim = 16}};
  pqkv::device_buffer<T> src(static_cast<std::size_t>(2 * 9 * 16));
  PQKV_CUDA_TRY(cudaMemset(src.data(), 0x3C, src.size_bytes()));
  auto rows = [&](index_t nt, index_t heads = 2, index_t dim = 16) {
    return pqkv::make_strided_view<T const, 3>(src.data(), {heads, nt, dim}, {nt * dim, dim, 1});
  };
  CHECK_THROWS_AS(store.append(0, 0, rows(9), rows(9), stream), pqkv::error);  // past capacity
  CHECK(store.size(0, 0) == 0);
  store.append(0, 0, rows(6), rows(6), stream);
  CHECK_THROWS_WITH_AS(store.append(0, 0, rows(3), rows(3), stream),
                       doctest::Contains("exceeds capacity=8"), pqkv::error);
  CHECK_THROWS_AS(store.append(2, 0, rows(1), rows(1), stream), pqkv::error);   // layer
  CHECK_THROWS_AS(store.append(0, 1, rows(1), rows(1), stream), pqkv::error);   // sequence
  CHECK_THROWS_AS(store.append(0, 0, rows(1, 3), rows(1, 3), stream), pqkv::error);  // heads
  CHECK_THROWS_AS(store.append(0, 0, rows(1, 2, 8), rows(1, 2, 8), stream), pqkv::error);  // head_dim
  CHECK_THROWS_AS(store.append(0, 0, rows(2), rows(1), stream), pqkv::error);   // K/V token mismatch
  CHECK(store.size(0, 0) == 6);

  // Gathers: indices at or past the committed 6 rows are counted, not read.
  std::vector<std::int32_t> idx{0, 5, 6, 7, 8, -1, 1 << 30, 2};
  pqkv::device_buffer<std::int32_t> d_idx(idx.size()), rejected(1);
  upload(d_idx, idx);
  PQKV_CUDA_TRY(cudaMemsetAsync(rejected.data(), 0, sizeof(std::int32_t), stream));
  pqkv::device_buffer<T> out(static_cast<std::size_t>(2 * 4 * 16));
  auto iv = pqkv::make_view(static_cast<std::int32_t const*>(d_idx.data()), 1, 2, 4);
  auto ov = pqkv::make_view(out.data(), 1, 2, 4, 16);
  pqkv::gpu::gather(store.ref(), 0, iv, ov, ov, rejected.data(), stream);
  std::int32_t rej = 0;
  PQKV_CUDA_TRY(cudaMemcpyAsync(&rej, rejected.data(), sizeof(rej), cudaMemcpyDeviceToHost, stream));
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  CHECK(rej == 4);  // 6, 7, 8, 2^30
  // Layer 1 holds nothing: every non-padding entry is rejected.
  PQKV_CUDA_TRY(cudaMemsetAsync(rejected.data(), 0, sizeof(std::int32_t), stream));
  pqkv::gpu::gather(store.ref(), 1, iv, ov, ov, rejected.data(), stream);
  PQKV_CUDA_TRY(cudaMemcpyAsync(&rej, rejected.data(), sizeof(rej), cudaMemcpyDeviceToHost, stream));
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  CHECK(rej == 7);
  // Truncate to 1 row: entries 5 and 2 are now rejected too.
  store.truncate(0, 0, 1, stream);
  CHECK(store.size(0, 0) == 1);
  PQKV_CUDA_TRY(cudaMemsetAsync(rejected.data(), 0, sizeof(std::int32_t), stream));
  pqkv::gpu::gather(store.ref(), 0, iv, ov, ov, rejected.data(), stream);
  PQKV_CUDA_TRY(cudaMemcpyAsync(&rej, rejected.data(), sizeof(rej), cudaMemcpyDeviceToHost, stream));
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  CHECK(rej == 6);

  // Host-side misuse of the gather.
  CHECK_THROWS_AS(pqkv::gpu::gather(store.ref(), 2, iv, ov, ov, nullptr, stream), pqkv::error);
  auto small = pqkv::make_view(out.data(), 1, 2, 3, 16);
  CHECK_THROWS_WITH_AS(pqkv::gpu::gather(store.ref(), 0, iv, small, small, nullptr, stream),
                       doctest::Contains("k_out.extent(2)=3"), pqkv::error);
  auto wrong_heads = pqkv::make_view(static_cast<std::int32_t const*>(d_idx.data()), 1, 1, 8);
  CHECK_THROWS_AS(pqkv::gpu::gather(store.ref(), 0, wrong_heads, ov, ov, nullptr, stream), pqkv::error);
  auto too_many = pqkv::make_view(static_cast<std::int32_t const*>(d_idx.data()), 2, 2, 2);
  CHECK_THROWS_AS(pqkv::gpu::gather(store.ref(), 0, too_many, ov, ov, nullptr, stream), pqkv::error);
  CHECK_THROWS_AS(pqkv::gpu::gather(pqkv::gpu::kv_store_ref<T>{}, 0, iv, ov, ov, nullptr, stream), pqkv::error);
  CHECK_THROWS_AS(pqkv::gpu::kv_store<T>({.layers = 1, .sequences = 1, .kv_heads = 1, .capacity = 0, .head_dim = 8}),
                  pqkv::error);
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

TEST_CASE("kv_store: records its device and throws when called from another")
{
  PQKV_REQUIRE_GPU();
  using T = __half;
  int device = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  pqkv::gpu::kv_store<T> store{{.layers = 1, .sequences = 1, .kv_heads = 2, .capacity = 8, .head_dim = 16}};
  CHECK(store.device() == device);
  int const other = pqkv::test::other_device();
  if (other < 0) {
    MESSAGE("cross-device part skipped: it needs 2 GPUs");
    return;
  }
  pqkv::device_buffer<T> src(static_cast<std::size_t>(2 * 1 * 16));
  PQKV_CUDA_TRY(cudaMemset(src.data(), 0, src.size_bytes()));
  auto row = pqkv::make_strided_view<T const, 3>(src.data(), {2, 1, 16}, {16, 16, 1});
  {
    pqkv::test::device_scope on_other{other};
    constexpr char const* built = "the object was built on device";
    CHECK_THROWS_WITH_AS(store.append(0, 0, row, row, nullptr), doctest::Contains(built), pqkv::error);
    CHECK_THROWS_WITH_AS(store.truncate(0, 0, 0, nullptr), doctest::Contains(built), pqkv::error);
    CHECK_THROWS_WITH_AS(store.reset(nullptr), doctest::Contains(built), pqkv::error);
    CHECK_THROWS_WITH_AS((void)store.ref(), doctest::Contains(built), pqkv::error);
    CHECK_THROWS_WITH_AS((void)store.committed(), doctest::Contains(built), pqkv::error);
  }
  CHECK(store.size(0, 0) == 0);  // nothing was enqueued
  int now = -1;
  PQKV_CUDA_TRY(cudaGetDevice(&now));
  CHECK(now == device);
}

TEST_CASE("copy_engine_gather: the same rows as the zero-copy gather")
{
  PQKV_REQUIRE_GPU();
  using T = __nv_bfloat16;
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&stream));
  pqkv::gpu::kv_store_shape const shape{.layers = 1, .sequences = 2, .kv_heads = 2, .capacity = 64, .head_dim = 64};
  index_t const tokens = 64, n = 40;
  auto f = fill_store<T>(shape, tokens, 8, stream);
  // Clustered indices (runs of consecutive rows) and padding.
  std::vector<std::int32_t> idx(static_cast<std::size_t>(2 * 2 * n));
  for (std::size_t i = 0; i < idx.size(); ++i) {
    auto const j = static_cast<std::int32_t>(i % n);
    idx[i] = (j % 9 == 8) ? -1 : static_cast<std::int32_t>((j / 4 * 6 + j % 4 + static_cast<std::int32_t>(i / n)) % tokens);
  }
  pqkv::device_buffer<std::int32_t> d_idx(idx.size());
  upload(d_idx, idx);
  auto const count = static_cast<std::size_t>(2 * 2 * n * 64);
  pqkv::device_buffer<T> k1(count), v1(count), k2(count), v2(count);
  for (auto* b : {&k1, &v1, &k2, &v2}) { PQKV_CUDA_TRY(cudaMemset(b->data(), 0x77, b->size_bytes())); }
  pqkv::gpu::gather(f.store.ref(), 0, pqkv::make_view(static_cast<std::int32_t const*>(d_idx.data()), 2, 2, n),
                    pqkv::make_view(k1.data(), 2, 2, n, 64), pqkv::make_view(v1.data(), 2, 2, n, 64), nullptr, stream);
  pqkv::gpu::copy_engine_gather<T> ce;
  ce(f.store, 0, pqkv::make_view(static_cast<std::int32_t const*>(idx.data()), 2, 2, n),
     pqkv::make_view(k2.data(), 2, 2, n, 64), pqkv::make_view(v2.data(), 2, 2, n, 64), stream);
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  CHECK(ce.copies() < idx.size() * 2);  // runs were merged
  auto const a = download(k1), b = download(k2), c = download(v1), e = download(v2);
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
  CHECK(std::memcmp(c.data(), e.data(), c.size() * sizeof(T)) == 0);
  std::vector<std::int32_t> bad = idx;
  bad[3] = static_cast<std::int32_t>(tokens);
  CHECK_THROWS_AS(ce(f.store, 0, pqkv::make_view(static_cast<std::int32_t const*>(bad.data()), 2, 2, n),
                     pqkv::make_view(k2.data(), 2, 2, n, 64), pqkv::make_view(v2.data(), 2, 2, n, 64), stream),
                  pqkv::error);
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}
