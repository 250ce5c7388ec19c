// SPDX-License-Identifier: Apache-2.0
// examples/sale_prefill: SALE block-sparse prefill (arXiv 2505.24179) of one
// layer with Llama-3.1-8B attention shapes (32 q heads, 8 KV heads, d = 128,
// bf16) on a synthetic prompt (default 64K tokens) with planted needles:
//   1. gpu::tau_calibrator: per-head tau for the error bound theta on the
//      prompt's first tokens (SALE's halving search, dense reference once);
//   2. gpu::sale_mask: the mask of the whole prompt with those taus (centred
//      4-bit quantization, INT8 tensor-core estimate, keep rule);
//   3. gpu::block_sparse_attention under the mask, and its dense mode;
// then per head and overall: density, the sparse output's error against the
// dense one, needle recall, and CUDA-event times of each stage. --quick is
// a smoke run whose pass/fail checks set the exit status.
// docs/sale_prefill.md explains the output.

#include "common/cuda_util.cuh"
#include "metrics.cuh"
#include "options.hpp"
#include "prompt.hpp"

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/parallel.hpp>
#include <pqkv/sparse/block_sparse_attention.cuh>
#include <pqkv/sparse/calibrate.cuh>
#include <pqkv/sparse/sale_mask.cuh>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace sp {
namespace {

// SALE's configuration, which is pqkv's default: 64-row q blocks, 32-key
// blocks, the first 32 keys and the 128 keys before a q block's end always
// kept, the 4-bit grid with one scale per token.
constexpr pqkv::sparse_config sale_config{};
constexpr pqkv::quant_config sale_quant{};

// ---------------------------------------------------------------- device data

using pqkv::test::event_timer;
using pqkv::test::owned_stream;

/// The median of `reps` runs of `work` timed by `timer`.
template <class F>
double median_ms(event_timer const& timer, int reps, F&& work)
{
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) { t.push_back(timer.ms(work)); }
  std::sort(t.begin(), t.end());
  return t.size() % 2 == 1 ? t[t.size() / 2] : 0.5 * (t[t.size() / 2 - 1] + t[t.size() / 2]);
}

template <class T>
pqkv::device_buffer<T> upload(std::vector<T> const& host, cudaStream_t stream)
{
  pqkv::device_buffer<T> d(host.size());
  PQKV_CUDA_TRY(cudaMemcpyAsync(d.data(), host.data(), d.size_bytes(), cudaMemcpyHostToDevice, stream));
  return d;
}

/// The prompt on the device, and views of its first n tokens (the whole
/// prompt, or the calibration slice: the same memory, the token stride kept).
struct device_prompt {
  index_t tokens = 0;
  pqkv::device_buffer<bf16> q, k, v;

  device_prompt(prompt const& p, cudaStream_t stream)
    : tokens{p.cfg.tokens}, q{upload(p.q, stream)}, k{upload(p.k, stream)}, v{upload(p.v, stream)}
  {
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));  // the host vectors may go after this
  }

  [[nodiscard]] pqkv::kv_view<bf16 const> first(pqkv::device_buffer<bf16> const& x, index_t heads, index_t n) const
  {
    return pqkv::make_strided_view<bf16 const, 3>(x.data(), {heads, n, head_dim}, {tokens * head_dim, head_dim, 1});
  }
  [[nodiscard]] pqkv::kv_view<bf16 const> queries(index_t n) const { return first(q, q_heads, n); }
  [[nodiscard]] pqkv::kv_view<bf16 const> keys(index_t n) const { return first(k, kv_heads, n); }
  [[nodiscard]] pqkv::kv_view<bf16 const> values(index_t n) const { return first(v, kv_heads, n); }
};

/// cu_seqlens {0, n} of a one-sequence batch, on the device.
pqkv::device_buffer<std::int32_t> one_sequence(index_t n, cudaStream_t stream)
{
  return upload(std::vector<std::int32_t>{0, static_cast<std::int32_t>(n)}, stream);
}

std::span<std::int32_t const> const_span(pqkv::device_buffer<std::int32_t> const& b)
{
  return {b.data(), b.size()};
}

pqkv::gpu::sale_dims dims_of(index_t n) { return {1, n, q_heads, kv_heads, head_dim, n}; }

// ---------------------------------------------------------------- stages

/// Step 1: per-head tau on the prompt's first `n` tokens.
struct calibration {
  pqkv::calibration_result result;
  double ms = 0;
};

