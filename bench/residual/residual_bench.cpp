// SPDX-License-Identifier: Apache-2.0
// Residual (VQKV-style) codes on the CPU reference:
// - BM_rq_encode: greedy / beam encoding, 8 KV heads, d = 128, 8-bit stages.
// - BM_code_attention vs BM_reconstruct_attend (the anchor: rebuild K and V
//   from the codes, then a plain float attention loop), 8 KV / 32 q heads,
//   d = 128, (K; V) = (256 x 8; 256 x 8) and VQKV's (1024 x 56; 512 x 16).
// - BM_rq_quality: one run per configuration on the synthetic keys
//   (tests/common/keygen.hpp; 2 KV heads x 4 q heads, 4096 tokens, d = 128):
//   K and V relative reconstruction MSE and attention output error against
//   dense attention, all tokens coded and with 4 sink + 256 window tokens
//   exact, vs bytes per token and head, for residual codes and for PQ
//   (cpu::kmeans_trainer + cpu::pq_encoder) at the same bytes. Codebooks are
//   trained on the sequence itself (a prefill codebook, as PQCache does);
//   the held-out MSE encodes the next 4096 positions with the same codebooks
//   (closer to VQKV's offline codebooks).
// Codes and codebooks of the speed runs are random (the cost does not depend
// on their values). Counters: items = tokens per second (all heads).
#include <pqkv/attend/code_attention.hpp>
#include <pqkv/attend/dense.hpp>
#include <pqkv/attend/metrics.hpp>
#include <pqkv/codebook/kmeans.hpp>
#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/random.hpp>
#include <pqkv/decode/reconstruct.hpp>
#include <pqkv/decode/residual_reconstruct.hpp>
#include <pqkv/encode/encode.hpp>
#include <pqkv/encode/residual.hpp>

#include "common/keygen.hpp"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <iterator>
#include <span>
#include <utility>
#include <vector>

