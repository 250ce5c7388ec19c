// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::merge_state / merge_state_in_place / merge_states against
// pqkv::cpu::merge_states on the same random states (empty -inf partials
// included): bit for bit where one state or none is non-empty, within the
// contract's tolerance elsewhere; float, half and bf16; scalar and 16-byte
// paths; strided (states-major) inputs; graph replays; bad arguments throw.
#include <pqkv/attend/merge_state.cuh>
#include <pqkv/attend/merge_state.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/random.hpp>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"
#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using pqkv::index_t;
constexpr float neg_inf = -std::numeric_limits<float>::infinity();

/// Host states v [rows, S, heads, dim] (as T and as the floats they hold) and
/// lse [rows, S, heads]; about a quarter of the (row, state, head) partials
/// are empty, and row 0's head 0 is empty in every state.
template <class T>
struct states {
  index_t rows, s, heads, dim;
  std::vector<T> v;
  std::vector<float> vf;   // v as float, the CPU reference's input
  std::vector<float> lse;
};

template <class T>
states<T> make_states(index_t rows, index_t s, index_t heads, index_t dim, float lse_span, std::uint64_t seed)
{
  states<T> st{rows, s, heads, dim, {}, {}, {}};
  auto const nv = static_cast<std::size_t>(rows * s * heads * dim);
  st.v.resize(nv);
  st.vf.resize(nv);
  for (std::size_t i = 0; i < nv; ++i) {
    st.v[i] = pqkv::from_float<T>(4.f * pqkv::test::noise(seed, i));
    st.vf[i] = pqkv::to_float(st.v[i]);
  }
  st.lse.resize(static_cast<std::size_t>(rows * s * heads));
  for (std::size_t i = 0; i < st.lse.size(); ++i) {
    bool const empty = pqkv::detail::random_below(seed, 7, i, 4) == 0;
    st.lse[i] = empty ? neg_inf : static_cast<float>((2.0 * pqkv::detail::random_unit(seed, 8, i) - 1.0) * lse_span);
  }
  for (index_t j = 0; j < s; ++j) { st.lse[static_cast<std::size_t>(j * heads)] = neg_inf; }
  return st;
}

/// The CPU reference over every row: out [rows, heads, dim], lse_out [rows, heads].
template <class T>
void reference(states<T> const& st, std::vector<float>& out, std::vector<float>& lse_out)
{
  index_t const h = st.heads, d = st.dim, s = st.s;
  out.assign(static_cast<std::size_t>(st.rows * h * d), 0.f);
  lse_out.assign(static_cast<std::size_t>(st.rows * h), 0.f);
  for (index_t r = 0; r < st.rows; ++r) {
    auto o = pqkv::make_strided_view<float const, 3>(st.vf.data() + r * s * h * d, {s, h, d}, {h * d, d, 1});
    auto l = pqkv::make_view(st.lse.data() + r * s * h, s, h);
    auto dst = pqkv::make_strided_view<float, 3 - 1>(out.data() + r * h * d, {h, d}, {d, 1});
    pqkv::cpu::merge_states(o, l, dst, std::span<float>{lse_out.data() + r * h, static_cast<std::size_t>(h)});
  }
}

/// Relative precision of T (one ulp at 1).
template <class T>
float type_eps()
{
  if constexpr (std::is_same_v<T, float>) {
    return 0.f;
  } else if constexpr (std::is_same_v<T, __half>) {
    return 0x1.0p-10f;
  } else {
    return 0x1.0p-7f;
  }
}

