// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::rq_trainer against pqkv::cpu::rq_trainer on the same rows:
// without Lloyd iterations (centroids = the init rows) the whole run equals
// the CPU's bit for bit (every stage's centroids, residual norms to double
// rounding), per-head and shared codebooks, splits with a permutation; with
// Lloyd iterations the residual norms agree within 1% stage by stage and do
// not increase; half, bf16 and strided keys; runs and graph replays are
// bit-identical; the report agrees with encoding and rebuilding the rows on
// the CPU; bad inputs throw before any launch.
#include <pqkv/codebook/residual.cuh>
#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/decode/residual_reconstruct.hpp>
#include <pqkv/encode/residual.hpp>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"
#include "common/residual_util.hpp"
#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::download;
using pqkv::test::contains;
using pqkv::test::error_message;
using pqkv::test::noise;
using pqkv::test::reversed_pairs;
using pqkv::test::upload;

pqkv::rq_config make_cfg(index_t dim, int splits, int stages, int bits, int max_iter, pqkv::init_method init)
{
  auto c = pqkv::test::rq_test_config(dim, splits, stages, bits);
  c.max_iter = max_iter;
  c.init = init;
  c.tol = 0;
  c.seed = 77;
  return c;
}

/// Rows [heads, tokens, dim]: a few clusters per head plus noise, so stages
/// have structure to find.
std::vector<float> make_rows(index_t heads, index_t tokens, index_t dim, std::uint64_t seed)
{
  std::vector<float> x(static_cast<std::size_t>(heads * tokens * dim));
  for (index_t h = 0; h < heads; ++h) {
    for (index_t t = 0; t < tokens; ++t) {
      auto const cluster = static_cast<std::uint64_t>((t * 7) % 5);
      for (index_t i = 0; i < dim; ++i) {
        auto const e = static_cast<std::size_t>((h * tokens + t) * dim + i);
        x[e] = 2.f * noise(seed + 1, static_cast<std::uint64_t>(h * 64 + i) * 8 + cluster) + noise(seed, e);
      }
    }
  }
  return x;
}

struct gpu_run {
  std::vector<float> centroids;
  pqkv::rq_train_report report;
};

/// Trains on the GPU from `x` (uploaded as Key, optionally stored [tokens,
/// heads, dim] and seen through strides) into codebooks of cb_heads.
template <class Key = float>
gpu_run train_gpu(pqkv::rq_config const& cfg, std::vector<float> const& x, index_t heads, index_t tokens,
                  index_t cb_heads, bool token_major = false, std::vector<float> const& init = {})
{
  std::vector<Key> xs(x.size());
  for (index_t h = 0; h < heads; ++h) {
    for (index_t t = 0; t < tokens; ++t) {
      for (index_t i = 0; i < cfg.dim; ++i) {
        auto const src = static_cast<std::size_t>((h * tokens + t) * cfg.dim + i);
        auto const dst = token_major ? static_cast<std::size_t>((t * heads + h) * cfg.dim + i) : src;
        xs[dst] = pqkv::from_float<Key>(x[src]);
      }
    }
  }
  auto const dx = upload(xs);
  std::size_t const n_c = static_cast<std::size_t>(cb_heads * cfg.splits * cfg.stages * cfg.ksub() * cfg.dsub());
  auto dc = upload(init.empty() ? std::vector<float>(n_c, 0.f) : init);
  pqkv::gpu::rq_trainer const trainer{cfg, {heads, tokens}};
  pqkv::device_buffer<std::byte> ws(trainer.workspace_bytes());
  pqkv::rq_centroids_view<float> const c{dc.data(), cb_heads, index_t{cfg.splits}, index_t{cfg.stages}, cfg.ksub(),
                                         cfg.dsub()};
  auto const strides = token_major ? ::cuda::std::array<index_t, 3>{cfg.dim, heads * cfg.dim, 1}
                                   : ::cuda::std::array<index_t, 3>{tokens * cfg.dim, cfg.dim, 1};
  auto const keys = pqkv::make_strided_view<Key const, 3>(dx.data(), {heads, tokens, cfg.dim}, strides);
  trainer.train(keys, c, std::span<std::byte>{ws.data(), ws.size()}, nullptr);
  gpu_run out;
  out.report = trainer.report(std::span<std::byte const>{ws.data(), ws.size()}, nullptr);
  out.centroids = download(dc, n_c);
  return out;
}

