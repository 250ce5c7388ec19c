// SPDX-License-Identifier: Apache-2.0
// pqcache_demo: PQCache-style retrieval attention on one layer of a synthetic
// Llama-3.1-8B-shaped context (8 KV heads, 32 query heads, d = 128).
//
//   prefill: keys + values of `--tokens` positions; train PQ codebooks per
//            (KV head, subspace); encode every key
//   decode:  `--steps` steps; each appends one token (its key is encoded into
//            the codes), scores all past tokens from their codes, keeps the
//            top-k per KV head (plus sink and local window), and attends to them
//
// It prints the time of each stage and how good the selection is against
// exact attention over the full context: recall of the exact top-k, attention
// mass kept, and the error of the attention output. Keys, values and queries
// come from the realistic synthetic generator, or from your own .npy dumps.
#include <pqkv/pqkv.hpp>

#include "common/keygen.hpp"
#include "common/npy.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace {

using pqkv::index_t;
using clock_type = std::chrono::steady_clock;

struct options {
  index_t tokens = 32768;
  index_t steps = 32;
  index_t m = 16;
  int nbits = 8;
  index_t k = 1024;
  index_t sink = 4;
  index_t window = 64;
  int iters = 25;
  index_t train_points = 0;
  std::uint64_t seed = 1;
  int threads = 0;
  std::string keys_npy, values_npy, queries_npy;
};

void usage(std::FILE* out)
{
  std::fputs(
    "usage: pqcache_demo [options]\n"
    "  --tokens N        prefill length (default 32768)\n"
    "  --steps S         decode steps, one token appended each (default 32)\n"
    "  --m M             PQ subspaces, divides 128 (default 16)\n"
    "  --nbits B         bits per code, 1..8 (default 8)\n"
    "  --k K             tokens selected per KV head (default 1024)\n"
    "  --sink N          leading tokens always attended (default 4)\n"
    "  --window N        trailing tokens always attended (default 64)\n"
    "  --iters I         k-means iterations (default 25)\n"
    "  --train-points P  train k-means on a subsample of P tokens; 0: all (default 0)\n"
    "  --seed S          generator and k-means seed (default 1)\n"
    "  --threads T       CPU threads; 0: all (default 0)\n"
    "  --keys F.npy --values F.npy --queries F.npy\n"
    "                    your own dumps: keys and values [kv_heads, n, dim] (f32, f16 or bf16 as u2),\n"
    "                    queries [steps, q_heads, dim] f32 (RoPE applied); the last `steps` keys\n"
    "                    and values are the decode tokens\n",
    out);
}

options parse(int argc, char** argv)
{
  options o;
  auto number = [&](int& i) -> long long {
    if (i + 1 >= argc) { throw pqkv::error(std::string("pqcache_demo: ") + argv[i] + " needs a value"); }
    char* end = nullptr;
    long long const v = std::strtoll(argv[++i], &end, 10);
    if (end == argv[i] || *end != '\0') {
      throw pqkv::error(std::string("pqcache_demo: ") + argv[i - 1] + "=" + argv[i] + " is not an integer");
    }
    return v;
  };
  auto text = [&](int& i) -> std::string {
    if (i + 1 >= argc) { throw pqkv::error(std::string("pqcache_demo: ") + argv[i] + " needs a value"); }
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    std::string_view const a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    }
    if (a == "--tokens") { o.tokens = number(i); }
    else if (a == "--steps") { o.steps = number(i); }
    else if (a == "--m") { o.m = number(i); }
    else if (a == "--nbits") { o.nbits = static_cast<int>(number(i)); }
    else if (a == "--k") { o.k = number(i); }
    else if (a == "--sink") { o.sink = number(i); }
    else if (a == "--window") { o.window = number(i); }
    else if (a == "--iters") { o.iters = static_cast<int>(number(i)); }
    else if (a == "--train-points") { o.train_points = number(i); }
    else if (a == "--seed") { o.seed = static_cast<std::uint64_t>(number(i)); }
    else if (a == "--threads") { o.threads = static_cast<int>(number(i)); }
    else if (a == "--keys") { o.keys_npy = text(i); }
    else if (a == "--values") { o.values_npy = text(i); }
    else if (a == "--queries") { o.queries_npy = text(i); }
    else {
      usage(stderr);
      throw pqkv::error("pqcache_demo: unknown option " + std::string(a));
    }
  }
  PQKV_EXPECTS(o.steps >= 1, "pqcache_demo", "--steps=", o.steps, " must be >= 1");
  PQKV_EXPECTS(o.tokens >= 1, "pqcache_demo", "--tokens=", o.tokens, " must be >= 1");
  return o;
}

