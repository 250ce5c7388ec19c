// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::kmeans_trainer against pqkv::cpu::kmeans_trainer on the same
// keys: identical init (random_sample, subsample, n < ksub) and, from the same
// centroids, identical assignments; final MSE within 1% after Lloyd;
// empty-cluster repair picks the CPU's rows; the tolerance stop; determinism;
// half / bf16 / strided keys; bad inputs throw before any launch; k-means++
// init draws the CPU's centroids bit for bit (every dsub, several group and
// stage boundaries, subsample, half / bf16, duplicate rows), then Lloyd from
// it reaches the CPU's MSE within 1%. The tensor-core assignment equals the
// FP32 one and the CPU's bit for bit (random, large offset, near-tied
// centroids that force the counted exact fallback), and Lloyd on either path
// gives bit-identical centroids.
#include <pqkv/codebook/kmeans.cuh>
#include <pqkv/codebook/kmeans.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/random.hpp>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"
#include "common/test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::contains;
using pqkv::test::error_message;

/// Keys [heads, tokens, dim]: blobs plus noise (structure without degeneracy).
std::vector<float> make_keys(index_t heads, index_t tokens, index_t dim, std::uint64_t seed)
{
  std::vector<float> k(static_cast<std::size_t>(heads * tokens * dim));
  for (index_t h = 0; h < heads; ++h) {
    for (index_t t = 0; t < tokens; ++t) {
      auto const blob = pqkv::detail::random_below(seed, 100 + static_cast<std::uint64_t>(h), static_cast<std::uint64_t>(t), 9);
      for (index_t d = 0; d < dim; ++d) {
        double const center = 3.0 * (pqkv::detail::random_unit(seed, 200 + blob, static_cast<std::uint64_t>(d)) - 0.5);
        k[static_cast<std::size_t>((h * tokens + t) * dim + d)] =
          static_cast<float>(center + pqkv::test::noise(seed + static_cast<std::uint64_t>(h), static_cast<std::uint64_t>(t * dim + d)));
      }
    }
  }
  return k;
}

using pqkv::test::download;
using pqkv::test::upload;

/// Results of one training run.
struct run_result {
  std::vector<float> centroids;       // [heads, m, ksub, dsub]
  std::vector<std::uint8_t> codes;    // [heads, tokens, m] (empty when not asked)
  pqkv::kmeans_report report;
};

run_result run_cpu(pqkv::pq_config const& cfg, std::vector<float> const& keys, index_t heads, index_t tokens,
                   std::vector<float> const& init, bool with_codes)
{
  run_result r;
  r.centroids = init;
  r.centroids.resize(static_cast<std::size_t>(heads * cfg.m * cfg.ksub() * cfg.dsub()));
  auto const kv = pqkv::make_view(keys.data(), heads, tokens, cfg.dim);
  auto const cv = pqkv::make_view(r.centroids.data(), heads, cfg.m, cfg.ksub(), cfg.dsub());
  pqkv::cpu::kmeans_trainer const tr{cfg};
  if (with_codes) {
    r.codes.assign(static_cast<std::size_t>(heads * tokens * cfg.m), 0);
    r.report = tr.train(kv, cv, pqkv::make_view(r.codes.data(), heads, tokens, cfg.m));
  } else {
    r.report = tr.train(kv, cv);
  }
  return r;
}

template <class Key = float>
run_result run_gpu(pqkv::pq_config const& cfg, std::vector<Key> const& keys, index_t heads, index_t tokens,
                   std::vector<float> const& init, bool with_codes, pqkv::gpu::assign_tuning const& tuning = {})
{
  run_result r;
  std::size_t const nc = static_cast<std::size_t>(heads * cfg.m * cfg.ksub() * cfg.dsub());
  std::vector<float> c0 = init;
  c0.resize(nc, -7.f);  // poison when not provided: every element must be written
  auto dk = upload(keys);
  auto dc = upload(c0);
  pqkv::device_buffer<std::uint8_t> dcodes(static_cast<std::size_t>(heads * tokens * cfg.m));
  pqkv::gpu::kmeans_trainer const tr{cfg, {.max_heads = heads, .max_tokens = tokens}, tuning};
  pqkv::device_buffer<std::byte> ws(tr.workspace_bytes());
  auto const kv = pqkv::make_view(static_cast<Key const*>(dk.data()), heads, tokens, cfg.dim);
  auto const cv = pqkv::make_view(dc.data(), heads, cfg.m, cfg.ksub(), cfg.dsub());
  if (with_codes) {
    tr.train(kv, cv, pqkv::make_view(dcodes.data(), heads, tokens, cfg.m), ws.span(), nullptr);
  } else {
    tr.train(kv, cv, ws.span(), nullptr);
  }
  r.report = tr.report(ws.span(), nullptr);
  r.centroids = download(dc, nc);
  if (with_codes) { r.codes = download(dcodes, dcodes.size()); }
  return r;
}

