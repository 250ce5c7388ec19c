// SPDX-License-Identifier: Apache-2.0
// Quality of SALE block-sparse prefill masks against dense causal attention,
// on the CPU, for one synthetic prompt (tests/common/keygen.hpp, as
// examples/sale_prefill/prompt.hpp builds it, but in float).
//
// For each estimator (SALE 4-bit and 8-bit per token, the mean-pooled
// baseline) and each tau of its sweep (the same tau for every q head), it
// builds the mask with `pqkv::cpu::build_mask`, runs
// `pqkv::cpu::block_sparse_attention` under it and compares with the dense
// output (every causal block kept): per q head the density (kept / causal
// blocks), the mean row L1 error (`mean_row_l1`), the relative L2 error
// ||o - o_dense||_F / ||o_dense||_F over all rows, and needle recall. Then it
// compares the estimators at equal density by linear interpolation of the
// other curve, and 4-bit with 8-bit at equal tau and at equal density.
//
// Needle rows (row t, KV group g, needle position p < t) are the rows whose
// generator step aims at a planted needle (`keygen::query_target`). A needle
// row is "far" when p's key block is not forced (not sink, not local) for
// t's q block; forced blocks are kept whatever the estimate says, so recall
// is counted over far rows only. Headline needle recall: the share of far
// needle rows whose needle block is kept for every q head of the group.
// Also reported: the share of far (row, q head) pairs kept, and of the
// "concentrated" ones, whose exact softmax puts >= needle_share on the needle.
//
// Built by bench/quality/run_sale_quality.sh as a plain program (no Google
// Benchmark); writes JSON (--out) and Markdown tables (--md).
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/sparse/block_sparse_attention.hpp>
#include <pqkv/sparse/sale_mask.hpp>

#include "common/keygen.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sq {

using pqkv::index_t;
using clock_type = std::chrono::steady_clock;