namespace {

using pqkv::index_t;
constexpr index_t kv_heads = 8, q_heads = 32, dim = 128;

pqkv::rq_config rq(int stages, int bits, int splits = 1, int beam = 1)
{
  pqkv::rq_config c;
  c.dim = dim;
  c.stages = stages;
  c.bits = bits;
  c.splits = splits;
  c.beam = beam;
  return c;
}

void fill_random(float* p, std::size_t n, std::uint64_t stream, float gain)
{
  for (std::size_t i = 0; i < n; ++i) {
    p[i] = gain * static_cast<float>(pqkv::detail::random_unit(1, stream, i) - 0.5);
  }
}

void BM_rq_encode(benchmark::State& state)
{
  index_t const n = state.range(0);
  auto const cfg = rq(static_cast<int>(state.range(1)), 8, 1, static_cast<int>(state.range(2)));
  pqkv::host_tensor<float, 3> keys(kv_heads, n, dim);
  pqkv::host_tensor<float, 5> c(kv_heads, 1, cfg.stages, 256, dim);
  pqkv::host_tensor<std::uint8_t, 3> codes(kv_heads, n, cfg.codes_per_row());
  fill_random(keys.data(), keys.size(), 0, 1.f);
  fill_random(c.data(), c.size(), 1, 1.f);
  pqkv::cpu::rq_encoder const enc{cfg};
  for (auto _ : state) {
    enc.encode(keys.const_view(), c.const_view(), codes.view());
    benchmark::DoNotOptimize(codes.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * kv_heads * n * dim * index_t{sizeof(float)});
}
BENCHMARK(BM_rq_encode)
  ->ArgNames({"n", "stages", "beam"})
  ->Args({256, 8, 1})
  ->Args({64, 8, 4})
  ->Unit(benchmark::kMillisecond)
  ->UseRealTime();

/// Codes and codebooks of one decode benchmark.
template <class Code>
struct decode_data {
  pqkv::rq_config kcfg, vcfg;
  pqkv::host_tensor<float, 5> kc, vc;
  pqkv::host_tensor<Code, 3> kcodes, vcodes;
  pqkv::host_tensor<float, 2> q, out;
  std::vector<float> lse;

  decode_data(index_t n, pqkv::rq_config k, pqkv::rq_config v)
    : kcfg{std::move(k)}, vcfg{std::move(v)}, kc(kv_heads, 1, kcfg.stages, kcfg.ksub(), dim),
      vc(kv_heads, 1, vcfg.stages, vcfg.ksub(), dim), kcodes(kv_heads, n, kcfg.stages),
      vcodes(kv_heads, n, vcfg.stages), q(q_heads, dim), out(q_heads, dim), lse(q_heads)
  {
    fill_random(kc.data(), kc.size(), 2, 0.5f);
    fill_random(vc.data(), vc.size(), 3, 1.f);
    fill_random(q.data(), q.size(), 4, 1.f);
    for (std::size_t i = 0; i < kcodes.size(); ++i) {
      kcodes.data()[i] = static_cast<Code>(pqkv::detail::random_below(5, 0, i, std::uint64_t(kcfg.ksub())));
    }
    for (std::size_t i = 0; i < vcodes.size(); ++i) {
      vcodes.data()[i] = static_cast<Code>(pqkv::detail::random_below(6, 0, i, std::uint64_t(vcfg.ksub())));
    }
  }
};

template <class Code>
void code_attention_run(benchmark::State& state, pqkv::rq_config const& k, pqkv::rq_config const& v)
{
  index_t const n = state.range(0);
  decode_data<Code> d(n, k, v);
  for (auto _ : state) {
    pqkv::cpu::code_attention(d.q.const_view(), d.kcfg, d.kc.const_view(), d.kcodes.const_view(), d.vcfg,
                              d.vc.const_view(), d.vcodes.const_view(), n, d.out.view(), 0.f, std::span<float>{d.lse});
    benchmark::DoNotOptimize(d.out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * kv_heads * n *
                          (k.unpacked_bytes_per_row() + v.unpacked_bytes_per_row()));
}

/// Anchor: rebuild K and V (cpu::rq_reconstruct into buffers allocated
/// outside the loop), then a plain float attention loop over q heads.
template <class Code>
void reconstruct_attend_run(benchmark::State& state, pqkv::rq_config const& k, pqkv::rq_config const& v)
{
  index_t const n = state.range(0), r = q_heads / kv_heads;
  decode_data<Code> d(n, k, v);
  pqkv::host_tensor<float, 3> kr(kv_heads, n, dim), vr(kv_heads, n, dim);
  std::vector<float> logits(static_cast<std::size_t>(q_heads * n));
  float const scale = 1.f / std::sqrt(static_cast<float>(dim));
  for (auto _ : state) {
    pqkv::cpu::rq_reconstruct(d.kcfg, d.kc.const_view(), d.kcodes.const_view(), 0, kr.view());
    pqkv::cpu::rq_reconstruct(d.vcfg, d.vc.const_view(), d.vcodes.const_view(), 0, vr.view());
    auto const K = kr.const_view();
    auto const V = vr.const_view();
    auto const Q = d.q.const_view();
    auto const O = d.out.view();
    pqkv::cpu::parallel_for(q_heads, [&](index_t h) {
      index_t const g = h / r;
      float* s = logits.data() + h * n;
      float mx = -std::numeric_limits<float>::infinity();
      for (index_t t = 0; t < n; ++t) {
        float dot = 0.f;
        for (index_t i = 0; i < dim; ++i) { dot += Q(h, i) * K(g, t, i); }
        s[t] = scale * dot;
        mx = std::max(mx, s[t]);
      }
      float z = 0.f;
      float acc[dim] = {};
      for (index_t t = 0; t < n; ++t) {
        float const p = std::exp(s[t] - mx);
        z += p;
        for (index_t i = 0; i < dim; ++i) { acc[i] += p * V(g, t, i); }
      }
      for (index_t i = 0; i < dim; ++i) { O(h, i) = acc[i] / z; }
    });
    benchmark::DoNotOptimize(d.out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * kv_heads * n *
                          (k.unpacked_bytes_per_row() + v.unpacked_bytes_per_row()));
}

void BM_code_attention_8x8(benchmark::State& s) { code_attention_run<std::uint8_t>(s, rq(8, 8), rq(8, 8)); }
void BM_reconstruct_attend_8x8(benchmark::State& s) { reconstruct_attend_run<std::uint8_t>(s, rq(8, 8), rq(8, 8)); }
void BM_code_attention_vqkv(benchmark::State& s) { code_attention_run<std::uint16_t>(s, rq(56, 10), rq(16, 9)); }
void BM_reconstruct_attend_vqkv(benchmark::State& s)
{
  reconstruct_attend_run<std::uint16_t>(s, rq(56, 10), rq(16, 9));
}
BENCHMARK(BM_code_attention_8x8)->ArgName("n")->Arg(4096)->Arg(32768)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_reconstruct_attend_8x8)->ArgName("n")->Arg(4096)->Arg(32768)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_code_attention_vqkv)->ArgName("n")->Arg(4096)->Arg(32768)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_reconstruct_attend_vqkv)
  ->ArgName("n")
  ->Arg(4096)
  ->Arg(32768)
  ->Unit(benchmark::kMillisecond)
  ->UseRealTime();

// ---- quality on the synthetic keys ----

struct quality_case {
  bool residual;
  int a, bits, splits;  // residual: stages, bits, splits; PQ: m, bits
};
quality_case const quality_cases[] = {
  {false, 8, 8, 1},  {false, 16, 8, 1}, {false, 32, 8, 1},  // PQ: 8, 16, 32 B per row
  {true, 4, 8, 1},   {true, 8, 8, 1},   {true, 16, 4, 1},   // RQ: 4, 8, 8 B
  {true, 8, 8, 2},   {true, 16, 8, 1},  {true, 32, 8, 1},   // RQ: 16, 16, 32 B
};

pqkv::test::keygen_config quality_keygen()
{
  pqkv::test::keygen_config g;
  g.kv_heads = 2;
  g.q_per_kv = 4;
  g.dim = dim;
  g.tokens = 4096;
  return g;
}

/// Approximates rows [heads, tokens, dim] of x and of held-out rows y under
/// one configuration trained on x (a prefill codebook); returns bytes per row.
index_t approximate(quality_case const& qc, pqkv::host_tensor<float, 3> const& x, pqkv::host_tensor<float, 3>& out,
                    pqkv::host_tensor<float, 3> const& y, pqkv::host_tensor<float, 3>& out_y)
{
  index_t const heads = x.extent(0), tokens = x.extent(1);
  if (qc.residual) {
    auto cfg = rq(qc.a, qc.bits, qc.splits);
    cfg.max_iter = 15;
    pqkv::residual_codebook book{cfg, heads};
    pqkv::cpu::rq_trainer{cfg}.train(x.const_view(), book.centroids());
    pqkv::cpu::rq_encoder const enc{cfg};
    pqkv::host_tensor<std::uint8_t, 3> codes(heads, tokens, cfg.codes_per_row());
    enc.encode(x.const_view(), std::as_const(book).centroids(), codes.view());
    pqkv::cpu::rq_reconstruct(cfg, std::as_const(book).centroids(), codes.const_view(), 0, out.view());
    enc.encode(y.const_view(), std::as_const(book).centroids(), codes.view());
    pqkv::cpu::rq_reconstruct(cfg, std::as_const(book).centroids(), codes.const_view(), 0, out_y.view());
    return cfg.packed_bytes_per_row();
  }
  pqkv::pq_config cfg;
  cfg.dim = dim;
  cfg.m = qc.a;
  cfg.nbits = qc.bits;
  cfg.max_iter = 15;
  pqkv::codebook book{cfg, heads};
  pqkv::host_tensor<std::uint8_t, 3> codes(heads, tokens, cfg.m);
  pqkv::cpu::kmeans_trainer{cfg}.train(x.const_view(), book.centroids());
  pqkv::cpu::pq_encoder const enc{cfg};
  enc.encode(x.const_view(), std::as_const(book).centroids(), codes.view());
  pqkv::cpu::reconstruct(codes.const_view(), std::as_const(book).centroids(), out.view());
  enc.encode(y.const_view(), std::as_const(book).centroids(), codes.view());
  pqkv::cpu::reconstruct(codes.const_view(), std::as_const(book).centroids(), out_y.view());
  return cfg.m * cfg.nbits / 8;
}

double relative_mse(pqkv::host_tensor<float, 3> const& x, pqkv::host_tensor<float, 3> const& y)
{
  double num = 0, den = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    double const d = static_cast<double>(x.data()[i]) - y.data()[i];
    num += d * d;
    den += static_cast<double>(x.data()[i]) * x.data()[i];
  }
  return num / den;
}

