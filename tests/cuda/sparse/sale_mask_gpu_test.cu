// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::center_quantize and pqkv::gpu::sale_mask against the CPU
// reference (sparse/quantize.hpp, sparse/sale_mask.hpp) on the same inputs:
// quantized codes, scales, means, corr and row terms bit for bit; row lse to
// 1e-12; masks equal except blocks whose reference score lies within 1e-4 of
// log(tau) or, with a cap, within 1e-9 of the row's cut (counted, bounded);
// density, BSR, BlockMask and SpargeAttn LUT conversions equal the CPU's on
// the GPU mask; graph replay; bad inputs throw before any launch.
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/sparse/quantize.cuh>
#include <pqkv/sparse/quantize.hpp>
#include <pqkv/sparse/sale_mask.cuh>
#include <pqkv/sparse/sale_mask.hpp>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"
#include "common/test_util.hpp"
#include "cpu/sparse/sparse_test_util.hpp"

#include <cuda_bf16.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <span>
#include <string>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::convert;
using pqkv::test::download;
using pqkv::test::upload;

constexpr float inf = std::numeric_limits<float>::infinity();

template <class T>
pqkv::kv_view<T const> device_kv(pqkv::device_buffer<T> const& d, index_t h, index_t t, index_t c)
{
  return pqkv::kv_view<T const>{pqkv::make_view(static_cast<T const*>(d.data()), h, t, c)};
}

/// A region of the mask's workspace, downloaded.
template <class U>
std::vector<U> region(pqkv::device_buffer<std::byte> const& ws, std::size_t offset, std::size_t n)
{
  std::vector<U> v(n);
  if (n > 0) {
    PQKV_CUDA_TRY(cudaMemcpy(v.data(), ws.data() + offset, n * sizeof(U), cudaMemcpyDeviceToHost));
  }
  return v;
}

/// Counts of one GPU-vs-CPU comparison.
struct mask_report {
  index_t blocks = 0;       // causal blocks compared
  index_t near_diff = 0;    // differing blocks within 1e-4 of log(tau) (or 1e-9 of a cap's cut)
  index_t far_diff = 0;     // differing blocks outside that band (must be 0)
  index_t kept_est = 0;     // estimated (non-forced) blocks kept by the CPU
  index_t dropped_est = 0;  // estimated blocks dropped by the CPU
  index_t capped_rows = 0;  // rows where more blocks than max_blocks pass the CPU's keep test
};

/// The reference's candidates of one row (non-forced causal blocks whose
/// score passes log(tau)) and the cap's cut: the max_blocks-th highest
/// candidate score, or -inf when the cap does not bind (or there is none).
struct cap_cut {
  index_t candidates = 0;
  double cut = -std::numeric_limits<double>::infinity();
};

cap_cut cut_of(pqkv::sparse_config const& cfg, index_t n, index_t qb, float tau, std::vector<double> const& scores)
{
  cap_cut c;
  std::vector<double> pass;
  double const log_tau = std::log(static_cast<double>(tau));
  for (index_t kb = 0; kb < pqkv::causal_blocks(cfg, n, qb); ++kb) {
    if (!pqkv::forced_block(cfg, n, qb, kb) && scores[static_cast<std::size_t>(kb)] >= log_tau) {
      pass.push_back(scores[static_cast<std::size_t>(kb)]);
    }
  }
  c.candidates = static_cast<index_t>(pass.size());
  if (cfg.max_blocks > 0 && c.candidates > cfg.max_blocks) {
    std::sort(pass.begin(), pass.end(), std::greater<>{});
    c.cut = pass[static_cast<std::size_t>(cfg.max_blocks) - 1];
  }
  return c;
}

/// The SpargeAttn LUT of the device mask `dbits` (a copy of host `bits`) at
/// cq x ck on `stream` into poisoned outputs equals the CPU conversion.
void check_sparge_lut(pqkv::host_tensor<std::uint32_t, 4> const& bits, pqkv::view<std::uint32_t const, 4> dbits,
                      pqkv::mask_shape const& m, pqkv::sparse_config const& cfg, index_t cq, index_t ck,
                      cudaStream_t stream)
{
  auto const b = pqkv::make_block_mask_shape(m, cfg, cq, ck);
  pqkv::host_tensor<std::int32_t, 3> valid(b.batch, b.q_heads, b.q_blocks);
  pqkv::host_tensor<std::int32_t, 4> lut(b.batch, b.q_heads, b.q_blocks, b.k_blocks);
  pqkv::cpu::bitmask_to_sparge_lut(bits.const_view(), m, cfg, cq, ck, valid.view(), lut.view());
  auto const nv = static_cast<std::size_t>(pqkv::sparge_valid_size(b));
  auto const nl = static_cast<std::size_t>(pqkv::sparge_lut_size(b));
  pqkv::device_buffer<std::int32_t> dvalid(std::max<std::size_t>(nv, 1)), dlut(std::max<std::size_t>(nl, 1));
  PQKV_CUDA_TRY(cudaMemsetAsync(dvalid.data(), 0xAB, dvalid.size() * 4, stream));  // every entry must be written
  PQKV_CUDA_TRY(cudaMemsetAsync(dlut.data(), 0xAB, dlut.size() * 4, stream));
  pqkv::gpu::bitmask_to_sparge_lut(dbits, m, cfg, cq, ck, pqkv::make_view(dvalid.data(), b.batch, b.q_heads, b.q_blocks),
                                   pqkv::make_view(dlut.data(), b.batch, b.q_heads, b.q_blocks, b.k_blocks), stream);
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  CHECK(download(dvalid, nv) == valid.storage());
  CHECK(download(dlut, nl) == lut.storage());
}