/// Centroids rows [heads, m, ksub, dsub] taken from the keys (a fixed init).
std::vector<float> rows_init(pqkv::pq_config const& cfg, std::vector<float> const& keys, index_t heads,
                             index_t tokens, std::uint64_t seed)
{
  index_t const ksub = cfg.ksub(), dsub = cfg.dsub();
  std::vector<float> c(static_cast<std::size_t>(heads * cfg.m * ksub * dsub));
  for (index_t h = 0; h < heads; ++h) {
    for (index_t s = 0; s < cfg.m; ++s) {
      for (index_t k = 0; k < ksub; ++k) {
        auto const t = static_cast<index_t>(pqkv::detail::random_below(seed, static_cast<std::uint64_t>(h * 64 + s),
                                                                       static_cast<std::uint64_t>(k),
                                                                       static_cast<std::uint64_t>(tokens)));
        for (index_t j = 0; j < dsub; ++j) {
          c[static_cast<std::size_t>(((h * cfg.m + s) * ksub + k) * dsub + j)] =
            keys[static_cast<std::size_t>((h * tokens + t) * cfg.dim + s * dsub + j)];
        }
      }
    }
  }
  return c;
}

/// "" when equal, else where the first difference is: (head, subspace, centroid, channel) and both values.
std::string first_difference(pqkv::pq_config const& cfg, std::vector<float> const& gpu, std::vector<float> const& cpu)
{
  if (gpu.size() != cpu.size()) { return "sizes " + std::to_string(gpu.size()) + " vs " + std::to_string(cpu.size()); }
  index_t const ksub = cfg.ksub(), dsub = cfg.dsub();
  for (std::size_t e = 0; e < gpu.size(); ++e) {
    if (std::memcmp(&gpu[e], &cpu[e], sizeof(float)) != 0) {
      auto const i = static_cast<index_t>(e);
      index_t const p = i / (ksub * dsub);
      return "head " + std::to_string(p / cfg.m) + " subspace " + std::to_string(p % cfg.m) + " centroid " +
             std::to_string(i / dsub % ksub) + " channel " + std::to_string(i % dsub) + ": gpu " +
             std::to_string(gpu[e]) + ", cpu " + std::to_string(cpu[e]);
    }
  }
  return "";
}

pqkv::pq_config small_config(index_t dim, index_t m, int nbits, int iters, pqkv::init_method init)
{
  pqkv::pq_config cfg;
  cfg.dim = dim;
  cfg.m = m;
  cfg.nbits = nbits;
  cfg.max_iter = iters;
  cfg.tol = 0;
  cfg.seed = 99;
  cfg.init = init;
  return cfg;
}

/// "" when equal, else the first (head, token, subspace) whose code differs.
std::string first_code_difference(std::vector<std::uint8_t> const& got, std::vector<std::uint8_t> const& want,
                                  index_t tokens, index_t m)
{
  if (got.size() != want.size()) { return "sizes differ"; }
  for (std::size_t e = 0; e < got.size(); ++e) {
    if (got[e] != want[e]) {
      auto const i = static_cast<index_t>(e);
      return "head " + std::to_string(i / (tokens * m)) + " token " + std::to_string(i / m % tokens) + " subspace " +
             std::to_string(i % m) + ": got " + std::to_string(got[e]) + ", want " + std::to_string(want[e]);
    }
  }
  return "";
}

