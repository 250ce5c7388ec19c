// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::rq_window against its contract: after a prefill and appends of
// any size up to the chunk (directly or replayed from one captured step), the
// length and coded count follow rq_window_shape::coded_count, the key and
// value codes equal the CPU encoder's codes of the coded rows bit for bit
// (uint8 and uint16 codes), and the sink and ring rows are the stored rows;
// appends past capacity write nothing and are counted; a 512-step decode
// (append, then gpu::code_attention over the codes) replayed from one graph
// matches the CPU code attention; bad inputs throw before any launch.
#include <pqkv/attend/code_attention.cuh>
#include <pqkv/attend/code_attention.hpp>
#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/encode/residual.hpp>
#include <pqkv/encode/residual_window.cuh>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"
#include "common/residual_util.hpp"
#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::download;
using pqkv::test::contains;
using pqkv::test::error_message;
using pqkv::test::noise;
using pqkv::test::upload;
using half = __half;

std::vector<float> make_centroids(pqkv::rq_config const& cfg, index_t heads, std::uint64_t seed)
{
  std::vector<float> c(static_cast<std::size_t>(heads * cfg.splits * cfg.stages * cfg.ksub() * cfg.dsub()));
  for (std::size_t i = 0; i < c.size(); ++i) { c[i] = noise(seed, i); }
  return c;
}

std::vector<half> make_rows(index_t heads, index_t tokens, index_t dim, std::uint64_t seed)
{
  std::vector<half> x(static_cast<std::size_t>(heads * tokens * dim));
  for (std::size_t i = 0; i < x.size(); ++i) { x[i] = pqkv::from_float<half>(noise(seed, i)); }
  return x;
}