/// Runs the GPU mask on b (converted to T) and compares everything with the
/// CPU reference; returns the mask counts (the caller bounds near_diff).
template <class T>
mask_report check_case(pqkv::test::batch_data const& b, pqkv::sparse_config const& cfg,
                       pqkv::quant_config const& qcfg, std::vector<float> const& tau, char const* name)
{
  INFO("case ", name);
  auto const qh = convert<T>(b.q);
  auto const kh = convert<T>(b.k);
  index_t const qheads = qh.extent(0), kvheads = kh.extent(0), tokens = qh.extent(1), dim = qh.extent(2);
  auto const batch = static_cast<index_t>(b.cu.size()) - 1;
  pqkv::cpu::sale_estimator const est{qh.const_view(), kh.const_view(), b.cu, cfg, qcfg};
  auto const m = est.shape();
  pqkv::host_tensor<std::uint32_t, 4> ref_bits(m.batch, m.q_heads, m.q_blocks, m.words);
  std::vector<double> ref_density(static_cast<std::size_t>(qheads));
  pqkv::cpu::build_mask(est, std::span<float const>{tau}, ref_bits.view(), std::span<double>{ref_density});

  pqkv::gpu::sale_dims const dims{batch, tokens, qheads, kvheads, dim, m.max_len};
  pqkv::gpu::sale_mask<T> const op{dims, cfg, qcfg};
  REQUIRE(op.shape() == m);
  auto const dq = upload(qh.storage());
  auto const dk = upload(kh.storage());
  auto const dcu = upload(b.cu);
  pqkv::device_buffer<float> dtau(static_cast<std::size_t>(qheads));
  op.load_tau(std::span<float const>{tau}, std::span<float>{dtau.data(), tau.size()}, nullptr);
  std::size_t const words = static_cast<std::size_t>(pqkv::bitmask_size(m));
  pqkv::device_buffer<std::uint32_t> dbits(std::max<std::size_t>(words, 1));
  PQKV_CUDA_TRY(cudaMemset(dbits.data(), 0xAB, dbits.size() * 4));  // poison: every word must be written
  pqkv::device_buffer<double> ddens(static_cast<std::size_t>(qheads));
  pqkv::device_buffer<std::byte> ws(std::max<std::size_t>(op.workspace_bytes(), 1));
  auto call = [&] {
    op(device_kv(dq, qheads, tokens, dim), device_kv(dk, kvheads, tokens, dim),
       std::span<std::int32_t const>{dcu.data(), b.cu.size()}, std::span<float const>{dtau.data(), tau.size()},
       pqkv::make_view(dbits.data(), m.batch, m.q_heads, m.q_blocks, m.words),
       std::span<double>{ddens.data(), static_cast<std::size_t>(qheads)},
       std::span<std::byte>{ws.data(), ws.size()}, nullptr);
  };
  call();
  PQKV_CUDA_TRY(cudaDeviceSynchronize());

  // Quantized values and terms, bit for bit.
  auto const& L = op.workspace_layout();
  auto const tk = static_cast<std::size_t>(tokens), d = static_cast<std::size_t>(dim);
  auto const qc = region<std::int8_t>(ws, L.q_codes, static_cast<std::size_t>(qheads) * tk * d);
  auto const kc = region<std::int8_t>(ws, L.k_codes, static_cast<std::size_t>(kvheads) * tk * d);
  auto const corr = region<float>(ws, L.corr, static_cast<std::size_t>(qheads) * tk);
  auto const row = region<float>(ws, L.row, static_cast<std::size_t>(qheads) * tk);
  auto const lse = region<double>(ws, L.lse, static_cast<std::size_t>(qheads) * tk);
  auto const gb = static_cast<std::size_t>(L.group_bound);
  auto const qs = region<float>(ws, L.q_scales, static_cast<std::size_t>(qheads) * gb);
  auto const ks = region<float>(ws, L.k_scales, static_cast<std::size_t>(kvheads) * gb);
  index_t const groups = pqkv::quant_group_count(b.cu, qcfg.group);
  index_t bad = 0;
  auto same_bits = [](float a, float c) { return std::memcmp(&a, &c, sizeof(float)) == 0; };
  for (std::size_t i = 0; i < qc.size() && bad < 5; ++i) {
    if (qc[i] != est.q_codes().data_handle()[i]) {
      ++bad;
      FAIL_CHECK("q code ", i, ": gpu ", int{qc[i]}, " cpu ", int{est.q_codes().data_handle()[i]});
    }
  }
  for (std::size_t i = 0; i < kc.size() && bad < 5; ++i) {
    if (kc[i] != est.k_codes().data_handle()[i]) {
      ++bad;
      FAIL_CHECK("k code ", i, ": gpu ", int{kc[i]}, " cpu ", int{est.k_codes().data_handle()[i]});
    }
  }
  for (index_t h = 0; h < qheads && bad < 5; ++h) {
    for (index_t g = 0; g < groups; ++g) {
      if (!same_bits(qs[static_cast<std::size_t>(h) * gb + static_cast<std::size_t>(g)], est.q_scales()(h, g))) {
        ++bad;
        FAIL_CHECK("q scale (", h, ", ", g, ")");
      }
    }
    for (index_t t = 0; t < tokens; ++t) {
      std::size_t const o = static_cast<std::size_t>(h) * tk + static_cast<std::size_t>(t);
      float const cc = est.corrections()(h, t), cr = est.row_terms()(h, t);
      if (!same_bits(corr[o], cc) || !same_bits(row[o], cr)) {
        ++bad;
        FAIL_CHECK("corr/row (", h, ", ", t, "): gpu ", corr[o], "/", row[o], " cpu ", cc, "/", cr);
      }
      double const lr = est.row_lse()(h, t);
      bool const lse_ok = std::isinf(lr) ? lse[o] == lr : std::abs(lse[o] - lr) <= 1e-12 * std::max(1.0, std::abs(lr));
      if (!lse_ok) {
        ++bad;
        FAIL_CHECK("lse (", h, ", ", t, "): gpu ", lse[o], " cpu ", lr);
      }
    }
  }
  for (index_t h = 0; h < kvheads && bad < 5; ++h) {
    for (index_t g = 0; g < groups; ++g) {
      if (!same_bits(ks[static_cast<std::size_t>(h) * gb + static_cast<std::size_t>(g)], est.k_scales()(h, g))) {
        ++bad;
        FAIL_CHECK("k scale (", h, ", ", g, ")");
      }
    }
  }
  CHECK(bad == 0);

  // Masks: equal except near the threshold, judged with the CPU's scores.
  auto const bits = download(dbits, words);
  mask_report rep;
  bool const capped = cfg.max_blocks >= 0;
  std::vector<double> scores(static_cast<std::size_t>(m.k_blocks));
  for (index_t s = 0; s < m.batch; ++s) {
    index_t const n = b.cu[static_cast<std::size_t>(s) + 1] - b.cu[static_cast<std::size_t>(s)];
    for (index_t h = 0; h < m.q_heads; ++h) {
      for (index_t qb = 0; qb < m.q_blocks; ++qb) {
        std::size_t const w0 = static_cast<std::size_t>(((s * m.q_heads + h) * m.q_blocks + qb) * m.words);
        index_t const nk = pqkv::causal_blocks(cfg, n, qb);
        float const t = tau[static_cast<std::size_t>(h)];
        // The reference's scores: computed for a row that differs, or for every sparse row under a cap.
        bool scored = false;
        cap_cut cut;
        if (capped && t != 0.f && nk > 0) {
          est.block_scores(s, h, qb, scores);
          scored = true;
          cut = cut_of(cfg, n, qb, t, scores);
          rep.capped_rows += cut.candidates > cfg.max_blocks ? 1 : 0;
        }
        for (index_t kb = 0; kb < m.words * 32; ++kb) {
          bool const g = ((bits[w0 + static_cast<std::size_t>(kb / 32)] >> (kb % 32)) & 1u) != 0;
          bool const c = kb < m.k_blocks && pqkv::cpu::mask_bit(ref_bits.const_view(), s, h, qb, kb);
          if (kb >= nk) {
            if (g) {
              ++rep.far_diff;
              FAIL_CHECK("non-causal bit set: s=", s, " h=", h, " qb=", qb, " kb=", kb);
            }
            continue;
          }
          ++rep.blocks;
          bool const estimated = t != 0.f && !pqkv::forced_block(cfg, n, qb, kb);
          if (estimated) { (c ? rep.kept_est : rep.dropped_est) += 1; }
          if (g == c) { continue; }
          if (estimated && !scored) {
            est.block_scores(s, h, qb, scores);
            scored = true;
          }
          double const margin = estimated ? scores[static_cast<std::size_t>(kb)] - std::log(static_cast<double>(t))
                                          : inf;
          bool const at_cut = estimated && std::isfinite(cut.cut) &&
                              std::abs(scores[static_cast<std::size_t>(kb)] - cut.cut) <=
                                  1e-9 * std::max(1.0, std::abs(cut.cut));
          if (std::abs(margin) <= 1e-4 || at_cut) {
            ++rep.near_diff;
          } else {
            ++rep.far_diff;
            if (rep.far_diff <= 5) {
              FAIL_CHECK("mask differs: s=", s, " h=", h, " qb=", qb, " kb=", kb, " gpu=", g, " cpu=", c,
                         " margin=", margin, " cap=", cfg.max_blocks, " cut=", cut.cut);
            }
          }
        }
      }
    }
  }
  CHECK(rep.far_diff == 0);

  // Density: the GPU's own mask's density, which equals the CPU's where masks agree.
  auto const dens = download(ddens, static_cast<std::size_t>(qheads));
  pqkv::host_tensor<std::uint32_t, 4> gpu_bits(m.batch, m.q_heads, m.q_blocks, m.words);
  std::copy(bits.begin(), bits.end(), gpu_bits.data());
  std::vector<double> own(static_cast<std::size_t>(qheads));
  pqkv::cpu::mask_density(gpu_bits.const_view(), m, b.cu, cfg, own);
  for (index_t h = 0; h < qheads; ++h) {
    CHECK_MESSAGE(dens[static_cast<std::size_t>(h)] == own[static_cast<std::size_t>(h)], "density head ", h);
    if (rep.near_diff == 0) { CHECK(dens[static_cast<std::size_t>(h)] == ref_density[static_cast<std::size_t>(h)]); }
  }

  // BSR and BlockMask on the device equal the CPU conversions of the same mask.
  {
    std::vector<std::int32_t> indptr(static_cast<std::size_t>(pqkv::bsr_indptr_size(m)));
    std::vector<std::int32_t> indices(static_cast<std::size_t>(pqkv::gpu::bsr_indices_bound(m, cfg)) + 1);
    index_t const nnz = pqkv::cpu::bitmask_to_bsr(gpu_bits.const_view(), m, indptr, indices);
    pqkv::device_buffer<std::int32_t> dptr(indptr.size()), didx(indices.size());
    pqkv::gpu::bitmask_to_bsr(pqkv::as_const(pqkv::make_view(dbits.data(), m.batch, m.q_heads, m.q_blocks, m.words)),
                              m, cfg, std::span<std::int32_t>{dptr.data(), indptr.size()},
                              std::span<std::int32_t>{didx.data(), indices.size()}, nullptr);
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
    auto const gptr = download(dptr, indptr.size());
    auto const gidx = download(didx, static_cast<std::size_t>(nnz));
    CHECK(gptr == indptr);
    CHECK(std::equal(gidx.begin(), gidx.end(), indices.begin()));

    index_t const cq = cfg.block_q * 2, ck = cfg.block_k * 4;
    auto const bs = pqkv::make_block_mask_shape(m, cfg, cq, ck);
    pqkv::host_tensor<std::int32_t, 3> num(bs.batch, bs.q_heads, bs.q_blocks);
    pqkv::host_tensor<std::int32_t, 4> idx(bs.batch, bs.q_heads, bs.q_blocks, bs.k_blocks);
    pqkv::cpu::bitmask_to_block_mask(gpu_bits.const_view(), m, cfg, cq, ck, num.view(), idx.view());
    pqkv::device_buffer<std::int32_t> dnum(std::max<std::size_t>(num.size(), 1)), didx2(std::max<std::size_t>(idx.size(), 1));
    pqkv::gpu::bitmask_to_block_mask(
        pqkv::as_const(pqkv::make_view(dbits.data(), m.batch, m.q_heads, m.q_blocks, m.words)), m, cfg, cq, ck,
        pqkv::make_view(dnum.data(), bs.batch, bs.q_heads, bs.q_blocks),
        pqkv::make_view(didx2.data(), bs.batch, bs.q_heads, bs.q_blocks, bs.k_blocks), nullptr);
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
    CHECK(download(dnum, num.size()) == num.storage());
    CHECK(download(didx2, idx.size()) == idx.storage());

    // SpargeAttn LUT: at the mask's blocks, at 2 Bq x 4 Bk, and at SageAttention2's tiles where they divide.
    auto const dview = pqkv::as_const(pqkv::make_view(dbits.data(), m.batch, m.q_heads, m.q_blocks, m.words));
    std::vector<std::pair<index_t, index_t>> sizes{{cfg.block_q, cfg.block_k}, {cq, ck}};
    if (64 % cfg.block_q == 0 && 128 % cfg.block_k == 0) { sizes.emplace_back(64, 128); }
    if (128 % cfg.block_q == 0 && 64 % cfg.block_k == 0) { sizes.emplace_back(128, 64); }
    for (auto const& [lq, lk] : sizes) {
      CAPTURE(lq);
      CAPTURE(lk);
      check_sparge_lut(gpu_bits, dview, m, cfg, lq, lk, nullptr);
    }
  }
  MESSAGE(name, ": blocks=", rep.blocks, " estimated kept=", rep.kept_est, " dropped=", rep.dropped_est,
          " near-threshold differences=", rep.near_diff, " max_blocks=", cfg.max_blocks,
          " rows at the cap=", rep.capped_rows);
  return rep;
}