/// Trains on both GPU paths and the CPU from `init`; checks codes (and, with
/// iterations, centroids and objectives) agree; returns the TC fallback rows.
unsigned long long check_assign_paths(pqkv::pq_config const& cfg, std::vector<float> const& keys, index_t heads,
                                      index_t tokens, std::vector<float> const& init)
{
  pqkv::device_buffer<unsigned long long> counter(1);
  PQKV_CUDA_TRY(cudaMemset(counter.data(), 0, sizeof(unsigned long long)));
  auto const simt = run_gpu(cfg, keys, heads, tokens, init, true, {.path = pqkv::gpu::assign_path::simt});
  auto const tc = run_gpu(cfg, keys, heads, tokens, init, true,
                          {.path = pqkv::gpu::assign_path::tensor_core, .fallback_counter = counter.data()});
  CHECK_MESSAGE(first_code_difference(tc.codes, simt.codes, tokens, cfg.m) == "", "tensor cores vs FP32");
  CHECK_MESSAGE(first_difference(cfg, tc.centroids, simt.centroids) == "", "centroids: tensor cores vs FP32");
  CHECK(tc.report.objective == simt.report.objective);  // the same distances summed in the same order
  if (cfg.max_iter == 0) {
    auto const cpu = run_cpu(cfg, keys, heads, tokens, init, true);
    CHECK_MESSAGE(first_code_difference(tc.codes, cpu.codes, tokens, cfg.m) == "", "tensor cores vs cpu");
  }
  unsigned long long fb = 0;
  PQKV_CUDA_TRY(cudaMemcpy(&fb, counter.data(), sizeof(fb), cudaMemcpyDeviceToHost));
  return fb;
}

}  // namespace

TEST_CASE("gpu kmeans: from the same centroids the assignment equals the CPU's")
{
  PQKV_REQUIRE_GPU();
  struct shape {
    index_t dim, m;
    int nbits;
  };
  for (auto const sh : {shape{64, 4, 6}, shape{32, 8, 4}, shape{128, 1, 5}, shape{64, 2, 8}, shape{128, 32, 3}}) {
    CAPTURE(sh.m);
    CAPTURE(sh.nbits);
    index_t const heads = 2, tokens = 1500;
    auto const cfg = small_config(sh.dim, sh.m, sh.nbits, 0, pqkv::init_method::provided);
    auto const keys = make_keys(heads, tokens, sh.dim, 5);
    auto const init = rows_init(cfg, keys, heads, tokens, 3);
    auto const cpu = run_cpu(cfg, keys, heads, tokens, init, true);
    auto const gpu = run_gpu(cfg, keys, heads, tokens, init, true);
    CHECK(gpu.codes == cpu.codes);
    CHECK(gpu.centroids == cpu.centroids);  // max_iter = 0: untouched
    REQUIRE(gpu.report.objective.size() == 1);
    CHECK(gpu.report.objective[0] == doctest::Approx(cpu.report.objective[0]).epsilon(1e-9));
    CHECK(gpu.report.iterations == 0);
  }
}

TEST_CASE("gpu kmeans: Lloyd from the same init reaches the CPU's MSE within 1%")
{
  PQKV_REQUIRE_GPU();
  struct shape {
    index_t dim, m;
    int nbits;
  };
  // dsub 16 (4, 6, 8 bits), 64 (the largest with shared-memory sums), 128 (global sums), 4
  for (auto const sh : {shape{64, 4, 4}, shape{64, 4, 6}, shape{64, 4, 8}, shape{128, 2, 8}, shape{128, 1, 6},
                        shape{128, 32, 5}}) {
    CAPTURE(sh.m);
    CAPTURE(sh.nbits);
    index_t const heads = 2, tokens = 2048, dim = sh.dim, m = sh.m;
    int const nbits = sh.nbits;
    auto const cfg = small_config(dim, m, nbits, 8, pqkv::init_method::provided);
    auto const keys = make_keys(heads, tokens, dim, 11);
    auto const init = rows_init(cfg, keys, heads, tokens, 4);
    auto const cpu = run_cpu(cfg, keys, heads, tokens, init, true);
    auto const gpu = run_gpu(cfg, keys, heads, tokens, init, true);
    CHECK(gpu.report.iterations == cpu.report.iterations);
    REQUIRE(gpu.report.objective.size() == cpu.report.objective.size());
    CHECK(gpu.report.objective[0] == doctest::Approx(cpu.report.objective[0]).epsilon(1e-9));
    CHECK(std::abs(gpu.report.mse - cpu.report.mse) <= 0.01 * cpu.report.mse);
    // objective non-increasing on the GPU too
    for (std::size_t i = 1; i < gpu.report.objective.size(); ++i) {
      CHECK(gpu.report.objective[i] <= gpu.report.objective[i - 1] * (1 + 1e-6));
    }
    std::size_t same = 0;
    for (std::size_t i = 0; i < cpu.codes.size(); ++i) { same += cpu.codes[i] == gpu.codes[i] ? 1 : 0; }
    CHECK(static_cast<double>(same) >= 0.95 * static_cast<double>(cpu.codes.size()));
  }
}

