// SPDX-License-Identifier: Apache-2.0
// Quality vs memory of PQ token selection, measured on the realistic synthetic
// generator (tests/common/keygen.hpp: RoPE, outlier channels, sinks, topic
// clumps, needles of varied strength), at Llama-3.1-8B attention shapes.
//
// For each (m, nbits) the codebooks are trained per (KV head, subspace) on a
// seeded subsample of the context (k-means++ init, a fixed iteration count)
// and every token is encoded; then, for each decode query and each budget k,
// `pqkv::cpu::adc_topk<gqa::softmax_sum>` selects k tokens per KV head, which
// are attended together with the sink and the local window. Against exact
// attention over the whole context it reports: the attention mass the
// attended tokens capture (mean and 5th percentile over q heads x queries),
// recall@k of the exact top-k (`exact_topk`, same GQA aggregation, sink and
// window), the attention-output error vs dense, the needle hit rate (queries
// aimed at a planted needle whose needle is attended), and the GPU bytes of
// the codes per token. The exact top-k is reported as the ceiling.
//
// Two ways to run it:
// - as part of pqkv_cpu_bench: `--benchmark_filter=quality_sweep`; the first
//   benchmark runs the whole sweep once (Iterations(1)), every row reports its
//   figures as counters. PQKV_QUALITY_TOKENS / _QUERIES / _TRAIN_POINTS
//   override the size (default: the full 128K sweep, minutes on 2 cores).
// - standalone, compiled with -DPQKV_QUALITY_SWEEP_MAIN (bench/quality/
//   run_quality_sweep.sh does this): writes the sweep as JSON.
#include <pqkv/pqkv.hpp>

#include "common/keygen.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#ifndef PQKV_QUALITY_SWEEP_MAIN
#include <benchmark/benchmark.h>
#endif