std::vector<float> taus(index_t heads, float base)
{
  std::vector<float> t(static_cast<std::size_t>(heads));
  for (index_t h = 0; h < heads; ++h) { t[static_cast<std::size_t>(h)] = base * static_cast<float>(1 + h % 3); }
  return t;
}

/// A mask configuration with the given block sizes and window (the default sink unless given).
pqkv::sparse_config blocks(index_t block_q, index_t block_k, index_t local, index_t sink = -1)
{
  pqkv::sparse_config cfg;
  cfg.block_q = block_q;
  cfg.block_k = block_k;
  cfg.local = local;
  if (sink >= 0) { cfg.sink = sink; }
  return cfg;
}

}  // namespace

TEST_CASE("gpu::center_quantize equals cpu::center_quantize bit for bit")
{
  PQKV_REQUIRE_GPU();
  for (int variant = 0; variant < 4; ++variant) {
    pqkv::quant_config qcfg;
    qcfg.grid = variant % 2 == 0 ? pqkv::quant_grid::int4 : pqkv::quant_grid::int8;
    qcfg.group = variant < 2 ? 1 : (variant == 2 ? 16 : 32);
    INFO("variant ", variant, " grid ", static_cast<int>(qcfg.grid), " group ", qcfg.group);
    std::vector<std::int32_t> cu{0, 37, 37, 300, 333};  // an empty sequence, groups cut by sequence ends
    auto x = pqkv::test::noise_tensor(3, 333, 64, 100 + static_cast<std::uint64_t>(variant), 3.f);
    pqkv::test::add_bias(x, 7, 1.5f);
    for (int as_bf16 = 0; as_bf16 < 2; ++as_bf16) {
      auto run = [&](auto tag) {
        using T = decltype(tag);
        auto const xt = convert<T>(x);
        index_t const heads = 3, tokens = 333, dim = 64, batch = 4;
        index_t const groups = pqkv::quant_group_count(cu, qcfg.group);
        pqkv::host_tensor<std::int8_t, 3> codes(heads, tokens, dim);
        pqkv::host_tensor<float, 2> scales(heads, groups);
        pqkv::host_tensor<float, 3> means(batch, heads, dim);
        pqkv::cpu::center_quantize(xt.const_view(), cu, qcfg, codes.view(), scales.view(), means.view());
        index_t const gb = pqkv::gpu::quant_group_bound(tokens, batch, qcfg.group);
        auto const dx = upload(xt.storage());
        auto const dcu = upload(cu);
        pqkv::device_buffer<std::int8_t> dcodes(codes.size());
        pqkv::device_buffer<float> dscales(static_cast<std::size_t>(heads * gb)), dmeans(means.size());
        pqkv::device_buffer<std::byte> ws(pqkv::gpu::center_quantize_workspace_bytes(heads, batch, dim));
        pqkv::gpu::center_quantize(device_kv(dx, heads, tokens, dim), std::span<std::int32_t const>{dcu.data(), cu.size()},
                                   qcfg, pqkv::make_view(dcodes.data(), heads, tokens, dim),
                                   pqkv::make_view(dscales.data(), heads, gb), pqkv::make_view(dmeans.data(), batch, heads, dim),
                                   std::span<std::byte>{ws.data(), ws.size()}, nullptr);
        PQKV_CUDA_TRY(cudaDeviceSynchronize());
        CHECK(download(dcodes, codes.size()) == codes.storage());
        auto const gm = download(dmeans, means.size());
        CHECK(std::memcmp(gm.data(), means.data(), means.size() * sizeof(float)) == 0);
        auto const gs = download(dscales, dscales.size());
        for (index_t h = 0; h < heads; ++h) {
          CHECK(std::memcmp(gs.data() + h * gb, &scales.view()(h, 0), static_cast<std::size_t>(groups) * 4) == 0);
        }
      };
      if (as_bf16 != 0) { run(__nv_bfloat16{}); } else { run(float{}); }
    }
  }
}