template <class T>
T read_one(std::span<T const> device_value)
{
  T v{};
  PQKV_CUDA_TRY(cudaMemcpy(&v, device_value.data(), sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

/// A device code view, copied into a host tensor of the same shape.
template <class Code>
pqkv::host_tensor<Code, 3> download_codes(pqkv::view<Code const, 3> v)
{
  pqkv::host_tensor<Code, 3> h(v.extent(0), v.extent(1), v.extent(2));
  PQKV_CUDA_TRY(cudaMemcpy(h.data(), v.data_handle(), h.size() * sizeof(Code), cudaMemcpyDeviceToHost));
  return h;
}

/// A layer's test data and the window under test.
template <class KCode, class VCode>
struct fixture {
  pqkv::rq_window_shape shape;
  pqkv::rq_config kcfg, vcfg;
  index_t tokens;  // rows available
  std::vector<half> hk, hv;
  pqkv::device_buffer<half> dk, dv;
  std::vector<float> hkc, hvc;
  pqkv::device_buffer<float> dkc, dvc;
  pqkv::gpu::rq_window<half, KCode, VCode> window;

  fixture(pqkv::rq_window_shape const& s, pqkv::rq_config const& k, pqkv::rq_config const& v, index_t n)
    : shape{s}, kcfg{k}, vcfg{v}, tokens{n}, hk{make_rows(s.kv_heads, n, s.dim, 1)},
      hv{make_rows(s.kv_heads, n, s.dim, 2)}, dk{upload(hk)}, dv{upload(hv)}, hkc{make_centroids(k, 1, 3)},
      hvc{make_centroids(v, s.kv_heads, 4)}, dkc{upload(hkc)}, dvc{upload(hvc)},
      window{s, k, rq(dkc.data(), k, 1), v, rq(dvc.data(), v, s.kv_heads)}
  {}

  static pqkv::rq_centroids_view<float const> rq(float const* p, pqkv::rq_config const& c, index_t heads)
  {
    return pqkv::rq_centroids_view<float const>{p, heads, index_t{c.splits}, index_t{c.stages}, c.ksub(), c.dsub()};
  }

  /// Rows [first, first + count) of every head of a device array, strided.
  pqkv::kv_view<half const> rows(half const* d, index_t first, index_t count) const
  {
    return pqkv::make_strided_view<half const, 3>(d + first * shape.dim, {shape.kv_heads, count, shape.dim},
                                                  {tokens * shape.dim, shape.dim, 1});
  }

  /// Checks the whole contract for n tokens held.
  void verify(index_t n) const
  {
    CAPTURE(n);
    index_t const e = shape.coded_count(n), h_count = shape.kv_heads, dim = shape.dim;
    REQUIRE(read_one(window.length()) == n);
    REQUIRE(read_one(window.coded()) == e);
    check_codes<KCode>(kcfg, hk, hkc, 1, window.key_codes(), e, "key");
    check_codes<VCode>(vcfg, hv, hvc, h_count, window.value_codes(), e, "value");
    // sink and ring rows
    auto const sk = download_view(window.sink_keys()), sv = download_view(window.sink_values());
    auto const rk = download_view(window.ring_keys()), rv = download_view(window.ring_values());
    std::size_t bad = 0;
    for (index_t h = 0; h < h_count; ++h) {
      for (index_t p = 0; p < n; ++p) {
        if (p >= shape.sink && p < shape.sink + e) { continue; }
        bool const in_sink = p < shape.sink;
        index_t const row = in_sink ? h * shape.sink + p : h * shape.ring() + (p - shape.sink) % shape.ring();
        half const* gk = (in_sink ? sk : rk).data() + row * dim;
        half const* gv = (in_sink ? sv : rv).data() + row * dim;
        bad += std::memcmp(gk, hk.data() + (h * tokens + p) * dim, dim * sizeof(half)) != 0 ? 1 : 0;
        bad += std::memcmp(gv, hv.data() + (h * tokens + p) * dim, dim * sizeof(half)) != 0 ? 1 : 0;
      }
    }
    CHECK(bad == 0);
  }

  template <class Code>
  void check_codes(pqkv::rq_config const& cfg, std::vector<half> const& x, std::vector<float> const& c,
                   index_t cb_heads, pqkv::view<Code const, 3> got_view, index_t e, char const* side) const
  {
    CAPTURE(side);
    if (e == 0) { return; }
    index_t const h_count = shape.kv_heads, dim = shape.dim, nc = cfg.codes_per_row();
    pqkv::host_tensor<float, 3> xs(h_count, e, dim);
    for (index_t h = 0; h < h_count; ++h) {
      for (index_t r = 0; r < e; ++r) {
        for (index_t i = 0; i < dim; ++i) {
          xs.view()(h, r, i) = pqkv::to_float(x[static_cast<std::size_t>((h * tokens + shape.sink + r) * dim + i)]);
        }
      }
    }
    pqkv::host_tensor<Code, 3> want(h_count, e, nc);
    pqkv::cpu::rq_encoder{cfg}.encode(xs.const_view(), rq(c.data(), cfg, cb_heads), want.view());
    std::vector<Code> got(static_cast<std::size_t>(h_count * got_view.extent(1) * nc));
    PQKV_CUDA_TRY(cudaMemcpy(got.data(), got_view.data_handle(), got.size() * sizeof(Code), cudaMemcpyDeviceToHost));
    std::size_t diff = 0;
    for (index_t h = 0; h < h_count; ++h) {
      for (index_t r = 0; r < e; ++r) {
        for (index_t j = 0; j < nc; ++j) {
          diff += got[static_cast<std::size_t>((h * got_view.extent(1) + r) * nc + j)] != want.view()(h, r, j) ? 1 : 0;
        }
      }
    }
    CHECK(diff == 0);
  }

  static std::vector<half> download_view(pqkv::view<half const, 3> v)
  {
    std::vector<half> out(static_cast<std::size_t>(pqkv::element_count(v)));
    if (!out.empty()) {
      PQKV_CUDA_TRY(cudaMemcpy(out.data(), v.data_handle(), out.size() * sizeof(half), cudaMemcpyDeviceToHost));
    }
    return out;
  }
};

pqkv::rq_window_shape make_shape(index_t chunk, index_t capacity)
{
  pqkv::rq_window_shape s;
  s.kv_heads = 2;
  s.dim = 32;
  s.sink = 4;
  s.local = 16;
  s.chunk = chunk;
  s.capacity = capacity;
  return s;
}

}  // namespace

TEST_CASE("gpu rq_window: prefill and appends of any size keep the codes of one encode")
{
  PQKV_REQUIRE_GPU();
  auto const kcfg = pqkv::test::rq_test_config(32, 2, 3, 4);   // uint8, shared codebook
  auto const vcfg = pqkv::test::rq_test_config(32, 1, 2, 10);  // uint16, per-head codebooks
  for (index_t chunk : {1, 3, 8}) {
    CAPTURE(chunk);
    for (index_t prefill : {0, 3, 21, 37}) {
      CAPTURE(prefill);
      fixture<std::uint8_t, std::uint16_t> f{make_shape(chunk, 160), kcfg, vcfg, 150};
      f.window.prefill(f.rows(f.dk.data(), 0, prefill), f.rows(f.dv.data(), 0, prefill), nullptr);
      f.verify(prefill);
      index_t n = prefill, step = 0;
      while (n < f.tokens) {
        index_t const t = std::min<index_t>({1 + step % chunk, f.tokens - n});
        f.window.append(f.rows(f.dk.data(), n, t), f.rows(f.dv.data(), n, t), nullptr);
        n += t;
        ++step;
        if (step % 7 == 0 || n == f.tokens) { f.verify(n); }
      }
      CHECK(read_one(f.window.overflows()) == 0);
    }
  }
}

TEST_CASE("gpu rq_window: one captured step replayed as the sequence grows")
{
  PQKV_REQUIRE_GPU();
  auto const cfg = pqkv::test::rq_test_config(32, 2, 2, 8);
  fixture<std::uint8_t, std::uint8_t> f{make_shape(4, 128), cfg, cfg, 100};
  index_t const heads = f.shape.kv_heads, dim = f.shape.dim;
  pqkv::device_buffer<half> in_k(static_cast<std::size_t>(heads * 2 * dim)), in_v(in_k.size());
  pqkv::test::owned_stream const stream;
  auto const in_view = [&](half const* p, index_t t) { return pqkv::make_view<half const>(p, heads, t, dim); };
  f.window.prefill(f.rows(f.dk.data(), 0, 10), f.rows(f.dv.data(), 0, 10), stream.get());
  for (index_t t : {1, 2}) {
    CAPTURE(t);
    pqkv::test::captured_graph const graph{stream.get(), [&] {
      f.window.append(in_view(in_k.data(), t), in_view(in_v.data(), t), stream.get());
    }};
    index_t n = t == 1 ? 10 : 55;
    index_t const stop = t == 1 ? 55 : 99;
    for (; n < stop; n += t) {
      std::size_t const row = dim * sizeof(half), pitch = static_cast<std::size_t>(f.tokens) * row;
      PQKV_CUDA_TRY(cudaMemcpy2DAsync(in_k.data(), t * row, f.dk.data() + n * dim, pitch, t * row,
                                      static_cast<std::size_t>(heads), cudaMemcpyDeviceToDevice, stream.get()));
      PQKV_CUDA_TRY(cudaMemcpy2DAsync(in_v.data(), t * row, f.dv.data() + n * dim, pitch, t * row,
                                      static_cast<std::size_t>(heads), cudaMemcpyDeviceToDevice, stream.get()));
      graph.launch(stream.get());
    }
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream.get()));
    f.verify(n);
  }
}

