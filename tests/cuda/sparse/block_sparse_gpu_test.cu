// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::block_sparse_attention and pqkv::gpu::tau_calibrator against the
// CPU reference (sparse/block_sparse_attention.hpp, sparse/calibrate.hpp) on
// the same inputs and the same masks: outputs within 1e-5 of max(1, |ref|) on
// float inputs and 1e-3 on bf16 / half inputs (the CPU run on the same
// rounded values); the dense mode equals a tau = 0 mask bit for bit; graph
// capture and replay; calibrated taus equal the CPU's (ties at theta, if
// any, counted and allowed); bad input throws before any launch.
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/sparse/block_sparse_attention.cuh>
#include <pqkv/sparse/block_sparse_attention.hpp>
#include <pqkv/sparse/calibrate.cuh>
#include <pqkv/sparse/calibrate.hpp>
#include <pqkv/sparse/sale_mask.cuh>
#include <pqkv/sparse/sale_mask.hpp>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"
#include "common/test_util.hpp"
#include "cpu/sparse/sparse_test_util.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::convert;
using pqkv::test::download;
using pqkv::test::error_message;
using pqkv::test::upload;

constexpr float inf = std::numeric_limits<float>::infinity();


template <class T>
pqkv::kv_view<T const> device_kv(pqkv::device_buffer<T> const& d, index_t h, index_t t, index_t c)
{
  return pqkv::kv_view<T const>{pqkv::make_view(static_cast<T const*>(d.data()), h, t, c)};
}

pqkv::sparse_config blocks(index_t bq, index_t bk, index_t sink, index_t local)
{
  pqkv::sparse_config cfg;
  cfg.block_q = bq;
  cfg.block_k = bk;
  cfg.sink = sink;
  cfg.local = local;
  return cfg;
}

/// Per-head taus base, 2 base, 3 base, base, ...
std::vector<float> taus(index_t heads, float base)
{
  std::vector<float> t(static_cast<std::size_t>(heads));
  for (index_t h = 0; h < heads; ++h) { t[static_cast<std::size_t>(h)] = base * static_cast<float>(1 + h % 3); }
  return t;
}

/// Largest |gpu - cpu| / max(1, |cpu|) over two [heads, tokens, dv] outputs.
double worst_rel(std::vector<float> const& gpu, pqkv::host_tensor<float, 3> const& cpu)
{
  double worst = 0;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    double const c = cpu.data()[i];
    double const d = std::abs(static_cast<double>(gpu[i]) - c) / std::max(1.0, std::abs(c));
    worst = std::isnan(d) ? inf : std::max(worst, d);
  }
  return worst;
}