void BM_rq_quality(benchmark::State& state)
{
  auto const& qc = quality_cases[state.range(0)];
  auto const g = quality_keygen();
  index_t const heads = g.kv_heads, tokens = g.tokens, steps = 8, sink = 4, window = 256;
  // the sequence: positions [0, tokens); held out: the next `tokens` positions
  auto const kv = pqkv::test::make_kv(g);
  pqkv::host_tensor<float, 3> k_held(heads, tokens, dim), v_held(heads, tokens, dim);
  pqkv::test::make_keys(g, tokens, k_held.view());
  pqkv::test::make_values(g, tokens, v_held.view());
  pqkv::host_tensor<float, 3> ka(heads, tokens, dim), va(heads, tokens, dim), kh(heads, tokens, dim),
    vh(heads, tokens, dim);
  index_t bytes = 0;
  for (auto _ : state) {
    bytes = approximate(qc, kv.keys, ka, k_held, kh) + approximate(qc, kv.values, va, v_held, vh);
  }
  // exact sink + window rows on top of the coded middle
  pqkv::host_tensor<float, 3> kw = ka, vw = va;
  for (index_t h = 0; h < heads; ++h) {
    for (index_t t = 0; t < tokens; ++t) {
      if (t >= sink && t < tokens - window) { continue; }
      for (index_t d = 0; d < dim; ++d) {
        kw.view()(h, t, d) = kv.keys.view()(h, t, d);
        vw.view()(h, t, d) = kv.values.view()(h, t, d);
      }
    }
  }
  double err_all = 0, err_win = 0;
  pqkv::host_tensor<float, 2> q(g.q_heads(), dim), dense(g.q_heads(), dim), approx(g.q_heads(), dim);
  for (index_t s = 0; s < steps; ++s) {
    pqkv::test::make_queries(g, s, tokens, q.view());
    pqkv::cpu::attention_dense(q.const_view(), kv.keys.const_view(), kv.values.const_view(), dense.view());
    pqkv::cpu::attention_dense(q.const_view(), ka.const_view(), va.const_view(), approx.view());
    err_all += pqkv::cpu::relative_output_error(approx.const_view(), dense.const_view()).mean / steps;
    pqkv::cpu::attention_dense(q.const_view(), kw.const_view(), vw.const_view(), approx.view());
    err_win += pqkv::cpu::relative_output_error(approx.const_view(), dense.const_view()).mean / steps;
  }
  state.SetLabel(qc.residual ? "rq" : "pq");
  state.counters["kv_bytes"] = static_cast<double>(bytes);
  state.counters["k_rel_mse"] = relative_mse(kv.keys, ka);
  state.counters["v_rel_mse"] = relative_mse(kv.values, va);
  state.counters["k_rel_mse_held_out"] = relative_mse(k_held, kh);
  state.counters["v_rel_mse_held_out"] = relative_mse(v_held, vh);
  state.counters["out_err_all_coded"] = err_all;
  state.counters["out_err_sink4_win256"] = err_win;
  state.counters["a"] = qc.a;
  state.counters["bits"] = qc.bits;
  state.counters["splits"] = qc.splits;
}
BENCHMARK(BM_rq_quality)
  ->ArgName("case")
  ->DenseRange(0, static_cast<int>(std::size(quality_cases)) - 1)
  ->Iterations(1)
  ->Unit(benchmark::kMillisecond)
  ->UseRealTime();

}  // namespace