calibration calibrate(device_prompt const& dp, index_t n, double theta, event_timer const& timer, cudaStream_t stream)
{
  pqkv::gpu::tau_calibrator<bf16> const cal{dims_of(n), sale_config, sale_quant};
  pqkv::device_buffer<std::byte> workspace(cal.workspace_bytes());
  auto const cu = one_sequence(n, stream);
  calibration c;
  c.ms = timer.ms([&] {
    c.result = cal(dp.queries(n), dp.keys(n), dp.values(n), const_span(cu), theta, pqkv::calibration_options{},
                   workspace.span(), stream);
  });
  return c;
}

/// Step 2: the bit mask of the whole prompt under the calibrated taus.
struct mask_run {
  pqkv::mask_shape shape;
  pqkv::device_buffer<std::uint32_t> bits;  // [1, q_heads, q_blocks, words]
  std::vector<double> density;              // [q_heads]: kept / causal blocks
  double ms = 0;                            // quantize + estimate + keep rule, median

  [[nodiscard]] pqkv::view<std::uint32_t const, 4> view() const
  {
    return pqkv::make_view(static_cast<std::uint32_t const*>(bits.data()), shape.batch, shape.q_heads,
                           shape.q_blocks, shape.words);
  }
};

mask_run build_mask(device_prompt const& dp, std::vector<float> const& tau, int reps, event_timer const& timer,
                    cudaStream_t stream)
{
  index_t const n = dp.tokens;
  pqkv::gpu::sale_mask<bf16> const op{dims_of(n), sale_config, sale_quant};
  mask_run r{op.shape(), pqkv::device_buffer<std::uint32_t>(static_cast<std::size_t>(pqkv::bitmask_size(op.shape()))),
             std::vector<double>(static_cast<std::size_t>(q_heads)), 0};
  pqkv::device_buffer<float> dtau(tau.size());
  pqkv::device_buffer<double> ddensity(tau.size());
  pqkv::device_buffer<std::byte> workspace(op.workspace_bytes());
  auto const cu = one_sequence(n, stream);
  op.load_tau(tau, dtau.span(), stream);
  auto const bits = pqkv::make_view(r.bits.data(), r.shape.batch, r.shape.q_heads, r.shape.q_blocks, r.shape.words);
  // The calibration ran these kernels already: no warm-up call needed.
  r.ms = median_ms(timer, reps, [&] {
    op(dp.queries(n), dp.keys(n), const_span(cu), std::span<float const>{dtau.data(), dtau.size()}, bits,
       ddensity.span(), workspace.span(), stream);
  });
  PQKV_CUDA_TRY(cudaMemcpyAsync(r.density.data(), ddensity.data(), ddensity.size_bytes(), cudaMemcpyDeviceToHost, stream));
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  return r;
}

/// Step 3: the sparse attention under the mask and the dense reference.
struct attention_run {
  pqkv::device_buffer<float> sparse, dense;  // [q_heads, tokens, d]
  double sparse_ms = 0, dense_ms = 0;        // medians
  float scale = 0;                           // the logit scale in use
};

attention_run attend(device_prompt const& dp, mask_run const& mask, int reps, event_timer const& timer,
                     cudaStream_t stream)
{
  index_t const n = dp.tokens;
  pqkv::gpu::block_sparse_attention<bf16> const attn{dims_of(n), sale_config};
  auto const rows = static_cast<std::size_t>(q_heads * n * head_dim);
  attention_run r{pqkv::device_buffer<float>(rows), pqkv::device_buffer<float>(rows), 0, 0, attn.scale()};
  auto const cu = one_sequence(n, stream);
  pqkv::kv_view<float> const sparse_out{pqkv::make_view(r.sparse.data(), q_heads, n, head_dim)};
  pqkv::kv_view<float> const dense_out{pqkv::make_view(r.dense.data(), q_heads, n, head_dim)};
  r.sparse_ms = median_ms(timer, reps, [&] {
    attn(dp.queries(n), dp.keys(n), dp.values(n), const_span(cu), mask.view(), sparse_out, stream);
  });
  r.dense_ms = median_ms(timer, reps, [&] {
    attn.dense(dp.queries(n), dp.keys(n), dp.values(n), const_span(cu), dense_out, stream);
  });
  return r;
}

// ---------------------------------------------------------------- quality

/// Needle rows of one q head whose needle lies outside the always-kept sink
/// and local blocks ("far"): how many, how many of them concentrate (exact
/// attention puts >= needle_share on the needle token), and how many of each
/// have the needle's key block kept by the mask.
struct needle_counts {
  index_t far = 0, far_kept = 0, concentrated = 0, concentrated_kept = 0;
};