inline double seconds_since(clock_type::time_point t0)
{
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

struct options {
  // Llama-3.1-8B's heads (8 KV x 4) at 8K tokens: the CPU reference attention
  // is scalar; this size took 19 minutes on 2 cores (bench/results/2026-11-28-cpu-sale-quality.md).
  index_t tokens = 8192;
  index_t kv_heads = 8, q_per_kv = 4;
  std::uint64_t seed = 1;
  index_t needles = 16;             // planted needle tokens per KV head
  double needle_frac = 1.0 / 16;    // share of generator steps aimed at a needle
  index_t query_span = 64;          // consecutive rows sharing one generator step (a "passage")
  double needle_share = 0.1;        // a needle pair "concentrates" at this exact softmax share
  // Defaults picked from a density scan of the default prompt (--scan-only) so
  // that both estimators cover about 6% to 60% density at matching points
  // (forced blocks alone: 3.9%); the mean-pooled scores sit far lower, hence
  // its tiny taus.
  std::vector<float> sale_taus{0.01f, 0.03f, 0.08f, 0.25f, 0.8f, 3.f};
  std::vector<float> pool_taus{3.3e-7f, 1.15e-6f, 3e-6f, 9e-6f, 2.6e-5f, 7e-5f};
  bool scan_only = false;
};

/// The prompt: Q [q_heads, n, d], K and V [kv_heads, n, d] float, needle rows.
struct needle_row {
  index_t row = 0, group = 0, pos = 0;
};

struct prompt {
  pqkv::test::keygen_config cfg;
  pqkv::host_tensor<float, 3> q, k, v;
  std::vector<needle_row> needles;
};

/// As examples/sale_prefill/prompt.hpp's make_prompt, without the bf16 rounding.
inline prompt make_prompt(options const& o)
{
  pqkv::test::keygen_config c;
  c.kv_heads = o.kv_heads;
  c.q_per_kv = o.q_per_kv;
  c.dim = 128;
  c.tokens = o.tokens;
  c.seed = o.seed;
  c.needles = o.needles;
  c.needle_query_fraction = o.needle_frac;
  c.validate("sale_quality prompt");
  index_t const n = c.tokens, d = c.dim, qh = c.q_heads(), span = o.query_span;
  auto kv = pqkv::test::make_kv(c);
  prompt p{c, pqkv::host_tensor<float, 3>(qh, n, d), std::move(kv.keys), std::move(kv.values), {}};
  constexpr index_t rows_per_chunk = 256;
  index_t const chunks = (n + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<std::vector<needle_row>> found(static_cast<std::size_t>(chunks));
  pqkv::cpu::parallel_for(chunks, [&](index_t ch) {
    pqkv::host_tensor<float, 2> step(qh, d);
    for (index_t t = ch * rows_per_chunk; t < std::min(n, (ch + 1) * rows_per_chunk); ++t) {
      pqkv::test::make_queries(c, t / span, t, step.view());
      for (index_t h = 0; h < qh; ++h) {
        for (index_t i = 0; i < d; ++i) { p.q.view()(h, t, i) = step.view()(h, i); }
      }
      for (index_t g = 0; g < c.kv_heads; ++g) {
        if (index_t const pos = pqkv::test::query_target(c, t / span, t, g); pos >= 0) {
          found[static_cast<std::size_t>(ch)].push_back({t, g, pos});
        }
      }
    }
  });
  for (auto const& f : found) { p.needles.insert(p.needles.end(), f.begin(), f.end()); }
  return p;
}

/// A MaskEstimator that replays the block scores another estimator wrote once,
/// so a tau sweep thresholds them instead of re-estimating (the masks are the
/// same: `build_mask` only reads scores through `block_scores`).
class cached_scores {
 public:
  template <pqkv::MaskEstimator E>
  explicit cached_scores(E const& est)
      : shape_(est.shape()), cfg_(est.config()), cu_(est.cu_seqlens().begin(), est.cu_seqlens().end()),
        scores_(static_cast<std::size_t>(shape_.batch * shape_.q_heads * shape_.q_blocks * shape_.k_blocks),
                -std::numeric_limits<double>::infinity())
  {
    pqkv::cpu::parallel_for(shape_.batch * shape_.q_heads, [&](index_t job) {
      index_t const s = job / shape_.q_heads, h = job % shape_.q_heads;
      index_t const n = cu_[static_cast<std::size_t>(s) + 1] - cu_[static_cast<std::size_t>(s)];
      for (index_t qb = 0; qb < shape_.q_blocks; ++qb) {
        if (pqkv::causal_blocks(cfg_, n, qb) > 0) { est.block_scores(s, h, qb, row(s, h, qb)); }
      }
    });
  }
  [[nodiscard]] pqkv::mask_shape shape() const noexcept { return shape_; }
  [[nodiscard]] pqkv::sparse_config const& config() const noexcept { return cfg_; }
  [[nodiscard]] std::span<std::int32_t const> cu_seqlens() const noexcept { return cu_; }
  void block_scores(index_t s, index_t h, index_t qb, std::span<double> out) const
  {
    auto const at = offset(s, h, qb);
    std::copy(scores_.begin() + at, scores_.begin() + at + shape_.k_blocks, out.begin());
  }

 private:
  [[nodiscard]] std::ptrdiff_t offset(index_t s, index_t h, index_t qb) const noexcept
  {
    return static_cast<std::ptrdiff_t>(((s * shape_.q_heads + h) * shape_.q_blocks + qb) * shape_.k_blocks);
  }
  std::span<double> row(index_t s, index_t h, index_t qb)
  {
    return std::span<double>{scores_}.subspan(static_cast<std::size_t>(offset(s, h, qb)),
                                              static_cast<std::size_t>(shape_.k_blocks));
  }
  pqkv::mask_shape shape_;
  pqkv::sparse_config cfg_;
  std::vector<std::int32_t> cu_;
  std::vector<double> scores_;  // [batch, q_heads, q_blocks, k_blocks]
};
static_assert(pqkv::MaskEstimator<cached_scores>);

/// Per-head and summary figures of one mask.
struct point {
  float tau = 0.f;
  std::vector<double> density, l1, rel_l2;  // [q_heads]
  std::vector<index_t> far_pairs_kept, conc_pairs, conc_pairs_kept;  // [q_heads]
  index_t far_rows = 0, far_rows_kept = 0, rows = 0, rows_kept = 0;  // needle rows (all q heads of the group)
  double mask_s = 0, attention_s = 0;
  bool attended = false;  // false: density only (scan)

  [[nodiscard]] static double mean(std::vector<double> const& v)
  {
    return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  }
  [[nodiscard]] static double max(std::vector<double> const& v)
  {
    return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end());
  }
  [[nodiscard]] double overall_density() const { return mean(density); }  // every head has the same causal blocks
  [[nodiscard]] double needle_recall() const
  {
    return far_rows > 0 ? static_cast<double>(far_rows_kept) / static_cast<double>(far_rows) : 1.0;
  }
  [[nodiscard]] static double ratio(index_t a, index_t b)
  {
    return b > 0 ? static_cast<double>(a) / static_cast<double>(b) : 1.0;
  }
};

struct estimator_run {
  std::string name;  // "sale_int4", "sale_int8", "mean_pool"
  std::string label;
  double build_s = 0, score_s = 0;
  std::vector<point> scan;    // density only, log grid of taus
  std::vector<point> points;  // the sweep, with attention
};

struct result {
  options opt;
  index_t q_heads = 0, dim = 0, causal_blocks_per_head = 0, forced_blocks_per_head = 0;
  index_t needle_rows = 0, far_needle_rows = 0, far_pairs = 0, concentrated_pairs = 0;
  std::vector<index_t> far_pairs_per_head, conc_pairs_per_head;
  double generate_s = 0, dense_s = 0, needle_share_s = 0, total_s = 0;
  int threads = 0;
  std::vector<estimator_run> runs;
};

/// Exact causal softmax share of key p in row t of q head h (float logits as
/// the library's attention, double softmax).
inline double exact_share(prompt const& pr, float scale, index_t h, index_t t, index_t p)
{
  index_t const d = pr.q.extent(2), g = h / pr.cfg.q_per_kv;
  auto const q = pr.q.const_view();
  auto const k = pr.k.const_view();
  std::vector<float> s(static_cast<std::size_t>(t + 1));
  float mx = -std::numeric_limits<float>::infinity();
  for (index_t j = 0; j <= t; ++j) {
    float dot = 0.f;
    for (index_t c = 0; c < d; ++c) { dot = std::fma(q(h, t, c), k(g, j, c), dot); }
    s[static_cast<std::size_t>(j)] = scale * dot;
    mx = std::max(mx, scale * dot);
  }
  double z = 0.0;
  for (float x : s) { z += std::exp(static_cast<double>(x) - static_cast<double>(mx)); }
  return std::exp(static_cast<double>(s[static_cast<std::size_t>(p)]) - static_cast<double>(mx)) / z;
}

/// Everything a point's evaluation needs, computed once.
struct reference {
  prompt const* pr = nullptr;
  std::vector<std::int32_t> cu;
  pqkv::sparse_config cfg;
  pqkv::mask_shape shape;
  pqkv::host_tensor<float, 3> dense;  // [q_heads, n, d]
  std::vector<double> dense_norm2;    // [q_heads]
  std::vector<std::vector<char>> concentrated;  // [needle row][q in group]
};

inline bool far_needle(reference const& r, needle_row const& nr)
{
  return !pqkv::forced_block(r.cfg, r.pr->cfg.tokens, nr.row / r.cfg.block_q, nr.pos / r.cfg.block_k);
}

/// Builds the mask at uniform tau; with `attend`, runs attention and scores it.
template <pqkv::MaskEstimator E>
point evaluate(reference const& r, E const& est, float tau, bool attend)
{
  point pt;
  pt.tau = tau;
  pt.attended = attend;
  auto const& m = r.shape;
  index_t const qh = m.q_heads, n = r.pr->cfg.tokens, dv = r.pr->v.extent(2), qpk = r.pr->cfg.q_per_kv;
  std::vector<float> taus(static_cast<std::size_t>(qh), tau);
  pt.density.assign(static_cast<std::size_t>(qh), 0.0);
  pqkv::host_tensor<std::uint32_t, 4> mask(m.batch, m.q_heads, m.q_blocks, m.words);
  auto t0 = clock_type::now();
  pqkv::cpu::build_mask(est, std::span<float const>{taus}, mask.view(), std::span<double>{pt.density});
  pt.mask_s = seconds_since(t0);
  if (!attend) { return pt; }
  pqkv::host_tensor<float, 3> out(qh, n, dv);
  t0 = clock_type::now();
  pqkv::cpu::block_sparse_attention(r.pr->q.const_view(), r.pr->k.const_view(), r.pr->v.const_view(),
                                    std::span<std::int32_t const>{r.cu}, r.cfg, mask.const_view(), out.view());
  pt.attention_s = seconds_since(t0);
  pt.l1.assign(static_cast<std::size_t>(qh), 0.0);
  pqkv::cpu::mean_row_l1(out.const_view(), r.dense.const_view(), std::span<double>{pt.l1});
  pt.rel_l2.assign(static_cast<std::size_t>(qh), 0.0);
  for (index_t h = 0; h < qh; ++h) {
    double d2 = 0.0;
    for (index_t t = 0; t < n; ++t) {
      for (index_t c = 0; c < dv; ++c) {
        double const e = static_cast<double>(out.view()(h, t, c)) - static_cast<double>(r.dense.view()(h, t, c));
        d2 += e * e;
      }
    }
    pt.rel_l2[static_cast<std::size_t>(h)] = std::sqrt(d2 / r.dense_norm2[static_cast<std::size_t>(h)]);
  }
  pt.far_pairs_kept.assign(static_cast<std::size_t>(qh), 0);
  pt.conc_pairs.assign(static_cast<std::size_t>(qh), 0);
  pt.conc_pairs_kept.assign(static_cast<std::size_t>(qh), 0);
  auto const mv = mask.const_view();
  for (std::size_t i = 0; i < r.pr->needles.size(); ++i) {
    needle_row const& nr = r.pr->needles[i];
    index_t const qb = nr.row / r.cfg.block_q, kb = nr.pos / r.cfg.block_k;
    bool all = true;
    bool const far = far_needle(r, nr);
    for (index_t j = 0; j < qpk; ++j) {
      index_t const h = nr.group * qpk + j;
      bool const kept = pqkv::cpu::mask_bit(mv, 0, h, qb, kb);
      all = all && kept;
      if (!far) { continue; }
      pt.far_pairs_kept[static_cast<std::size_t>(h)] += kept ? 1 : 0;
      if (r.concentrated[i][static_cast<std::size_t>(j)] != 0) {
        pt.conc_pairs[static_cast<std::size_t>(h)] += 1;
        pt.conc_pairs_kept[static_cast<std::size_t>(h)] += kept ? 1 : 0;
      }
    }
    pt.rows += 1;
    pt.rows_kept += all ? 1 : 0;
    pt.far_rows += far ? 1 : 0;
    pt.far_rows_kept += far && all ? 1 : 0;
  }
  return pt;
}

/// Density of every tau of a log grid (1e-12 .. 1e4, 4 per decade): cheap, the
/// scores are cached. The mean-pooled scores sit far lower than SALE's (the
/// sink boost survives pooling the queries, the keys' content does not), so
/// the grid reaches far below SALE's useful range.
inline std::vector<point> density_scan(reference const& r, cached_scores const& est)
{
  std::vector<point> scan;
  for (int e = -48; e <= 16; ++e) {
    scan.push_back(evaluate(r, est, static_cast<float>(std::pow(10.0, e / 4.0)), false));
  }
  return scan;
}

/// y at x on the piecewise-linear curve through (xs, ys) (sorted by x); empty
/// outside [min x, max x]: no extrapolation.
inline std::optional<double> interpolate(std::vector<std::pair<double, double>> curve, double x)
{
  std::sort(curve.begin(), curve.end());
  if (curve.empty() || x < curve.front().first || x > curve.back().first) { return std::nullopt; }
  for (std::size_t i = 1; i < curve.size(); ++i) {
    auto const [x0, y0] = curve[i - 1];
    auto const [x1, y1] = curve[i];
    if (x <= x1) { return x1 > x0 ? y0 + (y1 - y0) * (x - x0) / (x1 - x0) : y1; }
  }
  return curve.back().second;
}

inline std::vector<std::pair<double, double>> curve_of(estimator_run const& e, bool l2)
{
  std::vector<std::pair<double, double>> c;
  for (auto const& p : e.points) {
    c.emplace_back(p.overall_density(), l2 ? point::mean(p.rel_l2) : point::mean(p.l1));
  }
  return c;
}

inline result run(options const& o, std::FILE* log)
{
  auto const t_start = clock_type::now();
  result res;
  res.opt = o;
  res.threads = pqkv::cpu::num_threads();
  auto t0 = clock_type::now();
  prompt const pr = make_prompt(o);
  res.generate_s = seconds_since(t0);
  index_t const n = pr.cfg.tokens, qh = pr.cfg.q_heads();
  res.q_heads = qh;
  res.dim = pr.cfg.dim;
  std::fprintf(log, "prompt: %lld tokens, %lld q heads, %lld KV heads, %zu needle rows, %.1f s\n",
               static_cast<long long>(n), static_cast<long long>(qh), static_cast<long long>(pr.cfg.kv_heads),
               pr.needles.size(), res.generate_s);

  reference ref;
  ref.pr = &pr;
  ref.cu = {0, static_cast<std::int32_t>(n)};
  std::span<std::int32_t const> const cu{ref.cu};
  ref.shape = pqkv::make_mask_shape(cu, qh, pr.cfg.kv_heads, ref.cfg);
  for (index_t qb = 0; qb < ref.shape.q_blocks; ++qb) {
    index_t const nk = pqkv::causal_blocks(ref.cfg, n, qb);
    res.causal_blocks_per_head += nk;
    for (index_t kb = 0; kb < nk; ++kb) {
      res.forced_blocks_per_head += pqkv::forced_block(ref.cfg, n, qb, kb) ? 1 : 0;
    }
  }

  // Dense reference: every causal block (tau 0 keeps a head dense without estimating).
  t0 = clock_type::now();
  pqkv::cpu::mean_pool_estimator const pool(pr.q.const_view(), pr.k.const_view(), cu, ref.cfg);
  double const pool_build_s = seconds_since(t0);
  if (!o.scan_only) {
    pqkv::host_tensor<std::uint32_t, 4> all(ref.shape.batch, qh, ref.shape.q_blocks, ref.shape.words);
    std::vector<float> zeros(static_cast<std::size_t>(qh), 0.f);
    pqkv::cpu::build_mask(pool, std::span<float const>{zeros}, all.view());
    ref.dense = pqkv::host_tensor<float, 3>(qh, n, pr.v.extent(2));
    t0 = clock_type::now();
    pqkv::cpu::block_sparse_attention(pr.q.const_view(), pr.k.const_view(), pr.v.const_view(), cu, ref.cfg,
                                      all.const_view(), ref.dense.view());
    res.dense_s = seconds_since(t0);
  }
  ref.dense_norm2.assign(static_cast<std::size_t>(qh), 0.0);
  for (index_t h = 0; h < qh && !o.scan_only; ++h) {
    for (index_t t = 0; t < n; ++t) {
      for (index_t c = 0; c < ref.dense.extent(2); ++c) {
        double const x = ref.dense.view()(h, t, c);
        ref.dense_norm2[static_cast<std::size_t>(h)] += x * x;
      }
    }
  }
  std::fprintf(log, "dense attention: %.1f s\n", res.dense_s);

  // Exact needle shares of the far needle pairs (the concentrated ones matter to the output).
  t0 = clock_type::now();
  float const scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(pr.cfg.dim)));
  ref.concentrated.assign(pr.needles.size(), std::vector<char>(static_cast<std::size_t>(pr.cfg.q_per_kv), 0));
  res.far_pairs_per_head.assign(static_cast<std::size_t>(qh), 0);
  res.conc_pairs_per_head.assign(static_cast<std::size_t>(qh), 0);
  pqkv::cpu::parallel_for(static_cast<index_t>(pr.needles.size()), [&](index_t i) {
    needle_row const& nr = pr.needles[static_cast<std::size_t>(i)];
    if (o.scan_only || !far_needle(ref, nr)) { return; }
    for (index_t j = 0; j < pr.cfg.q_per_kv; ++j) {
      double const share = exact_share(pr, scale, nr.group * pr.cfg.q_per_kv + j, nr.row, nr.pos);
      ref.concentrated[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)] = share >= o.needle_share ? 1 : 0;
    }
  });
  res.needle_share_s = seconds_since(t0);
  for (std::size_t i = 0; i < pr.needles.size(); ++i) {
    auto const& nr = pr.needles[i];
    res.needle_rows += 1;
    if (!far_needle(ref, nr)) { continue; }
    res.far_needle_rows += 1;
    for (index_t j = 0; j < pr.cfg.q_per_kv; ++j) {
      auto const h = static_cast<std::size_t>(nr.group * pr.cfg.q_per_kv + j);
      res.far_pairs_per_head[h] += 1;
      res.conc_pairs_per_head[h] += ref.concentrated[i][static_cast<std::size_t>(j)];
    }
  }
  res.far_pairs = std::accumulate(res.far_pairs_per_head.begin(), res.far_pairs_per_head.end(), index_t{0});
  res.concentrated_pairs = std::accumulate(res.conc_pairs_per_head.begin(), res.conc_pairs_per_head.end(), index_t{0});
  std::fprintf(log, "needles: %lld rows, %lld far, %lld far pairs, %lld concentrated (share >= %.2g); %.1f s\n",
               static_cast<long long>(res.needle_rows), static_cast<long long>(res.far_needle_rows),
               static_cast<long long>(res.far_pairs), static_cast<long long>(res.concentrated_pairs), o.needle_share,
               res.needle_share_s);

  auto sweep = [&](estimator_run e, cached_scores const& est, std::vector<float> const& taus) {
    // Self-checks of the rule's two ends: tau 0 is the dense mask, tau +inf the forced blocks.
    point const zero = evaluate(ref, est, 0.f, false);
    point const inf = evaluate(ref, est, std::numeric_limits<float>::infinity(), false);
    double const forced =
      static_cast<double>(res.forced_blocks_per_head) / static_cast<double>(res.causal_blocks_per_head);
    for (index_t h = 0; h < qh; ++h) {
      PQKV_EXPECTS(zero.density[static_cast<std::size_t>(h)] == 1.0, "sale_quality", "tau 0 density ",
                   zero.density[static_cast<std::size_t>(h)], " != 1");
      PQKV_EXPECTS(std::fabs(inf.density[static_cast<std::size_t>(h)] - forced) < 1e-12, "sale_quality",
                   "tau inf density ", inf.density[static_cast<std::size_t>(h)], " != forced share ", forced);
    }
    e.scan = density_scan(ref, est);
    for (float tau : taus) {
      if (o.scan_only) { break; }
      point pt = evaluate(ref, est, tau, true);
      std::fprintf(log,
                   "%-10s tau %-8.3g density %.4f  L1 mean %.4f max %.4f  relL2 mean %.4f max %.4f  "
                   "needle %lld/%lld  (%.1f s)\n",
                   e.name.c_str(), static_cast<double>(tau), pt.overall_density(), point::mean(pt.l1),
                   point::max(pt.l1), point::mean(pt.rel_l2), point::max(pt.rel_l2),
                   static_cast<long long>(pt.far_rows_kept), static_cast<long long>(pt.far_rows), pt.attention_s);
      e.points.push_back(std::move(pt));
    }
    res.runs.push_back(std::move(e));
  };

  for (auto grid : {pqkv::quant_grid::int4, pqkv::quant_grid::int8}) {
    estimator_run e;
    bool const four = grid == pqkv::quant_grid::int4;
    e.name = four ? "sale_int4" : "sale_int8";
    e.label = four ? "SALE 4-bit, per token" : "SALE 8-bit, per token";
    t0 = clock_type::now();
    pqkv::cpu::sale_estimator const sale(pr.q.const_view(), pr.k.const_view(), cu, ref.cfg,
                                         pqkv::quant_config{grid, 1});
    e.build_s = seconds_since(t0);
    t0 = clock_type::now();
    cached_scores const cached(sale);
    e.score_s = seconds_since(t0);
    std::fprintf(log, "%s: quantize + row lse %.1f s, block scores %.1f s\n", e.name.c_str(), e.build_s, e.score_s);
    sweep(std::move(e), cached, o.sale_taus);
  }
  {
    estimator_run e;
    e.name = "mean_pool";
    e.label = "mean-pooled";
    e.build_s = pool_build_s;
    t0 = clock_type::now();
    cached_scores const cached(pool);
    e.score_s = seconds_since(t0);
    sweep(std::move(e), cached, o.pool_taus);
  }
  res.total_s = seconds_since(t_start);
  return res;
}