TEST_CASE("gpu::center_quantize: means exact when float values span a wide range (ordered fallback)")
{
  PQKV_REQUIRE_GPU();
  // Values 1e-30 .. 1e6 make the slice sums round, so the GPU must take the ascending loop.
  index_t const heads = 2, tokens = 700, dim = 64;
  std::vector<std::int32_t> cu{0, tokens};
  pqkv::host_tensor<float, 3> x(heads, tokens, dim);
  for (std::size_t i = 0; i < x.size(); ++i) {
    float const u = pqkv::test::noise(9, i);
    x.data()[i] = u * std::pow(10.f, static_cast<float>(static_cast<int>(i % 37) - 30) * 0.2f);
  }
  pqkv::quant_config const qcfg{pqkv::quant_grid::int8, 1};
  pqkv::host_tensor<std::int8_t, 3> codes(heads, tokens, dim);
  pqkv::host_tensor<float, 2> scales(heads, tokens);
  pqkv::host_tensor<float, 3> means(1, heads, dim);
  pqkv::cpu::center_quantize(x.const_view(), cu, qcfg, codes.view(), scales.view(), means.view());
  auto const dx = upload(x.storage());
  auto const dcu = upload(cu);
  pqkv::device_buffer<std::int8_t> dcodes(codes.size());
  pqkv::device_buffer<float> dscales(scales.size()), dmeans(means.size());
  pqkv::device_buffer<std::byte> ws(pqkv::gpu::center_quantize_workspace_bytes(heads, 1, dim));
  pqkv::gpu::center_quantize(device_kv(dx, heads, tokens, dim), std::span<std::int32_t const>{dcu.data(), 2}, qcfg,
                             pqkv::make_view(dcodes.data(), heads, tokens, dim),
                             pqkv::make_view(dscales.data(), heads, tokens), pqkv::make_view(dmeans.data(), 1, heads, dim),
                             std::span<std::byte>{ws.data(), ws.size()}, nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const gm = download(dmeans, means.size());
  for (std::size_t i = 0; i < gm.size(); ++i) {
    CHECK_MESSAGE(std::memcmp(&gm[i], means.data() + i, 4) == 0, "mean ", i, ": gpu ", gm[i], " cpu ", means.data()[i]);
  }
  CHECK(download(dcodes, codes.size()) == codes.storage());
  CHECK(download(dscales, scales.size()) == scales.storage());
}

TEST_CASE("gpu::sale_mask equals the CPU reference: small shapes")
{
  PQKV_REQUIRE_GPU();
  SUBCASE("float, d=64, GQA 4:1, ragged batch, int4 per token")
  {
    auto const b = pqkv::test::make_batch(8, 2, 64, {0, 517, 517, 1200}, 11);
    pqkv::sparse_config cfg;  // 64 x 32, sink 32, local 128
    auto t = taus(8, 0.1f);
    t[1] = 0.f;  // dense head
    t[2] = inf;  // forced blocks only
    auto const r = check_case<float>(b, cfg, {}, t, "f32 d64");
    CHECK(r.kept_est > 0);
    CHECK(r.dropped_est > 0);
    CHECK(r.near_diff <= 2);
  }
  SUBCASE("bf16, d=128, GQA 8:1, int8 grid, groups of 16, n not a multiple of a block")
  {
    auto const b = pqkv::test::make_batch(8, 1, 128, {0, 999}, 12);
    pqkv::sparse_config cfg;
    pqkv::quant_config const qcfg{pqkv::quant_grid::int8, 16};
    auto const r = check_case<__nv_bfloat16>(b, cfg, qcfg, taus(8, 0.02f), "bf16 d128");
    CHECK(r.kept_est > 0);
    CHECK(r.dropped_est > 0);
    CHECK(r.near_diff <= 2);
  }
  SUBCASE("half, d=256, Bq=128, Bk=48, local 96, groups of 32")
  {
    auto const b = pqkv::test::make_batch(4, 2, 256, {0, 700, 1500}, 13);
    auto const cfg = blocks(128, 48, 96);
    pqkv::quant_config const qcfg{pqkv::quant_grid::int4, 32};
    auto const r = check_case<__half>(b, cfg, qcfg, taus(4, 0.02f), "f16 d256");
    CHECK(r.near_diff <= 2);
  }
  SUBCASE("float, Bq=32, Bk=16, sink 0, local 16 < Bq: rows with no forced key, causal masking inside blocks")
  {
    auto const b = pqkv::test::make_batch(2, 2, 64, {0, 300}, 14);
    auto const cfg = blocks(32, 16, 16, 0);
    auto const r = check_case<float>(b, cfg, {}, taus(2, 2.f), "local<Bq");
    CHECK(r.near_diff <= 2);
  }
  SUBCASE("Bq=16: one token, n < sink + local, tiny sequences")
  {
    auto const b = pqkv::test::make_batch(4, 4, 64, {0, 1, 100, 130, 131}, 15);
    auto const cfg = blocks(16, 16, 32);
    auto const r = check_case<float>(b, cfg, {}, taus(4, 0.02f), "tiny");
    CHECK(r.near_diff <= 1);
  }
}

TEST_CASE("gpu::sale_mask with max_blocks equals the CPU reference: caps 0, 1, 3 and above every row")
{
  PQKV_REQUIRE_GPU();
  // Score rows: the closed form equals the sum of causal blocks (Bk dividing Bq, Bq dividing Bk, neither).
  for (index_t bq : {16, 32, 64, 128}) {
    for (index_t bk : {16, 32, 48, 80, 256}) {
      for (index_t len : {1, 15, 16, 100, 1000, 4097}) {
        pqkv::sparse_config c;
        c.block_q = bq;
        c.block_k = bk;
        long long brute = 0;
        for (index_t qb = 0; qb <= (len + bq - 1) / bq; ++qb) {
          CHECK_MESSAGE(pqkv::detail::sale_gpu::score_row_offset(bq, bk, len, qb) == brute, "Bq=", bq, " Bk=", bk,
                        " max_len=", len, " qb=", qb);
          brute += pqkv::causal_blocks(c, len, qb);
        }
      }
    }
  }
  auto big_cap = [](pqkv::sparse_config const& c, std::vector<std::int32_t> const& cu) {
    index_t len = 0;
    for (std::size_t s = 1; s < cu.size(); ++s) { len = std::max<index_t>(len, cu[s] - cu[s - 1]); }
    return (len + c.block_k - 1) / c.block_k + 1;  // more than any row's causal blocks
  };
  // Each input at caps 0, 1, 3 (binding somewhere) and one above every row's count (the uncapped mask).
  auto run_caps = [&](auto tag, pqkv::test::batch_data const& b, pqkv::sparse_config cfg,
                      pqkv::quant_config const& qcfg, std::vector<float> const& t, char const* name, bool binds) {
    using T = decltype(tag);
    for (index_t cap : {index_t{0}, index_t{1}, index_t{3}, big_cap(cfg, b.cu)}) {
      cfg.max_blocks = cap;
      auto const r = check_case<T>(b, cfg, qcfg, t, name);
      CHECK(r.near_diff <= 2);
      if (cap == 0) { CHECK(r.kept_est == 0); }
      if (cap == big_cap(cfg, b.cu)) {
        CHECK(r.capped_rows == 0);
      } else if (binds) {
        CHECK(r.capped_rows > 0);
      }
    }
  };
  SUBCASE("float, d=64, GQA 4:1, ragged batch, per-head tau with a dense head and a forced-only head")
  {
    auto const b = pqkv::test::make_batch(8, 2, 64, {0, 517, 517, 1200}, 11);
    auto t = taus(8, 0.01f);
    t[1] = 0.f;  // dense: no cap
    t[2] = inf;  // forced blocks only
    run_caps(float{}, b, pqkv::sparse_config{}, {}, t, "cap f32 d64", true);
  }
  SUBCASE("bf16, d=128, GQA 8:1, int8 grid, groups of 16")
  {
    auto const b = pqkv::test::make_batch(8, 1, 128, {0, 999}, 12);
    auto t = taus(8, 0.005f);
    t[5] = 0.f;
    run_caps(__nv_bfloat16{}, b, pqkv::sparse_config{}, pqkv::quant_config{pqkv::quant_grid::int8, 16}, t,
             "cap bf16 d128", true);
  }
  SUBCASE("half, d=256, Bq=128, Bk=48 (score rows of neither dividing the other), ragged")
  {
    auto const b = pqkv::test::make_batch(4, 2, 256, {0, 700, 1500}, 13);
    auto const cfg = blocks(128, 48, 96);
    auto t = taus(4, 1e-4f);  // low enough that rows hold more than 3 candidates
    t[3] = 0.f;
    run_caps(__half{}, b, cfg, pqkv::quant_config{pqkv::quant_grid::int4, 32}, t, "cap f16 d256", true);
  }
  SUBCASE("float, Bq=32, Bk=16, sink 0, local 16: rows with no forced key score +inf (ties to the lower block)")
  {
    auto const b = pqkv::test::make_batch(2, 2, 64, {0, 300}, 14);
    auto const cfg = blocks(32, 16, 16, 0);
    run_caps(float{}, b, cfg, {}, taus(2, 2.f), "cap local<Bq", true);
  }
  SUBCASE("Bq=16: one token, n < sink + local, tiny sequences")
  {
    auto const b = pqkv::test::make_batch(4, 4, 64, {0, 1, 100, 130, 131}, 15);
    auto const cfg = blocks(16, 16, 32);
    run_caps(float{}, b, cfg, {}, taus(4, 0.002f), "cap tiny", false);
  }
  SUBCASE("the score workspace exists only with a cap")
  {
    pqkv::gpu::sale_dims const dims{2, 1500, 4, 2, 256, 800};
    auto cfg = blocks(128, 48, 96);
    pqkv::gpu::sale_mask<__half> const free_op{dims, cfg};
    cfg.max_blocks = 4;
    pqkv::gpu::sale_mask<__half> const cap_op{dims, cfg};
    auto const m = cap_op.shape();
    index_t causal = 0;
    for (index_t qb = 0; qb < m.q_blocks; ++qb) { causal += pqkv::causal_blocks(cfg, m.max_len, qb); }
    CHECK(free_op.workspace_layout().score_stride == 0);
    CHECK(cap_op.workspace_layout().score_stride == causal);
    CHECK(cap_op.workspace_bytes() >= free_op.workspace_bytes() + static_cast<std::size_t>(2 * 4 * causal * 8));
    CHECK(cap_op.workspace_layout().scores % 256 == 0);
  }
}

TEST_CASE("gpu::sale_mask keeps a planted needle")
{
  PQKV_REQUIRE_GPU();
  auto b = pqkv::test::make_batch(4, 1, 64, {0, 1200}, 41);
  // key 300 points along query row 930 of q head 0: its logit dwarfs the sink's
  for (index_t c = 0; c < 64; ++c) { b.k.view()(0, 300, c) = 0.6f * b.q.view()(0, 930, c); }
  pqkv::sparse_config const cfg;
  auto const r = check_case<float>(b, cfg, {}, taus(4, 0.1f), "needle");
  CHECK(r.near_diff <= 2);
  // the CPU decision (equal to the GPU's away from the threshold) keeps it
  pqkv::cpu::sale_estimator const est{b.q.const_view(), b.k.const_view(), b.cu, cfg};
  std::vector<double> scores(static_cast<std::size_t>(est.shape().k_blocks));
  est.block_scores(0, 0, 930 / 64, scores);
  CHECK(scores[300 / 32] > std::log(0.3) + 1.0);  // above every head's tau
}

TEST_CASE("gpu::sale_mask equals the CPU reference: moderate shape (2K tokens, 8 q / 2 KV heads, d=128)")
{
  PQKV_REQUIRE_GPU();
  auto const b = pqkv::test::make_batch(8, 2, 128, {0, 2048}, 21);
  auto const r = check_case<__nv_bfloat16>(b, pqkv::sparse_config{}, {}, taus(8, 0.05f), "2K");
  CHECK(r.kept_est > 0);
  CHECK(r.dropped_est > 0);
  CHECK(r.near_diff <= 4);
}

TEST_CASE("gpu::sale_mask: CUDA graph replay gives the same mask")
{
  PQKV_REQUIRE_GPU();
  auto const b = pqkv::test::make_batch(4, 1, 64, {0, 400, 777}, 31);
  auto const qh = convert<__nv_bfloat16>(b.q);
  auto const kh = convert<__nv_bfloat16>(b.k);
  pqkv::sparse_config cfg;
  SUBCASE("no cap") {}
  SUBCASE("max_blocks = 2") { cfg.max_blocks = 2; }
  pqkv::gpu::sale_dims const dims{2, 777, 4, 1, 64, 400};
  pqkv::gpu::sale_mask<__nv_bfloat16> const op{dims, cfg};
  auto const m = op.shape();
  auto const dq = upload(qh.storage());
  auto const dk = upload(kh.storage());
  auto const dcu = upload(b.cu);
  auto const tau = taus(4, 0.02f);
  pqkv::device_buffer<float> dtau(4);
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&stream));
  op.load_tau(std::span<float const>{tau}, std::span<float>{dtau.data(), 4}, stream);
  std::size_t const words = static_cast<std::size_t>(pqkv::bitmask_size(m));
  pqkv::device_buffer<std::uint32_t> once(words), replay(words);
  pqkv::device_buffer<std::byte> ws(op.workspace_bytes());
  auto call = [&](pqkv::device_buffer<std::uint32_t>& out) {
    op(device_kv(dq, 4, 777, 64), device_kv(dk, 1, 777, 64), std::span<std::int32_t const>{dcu.data(), 3},
       std::span<float const>{dtau.data(), 4}, pqkv::make_view(out.data(), m.batch, m.q_heads, m.q_blocks, m.words),
       std::span<double>{}, std::span<std::byte>{ws.data(), ws.size()}, stream);
  };
  call(once);
  PQKV_CUDA_TRY(cudaMemsetAsync(replay.data(), 0xCD, words * 4, stream));
  // a poisoned workspace: a call reads only what it wrote (the cap's scores included)
  PQKV_CUDA_TRY(cudaMemsetAsync(ws.data(), 0xEE, ws.size(), stream));
  pqkv::test::captured_graph const graph(stream, [&] { call(replay); });
  graph.launch(stream);
  graph.launch(stream);
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  CHECK(download(once, words) == download(replay, words));
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

