// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::adc_topk against pqkv::cpu::adc_topk on the same random inputs:
// the same selections and valid counts (gqa::sum, gqa::max exactly;
// gqa::softmax_sum exactly except at near-ties, which are counted and
// bounded), across m, nbits, k, ragged batches and graph replays.
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/random.hpp>
#include <pqkv/score/adc_topk.cuh>
#include <pqkv/score/adc_topk.hpp>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"

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