namespace pqkv_quality {

using pqkv::index_t;
using clock_type = std::chrono::steady_clock;

struct pq_point {
  index_t m;
  int nbits;
};

struct sweep_options {
  index_t tokens = 131072;
  index_t queries = 8;         ///< decode queries (steps), each for all 32 q heads
  index_t train_points = 32768;  ///< k-means subsample per KV head; 0: every token
  int iters = 25;
  index_t sink = 4, window = 64;
  std::uint64_t seed = 1;      ///< generator seed
  std::uint64_t pq_seed = 4321;
  std::vector<pq_point> points{{2, 6}, {8, 8}, {16, 8}, {32, 8}};
  std::vector<index_t> ks{2048, 0};  ///< 0 means tokens / 5
};

/// The quality of one selection method at one budget, over queries x heads.
struct quality {
  double mass_mean = 0, mass_p5 = 0, mass_min = 0;  ///< over q heads x queries
  double recall_mean = 0, recall_p5 = 0;            ///< over KV heads x queries
  double err_mean = 0, err_p95 = 0;                 ///< relative L2 error per q head, over q heads x queries
  index_t needle_queries = 0, needle_hits = 0;      ///< (query, KV head) pairs aimed at a needle
  [[nodiscard]] double needle_rate() const
  {
    return needle_queries > 0 ? static_cast<double>(needle_hits) / static_cast<double>(needle_queries) : 1.0;
  }
};

struct row {
  pq_point pq{};
  index_t k = 0;
  quality q;
  double train_s = 0;   ///< training + encoding every token, for this (m, nbits)
  double select_ms = 0;  ///< mean adc_topk call, all KV heads
  double train_mse = 0;
};

struct ceiling {
  index_t k = 0;
  quality q;
};

struct sweep_result {
  sweep_options opt;
  index_t kv_heads = 0, q_heads = 0, dim = 0;
  std::vector<ceiling> ceilings;
  std::vector<row> rows;
  double generate_s = 0, total_s = 0;
  int threads = 0;
};

inline double seconds_since(clock_type::time_point t0)
{
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

/// Nearest-rank percentile (p in (0, 100]) of v.
inline double percentile(std::vector<double> v, double p)
{
  if (v.empty()) { return 0.0; }
  std::sort(v.begin(), v.end());
  auto rank = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
  rank = std::clamp<std::size_t>(rank, 1, v.size());
  return v[rank - 1];
}

inline double mean(std::vector<double> const& v)
{
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

/// Per-(query, head) samples of one method at one budget.
struct samples {
  std::vector<double> mass, recall, err;
  index_t needle_queries = 0, needle_hits = 0;

  [[nodiscard]] quality summary() const
  {
    quality q;
    q.mass_mean = mean(mass);
    q.mass_p5 = percentile(mass, 5);
    q.mass_min = mass.empty() ? 0.0 : *std::min_element(mass.begin(), mass.end());
    q.recall_mean = mean(recall);
    q.recall_p5 = percentile(recall, 5);
    q.err_mean = mean(err);
    q.err_p95 = percentile(err, 95);
    q.needle_queries = needle_queries;
    q.needle_hits = needle_hits;
    return q;
  }
};

/// Whether token t is attended by KV head g: sink, window or selection row g
/// (ascending, -1 padded).
inline bool attended(pqkv::host_tensor<std::int32_t, 2> const& sel, index_t g, index_t t, index_t n, index_t sink,
                     index_t window)
{
  if (t < sink || t >= n - window) { return true; }
  auto const v = sel.const_view();
  for (index_t i = 0; i < v.extent(1) && v(g, i) >= 0; ++i) {
    if (v(g, i) == t) { return true; }
  }
  return false;
}

/// The decode context: keys, values, queries, dense outputs and needle targets.
struct context {
  pqkv::test::keygen_config cfg;
  pqkv::test::synthetic_kv kv;
  std::vector<pqkv::host_tensor<float, 2>> q, dense;  // [q_heads, dim] each
  std::vector<std::vector<index_t>> target;            // [queries][kv_heads], -1: no needle
};

/// Adds the metrics of selection `sel` for query s to `out`.
inline void score_selection(context const& c, index_t s, pqkv::host_tensor<std::int32_t, 2> const& sel,
                            pqkv::host_tensor<std::int32_t, 2> const* exact, sweep_options const& o, samples& out)
{
  index_t const n = c.cfg.tokens, kv_heads = c.cfg.kv_heads;
  auto const q = pqkv::query_view<float const>{c.q[static_cast<std::size_t>(s)].const_view()};
  auto const keys = c.kv.keys.const_view();
  auto const mass = pqkv::cpu::attention_mass_kept(q, keys, sel.const_view(), o.sink, o.window);
  out.mass.insert(out.mass.end(), mass.per_head.begin(), mass.per_head.end());
  if (exact != nullptr) {
    auto const rec = pqkv::cpu::recall_at_k(sel.const_view(), exact->const_view());
    out.recall.insert(out.recall.end(), rec.per_head.begin(), rec.per_head.end());
  } else {
    out.recall.insert(out.recall.end(), static_cast<std::size_t>(kv_heads), 1.0);
  }
  pqkv::host_tensor<float, 2> sparse(c.cfg.q_heads(), c.cfg.dim);
  pqkv::cpu::attention_sparse(q, keys, c.kv.values.const_view(), sel.const_view(), o.sink, o.window, sparse.view());
  auto const err = pqkv::cpu::relative_output_error(sparse.const_view(), c.dense[static_cast<std::size_t>(s)].const_view());
  out.err.insert(out.err.end(), err.per_head.begin(), err.per_head.end());
  for (index_t g = 0; g < kv_heads; ++g) {
    index_t const t = c.target[static_cast<std::size_t>(s)][static_cast<std::size_t>(g)];
    if (t < 0) { continue; }
    ++out.needle_queries;
    if (attended(sel, g, t, n, o.sink, o.window)) { ++out.needle_hits; }
  }
}

/// Runs the sweep; progress lines go to `log` (may be null).
inline sweep_result run_sweep(sweep_options const& o, std::FILE* log)
{
  auto const t_start = clock_type::now();
  sweep_result r;
  r.opt = o;
  r.threads = pqkv::cpu::num_threads();
  context c;
  c.cfg.tokens = o.tokens;
  c.cfg.seed = o.seed;
  c.cfg.validate("quality_sweep");
  index_t const n = o.tokens, kv_heads = c.cfg.kv_heads, q_heads = c.cfg.q_heads(), dim = c.cfg.dim;
  r.kv_heads = kv_heads;
  r.q_heads = q_heads;
  r.dim = dim;
  std::vector<index_t> ks;
  for (index_t k : o.ks) { ks.push_back(k > 0 ? k : n / 5); }

  auto t0 = clock_type::now();
  c.kv = pqkv::test::make_kv(c.cfg);
  for (index_t s = 0; s < o.queries; ++s) {
    // Every query is issued at position n, the token after the context; the
    // step number varies its topic, content and needle target.
    c.q.emplace_back(q_heads, dim);
    pqkv::test::make_queries(c.cfg, s, n, c.q.back().view());
    c.dense.emplace_back(q_heads, dim);
    pqkv::cpu::attention_dense(pqkv::query_view<float const>{c.q.back().const_view()}, c.kv.keys.const_view(),
                               c.kv.values.const_view(), c.dense.back().view());
    std::vector<index_t> tg;
    for (index_t g = 0; g < kv_heads; ++g) { tg.push_back(pqkv::test::query_target(c.cfg, s, n, g)); }
    c.target.push_back(std::move(tg));
  }
  r.generate_s = seconds_since(t0);
  if (log != nullptr) {
    std::fprintf(log, "context: %lld tokens, %lld queries, dense outputs: %.1f s\n", static_cast<long long>(n),
                 static_cast<long long>(o.queries), r.generate_s);
  }

  // The ceiling: the exact top-k under the same aggregation, sink and window.
  std::vector<std::vector<pqkv::host_tensor<std::int32_t, 2>>> exact(ks.size());  // [k][query]
  std::vector<std::int32_t> valid(static_cast<std::size_t>(kv_heads));
  for (std::size_t ki = 0; ki < ks.size(); ++ki) {
    t0 = clock_type::now();
    pqkv::selection_params const params{.k = ks[ki], .sink = o.sink, .window = o.window};
    pqkv::cpu::exact_topk<pqkv::gqa::softmax_sum> const select{q_heads, kv_heads, dim, params};
    samples smp;
    for (index_t s = 0; s < o.queries; ++s) {
      exact[ki].emplace_back(kv_heads, ks[ki]);
      select(pqkv::query_view<float const>{c.q[static_cast<std::size_t>(s)].const_view()}, c.kv.keys.const_view(), n,
             exact[ki].back().view(), valid);
      score_selection(c, s, exact[ki].back(), nullptr, o, smp);
    }
    r.ceilings.push_back({ks[ki], smp.summary()});
    if (log != nullptr) {
      auto const& q = r.ceilings.back().q;
      std::fprintf(log, "exact top-%lld: mass %.4f (p5 %.4f), err %.4f, needles %lld/%lld  [%.1f s]\n",
                   static_cast<long long>(ks[ki]), q.mass_mean, q.mass_p5, q.err_mean,
                   static_cast<long long>(q.needle_hits), static_cast<long long>(q.needle_queries), seconds_since(t0));
    }
  }

  for (pq_point const pt : o.points) {
    pqkv::pq_config const pq{.dim = dim, .m = pt.m, .nbits = pt.nbits, .max_iter = o.iters, .tol = 0.0,
                             .seed = o.pq_seed, .init = pqkv::init_method::kmeans_plus_plus,
                             .max_train_points = o.train_points};
    t0 = clock_type::now();
    pqkv::codebook book{pq, kv_heads};
    pqkv::host_tensor<std::uint8_t, 3> codes(kv_heads, n, pq.m);  // [kv_heads, n, m]
    pqkv::kmeans_report const rep =
      pqkv::cpu::kmeans_trainer{pq}.train(c.kv.keys.const_view(), book.centroids(), codes.view());
    double const train_s = seconds_since(t0);
    for (std::size_t ki = 0; ki < ks.size(); ++ki) {
      pqkv::selection_params const params{.k = ks[ki], .sink = o.sink, .window = o.window};
      pqkv::cpu::adc_topk<pqkv::gqa::softmax_sum> const select{pq, q_heads, kv_heads, params};
      pqkv::host_tensor<std::int32_t, 2> sel(kv_heads, ks[ki]);
      samples smp;
      double select_s = 0;
      for (index_t s = 0; s < o.queries; ++s) {
        auto const ts = clock_type::now();
        select(pqkv::query_view<float const>{c.q[static_cast<std::size_t>(s)].const_view()}, codes.const_view(),
               std::as_const(book).centroids(), n, sel.view(), valid);
        select_s += seconds_since(ts);
        score_selection(c, s, sel, &exact[ki][static_cast<std::size_t>(s)], o, smp);
      }
      row rw;
      rw.pq = pt;
      rw.k = ks[ki];
      rw.q = smp.summary();
      rw.train_s = train_s;
      rw.train_mse = rep.mse;
      rw.select_ms = 1e3 * select_s / static_cast<double>(std::max<index_t>(o.queries, 1));
      r.rows.push_back(rw);
      if (log != nullptr) {
        std::fprintf(log,
                     "m=%lld nbits=%d k=%lld: mass %.4f (p5 %.4f), recall %.4f, err %.4f, needles %lld/%lld  "
                     "[train+encode %.1f s, select %.1f ms]\n",
                     static_cast<long long>(pt.m), pt.nbits, static_cast<long long>(ks[ki]), rw.q.mass_mean,
                     rw.q.mass_p5, rw.q.recall_mean, rw.q.err_mean, static_cast<long long>(rw.q.needle_hits),
                     static_cast<long long>(rw.q.needle_queries), train_s, rw.select_ms);
      }
    }
  }
  r.total_s = seconds_since(t_start);
  return r;
}

/// Bytes a method keeps on the GPU per token and KV head: uint8 codes (m bytes,
/// whatever nbits), plus the codebook (float centroids) spread over n tokens.
inline double code_bytes(pq_point p) { return static_cast<double>(p.m); }
inline double codebook_bytes_per_token(pq_point p, index_t dim, index_t n)
{
  return 4.0 * static_cast<double>((index_t{1} << p.nbits) * dim) / static_cast<double>(n);
}

inline void json_quality(std::string& s, quality const& q)
{
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "\"mass_mean\": %.6f, \"mass_p5\": %.6f, \"mass_min\": %.6f, \"recall_mean\": %.6f, "
                "\"recall_p5\": %.6f, \"err_mean\": %.6f, \"err_p95\": %.6f, \"needle_queries\": %lld, "
                "\"needle_hits\": %lld, \"needle_hit_rate\": %.6f",
                q.mass_mean, q.mass_p5, q.mass_min, q.recall_mean, q.recall_p5, q.err_mean, q.err_p95,
                static_cast<long long>(q.needle_queries), static_cast<long long>(q.needle_hits), q.needle_rate());
  s += buf;
}

/// The sweep as JSON; `meta` holds extra "key": "value" pairs (date, machine, commit).
inline std::string to_json(sweep_result const& r, std::vector<std::pair<std::string, std::string>> const& meta)
{
  std::string s = "{\n";
  for (auto const& [k, v] : meta) { s += "  \"" + k + "\": \"" + v + "\",\n"; }
  char buf[1024];
  auto const& o = r.opt;
  std::snprintf(buf, sizeof buf,
                "  \"setup\": {\"tokens\": %lld, \"kv_heads\": %lld, \"q_heads\": %lld, \"dim\": %lld, "
                "\"queries\": %lld, \"sink\": %lld, \"window\": %lld, \"train_points\": %lld, \"kmeans_iters\": %d, "
                "\"init\": \"kmeans++\", \"aggregation\": \"gqa::softmax_sum\", \"generator_seed\": %llu, "
                "\"pq_seed\": %llu, \"threads\": %d, \"kv_bf16_bytes_per_token_head\": %lld},\n"
                "  \"generate_s\": %.2f, \"total_s\": %.2f,\n",
                static_cast<long long>(o.tokens), static_cast<long long>(r.kv_heads), static_cast<long long>(r.q_heads),
                static_cast<long long>(r.dim), static_cast<long long>(o.queries), static_cast<long long>(o.sink),
                static_cast<long long>(o.window), static_cast<long long>(o.train_points), o.iters,
                static_cast<unsigned long long>(o.seed), static_cast<unsigned long long>(o.pq_seed), r.threads,
                static_cast<long long>(2 * 2 * r.dim), r.generate_s, r.total_s);
  s += buf;
  s += "  \"ceilings\": [\n";
  for (std::size_t i = 0; i < r.ceilings.size(); ++i) {
    std::snprintf(buf, sizeof buf, "    {\"method\": \"exact_topk\", \"k\": %lld, ",
                  static_cast<long long>(r.ceilings[i].k));
    s += buf;
    json_quality(s, r.ceilings[i].q);
    s += i + 1 < r.ceilings.size() ? "},\n" : "}\n";
  }
  s += "  ],\n  \"rows\": [\n";
  for (std::size_t i = 0; i < r.rows.size(); ++i) {
    row const& rw = r.rows[i];
    std::snprintf(buf, sizeof buf,
                  "    {\"method\": \"pq\", \"m\": %lld, \"nbits\": %d, \"k\": %lld, \"code_bytes_per_token_head\": %.0f, "
                  "\"codebook_bytes_per_token_head\": %.4f, \"train_mse\": %.6g, \"train_encode_s\": %.2f, "
                  "\"select_ms\": %.2f, ",
                  static_cast<long long>(rw.pq.m), rw.pq.nbits, static_cast<long long>(rw.k), code_bytes(rw.pq),
                  codebook_bytes_per_token(rw.pq, r.dim, o.tokens), rw.train_mse, rw.train_s, rw.select_ms);
    s += buf;
    json_quality(s, rw.q);
    // Ratios to the anchor: the exact top-k at the same k.
    for (auto const& c : r.ceilings) {
      if (c.k != rw.k) { continue; }
      std::snprintf(buf, sizeof buf, ", \"mass_over_exact_topk\": %.4f, \"error_over_exact_topk\": %.4f",
                    rw.q.mass_mean / c.q.mass_mean, rw.q.err_mean / c.q.err_mean);
      s += buf;
    }
    s += i + 1 < r.rows.size() ? "},\n" : "}\n";
  }
  s += "  ],\n  \"anchor\": \"exact top-k with the same aggregation, sink and window (ceilings)\"\n}\n";
  return s;
}

inline index_t env_or(char const* name, index_t fallback)
{
  char const* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? static_cast<index_t>(std::strtoll(v, nullptr, 10)) : fallback;
}

}  // namespace pqkv_quality

#ifdef PQKV_QUALITY_SWEEP_MAIN

int main(int argc, char** argv)
{
  using namespace pqkv_quality;
  sweep_options o;
  std::string out_path;
  std::vector<std::pair<std::string, std::string>> meta;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string_view const a = argv[i];
      auto value = [&]() -> std::string {
        PQKV_EXPECTS(i + 1 < argc, "quality_sweep", a, " needs a value");
        return argv[++i];
      };
      auto number = [&]() -> index_t { return static_cast<index_t>(std::stoll(value())); };
      if (a == "--tokens") { o.tokens = number(); }
      else if (a == "--queries") { o.queries = number(); }
      else if (a == "--train-points") { o.train_points = number(); }
      else if (a == "--iters") { o.iters = static_cast<int>(number()); }
      else if (a == "--sink") { o.sink = number(); }
      else if (a == "--window") { o.window = number(); }
      else if (a == "--seed") { o.seed = static_cast<std::uint64_t>(number()); }
      else if (a == "--threads") { pqkv::cpu::set_num_threads(static_cast<int>(number())); }
      else if (a == "--points") {  // "2:6,8:8"
        o.points.clear();
        std::string const v = value();
        for (std::size_t p = 0; p < v.size();) {
          std::size_t const e = std::min(v.find(',', p), v.size());
          std::string const item = v.substr(p, e - p);
          std::size_t const colon = item.find(':');
          PQKV_EXPECTS(colon != std::string::npos, "quality_sweep", "--points item ", item, " is not m:nbits");
          o.points.push_back({std::stoll(item.substr(0, colon)), std::stoi(item.substr(colon + 1))});
          p = e + 1;
        }
      }
      else if (a == "--ks") {  // "2048,0" (0: tokens / 5)
        o.ks.clear();
        std::string const v = value();
        for (std::size_t p = 0; p < v.size();) {
          std::size_t const e = std::min(v.find(',', p), v.size());
          o.ks.push_back(std::stoll(v.substr(p, e - p)));
          p = e + 1;
        }
      }
      else if (a == "--out") { out_path = value(); }
      else if (a == "--meta") {  // key=value, repeatable
        std::string const v = value();
        std::size_t const eq = v.find('=');
        PQKV_EXPECTS(eq != std::string::npos, "quality_sweep", "--meta ", v, " is not key=value");
        meta.emplace_back(v.substr(0, eq), v.substr(eq + 1));
      }
      else {
        PQKV_EXPECTS(false, "quality_sweep", "unknown option ", a,
                     " (--tokens --queries --train-points --iters --sink --window --seed --threads --points --ks "
                     "--out --meta)");
      }
    }
    sweep_result const r = run_sweep(o, stderr);
    std::string const json = to_json(r, meta);
    if (out_path.empty()) {
      std::fputs(json.c_str(), stdout);
    } else {
      std::FILE* f = std::fopen(out_path.c_str(), "w");
      PQKV_EXPECTS(f != nullptr, "quality_sweep", "cannot open ", out_path);
      std::fputs(json.c_str(), f);
      std::fclose(f);
    }
    std::fprintf(stderr, "total %.1f s\n", r.total_s);
  } catch (std::exception const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  return 0;
}