TEST_CASE("gpu kmeans: random_sample init, subsample and n < ksub draw the CPU's rows")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 3, tokens = 900, dim = 32;
  auto const keys = make_keys(heads, tokens, dim, 21);
  SUBCASE("random_sample")
  {
    auto const cfg = small_config(dim, 4, 8, 0, pqkv::init_method::random_sample);
    auto const cpu = run_cpu(cfg, keys, heads, tokens, {}, false);
    auto const gpu = run_gpu(cfg, keys, heads, tokens, {}, false);
    CHECK(gpu.centroids == cpu.centroids);
  }
  SUBCASE("random_sample with a subsample")
  {
    auto cfg = small_config(dim, 8, 6, 0, pqkv::init_method::random_sample);
    cfg.max_train_points = 400;
    auto const cpu = run_cpu(cfg, keys, heads, tokens, {}, false);
    auto const gpu = run_gpu(cfg, keys, heads, tokens, {}, false);
    CHECK(gpu.centroids == cpu.centroids);
    CHECK(gpu.report.objective[0] == doctest::Approx(cpu.report.objective[0]).epsilon(1e-9));
  }
  SUBCASE("subsample then Lloyd")
  {
    auto cfg = small_config(dim, 4, 5, 6, pqkv::init_method::random_sample);
    cfg.max_train_points = 500;
    auto const cpu = run_cpu(cfg, keys, heads, tokens, {}, false);
    auto const gpu = run_gpu(cfg, keys, heads, tokens, {}, false);
    CHECK(std::abs(gpu.report.mse - cpu.report.mse) <= 0.01 * cpu.report.mse);
  }
  SUBCASE("fewer rows than ksub")
  {
    auto const cfg = small_config(dim, 2, 8, 5, pqkv::init_method::random_sample);
    index_t const few = 100;
    // keys of `few` tokens per head: re-slice head by head
    std::vector<float> k3(static_cast<std::size_t>(heads * few * dim));
    for (index_t h = 0; h < heads; ++h) {
      std::copy_n(keys.begin() + h * tokens * dim, few * dim, k3.begin() + h * few * dim);
    }
    auto const cpu = run_cpu(cfg, k3, heads, few, {}, false);
    auto const gpu = run_gpu(cfg, k3, heads, few, {}, false);
    CHECK(gpu.centroids == cpu.centroids);
    CHECK(gpu.report.iterations == 0);
    CHECK(gpu.report.converged);
    CHECK(gpu.report.mse == doctest::Approx(cpu.report.mse).epsilon(1e-9));
  }
}

TEST_CASE("gpu kmeans: empty clusters take the CPU's farthest rows")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 1200, dim = 32, m = 2;
  auto const cfg = small_config(dim, m, 5, 1, pqkv::init_method::provided);
  auto const keys = make_keys(heads, tokens, dim, 31);
  auto init = rows_init(cfg, keys, heads, tokens, 6);
  // Every fourth centroid far away: empty after the first assignment.
  index_t const dsub = cfg.dsub();
  for (index_t p = 0; p < heads * m; ++p) {
    for (index_t k = 0; k < cfg.ksub(); k += 4) {
      for (index_t j = 0; j < dsub; ++j) {
        init[static_cast<std::size_t>((p * cfg.ksub() + k) * dsub + j)] = 1000.f + static_cast<float>(k);
      }
    }
  }
  auto const cpu = run_cpu(cfg, keys, heads, tokens, init, false);
  auto const gpu = run_gpu(cfg, keys, heads, tokens, init, false);
  for (index_t p = 0; p < heads * m; ++p) {
    for (index_t k = 0; k < cfg.ksub(); ++k) {
      for (index_t j = 0; j < dsub; ++j) {
        auto const e = static_cast<std::size_t>((p * cfg.ksub() + k) * dsub + j);
        if (k % 4 == 0) {
          CHECK(gpu.centroids[e] == cpu.centroids[e]);  // a copied row: exact
        } else {
          CHECK(gpu.centroids[e] == doctest::Approx(cpu.centroids[e]).epsilon(1e-4).scale(1.0));
        }
      }
    }
  }
  CHECK(gpu.report.mse == doctest::Approx(cpu.report.mse).epsilon(1e-3));
}