TEST_CASE("gpu rq_window: a 512-step decode from one graph: append, then attention read from the codes")
{
  PQKV_REQUIRE_GPU();
  auto const kcfg = pqkv::test::rq_test_config(32, 2, 3, 5), vcfg = pqkv::test::rq_test_config(32, 1, 2, 6);
  auto shape = make_shape(8, 600);
  shape.local = 32;
  index_t const prefill = 40, steps = 512, q_heads = 4, heads = shape.kv_heads, dim = shape.dim;
  fixture<std::uint8_t, std::uint8_t> f{shape, kcfg, vcfg, prefill + steps};
  pqkv::test::owned_stream const stream;
  f.window.prefill(f.rows(f.dk.data(), 0, prefill), f.rows(f.dv.data(), 0, prefill), stream.get());
  pqkv::gpu::code_attention const attention{kcfg, vcfg, q_heads, heads, {shape.code_rows()}};
  pqkv::device_buffer<std::byte> ws(attention.workspace_bytes());
  pqkv::device_buffer<half> in_k(static_cast<std::size_t>(heads * dim)), in_v(in_k.size());
  pqkv::device_buffer<float> q(static_cast<std::size_t>(q_heads * dim)), out(q.size()), lse(q_heads);
  auto const kc = f.rq(f.dkc.data(), kcfg, 1), vc = f.rq(f.dvc.data(), vcfg, heads);
  pqkv::test::captured_graph const graph{stream.get(), [&] {
    f.window.append(pqkv::make_view<half const>(in_k.data(), heads, 1, dim),
                    pqkv::make_view<half const>(in_v.data(), heads, 1, dim), stream.get());
    attention(pqkv::make_strided_view<float const, 2>(q.data(), {q_heads, dim}, {dim, 1}), kc, f.window.key_codes(),
              vc, f.window.value_codes(), f.window.coded(), pqkv::make_view(out.data(), q_heads, dim),
              std::span<float>{lse.data(), lse.size()}, std::span<std::byte>{ws.data(), ws.size()}, stream.get());
  }};
  std::vector<float> hq(q.size());
  std::size_t const row = dim * sizeof(half), pitch = static_cast<std::size_t>(f.tokens) * row;
  for (index_t s = 0; s < steps; ++s) {
    index_t const n = prefill + s;
    for (std::size_t i = 0; i < hq.size(); ++i) { hq[i] = noise(100 + static_cast<std::uint64_t>(s), i); }
    PQKV_CUDA_TRY(cudaMemcpyAsync(q.data(), hq.data(), q.size_bytes(), cudaMemcpyHostToDevice, stream.get()));
    PQKV_CUDA_TRY(cudaMemcpy2DAsync(in_k.data(), row, f.dk.data() + n * dim, pitch, row, static_cast<std::size_t>(heads),
                                    cudaMemcpyDeviceToDevice, stream.get()));
    PQKV_CUDA_TRY(cudaMemcpy2DAsync(in_v.data(), row, f.dv.data() + n * dim, pitch, row, static_cast<std::size_t>(heads),
                                    cudaMemcpyDeviceToDevice, stream.get()));
    graph.launch(stream.get());
    if (s != 0 && s != 100 && s != 255 && s != steps - 1) { continue; }
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream.get()));
    CAPTURE(s);
    index_t const coded = shape.coded_count(n + 1);
    auto const kcodes = download_codes(f.window.key_codes()), vcodes = download_codes(f.window.value_codes());
    std::vector<float> want(q.size()), want_lse(static_cast<std::size_t>(q_heads));
    pqkv::cpu::code_attention(pqkv::make_strided_view<float const, 2>(hq.data(), {q_heads, dim}, {dim, 1}), kcfg,
                              f.rq(f.hkc.data(), kcfg, 1), kcodes.const_view(), vcfg, f.rq(f.hvc.data(), vcfg, heads),
                              vcodes.const_view(), coded, pqkv::make_view(want.data(), q_heads, dim), 0.f, want_lse);
    auto const got = download(out, out.size()), got_lse = download(lse, lse.size());
    for (index_t h = 0; h < q_heads; ++h) {
      double d2 = 0, w2 = 0;
      for (index_t i = 0; i < dim; ++i) {
        auto const at = static_cast<std::size_t>(h * dim + i);
        d2 += (static_cast<double>(got[at]) - want[at]) * (static_cast<double>(got[at]) - want[at]);
        w2 += static_cast<double>(want[at]) * want[at];
      }
      CHECK(std::sqrt(d2) <= 1e-4 * std::sqrt(w2));
      auto const hl = static_cast<std::size_t>(h);
      if (std::isinf(want_lse[hl])) {  // no coded tokens yet: out = 0, lse = -inf
        CHECK(got_lse[hl] == want_lse[hl]);
      } else {
        CHECK(std::abs(got_lse[hl] - want_lse[hl]) <= 1e-4 * std::max(1.f, std::abs(want_lse[hl])));
      }
    }
  }
  f.verify(prefill + steps);
}

