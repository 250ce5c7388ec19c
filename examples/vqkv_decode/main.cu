// SPDX-License-Identifier: Apache-2.0
// examples/vqkv_decode: one layer of a VQKV-style KV cache (arXiv 2603.16435)
// with Llama-3.1-8B attention shapes (32 q heads, 8 KV heads, d = 128, bf16)
// on the synthetic key generator (tests/common/keygen.hpp):
//   1. gpu::rq_trainer: residual codebooks of K and V, trained on the GPU
//      from the prefill (default 32K tokens);
//   2. gpu::rq_window: the prefill kept as sink + codes + local window; each
//      decode step appends its token, and the tokens leaving the window are
//      encoded on the device, a chunk at a time;
//   3. each step's attention: gpu::code_attention over the codes (K and V
//      never rebuilt), the example's bf16 kernel over the sink and window
//      (window_attention.cuh), gpu::merge_state of the two;
// all of a step captured in CUDA graphs and replayed for every decode step.
// It prints bytes per token, both compression ratios, the error of the
// output against dense attention over the original bf16 K and V, and the
// time per step. --quick is a smoke run whose checks set the exit status.
// docs/vqkv_decode.md explains the output.

#include "common/cuda_util.cuh"
#include "common/keygen.hpp"
#include "options.hpp"
#include "window_attention.cuh"

#include <pqkv/attend/code_attention.cuh>
#include <pqkv/attend/merge_state.cuh>
#include <pqkv/codebook/residual.cuh>
#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/decode/residual_reconstruct.hpp>
#include <pqkv/encode/residual_window.cuh>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <numeric>
#include <span>
#include <string>
#include <vector>