TEST_CASE("gpu kmeans: tolerance stops early on the device; runs are deterministic")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 2000, dim = 64;
  auto cfg = small_config(dim, 4, 6, 50, pqkv::init_method::random_sample);
  cfg.tol = 1e-3;
  auto const keys = make_keys(heads, tokens, dim, 41);
  auto const cpu = run_cpu(cfg, keys, heads, tokens, {}, false);
  auto const a = run_gpu(cfg, keys, heads, tokens, {}, false);
  auto const b = run_gpu(cfg, keys, heads, tokens, {}, false);
  CHECK(a.centroids == b.centroids);
  CHECK(a.report.objective == b.report.objective);
  CHECK(a.report.converged);
  CHECK(a.report.iterations < 50);
  CHECK(std::abs(a.report.iterations - cpu.report.iterations) <= 2);
  CHECK(std::abs(a.report.mse - cpu.report.mse) <= 0.01 * cpu.report.mse);
}

TEST_CASE("gpu kmeans: half, bf16 and strided keys")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 1000, dim = 64, m = 8;
  auto const cfg = small_config(dim, m, 6, 0, pqkv::init_method::provided);
  auto const keys = make_keys(heads, tokens, dim, 51);
  std::vector<__half> kh(keys.size());
  std::vector<__nv_bfloat16> kb(keys.size());
  std::vector<float> rh(keys.size()), rb(keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    kh[i] = __float2half_rn(keys[i]);
    kb[i] = __float2bfloat16_rn(keys[i]);
    rh[i] = __half2float(kh[i]);
    rb[i] = __bfloat162float(kb[i]);
  }
  auto const init = rows_init(cfg, rh, heads, tokens, 8);
  SUBCASE("half")
  {
    auto const cpu = run_cpu(cfg, rh, heads, tokens, init, true);
    auto const gpu = run_gpu<__half>(cfg, kh, heads, tokens, init, true);
    CHECK(gpu.codes == cpu.codes);
  }
  SUBCASE("bf16")
  {
    auto const cpu = run_cpu(cfg, rb, heads, tokens, init, true);
    auto const gpu = run_gpu<__nv_bfloat16>(cfg, kb, heads, tokens, init, true);
    CHECK(gpu.codes == cpu.codes);
  }
  SUBCASE("strided (tokens-major, NHD) float keys")
  {
    // stored [tokens, heads, dim], seen as [heads, tokens, dim]
    std::vector<float> nhd(keys.size());
    for (index_t h = 0; h < heads; ++h) {
      for (index_t t = 0; t < tokens; ++t) {
        std::copy_n(keys.begin() + (h * tokens + t) * dim, dim, nhd.begin() + (t * heads + h) * dim);
      }
    }
    auto const cpu = run_cpu(cfg, keys, heads, tokens, init, true);
    auto dk = upload(nhd);
    auto dc = upload(init);
    pqkv::device_buffer<std::uint8_t> dcodes(static_cast<std::size_t>(heads * tokens * m));
    pqkv::gpu::kmeans_trainer const tr{cfg, {.max_heads = heads, .max_tokens = tokens}};
    pqkv::device_buffer<std::byte> ws(tr.workspace_bytes());
    auto const kv = pqkv::make_strided_view<float const, 3>(dk.data(), {heads, tokens, dim}, {dim, heads * dim, 1});
    tr.train(kv, pqkv::make_view(dc.data(), heads, m, cfg.ksub(), cfg.dsub()),
             pqkv::make_view(dcodes.data(), heads, tokens, m), ws.span(), nullptr);
    CHECK(download(dcodes, dcodes.size()) == cpu.codes);
  }
}