// ------------------------------------------------------------------ output

inline std::string fmt(char const* f, auto... a)
{
  char buf[512];
  std::snprintf(buf, sizeof buf, f, a...);
  return buf;
}

inline std::string json_array(std::vector<double> const& v, char const* f = "%.6g")
{
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) { s += (i ? ", " : "") + fmt(f, v[i]); }
  return s + "]";
}

inline std::string json_array(std::vector<index_t> const& v)
{
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) { s += (i ? ", " : "") + fmt("%lld", static_cast<long long>(v[i])); }
  return s + "]";
}

inline std::string json_opt(std::optional<double> v) { return v ? fmt("%.6g", *v) : std::string{"null"}; }

inline estimator_run const& find_run(result const& r, std::string_view name)
{
  for (auto const& e : r.runs) {
    if (e.name == name) { return e; }
  }
  PQKV_EXPECTS(false, "sale_quality", "no run ", name);
  return r.runs.front();
}

/// An estimator point against another curve at the same overall density.
struct comparison {
  std::string name, other;
  float tau = 0.f;
  double density = 0, l1 = 0, rel_l2 = 0;
  std::optional<double> other_l1, other_rel_l2;
};

inline std::vector<comparison> compare(result const& r, std::string_view name, std::string_view other)
{
  auto const& a = find_run(r, name);
  auto const& b = find_run(r, other);
  std::vector<comparison> out;
  for (auto const& p : a.points) {
    comparison c{a.name, b.name, p.tau, p.overall_density(), point::mean(p.l1), point::mean(p.rel_l2), {}, {}};
    c.other_l1 = interpolate(curve_of(b, false), c.density);
    c.other_rel_l2 = interpolate(curve_of(b, true), c.density);
    out.push_back(std::move(c));
  }
  return out;
}