TEST_CASE("gpu rq_window: appends past capacity write nothing and are counted")
{
  PQKV_REQUIRE_GPU();
  auto const cfg = pqkv::test::rq_test_config(32, 1, 2, 6);
  fixture<std::uint8_t, std::uint8_t> f{make_shape(4, 28), cfg, cfg, 40};
  f.window.prefill(f.rows(f.dk.data(), 0, 26), f.rows(f.dv.data(), 0, 26), nullptr);
  f.window.append(f.rows(f.dk.data(), 26, 2), f.rows(f.dv.data(), 26, 2), nullptr);
  f.verify(28);
  f.window.append(f.rows(f.dk.data(), 28, 1), f.rows(f.dv.data(), 28, 1), nullptr);
  f.window.append(f.rows(f.dk.data(), 28, 3), f.rows(f.dv.data(), 28, 3), nullptr);
  CHECK(read_one(f.window.overflows()) == 2);
  f.verify(28);
  f.window.reset(nullptr);
  CHECK(read_one(f.window.length()) == 0);
  CHECK(read_one(f.window.overflows()) == 0);
  f.window.prefill(f.rows(f.dk.data(), 0, 28), f.rows(f.dv.data(), 0, 28), nullptr);
  f.verify(28);
}

TEST_CASE("gpu rq_window: bad inputs throw before any launch")
{
  PQKV_REQUIRE_GPU();
  auto const cfg = pqkv::test::rq_test_config(32, 2, 2, 4);
  auto wide = pqkv::test::rq_test_config(32, 2, 2, 10);
  fixture<std::uint8_t, std::uint8_t> f{make_shape(4, 64), cfg, cfg, 40};
  auto const kc = f.rq(f.dkc.data(), cfg, 1);
  using window8 = pqkv::gpu::rq_window<half, std::uint8_t, std::uint8_t>;
  auto bad_shape = make_shape(4, 16);
  CHECK(contains(error_message([&] { window8(bad_shape, cfg, kc, cfg, kc); }), "sink + local=20 exceeds capacity=16"));
  bad_shape = make_shape(0, 64);
  CHECK(contains(error_message([&] { window8(bad_shape, cfg, kc, cfg, kc); }), "chunk=0"));
  CHECK(contains(error_message([&] { window8(make_shape(4, 64), wide, kc, cfg, kc); }), "too narrow"));
  auto other_dim = pqkv::test::rq_test_config(64, 2, 2, 4);
  CHECK(contains(error_message([&] { window8(make_shape(4, 64), cfg, kc, other_dim, kc); }), "value_config.dim=64"));
  pqkv::rq_centroids_view<float const> const three{f.dkc.data(), 3, 2, 2, 16, 16};
  CHECK(contains(error_message([&] { window8(make_shape(4, 64), cfg, three, cfg, kc); }), "gpu::rq_window"));
  pqkv::rq_centroids_view<float const> const host{f.hkc.data(), 1, 2, 2, 16, 16};
  CHECK(contains(error_message([&] { window8(make_shape(4, 64), cfg, host, cfg, kc); }), "key"));

  auto const k = f.rows(f.dk.data(), 0, 5), v = f.rows(f.dv.data(), 0, 5);
  CHECK(contains(error_message([&] { f.window.append(k, v, nullptr); }), "keys_new.extent(1)=5 is outside [1, chunk=4]"));
  CHECK(contains(error_message([&] { f.window.append(f.rows(f.dk.data(), 0, 0), f.rows(f.dv.data(), 0, 0), nullptr); }),
                 "keys_new.extent(1)=0"));
  CHECK(contains(error_message([&] { f.window.append(f.rows(f.dk.data(), 0, 2), v, nullptr); }), "values extents"));
  auto const one_head = pqkv::make_view<half const>(f.dk.data(), 1, 2, 32);
  CHECK(contains(error_message([&] { f.window.append(one_head, one_head, nullptr); }), "keys extents (1, 2, 32)"));
  auto const host_rows = pqkv::make_view<half const>(f.hk.data(), 2, 2, 32);
  CHECK(contains(error_message([&] { f.window.append(host_rows, host_rows, nullptr); }), "keys.data_handle()"));
  fixture<std::uint8_t, std::uint8_t> big{make_shape(4, 64), cfg, cfg, 70};
  CHECK(contains(error_message([&] {
                   big.window.prefill(big.rows(big.dk.data(), 0, 70), big.rows(big.dv.data(), 0, 70), nullptr);
                 }),
                 "keys.extent(1)=70 exceeds capacity=64"));
  // Nothing ran: the windows are still empty.
  CHECK(read_one(f.window.length()) == 0);
  CHECK(read_one(big.window.length()) == 0);
}