TEST_CASE("gpu::sale_mask: bad inputs throw before any launch")
{
  PQKV_REQUIRE_GPU();
  using pqkv::test::error_message;
  pqkv::gpu::sale_dims const dims{1, 256, 8, 2, 64, 256};
  auto ctor = [&](pqkv::gpu::sale_dims d, pqkv::sparse_config c) {
    return error_message([&] { pqkv::gpu::sale_mask<float> const op{d, c}; });
  };
  pqkv::sparse_config ok;
  auto with = [&](auto edit) {
    pqkv::sparse_config c = ok;
    edit(c);
    return c;
  };
  CHECK(ctor(dims, with([](auto& c) { c.block_q = 48; })).find("block_q=48") != std::string::npos);
  CHECK(ctor(dims, with([](auto& c) { c.block_k = 24; })).find("block_k=24") != std::string::npos);
  CHECK(ctor(dims, with([](auto& c) { c.local = 16; })).find("local=16") != std::string::npos);
  CHECK(ctor(dims, with([](auto& c) { c.max_blocks = -2; })).find("max_blocks=-2") != std::string::npos);
  auto d2 = dims;
  d2.dim = 96;
  CHECK(ctor(d2, ok).find("head_dim=96") != std::string::npos);
  d2 = dims;
  d2.q_heads = 6;
  d2.kv_heads = 4;
  CHECK(ctor(d2, ok).find("kv_heads=4") != std::string::npos);

  pqkv::gpu::sale_mask<float> const op{dims, ok};
  auto const m = op.shape();
  std::vector<float> bad_tau(8, 0.01f);
  bad_tau[3] = -0.5f;
  pqkv::device_buffer<float> dtau(8);
  PQKV_CUDA_TRY(cudaMemset(dtau.data(), 0, 32));
  CHECK(error_message([&] { op.load_tau(bad_tau, std::span<float>{dtau.data(), 8}, nullptr); }).find("tau[3]=-0.5") !=
        std::string::npos);
  bad_tau[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK(error_message([&] { op.load_tau(bad_tau, std::span<float>{dtau.data(), 8}, nullptr); }).find("tau[3]") !=
        std::string::npos);
  std::vector<float> const good_tau(8, 0.01f);
  op.load_tau(good_tau, std::span<float>{dtau.data(), 8}, nullptr);

  pqkv::device_buffer<float> dq(8 * 256 * 64), dk(2 * 256 * 64);
  pqkv::device_buffer<__half> dkh(2 * 256 * 64);
  std::vector<std::int32_t> const cu{0, 256};
  auto const dcu = upload(cu);
  std::size_t const words = static_cast<std::size_t>(pqkv::bitmask_size(m));
  pqkv::device_buffer<std::uint32_t> bits(words + 8);
  PQKV_CUDA_TRY(cudaMemset(bits.data(), 0xAB, bits.size() * 4));
  pqkv::device_buffer<std::byte> ws(op.workspace_bytes());
  pqkv::device_buffer<double> dens(8);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const q = device_kv(dq, 8, 256, 64);
  auto const k = device_kv(dk, 2, 256, 64);
  std::span<std::int32_t const> const cus{dcu.data(), 2};
  std::span<float const> const taus8{dtau.data(), 8};
  auto const bm = pqkv::make_view(bits.data(), m.batch, m.q_heads, m.q_blocks, m.words);
  std::span<std::byte> const wss{ws.data(), ws.size()};
  std::span<double> const dd{dens.data(), 8};
  CHECK(error_message([&] { op(q, device_kv(dkh, 2, 256, 64), cus, taus8, bm, dd, wss, nullptr); }).find("dtype") !=
        std::string::npos);
  CHECK(error_message([&] { op(q, device_kv(dk, 1, 256, 64), cus, taus8, bm, dd, wss, nullptr); }).find("k heads=1") !=
        std::string::npos);
  CHECK(error_message([&] { op(q, k, cus, std::span<float const>{dtau.data(), 7}, bm, dd, wss, nullptr); })
            .find("tau.size()=7") != std::string::npos);
  auto const small = pqkv::make_view(bits.data(), m.batch, m.q_heads, m.q_blocks - 1, m.words);
  CHECK(error_message([&] { op(q, k, cus, taus8, small, dd, wss, nullptr); }).find("bitmask extents") !=
        std::string::npos);
  CHECK(error_message([&] { op(q, k, cus, taus8, bm, std::span<double>{dens.data(), 4}, wss, nullptr); })
            .find("density.size()=4") != std::string::npos);
  CHECK(error_message([&] { op(q, k, cus, taus8, bm, dd, wss.first(wss.size() - 256), nullptr); })
            .find("workspace.size()=") != std::string::npos);
  CHECK(error_message([&] { op(q, k, std::span<std::int32_t const>{dcu.data(), 3}, taus8, bm, dd, wss, nullptr); })
            .find("cu_seqlens.size()=3") != std::string::npos);
  // Nothing was launched: the poisoned mask is untouched and no error is pending.
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const after = download(bits, words);
  CHECK(std::all_of(after.begin(), after.end(), [](std::uint32_t w) { return w == 0xABABABABu; }));
  CHECK(cudaGetLastError() == cudaSuccess);

  pqkv::device_buffer<std::int32_t> ip(8), ix(8);
  CHECK(error_message([&] {
          pqkv::gpu::bitmask_to_bsr(pqkv::as_const(bm), m, ok, std::span<std::int32_t>{ip.data(), 8},
                                    std::span<std::int32_t>{ix.data(), 8}, nullptr);
        }).find("indptr.size()=8") != std::string::npos);
  CHECK(error_message([&] {
          pqkv::gpu::bitmask_to_block_mask(pqkv::as_const(bm), m, ok, 96, 128, pqkv::make_view(ip.data(), 1, 8, 1),
                                           pqkv::make_view(ix.data(), 1, 8, 1, 1), nullptr);
        }).find("consumer block_q=96") != std::string::npos);
}

TEST_CASE("gpu::sale_mask: records its device and throws when called from another")
{
  PQKV_REQUIRE_GPU();
  pqkv::gpu::sale_dims const dims{1, 256, 8, 2, 64, 256};
  int device = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  pqkv::gpu::sale_mask<float> const op{dims, pqkv::sparse_config{}};
  CHECK(op.device() == device);
  int const other = pqkv::test::other_device();
  if (other < 0) {
    MESSAGE("cross-device part skipped: it needs 2 GPUs");
    return;
  }
  auto const m = op.shape();
  pqkv::device_buffer<float> dq(8 * 256 * 64), dk(2 * 256 * 64), dtau(8);
  auto const dcu = upload(std::vector<std::int32_t>{0, 256});
  pqkv::device_buffer<std::uint32_t> bits(static_cast<std::size_t>(pqkv::bitmask_size(m)));
  pqkv::device_buffer<std::byte> ws(op.workspace_bytes());
  {
    pqkv::test::device_scope on_other{other};
    CHECK_THROWS_WITH_AS(op(device_kv(dq, 8, 256, 64), device_kv(dk, 2, 256, 64),
                            std::span<std::int32_t const>{dcu.data(), 2}, std::span<float const>{dtau.data(), 8},
                            pqkv::make_view(bits.data(), m.batch, m.q_heads, m.q_blocks, m.words), {},
                            std::span<std::byte>{ws.data(), ws.size()}, nullptr),
                         doctest::Contains("the object was built on device"), pqkv::error);
  }
  int now = -1;
  PQKV_CUDA_TRY(cudaGetDevice(&now));
  CHECK(now == device);
}

TEST_CASE("gpu::bitmask_to_sparge_lut equals the CPU conversion on random masks with empty rows, in a CUDA graph")
{
  PQKV_REQUIRE_GPU();
  // 5000 tokens at 32 x 16: 313 key blocks, so a row spans ten 32-block chunks of the warp's scan.
  std::vector<std::int32_t> const cu{0, 5000, 5000, 5077, 5078};
  pqkv::sparse_config const cfg{.block_q = 32, .block_k = 16, .sink = 16, .local = 32};
  auto const m = pqkv::make_mask_shape(cu, 4, 2, cfg);
  REQUIRE(m.k_blocks == 313);
  pqkv::host_tensor<std::uint32_t, 4> bits(m.batch, m.q_heads, m.q_blocks, m.words);
  std::fill(bits.data(), bits.data() + bits.size(), 0u);
  std::uint64_t i = 0;
  for (index_t s = 0; s < m.batch; ++s) {
    for (index_t h = 0; h < m.q_heads; ++h) {
      for (index_t qb = 0; qb < m.q_blocks; ++qb) {
        double const u = pqkv::detail::random_unit(61, i++, 0);
        double const density = u < 0.2 ? 0.0 : u < 0.6 ? 0.02 : 0.3;  // empty, sparse and dense rows
        for (index_t kb = 0; kb < m.k_blocks; ++kb) {
          if (pqkv::detail::random_unit(61, i++, 1) < density) {
            bits.view()(s, h, qb, kb / 32) |= std::uint32_t{1} << (kb % 32);
          }
        }
      }
    }
  }
  // Hand-placed rows: one block deep in the row; blocks astride a chunk boundary; the last block only.
  for (index_t w = 0; w < m.words; ++w) {
    bits.view()(0, 0, 0, w) = 0u;
    bits.view()(0, 0, 1, w) = 0u;
    bits.view()(0, 0, 2, w) = 0u;
  }
  bits.view()(0, 0, 0, 200 / 32) = std::uint32_t{1} << (200 % 32);
  bits.view()(0, 0, 1, 0) = 1u << 31;
  bits.view()(0, 0, 1, 1) = 1u;
  bits.view()(0, 0, 2, 312 / 32) = std::uint32_t{1} << (312 % 32);
  auto const dbits = upload(bits.storage());
  auto const dview = pqkv::as_const(pqkv::make_view(dbits.data(), m.batch, m.q_heads, m.q_blocks, m.words));
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&stream));
  for (auto const& [cq, ck] : std::vector<std::pair<index_t, index_t>>{{32, 16}, {64, 128}, {128, 64}, {96, 48}}) {
    CAPTURE(cq);
    CAPTURE(ck);
    check_sparge_lut(bits, dview, m, cfg, cq, ck, stream);
  }
  // The hand-placed rows at the mask's blocks.
  {
    auto const b = pqkv::make_block_mask_shape(m, cfg, 32, 16);
    pqkv::device_buffer<std::int32_t> dvalid(static_cast<std::size_t>(pqkv::sparge_valid_size(b)));
    pqkv::device_buffer<std::int32_t> dlut(static_cast<std::size_t>(pqkv::sparge_lut_size(b)));
    pqkv::gpu::bitmask_to_sparge_lut(dview, m, cfg, 32, 16, pqkv::make_view(dvalid.data(), b.batch, b.q_heads, b.q_blocks),
                                     pqkv::make_view(dlut.data(), b.batch, b.q_heads, b.q_blocks, b.k_blocks), stream);
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    auto const valid = download(dvalid, 3);
    auto const lut = download(dlut, static_cast<std::size_t>(3 * b.k_blocks));
    auto const at = [&](index_t r, index_t j) { return lut[static_cast<std::size_t>(r * b.k_blocks + j)]; };
    CHECK(valid == std::vector<std::int32_t>{1, 2, 1});
    CHECK(at(0, 0) == 200);
    CHECK(at(0, 1) == 0);
    CHECK(at(1, 0) == 31);
    CHECK(at(1, 1) == 1);
    CHECK(at(1, 2) == 0);
    CHECK(at(2, 0) == 312);
  }
  // Graph capture and replay into poisoned outputs gives the eager result.
  auto const b = pqkv::make_block_mask_shape(m, cfg, 64, 128);
  auto const nv = static_cast<std::size_t>(pqkv::sparge_valid_size(b)), nl = static_cast<std::size_t>(pqkv::sparge_lut_size(b));
  pqkv::device_buffer<std::int32_t> ev(nv), el(nl), gv(nv), gl(nl);
  auto convert = [&](pqkv::device_buffer<std::int32_t>& v, pqkv::device_buffer<std::int32_t>& l) {
    pqkv::gpu::bitmask_to_sparge_lut(dview, m, cfg, 64, 128, pqkv::make_view(v.data(), b.batch, b.q_heads, b.q_blocks),
                                     pqkv::make_view(l.data(), b.batch, b.q_heads, b.q_blocks, b.k_blocks), stream);
  };
  convert(ev, el);
  PQKV_CUDA_TRY(cudaMemsetAsync(gv.data(), 0xCD, nv * 4, stream));
  PQKV_CUDA_TRY(cudaMemsetAsync(gl.data(), 0xCD, nl * 4, stream));
  pqkv::test::captured_graph const graph(stream, [&] { convert(gv, gl); });
  graph.launch(stream);
  graph.launch(stream);
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  CHECK(download(gv, nv) == download(ev, nv));
  CHECK(download(gl, nl) == download(el, nl));
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

