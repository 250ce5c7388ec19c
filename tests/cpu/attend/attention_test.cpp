// SPDX-License-Identifier: Apache-2.0
#include <pqkv/attend/dense.hpp>
#include <pqkv/attend/metrics.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/random.hpp>

#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace {

using pqkv::test::noise;

using pqkv::index_t;

template <class T, std::size_t R>
void fill(pqkv::host_tensor<T, R>& t, std::uint64_t seed, float gain = 1.f)
{
  for (std::size_t i = 0; i < t.size(); ++i) { t.data()[i] = gain * noise(seed, i); }
}

/// Attention of q head h over the listed tokens of KV head g, in plain double.
std::vector<double> naive_attention(pqkv::host_tensor<float, 2> const& q, pqkv::host_tensor<float, 3> const& k,
                                    pqkv::host_tensor<float, 3> const& v, index_t h, index_t g,
                                    std::vector<index_t> const& tokens, double scale, double* lse)
{
  index_t const dim = k.extent(2), dv = v.extent(2);
  std::vector<double> logit;
  double mx = -1e300;
  for (index_t t : tokens) {
    double dot = 0;
    for (index_t d = 0; d < dim; ++d) { dot += static_cast<double>(q.view()(h, d)) * k.view()(g, t, d); }
    logit.push_back(scale * dot);
    mx = std::max(mx, scale * dot);
  }
  double z = 0;
  std::vector<double> out(static_cast<std::size_t>(dv), 0.0);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    double const w = std::exp(logit[i] - mx);
    z += w;
    for (index_t d = 0; d < dv; ++d) { out[static_cast<std::size_t>(d)] += w * v.view()(g, tokens[i], d); }
  }
  for (auto& o : out) { o /= z; }
  *lse = mx + std::log(z);
  return out;
}

}  // namespace

TEST_CASE("attention_dense: matches a double-precision oracle, with GQA mapping and lse")
{
  index_t const kv_heads = 2, r = 3, dim = 16, dv = 8, n = 37;
  pqkv::host_tensor<float, 2> q(kv_heads * r, dim), out(kv_heads * r, dv);
  pqkv::host_tensor<float, 3> k(kv_heads, n, dim), v(kv_heads, n, dv);
  fill(q, 1, 2.f);
  fill(k, 2);
  fill(v, 3);
  std::vector<float> lse(kv_heads * r);
  pqkv::cpu::attention_dense(q.const_view(), k.const_view(), v.const_view(), out.view(), 0.f, lse);
  std::vector<index_t> all(n);
  for (index_t t = 0; t < n; ++t) { all[static_cast<std::size_t>(t)] = t; }
  for (index_t h = 0; h < kv_heads * r; ++h) {
    double want_lse = 0;
    auto const want = naive_attention(q, k, v, h, h / r, all, 0.25, &want_lse);
    for (index_t d = 0; d < dv; ++d) {
      CHECK(out.view()(h, d) == doctest::Approx(want[static_cast<std::size_t>(d)]).epsilon(1e-5).scale(1e-3));
    }
    CHECK(lse[static_cast<std::size_t>(h)] == doctest::Approx(want_lse).epsilon(1e-6));
  }
}

TEST_CASE("attention_sparse: all tokens selected equals attention_dense bit for bit")
{
  index_t const kv_heads = 2, r = 2, dim = 8, n = 20;
  pqkv::host_tensor<float, 2> q(kv_heads * r, dim), dense(kv_heads * r, dim), sparse(kv_heads * r, dim);
  pqkv::host_tensor<float, 3> k(kv_heads, n, dim), v(kv_heads, n, dim);
  fill(q, 4);
  fill(k, 5);
  fill(v, 6);
  std::vector<float> lse_d(4), lse_s(4);
  pqkv::cpu::attention_dense(q.const_view(), k.const_view(), v.const_view(), dense.view(), 0.3f, lse_d);
  // Tokens 2..17 selected (shuffled, with duplicates and padding), 0..1 sink, 18..19 window.
  pqkv::host_tensor<std::int32_t, 2> sel(kv_heads, 24);
  for (index_t g = 0; g < kv_heads; ++g) {
    for (index_t i = 0; i < 24; ++i) {
      sel.view()(g, i) = i < 16 ? static_cast<std::int32_t>(17 - i) : (i < 20 ? 9 : -1);
    }
  }
  pqkv::cpu::attention_sparse(q.const_view(), k.const_view(), v.const_view(), sel.const_view(), 2, 2, sparse.view(),
                              0.3f, lse_s);
  CHECK(sparse.storage() == dense.storage());
  CHECK(lse_s == lse_d);
}