/// One comparison: the CPU mask of taus on b (inputs converted to T / Ve),
/// the CPU attention, and the GPU attention on the same mask. With
/// `nhd_q`, the GPU reads q from a [tokens, heads, dim] buffer (strided view).
/// Returns the worst relative difference; checks it against tol.
template <class T, class Ve>
double check_attention(pqkv::test::batch_data const& b, pqkv::sparse_config const& cfg, std::vector<float> const& tau,
                       double tol, char const* name, bool nhd_q = false)
{
  INFO("case ", std::string{name});
  auto const qh = convert<T>(b.q);
  auto const kh = convert<T>(b.k);
  auto const vh = convert<Ve>(b.v);
  index_t const qheads = qh.extent(0), kvheads = kh.extent(0), tokens = qh.extent(1), dim = qh.extent(2);
  index_t const dv = vh.extent(2);
  auto const batch = static_cast<index_t>(b.cu.size()) - 1;
  pqkv::cpu::sale_estimator const est{qh.const_view(), kh.const_view(), b.cu, cfg};
  auto const m = est.shape();
  pqkv::host_tensor<std::uint32_t, 4> bits(m.batch, m.q_heads, m.q_blocks, m.words);
  std::vector<double> density(static_cast<std::size_t>(qheads));
  pqkv::cpu::build_mask(est, std::span<float const>{tau}, bits.view(), std::span<double>{density});
  pqkv::host_tensor<float, 3> ref(qheads, tokens, dv);
  pqkv::cpu::block_sparse_attention(qh.const_view(), kh.const_view(), vh.const_view(), b.cu, cfg, bits.const_view(),
                                    ref.view());

  pqkv::gpu::sale_dims const dims{batch, tokens, qheads, kvheads, dim, m.max_len};
  pqkv::gpu::block_sparse_attention<T, Ve> const op{dims, cfg, dv};
  REQUIRE(op.shape() == m);
  std::vector<T> qstore = qh.storage();
  if (nhd_q) {  // [tokens, heads, dim]
    for (index_t h = 0; h < qheads; ++h) {
      for (index_t t = 0; t < tokens; ++t) {
        for (index_t c = 0; c < dim; ++c) {
          qstore[static_cast<std::size_t>((t * qheads + h) * dim + c)] = qh.view()(h, t, c);
        }
      }
    }
  }
  auto const dq = upload(qstore);
  auto const dk = upload(kh.storage());
  auto const dvv = upload(vh.storage());
  auto const dcu = upload(b.cu);
  auto const dbits = upload(bits.storage());
  pqkv::device_buffer<float> dout(std::max<std::size_t>(ref.size(), 1));
  PQKV_CUDA_TRY(cudaMemset(dout.data(), 0xFF, dout.size_bytes()));  // NaN: every row must be written
  auto const qv = nhd_q ? pqkv::make_strided_view<T const, 3>(dq.data(), {qheads, tokens, dim},
                                                              {dim, qheads * dim, 1})
                        : device_kv(dq, qheads, tokens, dim);
  std::span<std::int32_t const> const cu{dcu.data(), b.cu.size()};
  op(qv, device_kv(dk, kvheads, tokens, dim), device_kv(dvv, kvheads, tokens, dv), cu,
     pqkv::make_view(static_cast<std::uint32_t const*>(dbits.data()), m.batch, m.q_heads, m.q_blocks, m.words),
     pqkv::make_view(dout.data(), qheads, tokens, dv), nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const out = download(dout, ref.size());
  double const worst = worst_rel(out, ref);
  CHECK(worst <= tol);

  // A mask with every causal bit set (tau = 0) is the dense mode, bit for bit.
  bool const all_dense = std::all_of(tau.begin(), tau.end(), [](float t) { return t == 0.f; });
  if (all_dense) {
    pqkv::device_buffer<float> ddense(std::max<std::size_t>(ref.size(), 1));
    op.dense(qv, device_kv(dk, kvheads, tokens, dim), device_kv(dvv, kvheads, tokens, dv), cu,
             pqkv::make_view(ddense.data(), qheads, tokens, dv), nullptr);
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
    auto const dense = download(ddense, ref.size());
    CHECK(std::memcmp(dense.data(), out.data(), out.size() * sizeof(float)) == 0);
  }
  double mean_density = 0;
  for (double d : density) { mean_density += d / static_cast<double>(density.size()); }
  MESSAGE(std::string{name}, ": worst |gpu - cpu| / max(1, |cpu|) = ", worst, ", mean density ", mean_density);
  return worst;
}

/// The three tau settings of every attention comparison: dense, per-head SALE
/// thresholds, and a huge tau (forced blocks only).
template <class T, class Ve>
void check_three(pqkv::test::batch_data const& b, pqkv::sparse_config const& cfg, double tol, std::string const& name,
                 bool nhd_q = false)
{
  index_t const heads = b.q.extent(0);
  check_attention<T, Ve>(b, cfg, std::vector<float>(static_cast<std::size_t>(heads), 0.f), tol,
                         (name + ", tau 0").c_str(), nhd_q);
  check_attention<T, Ve>(b, cfg, taus(heads, 0.004f), tol, (name + ", tau 0.004..0.012").c_str(), nhd_q);
  check_attention<T, Ve>(b, cfg, std::vector<float>(static_cast<std::size_t>(heads), inf), tol,
                         (name + ", tau inf").c_str(), nhd_q);
}

}  // namespace