inline std::string to_json(result const& r, std::vector<std::pair<std::string, std::string>> const& meta)
{
  auto const& o = r.opt;
  std::string s = "{\n";
  for (auto const& [k, v] : meta) { s += "  \"" + k + "\": \"" + v + "\",\n"; }
  pqkv::sparse_config const cfg;
  s += fmt("  \"setup\": {\"tokens\": %lld, \"kv_heads\": %lld, \"q_heads\": %lld, \"dim\": %lld, "
           "\"dtype\": \"float\", \"generator\": \"tests/common/keygen.hpp defaults\", \"generator_seed\": %llu, "
           "\"needles_per_kv_head\": %lld, "
           "\"needle_query_fraction\": %.6g, \"query_span\": %lld, \"needle_share\": %.3g, ",
           static_cast<long long>(o.tokens), static_cast<long long>(o.kv_heads), static_cast<long long>(r.q_heads),
           static_cast<long long>(r.dim), static_cast<unsigned long long>(o.seed), static_cast<long long>(o.needles),
           o.needle_frac, static_cast<long long>(o.query_span), o.needle_share);
  s += fmt("\"block_q\": %lld, \"block_k\": %lld, \"sink\": %lld, \"local\": %lld, \"max_blocks\": %lld, "
           "\"causal_blocks_per_head\": %lld, \"forced_blocks_per_head\": %lld, \"threads\": %d},\n",
           static_cast<long long>(cfg.block_q), static_cast<long long>(cfg.block_k), static_cast<long long>(cfg.sink),
           static_cast<long long>(cfg.local), static_cast<long long>(cfg.max_blocks),
           static_cast<long long>(r.causal_blocks_per_head), static_cast<long long>(r.forced_blocks_per_head),
           r.threads);
  s += fmt("  \"needles\": {\"rows\": %lld, \"far_rows\": %lld, \"far_pairs\": %lld, \"concentrated_pairs\": %lld, ",
           static_cast<long long>(r.needle_rows), static_cast<long long>(r.far_needle_rows),
           static_cast<long long>(r.far_pairs), static_cast<long long>(r.concentrated_pairs));
  s += "\"far_pairs_per_head\": " + json_array(r.far_pairs_per_head) +
       ", \"concentrated_pairs_per_head\": " + json_array(r.conc_pairs_per_head) + "},\n";
  s += fmt("  \"times_s\": {\"generate\": %.2f, \"dense_attention\": %.2f, \"needle_shares\": %.2f, "
           "\"total\": %.2f},\n",
           r.generate_s, r.dense_s, r.needle_share_s, r.total_s);
  s += "  \"estimators\": [\n";
  for (std::size_t ei = 0; ei < r.runs.size(); ++ei) {
    auto const& e = r.runs[ei];
    s += fmt("    {\"name\": \"%s\", \"label\": \"%s\", \"build_s\": %.2f, \"block_scores_s\": %.2f,\n", e.name.c_str(),
             e.label.c_str(), e.build_s, e.score_s);
    s += "     \"density_scan\": [";
    for (std::size_t i = 0; i < e.scan.size(); ++i) {
      s += fmt("%s{\"tau\": %.4g, \"density\": %.6f}", i ? ", " : "", static_cast<double>(e.scan[i].tau),
               e.scan[i].overall_density());
    }
    s += "],\n     \"points\": [\n";
    for (std::size_t i = 0; i < e.points.size(); ++i) {
      auto const& p = e.points[i];
      s += fmt("      {\"tau\": %.6g, \"density\": %.6f, \"l1_mean\": %.6g, \"l1_max\": %.6g, \"rel_l2_mean\": %.6g, "
               "\"rel_l2_max\": %.6g, \"needle_recall\": %.6f, \"needle_far_rows\": %lld, \"needle_far_rows_kept\": %lld, "
               "\"needle_rows\": %lld, \"needle_rows_kept\": %lld, ",
               static_cast<double>(p.tau), p.overall_density(), point::mean(p.l1), point::max(p.l1),
               point::mean(p.rel_l2), point::max(p.rel_l2), p.needle_recall(), static_cast<long long>(p.far_rows),
               static_cast<long long>(p.far_rows_kept), static_cast<long long>(p.rows),
               static_cast<long long>(p.rows_kept));
      s += fmt("\"mask_s\": %.2f, \"attention_s\": %.2f,\n       \"per_head\": {", p.mask_s, p.attention_s);
      s += "\"density\": " + json_array(p.density) + ", \"l1\": " + json_array(p.l1) +
           ", \"rel_l2\": " + json_array(p.rel_l2) + ", \"far_pairs_kept\": " + json_array(p.far_pairs_kept) +
           ", \"concentrated_pairs_kept\": " + json_array(p.conc_pairs_kept) + "}}";
      s += i + 1 < e.points.size() ? ",\n" : "\n";
    }
    s += ei + 1 < r.runs.size() ? "     ]},\n" : "     ]}\n";
  }
  s += "  ],\n";
  auto cmp_json = [&](char const* key, std::vector<comparison> const& cs, bool last) {
    s += fmt("  \"%s\": [\n", key);
    for (std::size_t i = 0; i < cs.size(); ++i) {
      auto const& c = cs[i];
      auto ratio = [](double a, std::optional<double> b) {
        return b && *b > 0 ? std::optional<double>{a / *b} : std::nullopt;
      };
      s += fmt("    {\"estimator\": \"%s\", \"tau\": %.6g, \"density\": %.6f, \"l1_mean\": %.6g, \"rel_l2_mean\": %.6g, ",
               c.name.c_str(), static_cast<double>(c.tau), c.density, c.l1, c.rel_l2);
      s += fmt("\"other\": \"%s\", ", c.other.c_str()) + "\"other_l1_mean\": " + json_opt(c.other_l1) +
           ", \"other_rel_l2_mean\": " + json_opt(c.other_rel_l2) + ", \"l1_ratio\": " + json_opt(ratio(c.l1, c.other_l1)) +
           ", \"rel_l2_ratio\": " + json_opt(ratio(c.rel_l2, c.other_rel_l2)) + "}";
      s += i + 1 < cs.size() ? ",\n" : "\n";
    }
    s += last ? "  ]\n" : "  ],\n";
  };
  if (!o.scan_only) {
    auto a = compare(r, "sale_int4", "mean_pool");
    auto b = compare(r, "sale_int8", "mean_pool");
    a.insert(a.end(), b.begin(), b.end());
    cmp_json("equal_density_vs_mean_pool", a, false);
    cmp_json("equal_density_int4_vs_int8", compare(r, "sale_int4", "sale_int8"), false);
  }
  s += "  \"interpolation\": \"the other curve's (overall density, mean-over-heads error) points, linear in density, "
       "null outside its measured density range\"\n}\n";
  return s;
}