TEST_CASE("attention_sparse: attends sink + window + selection once each, per KV head")
{
  index_t const kv_heads = 2, r = 2, dim = 8, dv = 4, n = 30;
  pqkv::host_tensor<float, 2> q(kv_heads * r, dim), out(kv_heads * r, dv), dup_out(kv_heads * r, dv);
  pqkv::host_tensor<float, 3> k(kv_heads, n, dim), v(kv_heads, n, dv);
  fill(q, 7);
  fill(k, 8);
  fill(v, 9);
  pqkv::host_tensor<std::int32_t, 2> sel(kv_heads, 4), dup(kv_heads, 6);
  std::int32_t const rows[2][4] = {{5, 11, -1, -1}, {1, 12, 20, 27}};    // 1 is a sink, 27 in the window
  std::int32_t const dups[2][6] = {{11, -1, 5, 5, 11, 0}, {27, 12, 20, 20, 1, -1}};
  for (index_t g = 0; g < 2; ++g) {
    for (index_t i = 0; i < 4; ++i) { sel.view()(g, i) = rows[g][i]; }
    for (index_t i = 0; i < 6; ++i) { dup.view()(g, i) = dups[g][i]; }
  }
  std::vector<float> lse(4);
  pqkv::cpu::attention_sparse(q.const_view(), k.const_view(), v.const_view(), sel.const_view(), 2, 3, out.view(),
                              0.f, lse);
  std::vector<std::vector<index_t>> const sets{{0, 1, 5, 11, 27, 28, 29}, {0, 1, 12, 20, 27, 28, 29}};
  double const scale = 1.0 / std::sqrt(8.0);
  for (index_t h = 0; h < 4; ++h) {
    double want_lse = 0;
    auto const want = naive_attention(q, k, v, h, h / r, sets[static_cast<std::size_t>(h / r)], scale, &want_lse);
    for (index_t d = 0; d < dv; ++d) {
      CHECK(out.view()(h, d) == doctest::Approx(want[static_cast<std::size_t>(d)]).epsilon(1e-5).scale(1e-3));
    }
    CHECK(lse[static_cast<std::size_t>(h)] == doctest::Approx(want_lse).epsilon(1e-6));
  }
  // Duplicates, padding in the middle and sink tokens in the selection change nothing.
  pqkv::cpu::attention_sparse(q.const_view(), k.const_view(), v.const_view(), dup.const_view(), 2, 3, dup_out.view());
  CHECK(dup_out.storage() == out.storage());
}

TEST_CASE("attention: half / bf16 inputs equal their float values; n = 0 gives zeros and lse -inf")
{
  index_t const dim = 8, n = 12;
  pqkv::host_tensor<float, 2> q(2, dim), a(2, dim), b(2, dim);
  pqkv::host_tensor<float, 3> k(1, n, dim), v(1, n, dim), kf(1, n, dim);
  pqkv::host_tensor<__half, 3> kh(1, n, dim);
  pqkv::host_tensor<__nv_bfloat16, 3> vb(1, n, dim);
  fill(q, 10);
  fill(k, 11);
  fill(v, 12);
  for (std::size_t i = 0; i < k.size(); ++i) {
    kh.data()[i] = pqkv::from_float<__half>(k.data()[i]);
    kf.data()[i] = pqkv::to_float(kh.data()[i]);
    vb.data()[i] = pqkv::from_float<__nv_bfloat16>(v.data()[i]);
    v.data()[i] = pqkv::to_float(vb.data()[i]);
  }
  pqkv::cpu::attention_dense(q.const_view(), kh.const_view(), vb.const_view(), a.view());
  pqkv::cpu::attention_dense(q.const_view(), kf.const_view(), v.const_view(), b.view());
  CHECK(a.storage() == b.storage());

  pqkv::host_tensor<float, 3> none(1, 0, dim);
  std::fill(a.storage().begin(), a.storage().end(), 5.f);
  std::vector<float> lse(2, 1.f);
  pqkv::cpu::attention_dense(q.const_view(), none.const_view(), none.const_view(), a.view(), 0.f, lse);
  CHECK(std::all_of(a.storage().begin(), a.storage().end(), [](float x) { return x == 0.f; }));
  CHECK(lse[0] == -std::numeric_limits<float>::infinity());
}