TEST_CASE("gpu::block_sparse_attention equals the CPU reference: float, ragged, GQA 4:1 and 8:1, d 64 and 128")
{
  PQKV_REQUIRE_GPU();
  SUBCASE("d=64, GQA 4:1, an empty sequence, lengths not multiples of a block, Bq 32 x Bk 16")
  {
    auto const b = pqkv::test::make_batch(8, 2, 64, {0, 100, 100, 237}, 31);
    check_three<float, float>(b, blocks(32, 16, 16, 32), 1e-5, "f32 d64 4:1");
  }
  SUBCASE("d=128, GQA 8:1, Bq 128 (four 32-row passes) x Bk 48 (a block over two key chunks)")
  {
    auto const b = pqkv::test::make_batch(8, 1, 128, {0, 45, 300}, 32);
    check_three<float, float>(b, blocks(128, 48, 16, 96), 1e-5, "f32 d128 8:1");
  }
  SUBCASE("d=64, GQA 4:1, dv 96, q in NHD layout, Bq 16 x Bk 32")
  {
    auto b = pqkv::test::make_batch(4, 1, 64, {0, 77, 190}, 33);
    b.v = pqkv::test::noise_tensor(1, 190, 96, 34);
    check_three<float, float>(b, blocks(16, 32, 0, 32), 1e-5, "f32 d64 dv96 NHD", true);
  }
  SUBCASE("d=256, one sequence, the default 64 x 32 blocks")
  {
    auto const b = pqkv::test::make_batch(2, 1, 256, {0, 333}, 35);
    check_three<float, float>(b, pqkv::sparse_config{}, 1e-5, "f32 d256 2:1");
  }
}

TEST_CASE("gpu::block_sparse_attention equals the CPU reference on the same bf16 / half inputs")
{
  PQKV_REQUIRE_GPU();
  SUBCASE("bf16, d=128, GQA 8:1, ragged")
  {
    auto const b = pqkv::test::make_batch(8, 1, 128, {0, 70, 70, 261}, 41);
    check_three<__nv_bfloat16, __nv_bfloat16>(b, blocks(64, 32, 32, 64), 1e-3, "bf16 d128 8:1");
  }
  SUBCASE("bf16, d=64, GQA 4:1")
  {
    auto const b = pqkv::test::make_batch(8, 2, 64, {0, 129, 200}, 42);
    check_three<__nv_bfloat16, __nv_bfloat16>(b, blocks(32, 16, 16, 32), 1e-3, "bf16 d64 4:1");
  }
  SUBCASE("half, d=64, GQA 4:1")
  {
    auto const b = pqkv::test::make_batch(4, 1, 64, {0, 50, 181}, 43);
    check_three<__half, __half>(b, blocks(16, 16, 16, 16), 1e-3, "f16 d64 4:1");
  }
}