double ms_since(clock_type::time_point t0)
{
  return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

/// The whole context: keys and values [kv_heads, capacity, dim] of the prefill
/// and the decode tokens, and the queries of each step [steps, q_heads, dim].
struct context {
  pqkv::host_tensor<float, 3> keys, values, queries;
  index_t prefill = 0;
  std::string source;
};

context synthetic_context(options const& o)
{
  pqkv::test::keygen_config cfg{};
  cfg.tokens = o.tokens;
  cfg.seed = o.seed;
  index_t const capacity = o.tokens + o.steps;
  context c{pqkv::host_tensor<float, 3>(cfg.kv_heads, capacity, cfg.dim),
            pqkv::host_tensor<float, 3>(cfg.kv_heads, capacity, cfg.dim),
            pqkv::host_tensor<float, 3>(o.steps, cfg.q_heads(), cfg.dim), o.tokens,
            "synthetic (RoPE, low-rank, outlier channels, sinks, topic clumps, needles)"};
  // Keys are a pure function of position, so the decode tokens come from the
  // same stream as the prefill.
  pqkv::test::make_keys(cfg, 0, c.keys.view());
  pqkv::test::make_values(cfg, 0, c.values.view());
  for (index_t s = 0; s < o.steps; ++s) {
    // The query of step s is issued at the position of the token it appends.
    pqkv::test::make_queries(cfg, s, o.tokens + s,
                             pqkv::view<float, 2>{c.queries.data() + s * cfg.q_heads() * cfg.dim, cfg.q_heads(),
                                                  cfg.dim});
  }
  return c;
}

context npy_context(options const& o)
{
  PQKV_EXPECTS(!o.values_npy.empty() && !o.queries_npy.empty(), "pqcache_demo",
               "--keys needs --values and --queries too");
  context c{pqkv::test::load_npy_as_float<3>(o.keys_npy), pqkv::test::load_npy_as_float<3>(o.values_npy),
            pqkv::test::load_npy_as_float<3>(o.queries_npy), 0, "npy: " + o.keys_npy};
  index_t const steps = c.queries.extent(0);
  PQKV_EXPECTS(c.values.extent(0) == c.keys.extent(0) && c.values.extent(1) == c.keys.extent(1), "pqcache_demo",
               "values [", c.values.extent(0), ", ", c.values.extent(1), ", ...] do not match keys [",
               c.keys.extent(0), ", ", c.keys.extent(1), ", ...]");
  PQKV_EXPECTS(c.queries.extent(2) == c.keys.extent(2), "pqcache_demo", "queries.extent(2)=", c.queries.extent(2),
               ", keys.extent(2)=", c.keys.extent(2));
  PQKV_EXPECTS(c.keys.extent(1) > steps, "pqcache_demo", "keys hold ", c.keys.extent(1),
               " tokens, not more than the ", steps, " decode steps of the queries");
  c.prefill = c.keys.extent(1) - steps;
  return c;
}

/// keys[:, 0:n, :] of a [heads, capacity, dim] tensor, as a strided view.
pqkv::kv_view<float const> leading_tokens(pqkv::host_tensor<float, 3> const& t, index_t first, index_t count)
{
  index_t const heads = t.extent(0), capacity = t.extent(1), dim = t.extent(2);
  return pqkv::make_strided_view<float const, 3>(t.data() + first * dim, {heads, count, dim},
                                                 {capacity * dim, dim, 1});
}

struct running_mean {
  double sum = 0;
  index_t count = 0;
  void add(double x)
  {
    sum += x;
    ++count;
  }
  [[nodiscard]] double mean() const { return count > 0 ? sum / static_cast<double>(count) : 0.0; }
};

int run(options const& o)
{
  pqkv::cpu::set_num_threads(o.threads);
  auto t0 = clock_type::now();
  context ctx = o.keys_npy.empty() ? synthetic_context(o) : npy_context(o);
  double const gen_ms = ms_since(t0);
  index_t const kv_heads = ctx.keys.extent(0), capacity = ctx.keys.extent(1), dim = ctx.keys.extent(2);
  index_t const q_heads = ctx.queries.extent(1), steps = ctx.queries.extent(0), n0 = ctx.prefill;

  pqkv::pq_config const pq{.dim = dim, .m = o.m, .nbits = o.nbits, .max_iter = o.iters, .tol = 0.0,
                           .seed = o.seed, .init = pqkv::init_method::kmeans_plus_plus,
                           .max_train_points = o.train_points};
  pqkv::selection_params const params{.k = o.k, .sink = o.sink, .window = o.window};
  pqkv::cpu::kmeans_trainer const trainer{pq};
  pqkv::cpu::pq_encoder const encoder{pq};
  pqkv::cpu::adc_topk<pqkv::gqa::softmax_sum> const select{pq, q_heads, kv_heads, params};
  pqkv::cpu::exact_topk<pqkv::gqa::softmax_sum> const exact{q_heads, kv_heads, dim, params};

  std::printf("pqkv pqcache_demo: CPU backend, %d threads\n", pqkv::cpu::num_threads());
  std::printf("context: %s\n", ctx.source.c_str());
  std::printf("shape:   %lld KV heads, %lld query heads, d=%lld, prefill %lld tokens, %lld decode steps\n",
              static_cast<long long>(kv_heads), static_cast<long long>(q_heads), static_cast<long long>(dim),
              static_cast<long long>(n0), static_cast<long long>(steps));
  std::printf("PQ:      m=%lld, %d bits (%lld centroids of %lld dims), %d k-means iterations, k-means++ init\n",
              static_cast<long long>(pq.m), pq.nbits, static_cast<long long>(pq.ksub()),
              static_cast<long long>(pq.dsub()), pq.max_iter);
  std::printf("budget:  top-%lld per KV head + %lld sink + %lld window, GQA softmax-sum (PQCache)\n\n",
              static_cast<long long>(o.k), static_cast<long long>(o.sink), static_cast<long long>(o.window));

  // ---- prefill: train and encode ----
  pqkv::codebook book{pq, kv_heads};
  t0 = clock_type::now();
  pqkv::kmeans_report const report = trainer.train(leading_tokens(ctx.keys, 0, n0), book.centroids());
  double const train_ms = ms_since(t0);

  pqkv::host_tensor<std::uint8_t, 3> codes(kv_heads, capacity, pq.m);  // [kv_heads, capacity, m]
  t0 = clock_type::now();
  encoder.append(leading_tokens(ctx.keys, 0, n0), book.centroids(), codes.view(), 0);
  double const encode_ms = ms_since(t0);

  // ---- decode ----
  pqkv::host_tensor<std::int32_t, 2> chosen(kv_heads, o.k), truth(kv_heads, o.k);
  std::vector<std::int32_t> chosen_valid(static_cast<std::size_t>(kv_heads)), truth_valid(chosen_valid.size());
  pqkv::host_tensor<float, 2> out_sparse(q_heads, dim), out_exact_topk(q_heads, dim), out_dense(q_heads, dim);
  running_mean append_ms, score_ms, attend_ms, recall, mass, err, mass_ceiling, err_ceiling;
  for (index_t s = 0; s < steps; ++s) {
    index_t const n = n0 + s + 1;  // the step's own token is attended too
    pqkv::query_view<float const> const q =
      pqkv::make_view(static_cast<float const*>(ctx.queries.data() + s * q_heads * dim), q_heads, dim);

    t0 = clock_type::now();
    encoder.append(leading_tokens(ctx.keys, n - 1, 1), book.centroids(), codes.view(), n - 1);
    append_ms.add(ms_since(t0));

    t0 = clock_type::now();
    select(q, codes.const_view(), book.centroids(), n, chosen.view(), chosen_valid);
    score_ms.add(ms_since(t0));

    auto const keys = leading_tokens(ctx.keys, 0, n);
    auto const values = leading_tokens(ctx.values, 0, n);
    t0 = clock_type::now();
    pqkv::cpu::attention_sparse(q, keys, values, chosen.const_view(), o.sink, o.window, out_sparse.view());
    attend_ms.add(ms_since(t0));

    // Quality against exact attention over every token.
    exact(q, keys, n, truth.view(), truth_valid);
    pqkv::cpu::attention_sparse(q, keys, values, truth.const_view(), o.sink, o.window, out_exact_topk.view());
    pqkv::cpu::attention_dense(q, keys, values, out_dense.view());
    recall.add(pqkv::cpu::recall_at_k(chosen.const_view(), truth.const_view()).mean);
    mass.add(pqkv::cpu::attention_mass_kept(q, keys, chosen.const_view(), o.sink, o.window).mean);
    mass_ceiling.add(pqkv::cpu::attention_mass_kept(q, keys, truth.const_view(), o.sink, o.window).mean);
    err.add(pqkv::cpu::relative_output_error(out_sparse.const_view(), out_dense.const_view()).mean);
    err_ceiling.add(pqkv::cpu::relative_output_error(out_exact_topk.const_view(), out_dense.const_view()).mean);
  }

  // ---- report ----
  index_t const n_final = n0 + steps;
  double const kv_bf16 = 2.0 * 2.0 * static_cast<double>(kv_heads * n_final * dim);  // K + V, 2 bytes each
  double const code_bytes = static_cast<double>(kv_heads * n_final * pq.m);
  double const book_bytes = 4.0 * static_cast<double>(kv_heads * pq.m * pq.ksub() * pq.dsub());
  double const fetched = 2.0 * 2.0 * static_cast<double>(kv_heads * (o.k + o.sink + o.window) * dim);

  std::printf("%-40s %12s\n", "stage", "time");
  std::printf("%-40s %9.1f ms\n", "generate / load context", gen_ms);
  std::printf("%-40s %9.1f ms  (%d iterations, MSE %.4g)\n", "train codebooks (k-means)", train_ms,
              report.iterations, report.mse);
  std::printf("%-40s %9.1f ms\n", "encode prefill", encode_ms);
  std::printf("%-40s %9.3f ms\n", "append one token's codes (mean/step)", append_ms.mean());
  std::printf("%-40s %9.3f ms\n", "score + top-k (mean/step)", score_ms.mean());
  std::printf("%-40s %9.3f ms\n\n", "sparse attention (mean/step)", attend_ms.mean());

  std::printf("%-40s %12s %12s\n", "selection quality (mean over steps)", "PQ top-k", "exact top-k");
  std::printf("%-40s %12.3f %12.3f\n", "recall@k of the exact top-k", recall.mean(), 1.0);
  std::printf("%-40s %12.3f %12.3f\n", "attention mass kept", mass.mean(), mass_ceiling.mean());
  std::printf("%-40s %12.4f %12.4f\n\n", "attention output error vs dense", err.mean(), err_ceiling.mean());

  std::printf("%-40s %12.1f MiB\n", "full K+V of the layer (bf16)", kv_bf16 / (1 << 20));
  std::printf("%-40s %12.2f MiB  (%.1f%% of K+V)\n", "kept on the GPU: codes + codebook",
              (code_bytes + book_bytes) / (1 << 20), 100.0 * (code_bytes + book_bytes) / kv_bf16);
  std::printf("%-40s %12.2f MiB  (%.1f%% of K+V)\n", "K+V rows attended per step", fetched / (1 << 20),
              100.0 * fetched / kv_bf16);
  return 0;
}

}  // namespace

int main(int argc, char** argv)
{
  try {
    return run(parse(argc, argv));
  } catch (pqkv::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}