struct needle_report {
  std::vector<needle_counts> per_head;  // [q_heads]
  std::vector<float> shares;            // exact needle-token shares of the far needle rows
};

needle_report check_needles(prompt const& p, device_prompt const& dp, mask_run const& mask, float scale,
                            double needle_share, cudaStream_t stream)
{
  index_t const n = p.cfg.tokens;
  auto const& m = mask.shape;
  std::vector<std::uint32_t> bits(mask.bits.size());
  PQKV_CUDA_TRY(cudaMemcpyAsync(bits.data(), mask.bits.data(), mask.bits.size_bytes(), cudaMemcpyDeviceToHost, stream));
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  std::vector<kernels::needle_probe> probes;
  for (needle_row const& r : p.needles) {
    index_t const qb = r.row / sale_config.block_q, kb = r.pos / sale_config.block_k;
    if (pqkv::forced_block(sale_config, n, qb, kb)) { continue; }  // kept whatever the estimate says
    for (index_t j = 0; j < q_per_kv; ++j) {
      probes.push_back({static_cast<std::int32_t>(r.group * q_per_kv + j), static_cast<std::int32_t>(r.row),
                        static_cast<std::int32_t>(r.pos)});
    }
  }
  needle_report rep{std::vector<needle_counts>(static_cast<std::size_t>(q_heads)), {}};
  rep.shares = needle_shares(dp.q.data(), dp.k.data(), n, static_cast<int>(q_per_kv), scale, probes, stream);
  for (std::size_t i = 0; i < probes.size(); ++i) {
    auto const& pr = probes[i];
    index_t const qb = pr.row / sale_config.block_q, kb = pr.pos / sale_config.block_k;
    std::uint32_t const word = bits[static_cast<std::size_t>((pr.head * m.q_blocks + qb) * m.words + kb / 32)];
    bool const kept = ((word >> (kb % 32)) & 1u) != 0;
    bool const concentrated = rep.shares[i] >= needle_share;
    auto& c = rep.per_head[static_cast<std::size_t>(pr.head)];
    c.far += 1;
    c.far_kept += kept;
    c.concentrated += concentrated;
    c.concentrated_kept += concentrated && kept;
  }
  return rep;
}

// ---------------------------------------------------------------- report

double ratio(index_t a, index_t b) { return b > 0 ? static_cast<double>(a) / static_cast<double>(b) : 1.0; }

double mean_of(std::vector<double> const& x)
{
  double s = 0;
  for (double v : x) { s += v; }
  return x.empty() ? 0.0 : s / static_cast<double>(x.size());
}

double max_of(std::vector<double> const& x) { return x.empty() ? 0.0 : *std::max_element(x.begin(), x.end()); }

std::string tau_label(float tau)
{
  if (tau == 0.f) { return "0 (dense)"; }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g", static_cast<double>(tau));
  return buf;
}

void print_header(options const& o, prompt const& p, double gen_s)
{
  cudaDeviceProp prop{};
  int dev = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&dev));
  PQKV_CUDA_TRY(cudaGetDeviceProperties(&prop, dev));
  std::printf("sale_prefill: SALE block-sparse prefill, one layer, Llama-3.1-8B attention shapes (32 q heads, 8 KV heads, d=128, bf16)\n");
  std::printf("  device: %s\n", prop.name);
  std::printf("  prompt: %lld tokens from tests/common/keygen.hpp, seed %llu (RoPE theta 500000 with Llama 3.1 scaling, rank-24\n"
              "          keys with a large mean and 4 outlier channels, 4 sinks, topic clumps, %lld needles per KV head);\n"
              "          %zu query rows (x 4 q heads) aim at a needle (--needle-frac %.4g, --query-span %lld);"
              " generated on %d host threads in %.1f s\n",
              static_cast<long long>(o.tokens), static_cast<unsigned long long>(o.seed), static_cast<long long>(o.needles),
              p.needles.size(), o.needle_frac, static_cast<long long>(o.query_span), pqkv::cpu::num_threads(), gen_s);
  std::printf("  mask: gpu::sale_mask, Bq %lld, Bk %lld, sink %lld, local %lld, 4-bit grid (INT8 MMA), one scale per token\n",
              static_cast<long long>(sale_config.block_q), static_cast<long long>(sale_config.block_k),
              static_cast<long long>(sale_config.sink), static_cast<long long>(sale_config.local));
  std::printf("  calibration: gpu::tau_calibrator, theta %.4g (mean row L1) on the first %lld tokens; tau from 0.008, halved, < 1e-4: dense\n",
              o.theta, static_cast<long long>(o.calib_tokens));
  std::printf("  attention: gpu::block_sparse_attention (correctness-first CUDA-core kernel) under the mask, and its dense mode\n");
}