namespace vq {
namespace {

constexpr index_t kv_heads = 8, q_per_kv = 4, q_heads = kv_heads * q_per_kv, dim = 128;
constexpr int window_splits = 16;  // split-K of the window attention (<= local + chunk rows per head)
constexpr int dense_splits = 32;   // split-K of the dense reference (the whole sequence)

using pqkv::test::event_timer;
using pqkv::test::owned_stream;

template <class T>
pqkv::device_buffer<T> upload(std::vector<T> const& host)
{
  pqkv::device_buffer<T> d(host.size());
  PQKV_CUDA_TRY(cudaMemcpy(d.data(), host.data(), d.size_bytes(), cudaMemcpyHostToDevice));
  return d;
}

template <class T>
std::vector<T> download(T const* d, std::size_t n, cudaStream_t stream)
{
  std::vector<T> h(n);
  PQKV_CUDA_TRY(cudaMemcpyAsync(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  return h;
}

// ------------------------------------------------------------------ data

/// The layer's keys and values of every position (prefill and decode steps)
/// in bf16 [kv_heads, total, dim], and each step's queries [q_heads, dim].
struct layer_data {
  index_t prefill = 0, steps = 0, total = 0;
  std::vector<bf16> k, v;
  std::vector<float> q;  // [steps, q_heads, dim]
};

layer_data make_data(options const& o)
{
  pqkv::test::keygen_config cfg;
  cfg.kv_heads = kv_heads;
  cfg.q_per_kv = q_per_kv;
  cfg.dim = dim;
  cfg.tokens = o.tokens;
  cfg.seed = o.seed;
  layer_data d;
  d.prefill = o.tokens;
  d.steps = o.steps;
  d.total = o.tokens + o.steps;
  pqkv::host_tensor<float, 3> k(kv_heads, d.total, dim), v(kv_heads, d.total, dim);
  pqkv::test::make_keys(cfg, 0, k.view());
  pqkv::test::make_values(cfg, 0, v.view());
  d.k.resize(k.size());
  d.v.resize(v.size());
  pqkv::cpu::parallel_for(static_cast<index_t>(k.size() / dim), [&](index_t r) {
    for (index_t i = r * dim; i < (r + 1) * dim; ++i) {
      d.k[static_cast<std::size_t>(i)] = __float2bfloat16_rn(k.data()[i]);
      d.v[static_cast<std::size_t>(i)] = __float2bfloat16_rn(v.data()[i]);
    }
  });
  d.q.resize(static_cast<std::size_t>(d.steps * q_heads * dim));
  pqkv::cpu::parallel_for(d.steps, [&](index_t s) {
    pqkv::test::make_queries(cfg, s, d.prefill + s,
                             pqkv::make_view(d.q.data() + s * q_heads * dim, q_heads, dim));
  });
  return d;
}

// -------------------------------------------------------------- training

pqkv::rq_config make_config(options const& o, int stages, int bits)
{
  pqkv::rq_config c;
  c.dim = dim;
  c.splits = o.splits;
  c.stages = stages;
  c.bits = bits;
  c.max_iter = o.iters;
  c.seed = o.seed;
  c.init = pqkv::init_method::kmeans_plus_plus;
  return c;
}

struct trained {
  pqkv::device_buffer<float> centroids;
  pqkv::rq_centroids_view<float const> view;
  pqkv::rq_train_report report;
  double ms = 0;
};

/// Codebooks of one side (K or V) from the prefill rows of `rows`.
trained train(pqkv::rq_config const& cfg, bf16 const* rows, layer_data const& d, index_t cb_heads, cudaStream_t stream)
{
  pqkv::gpu::rq_trainer const trainer{cfg, {kv_heads, d.prefill}};
  pqkv::device_buffer<std::byte> ws(trainer.workspace_bytes());
  trained t;
  t.centroids = pqkv::device_buffer<float>(
    static_cast<std::size_t>(cb_heads * cfg.splits * cfg.stages * cfg.ksub() * cfg.dsub()));
  auto const c = pqkv::rq_centroids_view<float>{t.centroids.data(), cb_heads, index_t{cfg.splits},
                                                index_t{cfg.stages}, cfg.ksub(), cfg.dsub()};
  auto const keys = pqkv::make_strided_view<bf16 const, 3>(rows, {kv_heads, d.prefill, dim}, {d.total * dim, dim, 1});
  event_timer const timer{stream};
  t.ms = timer.ms([&] { trainer.train(keys, c, std::span<std::byte>{ws.data(), ws.size()}, stream); });
  t.report = trainer.report(std::span<std::byte const>{ws.data(), ws.size()}, stream);
  t.view = pqkv::as_const(c);
  return t;
}

// ----------------------------------------------------------------- checks

/// ||a - b|| / ||b|| and cos(a, b) of two dim-vectors.
struct vec_error {
  double rel = 0, cosine = 0;
};
vec_error compare(float const* a, float const* b)
{
  double d2 = 0, b2 = 0, a2 = 0, ab = 0;
  for (index_t i = 0; i < dim; ++i) {
    double const x = a[i], y = b[i];
    d2 += (x - y) * (x - y);
    b2 += y * y;
    a2 += x * x;
    ab += x * y;
  }
  return {std::sqrt(d2 / std::max(b2, 1e-300)), ab / std::max(std::sqrt(a2 * b2), 1e-300)};
}

/// Attention in double of one q head over explicit rows (float [rows, dim]).
void attend_double(float const* q, std::vector<float> const& k, std::vector<float> const& v, double* out)
{
  index_t const rows = static_cast<index_t>(k.size()) / dim;
  double const scale = 1.0 / std::sqrt(static_cast<double>(dim));
  std::vector<double> s(static_cast<std::size_t>(rows));
  double m = -INFINITY;
  for (index_t r = 0; r < rows; ++r) {
    double x = 0;
    for (index_t i = 0; i < dim; ++i) { x += static_cast<double>(q[i]) * k[static_cast<std::size_t>(r * dim + i)]; }
    s[static_cast<std::size_t>(r)] = x * scale;
    m = std::max(m, x * scale);
  }
  double l = 0;
  std::fill(out, out + dim, 0.0);
  for (index_t r = 0; r < rows; ++r) {
    double const p = std::exp(s[static_cast<std::size_t>(r)] - m);
    l += p;
    for (index_t i = 0; i < dim; ++i) { out[i] += p * v[static_cast<std::size_t>(r * dim + i)]; }
  }
  for (index_t i = 0; i < dim; ++i) { out[i] /= l; }
}

// -------------------------------------------------------------------- run

int run(options const& o)
{
  owned_stream const stream_owner;
  cudaStream_t const stream = stream_owner.get();
  cudaDeviceProp prop{};
  int device = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  PQKV_CUDA_TRY(cudaGetDeviceProperties(&prop, device));
  std::printf("vqkv_decode: %s; one layer, %lld q / %lld KV heads, d = %lld, bf16\n", prop.name,
              static_cast<long long>(q_heads), static_cast<long long>(kv_heads), static_cast<long long>(dim));
  std::printf("  prefill %lld tokens, %lld decode steps; sink %lld, local %lld, chunk %lld\n",
              static_cast<long long>(o.tokens), static_cast<long long>(o.steps), static_cast<long long>(o.sink),
              static_cast<long long>(o.local), static_cast<long long>(o.chunk));

  layer_data const d = make_data(o);
  auto const all_k = upload(d.k), all_v = upload(d.v);
  auto const all_q = upload(d.q);

  // ---- 1. codebooks ----
  auto const kcfg = make_config(o, o.key_stages, o.key_bits), vcfg = make_config(o, o.value_stages, o.value_bits);
  index_t const cb_heads = o.shared ? 1 : kv_heads;
  trained const tk = train(kcfg, all_k.data(), d, cb_heads, stream);
  trained const tv = train(vcfg, all_v.data(), d, cb_heads, stream);
  std::printf("\ncodebooks (%s, %d Lloyd iterations per stage, k-means++ init), trained on the GPU:\n",
              o.shared ? "one per layer" : "one per KV head", o.iters);
  for (auto const* side : {&tk, &tv}) {
    bool const key = side == &tk;
    auto const& cfg = key ? kcfg : vcfg;
    std::printf("  %s: %d stages x %lld codewords, splits %d: %.1f ms; relative MSE after stage 1 / last: %.4f / %.4f\n",
                key ? "K" : "V", cfg.stages, static_cast<long long>(cfg.ksub()), cfg.splits, side->ms,
                side->report.residual_mse.front() / side->report.initial_mse,
                side->report.residual_mse.back() / side->report.initial_mse);
  }

  // ---- 2. the window ----
  pqkv::rq_window_shape shape;
  shape.kv_heads = kv_heads;
  shape.dim = dim;
  shape.sink = o.sink;
  shape.local = o.local;
  shape.chunk = o.chunk;
  shape.capacity = d.total;
  pqkv::gpu::rq_window<bf16> window{shape, kcfg, tk.view, vcfg, tv.view};
  auto const prefill_rows = [&](pqkv::device_buffer<bf16> const& a) {
    return pqkv::make_strided_view<bf16 const, 3>(a.data(), {kv_heads, d.prefill, dim}, {d.total * dim, dim, 1});
  };
  auto const do_prefill = [&] { window.prefill(prefill_rows(all_k), prefill_rows(all_v), stream); };

  // ---- 3. one decode step: append, then attention from codes + window, merged ----
  pqkv::gpu::code_attention_limits limits;
  limits.max_tokens = shape.code_rows();
  limits.blocks_per_sm = o.blocks_per_sm;
  pqkv::gpu::code_attention const attention{kcfg, vcfg, q_heads, kv_heads, limits};
  pqkv::device_buffer<std::byte> attn_ws(attention.workspace_bytes());
  pqkv::device_buffer<float> q_now(static_cast<std::size_t>(q_heads * dim));
  pqkv::device_buffer<bf16> k_now(static_cast<std::size_t>(kv_heads * dim)), v_now(k_now.size());
  pqkv::device_buffer<float> out_c(q_now.size()), lse_c(q_heads), out_w(q_now.size()), lse_w(q_heads);
  pqkv::device_buffer<float> out(q_now.size()), lse(q_heads), out_ref(q_now.size()), lse_ref(q_heads);
  pqkv::device_buffer<float> part_v(static_cast<std::size_t>(dense_splits * q_heads * dim)),
    part_lse(static_cast<std::size_t>(dense_splits * q_heads));

  attend_args wa;
  wa.q = q_now.data();
  wa.q_heads = static_cast<int>(q_heads);
  wa.group = static_cast<int>(q_per_kv);
  wa.length = window.length().data();
  wa.coded = window.coded().data();
  wa.sink_k = window.sink_keys().data_handle();
  wa.sink_v = window.sink_values().data_handle();
  wa.ring_k = window.ring_keys().data_handle();
  wa.ring_v = window.ring_values().data_handle();
  wa.sink = shape.sink;
  wa.ring = shape.ring();
  attend_args da = wa;  // the dense reference: every token of the original rows
  da.all_k = all_k.data();
  da.all_v = all_v.data();
  da.capacity = d.total;

  auto const row3 = [](float* p) { return pqkv::make_strided_view<float, 3>(p, {1, q_heads, dim}, {q_heads * dim, dim, 1}); };
  auto const row2 = [](float* p) { return pqkv::make_strided_view<float, 2>(p, {1, q_heads}, {q_heads, 1}); };
  auto const append = [&] {
    auto const one = [&](bf16 const* p) { return pqkv::make_view<bf16 const>(p, kv_heads, 1, dim); };
    window.append(one(k_now.data()), one(v_now.data()), stream);
  };
  auto const attend_codes = [&] {
    attention(pqkv::make_strided_view<float const, 2>(q_now.data(), {q_heads, dim}, {dim, 1}), tk.view,
              window.key_codes(), tv.view, window.value_codes(), window.coded(),
              pqkv::make_view(out_c.data(), q_heads, dim), std::span<float>{lse_c.data(), lse_c.size()},
              std::span<std::byte>{attn_ws.data(), attn_ws.size()}, stream);
  };
  auto const attend_window = [&] {
    attend<row_set::window>(wa, window_splits, part_v.data(), part_lse.data(), out_w.data(), lse_w.data(), stream);
  };
  auto const merge = [&] {
    pqkv::gpu::merge_state<float>(pqkv::as_const(row3(out_w.data())), pqkv::as_const(row2(lse_w.data())),
                                  pqkv::as_const(row3(out_c.data())), pqkv::as_const(row2(lse_c.data())),
                                  row3(out.data()), row2(lse.data()), stream);
  };
  auto const attend_dense = [&] {
    attend<row_set::dense>(da, dense_splits, part_v.data(), part_lse.data(), out_ref.data(), lse_ref.data(), stream);
  };
  auto const load_step = [&](index_t s) {  // the step's query and new K, V row: the model's work, not timed
    PQKV_CUDA_TRY(cudaMemcpyAsync(q_now.data(), all_q.data() + s * q_heads * dim, q_now.size_bytes(),
                                  cudaMemcpyDeviceToDevice, stream));
    std::size_t const row = dim * sizeof(bf16), pitch = static_cast<std::size_t>(d.total) * row;
    PQKV_CUDA_TRY(cudaMemcpy2DAsync(k_now.data(), row, all_k.data() + (d.prefill + s) * dim, pitch, row, kv_heads,
                                    cudaMemcpyDeviceToDevice, stream));
    PQKV_CUDA_TRY(cudaMemcpy2DAsync(v_now.data(), row, all_v.data() + (d.prefill + s) * dim, pitch, row, kv_heads,
                                    cudaMemcpyDeviceToDevice, stream));
  };

  pqkv::test::captured_graph const append_graph{stream, append};
  pqkv::test::captured_graph const attend_graph{stream, [&] {
    attend_codes();
    attend_window();
    merge();
  }};

  // ---- accuracy pass: every step against dense attention ----
  do_prefill();
  double err_sum = 0, err_max = 0, cos_sum = 0, win_err_sum = 0;
  std::vector<float> last_out;
  for (index_t s = 0; s < d.steps; ++s) {
    load_step(s);
    append_graph.launch(stream);
    attend_graph.launch(stream);
    attend_dense();
    auto const got = download(out.data(), out.size(), stream), ref = download(out_ref.data(), out.size(), stream);
    auto const win = download(out_w.data(), out.size(), stream);
    for (index_t h = 0; h < q_heads; ++h) {
      auto const e = compare(got.data() + h * dim, ref.data() + h * dim);
      err_sum += e.rel;
      err_max = std::max(err_max, e.rel);
      cos_sum += e.cosine;
      win_err_sum += compare(win.data() + h * dim, ref.data() + h * dim).rel;
    }
    if (s + 1 == d.steps) { last_out = got; }
  }
  double const samples = static_cast<double>(d.steps * q_heads);
  index_t const n_final = d.total, e_final = shape.coded_count(n_final);
  index_t n_dev = 0, e_dev = 0;
  PQKV_CUDA_TRY(cudaMemcpy(&n_dev, window.length().data(), sizeof(index_t), cudaMemcpyDeviceToHost));
  PQKV_CUDA_TRY(cudaMemcpy(&e_dev, window.coded().data(), sizeof(index_t), cudaMemcpyDeviceToHost));

  // ---- timing pass: the same steps, graph replays timed by events ----
  do_prefill();
  event_timer const timer{stream};
  std::vector<double> t_append, t_attend;
  for (index_t s = 0; s < d.steps; ++s) {
    load_step(s);
    t_append.push_back(timer.ms([&] { append_graph.launch(stream); }) * 1e3);
    t_attend.push_back(timer.ms([&] { attend_graph.launch(stream); }) * 1e3);
  }
  // Components at the final length (state is not changed by attention).
  auto const median_us = [&](auto&& work) {
    std::vector<double> t;
    for (int r = 0; r < 21; ++r) { t.push_back(timer.ms(work) * 1e3); }
    return pqkv::test::median(t);
  };
  double const us_codes = median_us(attend_codes), us_window = median_us(attend_window), us_merge = median_us(merge);
  double const us_dense = median_us(attend_dense);
  double const append_mean = std::accumulate(t_append.begin(), t_append.end(), 0.0) / static_cast<double>(d.steps);
  double const append_max = *std::max_element(t_append.begin(), t_append.end());
  std::vector<double> step_us(t_append.size());
  for (std::size_t i = 0; i < step_us.size(); ++i) { step_us[i] = t_append[i] + t_attend[i]; }
  double const step_mean = std::accumulate(step_us.begin(), step_us.end(), 0.0) / static_cast<double>(d.steps);
  double const attend_median = pqkv::test::median(t_attend);

  // ---- bytes ----
  double const code_bytes = static_cast<double>(kcfg.packed_bytes_per_row() + vcfg.packed_bytes_per_row());
  double const fp16_bytes = 2.0 * dim * 2;
  double const vqkv_ratio = 1.0 - static_cast<double>(kcfg.code_bits_per_row() + vcfg.code_bits_per_row()) /
                                    (2.0 * static_cast<double>(dim) * 16);
  index_t const window_rows = std::min(n_final, o.sink) + (n_final - std::min(n_final, o.sink) - e_final);
  double const held = static_cast<double>(kv_heads) *
                        (static_cast<double>(window_rows) * fp16_bytes + static_cast<double>(e_final) * code_bytes) +
                      static_cast<double>(kcfg.codebook_bytes(cb_heads) + vcfg.codebook_bytes(cb_heads));
  double const dense_bytes = static_cast<double>(kv_heads * n_final) * fp16_bytes;

  std::printf("\nbytes per token and KV head: K %lld + V %lld code bytes (packed) vs %.0f bf16\n",
              static_cast<long long>(kcfg.packed_bytes_per_row()), static_cast<long long>(vcfg.packed_bytes_per_row()),
              fp16_bytes);
  std::printf("  compression as VQKV counts it (code bits only): %.1f%%\n", 100.0 * vqkv_ratio);
  std::printf("  all-inclusive at %lld tokens (sink + window in bf16, codebooks counted): %.1f%% (%.1f of %.1f MiB)\n",
              static_cast<long long>(n_final), 100.0 * (1.0 - held / dense_bytes), held / 1048576.0,
              dense_bytes / 1048576.0);
  std::printf("\nerror of each step's attention output vs dense attention on the original bf16 K, V (%lld steps x %lld q heads):\n",
              static_cast<long long>(d.steps), static_cast<long long>(q_heads));
  std::printf("  relative L2: mean %.4f, max %.4f; cosine: mean %.5f\n", err_sum / samples, err_max,
              cos_sum / samples);
  std::printf("  sink + window only (the coded tokens dropped): relative L2 mean %.4f\n", win_err_sum / samples);
  std::printf("\ntime per decode step (CUDA graphs, events; %lld steps):\n", static_cast<long long>(d.steps));
  std::printf("  step (append + attention): mean %.1f us\n", step_mean);
  std::printf("  append: mean %.1f us, max %.1f us (a chunk of %lld tokens encoded every %lld steps)\n", append_mean,
              append_max, static_cast<long long>(o.chunk), static_cast<long long>(o.chunk));
  std::printf("  attention: median %.1f us; at %lld tokens: codes %.1f us (LUT in %s), window %.1f us, merge %.1f us\n",
              attend_median, static_cast<long long>(n_final), us_codes,
              attention.lut_in_shared_memory() ? "shared memory" : "the workspace", us_window, us_merge);
  std::printf("  the example's dense bf16 kernel over all %lld tokens: %.1f us (a reference, not a tuned kernel)\n",
              static_cast<long long>(n_final), us_dense);

  if (!o.check) { return 0; }
  // ---- checks ----
  int failed = 0;
  auto check = [&](bool ok, std::string const& what) {
    std::printf("  [%s] %s\n", ok ? "pass" : "FAIL", what.c_str());
    failed += ok ? 0 : 1;
  };
  std::printf("\nchecks:\n");
  check(n_dev == n_final && e_dev == e_final, "window length " + std::to_string(n_dev) + " and coded count " +
                                                std::to_string(e_dev) + " follow the contract");
  bool monotone = true;
  for (auto const* side : {&tk, &tv}) {
    double prev = side->report.initial_mse;
    for (double m : side->report.residual_mse) {
      monotone = monotone && m <= prev * (1 + 1e-9);
      prev = m;
    }
  }
  check(monotone, "training error does not increase with stages");
  check(err_sum < win_err_sum, "the codes carry information: error below that of dropping the coded tokens");
  // Composition: the last output equals double-precision attention over the
  // sink and window rows plus the coded rows rebuilt on the CPU.
  {
    index_t const nk = kcfg.codes_per_row(), nv = vcfg.codes_per_row();
    pqkv::host_tensor<std::uint8_t, 3> kc(kv_heads, shape.code_rows(), nk), vc(kv_heads, shape.code_rows(), nv);
    PQKV_CUDA_TRY(cudaMemcpy(kc.data(), window.key_codes().data_handle(), kc.size(), cudaMemcpyDeviceToHost));
    PQKV_CUDA_TRY(cudaMemcpy(vc.data(), window.value_codes().data_handle(), vc.size(), cudaMemcpyDeviceToHost));
    auto const hkc = download(tk.centroids.data(), tk.centroids.size(), stream);
    auto const hvc = download(tv.centroids.data(), tv.centroids.size(), stream);
    auto const cview = [&](std::vector<float> const& c, pqkv::rq_config const& cfg) {
      return pqkv::rq_centroids_view<float const>{c.data(), cb_heads, index_t{cfg.splits}, index_t{cfg.stages},
                                                  cfg.ksub(), cfg.dsub()};
    };
    pqkv::host_tensor<float, 3> kr(kv_heads, e_final, dim), vr(kv_heads, e_final, dim);
    pqkv::cpu::rq_reconstruct(kcfg, cview(hkc, kcfg), kc.const_view(), 0, kr.view());
    pqkv::cpu::rq_reconstruct(vcfg, cview(hvc, vcfg), vc.const_view(), 0, vr.view());
    double worst = 0;
    for (index_t g = 0; g < kv_heads; ++g) {
      std::vector<float> rk, rv;
      for (index_t p = 0; p < n_final; ++p) {
        bool const coded = p >= o.sink && p < o.sink + e_final;
        for (index_t i = 0; i < dim; ++i) {
          auto const at = static_cast<std::size_t>((g * d.total + p) * dim + i);
          rk.push_back(coded ? kr.view()(g, p - o.sink, i) : __bfloat162float(d.k[at]));
          rv.push_back(coded ? vr.view()(g, p - o.sink, i) : __bfloat162float(d.v[at]));
        }
      }
      for (index_t j = 0; j < q_per_kv; ++j) {
        index_t const h = g * q_per_kv + j;
        std::vector<double> want(static_cast<std::size_t>(dim));
        attend_double(d.q.data() + ((d.steps - 1) * q_heads + h) * dim, rk, rv, want.data());
        std::vector<float> wf(want.begin(), want.end());
        worst = std::max(worst, compare(last_out.data() + h * dim, wf.data()).rel);
      }
    }
    char buf[160];
    std::snprintf(buf, sizeof(buf),
                  "the last output equals double attention over sink + rebuilt codes + window (worst head %.2e <= 1e-3)",
                  worst);
    check(worst <= 1e-3, buf);
  }
  std::printf("%s\n", failed == 0 ? "all checks passed" : "CHECKS FAILED");
  return failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace vq

int main(int argc, char** argv)
{
  try {
    vq::options o;
    if (!vq::parse(argc, argv, o)) {
      vq::print_usage(stdout);
      return 0;
    }
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      std::fprintf(stderr, "vqkv_decode: no CUDA device; this example needs a GPU\n");
      return 2;
    }
    return vq::run(o);
  } catch (std::exception const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}