inline std::string opt_cell(std::optional<double> v, char const* f = "%.4f")
{
  return v ? fmt(f, *v) : std::string{"-"};
}

/// Markdown tables (the results page adds the header and findings).
inline std::string to_markdown(result const& r)
{
  std::string s;
  s += "| estimator | tau | density | mean L1: mean | mean L1: worst head | rel L2: mean | rel L2: worst head | "
       "needle recall (far rows) | far (row, head) pairs kept | concentrated pairs kept | attention s |\n";
  s += "|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (auto const& e : r.runs) {
    for (auto const& p : e.points) {
      index_t fk = 0, ck = 0;
      for (index_t x : p.far_pairs_kept) { fk += x; }
      for (index_t x : p.conc_pairs_kept) { ck += x; }
      s += fmt("| %s | %.3g | %.4f | %.4f | %.4f | %.4f | %.4f | %.4f (%lld/%lld) | %lld/%lld | %lld/%lld | %.1f |\n",
               e.label.c_str(), static_cast<double>(p.tau), p.overall_density(), point::mean(p.l1), point::max(p.l1),
               point::mean(p.rel_l2), point::max(p.rel_l2), p.needle_recall(), static_cast<long long>(p.far_rows_kept),
               static_cast<long long>(p.far_rows), static_cast<long long>(fk), static_cast<long long>(r.far_pairs),
               static_cast<long long>(ck), static_cast<long long>(r.concentrated_pairs), p.attention_s);
    }
  }
  auto table = [&](std::vector<comparison> const& cs, char const* title, char const* other) {
    s += fmt("\n%s\n\n", title);
    s += fmt("| estimator | tau | density | mean L1 | %s mean L1 at this density | ratio | rel L2 | %s rel L2 at this "
             "density | ratio |\n", other, other);
    s += "|---|---|---|---|---|---|---|---|---|\n";
    for (auto const& c : cs) {
      auto ratio = [](double a, std::optional<double> b) {
        return b && *b > 0 ? std::optional<double>{a / *b} : std::nullopt;
      };
      s += fmt("| %s | %.3g | %.4f | %.4f | ", find_run(r, c.name).label.c_str(), static_cast<double>(c.tau), c.density,
               c.l1) +
           opt_cell(c.other_l1) + " | " + opt_cell(ratio(c.l1, c.other_l1), "%.3f") + " | " + fmt("%.4f", c.rel_l2) +
           " | " + opt_cell(c.other_rel_l2) + " | " + opt_cell(ratio(c.rel_l2, c.other_rel_l2), "%.3f") + " |\n";
    }
  };
  if (!r.opt.scan_only) {
    auto a = compare(r, "sale_int4", "mean_pool");
    auto b = compare(r, "sale_int8", "mean_pool");
    a.insert(a.end(), b.begin(), b.end());
    table(a, "Equal density vs the mean-pooled estimator (its curve interpolated linearly in density):", "mean-pooled");
    table(compare(r, "sale_int4", "sale_int8"), "4-bit vs 8-bit at equal density (8-bit curve interpolated):", "8-bit");
  }
  s += "\nDensity scan (overall density by tau; masks only):\n\n| tau |";
  for (auto const& e : r.runs) { s += " " + e.label + " |"; }
  s += "\n|---|";
  for (std::size_t i = 0; i < r.runs.size(); ++i) { s += "---|"; }
  s += "\n";
  for (std::size_t i = 0; i < r.runs.front().scan.size(); ++i) {
    s += fmt("| %.3g |", static_cast<double>(r.runs.front().scan[i].tau));
    for (auto const& e : r.runs) { s += fmt(" %.4f |", e.scan[i].overall_density()); }
    s += "\n";
  }
  return s;
}