struct summary {
  double density = 0, calib_density = 0;
  double l1_mean = 0, l1_max = 0, rel_l2_mean = 0, rel_l2_max = 0, calib_err_max = 0;
  needle_counts needles;
  double median_share = 0;
};

summary print_heads(calibration const& cal, mask_run const& mask, std::vector<error_sums> const& errors, index_t tokens,
                    needle_report const& needles)
{
  std::printf("\nper q head (density = kept / causal blocks; errors of the sparse output vs dense, whole prompt):\n");
  std::printf("  head kv  tau         | calib: error  density | density   row L1   rel L2 | far needle rows: kept / concentrated, kept / all\n");
  std::vector<double> l1(errors.size()), l2(errors.size());
  summary s;
  for (std::size_t h = 0; h < errors.size(); ++h) {
    auto const& e = errors[h];
    l1[h] = e.l1 / static_cast<double>(tokens);
    l2[h] = e.ref2 > 0 ? std::sqrt(e.diff2 / e.ref2) : 0.0;
    auto const& c = needles.per_head[h];
    std::printf("  %4zu %2zu  %-11s | %12.4f  %7.4f | %7.4f  %7.4f  %7.4f | %4lld / %-4lld  %4lld / %-4lld\n", h,
                h / static_cast<std::size_t>(q_per_kv), tau_label(cal.result.tau[h]).c_str(), cal.result.error[h],
                cal.result.density[h], mask.density[h], l1[h], l2[h], static_cast<long long>(c.concentrated_kept),
                static_cast<long long>(c.concentrated), static_cast<long long>(c.far_kept),
                static_cast<long long>(c.far));
    s.needles.far += c.far;
    s.needles.far_kept += c.far_kept;
    s.needles.concentrated += c.concentrated;
    s.needles.concentrated_kept += c.concentrated_kept;
  }
  // One sequence: every head has the same causal blocks, so the mean of the
  // heads' densities is the density of the whole layer.
  s.density = mean_of(mask.density);
  s.calib_density = mean_of(cal.result.density);
  s.l1_mean = mean_of(l1);
  s.l1_max = max_of(l1);
  s.rel_l2_mean = mean_of(l2);
  s.rel_l2_max = max_of(l2);
  s.calib_err_max = max_of(cal.result.error);
  if (!needles.shares.empty()) {
    std::vector<float> sh = needles.shares;
    std::nth_element(sh.begin(), sh.begin() + static_cast<std::ptrdiff_t>(sh.size() / 2), sh.end());
    s.median_share = sh[sh.size() / 2];
  }
  return s;
}

void print_summary(options const& o, summary const& s, calibration const& cal, mask_run const& mask,
                   attention_run const& att)
{
  std::printf("\nsummary (%lld tokens, taus from the first %lld):\n", static_cast<long long>(o.tokens),
              static_cast<long long>(o.calib_tokens));
  std::printf("  density: %.4f of the causal blocks kept (%.1f%% skipped); on the calibration slice %.4f\n", s.density,
              100.0 * (1.0 - s.density), s.calib_density);
  std::printf("  error vs dense: mean row L1 %.4f mean, %.4f worst head (theta %.4g; calibration slice worst %.4f);"
              " relative L2 %.5f mean, %.5f worst head\n",
              s.l1_mean, s.l1_max, o.theta, s.calib_err_max, s.rel_l2_mean, s.rel_l2_max);
  std::printf("  needles: %lld far needle (row, q head) pairs, %lld concentrated (exact attention share of the needle token >= %.2g;"
              " median share %.3f);\n"
              "           kept: concentrated %lld / %lld (recall %.4f), all far %lld / %lld (recall %.4f)\n",
              static_cast<long long>(s.needles.far), static_cast<long long>(s.needles.concentrated), o.needle_share,
              s.median_share, static_cast<long long>(s.needles.concentrated_kept),
              static_cast<long long>(s.needles.concentrated), ratio(s.needles.concentrated_kept, s.needles.concentrated),
              static_cast<long long>(s.needles.far_kept), static_cast<long long>(s.needles.far),
              ratio(s.needles.far_kept, s.needles.far));
  std::printf("  times (ms, CUDA events, median of %d): quantize+mask %.3f | sparse attention %.3f | dense attention %.3f"
              " | calibration %.3f (once, %lld tokens)\n",
              o.reps, mask.ms, att.sparse_ms, att.dense_ms, cal.ms, static_cast<long long>(o.calib_tokens));
  std::printf("  mask + sparse = %.3f of dense (%.2fx faster); the mask alone %.1f%% of dense\n",
              (mask.ms + att.sparse_ms) / att.dense_ms, att.dense_ms / (mask.ms + att.sparse_ms),
              100.0 * mask.ms / att.dense_ms);
}

