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
//
// Backends: `cpu` (pqkv::cpu), `gpu` (pqkv::gpu through backend.hpp; the
// binary has it when built with CUDA) or `auto` (gpu when the binary has it
// and a device is present). With the GPU, the CPU reference reruns the
// encoder and the scorer on the GPU's own centroids, codes and queries, and
// the demo prints how far the two agree (and, with --cpu-train, trains on the
// CPU too and compares the k-means).
#include "backend.hpp"

#include <pqkv/pqkv.hpp>

#include "common/keygen.hpp"
#include "common/npy.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
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
  std::string backend = "auto";
  bool cpu_train = false;
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
    "  --backend B       cpu, gpu or auto: gpu when this binary has CUDA and a device is present (default auto)\n"
    "  --cpu-train       with the GPU backend, also train on the CPU and compare (time, init, MSE)\n"
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
    else if (a == "--backend") { o.backend = text(i); }
    else if (a == "--cpu-train") { o.cpu_train = true; }
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
  PQKV_EXPECTS(o.backend == "cpu" || o.backend == "gpu" || o.backend == "auto", "pqcache_demo", "--backend=",
               o.backend, " is not cpu, gpu or auto");
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

/// Which backend runs, and why (the device's name for the GPU).
struct backend_choice {
  bool gpu = false;
  std::string why;
};

backend_choice choose_backend(std::string const& requested)
{
  if (requested == "cpu") { return {false, "requested with --backend cpu"}; }
#if defined(PQKV_DEMO_HAS_CUDA)
  pqcache_demo::gpu_probe const probe = pqcache_demo::probe_gpu();
  if (probe.usable) { return {true, probe.detail}; }
  PQKV_EXPECTS(requested != "gpu", "pqcache_demo", "--backend gpu: ", probe.detail);
  return {false, "auto: " + probe.detail};
#else
  PQKV_EXPECTS(requested != "gpu", "pqcache_demo",
               "--backend gpu: this binary was built without CUDA (configure with the cuda preset)");
  return {false, "auto: this binary was built without CUDA; configure with the cuda preset for the GPU"};
#endif
}

/// Tokens two ascending, -1 padded selections [kv_heads, k] share, and rows
/// that are identical.
struct agreement {
  double shared = 0, total = 0;
  index_t same_rows = 0, rows = 0;
  void add(pqkv::selection_view<std::int32_t const> a, std::span<std::int32_t const> va,
           pqkv::selection_view<std::int32_t const> b, std::span<std::int32_t const> vb)
  {
    for (index_t g = 0; g < a.extent(0); ++g) {
      index_t const na = va[static_cast<std::size_t>(g)], nb = vb[static_cast<std::size_t>(g)];
      index_t i = 0, j = 0, common = 0;
      while (i < na && j < nb) {
        if (a(g, i) == b(g, j)) {
          ++common;
          ++i;
          ++j;
        } else if (a(g, i) < b(g, j)) {
          ++i;
        } else {
          ++j;
        }
      }
      shared += static_cast<double>(common);
      total += static_cast<double>(std::max(na, nb));
      same_rows += (na == nb && common == na) ? 1 : 0;
      ++rows;
    }
  }
  [[nodiscard]] double fraction() const { return total > 0 ? shared / total : 1.0; }
};

/// Share of equal bytes of code rows [first, first + count) in two code buffers.
struct code_match {
  index_t equal = 0, total = 0;
  void add(pqkv::host_tensor<std::uint8_t, 3> const& a, pqkv::host_tensor<std::uint8_t, 3> const& b, index_t first,
           index_t count)
  {
    for (index_t h = 0; h < a.extent(0); ++h) {
      for (index_t t = first; t < first + count; ++t) {
        for (index_t s = 0; s < a.extent(2); ++s) {
          equal += a.view()(h, t, s) == b.view()(h, t, s) ? 1 : 0;
          ++total;
        }
      }
    }
  }
  [[nodiscard]] double percent() const { return total > 0 ? 100.0 * static_cast<double>(equal) / static_cast<double>(total) : 100.0; }
};

/// One table row: the GPU and the CPU time of a stage; NaN for "not run".
void stage_row(char const* label, double gpu_ms, double cpu_ms, char const* note = "")
{
  auto cell = [](double v) {
    char buf[32];
    if (std::isnan(v)) {
      std::snprintf(buf, sizeof buf, "%12s", "-");
    } else {
      std::snprintf(buf, sizeof buf, v < 10 ? "%9.3f ms" : "%9.1f ms", v);
    }
    return std::string(buf);
  };
  std::printf("%-40s %s %s  %s\n", label, cell(gpu_ms).c_str(), cell(cpu_ms).c_str(), note);
}