#else

namespace {

using pqkv_quality::index_t;

/// The sweep, run once by the first row's benchmark and shared by the rest.
pqkv_quality::sweep_result const& shared_sweep(double* seconds)
{
  static double elapsed = 0;
  static pqkv_quality::sweep_result const result = [] {
    pqkv_quality::sweep_options o;
    o.tokens = pqkv_quality::env_or("PQKV_QUALITY_TOKENS", o.tokens);
    o.queries = pqkv_quality::env_or("PQKV_QUALITY_QUERIES", o.queries);
    o.train_points = pqkv_quality::env_or("PQKV_QUALITY_TRAIN_POINTS", o.train_points);
    auto r = pqkv_quality::run_sweep(o, nullptr);
    elapsed = r.total_s;
    return r;
  }();
  *seconds = elapsed;
  return result;
}

void set_quality_counters(benchmark::State& state, pqkv_quality::quality const& q)
{
  state.counters["mass_mean"] = q.mass_mean;
  state.counters["mass_p5"] = q.mass_p5;
  state.counters["recall"] = q.recall_mean;
  state.counters["err_vs_dense"] = q.err_mean;
  state.counters["needle_hit_rate"] = q.needle_rate();
}

// Args: m, nbits (0, 0: the exact top-k ceiling), k index (0: 2048, 1: n/5).
void quality_sweep(benchmark::State& state)
{
  auto const m = static_cast<index_t>(state.range(0));
  auto const nbits = static_cast<int>(state.range(1));
  auto const ki = static_cast<std::size_t>(state.range(2));
  double seconds = 0;
  for (auto _ : state) {
    auto const& r = shared_sweep(&seconds);
    benchmark::DoNotOptimize(&r);
  }
  auto const& r = shared_sweep(&seconds);
  state.counters["sweep_s"] = seconds;
  if (m == 0) {
    auto const& c = r.ceilings.at(ki);
    state.counters["k"] = static_cast<double>(c.k);
    set_quality_counters(state, c.q);
    state.SetLabel("exact top-k (ceiling)");
    return;
  }
  for (auto const& rw : r.rows) {
    if (rw.pq.m == m && rw.pq.nbits == nbits && rw.k == r.ceilings.at(ki).k) {
      state.counters["k"] = static_cast<double>(rw.k);
      state.counters["code_bytes_per_token_head"] = pqkv_quality::code_bytes(rw.pq);
      set_quality_counters(state, rw.q);
      state.counters["mass_vs_exact"] = rw.q.mass_mean / r.ceilings.at(ki).q.mass_mean;
      return;
    }
  }
  state.SkipWithError("row not in the sweep");
}

BENCHMARK(quality_sweep)
  ->ArgNames({"m", "nbits", "k_index"})
  ->ArgsProduct({{2}, {6}, {0, 1}})
  ->ArgsProduct({{8, 16, 32}, {8}, {0, 1}})
  ->Args({0, 0, 0})
  ->Args({0, 0, 1})
  ->Iterations(1)
  ->Unit(benchmark::kSecond);

}  // namespace

#endif