TEST_CASE("gpu::block_sparse_attention: a GPU tau = 0 mask equals the dense mode; a row with no block is 0")
{
  PQKV_REQUIRE_GPU();
  auto const b = pqkv::test::make_batch(8, 2, 64, {0, 90, 211}, 51);
  pqkv::sparse_config const cfg = blocks(32, 16, 16, 32);
  index_t const qh = 8, kvh = 2, tokens = 211, dim = 64;
  std::vector<std::int32_t> const& cu = b.cu;
  pqkv::gpu::sale_dims const dims{2, tokens, qh, kvh, dim, 121};
  pqkv::gpu::sale_mask<float> const mask{dims, cfg};
  pqkv::gpu::block_sparse_attention<float> const op{dims, cfg};
  auto const m = op.shape();
  REQUIRE(m == mask.shape());
  auto const dq = upload(b.q.storage());
  auto const dk = upload(b.k.storage());
  auto const dv = upload(b.v.storage());
  auto const dcu = upload(cu);
  std::span<std::int32_t const> const cus{dcu.data(), cu.size()};
  pqkv::device_buffer<float> dtau(qh);
  std::vector<float> const zero(qh, 0.f);
  mask.load_tau(zero, std::span<float>{dtau.data(), zero.size()}, nullptr);
  pqkv::device_buffer<std::uint32_t> dbits(static_cast<std::size_t>(pqkv::bitmask_size(m)));
  pqkv::device_buffer<std::byte> ws(mask.workspace_bytes());
  auto const bits = pqkv::make_view(dbits.data(), m.batch, m.q_heads, m.q_blocks, m.words);
  mask(device_kv(dq, qh, tokens, dim), device_kv(dk, kvh, tokens, dim), cus,
       std::span<float const>{dtau.data(), zero.size()}, bits, {}, std::span<std::byte>{ws.data(), ws.size()},
       nullptr);
  std::size_t const n = static_cast<std::size_t>(qh * tokens * dim);
  pqkv::device_buffer<float> d_masked(n), d_dense(n);
  op(device_kv(dq, qh, tokens, dim), device_kv(dk, kvh, tokens, dim), device_kv(dv, kvh, tokens, dim), cus,
     pqkv::as_const(bits), pqkv::make_view(d_masked.data(), qh, tokens, dim), nullptr);
  op.dense(device_kv(dq, qh, tokens, dim), device_kv(dk, kvh, tokens, dim), device_kv(dv, kvh, tokens, dim), cus,
           pqkv::make_view(d_dense.data(), qh, tokens, dim), nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const masked = download(d_masked, n);
  auto const dense = download(d_dense, n);
  CHECK(std::memcmp(masked.data(), dense.data(), n * sizeof(float)) == 0);

  // An all-zero mask: every row attends nothing and is 0.
  PQKV_CUDA_TRY(cudaMemset(dbits.data(), 0, dbits.size_bytes()));
  op(device_kv(dq, qh, tokens, dim), device_kv(dk, kvh, tokens, dim), device_kv(dv, kvh, tokens, dim), cus,
     pqkv::as_const(bits), pqkv::make_view(d_masked.data(), qh, tokens, dim), nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const none = download(d_masked, n);
  CHECK(std::all_of(none.begin(), none.end(), [](float x) { return x == 0.f; }));
}

TEST_CASE("gpu::block_sparse_attention: CUDA graph capture and replay")
{
  PQKV_REQUIRE_GPU();
  auto const b = pqkv::test::make_batch(8, 2, 128, {0, 150, 150, 260}, 61);
  auto const b2 = pqkv::test::make_batch(8, 2, 128, {0, 150, 150, 260}, 62);  // same shape, new values
  pqkv::sparse_config const cfg = blocks(64, 32, 32, 64);
  index_t const qh = 8, kvh = 2, tokens = 260, dim = 128;
  auto const h_q = convert<__nv_bfloat16>(b.q), h_k = convert<__nv_bfloat16>(b.k), h_v = convert<__nv_bfloat16>(b.v);
  auto const h_q2 = convert<__nv_bfloat16>(b2.q);
  pqkv::cpu::sale_estimator const est{h_q.const_view(), h_k.const_view(), b.cu, cfg};
  auto const m = est.shape();
  pqkv::host_tensor<std::uint32_t, 4> bits(m.batch, m.q_heads, m.q_blocks, m.words);
  auto const t = taus(qh, 0.004f);
  pqkv::cpu::build_mask(est, std::span<float const>{t}, bits.view());
  pqkv::gpu::sale_dims const dims{3, tokens, qh, kvh, dim, m.max_len};
  pqkv::gpu::block_sparse_attention<__nv_bfloat16> const op{dims, cfg};
  auto const dq = upload(h_q.storage());
  auto const dk = upload(h_k.storage());
  auto const dv = upload(h_v.storage());
  auto const dcu = upload(b.cu);
  auto const dbits = upload(bits.storage());
  std::size_t const n = static_cast<std::size_t>(qh * tokens * dim);
  pqkv::device_buffer<float> d_direct(n), d_graph(n);
  auto call = [&](float* out, cudaStream_t s) {
    op(device_kv(dq, qh, tokens, dim), device_kv(dk, kvh, tokens, dim), device_kv(dv, kvh, tokens, dim),
       std::span<std::int32_t const>{dcu.data(), b.cu.size()},
       pqkv::make_view(static_cast<std::uint32_t const*>(dbits.data()), m.batch, m.q_heads, m.q_blocks, m.words),
       pqkv::make_view(out, qh, tokens, dim), s);
  };
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  call(d_direct.data(), stream);
  PQKV_CUDA_TRY(cudaMemsetAsync(d_graph.data(), 0xFF, d_graph.size_bytes(), stream));
  {
    pqkv::test::captured_graph const graph{stream, [&] { call(d_graph.data(), stream); }};
    graph.launch(stream);
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    CHECK(download(d_graph, n) == download(d_direct, n));
    // New q values in the same buffer: the replay reads them (nothing baked in).
    PQKV_CUDA_TRY(cudaMemcpy(dq.data(), h_q2.data(), n * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
    graph.launch(stream);
    call(d_direct.data(), stream);
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    auto const replay = download(d_graph, n);
    CHECK(replay == download(d_direct, n));
    pqkv::host_tensor<float, 3> ref(qh, tokens, dim);
    pqkv::cpu::block_sparse_attention(h_q2.const_view(), h_k.const_view(), h_v.const_view(), b.cu, cfg,
                                      bits.const_view(), ref.view());
    CHECK(worst_rel(replay, ref) <= 1e-3);
  }
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

namespace {

/// GPU calibration vs cpu::calibrate_tau on b (converted to T) for several
/// thetas chosen between the errors of the halving ladder (and 0, and 1e9):
/// taus equal unless a ladder error lies within 2% of theta (a tie: the GPU
/// accumulates in float, and at the smallest taus an error is a sum of
/// differences of ~1e-4 per element, where float rounding (~1e-6) is about
/// 1%; counted and reported), errors within 1% (1e-5 absolute), density equal.
template <class T>
void check_calibration(pqkv::test::batch_data const& b, pqkv::sparse_config const& cfg,
                       pqkv::calibration_options const& opt, char const* name)
{
  INFO("case ", std::string{name});
  auto const qh = convert<T>(b.q);
  auto const kh = convert<T>(b.k);
  auto const vh = convert<T>(b.v);
  index_t const heads = qh.extent(0), kvheads = kh.extent(0), tokens = qh.extent(1), dim = qh.extent(2);
  auto const batch = static_cast<index_t>(b.cu.size()) - 1;
  pqkv::cpu::sale_estimator const est{qh.const_view(), kh.const_view(), b.cu, cfg};
  auto const m = est.shape();
  auto const hs = static_cast<std::size_t>(heads);

  // The CPU ladder: errors of every tau the search may visit.
  pqkv::host_tensor<float, 3> ref(heads, tokens, dim), out(heads, tokens, dim);
  pqkv::host_tensor<std::uint32_t, 4> bits(m.batch, m.q_heads, m.q_blocks, m.words);
  std::vector<float> const zero(hs, 0.f);
  pqkv::cpu::build_mask(est, std::span<float const>{zero}, bits.view());
  pqkv::cpu::block_sparse_attention(qh.const_view(), kh.const_view(), vh.const_view(), b.cu, cfg, bits.const_view(),
                                    ref.view());
  std::vector<double> ladder;  // every error of every head
  for (float tau = opt.tau_start; tau >= opt.tau_floor; tau /= 2.f) {
    std::vector<float> const t(hs, tau);
    pqkv::cpu::build_mask(est, std::span<float const>{t}, bits.view());
    pqkv::cpu::block_sparse_attention(qh.const_view(), kh.const_view(), vh.const_view(), b.cu, cfg,
                                      bits.const_view(), out.view());
    std::vector<double> e(hs);
    pqkv::cpu::mean_row_l1(out.const_view(), ref.const_view(), e);
    ladder.insert(ladder.end(), e.begin(), e.end());
  }
  std::sort(ladder.begin(), ladder.end());
  ladder.erase(std::unique(ladder.begin(), ladder.end()), ladder.end());
  std::vector<double> thetas{1e9, 0.0};
  std::vector<double> mids;
  for (std::size_t i = 0; i + 1 < ladder.size(); ++i) {
    if (ladder[i] > 0 && ladder[i + 1] > ladder[i] * 1.1) { mids.push_back(std::sqrt(ladder[i] * ladder[i + 1])); }
  }
  std::size_t const stride = std::max<std::size_t>(1, mids.size() / 5);
  for (std::size_t i = 0; i < mids.size(); i += stride) { thetas.push_back(mids[i]); }
  REQUIRE(thetas.size() >= 4);  // the data must give the search something to decide

  pqkv::gpu::sale_dims const dims{batch, tokens, heads, kvheads, dim, m.max_len};
  pqkv::gpu::tau_calibrator<T> const cal{dims, cfg};
  auto const dq = upload(qh.storage());
  auto const dk = upload(kh.storage());
  auto const dv = upload(vh.storage());
  auto const dcu = upload(b.cu);
  pqkv::device_buffer<std::byte> ws(cal.workspace_bytes());
  index_t ties = 0, steps = 0;
  double worst_err = 0;
  for (double theta : thetas) {
    CAPTURE(theta);
    auto const want = pqkv::cpu::calibrate_tau(est, qh.const_view(), kh.const_view(), vh.const_view(), theta, opt);
    auto const got = cal(device_kv(dq, heads, tokens, dim), device_kv(dk, kvheads, tokens, dim),
                         device_kv(dv, kvheads, tokens, dim), std::span<std::int32_t const>{dcu.data(), b.cu.size()},
                         theta, opt, std::span<std::byte>{ws.data(), ws.size()}, nullptr);
    REQUIRE(got.tau.size() == hs);
    REQUIRE(got.error.size() == hs);
    REQUIRE(got.density.size() == hs);
    for (std::size_t h = 0; h < hs; ++h) {
      CAPTURE(h);
      bool const tie = std::any_of(ladder.begin(), ladder.end(), [&](double e) {
        return std::abs(e - theta) <= 0.02 * theta;
      });
      if (got.tau[h] != want.tau[h] && tie) {
        ++ties;
        continue;
      }
      CHECK(got.tau[h] == want.tau[h]);
      CHECK(got.error[h] == doctest::Approx(want.error[h]).epsilon(1e-2).scale(1e-3));
      worst_err = std::max(worst_err, std::abs(got.error[h] - want.error[h]) / std::max(want.error[h], 1e-12));
      CHECK(got.error[h] <= theta);
      CHECK(got.density[h] == doctest::Approx(want.density[h]).epsilon(1e-12));
      steps += want.tau[h] == opt.tau_start ? 0 : 1;
    }
  }
  CHECK(steps > 0);  // some head searched below tau_start
  MESSAGE(std::string{name}, ": thetas ", thetas.size(), ", head decisions below tau_start ", steps,
          ", ties at theta ", ties, ", worst relative error difference ", worst_err);
}

}  // namespace

TEST_CASE("gpu::tau_calibrator returns the CPU's per-head taus")
{
  PQKV_REQUIRE_GPU();
  SUBCASE("float, d=64, GQA 2:1, ragged, tau from 0.05 down to 1e-3")
  {
    auto const b = pqkv::test::make_batch(2, 1, 64, {0, 80, 144}, 8);
    check_calibration<float>(b, blocks(16, 16, 16, 16), {.tau_start = 0.05f, .tau_floor = 1e-3f}, "f32 small");
  }
  SUBCASE("float, d=64, GQA 4:1, SALE's defaults (0.008, 1e-4)")
  {
    auto const b = pqkv::test::make_batch(8, 2, 64, {0, 130, 130, 300}, 71);
    check_calibration<float>(b, blocks(32, 16, 16, 32), {}, "f32 defaults");
  }
  SUBCASE("bf16, d=128, GQA 8:1")
  {
    auto const b = pqkv::test::make_batch(8, 1, 128, {0, 96, 250}, 72);
    check_calibration<__nv_bfloat16>(b, blocks(32, 32, 32, 32), {.tau_start = 0.05f, .tau_floor = 1e-3f},
                                     "bf16 8:1");
  }
}

TEST_CASE("gpu::block_sparse_attention and gpu::tau_calibrator: bad input throws naming the argument")
{
  PQKV_REQUIRE_GPU();
  auto const b = pqkv::test::make_batch(4, 1, 64, {0, 64, 100}, 81);
  pqkv::sparse_config const cfg = blocks(32, 16, 16, 32);
  index_t const qh = 4, kvh = 1, tokens = 100, dim = 64;
  pqkv::gpu::sale_dims const dims{2, tokens, qh, kvh, dim, 64};
  CHECK(error_message([&] {
          pqkv::gpu::sale_dims d = dims;
          d.dim = 96;
          pqkv::gpu::block_sparse_attention<float> const op{d, cfg};
        }).find("head_dim=96") != std::string::npos);
  CHECK(error_message([&] { pqkv::gpu::block_sparse_attention<float> const op{dims, cfg, 48}; }).find("dv=48") !=
        std::string::npos);
  CHECK(error_message([&] {
          pqkv::sparse_config bad = cfg;
          bad.block_q = 8;
          pqkv::gpu::block_sparse_attention<float> const op{dims, bad};
        }).find("block_q=8") != std::string::npos);

  pqkv::gpu::block_sparse_attention<float> const op{dims, cfg};
  auto const m = op.shape();
  auto const dq = upload(b.q.storage());
  auto const dk = upload(b.k.storage());
  auto const dv = upload(b.v.storage());
  auto const dcu = upload(b.cu);
  pqkv::device_buffer<std::uint32_t> dbits(static_cast<std::size_t>(pqkv::bitmask_size(m)));
  pqkv::device_buffer<float> dout(static_cast<std::size_t>(qh * tokens * dim));
  auto const q = device_kv(dq, qh, tokens, dim);
  auto const k = device_kv(dk, kvh, tokens, dim);
  auto const v = device_kv(dv, kvh, tokens, dim);
  std::span<std::int32_t const> const cu{dcu.data(), 3};
  auto const bits = pqkv::make_view(static_cast<std::uint32_t const*>(dbits.data()), m.batch, m.q_heads, m.q_blocks,
                                    m.words);
  auto const out = pqkv::make_view(dout.data(), qh, tokens, dim);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  // A call that passes every check, then one bad argument at a time.
  op(q, k, v, cu, bits, out, nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const small_bits = pqkv::make_view(static_cast<std::uint32_t const*>(dbits.data()), m.batch, 1, m.q_blocks,
                                          m.words);
  CHECK(error_message([&] { op(q, k, v, cu, small_bits, out, nullptr); }).find("bitmask extents") !=
        std::string::npos);
  CHECK(error_message([&] {
          op(q, k, v, cu, bits, pqkv::make_view(dout.data(), qh, tokens - 1, dim), nullptr);
        }).find("out extents") != std::string::npos);
  CHECK(error_message([&] { op(q, k, v, cu.first(2), bits, out, nullptr); }).find("cu_seqlens.size()=2") !=
        std::string::npos);
  CHECK(error_message([&] { op(q, q, v, cu, bits, out, nullptr); }).find("k heads=4") != std::string::npos);
  auto const dq16 = upload(convert<__nv_bfloat16>(b.q).storage());
  auto const dk16 = upload(convert<__nv_bfloat16>(b.k).storage());
  CHECK(error_message([&] {
          op(device_kv(dq16, qh, tokens, dim), device_kv(dk16, kvh, tokens, dim), v, cu, bits, out, nullptr);
        }).find("q dtype=bf16 differs from the dtype this object was built for, f32") != std::string::npos);
  CHECK(error_message([&] { op(q, k, device_kv(dk16, kvh, tokens, dim), cu, bits, out, nullptr); })
            .find("v dtype=bf16") != std::string::npos);
  std::vector<float> host_q = b.q.storage();  // pageable host memory
  CHECK(error_message([&] {
          op(pqkv::kv_view<float const>{pqkv::make_view(static_cast<float const*>(host_q.data()), qh, tokens, dim)},
             k, v, cu, bits, out, nullptr);
        }).find("q is not device-accessible memory") != std::string::npos);
  CHECK(error_message([&] {
          pqkv::kv_view<float> const null_out{pqkv::make_view(static_cast<float*>(nullptr), qh, tokens, dim)};
          op.dense(q, k, v, cu, null_out, nullptr);
        }).find("out.data_handle() is null") != std::string::npos);
  if (int const other = pqkv::test::other_device(); other >= 0) {
    pqkv::test::device_scope const scope{other};
    CHECK(error_message([&] { op(q, k, v, cu, bits, out, nullptr); }).find("called on device") != std::string::npos);
  }

  pqkv::gpu::tau_calibrator<float> const cal{dims, cfg};
  pqkv::device_buffer<std::byte> ws(cal.workspace_bytes());
  std::span<std::byte> const wss{ws.data(), ws.size()};
  CHECK(error_message([&] { (void)cal(q, k, v, cu, -1.0, {}, wss, nullptr); }).find("theta=-1") != std::string::npos);
  CHECK(error_message([&] {
          (void)cal(q, k, v, cu, std::numeric_limits<double>::quiet_NaN(), {}, wss, nullptr);
        }).find("theta=nan") != std::string::npos);
  CHECK(error_message([&] {
          (void)cal(q, k, v, cu, 0.1, {.tau_start = 0.f}, wss, nullptr);
        }).find("tau_start=0") != std::string::npos);
  CHECK(error_message([&] { (void)cal(q, k, v, cu, 0.1, {}, wss.first(wss.size() - 256), nullptr); })
            .find("workspace.size()") != std::string::npos);
  CHECK(error_message([&] {
          (void)cal(device_kv(dq16, qh, tokens, dim), device_kv(dk16, kvh, tokens, dim), v, cu, 0.1, {}, wss,
                    nullptr);
        }).find("q dtype=bf16") != std::string::npos);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
}