int run(options const& o)
{
  pqkv::cpu::set_num_threads(o.threads);
  backend_choice const backend = choose_backend(o.backend);
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

  if (backend.gpu) {
    std::printf("pqkv pqcache_demo: GPU backend on %s; CPU reference checks on %d threads\n", backend.why.c_str(),
                pqkv::cpu::num_threads());
  } else {
    std::printf("pqkv pqcache_demo: CPU backend, %d threads (%s)\n", pqkv::cpu::num_threads(), backend.why.c_str());
  }
  std::printf("context: %s\n", ctx.source.c_str());
  std::printf("shape:   %lld KV heads, %lld query heads, d=%lld, prefill %lld tokens, %lld decode steps\n",
              static_cast<long long>(kv_heads), static_cast<long long>(q_heads), static_cast<long long>(dim),
              static_cast<long long>(n0), static_cast<long long>(steps));
  std::printf("PQ:      m=%lld, %d bits (%lld centroids of %lld dims), %d k-means iterations, k-means++ init\n",
              static_cast<long long>(pq.m), pq.nbits, static_cast<long long>(pq.ksub()),
              static_cast<long long>(pq.dsub()), pq.max_iter);
  std::printf("budget:  top-%lld per KV head + %lld sink + %lld window, GQA softmax-sum (PQCache)\n\n",
              static_cast<long long>(o.k), static_cast<long long>(o.sink), static_cast<long long>(o.window));

  double constexpr none = std::numeric_limits<double>::quiet_NaN();
  pqkv::codebook book{pq, kv_heads};
  pqkv::host_tensor<std::uint8_t, 3> codes(kv_heads, capacity, pq.m);  // [kv_heads, capacity, m]
  pqkv::kmeans_report report;
  double upload_ms = none, train_gpu_ms = none, train_cpu_ms = none, encode_gpu_ms = none, encode_cpu_ms = none;
  pqkv::kmeans_report cpu_report;  // with --cpu-train on the GPU backend
  bool cpu_trained = false;

  // GPU state and the CPU reference's mirror of the GPU's codes.
#if defined(PQKV_DEMO_HAS_CUDA)
  std::unique_ptr<pqcache_demo::gpu_backend> gpu;
#endif
  pqkv::host_tensor<std::uint8_t, 3> ref_codes(kv_heads, capacity, pq.m);
  code_match codes_equal;
  agreement selected;

  // ---- prefill: train and encode ----
  if (backend.gpu) {
#if defined(PQKV_DEMO_HAS_CUDA)
    gpu = std::make_unique<pqcache_demo::gpu_backend>(pq, kv_heads, q_heads, capacity, n0, params);
    upload_ms = gpu->upload_keys(leading_tokens(ctx.keys, 0, capacity));
    train_gpu_ms = gpu->train(report);
    gpu->download_centroids(book.centroids());
    encode_gpu_ms = gpu->encode_prefill();
    gpu->download_codes(0, n0, codes.view());
    // The CPU encoder on the GPU's centroids: the codes must be the same.
    t0 = clock_type::now();
    encoder.append(leading_tokens(ctx.keys, 0, n0), book.centroids(), ref_codes.view(), 0);
    encode_cpu_ms = ms_since(t0);
    codes_equal.add(codes, ref_codes, 0, n0);
    if (o.cpu_train) {
      pqkv::codebook cpu_book{pq, kv_heads};
      t0 = clock_type::now();
      cpu_report = trainer.train(leading_tokens(ctx.keys, 0, n0), cpu_book.centroids());
      train_cpu_ms = ms_since(t0);
      cpu_trained = true;
    }
#endif
  } else {
    t0 = clock_type::now();
    report = trainer.train(leading_tokens(ctx.keys, 0, n0), book.centroids());
    train_cpu_ms = ms_since(t0);
    t0 = clock_type::now();
    encoder.append(leading_tokens(ctx.keys, 0, n0), book.centroids(), codes.view(), 0);
    encode_cpu_ms = ms_since(t0);
  }

  // ---- decode ----
  pqkv::host_tensor<std::int32_t, 2> chosen(kv_heads, o.k), truth(kv_heads, o.k), ref_chosen(kv_heads, o.k);
  std::vector<std::int32_t> chosen_valid(static_cast<std::size_t>(kv_heads)), truth_valid(chosen_valid.size()),
    ref_valid(chosen_valid.size());
  pqkv::host_tensor<float, 2> out_sparse(q_heads, dim), out_exact_topk(q_heads, dim), out_dense(q_heads, dim);
  running_mean append_gpu, append_cpu, score_gpu, score_cpu, attend_ms, recall, mass, err, mass_ceiling,
    err_ceiling;
  for (index_t s = 0; s < steps; ++s) {
    index_t const n = n0 + s + 1;  // the step's own token is attended too
    pqkv::query_view<float const> const q =
      pqkv::make_view(static_cast<float const*>(ctx.queries.data() + s * q_heads * dim), q_heads, dim);

    if (backend.gpu) {
#if defined(PQKV_DEMO_HAS_CUDA)
      append_gpu.add(gpu->append(n - 1));
      gpu->download_codes(n - 1, 1, codes.view());
      t0 = clock_type::now();
      encoder.append(leading_tokens(ctx.keys, n - 1, 1), book.centroids(), ref_codes.view(), n - 1);
      append_cpu.add(ms_since(t0));
      codes_equal.add(codes, ref_codes, n - 1, 1);

      score_gpu.add(gpu->select(q, n, chosen.view(), chosen_valid));
      // The CPU scorer on the GPU's codes and centroids: the same inputs.
      t0 = clock_type::now();
      select(q, codes.const_view(), book.centroids(), n, ref_chosen.view(), ref_valid);
      score_cpu.add(ms_since(t0));
      selected.add(chosen.const_view(), chosen_valid, ref_chosen.const_view(), ref_valid);
#endif
    } else {
      t0 = clock_type::now();
      encoder.append(leading_tokens(ctx.keys, n - 1, 1), book.centroids(), codes.view(), n - 1);
      append_cpu.add(ms_since(t0));

      t0 = clock_type::now();
      select(q, codes.const_view(), book.centroids(), n, chosen.view(), chosen_valid);
      score_cpu.add(ms_since(t0));
    }

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
  auto mean_or_none = [&](running_mean const& r) { return r.count > 0 ? r.mean() : none; };

  std::printf("%-40s %12s %12s  (GPU: CUDA events; CPU: wall clock)\n", "stage", "GPU", "CPU");
  stage_row("generate / load context", none, gen_ms);
  if (backend.gpu) { stage_row("upload K to the GPU", upload_ms, none); }
  char train_note[160];
  std::snprintf(train_note, sizeof train_note, "(%d iterations, MSE %.4g)", report.iterations, report.mse);
  stage_row("train codebooks (k-means)", train_gpu_ms, train_cpu_ms, cpu_trained ? "" : train_note);
  stage_row("encode prefill", encode_gpu_ms, encode_cpu_ms, backend.gpu ? "(CPU: the check on the GPU's centroids)" : "");
  stage_row("append one token's codes (mean/step)", mean_or_none(append_gpu), mean_or_none(append_cpu));
  stage_row("score + top-k (mean/step)", mean_or_none(score_gpu), mean_or_none(score_cpu),
            backend.gpu ? "(CPU: the check on the GPU's codes)" : "");
  stage_row("sparse attention (mean/step)", none, attend_ms.mean(), "(the engine's kernel; CPU here)");
  std::printf("\n");

  if (backend.gpu) {
    std::printf("GPU against the CPU reference on the same inputs\n");
    std::printf("%-56s %9.3f %%\n", "codes equal (GPU encoder vs CPU, same centroids)", codes_equal.percent());
    std::printf("%-56s %9.3f %%  (%lld of %lld rows identical)\n",
                "selected tokens shared (GPU adc_topk vs CPU, same codes)", 100.0 * selected.fraction(),
                static_cast<long long>(selected.same_rows), static_cast<long long>(selected.rows));
    if (cpu_trained) {
      std::printf("%-56s %12s %12s\n", "k-means, same seed and config", "GPU", "CPU");
      std::printf("%-56s %12.6g %12.6g  (k-means++ init: %s)\n", "MSE of the init", report.objective.front(),
                  cpu_report.objective.front(),
                  std::abs(report.objective.front() - cpu_report.objective.front()) <=
                      1e-9 * cpu_report.objective.front()
                    ? "the same centroids"
                    : "DIFFERENT");
      std::printf("%-56s %12.6g %12.6g  (GPU / CPU = %.4f)\n", "final MSE", report.mse, cpu_report.mse,
                  report.mse / cpu_report.mse);
      std::printf("%-56s %12d %12d\n", "iterations", report.iterations, cpu_report.iterations);
    }
    std::printf("\n");
  }

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