TEST_CASE("attention: each bad input throws naming it")
{
  using doctest::Contains;
  pqkv::host_tensor<float, 2> q(4, 8), out(4, 8);
  pqkv::host_tensor<float, 3> k(2, 10, 8), v(2, 10, 8);
  pqkv::host_tensor<std::int32_t, 2> sel(2, 3);
  std::fill(sel.storage().begin(), sel.storage().end(), -1);
  auto sparse = [&](index_t sink, index_t window) {
    pqkv::cpu::attention_sparse(q.const_view(), k.const_view(), v.const_view(), sel.const_view(), sink, window,
                                out.view());
  };
  sel.view()(1, 2) = 10;
  CHECK_THROWS_WITH_AS(sparse(0, 0), Contains("selection(1, 2)=10"), pqkv::error);
  sel.view()(1, 2) = -2;
  CHECK_THROWS_WITH_AS(sparse(0, 0), Contains("selection(1, 2)=-2"), pqkv::error);
  sel.view()(1, 2) = 3;
  CHECK_NOTHROW(sparse(0, 0));
  CHECK_THROWS_WITH_AS(sparse(-1, 0), Contains("sink=-1"), pqkv::error);
  CHECK_THROWS_WITH_AS(sparse(0, -4), Contains("window=-4"), pqkv::error);
  pqkv::host_tensor<std::int32_t, 2> one_row(1, 3);
  CHECK_THROWS_WITH_AS(pqkv::cpu::attention_sparse(q.const_view(), k.const_view(), v.const_view(),
                                                   one_row.const_view(), 0, 0, out.view()),
                       Contains("selection.extent(0)=1"), pqkv::error);

  pqkv::host_tensor<float, 2> q5(5, 8), q_dim(4, 4), out_small(4, 4);
  CHECK_THROWS_WITH_AS(pqkv::cpu::attention_dense(q5.const_view(), k.const_view(), v.const_view(), out.view()),
                       Contains("q.extent(0)=5"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::attention_dense(q_dim.const_view(), k.const_view(), v.const_view(), out.view()),
                       Contains("q.extent(1)=4"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::attention_dense(q.const_view(), k.const_view(), v.const_view(), out_small.view()),
                       Contains("out extents"), pqkv::error);
  pqkv::host_tensor<float, 3> v_short(2, 9, 8);
  CHECK_THROWS_WITH_AS(pqkv::cpu::attention_dense(q.const_view(), k.const_view(), v_short.const_view(), out.view()),
                       Contains("values extents"), pqkv::error);
  std::vector<float> lse(3);
  CHECK_THROWS_WITH_AS(
    pqkv::cpu::attention_dense(q.const_view(), k.const_view(), v.const_view(), out.view(), 0.f, lse),
    Contains("lse.size()=3"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::attention_dense(q.const_view(), k.const_view(), v.const_view(), out.view(), -1.f),
                       Contains("scale=-1"), pqkv::error);
  q.view()(2, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(pqkv::cpu::attention_dense(q.const_view(), k.const_view(), v.const_view(), out.view()),
                       Contains("q(2, 1)=nan"), pqkv::error);
  q.view()(2, 1) = 0.f;
  k.view()(0, 9, 7) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(pqkv::cpu::attention_dense(q.const_view(), k.const_view(), v.const_view(), out.view()),
                       Contains("keys(0, 9, 7)=inf"), pqkv::error);
  k.view()(0, 9, 7) = 0.f;
  v.view()(1, 0, 0) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(pqkv::cpu::attention_dense(q.const_view(), k.const_view(), v.const_view(), out.view()),
                       Contains("values(1, 0, 0)=nan"), pqkv::error);
}

TEST_CASE("metrics: recall_at_k on hand-made rows")
{
  pqkv::host_tensor<std::int32_t, 2> sel(3, 4), exact(3, 4);
  std::int32_t const s[3][4] = {{1, 2, 3, -1}, {7, 7, 8, 9}, {-1, -1, -1, -1}};
  std::int32_t const e[3][4] = {{2, 3, 4, 5}, {7, 9, -1, -1}, {-1, -1, -1, -1}};
  for (index_t g = 0; g < 3; ++g) {
    for (index_t i = 0; i < 4; ++i) {
      sel.view()(g, i) = s[g][i];
      exact.view()(g, i) = e[g][i];
    }
  }
  auto const r = pqkv::cpu::recall_at_k(sel.const_view(), exact.const_view());
  REQUIRE(r.per_head.size() == 3);
  CHECK(r.per_head[0] == 0.5);
  CHECK(r.per_head[1] == 1.0);  // duplicates count once
  CHECK(r.per_head[2] == 1.0);  // nothing to find
  CHECK(r.mean == doctest::Approx(2.5 / 3));
  pqkv::host_tensor<std::int32_t, 2> two_rows(2, 4);
  CHECK_THROWS_WITH_AS(pqkv::cpu::recall_at_k(two_rows.const_view(), exact.const_view()),
                       doctest::Contains("selection.extent(0)=2"), pqkv::error);
  sel.view()(0, 0) = -5;
  CHECK_THROWS_WITH_AS(pqkv::cpu::recall_at_k(sel.const_view(), exact.const_view()),
                       doctest::Contains("selection(0, 0)=-5"), pqkv::error);
}

TEST_CASE("metrics: attention_mass_kept on a hand-made softmax")
{
  // One KV head, two q heads, dim 1, scale 1: q0 = 1 gives weights 1, 2, 3, 1, 1
  // (Z = 8); q1 = 0 gives uniform weights (Z = 5).
  pqkv::host_tensor<float, 2> q(2, 1);
  q.view()(0, 0) = 1.f;
  pqkv::host_tensor<float, 3> k(1, 5, 1);
  float const keys[] = {0.f, std::log(2.f), std::log(3.f), 0.f, 0.f};
  std::copy(std::begin(keys), std::end(keys), k.data());
  pqkv::host_tensor<std::int32_t, 2> sel(1, 2);
  sel.view()(0, 0) = 2;
  sel.view()(0, 1) = -1;
  auto const a = pqkv::cpu::attention_mass_kept(q.const_view(), k.const_view(), sel.const_view(), 1, 0, 1.f);
  CHECK(a.per_head[0] == doctest::Approx(4.0 / 8));  // tokens 0, 2
  CHECK(a.per_head[1] == doctest::Approx(2.0 / 5));
  CHECK(a.mean == doctest::Approx((0.5 + 0.4) / 2));
  auto const b = pqkv::cpu::attention_mass_kept(q.const_view(), k.const_view(), sel.const_view(), 1, 2, 1.f);
  CHECK(b.per_head[0] == doctest::Approx(6.0 / 8));  // tokens 0, 2, 3, 4
  sel.view()(0, 1) = 2;  // a duplicate counts once
  auto const c = pqkv::cpu::attention_mass_kept(q.const_view(), k.const_view(), sel.const_view(), 5, 0, 1.f);
  CHECK(c.per_head[0] == doctest::Approx(1.0));
  CHECK(c.per_head[1] == doctest::Approx(1.0));
  sel.view()(0, 1) = 5;
  CHECK_THROWS_WITH_AS(pqkv::cpu::attention_mass_kept(q.const_view(), k.const_view(), sel.const_view(), 1, 0),
                       doctest::Contains("selection(0, 1)=5"), pqkv::error);
}

TEST_CASE("metrics: relative_output_error per head, mean and overall")
{
  pqkv::host_tensor<float, 2> out(3, 2), dense(3, 2);
  float const o[] = {1, 0, 0, 0, 3, 4};
  float const d[] = {1, 1, 0, 0, 3, 4};
  std::copy(std::begin(o), std::end(o), out.data());
  std::copy(std::begin(d), std::end(d), dense.data());
  auto const e = pqkv::cpu::relative_output_error(out.const_view(), dense.const_view());
  CHECK(e.per_head[0] == doctest::Approx(1 / std::sqrt(2.0)));
  CHECK(e.per_head[1] == 0.0);  // 0 / 0
  CHECK(e.per_head[2] == 0.0);
  CHECK(e.mean == doctest::Approx(1 / std::sqrt(2.0) / 3));
  CHECK(e.overall == doctest::Approx(1 / std::sqrt(27.0)));
  out.view()(1, 0) = 1.f;
  CHECK(std::isinf(pqkv::cpu::relative_output_error(out.const_view(), dense.const_view()).per_head[1]));
  pqkv::host_tensor<float, 2> wide(3, 3);
  CHECK_THROWS_WITH_AS(pqkv::cpu::relative_output_error(wide.const_view(), dense.const_view()),
                       doctest::Contains("out extents (3, 3)"), pqkv::error);
  out.view()(2, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(pqkv::cpu::relative_output_error(out.const_view(), dense.const_view()),
                       doctest::Contains("out(2, 1)=nan"), pqkv::error);
}

TEST_CASE("docs/attend.md example")
{
  index_t const kv_heads = 2, q_heads = 4, dim = 16, n = 100;
  pqkv::host_tensor<float, 2> qt(q_heads, dim);
  pqkv::host_tensor<float, 3> kt(kv_heads, n, dim), vt(kv_heads, n, dim);
  fill(qt, 20, 2.f);
  fill(kt, 21);
  fill(vt, 22);
  pqkv::host_tensor<std::int32_t, 2> sel(kv_heads, 8);
  for (index_t g = 0; g < kv_heads; ++g) {
    for (index_t i = 0; i < 8; ++i) { sel.view()(g, i) = static_cast<std::int32_t>(10 + 3 * i + g); }
  }
  auto const q = qt.const_view();
  auto const keys = kt.const_view();
  auto const values = vt.const_view();
  auto const selection = sel.const_view();
  // example-begin (docs/attend.md)
  pqkv::host_tensor<float, 2> dense(q_heads, dim), sparse(q_heads, dim);
  pqkv::cpu::attention_dense(q, keys, values, dense.view());
  pqkv::cpu::attention_sparse(q, keys, values, selection, 4, 64, sparse.view());
  double const err = pqkv::cpu::relative_output_error(sparse.const_view(), dense.const_view()).overall;
  double const mass = pqkv::cpu::attention_mass_kept(q, keys, selection, 4, 64).mean;
  // example-end
  CHECK(mass > 0.7);  // 76 of 100 tokens attended
  CHECK(mass < 1.0);
  CHECK(err > 0.0);
  CHECK(err < 1.0);
}

TEST_CASE("attention_sparse: checks the rows it reads, not the whole cache")
{
  // 2 KV heads, 10 tokens, d = 4; sink 1, window 1, selection {4} and {6}.
  pqkv::host_tensor<float, 2> q(2, 4);
  pqkv::host_tensor<float, 3> k(2, 10, 4), v(2, 10, 4);
  for (auto& x : k.storage()) { x = 0.25f; }
  for (auto& x : v.storage()) { x = 1.f; }
  pqkv::host_tensor<std::int32_t, 2> sel(2, 1);
  sel.view()(0, 0) = 4;
  sel.view()(1, 0) = 6;
  pqkv::host_tensor<float, 2> out(2, 4);
  // A NaN in a row no call reads (head 0, token 5) is not this call's concern.
  k.view()(0, 5, 2) = std::numeric_limits<float>::quiet_NaN();
  v.view()(0, 5, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_NOTHROW(pqkv::cpu::attention_sparse(q.const_view(), k.const_view(), v.const_view(), sel.const_view(), 1, 1,
                                            out.view()));
  CHECK(out.view()(0, 0) == 1.f);
  // ... but one in a row it reads is.
  sel.view()(0, 0) = 5;
  CHECK_THROWS_WITH_AS(pqkv::cpu::attention_sparse(q.const_view(), k.const_view(), v.const_view(), sel.const_view(),
                                                   1, 1, out.view()),
                       doctest::Contains("keys(0, 5, 2)=nan"), pqkv::error);
  k.view()(0, 5, 2) = 0.f;
  CHECK_THROWS_WITH_AS(pqkv::cpu::attention_sparse(q.const_view(), k.const_view(), v.const_view(), sel.const_view(),
                                                   1, 1, out.view()),
                       doctest::Contains("values(0, 5, 1)=nan"), pqkv::error);
}