/// Compares GPU outputs with the reference; exact where at most one state of
/// the (row, head) is non-empty. Reports the first failure with its index.
template <class T>
void compare(states<T> const& st, std::vector<T> const& got, std::vector<float> const& got_lse,
             std::vector<float> const& ref, std::vector<float> const& ref_lse, char const* what)
{
  index_t const h = st.heads, d = st.dim, s = st.s;
  index_t bad = 0, exact_rows = 0;
  for (index_t r = 0; r < st.rows; ++r) {
    for (index_t g = 0; g < h; ++g) {
      int full = 0;
      for (index_t j = 0; j < s; ++j) { full += st.lse[static_cast<std::size_t>((r * s + j) * h + g)] != neg_inf; }
      bool const exact = full <= 1;
      exact_rows += exact;
      auto const li = static_cast<std::size_t>(r * h + g);
      float const gl = got_lse[li], rl = ref_lse[li];
      bool const lse_ok = exact ? std::memcmp(&gl, &rl, sizeof(float)) == 0
                                : std::abs(gl - rl) <= 2e-6f * std::max(1.f, std::abs(rl));
      if (!lse_ok && bad++ < 5) {
        MESSAGE(what, ": lse differs at (row ", r, ", head ", g, "): gpu ", gl, ", cpu ", rl, " (non-empty states ",
                full, ")");
      }
      for (index_t k = 0; k < d; ++k) {
        auto const i = static_cast<std::size_t>((r * h + g) * d + k);
        T const rt = pqkv::from_float<T>(ref[i]);
        float const gv = pqkv::to_float(got[i]), rv = pqkv::to_float(rt);
        bool ok = false;
        if (exact) {
          ok = std::memcmp(&got[i], &rt, sizeof(T)) == 0;
        } else {
          float vmax = 0.f;
          for (index_t j = 0; j < s; ++j) {
            vmax = std::max(vmax, std::abs(st.vf[static_cast<std::size_t>(((r * s + j) * h + g) * d + k)]));
          }
          // 0x1p-24: half's subnormal spacing.
          ok = std::abs(gv - ref[i]) <= 2e-6f * vmax + type_eps<T>() * std::abs(ref[i]) + 0x1.0p-24f;
        }
        if (!ok && bad++ < 5) {
          MESSAGE(what, ": v differs at (row ", r, ", head ", g, ", d ", k, "): gpu ", gv, ", cpu ", ref[i],
                  " (rounded ", rv, "), non-empty states ", full);
        }
      }
    }
  }
  CHECK_MESSAGE(bad == 0, what, ": ", bad, " mismatches");
  CHECK(exact_rows > 0);  // the exact path was exercised
}

template <class T>
std::vector<T> poison(std::size_t n)
{
  return std::vector<T>(n, pqkv::from_float<T>(12345.f));
}