/// The --check criteria; returns true when all pass.
bool print_checks(options const& o, summary const& s)
{
  struct check {
    std::string what;
    bool pass;
  };
  std::vector<check> checks;
  char buf[256];
  std::snprintf(buf, sizeof(buf), "calibrated error <= theta on the slice, every head (worst %.4f <= %.4g)",
                s.calib_err_max, o.theta);
  checks.push_back({buf, s.calib_err_max <= o.theta});
  // A concentrated needle token carries at least needle_share (0.1) of its
  // row's exact attention, so its relative score (mass over the sink and
  // local keys only) is at least that: 12x above the largest tau (0.008),
  // room for the 4-bit estimate's error (~0.7 in log units, rms).
  std::snprintf(buf, sizeof(buf), "needle recall 1.0 over the concentrated far needle rows (%lld / %lld, at least one)",
                static_cast<long long>(s.needles.concentrated_kept), static_cast<long long>(s.needles.concentrated));
  checks.push_back({buf, s.needles.concentrated > 0 && s.needles.concentrated_kept == s.needles.concentrated});
  // The taus bound the error on the slice only. The keep rule is the same at
  // every position, but a row at position t has ~t / Bk candidate blocks, so
  // the mass it drops, and its error, grows at most about in proportion to t.
  // A row error e(t) = a t with mean a c / 2 <= theta over the slice's c rows
  // has mean a n / 2 <= theta n / c over the prompt's n: the allowance.
  double const bound = o.theta * static_cast<double>(o.tokens) / static_cast<double>(o.calib_tokens);
  std::snprintf(buf, sizeof(buf),
                "mean row L1 over the whole prompt <= theta x tokens / calib-tokens, every head (worst %.4f <= %.4g)",
                s.l1_max, bound);
  checks.push_back({buf, s.l1_max <= bound});
  if (o.theta > 0) {
    std::snprintf(buf, sizeof(buf), "the mask skips blocks (density %.4f < 1)", s.density);
    checks.push_back({buf, s.density < 1.0});
  }
  bool all = true;
  std::printf("\nchecks%s:\n", o.check ? "" : " (informative: --check or --quick makes them set the exit status)");
  for (auto const& c : checks) {
    std::printf("  %s  %s\n", c.pass ? "PASS" : "FAIL", c.what.c_str());
    all = all && c.pass;
  }
  std::printf("%s\n", all ? "all checks passed" : "some checks FAILED");
  return all;
}

int run(options const& o)
{
  auto const t0 = std::chrono::steady_clock::now();
  prompt const p = make_prompt(prompt_config(o.tokens, o.seed, o.needles, o.needle_frac), o.query_span);
  double const gen_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  print_header(o, p, gen_s);
  std::fflush(stdout);

  owned_stream const owned;
  cudaStream_t const stream = owned.get();
  event_timer const timer{stream};
  device_prompt const dp{p, stream};

  calibration const cal = calibrate(dp, o.calib_tokens, o.theta, timer, stream);
  mask_run const mask = build_mask(dp, cal.result.tau, o.reps, timer, stream);
  attention_run const att = attend(dp, mask, o.reps, timer, stream);

  auto const errors = output_errors(att.sparse.data(), att.dense.data(), q_heads, o.tokens, head_dim, stream);
  auto const needles = check_needles(p, dp, mask, att.scale, o.needle_share, stream);
  summary const s = print_heads(cal, mask, errors, o.tokens, needles);
  print_summary(o, s, cal, mask, att);
  bool const pass = print_checks(o, s);
  std::fflush(stdout);
  return o.check && !pass ? 1 : 0;
}

}  // namespace
}  // namespace sp

int main(int argc, char** argv)
{
  sp::options o;
  try {
    if (!sp::parse(argc, argv, o)) {
      sp::print_usage(stdout);
      return 0;
    }
    int visible = 0;
    cudaError_t const st = cudaGetDeviceCount(&visible);
    if (st != cudaSuccess || visible == 0) {
      std::fprintf(stderr, "sale_prefill: no usable CUDA device (%s)\n",
                   st != cudaSuccess ? cudaGetErrorString(st) : "none visible");
      return 2;
    }
    return sp::run(o);
  } catch (std::exception const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}