TEST_CASE("gpu kmeans: bad inputs throw before any launch")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 600, dim = 32;
  auto const cfg = small_config(dim, 4, 4, 3, pqkv::init_method::random_sample);
  CHECK(contains(error_message([&] {
                   auto c = cfg;
                   c.m = 16;  // dsub 2
                   pqkv::gpu::kmeans_trainer{c, {}};
                 }),
                 "dim / m=2"));
  CHECK(contains(error_message([&] { pqkv::gpu::kmeans_trainer{cfg, {.max_heads = 0}}; }), "max_heads=0"));

  pqkv::gpu::kmeans_trainer const tr{cfg, {.max_heads = heads, .max_tokens = tokens}};
  auto const keys = make_keys(heads, tokens, dim, 61);
  auto dk = upload(keys);
  std::size_t const nc = static_cast<std::size_t>(heads * cfg.m * cfg.ksub() * cfg.dsub());
  std::vector<float> const poison(nc, 123.f);
  auto dc = upload(poison);
  pqkv::device_buffer<std::byte> ws(tr.workspace_bytes());
  auto const kv = pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens, dim);
  auto const cv = pqkv::make_view(dc.data(), heads, cfg.m, cfg.ksub(), cfg.dsub());
  CHECK(contains(error_message([&] {
                   tr.train(pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens / 2, dim), cv,
                            ws.span().first(16), nullptr);
                 }),
                 "workspace.size()=16"));
  CHECK(contains(error_message([&] {
                   tr.train(pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens / 2, dim / 2), cv,
                            ws.span(), nullptr);
                 }),
                 "keys.extent(2)=16"));
  CHECK(contains(error_message([&] {
                   tr.train(pqkv::make_view(static_cast<float const*>(dk.data()), heads + 1, tokens / 2, dim), cv,
                            ws.span(), nullptr);
                 }),
                 "max_heads"));
  CHECK(contains(error_message([&] {
                   tr.train(kv, pqkv::make_view(dc.data(), heads, cfg.m, cfg.ksub() / 2, cfg.dsub()), ws.span(),
                            nullptr);
                 }),
                 "centroids.extent(2)"));
  CHECK(contains(error_message([&] {
                   tr.train(pqkv::make_view(keys.data(), heads, tokens, dim), cv, ws.span(), nullptr);
                 }),
                 "not device-accessible"));
  CHECK(contains(error_message([&] {
                   tr.train(pqkv::make_view(static_cast<float const*>(nullptr), heads, tokens, dim), cv, ws.span(),
                            nullptr);
                 }),
                 "keys.data_handle() is null"));
  CHECK(contains(error_message([&] {
                   tr.train(pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens / 2, dim), cv,
                            ws.span().subspan(8), nullptr);
                 }),
                 "aligned"));
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  CHECK(download(dc, nc) == poison);  // nothing ran
}

TEST_CASE("gpu kmeans: the trainer records its device and throws when called from another")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 64, dim = 32;
  auto const cfg = small_config(dim, 4, 4, 3, pqkv::init_method::random_sample);
  int device = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  pqkv::gpu::kmeans_trainer const tr{cfg, {.max_heads = heads, .max_tokens = tokens}};
  CHECK(tr.device() == device);
  int const other = pqkv::test::other_device();
  if (other < 0) {
    MESSAGE("cross-device part skipped: it needs 2 GPUs");
    return;
  }
  auto dk = upload(make_keys(heads, tokens, dim, 61));
  pqkv::device_buffer<float> dc(static_cast<std::size_t>(heads * cfg.m * cfg.ksub() * cfg.dsub()));
  pqkv::device_buffer<std::byte> ws(tr.workspace_bytes());
  auto const kv = pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens, dim);
  auto const cv = pqkv::make_view(dc.data(), heads, cfg.m, cfg.ksub(), cfg.dsub());
  {
    pqkv::test::device_scope on_other{other};
    CHECK_THROWS_WITH_AS(tr.train(kv, cv, ws.span(), nullptr), doctest::Contains("the object was built on device"),
                         pqkv::error);
    CHECK_THROWS_WITH_AS((void)tr.report(ws.span(), nullptr), doctest::Contains("the object was built on device"),
                         pqkv::error);
  }
  int now = -1;
  PQKV_CUDA_TRY(cudaGetDevice(&now));
  CHECK(now == device);
}

TEST_CASE("gpu kmeans: k-means++ init draws the CPU's centroids bit for bit")
{
  PQKV_REQUIRE_GPU();
  struct shape {
    index_t heads, tokens, dim, m;
    int nbits;
    std::uint64_t seed;
  };
  // dsub 4..128; tokens: under one 16-row group's multiple, several 1024-row
  // blocks, and past one 2048-group stage of the running sum (32768 rows)
  for (auto const sh : {shape{2, 700, 32, 8, 4, 3}, shape{2, 1500, 64, 4, 6, 4}, shape{1, 2100, 128, 1, 8, 5},
                        shape{3, 333, 64, 2, 5, 6}, shape{1, 1030, 128, 32, 3, 7}, shape{2, 2048, 32, 1, 7, 8},
                        shape{1, 33000, 32, 4, 4, 9}}) {
    auto const cfg = [&] {
      auto c = small_config(sh.dim, sh.m, sh.nbits, 0, pqkv::init_method::kmeans_plus_plus);
      c.seed = sh.seed;
      return c;
    }();
    auto const keys = make_keys(sh.heads, sh.tokens, sh.dim, 70 + sh.seed);
    auto const cpu = run_cpu(cfg, keys, sh.heads, sh.tokens, {}, false);
    auto const gpu = run_gpu(cfg, keys, sh.heads, sh.tokens, {}, false);
    INFO("heads=", sh.heads, " tokens=", sh.tokens, " dim=", sh.dim, " m=", sh.m, " nbits=", sh.nbits);
    INFO(first_difference(cfg, gpu.centroids, cpu.centroids));
    CHECK(gpu.centroids == cpu.centroids);
    CHECK(gpu.report.objective[0] == doctest::Approx(cpu.report.objective[0]).epsilon(1e-9));
  }
}