struct cpu_run {
  pqkv::residual_codebook book;
  pqkv::rq_train_report report;
};

cpu_run train_cpu(pqkv::rq_config const& cfg, std::vector<float> const& x, index_t heads, index_t tokens,
                  index_t cb_heads, std::vector<float> const& init = {})
{
  cpu_run r{pqkv::residual_codebook{cfg, cb_heads}, {}};
  if (!init.empty()) { std::copy(init.begin(), init.end(), r.book.centroids().data_handle()); }
  auto const keys = pqkv::make_view<float const>(x.data(), heads, tokens, cfg.dim);
  r.report = pqkv::cpu::rq_trainer{cfg}.train(keys, r.book.centroids());
  return r;
}

std::vector<float> as_vector(pqkv::residual_codebook const& book)
{
  auto const c = book.centroids();
  return {c.data_handle(), c.data_handle() + pqkv::element_count(c)};
}

}  // namespace

TEST_CASE("gpu rq_trainer: without Lloyd iterations every stage equals the CPU's bit for bit")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 3, tokens = 500;
  for (auto const init : {pqkv::init_method::random_sample, pqkv::init_method::kmeans_plus_plus}) {
    for (index_t cb_heads : {index_t{1}, heads}) {
      CAPTURE(static_cast<int>(init));
      CAPTURE(cb_heads);
      auto cfg = make_cfg(32, 2, 3, 4, 0, init);
      cfg.permutation = reversed_pairs(32);
      auto const x = make_rows(heads, tokens, cfg.dim, 5);
      auto const cpu = train_cpu(cfg, x, heads, tokens, cb_heads);
      auto const gpu = train_gpu(cfg, x, heads, tokens, cb_heads);
      auto const want = as_vector(cpu.book);
      REQUIRE(gpu.centroids.size() == want.size());
      std::size_t diff = 0;
      for (std::size_t i = 0; i < want.size(); ++i) { diff += gpu.centroids[i] != want[i] ? 1 : 0; }
      CHECK(diff == 0);
      CHECK(gpu.report.initial_mse == doctest::Approx(cpu.report.initial_mse).epsilon(1e-12));
      REQUIRE(gpu.report.residual_mse.size() == 3);
      REQUIRE(gpu.report.stages.size() == 3);
      for (std::size_t st = 0; st < 3; ++st) {
        CHECK(gpu.report.residual_mse[st] == doctest::Approx(cpu.report.residual_mse[st]).epsilon(1e-12));
        CHECK(gpu.report.stages[st].iterations == 0);
        CHECK(gpu.report.stages[st].mse == doctest::Approx(cpu.report.stages[st].mse).epsilon(1e-9));
      }
    }
  }
}

TEST_CASE("gpu rq_trainer: with Lloyd iterations the residual norms follow the CPU's within 1%")
{
  PQKV_REQUIRE_GPU();
  struct shape {
    index_t dim;
    int splits, bits;
  };
  for (auto const sh : {shape{64, 1, 6}, shape{64, 2, 8}, shape{128, 4, 5}}) {
    CAPTURE(sh.dim);
    CAPTURE(sh.splits);
    CAPTURE(sh.bits);
    index_t const heads = 2, tokens = 2048;
    auto const cfg = make_cfg(sh.dim, sh.splits, 4, sh.bits, 8, pqkv::init_method::random_sample);
    auto const x = make_rows(heads, tokens, cfg.dim, 9);
    for (index_t cb_heads : {index_t{1}, heads}) {
      CAPTURE(cb_heads);
      auto const cpu = train_cpu(cfg, x, heads, tokens, cb_heads);
      auto const gpu = train_gpu(cfg, x, heads, tokens, cb_heads);
      REQUIRE(gpu.report.residual_mse.size() == 4);
      for (std::size_t st = 0; st < 4; ++st) {
        double const want = cpu.report.residual_mse[st];
        CHECK(std::abs(gpu.report.residual_mse[st] - want) <= 0.01 * want);
        double const prev = st == 0 ? gpu.report.initial_mse : gpu.report.residual_mse[st - 1];
        CHECK(gpu.report.residual_mse[st] <= prev * (1 + 1e-9));
      }
    }
  }
}