/// merge_states over [rows, S, heads, dim] (or states-major storage seen
/// through permuted strides) against the reference.
template <class T>
void check_merge_states(index_t rows, index_t s, index_t heads, index_t dim, bool states_major, std::uint64_t seed)
{
  CAPTURE(rows);
  CAPTURE(s);
  CAPTURE(heads);
  CAPTURE(dim);
  CAPTURE(states_major);
  auto const st = make_states<T>(rows, s, heads, dim, 20.f, seed);
  std::vector<float> ref, ref_lse;
  reference(st, ref, ref_lse);

  // Device copy in the chosen storage order.
  std::vector<T> stored(st.v.size());
  std::vector<float> stored_lse(st.lse.size());
  for (index_t r = 0; r < rows; ++r) {
    for (index_t j = 0; j < s; ++j) {
      for (index_t g = 0; g < heads; ++g) {
        auto const src = static_cast<std::size_t>((r * s + j) * heads + g);
        auto const dst = static_cast<std::size_t>(states_major ? (j * rows + r) * heads + g : src);
        stored_lse[dst] = st.lse[src];
        std::copy_n(st.v.begin() + static_cast<std::ptrdiff_t>(src * static_cast<std::size_t>(dim)), dim,
                    stored.begin() + static_cast<std::ptrdiff_t>(dst * static_cast<std::size_t>(dim)));
      }
    }
  }
  auto dv = pqkv::test::upload(stored);
  auto dl = pqkv::test::upload(stored_lse);
  auto dout = pqkv::test::upload(poison<T>(static_cast<std::size_t>(rows * heads * dim)));
  auto dlse = pqkv::test::upload(std::vector<float>(static_cast<std::size_t>(rows * heads), 777.f));

  std::array<index_t, 4> vs{s * heads * dim, heads * dim, dim, 1};
  std::array<index_t, 3> ls{s * heads, heads, 1};
  if (states_major) {
    vs = {heads * dim, rows * heads * dim, dim, 1};
    ls = {heads, rows * heads, 1};
  }
  auto v_view = pqkv::make_strided_view<T const, 4>(dv.data(), {rows, s, heads, dim}, {vs[0], vs[1], vs[2], vs[3]});
  auto l_view = pqkv::make_strided_view<float const, 3>(dl.data(), {rows, s, heads}, {ls[0], ls[1], ls[2]});
  pqkv::gpu::merge_states<T>(v_view, l_view, pqkv::make_view(dout.data(), rows, heads, dim),
                             pqkv::make_view(dlse.data(), rows, heads), nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const got = pqkv::test::download(dout, static_cast<std::size_t>(rows * heads * dim));
  auto const got_lse = pqkv::test::download(dlse, static_cast<std::size_t>(rows * heads));
  compare(st, got, got_lse, ref, ref_lse, "merge_states");
}

/// merge_state and merge_state_in_place against the reference (S = 2), and
/// against merge_states over the same pair, bit for bit.
template <class T>
void check_merge_pair(index_t rows, index_t heads, index_t dim, index_t pad, std::uint64_t seed)
{
  CAPTURE(rows);
  CAPTURE(heads);
  CAPTURE(dim);
  CAPTURE(pad);
  auto const st = make_states<T>(rows, 2, heads, dim, 30.f, seed);
  std::vector<float> ref, ref_lse;
  reference(st, ref, ref_lse);
  auto const n = static_cast<std::size_t>(rows * heads * dim);
  // a and b as separate arrays whose rows are `dim + pad` apart (pad breaks 16-byte packets).
  index_t const row = dim + pad;
  std::vector<T> ha(static_cast<std::size_t>(rows * heads * row)), hb(ha.size());
  std::vector<float> la(static_cast<std::size_t>(rows * heads)), lb(la.size());
  for (index_t r = 0; r < rows; ++r) {
    for (index_t g = 0; g < heads; ++g) {
      for (index_t k = 0; k < dim; ++k) {
        ha[static_cast<std::size_t>((r * heads + g) * row + k)] =
          st.v[static_cast<std::size_t>(((r * 2 + 0) * heads + g) * dim + k)];
        hb[static_cast<std::size_t>((r * heads + g) * row + k)] =
          st.v[static_cast<std::size_t>(((r * 2 + 1) * heads + g) * dim + k)];
      }
      la[static_cast<std::size_t>(r * heads + g)] = st.lse[static_cast<std::size_t>((r * 2 + 0) * heads + g)];
      lb[static_cast<std::size_t>(r * heads + g)] = st.lse[static_cast<std::size_t>((r * 2 + 1) * heads + g)];
    }
  }
  auto da = pqkv::test::upload(ha);
  auto db = pqkv::test::upload(hb);
  auto dla = pqkv::test::upload(la);
  auto dlb = pqkv::test::upload(lb);
  auto dout = pqkv::test::upload(poison<T>(n));
  auto dlse = pqkv::test::upload(std::vector<float>(la.size(), 777.f));
  auto sv = [&](T* p) { return pqkv::make_strided_view<T, 3>(p, {rows, heads, dim}, {heads * row, row, 1}); };
  auto sl = [&](float* p) { return pqkv::make_view(p, rows, heads); };
  auto out = pqkv::make_view(dout.data(), rows, heads, dim);
  pqkv::gpu::merge_state<T>(pqkv::as_const(sv(da.data())), pqkv::as_const(sl(dla.data())),
                            pqkv::as_const(sv(db.data())), pqkv::as_const(sl(dlb.data())), out, sl(dlse.data()),
                            nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const got = pqkv::test::download(dout, n);
  auto const got_lse = pqkv::test::download(dlse, la.size());
  compare(st, got, got_lse, ref, ref_lse, "merge_state");

  // merge_states over the same pair: bit for bit.
  auto dv2 = pqkv::test::upload(st.v);
  auto dl2 = pqkv::test::upload(st.lse);
  auto dout2 = pqkv::test::upload(poison<T>(n));
  auto dlse2 = pqkv::test::upload(std::vector<float>(la.size(), 777.f));
  pqkv::gpu::merge_states<T>(pqkv::make_view(static_cast<T const*>(dv2.data()), rows, index_t{2}, heads, dim),
                             pqkv::make_view(static_cast<float const*>(dl2.data()), rows, index_t{2}, heads),
                             pqkv::make_view(dout2.data(), rows, heads, dim), sl(dlse2.data()), nullptr);
  // In place over a: a <- merge(a, b).
  pqkv::gpu::merge_state_in_place<T>(sv(da.data()), sl(dla.data()), pqkv::as_const(sv(db.data())),
                                     pqkv::as_const(sl(dlb.data())), nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const got2 = pqkv::test::download(dout2, n);
  auto const got2_lse = pqkv::test::download(dlse2, la.size());
  auto const in_place = pqkv::test::download(da, ha.size());
  auto const in_place_lse = pqkv::test::download(dla, la.size());
  CHECK(std::memcmp(got2_lse.data(), got_lse.data(), la.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(in_place_lse.data(), got_lse.data(), la.size() * sizeof(float)) == 0);
  index_t diff_states = 0, diff_in_place = 0;
  for (index_t r = 0; r < rows; ++r) {
    for (index_t g = 0; g < heads; ++g) {
      for (index_t k = 0; k < dim; ++k) {
        auto const i = static_cast<std::size_t>((r * heads + g) * dim + k);
        auto const j = static_cast<std::size_t>((r * heads + g) * row + k);
        diff_states += std::memcmp(&got2[i], &got[i], sizeof(T)) != 0;
        diff_in_place += std::memcmp(&in_place[j], &got[i], sizeof(T)) != 0;
      }
    }
  }
  CHECK_MESSAGE(diff_states == 0, "merge_states over (a, b) differs from merge_state in ", diff_states, " elements");
  CHECK_MESSAGE(diff_in_place == 0, "merge_state_in_place differs from merge_state in ", diff_in_place, " elements");
}

}  // namespace

TEST_CASE("gpu::merge_state: two states match the CPU reference (float, half, bf16)")
{
  PQKV_REQUIRE_GPU();
  std::uint64_t seed = 1;
  for (index_t dim : {index_t{128}, index_t{64}, index_t{8}, index_t{37}, index_t{512}}) {
    for (index_t pad : {index_t{0}, index_t{1}}) {
      check_merge_pair<float>(9, 4, dim, pad, seed++);
      check_merge_pair<__half>(9, 4, dim, pad, seed++);
      check_merge_pair<__nv_bfloat16>(9, 4, dim, pad, seed++);
    }
  }
}

TEST_CASE("gpu::merge_states: N-way merges match the CPU reference, row- and states-major")
{
  PQKV_REQUIRE_GPU();
  std::uint64_t seed = 100;
  for (index_t s : {index_t{1}, index_t{3}, index_t{5}}) {
    for (bool states_major : {false, true}) {
      check_merge_states<float>(7, s, 8, 128, states_major, seed++);
      check_merge_states<__half>(7, s, 8, 128, states_major, seed++);
      check_merge_states<__nv_bfloat16>(7, s, 8, 64, states_major, seed++);
      check_merge_states<float>(3, s, 2, 33, states_major, seed++);
    }
  }
  check_merge_states<float>(300, 4, 8, 128, false, seed++);  // more tasks than one pass of the grid's blocks
}

TEST_CASE("gpu::merge_states: zero states give v = 0 and lse = -inf; empty shapes launch nothing")
{
  PQKV_REQUIRE_GPU();
  index_t const rows = 3, heads = 2, dim = 16;
  pqkv::device_buffer<float> v(1), l(1);
  auto dout = pqkv::test::upload(poison<float>(static_cast<std::size_t>(rows * heads * dim)));
  auto dlse = pqkv::test::upload(std::vector<float>(static_cast<std::size_t>(rows * heads), 5.f));
  pqkv::gpu::merge_states<float>(pqkv::make_view(static_cast<float const*>(v.data()), rows, index_t{0}, heads, dim),
                                 pqkv::make_view(static_cast<float const*>(l.data()), rows, index_t{0}, heads),
                                 pqkv::make_view(dout.data(), rows, heads, dim),
                                 pqkv::make_view(dlse.data(), rows, heads), nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  for (float x : pqkv::test::download(dout, static_cast<std::size_t>(rows * heads * dim))) { CHECK(x == 0.f); }
  for (float x : pqkv::test::download(dlse, static_cast<std::size_t>(rows * heads))) { CHECK(x == neg_inf); }
  // rows = 0 with null pointers: nothing to do, nothing thrown.
  pqkv::gpu::merge_states<float>(pqkv::make_view(static_cast<float const*>(nullptr), 0, 2, 2, 4),
                                 pqkv::make_view(static_cast<float const*>(nullptr), 0, 2, 2),
                                 pqkv::make_view(static_cast<float*>(nullptr), 0, 2, 4),
                                 pqkv::make_view(static_cast<float*>(nullptr), 0, 2), nullptr);
}

TEST_CASE("gpu::merge_state: a captured graph replays with new inputs")
{
  PQKV_REQUIRE_GPU();
  index_t const rows = 5, heads = 4, dim = 64;
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  auto const n = static_cast<std::size_t>(rows * 2 * heads * dim);
  pqkv::device_buffer<__nv_bfloat16> dv(n), dout(static_cast<std::size_t>(rows * heads * dim));
  pqkv::device_buffer<float> dl(static_cast<std::size_t>(rows * 2 * heads)), dlse(static_cast<std::size_t>(rows * heads));
  pqkv::test::captured_graph graph{stream, [&] {
    pqkv::gpu::merge_states<__nv_bfloat16>(
      pqkv::make_view(static_cast<__nv_bfloat16 const*>(dv.data()), rows, index_t{2}, heads, dim),
      pqkv::make_view(static_cast<float const*>(dl.data()), rows, index_t{2}, heads),
      pqkv::make_view(dout.data(), rows, heads, dim), pqkv::make_view(dlse.data(), rows, heads), stream);
  }};
  for (std::uint64_t round = 0; round < 3; ++round) {
    auto const st = make_states<__nv_bfloat16>(rows, 2, heads, dim, 10.f, 500 + round);
    PQKV_CUDA_TRY(cudaMemcpyAsync(dv.data(), st.v.data(), n * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice, stream));
    PQKV_CUDA_TRY(cudaMemcpyAsync(dl.data(), st.lse.data(), st.lse.size() * sizeof(float), cudaMemcpyHostToDevice,
                                  stream));
    graph.launch(stream);
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    std::vector<float> ref, ref_lse;
    reference(st, ref, ref_lse);
    compare(st, pqkv::test::download(dout, static_cast<std::size_t>(rows * heads * dim)),
            pqkv::test::download(dlse, static_cast<std::size_t>(rows * heads)), ref, ref_lse, "graph replay");
  }
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

TEST_CASE("gpu::merge_state: bad arguments throw before any launch")
{
  // Validation needs no GPU: every case throws before touching the device.
  using pqkv::test::error_message;
  alignas(16) static float buf[4096];
  float* p = buf;
  auto v3 = [&](float* q, index_t r, index_t h, index_t d) { return pqkv::make_view(q, r, h, d); };
  auto c3 = [&](float* q, index_t r, index_t h, index_t d) { return pqkv::make_view(static_cast<float const*>(q), r, h, d); };
  auto l2 = [&](float* q, index_t r, index_t h) { return pqkv::make_view(q, r, h); };
  auto cl2 = [&](float* q, index_t r, index_t h) { return pqkv::make_view(static_cast<float const*>(q), r, h); };
  auto call = [&](auto va, auto la, auto vb, auto lb, auto vo, auto lo) {
    return error_message([&] { pqkv::gpu::merge_state<float>(va, la, vb, lb, vo, lo, nullptr); });
  };
  // Distinct, non-overlapping regions of buf: a at 0, b at 512, out at 1024, lse at 2048+.
  CHECK(call(c3(p, 2, 2, 8), cl2(p + 2048, 2, 2), c3(p + 512, 2, 3, 8), cl2(p + 2056, 2, 2), v3(p + 1024, 2, 2, 8),
             l2(p + 2064, 2, 2))
          .find("v_b extents") != std::string::npos);
  CHECK(call(c3(p, 2, 2, 8), cl2(p + 2048, 2, 3), c3(p + 512, 2, 2, 8), cl2(p + 2056, 2, 2), v3(p + 1024, 2, 2, 8),
             l2(p + 2064, 2, 2))
          .find("lse_a extents") != std::string::npos);
  CHECK(call(c3(nullptr, 2, 2, 8), cl2(p + 2048, 2, 2), c3(p + 512, 2, 2, 8), cl2(p + 2056, 2, 2),
             v3(p + 1024, 2, 2, 8), l2(p + 2064, 2, 2))
          .find("v_a.data_handle() is null") != std::string::npos);
  // out overlapping a partially (shifted by one element).
  CHECK(call(c3(p, 2, 2, 8), cl2(p + 2048, 2, 2), c3(p + 512, 2, 2, 8), cl2(p + 2056, 2, 2), v3(p + 1, 2, 2, 8),
             l2(p + 2064, 2, 2))
          .find("v_out overlaps v_a") != std::string::npos);
  // lse_out inside v_b.
  CHECK(call(c3(p, 2, 2, 8), cl2(p + 2048, 2, 2), c3(p + 512, 2, 2, 8), cl2(p + 2056, 2, 2), v3(p + 1024, 2, 2, 8),
             l2(p + 520, 2, 2))
          .find("lse_out overlaps v_b") != std::string::npos);
  // Exact aliasing is fine: it validates (and would launch, so not called here without a GPU).
  auto strided = pqkv::make_strided_view<float const, 3>(p, {2, 2, 8}, {32, 16, 2});
  CHECK(call(strided, cl2(p + 2048, 2, 2), c3(p + 512, 2, 2, 8), cl2(p + 2056, 2, 2), v3(p + 1024, 2, 2, 8),
             l2(p + 2064, 2, 2))
          .find("v_a.stride(2)=2 must be 1") != std::string::npos);

  auto states = [&](auto v, auto l, auto vo, auto lo) {
    return error_message([&] { pqkv::gpu::merge_states<float>(v, l, vo, lo, nullptr); });
  };
  auto c4 = [&](float* q, index_t r, index_t s, index_t h, index_t d) {
    return pqkv::make_view(static_cast<float const*>(q), r, s, h, d);
  };
  auto cl3 = [&](float* q, index_t r, index_t s, index_t h) {
    return pqkv::make_view(static_cast<float const*>(q), r, s, h);
  };
  CHECK(states(c4(p, 2, 3, 2, 8), cl3(p + 2048, 2, 2, 2), v3(p + 1024, 2, 2, 8), l2(p + 2100, 2, 2))
          .find("lse extents") != std::string::npos);
  CHECK(states(c4(p, 2, 3, 2, 8), cl3(p + 2048, 2, 3, 2), v3(p + 1024, 2, 2, 4), l2(p + 2100, 2, 2))
          .find("v_out extents") != std::string::npos);
  CHECK(states(c4(p, 2, 3, 2, 8), cl3(p + 2048, 2, 3, 2), v3(p + 1024, 2, 2, 8), l2(p + 2100, 3, 2))
          .find("lse_out extents") != std::string::npos);
  CHECK(states(c4(p, 2, 3, 2, 8), cl3(p + 2048, 2, 3, 2), v3(p + 40, 2, 2, 8), l2(p + 2100, 2, 2))
          .find("v_out overlaps v") != std::string::npos);
  CHECK(states(c4(p, 2, 3, 2, 8), cl3(p + 2048, 2, 3, 2), v3(p + 1024, 2, 2, 8), l2(nullptr, 2, 2))
          .find("lse_out.data_handle() is null") != std::string::npos);
}
