// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::adc_topk against pqkv::cpu::adc_topk on the same random inputs:
// the same selections and valid counts (gqa::sum, gqa::max exactly;
// gqa::softmax_sum exactly except at near-ties, which are counted and
// bounded), across m, nbits, k, ragged batches and graph replays; paged codes
// (bit-equal to contiguous), the scores output, half/bf16 queries, and the
// page-list helpers against their CPU reference; gpu::rq_scorer (residual
// key codes through the same kernels) against cpu::rq_scorer.
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/random.hpp>
#include <pqkv/score/adc_topk.cuh>
#include <pqkv/score/adc_topk.hpp>
#include <pqkv/score/page_list.cuh>
#include <pqkv/score/page_list.hpp>
#include <pqkv/score/paged_codes.hpp>
#include <pqkv/score/residual_scorer.cuh>
#include <pqkv/score/residual_scorer.hpp>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"
#include "common/residual_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <span>
#include <vector>

namespace {

using pqkv::index_t;

/// Host inputs of one batched call.
struct case_data {
  pqkv::adc_shape shape;
  pqkv::selection_params params;
  index_t batch = 1, capacity = 0, out_k = 0;
  std::vector<std::int32_t> lens;     // [batch]
  std::vector<float> q;               // [batch, q_heads, dim]
  std::vector<std::uint8_t> codes;    // [batch, kv_heads, capacity, m]
  std::vector<float> centroids;       // [kv_heads, m, ksub, dsub]
};

case_data make_case(pqkv::adc_shape shape, pqkv::selection_params params, std::vector<std::int32_t> lens,
                    index_t capacity, index_t out_k, std::uint64_t seed)
{
  case_data d;
  d.shape = shape;
  d.params = params;
  d.batch = static_cast<index_t>(lens.size());
  d.capacity = capacity;
  d.out_k = out_k;
  d.lens = std::move(lens);
  d.q.resize(static_cast<std::size_t>(d.batch * shape.q_heads * shape.dim));
  d.codes.resize(static_cast<std::size_t>(d.batch * shape.kv_heads * capacity * shape.m));
  d.centroids.resize(static_cast<std::size_t>(shape.kv_heads * shape.m * shape.ksub() * shape.dsub()));
  for (std::size_t i = 0; i < d.q.size(); ++i) {
    d.q[i] = static_cast<float>(2.0 * pqkv::detail::random_unit(seed, 0, i) - 1.0);
  }
  for (std::size_t i = 0; i < d.centroids.size(); ++i) {
    d.centroids[i] = static_cast<float>(2.0 * pqkv::detail::random_unit(seed, 1, i) - 1.0);
  }
  for (std::size_t i = 0; i < d.codes.size(); ++i) {
    d.codes[i] = static_cast<std::uint8_t>(
      pqkv::detail::random_below(seed, 2, i, static_cast<std::uint64_t>(shape.ksub())));
  }
  return d;
}

struct result {
  std::vector<std::int32_t> out;    // [batch, kv_heads, out_k]
  std::vector<std::int32_t> valid;  // [batch, kv_heads]
  std::vector<float> scores;        // CPU only: [batch, kv_heads, capacity]
};

template <class Agg>
result run_cpu(case_data const& d)
{
  result r;
  index_t const kv = d.shape.kv_heads, qh = d.shape.q_heads, dim = d.shape.dim, m = d.shape.m;
  r.out.assign(static_cast<std::size_t>(d.batch * kv * d.out_k), 0);
  r.valid.assign(static_cast<std::size_t>(d.batch * kv), 0);
  r.scores.assign(static_cast<std::size_t>(d.batch * kv * std::max<index_t>(d.capacity, 1)), 0.f);
  pqkv::cpu::adc_topk<Agg> const op{d.shape, d.params};
  for (index_t b = 0; b < d.batch; ++b) {
    op(pqkv::make_view(d.q.data() + b * qh * dim, qh, dim),
       pqkv::make_view(d.codes.data() + b * kv * d.capacity * m, kv, d.capacity, m),
       pqkv::make_view(d.centroids.data(), kv, m, d.shape.ksub(), d.shape.dsub()), d.lens[static_cast<std::size_t>(b)],
       pqkv::make_view(r.out.data() + b * kv * d.out_k, kv, d.out_k),
       std::span<std::int32_t>(r.valid.data() + b * kv, static_cast<std::size_t>(kv)),
       pqkv::make_view(r.scores.data() + b * kv * std::max<index_t>(d.capacity, 1), kv,
                       std::max<index_t>(d.capacity, 1)));
  }
  return r;
}

/// Device copies of a case's inputs and outputs.
struct device_case {
  pqkv::device_buffer<float> q, centroids;
  pqkv::device_buffer<std::uint8_t> codes;
  pqkv::device_buffer<std::int32_t> lens, out, valid;
  pqkv::device_buffer<std::byte> workspace;