TEST_CASE("gpu rq_trainer: the report agrees with encoding and rebuilding on the CPU; runs repeat bit for bit")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 1000;
  auto cfg = make_cfg(64, 2, 3, 5, 6, pqkv::init_method::kmeans_plus_plus);
  cfg.permutation = reversed_pairs(64);
  auto const x = make_rows(heads, tokens, cfg.dim, 13);
  auto const a = train_gpu(cfg, x, heads, tokens, heads);
  auto const b = train_gpu(cfg, x, heads, tokens, heads);
  CHECK(a.centroids == b.centroids);
  CHECK(a.report.residual_mse == b.report.residual_mse);

  pqkv::residual_codebook book{cfg, heads};
  std::copy(a.centroids.begin(), a.centroids.end(), book.centroids().data_handle());
  auto const keys = pqkv::make_view<float const>(x.data(), heads, tokens, cfg.dim);
  pqkv::host_tensor<std::uint8_t, 3> codes(heads, tokens, cfg.codes_per_row());
  pqkv::cpu::rq_encoder{cfg}.encode(keys, std::as_const(book).centroids(), codes.view());
  pqkv::host_tensor<float, 3> xr(heads, tokens, cfg.dim);
  pqkv::cpu::rq_reconstruct(cfg, std::as_const(book).centroids(), codes.const_view(), 0, xr.view());
  double e = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    double const d = static_cast<double>(x[i]) - xr.data()[i];
    e += d * d;
  }
  CHECK(e / static_cast<double>(heads * tokens) == doctest::Approx(a.report.residual_mse.back()).epsilon(1e-4));

  // Provided init: the CPU and the GPU start every stage from the same
  // centroids (the ones just trained); one more Lloyd pass stays within 1%.
  auto more = cfg;
  more.init = pqkv::init_method::provided;
  more.max_iter = 2;
  auto const cpu = train_cpu(more, x, heads, tokens, heads, a.centroids);
  auto const gpu = train_gpu(more, x, heads, tokens, heads, false, a.centroids);
  for (std::size_t st = 0; st < 3; ++st) {
    double const want = cpu.report.residual_mse[st];
    CHECK(std::abs(gpu.report.residual_mse[st] - want) <= 0.01 * want);
  }
}

TEST_CASE("gpu rq_trainer: half, bf16 and strided keys train as their float values")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 700;
  auto const cfg = make_cfg(32, 2, 2, 4, 0, pqkv::init_method::random_sample);
  auto x = make_rows(heads, tokens, cfg.dim, 21);
  auto const want_half = [&] {
    auto r = x;
    for (auto& v : r) { v = pqkv::to_float(pqkv::from_float<__half>(v)); }
    return as_vector(train_cpu(cfg, r, heads, tokens, 1).book);
  }();
  auto const want_bf16 = [&] {
    auto r = x;
    for (auto& v : r) { v = pqkv::to_float(pqkv::from_float<__nv_bfloat16>(v)); }
    return as_vector(train_cpu(cfg, r, heads, tokens, heads).book);
  }();
  CHECK(train_gpu<__half>(cfg, x, heads, tokens, 1, true).centroids == want_half);
  CHECK(train_gpu<__nv_bfloat16>(cfg, x, heads, tokens, heads).centroids == want_bf16);
}