TEST_CASE("gpu::bitmask_to_sparge_lut: bad inputs throw before any launch")
{
  PQKV_REQUIRE_GPU();
  using pqkv::test::error_message;
  std::vector<std::int32_t> const cu{0, 256};
  pqkv::sparse_config const cfg{};  // 64 x 32
  auto const m = pqkv::make_mask_shape(cu, 4, 2, cfg);
  auto const b = pqkv::make_block_mask_shape(m, cfg, 64, 128);  // 4 x 2 consumer blocks
  std::size_t const words = static_cast<std::size_t>(pqkv::bitmask_size(m));
  pqkv::device_buffer<std::uint32_t> dbits(words);
  PQKV_CUDA_TRY(cudaMemset(dbits.data(), 0xFF, words * 4));
  auto const nv = static_cast<std::size_t>(pqkv::sparge_valid_size(b)), nl = static_cast<std::size_t>(pqkv::sparge_lut_size(b));
  pqkv::device_buffer<std::int32_t> dvalid(nv), dlut(nl);
  PQKV_CUDA_TRY(cudaMemset(dvalid.data(), 0xAB, nv * 4));
  PQKV_CUDA_TRY(cudaMemset(dlut.data(), 0xAB, nl * 4));
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const bm = pqkv::as_const(pqkv::make_view(dbits.data(), m.batch, m.q_heads, m.q_blocks, m.words));
  auto const v = pqkv::make_view(dvalid.data(), b.batch, b.q_heads, b.q_blocks);
  auto const l = pqkv::make_view(dlut.data(), b.batch, b.q_heads, b.q_blocks, b.k_blocks);
  auto convert = [&](auto bitmask, index_t cq, index_t ck, auto valid, auto lut) {
    return error_message([&] { pqkv::gpu::bitmask_to_sparge_lut(bitmask, m, cfg, cq, ck, valid, lut, nullptr); });
  };
  CHECK(convert(bm, 96, 128, v, l).find("consumer block_q=96") != std::string::npos);
  CHECK(convert(bm, 64, 48, v, l).find("consumer block_k=48") != std::string::npos);
  CHECK(convert(bm, 64, 64, v, l).find("lut extents (1, 4, 4, 2) differ from (1, 4, 4, 4)") != std::string::npos);
  CHECK(convert(bm, 128, 128, v, l).find("valid_block_num extents (1, 4, 4) differ from (1, 4, 2)") !=
        std::string::npos);
  auto const small = pqkv::as_const(pqkv::make_view(dbits.data(), m.batch, m.q_heads, m.q_blocks - 1, m.words));
  CHECK(convert(small, 64, 128, v, l).find("bitmask extents") != std::string::npos);
  auto const null_lut = pqkv::make_view(static_cast<std::int32_t*>(nullptr), b.batch, b.q_heads, b.q_blocks, b.k_blocks);
  CHECK(convert(bm, 64, 128, v, null_lut).find("valid_block_num or lut data_handle() is null") != std::string::npos);
  std::vector<std::int32_t> host_lut(nl);  // pageable host memory: not an output a kernel may write
  auto const hl = pqkv::make_view(host_lut.data(), b.batch, b.q_heads, b.q_blocks, b.k_blocks);
  auto const host_msg = convert(bm, 64, 128, v, hl);
  CHECK(host_msg.find("gpu::bitmask_to_sparge_lut") != std::string::npos);
  CHECK(host_msg.find("lut") != std::string::npos);
  // Nothing was launched: the poisoned outputs are untouched and no error is pending.
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const after_v = download(dvalid, nv);
  auto const after_l = download(dlut, nl);
  CHECK(std::all_of(after_v.begin(), after_v.end(), [](std::int32_t x) { return x == static_cast<std::int32_t>(0xABABABABu); }));
  CHECK(std::all_of(after_l.begin(), after_l.end(), [](std::int32_t x) { return x == static_cast<std::int32_t>(0xABABABABu); }));
  CHECK(cudaGetLastError() == cudaSuccess);
}