TEST_CASE("gpu kmeans: k-means++ with a subsample, half and bf16 keys, duplicate rows")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 900, dim = 64;
  auto const keys = make_keys(heads, tokens, dim, 81);
  SUBCASE("subsample")
  {
    auto cfg = small_config(dim, 4, 6, 0, pqkv::init_method::kmeans_plus_plus);
    cfg.max_train_points = 400;
    auto const cpu = run_cpu(cfg, keys, heads, tokens, {}, false);
    auto const gpu = run_gpu(cfg, keys, heads, tokens, {}, false);
    INFO(first_difference(cfg, gpu.centroids, cpu.centroids));
    CHECK(gpu.centroids == cpu.centroids);
    CHECK(gpu.report.objective[0] == doctest::Approx(cpu.report.objective[0]).epsilon(1e-9));
  }
  SUBCASE("half and bf16")
  {
    auto const cfg = small_config(dim, 8, 5, 0, pqkv::init_method::kmeans_plus_plus);
    std::vector<__half> kh(keys.size());
    std::vector<__nv_bfloat16> kb(keys.size());
    std::vector<float> rh(keys.size()), rb(keys.size());
    for (std::size_t i = 0; i < keys.size(); ++i) {
      kh[i] = __float2half_rn(keys[i]);
      kb[i] = __float2bfloat16_rn(keys[i]);
      rh[i] = __half2float(kh[i]);
      rb[i] = __bfloat162float(kb[i]);
    }
    auto const cpu_h = run_cpu(cfg, rh, heads, tokens, {}, false);
    auto const gpu_h = run_gpu<__half>(cfg, kh, heads, tokens, {}, false);
    INFO("half: ", first_difference(cfg, gpu_h.centroids, cpu_h.centroids));
    CHECK(gpu_h.centroids == cpu_h.centroids);
    auto const cpu_b = run_cpu(cfg, rb, heads, tokens, {}, false);
    auto const gpu_b = run_gpu<__nv_bfloat16>(cfg, kb, heads, tokens, {}, false);
    INFO("bf16: ", first_difference(cfg, gpu_b.centroids, cpu_b.centroids));
    CHECK(gpu_b.centroids == cpu_b.centroids);
  }
  SUBCASE("few distinct rows: D^2 reaches 0 and the picks fall back to random rows")
  {
    auto const cfg = small_config(dim, 2, 4, 0, pqkv::init_method::kmeans_plus_plus);
    std::vector<float> dup(keys.size());
    for (index_t h = 0; h < heads; ++h) {
      for (index_t t = 0; t < tokens; ++t) {  // 5 distinct rows per head
        std::copy_n(keys.begin() + (h * tokens + t % 5) * dim, dim, dup.begin() + (h * tokens + t) * dim);
      }
    }
    auto const cpu = run_cpu(cfg, dup, heads, tokens, {}, false);
    auto const gpu = run_gpu(cfg, dup, heads, tokens, {}, false);
    INFO(first_difference(cfg, gpu.centroids, cpu.centroids));
    CHECK(gpu.centroids == cpu.centroids);
  }
}