  template <class T>
  static void upload(pqkv::device_buffer<T>& dst, std::vector<T> const& src)
  {
    dst = pqkv::device_buffer<T>(std::max<std::size_t>(src.size(), 1));
    if (!src.empty()) {
      PQKV_CUDA_TRY(cudaMemcpy(dst.data(), src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
  }

  device_case(case_data const& d, std::size_t workspace_bytes)
  {
    upload(q, d.q);
    upload(centroids, d.centroids);
    upload(codes, d.codes);
    upload(lens, d.lens);
    out = pqkv::device_buffer<std::int32_t>(static_cast<std::size_t>(std::max<index_t>(d.batch * d.shape.kv_heads * d.out_k, 1)));
    valid = pqkv::device_buffer<std::int32_t>(static_cast<std::size_t>(d.batch * d.shape.kv_heads));
    workspace = pqkv::device_buffer<std::byte>(std::max<std::size_t>(workspace_bytes, 1));
    poison();
  }

  /// Fills the outputs with a value the call never writes, so a missed
  /// element shows.
  void poison() const
  {
    PQKV_CUDA_TRY(cudaMemset(out.data(), 0x5A, out.size_bytes()));
    PQKV_CUDA_TRY(cudaMemset(valid.data(), 0x5A, valid.size_bytes()));
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
  }

  template <class Op>
  void call(Op const& op, case_data const& d, cudaStream_t stream) const
  {
    index_t const kv = d.shape.kv_heads;
    op(pqkv::make_view(static_cast<float const*>(q.data()), d.batch, d.shape.q_heads, d.shape.dim),
       pqkv::make_view(static_cast<std::uint8_t const*>(codes.data()), d.batch, kv, d.capacity, d.shape.m),
       pqkv::make_view(static_cast<float const*>(centroids.data()), kv, d.shape.m, d.shape.ksub(), d.shape.dsub()),
       std::span<std::int32_t const>(lens.data(), static_cast<std::size_t>(d.batch)),
       pqkv::make_view(out.data(), d.batch, kv, d.out_k), pqkv::make_view(valid.data(), d.batch, kv),
       workspace.span(), stream);
  }

  result download(case_data const& d) const
  {
    result r;
    r.out.resize(static_cast<std::size_t>(d.batch * d.shape.kv_heads * d.out_k));
    r.valid.resize(static_cast<std::size_t>(d.batch * d.shape.kv_heads));
    if (!r.out.empty()) {
      PQKV_CUDA_TRY(cudaMemcpy(r.out.data(), out.data(), r.out.size() * sizeof(std::int32_t), cudaMemcpyDeviceToHost));
    }
    PQKV_CUDA_TRY(cudaMemcpy(r.valid.data(), valid.data(), r.valid.size() * sizeof(std::int32_t),
                             cudaMemcpyDeviceToHost));
    return r;
  }
};

/// Tuning knobs a test may force (the defaults are the library's).
struct tuning {
  int max_cluster = 16;
  bool shared_store = true;
};

template <class Agg>
result run_gpu(case_data const& d, tuning t = {})
{
  pqkv::gpu::adc_topk<Agg> const op{d.shape, d.params,
                                    {.max_batch = d.batch,
                                     .max_tokens = std::max<index_t>(d.capacity, 1),
                                     .max_cluster = t.max_cluster,
                                     .shared_store = t.shared_store}};
  device_case dc(d, op.workspace_bytes());
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreate(&stream));
  dc.call(op, d, stream);
  PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
  return dc.download(d);
}

/// Exact comparison: same valid counts, same rows (ascending, -1 padded).
void check_equal(case_data const& d, result const& cpu, result const& gpu)
{
  CHECK(gpu.valid == cpu.valid);
  index_t const rows = d.batch * d.shape.kv_heads;
  int bad_rows = 0;
  for (index_t row = 0; row < rows; ++row) {
    auto const* c = cpu.out.data() + row * d.out_k;
    auto const* g = gpu.out.data() + row * d.out_k;
    if (!std::equal(c, c + d.out_k, g)) { ++bad_rows; }
  }
  CHECK_MESSAGE(bad_rows == 0, "rows that differ: ", bad_rows, " of ", rows, " (m=", d.shape.m, ", nbits=",
                d.shape.nbits, ", k=", d.params.k, ")");
}

/// softmax_sum: same valid counts; every token selected by one side only must
/// be a near-tie of the CPU's k-th best score (relative gap <= tol). Returns
/// how many such tokens there were.
index_t check_near_equal(case_data const& d, result const& cpu, result const& gpu, double tol)
{
  CHECK(gpu.valid == cpu.valid);
  index_t const kv = d.shape.kv_heads, cap = std::max<index_t>(d.capacity, 1);
  index_t mismatched = 0;
  for (index_t row = 0; row < d.batch * kv; ++row) {
    auto const* c = cpu.out.data() + row * d.out_k;
    auto const* g = gpu.out.data() + row * d.out_k;
    std::int32_t const nv = cpu.valid[static_cast<std::size_t>(row)];
    // Padding and order hold on both sides.
    for (index_t i = nv; i < d.out_k; ++i) { REQUIRE(g[i] == -1); }
    REQUIRE(std::is_sorted(g, g + nv));
    if (std::equal(c, c + d.out_k, g)) { continue; }
    float const* s = cpu.scores.data() + row * cap;
    float kth = std::numeric_limits<float>::infinity();
    for (index_t i = 0; i < nv; ++i) { kth = std::min(kth, s[c[i]]); }
    std::vector<std::int32_t> only;
    std::set_symmetric_difference(c, c + nv, g, g + nv, std::back_inserter(only));
    for (std::int32_t t : only) {
      REQUIRE(t >= 0);
      REQUIRE(t < cap);
      double const gap = std::fabs(static_cast<double>(s[t]) - static_cast<double>(kth));
      CHECK_MESSAGE(gap <= tol * std::fabs(static_cast<double>(kth)), "token ", t, " score ", s[t], " kth ", kth);
    }
    mismatched += static_cast<index_t>(only.size()) / 2;
  }
  return mismatched;
}

pqkv::adc_shape shape_of(index_t q_heads, index_t kv_heads, index_t dim, index_t m, int nbits)
{
  return pqkv::adc_shape{q_heads, kv_heads, dim, m, nbits};
}

}  // namespace

TEST_CASE("gpu adc_topk: sum and max select bit-identically across m, nbits and k")
{
  PQKV_REQUIRE_GPU();
  index_t const ms[] = {1, 2, 4, 8, 16, 32};
  index_t const ks[] = {1, 50, 999, 5000};
  int calls = 0;
  for (std::size_t mi = 0; mi < std::size(ms); ++mi) {
    int const nbits = 4 + static_cast<int>(mi % 5);
    auto const shape = shape_of(8, 2, 64, ms[mi], nbits);
    for (index_t k : ks) {
      pqkv::selection_params const params{.k = k, .sink = 4, .window = 16};
      auto const d = make_case(shape, params, {1000, 7, 4099}, 4101, k + 3, 100 + mi * 10 + static_cast<std::uint64_t>(k));
      check_equal(d, run_cpu<pqkv::gqa::sum>(d), run_gpu<pqkv::gqa::sum>(d));
      check_equal(d, run_cpu<pqkv::gqa::max>(d), run_gpu<pqkv::gqa::max>(d));
      calls += 2;
    }
  }
  MESSAGE(calls, " batched calls compared");
}

TEST_CASE("gpu adc_topk: every k from 0 to n + 2, heavy ties resolved to the lower index")
{
  PQKV_REQUIRE_GPU();
  // m = 1, 4 bits: 16 distinct scores among 37 tokens, so most ranks are ties.
  for (index_t m : {index_t{1}, index_t{8}}) {
    auto const shape = shape_of(8, 2, 32, m, m == 1 ? 4 : 5);
    for (index_t k = 0; k <= 39; ++k) {
      pqkv::selection_params const params{.k = k};
      auto const d = make_case(shape, params, {37, 20}, 37, std::max<index_t>(k, 1), 7 + static_cast<std::uint64_t>(k));
      check_equal(d, run_cpu<pqkv::gqa::sum>(d), run_gpu<pqkv::gqa::sum>(d));
    }
  }
}

TEST_CASE("gpu adc_topk: empty and tiny sequences, sink + window >= n, k above the candidates")
{
  PQKV_REQUIRE_GPU();
  auto const shape = shape_of(8, 2, 32, 4, 6);
  pqkv::selection_params const params{.k = 10, .sink = 3, .window = 2};
  auto const d = make_case(shape, params, {0, 1, 5, 6, 12, 70}, 70, 16, 42);
  auto const gpu = run_gpu<pqkv::gqa::max>(d);
  check_equal(d, run_cpu<pqkv::gqa::max>(d), gpu);
  // n = 0, 1, 5: no candidates; n = 6: one; n = 12: 7; n = 70: k.
  std::vector<std::int32_t> const want{0, 0, 0, 0, 0, 0, 1, 1, 7, 7, 10, 10};
  CHECK(gpu.valid == want);
  // Zero-capacity codes: every row is padding.
  auto const e = make_case(shape, params, {0, 0}, 0, 12, 43);
  auto const ge = run_gpu<pqkv::gqa::sum>(e);
  CHECK(ge.valid == std::vector<std::int32_t>(4, 0));
  CHECK(ge.out == std::vector<std::int32_t>(48, -1));
}

TEST_CASE("gpu adc_topk: group sizes 1, 2, 3, 8 and m outside the vector path")
{
  PQKV_REQUIRE_GPU();
  struct shape_case {
    index_t q, kv, dim, m;
    int nbits;
  };
  shape_case const cases[] = {{4, 4, 64, 8, 8},  {4, 2, 64, 16, 7}, {6, 2, 48, 3, 8},
                              {16, 2, 64, 4, 6}, {3, 1, 96, 12, 5}, {8, 2, 128, 64, 4}};
  for (auto const& c : cases) {
    auto const shape = shape_of(c.q, c.kv, c.dim, c.m, c.nbits);
    pqkv::selection_params const params{.k = 300, .sink = 1, .window = 3};
    auto const d = make_case(shape, params, {2500, 1001}, 2503, 300, 900 + static_cast<std::uint64_t>(c.m));
    check_equal(d, run_cpu<pqkv::gqa::sum>(d), run_gpu<pqkv::gqa::sum>(d));
    check_equal(d, run_cpu<pqkv::gqa::max>(d), run_gpu<pqkv::gqa::max>(d));
  }
}

TEST_CASE("gpu adc_topk: large n (70001), k = n / 5 and k = 2048")
{
  PQKV_REQUIRE_GPU();
  auto const shape = shape_of(16, 4, 128, 8, 8);
  for (index_t k : {index_t{2048}, index_t{70001 / 5}}) {
    pqkv::selection_params const params{.k = k, .sink = 4, .window = 64};
    auto const d = make_case(shape, params, {70001, 33333}, 70001, k, 5 + static_cast<std::uint64_t>(k));
    check_equal(d, run_cpu<pqkv::gqa::sum>(d), run_gpu<pqkv::gqa::sum>(d));
  }
}

TEST_CASE("gpu adc_topk: every cluster size, scores in shared memory or in the workspace")
{
  PQKV_REQUIRE_GPU();
  // One row per sequence and KV head; cluster sizes 1..16 split the rows into
  // 1..16 slices, some empty (n = 9 with 16 blocks), and the histogram into
  // shares of unequal size (2048 or 1024 bins over 3, 7, 13 blocks).
  auto const shape = shape_of(8, 2, 64, 8, 8);
  // Sizes stay small enough for compute-sanitizer racecheck.
  pqkv::selection_params const params{.k = 1000, .sink = 4, .window = 16};
  auto const d = make_case(shape, params, {5003, 9, 4099}, 5003, 1000, 4242);
  auto const cpu_sum = run_cpu<pqkv::gqa::sum>(d);
  auto const cpu_max = run_cpu<pqkv::gqa::max>(d);
  auto const cpu_soft = run_cpu<pqkv::gqa::softmax_sum>(d);
  index_t mismatched = 0;
  for (int c : {1, 2, 3, 4, 7, 8, 13, 16}) {
    for (bool shared : {true, false}) {
      CAPTURE(c);
      CAPTURE(shared);
      tuning const t{.max_cluster = c, .shared_store = shared};
      check_equal(d, cpu_sum, run_gpu<pqkv::gqa::sum>(d, t));
      check_equal(d, cpu_max, run_gpu<pqkv::gqa::max>(d, t));
      mismatched += check_near_equal(d, cpu_soft, run_gpu<pqkv::gqa::softmax_sum>(d, t), 1e-5);
    }
  }
  CHECK(mismatched <= 10);
}

TEST_CASE("gpu adc_topk: softmax_sum matches except at counted near-ties")
{
  PQKV_REQUIRE_GPU();
  index_t const ms[] = {1, 2, 4, 8, 16, 32};
  index_t mismatched = 0, selected = 0;
  for (std::size_t mi = 0; mi < std::size(ms); ++mi) {
    int const nbits = 4 + static_cast<int>(mi % 5);
    auto const shape = shape_of(8, 2, 64, ms[mi], nbits);
    for (index_t k : {index_t{1}, index_t{300}, index_t{4096}}) {
      pqkv::selection_params const params{.k = k, .sink = 4, .window = 16};
      auto const d = make_case(shape, params, {4099, 1000, 7}, 4099, k, 300 + mi * 10 + static_cast<std::uint64_t>(k));
      auto const cpu = run_cpu<pqkv::gqa::softmax_sum>(d);
      mismatched += check_near_equal(d, cpu, run_gpu<pqkv::gqa::softmax_sum>(d), 1e-5);
      for (auto v : cpu.valid) { selected += v; }
    }
  }
  {
    auto const shape = shape_of(32, 8, 128, 8, 8);
    pqkv::selection_params const params{.k = 70001 / 5, .sink = 4, .window = 64};
    auto const d = make_case(shape, params, {70001}, 70001, params.k, 77);
    auto const cpu = run_cpu<pqkv::gqa::softmax_sum>(d);
    mismatched += check_near_equal(d, cpu, run_gpu<pqkv::gqa::softmax_sum>(d), 1e-5);
    for (auto v : cpu.valid) { selected += v; }
  }
  MESSAGE("softmax_sum: ", mismatched, " near-tie swaps among ", selected, " selected tokens");
  // expf may differ by an ulp between host and device: swaps stay rare.
  CHECK(mismatched * 1000 <= selected);
}

TEST_CASE("gpu adc_topk: bad inputs throw pqkv::error before any launch")
{
  PQKV_REQUIRE_GPU();
  auto const shape = shape_of(8, 2, 64, 8, 8);
  pqkv::selection_params const params{.k = 16};
  pqkv::gpu::adc_limits const limits{.max_batch = 2, .max_tokens = 256};
  using op_t = pqkv::gpu::adc_topk<pqkv::gqa::sum>;

  // Construction.
  CHECK_THROWS_AS(op_t(shape_of(8, 3, 64, 8, 8), params, limits), pqkv::error);     // q_heads % kv_heads
  CHECK_THROWS_AS(op_t(shape_of(8, 2, 64, 7, 8), params, limits), pqkv::error);     // m does not divide dim
  CHECK_THROWS_AS(op_t(shape_of(8, 2, 64, 8, 9), params, limits), pqkv::error);     // nbits > 8
  CHECK_THROWS_AS(op_t(shape_of(32, 2, 64, 8, 8), params, limits), pqkv::error);    // group of 16
  CHECK_THROWS_AS(op_t(shape_of(16, 2, 128, 128, 8), params, limits), pqkv::error); // LUT over shared memory
  CHECK_THROWS_AS(op_t(shape, {.k = -1}, limits), pqkv::error);
  CHECK_THROWS_AS(op_t(shape, params, {.max_batch = 0, .max_tokens = 256}), pqkv::error);
  CHECK_THROWS_AS(op_t(shape, params, {.max_batch = 1, .max_tokens = 0}), pqkv::error);

  // Calls: every rejected call leaves the poisoned outputs untouched.
  auto const d = make_case(shape, params, {200, 100}, 256, 16, 3);
  op_t const op{shape, params, limits};
  device_case dc(d, op.workspace_bytes());
  index_t const kv = 2;
  auto const q = pqkv::make_view(static_cast<float const*>(dc.q.data()), 2, 8, 64);
  auto const codes = pqkv::make_view(static_cast<std::uint8_t const*>(dc.codes.data()), 2, kv, 256, 8);
  auto const cents = pqkv::make_view(static_cast<float const*>(dc.centroids.data()), kv, 8, 256, 8);
  std::span<std::int32_t const> const lens(dc.lens.data(), 2);
  auto const out = pqkv::make_view(dc.out.data(), 2, kv, 16);
  auto const valid = pqkv::make_view(dc.valid.data(), 2, kv);
  auto const ws = dc.workspace.span();
  cudaStream_t const s = nullptr;
  CHECK_NOTHROW(op(q, codes, cents, lens, out, valid, ws, s));
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  dc.poison();

  CHECK_THROWS_AS(op(pqkv::make_view(static_cast<float const*>(dc.q.data()), 2, 8, 32), codes, cents, lens, out,
                     valid, ws, s), pqkv::error);
  CHECK_THROWS_AS(op(q, pqkv::make_view(static_cast<std::uint8_t const*>(dc.codes.data()), 2, kv, 256, 4), cents,
                     lens, out, valid, ws, s), pqkv::error);
  CHECK_THROWS_AS(op(q, pqkv::make_view(static_cast<std::uint8_t const*>(dc.codes.data()), 2, kv, 512, 8), cents,
                     lens, out, valid, ws, s), pqkv::error);  // capacity over limits
  CHECK_THROWS_AS(op(q, pqkv::make_view(static_cast<std::uint8_t const*>(dc.codes.data()) + 1, 2, kv, 255, 8), cents,
                     lens, out, valid, ws, s), pqkv::error);  // misaligned codes
  CHECK_THROWS_AS(op(q, codes, pqkv::make_view(static_cast<float const*>(dc.centroids.data()), kv, 8, 128, 8), lens,
                     out, valid, ws, s), pqkv::error);
  CHECK_THROWS_AS(op(q, codes, cents, std::span<std::int32_t const>(dc.lens.data(), 1), out, valid, ws, s),
                  pqkv::error);
  CHECK_THROWS_AS(op(q, codes, cents, std::span<std::int32_t const>(static_cast<std::int32_t const*>(nullptr), 2), out, valid, ws, s), pqkv::error);
  CHECK_THROWS_AS(op(q, codes, cents, lens, pqkv::make_view(dc.out.data(), 2, kv, 15), valid, ws, s),
                  pqkv::error);  // k > out.extent(2)
  CHECK_THROWS_AS(op(q, codes, cents, lens, out, pqkv::make_view(dc.valid.data(), 2, 1), ws, s), pqkv::error);
  CHECK_THROWS_AS(op(q, codes, cents, lens, out, valid, ws.first(ws.size() - 1), s), pqkv::error);
  CHECK_THROWS_AS(op(q, codes, cents, lens, out, valid, ws.subspan(8, ws.size() - 8), s), pqkv::error);
  auto const q3 = pqkv::make_view(static_cast<float const*>(dc.q.data()), 3, 8, 64);
  CHECK_THROWS_AS(op(q3, codes, cents, lens, out, valid, ws, s), pqkv::error);  // batch over limits

  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const after = dc.download(d);
  std::int32_t poison = 0;
  std::memset(&poison, 0x5A, sizeof(poison));
  CHECK(std::all_of(after.out.begin(), after.out.end(), [&](std::int32_t v) { return v == poison; }));
  CHECK(std::all_of(after.valid.begin(), after.valid.end(), [&](std::int32_t v) { return v == poison; }));
}

namespace {

/// Captures one call in a graph, then replays it after growing seq_lens in
/// device memory; each replay must match the CPU on the new lengths.
template <class Agg>
void graph_replay_matches()
{
  auto const shape = shape_of(8, 2, 64, 8, 8);
  pqkv::selection_params const params{.k = 64, .sink = 2, .window = 8};
  auto d = make_case(shape, params, {100, 40}, 3000, 64, 11);
  pqkv::gpu::adc_topk<Agg> const op{shape, params, {.max_batch = 2, .max_tokens = 3000}};
  device_case dc(d, op.workspace_bytes());
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  pqkv::test::captured_graph const graph(stream, [&] { dc.call(op, d, stream); });

  for (std::vector<std::int32_t> lens : {std::vector<std::int32_t>{100, 40}, {101, 41}, {102, 500}, {1999, 501},
                                         {3000, 2999}}) {
    d.lens = lens;
    PQKV_CUDA_TRY(cudaMemcpyAsync(dc.lens.data(), lens.data(), lens.size() * sizeof(std::int32_t),
                                  cudaMemcpyHostToDevice, stream));
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    dc.poison();
    graph.launch(stream);
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    auto const cpu = run_cpu<Agg>(d);
    if constexpr (Agg::needs_softmax) {
      CHECK(check_near_equal(d, cpu, dc.download(d), 1e-5) <= 2);
    } else {
      check_equal(d, cpu, dc.download(d));
    }
  }
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

}  // namespace

TEST_CASE("gpu adc_topk: a captured CUDA graph replays while seq_lens grows")
{
  PQKV_REQUIRE_GPU();
  graph_replay_matches<pqkv::gqa::max>();
  graph_replay_matches<pqkv::gqa::softmax_sum>();
}

// ---- paged codes, scores output, query dtypes, page lists ---------------------------------

namespace {

/// A case's codes moved into a page pool [num_pages, kv_heads, P, m] at
/// shuffled physical pages (plus `spare` pages nobody uses), with a block
/// table [batch, width]; entries past a sequence's last page are -1 unless
/// `full_table`.
struct paged_host {
  index_t page = 1, width = 0, num_pages = 0;
  std::vector<std::uint8_t> pool;
  std::vector<std::int32_t> table;
};

paged_host make_paged(case_data const& d, index_t page, bool full_table, std::uint64_t seed, index_t spare = 3)
{
  REQUIRE(d.capacity % page == 0);
  paged_host p;
  p.page = page;
  p.width = d.capacity / page;
  p.num_pages = d.batch * p.width + spare;
  index_t const kv = d.shape.kv_heads, m = d.shape.m;
  std::vector<std::int32_t> perm(static_cast<std::size_t>(p.num_pages));
  for (std::size_t i = 0; i < perm.size(); ++i) { perm[i] = static_cast<std::int32_t>(i); }
  for (std::size_t i = perm.size(); i > 1; --i) {
    std::swap(perm[i - 1], perm[static_cast<std::size_t>(pqkv::detail::random_below(seed, 7, i, i))]);
  }
  p.pool.resize(static_cast<std::size_t>(p.num_pages * kv * page * m));
  for (std::size_t i = 0; i < p.pool.size(); ++i) {  // spare pages hold noise
    p.pool[i] = static_cast<std::uint8_t>(pqkv::detail::random_below(seed, 8, i, static_cast<std::uint64_t>(d.shape.ksub())));
  }
  p.table.assign(static_cast<std::size_t>(d.batch * p.width), -1);
  for (index_t b = 0; b < d.batch; ++b) {
    index_t const used = full_table ? p.width : (d.lens[static_cast<std::size_t>(b)] + page - 1) / page;
    for (index_t lp = 0; lp < std::min(used, p.width); ++lp) {
      std::int32_t const phys = perm[static_cast<std::size_t>(b * p.width + lp)];
      p.table[static_cast<std::size_t>(b * p.width + lp)] = phys;
      for (index_t g = 0; g < kv; ++g) {
        for (index_t o = 0; o < page; ++o) {
          std::uint8_t const* src = d.codes.data() + ((b * kv + g) * d.capacity + lp * page + o) * m;
          std::uint8_t* dst = p.pool.data() + ((phys * kv + g) * page + o) * m;
          std::copy(src, src + m, dst);
        }
      }
    }
  }
  return p;
}

/// Device outputs with scores, and the paged inputs.
struct gpu_scored {
  std::vector<std::int32_t> out, valid;
  std::vector<float> scores;  // [batch, kv_heads, out_k]
};

template <class Agg, class Codes>
gpu_scored run_scored(pqkv::gpu::adc_topk<Agg> const& op, case_data const& d, device_case& dc, Codes const& codes)
{
  index_t const kv = d.shape.kv_heads;
  pqkv::device_buffer<float> scores(static_cast<std::size_t>(std::max<index_t>(d.batch * kv * d.out_k, 1)));
  PQKV_CUDA_TRY(cudaMemset(scores.data(), 0x5A, scores.size_bytes()));
  dc.poison();
  op(pqkv::make_view(static_cast<float const*>(dc.q.data()), d.batch, d.shape.q_heads, d.shape.dim), codes,
     pqkv::make_view(static_cast<float const*>(dc.centroids.data()), kv, d.shape.m, d.shape.ksub(), d.shape.dsub()),
     std::span<std::int32_t const>(dc.lens.data(), static_cast<std::size_t>(d.batch)),
     pqkv::make_view(dc.out.data(), d.batch, kv, d.out_k), pqkv::make_view(dc.valid.data(), d.batch, kv),
     pqkv::make_view(scores.data(), d.batch, kv, d.out_k), dc.workspace.span(), nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const r = dc.download(d);
  return {r.out, r.valid, pqkv::test::download(scores, static_cast<std::size_t>(d.batch * kv * d.out_k))};
}

/// Bit equality of two float vectors (NaN-safe), naming the first difference.
bool same_bits(std::vector<float> const& a, std::vector<float> const& b, char const* what)
{
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      MESSAGE(what, ": first difference at ", i, ": ", a[i], " vs ", b[i]);
      return false;
    }
  }
  return true;
}

/// The CPU's aggregated scores of the selected tokens, -inf for padding.
std::vector<float> cpu_selected_scores(case_data const& d, result const& cpu)
{
  index_t const cap = std::max<index_t>(d.capacity, 1);
  std::vector<float> s(cpu.out.size(), -std::numeric_limits<float>::infinity());
  for (std::size_t i = 0; i < cpu.out.size(); ++i) {
    std::int32_t const t = cpu.out[i];
    if (t >= 0) { s[i] = cpu.scores[i / static_cast<std::size_t>(d.out_k) * static_cast<std::size_t>(cap) + static_cast<std::size_t>(t)]; }
  }
  return s;
}

template <class Agg>
void paged_matches_contiguous(index_t page, index_t m, std::uint64_t seed)
{
  // Groups of 4 (the kernels' R = 4 path), 2 and 8 (the any-group path).
  index_t const q_heads = Agg::needs_softmax ? 16 : (m == 3 ? 4 : 8);
  auto const shape = shape_of(q_heads, 2, m == 3 ? 48 : 64, m, m == 8 ? 8 : 6);
  pqkv::selection_params const params{.k = 100, .sink = 3, .window = 9};
  index_t const cap = (1500 + page - 1) / page * page + 2 * page;  // two table entries past the longest sequence
  auto const d = make_case(shape, params, {1500, 7, 1000 + static_cast<std::int32_t>(page)}, cap, 104, seed);
  pqkv::gpu::adc_topk<Agg> const op{shape, params, {.max_batch = 3, .max_tokens = cap}};
  device_case dc(d, op.workspace_bytes());
  auto const ph = make_paged(d, page, false, seed + 1);
  auto const pool = pqkv::test::upload(ph.pool);
  auto const table = pqkv::test::upload(ph.table);
  pqkv::paged_codes const paged{
    pqkv::make_view(static_cast<std::uint8_t const*>(pool.data()), ph.num_pages, shape.kv_heads, page, m),
    pqkv::make_view(static_cast<std::int32_t const*>(table.data()), d.batch, ph.width)};
  auto const contiguous =
    run_scored(op, d, dc, pqkv::make_view(static_cast<std::uint8_t const*>(dc.codes.data()), d.batch, shape.kv_heads, cap, m));
  auto const via_pages = run_scored(op, d, dc, paged);
  CAPTURE(page);
  CAPTURE(m);
  CHECK(via_pages.valid == contiguous.valid);
  CHECK(via_pages.out == contiguous.out);
  CHECK(same_bits(via_pages.scores, contiguous.scores, "paged vs contiguous scores"));
  auto const cpu = run_cpu<Agg>(d);
  if constexpr (Agg::needs_softmax) {
    result g;
    g.out = via_pages.out;
    g.valid = via_pages.valid;
    CHECK(check_near_equal(d, cpu, g, 1e-5) <= 2);
  } else {
    CHECK(via_pages.out == cpu.out);
    CHECK(via_pages.valid == cpu.valid);
    CHECK(same_bits(via_pages.scores, cpu_selected_scores(d, cpu), "gpu vs cpu scores"));
  }
}

}  // namespace

TEST_CASE("gpu adc_topk: paged codes give the contiguous selection and scores bit for bit")
{
  PQKV_REQUIRE_GPU();
  std::uint64_t seed = 500;
  for (index_t page : {index_t{1}, index_t{16}, index_t{7}, index_t{64}}) {
    for (index_t m : {index_t{8}, index_t{3}}) {  // the vector path and the byte path
      paged_matches_contiguous<pqkv::gqa::sum>(page, m, ++seed);
      paged_matches_contiguous<pqkv::gqa::max>(page, m, ++seed);
    }
    paged_matches_contiguous<pqkv::gqa::softmax_sum>(page, 16, ++seed);
  }
}

TEST_CASE("gpu adc_topk: paged codes, one moderate case (n = 40000, page 64, group 4, m = 16)")
{
  PQKV_REQUIRE_GPU();
  auto const shape = shape_of(16, 4, 128, 16, 8);
  pqkv::selection_params const params{.k = 2048, .sink = 4, .window = 64};
  index_t const cap = 40064;
  auto const d = make_case(shape, params, {40000, 12345}, cap, 2048, 61);
  pqkv::gpu::adc_topk<pqkv::gqa::sum> const op{shape, params, {.max_batch = 2, .max_tokens = cap}};
  device_case dc(d, op.workspace_bytes());
  auto const ph = make_paged(d, 64, false, 62);
  auto const pool = pqkv::test::upload(ph.pool);
  auto const table = pqkv::test::upload(ph.table);
  pqkv::paged_codes const paged{
    pqkv::make_view(static_cast<std::uint8_t const*>(pool.data()), ph.num_pages, shape.kv_heads, 64, shape.m),
    pqkv::make_view(static_cast<std::int32_t const*>(table.data()), d.batch, ph.width)};
  auto const g = run_scored(op, d, dc, paged);
  auto const cpu = run_cpu<pqkv::gqa::sum>(d);
  CHECK(g.valid == cpu.valid);
  CHECK(g.out == cpu.out);
  CHECK(same_bits(g.scores, cpu_selected_scores(d, cpu), "gpu vs cpu scores"));
}

// softmax_sum: expf (2 ulp on the device) and the order of Z's sum differ
// from the host's, so the group's summed probabilities may differ by a few
// ulp; 2e-6 relative bounds ~16.
TEST_CASE("gpu adc_topk: the scores output, padding -inf, softmax within a few ulp")
{
  PQKV_REQUIRE_GPU();
  auto const shape = shape_of(8, 2, 64, 8, 8);
  pqkv::selection_params const params{.k = 50, .sink = 2, .window = 4};
  auto const d = make_case(shape, params, {900, 30, 0}, 900, 60, 71);  // rows with 24 and 0 candidates pad
  auto const codes = [&](device_case const& dc) {
    return pqkv::make_view(static_cast<std::uint8_t const*>(dc.codes.data()), d.batch, shape.kv_heads, d.capacity,
                           shape.m);
  };
  {
    pqkv::gpu::adc_topk<pqkv::gqa::max> const op{shape, params, {.max_batch = 3, .max_tokens = 900}};
    device_case dc(d, op.workspace_bytes());
    auto const g = run_scored(op, d, dc, codes(dc));
    auto const cpu = run_cpu<pqkv::gqa::max>(d);
    CHECK(g.out == cpu.out);
    CHECK(same_bits(g.scores, cpu_selected_scores(d, cpu), "max scores"));
    // Index-only calls are unchanged by the scores path.
    dc.poison();
    dc.call(op, d, nullptr);
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
    CHECK(dc.download(d).out == g.out);
  }
  {
    pqkv::gpu::adc_topk<pqkv::gqa::softmax_sum> const op{shape, params, {.max_batch = 3, .max_tokens = 900}};
    device_case dc(d, op.workspace_bytes());
    auto const g = run_scored(op, d, dc, codes(dc));
    auto const cpu = run_cpu<pqkv::gqa::softmax_sum>(d);
    auto const want = cpu_selected_scores(d, cpu);
    int compared = 0;
    for (std::size_t i = 0; i < g.out.size(); ++i) {
      if (g.out[i] != cpu.out[i]) { continue; }  // a near-tie swap: another token's score
      if (g.out[i] < 0) {
        CHECK(g.scores[i] == -std::numeric_limits<float>::infinity());
        continue;
      }
      CHECK_MESSAGE(std::fabs(g.scores[i] - want[i]) <= 2e-6f * std::fabs(want[i]) + 1e-30f, "entry ", i, ": ",
                    g.scores[i], " vs ", want[i]);
      ++compared;
    }
    CHECK(compared > 50);
  }
  {
    // Zero capacity: scores are all padding.
    pqkv::selection_params const p8{.k = 8, .sink = 2, .window = 4};
    auto const e = make_case(shape, p8, {0, 0}, 0, 8, 72);
    pqkv::gpu::adc_topk<pqkv::gqa::sum> const op{shape, p8, {.max_batch = 2, .max_tokens = 16}};
    device_case dc(e, op.workspace_bytes());
    auto const g = run_scored(op, e, dc, pqkv::make_view(static_cast<std::uint8_t const*>(dc.codes.data()), 2, 2, 0, 8));
    CHECK(std::all_of(g.scores.begin(), g.scores.end(), [](float x) { return x == -std::numeric_limits<float>::infinity(); }));
    CHECK(g.out == std::vector<std::int32_t>(32, -1));
  }
}

namespace {

/// Queries of element type T: the GPU with T queries equals the CPU with
/// the same queries widened to float.
template <class T, class Agg>
void query_dtype_matches()
{
  auto const shape = shape_of(8, 2, 64, 8, 8);
  pqkv::selection_params const params{.k = 77, .sink = 1, .window = 5};
  auto d = make_case(shape, params, {1200, 300}, 1200, 77, 81);
  std::vector<T> qt(d.q.size());
  for (std::size_t i = 0; i < d.q.size(); ++i) {
    qt[i] = pqkv::from_float<T>(d.q[i]);
    d.q[i] = pqkv::to_float(qt[i]);  // what the CPU reference sees
  }
  pqkv::gpu::adc_topk<Agg> const op{shape, params, {.max_batch = 2, .max_tokens = 1200}};
  device_case dc(d, op.workspace_bytes());
  auto const qd = pqkv::test::upload(qt);
  op(pqkv::make_view(qd.data(), d.batch, shape.q_heads, shape.dim),  // a non-const view deduces too
     pqkv::make_view(static_cast<std::uint8_t const*>(dc.codes.data()), d.batch, shape.kv_heads, d.capacity, shape.m),
     pqkv::make_view(static_cast<float const*>(dc.centroids.data()), 2, 8, 256, 8),
     std::span<std::int32_t const>(dc.lens.data(), 2), pqkv::make_view(dc.out.data(), 2, 2, 77),
     pqkv::make_view(dc.valid.data(), 2, 2), dc.workspace.span(), nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  check_equal(d, run_cpu<Agg>(d), dc.download(d));
}

}  // namespace

TEST_CASE("gpu adc_topk: __half and __nv_bfloat16 queries equal the CPU on the widened queries")
{
  PQKV_REQUIRE_GPU();
  query_dtype_matches<__nv_bfloat16, pqkv::gqa::sum>();
  query_dtype_matches<__nv_bfloat16, pqkv::gqa::max>();
  query_dtype_matches<__half, pqkv::gqa::sum>();
}

TEST_CASE("gpu adc_topk: bad paged codes or scores throw before any launch")
{
  PQKV_REQUIRE_GPU();
  auto const shape = shape_of(8, 2, 64, 8, 8);
  pqkv::selection_params const params{.k = 16};
  auto const d = make_case(shape, params, {200, 100}, 256, 16, 91);
  pqkv::gpu::adc_topk<pqkv::gqa::sum> const op{shape, params, {.max_batch = 2, .max_tokens = 256}};
  device_case dc(d, op.workspace_bytes());
  auto const ph = make_paged(d, 16, true, 92);
  auto const pool = pqkv::test::upload(ph.pool);
  auto const table = pqkv::test::upload(ph.table);
  auto const* pp = static_cast<std::uint8_t const*>(pool.data());
  auto const* tp = static_cast<std::int32_t const*>(table.data());
  auto const q = pqkv::make_view(static_cast<float const*>(dc.q.data()), 2, 8, 64);
  auto const cents = pqkv::make_view(static_cast<float const*>(dc.centroids.data()), 2, 8, 256, 8);
  std::span<std::int32_t const> const lens(dc.lens.data(), 2);
  auto const out = pqkv::make_view(dc.out.data(), 2, 2, 16);
  auto const valid = pqkv::make_view(dc.valid.data(), 2, 2);
  pqkv::device_buffer<float> sc(64);
  auto const ws = dc.workspace.span();
  auto const good = pqkv::paged_codes{pqkv::make_view(pp, ph.num_pages, 2, 16, 8), pqkv::make_view(tp, 2, ph.width)};
  CHECK_NOTHROW(op(q, good, cents, lens, out, valid, ws, nullptr));
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  dc.poison();
  auto bad = [&](pqkv::paged_codes const& c, char const* what) {
    CHECK_THROWS_WITH_AS(op(q, c, cents, lens, out, valid, ws, nullptr), doctest::Contains(what), pqkv::error);
  };
  bad({pqkv::make_view(pp, ph.num_pages, 2, 0, 8), pqkv::make_view(tp, 2, ph.width)}, "page_size");
  bad({pqkv::make_view(pp, ph.num_pages, 1, 16, 8), pqkv::make_view(tp, 2, ph.width)}, "codes.pool.extent(1)=1");
  bad({pqkv::make_view(pp, ph.num_pages, 2, 16, 4), pqkv::make_view(tp, 2, ph.width)}, "codes.pool.extent(3)=4");
  bad({pqkv::make_view(pp, ph.num_pages, 2, 16, 8), pqkv::make_view(tp, 1, ph.width)},
      "codes.block_table.extent(0)=1");
  bad({pqkv::make_view(pp, ph.num_pages, 2, 32, 8), pqkv::make_view(tp, 2, ph.width)}, "exceeds limits.max_tokens");
  bad({pqkv::make_view(pp, 0, 2, 16, 8), pqkv::make_view(tp, 2, ph.width)}, "num_pages");
  bad({pqkv::make_view(pp + 4, ph.num_pages - 1, 2, 16, 8), pqkv::make_view(tp, 2, ph.width)}, "not aligned");
  bad({pqkv::make_strided_view<std::uint8_t const, 4>(pp, {ph.num_pages, 2, 16, 8}, {2 * 16 * 12, 16 * 12, 12, 1}),
       pqkv::make_view(tp, 2, ph.width)},
      "codes.pool.stride(2)=12");
  bad({pqkv::make_view(static_cast<std::uint8_t const*>(nullptr), ph.num_pages, 2, 16, 8), pqkv::make_view(tp, 2, ph.width)},
      "codes.pool.data_handle() is null");
  CHECK_THROWS_WITH_AS(op(q, good, cents, lens, out, valid, pqkv::make_view(sc.data(), 2, 2, 15), ws, nullptr),
                       doctest::Contains("scores extents"), pqkv::error);
  CHECK_THROWS_WITH_AS(op(q, good, cents, lens, out, valid, pqkv::make_view(static_cast<float*>(nullptr), 2, 2, 16), ws,
                          nullptr),
                       doctest::Contains("scores.data_handle() is null"), pqkv::error);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const after = dc.download(d);
  std::int32_t poison = 0;
  std::memset(&poison, 0x5A, sizeof(poison));
  CHECK(std::all_of(after.out.begin(), after.out.end(), [&](std::int32_t v) { return v == poison; }));
  CHECK(std::all_of(after.valid.begin(), after.valid.end(), [&](std::int32_t v) { return v == poison; }));
}

TEST_CASE("gpu adc_topk: records its device and throws when called from another")
{
  PQKV_REQUIRE_GPU();
  auto const shape = shape_of(8, 2, 64, 8, 8);
  pqkv::selection_params const params{.k = 16};
  int device = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  pqkv::gpu::adc_topk<pqkv::gqa::sum> const op{shape, params, {.max_batch = 2, .max_tokens = 256}};
  CHECK(op.device() == device);
  int const other = pqkv::test::other_device();
  if (other < 0) {
    MESSAGE("cross-device part skipped: it needs 2 GPUs");
    return;
  }
  auto const d = make_case(shape, params, {200, 100}, 256, 16, 91);
  device_case dc(d, op.workspace_bytes());
  auto const q = pqkv::make_view(static_cast<float const*>(dc.q.data()), 2, 8, 64);
  auto const codes = pqkv::make_view(static_cast<std::uint8_t const*>(dc.codes.data()), 2, 2, 256, 8);
  auto const cents = pqkv::make_view(static_cast<float const*>(dc.centroids.data()), 2, 8, 256, 8);
  std::span<std::int32_t const> const lens(dc.lens.data(), 2);
  {
    pqkv::test::device_scope on_other{other};
    CHECK_THROWS_WITH_AS(op(q, codes, cents, lens, pqkv::make_view(dc.out.data(), 2, 2, 16),
                            pqkv::make_view(dc.valid.data(), 2, 2), dc.workspace.span(), nullptr),
                         doctest::Contains("the object was built on device"), pqkv::error);
  }
  int now = -1;
  PQKV_CUDA_TRY(cudaGetDevice(&now));
  CHECK(now == device);
}

TEST_CASE("gpu adc_topk: a graph with paged codes replays while a sequence grows across page boundaries")
{
  PQKV_REQUIRE_GPU();
  auto const shape = shape_of(8, 2, 64, 8, 8);
  pqkv::selection_params const params{.k = 40, .sink = 2, .window = 8};
  index_t const page = 16, cap = 512;
  auto d = make_case(shape, params, {63, 16}, cap, 40, 101);
  pqkv::gpu::adc_topk<pqkv::gqa::max> const op{shape, params, {.max_batch = 2, .max_tokens = cap}};
  device_case dc(d, op.workspace_bytes());
  auto const ph = make_paged(d, page, true, 102);  // the engine maps pages ahead of the lengths
  auto const pool = pqkv::test::upload(ph.pool);
  auto const table = pqkv::test::upload(ph.table);
  pqkv::device_buffer<float> sc(static_cast<std::size_t>(2 * 2 * 40));
  pqkv::paged_codes const paged{
    pqkv::make_view(static_cast<std::uint8_t const*>(pool.data()), ph.num_pages, 2, page, 8),
    pqkv::make_view(static_cast<std::int32_t const*>(table.data()), 2, ph.width)};
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  pqkv::test::captured_graph const graph(stream, [&] {
    op(pqkv::make_view(static_cast<float const*>(dc.q.data()), 2, 8, 64), paged,
       pqkv::make_view(static_cast<float const*>(dc.centroids.data()), 2, 8, 256, 8),
       std::span<std::int32_t const>(dc.lens.data(), 2), pqkv::make_view(dc.out.data(), 2, 2, 40),
       pqkv::make_view(dc.valid.data(), 2, 2), pqkv::make_view(sc.data(), 2, 2, 40), dc.workspace.span(), stream);
  });
  for (std::vector<std::int32_t> lens : {std::vector<std::int32_t>{63, 16}, {64, 17}, {65, 33}, {129, 48}, {512, 511}}) {
    CAPTURE(lens[0]);
    d.lens = lens;
    PQKV_CUDA_TRY(cudaMemcpy(dc.lens.data(), lens.data(), lens.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice));
    dc.poison();
    graph.launch(stream);
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    auto const cpu = run_cpu<pqkv::gqa::max>(d);
    auto const g = dc.download(d);
    check_equal(d, cpu, g);
    CHECK(same_bits(pqkv::test::download(sc, 160), cpu_selected_scores(d, cpu), "graph scores"));
  }
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

TEST_CASE("gpu page lists equal the CPU reference (pages, FlashInfer arrays, slots)")
{
  PQKV_REQUIRE_GPU();
  // Selections from the scorer itself, plus hand-made rows with bad entries.
  auto const shape = shape_of(8, 2, 64, 8, 8);
  pqkv::selection_params const params{.k = 300, .sink = 2, .window = 8};
  auto const d = make_case(shape, params, {3000, 40, 0, 1777}, 3000, 300, 111);
  auto const sel_cpu = run_cpu<pqkv::gqa::sum>(d);
  std::vector<std::int32_t> sel = sel_cpu.out, valid = sel_cpu.valid;
  sel[0] = -1;             // a negative entry inside the valid prefix
  valid[1] = 400;          // a count above k (clamped)
  index_t const batch = d.batch, heads = shape.kv_heads, k = d.out_k, rows = batch * heads;
  for (index_t page : {index_t{1}, index_t{7}, index_t{16}, index_t{64}}) {
    CAPTURE(page);
    index_t const width = 3000 / page;  // a few trailing pages unmapped
    std::vector<std::int32_t> table(static_cast<std::size_t>(batch * width));
    for (std::size_t i = 0; i < table.size(); ++i) {
      table[i] = i % 17 == 5 ? -1 : static_cast<std::int32_t>(pqkv::detail::random_below(112, page, i, 100000));
    }
    auto const s_h = pqkv::make_view(static_cast<std::int32_t const*>(sel.data()), batch, heads, k);
    auto const v_h = pqkv::make_view(static_cast<std::int32_t const*>(valid.data()), batch, heads);
    auto const t_h = pqkv::make_view(static_cast<std::int32_t const*>(table.data()), batch, width);
    auto const sd = pqkv::test::upload(sel), vd = pqkv::test::upload(valid), td = pqkv::test::upload(table),
               ld = pqkv::test::upload(d.lens);
    auto const s_d = pqkv::make_view(static_cast<std::int32_t const*>(sd.data()), batch, heads, k);
    auto const v_d = pqkv::make_view(static_cast<std::int32_t const*>(vd.data()), batch, heads);
    auto const t_d = pqkv::make_view(static_cast<std::int32_t const*>(td.data()), batch, width);
    for (bool mapped : {false, true}) {
      CAPTURE(mapped);
      std::vector<std::int32_t> pages(sel.size()), counts(valid.size());
      pqkv::cpu::to_page_indices(s_h, v_h, page, mapped ? t_h : decltype(t_h){}, pqkv::make_view(pages.data(), batch, heads, k),
                                 pqkv::make_view(counts.data(), batch, heads));
      pqkv::device_buffer<std::int32_t> pd(sel.size()), cd(valid.size());
      pqkv::gpu::to_page_indices(s_d, v_d, page, mapped ? t_d : decltype(t_d){}, pqkv::make_view(pd.data(), batch, heads, k),
                                 pqkv::make_view(cd.data(), batch, heads), nullptr);
      CHECK(pqkv::test::download(pd, pages.size()) == pages);
      CHECK(pqkv::test::download(cd, counts.size()) == counts);

      std::vector<std::int32_t> indptr(static_cast<std::size_t>(rows + 1)), indices(sel.size() + 5), last(valid.size());
      pqkv::cpu::to_paged_kv(s_h, v_h, d.lens, page, mapped ? t_h : decltype(t_h){}, indptr, indices, last);
      pqkv::device_buffer<std::int32_t> ip(indptr.size()), ix(indices.size()), lp(last.size());
      PQKV_CUDA_TRY(cudaMemset(ix.data(), 0x5A, ix.size_bytes()));
      pqkv::gpu::to_paged_kv(s_d, v_d, std::span<std::int32_t const>(ld.data(), static_cast<std::size_t>(batch)), page,
                             mapped ? t_d : decltype(t_d){}, ip.span(), ix.span(), lp.span(), nullptr);
      CHECK(pqkv::test::download(ip, indptr.size()) == indptr);
      CHECK(pqkv::test::download(ix, indices.size()) == indices);
      CHECK(pqkv::test::download(lp, last.size()) == last);
    }
    std::vector<std::int32_t> slots(sel.size());
    pqkv::cpu::to_physical_slots(s_h, page, t_h, pqkv::make_view(slots.data(), batch, heads, k));
    pqkv::device_buffer<std::int32_t> sl(sel.size());
    pqkv::gpu::to_physical_slots(s_d, page, t_d, pqkv::make_view(sl.data(), batch, heads, k), nullptr);
    CHECK(pqkv::test::download(sl, slots.size()) == slots);
  }
  // Bad arguments throw before a launch.
  pqkv::device_buffer<std::int32_t> o(8), c(2);
  auto const s1 = pqkv::make_view(static_cast<std::int32_t const*>(o.data()), 1, 2, 4);
  auto const v1 = pqkv::make_view(static_cast<std::int32_t const*>(c.data()), 1, 2);
  CHECK_THROWS_AS(pqkv::gpu::to_page_indices(s1, v1, 0, {}, pqkv::make_view(o.data(), 1, 2, 4), pqkv::make_view(c.data(), 1, 2),
                                             nullptr),
                  pqkv::error);
  CHECK_THROWS_AS(pqkv::gpu::to_page_indices(s1, v1, 4, {}, pqkv::make_view(o.data(), 1, 2, 3), pqkv::make_view(c.data(), 1, 2),
                                             nullptr),
                  pqkv::error);
}

// ---- residual (VQKV-style) key codes: gpu::rq_scorer -------------------------------------

namespace {

/// A residual-code case: the adc case's queries, lengths and codes (m =
/// splits * stages one-byte codes a token), and centroids [books, splits,
/// stages, 2^bits, dsub].
struct rq_case {
  pqkv::rq_config cfg;
  index_t books = 1;
  case_data d;
  std::vector<float> centroids;

  [[nodiscard]] auto centroid_view(float const* p) const
  {
    return pqkv::make_view(p, books, cfg.splits, cfg.stages, cfg.ksub(), cfg.dsub());
  }
};

rq_case make_rq_case(pqkv::rq_config cfg, index_t q_heads, index_t kv_heads, bool shared, pqkv::selection_params params,
                     std::vector<std::int32_t> lens, index_t capacity, index_t out_k, std::uint64_t seed)
{
  rq_case c;
  c.cfg = std::move(cfg);
  c.books = shared ? 1 : kv_heads;
  // The adc shape only carries the sizes of the shared case data here.
  pqkv::adc_shape const sizes{q_heads, kv_heads, c.cfg.dim, c.cfg.codes_per_row(), c.cfg.bits};
  c.d = make_case(sizes, params, std::move(lens), capacity, out_k, seed);
  c.centroids.resize(static_cast<std::size_t>(c.books * c.cfg.codes_per_row() * c.cfg.ksub() * c.cfg.dsub()));
  for (std::size_t i = 0; i < c.centroids.size(); ++i) {
    // Later stages are smaller, as residual codebooks are.
    auto const stage = static_cast<double>((i / static_cast<std::size_t>(c.cfg.ksub() * c.cfg.dsub())) %
                                           static_cast<std::size_t>(c.cfg.stages));
    c.centroids[i] = static_cast<float>((2.0 * pqkv::detail::random_unit(seed, 7, i) - 1.0) / (1.0 + stage));
  }
  return c;
}

template <class Agg>
result run_cpu_rq(rq_case const& c)
{
  case_data const& d = c.d;
  index_t const kv = d.shape.kv_heads, qh = d.shape.q_heads, dim = c.cfg.dim, nk = c.cfg.codes_per_row();
  index_t const cap = std::max<index_t>(d.capacity, 1);
  result r;
  r.out.assign(static_cast<std::size_t>(d.batch * kv * d.out_k), 0);
  r.valid.assign(static_cast<std::size_t>(d.batch * kv), 0);
  r.scores.assign(static_cast<std::size_t>(d.batch * kv * cap), 0.f);
  for (index_t b = 0; b < d.batch; ++b) {
    pqkv::cpu::rq_scorer<std::uint8_t, Agg> s{c.cfg, qh, c.centroid_view(c.centroids.data()),
                                              pqkv::make_view(d.codes.data() + b * kv * d.capacity * nk, kv,
                                                              d.capacity, nk),
                                              d.lens[static_cast<std::size_t>(b)], d.params};
    s.select(pqkv::make_view(d.q.data() + b * qh * dim, qh, dim),
             pqkv::make_view(r.out.data() + b * kv * d.out_k, kv, d.out_k),
             pqkv::make_view(r.scores.data() + b * kv * cap, kv, cap));
    std::copy(s.valid_counts().begin(), s.valid_counts().end(), r.valid.begin() + b * kv);
  }
  return r;
}

/// The GPU scorer on the case's codes, or on them moved into the page pool `ph`.
template <class Agg>
gpu_scored run_gpu_rq(rq_case const& c, paged_host const* ph = nullptr)
{
  case_data const& d = c.d;
  index_t const kv = d.shape.kv_heads;
  pqkv::gpu::rq_scorer<Agg> const op{c.cfg, d.shape.q_heads, kv, d.params,
                                     {.max_batch = d.batch, .max_tokens = std::max<index_t>(d.capacity, 1)}};
  device_case dc(d, op.workspace_bytes());
  pqkv::device_buffer<float> centroids(c.centroids.size());
  PQKV_CUDA_TRY(cudaMemcpy(centroids.data(), c.centroids.data(), centroids.size_bytes(), cudaMemcpyHostToDevice));
  pqkv::device_buffer<float> scores(static_cast<std::size_t>(std::max<index_t>(d.batch * kv * d.out_k, 1)));
  PQKV_CUDA_TRY(cudaMemset(scores.data(), 0x5A, scores.size_bytes()));
  auto const queries = pqkv::make_view(static_cast<float const*>(dc.q.data()), d.batch, d.shape.q_heads, d.shape.dim);
  std::span<std::int32_t const> const lens(dc.lens.data(), static_cast<std::size_t>(d.batch));
  auto const out = pqkv::make_view(dc.out.data(), d.batch, kv, d.out_k);
  auto const valid = pqkv::make_view(dc.valid.data(), d.batch, kv);
  auto const score_view = pqkv::make_view(scores.data(), d.batch, kv, d.out_k);
  if (ph == nullptr) {
    op(queries, pqkv::make_view(static_cast<std::uint8_t const*>(dc.codes.data()), d.batch, kv, d.capacity, d.shape.m),
       c.centroid_view(centroids.data()), lens, out, valid, score_view, dc.workspace.span(), nullptr);
  } else {
    auto const pool = pqkv::test::upload(ph->pool);
    auto const table = pqkv::test::upload(ph->table);
    pqkv::paged_codes const paged{
      pqkv::make_view(static_cast<std::uint8_t const*>(pool.data()), ph->num_pages, kv, ph->page, d.shape.m),
      pqkv::make_view(static_cast<std::int32_t const*>(table.data()), d.batch, ph->width)};
    op(queries, paged, c.centroid_view(centroids.data()), lens, out, valid, score_view, dc.workspace.span(), nullptr);
    PQKV_CUDA_TRY(cudaDeviceSynchronize());  // before the pool and table are freed
  }
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const r = dc.download(d);
  return {r.out, r.valid, pqkv::test::download(scores, static_cast<std::size_t>(d.batch * kv * d.out_k))};
}

}  // namespace

TEST_CASE("gpu rq_scorer: selections and scores equal the CPU rq_scorer's (splits, permutations, shared books)")
{
  PQKV_REQUIRE_GPU();
  auto strided = pqkv::test::rq_test_config(64, 4, 3, 4);
  strided.permutation = pqkv::test::stride_permutation(64);
  struct setup {
    pqkv::rq_config cfg;
    index_t q_heads, kv_heads;
    bool shared;
    pqkv::selection_params params;
    std::vector<std::int32_t> lens;
    index_t capacity, out_k;
  };
  setup const setups[] = {
    // VQKV's design point for keys: 8 stages of 256, d = 128, group 4.
    {pqkv::test::rq_test_config(128, 1, 8, 8), 8, 2, false, {.k = 600, .sink = 4, .window = 16}, {3001, 2500}, 3001,
     600},
    // Two RoPE-like splits, a shared codebook, group 2, k above one row's candidates.
    {pqkv::test::rq_test_config(64, 2, 4, 6, true), 4, 2, true, {.k = 2048, .sink = 2, .window = 8}, {2049, 17}, 2049,
     2048},
    // Four splits of a strided permutation, group 8, k = 1.
    {strided, 8, 1, false, {.k = 1, .sink = 0, .window = 0}, {1500}, 1500, 3},
  };
  std::uint64_t seed = 300;
  for (auto const& s : setups) {
    CAPTURE(s.cfg.splits);
    CAPTURE(s.cfg.stages);
    CAPTURE(s.cfg.bits);
    auto const c = make_rq_case(s.cfg, s.q_heads, s.kv_heads, s.shared, s.params, s.lens, s.capacity, s.out_k, ++seed);
    {
      auto const cpu = run_cpu_rq<pqkv::gqa::sum>(c);
      auto const g = run_gpu_rq<pqkv::gqa::sum>(c);
      CHECK(g.valid == cpu.valid);
      CHECK(g.out == cpu.out);
      CHECK(same_bits(g.scores, cpu_selected_scores(c.d, cpu), "rq sum scores"));
    }
    {
      auto const cpu = run_cpu_rq<pqkv::gqa::max>(c);
      auto const g = run_gpu_rq<pqkv::gqa::max>(c);
      CHECK(g.valid == cpu.valid);
      CHECK(g.out == cpu.out);
    }
    {
      auto const cpu = run_cpu_rq<pqkv::gqa::softmax_sum>(c);
      auto const g = run_gpu_rq<pqkv::gqa::softmax_sum>(c);
      index_t const mismatched = check_near_equal(c.d, cpu, result{g.out, g.valid, {}}, 1e-5);
      CHECK(mismatched <= 4);
    }
  }
}

TEST_CASE("gpu rq_scorer: one stage per split and no permutation is PQ: gpu adc_topk's selection and scores")
{
  PQKV_REQUIRE_GPU();
  auto const shape = shape_of(8, 2, 64, 4, 8);
  pqkv::selection_params const params{.k = 300, .sink = 4, .window = 8};
  auto const d = make_case(shape, params, {2000, 1234}, 2000, 300, 77);
  pqkv::gpu::adc_topk<pqkv::gqa::sum> const pq{shape, params, {.max_batch = 2, .max_tokens = 2000}};
  device_case dc(d, pq.workspace_bytes());
  auto const want = run_scored(pq, d, dc,
                               pqkv::make_view(static_cast<std::uint8_t const*>(dc.codes.data()), d.batch,
                                               shape.kv_heads, d.capacity, shape.m));
  rq_case c;
  c.cfg = pqkv::test::rq_test_config(64, 4, 1, 8);
  c.books = shape.kv_heads;
  c.d = d;
  c.centroids = d.centroids;  // [kv, m, ksub, dsub] is [kv, splits, 1, ksub, dsub]
  auto const got = run_gpu_rq<pqkv::gqa::sum>(c);
  CHECK(got.out == want.out);
  CHECK(got.valid == want.valid);
  CHECK(same_bits(got.scores, want.scores, "rq vs pq scores"));
}

TEST_CASE("gpu rq_scorer: paged codes give the contiguous selection and scores bit for bit")
{
  PQKV_REQUIRE_GPU();
  std::uint64_t seed = 900;
  for (index_t page : {index_t{16}, index_t{7}}) {
    CAPTURE(page);
    index_t const cap = (2048 + page - 1) / page * page + 2 * page;  // table entries past the longest sequence
    auto const c = make_rq_case(pqkv::test::rq_test_config(64, 2, 4, 8, true), 8, 2, false,
                                {.k = 200, .sink = 4, .window = 16}, {2048, 999}, cap, 200, ++seed);
    auto const ph = make_paged(c.d, page, false, ++seed);
    auto const contiguous = run_gpu_rq<pqkv::gqa::sum>(c);
    auto const via_pages = run_gpu_rq<pqkv::gqa::sum>(c, &ph);
    CHECK(via_pages.valid == contiguous.valid);
    CHECK(via_pages.out == contiguous.out);
    CHECK(same_bits(via_pages.scores, contiguous.scores, "rq paged vs contiguous scores"));
    auto const cpu = run_cpu_rq<pqkv::gqa::sum>(c);
    CHECK(via_pages.out == cpu.out);
  }
}

TEST_CASE("gpu rq_scorer: bad configurations and views throw before any launch")
{
  PQKV_REQUIRE_GPU();
  using op_t = pqkv::gpu::rq_scorer<pqkv::gqa::sum>;
  pqkv::selection_params const params{.k = 8};
  pqkv::gpu::adc_limits const limits{.max_batch = 1, .max_tokens = 64};
  CHECK_THROWS_AS(op_t(pqkv::test::rq_test_config(64, 1, 4, 9), 4, 2, params, limits), pqkv::error);    // bits > 8
  CHECK_THROWS_AS(op_t(pqkv::test::rq_test_config(64, 1, 4, 8), 6, 4, params, limits), pqkv::error);    // q % kv
  CHECK_THROWS_AS(op_t(pqkv::test::rq_test_config(64, 1, 4, 8), 32, 2, params, limits), pqkv::error);   // group 16
  CHECK_THROWS_AS(op_t(pqkv::test::rq_test_config(1024, 2, 4, 8), 4, 2, params, limits), pqkv::error);  // dim > 512
  CHECK_THROWS_AS(op_t(pqkv::test::rq_test_config(64, 1, 64, 8), 8, 2, params, limits), pqkv::error);   // LUT > smem
  op_t const op{pqkv::test::rq_test_config(64, 2, 2, 8), 4, 2, params, limits};
  pqkv::device_buffer<float> q(4 * 64), cent(2 * 2 * 2 * 256 * 32);
  pqkv::device_buffer<std::uint8_t> codes(2 * 64 * 4);
  pqkv::device_buffer<std::int32_t> lens(1), out(2 * 8), valid(2);
  pqkv::device_buffer<std::byte> ws(op.workspace_bytes());
  PQKV_CUDA_TRY(cudaMemset(out.data(), 0x5A, out.size_bytes()));
  auto const qv = pqkv::make_view(static_cast<float const*>(q.data()), 1, 4, 64);
  std::span<std::int32_t const> const lv(lens.data(), 1);
  auto const ov = pqkv::make_view(out.data(), 1, 2, 8);
  auto const vv = pqkv::make_view(valid.data(), 1, 2);
  auto const cv = [&](index_t books, index_t stages) {
    return pqkv::make_view(static_cast<float const*>(cent.data()), books, 2, stages, 256, 32);
  };
  auto const kv = [&](index_t m) { return pqkv::make_view(static_cast<std::uint8_t const*>(codes.data()), 1, 2, 64, m); };
  CHECK_NOTHROW(op(qv, kv(4), cv(2, 2), lv, ov, vv, ws.span(), nullptr));
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  PQKV_CUDA_TRY(cudaMemset(out.data(), 0x5A, out.size_bytes()));
  CHECK_THROWS_AS(op(qv, kv(3), cv(2, 2), lv, ov, vv, ws.span(), nullptr), pqkv::error);  // codes per token
  CHECK_THROWS_AS(op(qv, kv(4), cv(3, 2), lv, ov, vv, ws.span(), nullptr), pqkv::error);  // codebook heads
  CHECK_THROWS_AS(op(qv, kv(4), cv(2, 1), lv, ov, vv, ws.span(), nullptr), pqkv::error);  // stages
  CHECK_THROWS_AS(op(qv, kv(4), cv(2, 2), lv, ov, vv, ws.span().first(8), nullptr), pqkv::error);  // workspace
  auto const after = pqkv::test::download(out, out.size());
  CHECK(std::all_of(after.begin(), after.end(), [](std::int32_t v) { return v == 0x5A5A5A5A; }));
}