TEST_CASE("gpu rq_trainer: a captured graph trains as the direct call does")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 1024;
  auto const cfg = make_cfg(64, 2, 3, 6, 5, pqkv::init_method::random_sample);
  auto const x = make_rows(heads, tokens, cfg.dim, 17);
  auto const direct = train_gpu(cfg, x, heads, tokens, 1);

  auto const dx = upload(x);
  auto const n_c = direct.centroids.size();
  pqkv::device_buffer<float> dc(n_c);
  pqkv::gpu::rq_trainer const trainer{cfg, {heads, tokens}};
  pqkv::device_buffer<std::byte> ws(trainer.workspace_bytes());
  pqkv::test::owned_stream const stream;
  pqkv::rq_centroids_view<float> const c{dc.data(), 1, index_t{2}, index_t{3}, cfg.ksub(), cfg.dsub()};
  pqkv::test::captured_graph const graph{stream.get(), [&] {
    trainer.train(pqkv::make_view<float const>(dx.data(), heads, tokens, cfg.dim), c,
                  std::span<std::byte>{ws.data(), ws.size()}, stream.get());
  }};
  graph.launch(stream.get());
  graph.launch(stream.get());
  auto const rep = trainer.report(std::span<std::byte const>{ws.data(), ws.size()}, stream.get());
  CHECK(download(dc, n_c) == direct.centroids);
  CHECK(rep.residual_mse == direct.report.residual_mse);
}

TEST_CASE("gpu rq_trainer: bad inputs throw before any launch")
{
  PQKV_REQUIRE_GPU();
  auto cfg = make_cfg(32, 2, 2, 4, 3, pqkv::init_method::random_sample);
  index_t const heads = 2, tokens = 64;
  auto wide = cfg;
  wide.bits = 10;
  CHECK(contains(error_message([&] { pqkv::gpu::rq_trainer(wide, {heads, tokens}); }), "bits=10 > 8"));
  auto few = cfg;
  few.max_train_points = 8;
  CHECK(contains(error_message([&] { pqkv::gpu::rq_trainer(few, {heads, tokens}); }), "max_train_points=8"));
  CHECK(contains(error_message([&] { pqkv::gpu::rq_trainer(cfg, {1 << 16, 1 << 16}); }), "int32 row range"));

  pqkv::gpu::rq_trainer const trainer{cfg, {heads, tokens}};
  auto const x = make_rows(heads, tokens, cfg.dim, 3);
  auto const dx = upload(x);
  pqkv::device_buffer<float> dc(static_cast<std::size_t>(heads * 2 * 2 * 16 * 16));
  pqkv::device_buffer<std::byte> ws(trainer.workspace_bytes() + 256);
  PQKV_CUDA_TRY(cudaMemset(ws.data(), 0, ws.size()));
  std::span<std::byte> const wspan{ws.data(), ws.size()};
  pqkv::rq_centroids_view<float> const c{dc.data(), heads, index_t{2}, index_t{2}, index_t{16}, index_t{16}};
  auto const keys = pqkv::make_view<float const>(dx.data(), heads, tokens, cfg.dim);
  CHECK(contains(error_message([&] { (void)trainer.report(wspan, nullptr); }), "holds no train result"));
  CHECK(contains(error_message([&] {
                   trainer.train(pqkv::make_view<float const>(dx.data(), heads, tokens / 2, 16), c, wspan, nullptr);
                 }),
                 "keys.extent(2)=16"));
  CHECK(contains(error_message([&] {
                   trainer.train(pqkv::make_view<float const>(dx.data(), heads / 2, tokens * 2, cfg.dim), c, wspan,
                                 nullptr);
                 }),
                 "exceeds limits.max_tokens"));
  pqkv::rq_centroids_view<float> const c3{dc.data(), 3, index_t{2}, index_t{2}, index_t{16}, index_t{8}};
  CHECK(contains(error_message([&] { trainer.train(keys, c3, wspan, nullptr); }), "gpu::rq_trainer.train"));
  CHECK(contains(error_message([&] { trainer.train(keys, c, wspan.first(1024), nullptr); }), "workspace.size()=1024"));
  CHECK(contains(error_message([&] { trainer.train(keys, c, wspan.subspan(8), nullptr); }), "aligned"));
  CHECK(contains(error_message([&] {
                   trainer.train(pqkv::make_view<float const>(x.data(), heads, tokens, cfg.dim), c, wspan, nullptr);
                 }),
                 "keys.data_handle()"));
  // Nothing was written: the workspace still holds no result.
  CHECK(contains(error_message([&] { (void)trainer.report(wspan, nullptr); }), "holds no train result"));
}