TEST_CASE("gpu kmeans: k-means++ then Lloyd: deterministic, the CPU's MSE within 1%")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 2000, dim = 64;
  auto cfg = small_config(dim, 4, 6, 8, pqkv::init_method::kmeans_plus_plus);
  auto const keys = make_keys(heads, tokens, dim, 91);
  auto const cpu = run_cpu(cfg, keys, heads, tokens, {}, false);
  auto const a = run_gpu(cfg, keys, heads, tokens, {}, false);
  auto const b = run_gpu(cfg, keys, heads, tokens, {}, false);
  INFO(first_difference(cfg, a.centroids, b.centroids));
  CHECK(a.centroids == b.centroids);
  CHECK(a.report.objective == b.report.objective);
  REQUIRE(a.report.objective.size() == cpu.report.objective.size());
  CHECK(a.report.objective[0] == doctest::Approx(cpu.report.objective[0]).epsilon(1e-9));  // same init
  CHECK(std::abs(a.report.mse - cpu.report.mse) <= 0.01 * cpu.report.mse);
  // another seed draws another init
  cfg.seed += 1;
  auto const c = run_gpu(cfg, keys, heads, tokens, {}, false);
  CHECK(c.report.objective[0] != a.report.objective[0]);
}

TEST_CASE("gpu kmeans: the tensor-core assignment equals the FP32 one and the CPU's")
{
  PQKV_REQUIRE_GPU();
  struct shape {
    index_t dim, m;
    int nbits;
  };
  index_t const heads = 2;
  SUBCASE("random init rows, several (m, nbits); one assignment, then 4 Lloyd iterations")
  {
    for (auto const sh : {shape{128, 8, 8}, shape{128, 2, 6}, shape{64, 2, 5}, shape{128, 1, 8}, shape{128, 4, 4}}) {
      CAPTURE(sh.dim);
      CAPTURE(sh.m);
      CAPTURE(sh.nbits);
      index_t const tokens = 1001;  // not a multiple of the 16-row tile
      auto const keys = make_keys(heads, tokens, sh.dim, 21);
      for (int iters : {0, 4}) {
        CAPTURE(iters);
        auto const cfg = small_config(sh.dim, sh.m, sh.nbits, iters, pqkv::init_method::provided);
        check_assign_paths(cfg, keys, heads, tokens, rows_init(cfg, keys, heads, tokens, 22));
      }
    }
  }
  SUBCASE("a large common offset (cancellation in ||c||^2 - 2 x.c)")
  {
    index_t const tokens = 700;
    auto keys = make_keys(heads, tokens, 128, 23);
    for (auto& v : keys) { v += 500.f; }
    auto const cfg = small_config(128, 8, 8, 0, pqkv::init_method::provided);
    check_assign_paths(cfg, keys, heads, tokens, rows_init(cfg, keys, heads, tokens, 24));
  }
  SUBCASE("near-tied centroids force the exact fallback, which is counted")
  {
    index_t const tokens = 200;
    auto const keys = make_keys(heads, tokens, 128, 25);
    auto const cfg = small_config(128, 8, 6, 0, pqkv::init_method::provided);
    auto init = rows_init(cfg, keys, heads, tokens, 26);
    // every centroid of a problem is centroid 0 nudged by a few float units
    index_t const ksub = cfg.ksub(), dsub = cfg.dsub();
    for (index_t p = 0; p < heads * cfg.m; ++p) {
      for (index_t k = 1; k < ksub; ++k) {
        for (index_t j = 0; j < dsub; ++j) {
          float const base = init[static_cast<std::size_t>(p * ksub * dsub + j)];
          init[static_cast<std::size_t>((p * ksub + k) * dsub + j)] =
            base * (1.f + 0x1p-20f * static_cast<float>((k * 7 + j * 3) % 11 - 5));
        }
      }
    }
    CHECK(check_assign_paths(cfg, keys, heads, tokens, init) == static_cast<unsigned long long>(heads * tokens * cfg.m));
  }
  SUBCASE("path selection")
  {
    pqkv::gpu::kmeans_limits const lim{.max_heads = 1, .max_tokens = 64};
    CHECK(!pqkv::gpu::kmeans_trainer{small_config(128, 8, 8, 1, pqkv::init_method::provided), lim}.uses_tensor_cores());
    CHECK(!pqkv::gpu::kmeans_trainer{small_config(128, 16, 8, 1, pqkv::init_method::provided), lim}.uses_tensor_cores());
    CHECK(!pqkv::gpu::kmeans_trainer{small_config(128, 8, 4, 1, pqkv::init_method::provided), lim}.uses_tensor_cores());
    CHECK(contains(error_message([&] {
                     pqkv::gpu::kmeans_trainer{small_config(128, 16, 8, 1, pqkv::init_method::provided), lim,
                                               {.path = pqkv::gpu::assign_path::tensor_core}};
                   }),
                   "assign_path::tensor_core"));
  }
}