inline std::vector<float> parse_floats(std::string const& v)
{
  std::vector<float> out;
  for (std::size_t p = 0; p < v.size();) {
    std::size_t const e = std::min(v.find(',', p), v.size());
    out.push_back(std::stof(v.substr(p, e - p)));
    p = e + 1;
  }
  return out;
}

inline void write_file(std::string const& path, std::string const& text)
{
  std::FILE* f = std::fopen(path.c_str(), "w");
  PQKV_EXPECTS(f != nullptr, "sale_quality", "cannot open ", path);
  std::fputs(text.c_str(), f);
  std::fclose(f);
}

}  // namespace sq

int main(int argc, char** argv)
{
  using namespace sq;
  options o;
  std::string out_path, md_path;
  std::vector<std::pair<std::string, std::string>> meta;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string_view const a = argv[i];
      auto value = [&]() -> std::string {
        PQKV_EXPECTS(i + 1 < argc, "sale_quality", a, " needs a value");
        return argv[++i];
      };
      auto number = [&]() -> index_t { return static_cast<index_t>(std::stoll(value())); };
      if (a == "--tokens") { o.tokens = number(); }
      else if (a == "--kv-heads") { o.kv_heads = number(); }
      else if (a == "--q-per-kv") { o.q_per_kv = number(); }
      else if (a == "--seed") { o.seed = static_cast<std::uint64_t>(number()); }
      else if (a == "--needles") { o.needles = number(); }
      else if (a == "--needle-frac") { o.needle_frac = std::stod(value()); }
      else if (a == "--query-span") { o.query_span = number(); }
      else if (a == "--needle-share") { o.needle_share = std::stod(value()); }
      else if (a == "--taus" || a == "--sale-taus") { o.sale_taus = parse_floats(value()); }
      else if (a == "--pool-taus") { o.pool_taus = parse_floats(value()); }
      else if (a == "--scan-only") { o.scan_only = true; }
      else if (a == "--threads") { pqkv::cpu::set_num_threads(static_cast<int>(number())); }
      else if (a == "--out") { out_path = value(); }
      else if (a == "--md") { md_path = value(); }
      else if (a == "--meta") {  // key=value, repeatable
        std::string const v = value();
        std::size_t const eq = v.find('=');
        PQKV_EXPECTS(eq != std::string::npos, "sale_quality", "--meta ", v, " is not key=value");
        meta.emplace_back(v.substr(0, eq), v.substr(eq + 1));
      }
      else {
        PQKV_EXPECTS(false, "sale_quality", "unknown option ", a,
                     " (--tokens --kv-heads --q-per-kv --seed --needles --needle-frac --query-span --needle-share "
                     "--taus/--sale-taus --pool-taus --scan-only --threads --out --md --meta)");
      }
    }
    PQKV_EXPECTS(o.query_span >= 1, "sale_quality", "--query-span=", o.query_span, " must be >= 1");
    result const r = run(o, stderr);
    std::string const json = to_json(r, meta);
    if (out_path.empty()) {
      std::fputs(json.c_str(), stdout);
    } else {
      write_file(out_path, json);
    }
    if (!md_path.empty()) { write_file(md_path, to_markdown(r)); }
    std::fprintf(stderr, "total %.1f s\n", r.total_s);
  } catch (std::exception const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  return 0;
}
