// SPDX-License-Identifier: Apache-2.0
#include "common/keygen.hpp"
#include "common/test_util.hpp"

#include <pqkv/core/error.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

namespace {

using pqkv::test::error_message;

using pqkv::index_t;
using pqkv::test::keygen_config;

/// A small config for fast tests (sanitizers included); the structure knobs keep their defaults.
keygen_config small_config(index_t tokens = 1024)
{
  keygen_config cfg;
  cfg.kv_heads = 2;
  cfg.q_per_kv = 4;
  cfg.tokens = tokens;
  return cfg;
}

bool same_bits(std::vector<float> const& a, std::vector<float> const& b)
{
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

/// Exact softmax(q . k / sqrt(dim)) of one query row over kv head h's keys.
std::vector<double> attention(pqkv::view<float const, 3> keys, index_t h, float const* q)
{
  index_t const n = keys.extent(1), d = keys.extent(2);
  std::vector<double> w(static_cast<std::size_t>(n));
  double mx = -1e300;
  float const* k = &keys(h, 0, 0);
  for (index_t t = 0; t < n; ++t, k += d) {
    float dot = 0;
    for (index_t c = 0; c < d; ++c) { dot += q[c] * k[c]; }
    w[static_cast<std::size_t>(t)] = dot / std::sqrt(static_cast<double>(d));
    mx = std::max(mx, w[static_cast<std::size_t>(t)]);
  }
  double z = 0;
  for (auto& x : w) { z += (x = std::exp(x - mx)); }
  for (auto& x : w) { x /= z; }
  return w;
}

/// Eigenvalues of the symmetric matrix a [n, n] (row-major), by cyclic Jacobi rotations.
std::vector<double> symmetric_eigenvalues(std::vector<double> m, index_t n)
{
  double* a = m.data();
  for (int sweep = 0; sweep < 50; ++sweep) {
    double off = 0, diag = 0;
    for (index_t i = 0; i < n; ++i) {
      diag += a[i * n + i] * a[i * n + i];
      for (index_t j = i + 1; j < n; ++j) { off += a[i * n + j] * a[i * n + j]; }
    }
    if (off <= 1e-22 * diag) { break; }
    for (index_t p = 0; p < n; ++p) {
      for (index_t q = p + 1; q < n; ++q) {
        double const apq = a[p * n + q];
        if (std::abs(apq) < 1e-300) { continue; }
        double const theta = (a[q * n + q] - a[p * n + p]) / (2 * apq);
        double const t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        double const c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (index_t k = 0; k < n; ++k) {  // columns p, q
          double const kp = a[k * n + p], kq = a[k * n + q];
          a[k * n + p] = c * kp - s * kq;
          a[k * n + q] = s * kp + c * kq;
        }
        double* rp = a + p * n;
        double* rq = a + q * n;
        for (index_t k = 0; k < n; ++k) {  // rows p, q
          double const pk = rp[k], qk = rq[k];
          rp[k] = c * pk - s * qk;
          rq[k] = s * pk + c * qk;
        }
      }
    }
  }
  std::vector<double> ev(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) { ev[static_cast<std::size_t>(i)] = a[i * n + i]; }
  std::sort(ev.begin(), ev.end(), std::greater<>());
  return ev;
}

/// Fraction of the variance of rows [rows, dim] held by the top `k` principal components.
double top_pc_fraction(std::vector<float> const& rows, index_t dim, index_t k)
{
  auto const n = static_cast<index_t>(rows.size()) / dim;
  std::vector<double> mean(static_cast<std::size_t>(dim), 0.0), cov(static_cast<std::size_t>(dim * dim), 0.0);
  float const* r = rows.data();
  for (index_t i = 0; i < n; ++i) {
    for (index_t c = 0; c < dim; ++c) { mean[static_cast<std::size_t>(c)] += r[i * dim + c]; }
  }
  for (auto& m : mean) { m /= static_cast<double>(n); }
  std::vector<double> x(static_cast<std::size_t>(dim));
  double* cv = cov.data();
  for (index_t i = 0; i < n; ++i) {
    for (index_t c = 0; c < dim; ++c) { x[static_cast<std::size_t>(c)] = r[i * dim + c] - mean[static_cast<std::size_t>(c)]; }
    double const* xs = x.data();
    for (index_t a = 0; a < dim; ++a) {
      for (index_t b = a; b < dim; ++b) { cv[a * dim + b] += xs[a] * xs[b]; }
    }
  }
  for (index_t a = 0; a < dim; ++a) {
    for (index_t b = 0; b < a; ++b) { cv[a * dim + b] = cv[b * dim + a]; }
  }
  auto const ev = symmetric_eigenvalues(std::move(cov), dim);
  return std::accumulate(ev.begin(), ev.begin() + k, 0.0) / std::accumulate(ev.begin(), ev.end(), 0.0);
}

}  // namespace

TEST_CASE("keygen: the same seed gives the same bits, another seed other data")
{
  auto cfg = small_config(300);
  pqkv::host_tensor<float, 3> a(cfg.kv_heads, cfg.tokens, cfg.dim), b(cfg.kv_heads, cfg.tokens, cfg.dim);
  pqkv::test::make_keys(cfg, 0, a.view());
  pqkv::test::make_keys(cfg, 0, b.view());
  CHECK(same_bits(a.storage(), b.storage()));
  pqkv::host_tensor<float, 2> qa(cfg.q_heads(), cfg.dim), qb(cfg.q_heads(), cfg.dim);
  pqkv::test::make_queries(cfg, 3, cfg.tokens, qa.view());
  pqkv::test::make_queries(cfg, 3, cfg.tokens, qb.view());
  CHECK(same_bits(qa.storage(), qb.storage()));

  auto other = cfg;
  other.seed = 2;
  pqkv::test::make_keys(other, 0, b.view());
  index_t differ = 0;
  for (std::size_t i = 0; i < a.size(); ++i) { differ += a.storage()[i] != b.storage()[i]; }
  CHECK(differ > static_cast<index_t>(a.size()) * 9 / 10);
  pqkv::test::make_queries(other, 3, cfg.tokens, qb.view());
  CHECK_FALSE(same_bits(qa.storage(), qb.storage()));
  CHECK(pqkv::test::needle_positions(cfg, 0) != pqkv::test::needle_positions(other, 0));
  // Every value is finite.
  CHECK(std::all_of(a.storage().begin(), a.storage().end(), [](float x) { return std::isfinite(x); }));
}

TEST_CASE("keygen: a range made in pieces equals the range made at once")
{
  auto const cfg = small_config(400);
  index_t const n = cfg.tokens, split = 157, d = cfg.dim;
  for (bool keys : {true, false}) {
    auto fill = [&](index_t first, pqkv::view<float, 3> out) {
      keys ? pqkv::test::make_keys(cfg, first, out) : pqkv::test::make_values(cfg, first, out);
    };
    pqkv::host_tensor<float, 3> whole(cfg.kv_heads, n, d), lo(cfg.kv_heads, split, d), hi(cfg.kv_heads, n - split, d);
    fill(0, whole.view());
    fill(0, lo.view());
    fill(split, hi.view());
    bool equal = true;
    for (index_t h = 0; h < cfg.kv_heads; ++h) {
      equal = equal && std::memcmp(&whole.view()(h, 0, 0), &lo.view()(h, 0, 0), sizeof(float) * split * d) == 0;
      equal = equal &&
              std::memcmp(&whole.view()(h, split, 0), &hi.view()(h, 0, 0), sizeof(float) * (n - split) * d) == 0;
    }
    CHECK_MESSAGE(equal, (keys ? "keys" : "values"));
    // One token at a time, as a decode loop appends them, past the prefill too.
    pqkv::host_tensor<float, 3> one(cfg.kv_heads, 1, d), ext(cfg.kv_heads, n + 5, d);
    fill(0, ext.view());
    for (index_t p : {index_t{0}, index_t{5}, n - 1, n + 4}) {
      fill(p, one.view());
      for (index_t h = 0; h < cfg.kv_heads; ++h) {
        CHECK(std::memcmp(&one.view()(h, 0, 0), &ext.view()(h, p, 0), sizeof(float) * d) == 0);
      }
    }
  }
  auto const kv = pqkv::test::make_kv(cfg);
  pqkv::host_tensor<float, 3> k(cfg.kv_heads, n, d);
  pqkv::cpu::set_num_threads(1);  // any thread count gives the same bits
  pqkv::test::make_keys(cfg, 0, k.view());
  pqkv::cpu::set_num_threads(0);
  CHECK(same_bits(kv.keys.storage(), k.storage()));
  CHECK(kv.values.extent(0) == cfg.kv_heads);
  CHECK(kv.values.extent(1) == n);
  CHECK(kv.values.extent(2) == d);
}

TEST_CASE("keygen: bad arguments throw pqkv::error naming them")
{
  auto cfg = small_config(64);
  pqkv::host_tensor<float, 3> k(cfg.kv_heads, 8, cfg.dim);
  pqkv::host_tensor<float, 3> wrong_heads(cfg.kv_heads + 1, 8, cfg.dim), wrong_dim(cfg.kv_heads, 8, cfg.dim - 2);
  auto msg = [](auto&& fn) { return error_message(fn); };
  CHECK(msg([&] { pqkv::test::make_keys(cfg, 0, wrong_heads.view()); }).find("out.extent(0)=3") !=
        std::string::npos);
  CHECK(msg([&] { pqkv::test::make_values(cfg, 0, wrong_dim.view()); }).find("out.extent(2)=126") !=
        std::string::npos);
  CHECK(msg([&] { pqkv::test::make_keys(cfg, -1, k.view()); }).find("first=-1") != std::string::npos);
  CHECK(msg([&] { pqkv::test::make_keys(cfg, 0, pqkv::view<float, 3>{nullptr, 2, 8, 128}); }).find("null") !=
        std::string::npos);
  CHECK_NOTHROW(pqkv::test::make_keys(cfg, 0, pqkv::view<float, 3>{nullptr, 2, 0, 128}));  // empty range

  pqkv::host_tensor<float, 2> q(cfg.q_heads(), cfg.dim), q_bad(cfg.kv_heads, cfg.dim);
  CHECK(msg([&] { pqkv::test::make_queries(cfg, 0, 64, q_bad.view()); }).find("config.q_heads()=8") !=
        std::string::npos);
  CHECK(msg([&] { pqkv::test::make_queries(cfg, -2, 64, q.view()); }).find("step=-2") != std::string::npos);
  CHECK(msg([&] { pqkv::test::make_queries(cfg, 0, -1, q.view()); }).find("position=-1") != std::string::npos);
  CHECK(msg([&] { (void)pqkv::test::needle_positions(cfg, 2); }).find("h=2") != std::string::npos);
  CHECK(msg([&] { (void)pqkv::test::make_kv(keygen_config{.dim = 127}); }).find("dim=127") != std::string::npos);

  auto bad = cfg;
  bad.rank = 0;
  CHECK(msg([&] { pqkv::test::make_keys(bad, 0, k.view()); }).find("rank=0") != std::string::npos);
  bad = cfg;
  bad.noise = std::nan("");
  CHECK(msg([&] { pqkv::test::make_keys(bad, 0, k.view()); }).find("noise=nan must be finite") != std::string::npos);
  bad = cfg;
  bad.rope_base = 1.0;
  CHECK(msg([&] { bad.validate("make_keys"); }).find("pqkv::error: make_keys: rope_base=1") == 0);
  bad = cfg;
  bad.needle_logit_min = 30;
  CHECK(msg([&] { bad.validate(); }).find("needle_logit_min=30") != std::string::npos);
}

TEST_CASE("keygen: RoPE makes q . k depend on the relative position only")
{
  auto const cfg = small_config();
  std::vector<float> a(static_cast<std::size_t>(cfg.dim)), b(a.size());
  for (std::size_t c = 0; c < a.size(); ++c) {
    a[c] = std::sin(0.7f * static_cast<float>(c) + 0.3f);
    b[c] = std::cos(1.3f * static_cast<float>(c) * static_cast<float>(c) + 0.1f);
  }
  auto rotated_dot = [&](index_t pa, index_t pb) {
    auto ra = a, rb = b;
    pqkv::test::apply_rope(cfg, pa, ra);
    pqkv::test::apply_rope(cfg, pb, rb);
    return std::inner_product(ra.begin(), ra.end(), rb.begin(), 0.0);
  };
  double const ref = rotated_dot(1000, 200);  // offset 800
  for (index_t shift : {index_t{1}, index_t{37}, index_t{5000}, index_t{60000}}) {
    CHECK(rotated_dot(1000 + shift, 200 + shift) == doctest::Approx(ref).epsilon(2e-4));
  }
  CHECK(std::abs(rotated_dot(1000, 900) - ref) > 1e-2);  // another offset gives another value

  // A negative position undoes the rotation.
  auto r = a;
  pqkv::test::apply_rope(cfg, 12345, r);
  pqkv::test::apply_rope(cfg, -12345, r);
  for (std::size_t c = 0; c < a.size(); ++c) { CHECK(r[c] == doctest::Approx(a[c]).epsilon(1e-4)); }
  // Rotate-half: channel c pairs with c + dim/2; the lowest-frequency pair barely turns.
  std::vector<float> e(a.size(), 0.f);
  e[static_cast<std::size_t>(cfg.dim / 2 - 1)] = 1.f;
  pqkv::test::apply_rope(cfg, 100, e);
  CHECK(e[static_cast<std::size_t>(cfg.dim / 2 - 1)] > 0.999f);
  e.assign(a.size(), 0.f);
  e[0] = 1.f;
  pqkv::test::apply_rope(cfg, 1, e);
  CHECK(e[0] == doctest::Approx(std::cos(1.0)).epsilon(1e-5));
  CHECK(e[static_cast<std::size_t>(cfg.dim / 2)] == doctest::Approx(std::sin(1.0)).epsilon(1e-5));
}

TEST_CASE("keygen: un-rotated keys live in a low-rank subspace; RoPE'd keys do not")
{
  auto cfg = small_config(1024);
  cfg.kv_heads = 1;
  pqkv::host_tensor<float, 3> k(cfg.kv_heads, cfg.tokens, cfg.dim);
  pqkv::test::make_keys(cfg, 0, k.view());
  auto const outliers = pqkv::test::outlier_channels(cfg, 0);
  index_t const half = cfg.dim / 2;
  std::vector<float> rotated, unrotated;
  for (index_t t = cfg.sinks; t < cfg.tokens; ++t) {
    std::vector<float> row(&k.view()(0, t, 0), &k.view()(0, t, 0) + cfg.dim);
    auto plain = row;
    pqkv::test::apply_rope(cfg, -t, plain);
    // The outlier pairs vary on their own; compare the rest.
    for (index_t c : outliers) {
      for (index_t pc : {c % half, c % half + half}) {
        row[static_cast<std::size_t>(pc)] = 0.f;
        plain[static_cast<std::size_t>(pc)] = 0.f;
      }
    }
    rotated.insert(rotated.end(), row.begin(), row.end());
    unrotated.insert(unrotated.end(), plain.begin(), plain.end());
  }
  double const un = top_pc_fraction(unrotated, cfg.dim, cfg.rank);
  double const rot = top_pc_fraction(rotated, cfg.dim, cfg.rank);
  MESSAGE("variance in the top ", cfg.rank, " components: un-rotated ", un, ", RoPE'd ", rot);
  CHECK(un > 0.6);
  CHECK(un > rot + 0.1);
}

TEST_CASE("keygen: outlier channels vary far more than the median channel")
{
  auto cfg = small_config(1024);
  pqkv::host_tensor<float, 3> keys(cfg.kv_heads, cfg.tokens, cfg.dim);
  pqkv::test::make_keys(cfg, 0, keys.view());
  for (index_t h = 0; h < cfg.kv_heads; ++h) {
    std::vector<double> s1(static_cast<std::size_t>(cfg.dim)), s2(s1.size()), var(s1.size());
    float const* k = &keys.view()(h, 0, 0);
    for (index_t t = 0; t < cfg.tokens; ++t, k += cfg.dim) {
      for (index_t c = 0; c < cfg.dim; ++c) {
        s1[static_cast<std::size_t>(c)] += k[c];
        s2[static_cast<std::size_t>(c)] += double{k[c]} * k[c];
      }
    }
    auto const n = static_cast<double>(cfg.tokens);
    for (std::size_t c = 0; c < var.size(); ++c) { var[c] = s2[c] / n - (s1[c] / n) * (s1[c] / n); }
    auto sorted = var;
    std::sort(sorted.begin(), sorted.end());
    double const median = sorted[sorted.size() / 2];
    auto const outliers = pqkv::test::outlier_channels(cfg, h);
    REQUIRE(static_cast<index_t>(outliers.size()) == cfg.outlier_channels);
    for (index_t c : outliers) {
      INFO("head ", h, " channel ", c, " variance ", var[static_cast<std::size_t>(c)], " median ", median);
      CHECK(var[static_cast<std::size_t>(c)] > 4 * median);
    }
  }
}

TEST_CASE("keygen: needles are spread, sorted, and carry their own values")
{
  auto const cfg = small_config(4096);
  for (index_t h = 0; h < cfg.kv_heads; ++h) {
    auto const pos = pqkv::test::needle_positions(cfg, h);
    REQUIRE(static_cast<index_t>(pos.size()) == cfg.needles);
    CHECK(std::is_sorted(pos.begin(), pos.end()));
    CHECK(std::adjacent_find(pos.begin(), pos.end()) == pos.end());
    CHECK(pos.front() >= cfg.sinks);
    CHECK(pos.back() < cfg.tokens);
    CHECK(pos.front() < cfg.tokens / 4);  // spread over the whole context
    CHECK(pos.back() >= cfg.tokens * 3 / 4);
  }
  auto tiny = small_config(10);
  CHECK(pqkv::test::needle_positions(tiny, 0).size() == 6);  // tokens - sinks
  tiny.tokens = 3;
  CHECK(pqkv::test::needle_positions(tiny, 0).empty());
}

TEST_CASE("keygen: queries of a group are correlated, other groups much less")
{
  auto const cfg = small_config(512);
  pqkv::host_tensor<float, 2> q(cfg.q_heads(), cfg.dim);
  double same = 0, other = 0;
  int ns = 0, no = 0;
  for (index_t step = 0; step < 16; ++step) {
    pqkv::test::make_queries(cfg, step, cfg.tokens + step, q.view());
    auto cosine = [&](index_t a, index_t b) {
      double ab = 0, aa = 0, bb = 0;
      for (index_t c = 0; c < cfg.dim; ++c) {
        ab += double{q.view()(a, c)} * q.view()(b, c);
        aa += double{q.view()(a, c)} * q.view()(a, c);
        bb += double{q.view()(b, c)} * q.view()(b, c);
      }
      return ab / std::sqrt(aa * bb);
    };
    for (index_t a = 0; a < cfg.q_heads(); ++a) {
      for (index_t b = a + 1; b < cfg.q_heads(); ++b) {
        if (a / cfg.q_per_kv == b / cfg.q_per_kv) {
          same += cosine(a, b), ++ns;
        } else {
          other += std::abs(cosine(a, b)), ++no;
        }
      }
    }
  }
  MESSAGE("mean cosine within a group ", same / ns, ", |cosine| across groups ", other / no);
  CHECK(same / ns > 0.5);
  CHECK(same / ns > 2 * other / no);
}

TEST_CASE("keygen: exact attention finds needles, leans on sinks, and is peaked but not one-hot")
{
  auto const cfg = small_config(4096);
  index_t const n = cfg.tokens;
  auto const kv = pqkv::test::make_kv(cfg);
  pqkv::host_tensor<float, 2> q(cfg.q_heads(), cfg.dim);
  index_t const top1pct = n / 100, topk = n / 16;  // k / n of 2048 / 32768
  int targeted = 0, found = 0, heavier = 0, rows = 0;
  double sink_mass = 0, topk_mass = 0, max_weight = 0;
  for (index_t step = 0; step < 16; ++step) {
    index_t const position = n + step;
    pqkv::test::make_queries(cfg, step, position, q.view());
    for (index_t qh = 0; qh < cfg.q_heads(); ++qh) {
      index_t const h = qh / cfg.q_per_kv;
      auto const w = attention(kv.keys.const_view(), h, &q.view()(qh, 0));
      ++rows;
      for (index_t t = 0; t < cfg.sinks; ++t) { sink_mass += w[static_cast<std::size_t>(t)]; }
      auto sorted = w;
      std::sort(sorted.begin(), sorted.end(), std::greater<>());
      topk_mass += std::accumulate(sorted.begin(), sorted.begin() + topk, 0.0);
      max_weight += sorted.front();
      index_t const target = pqkv::test::query_target(cfg, step, position, h);
      if (target < 0) { continue; }
      ++targeted;
      double const wt = w[static_cast<std::size_t>(target)];
      found += wt >= sorted[static_cast<std::size_t>(top1pct - 1)];
      heavier += wt > 100 * sorted[static_cast<std::size_t>(n / 2)];  // vs the median token
    }
  }
  MESSAGE("targeted rows ", targeted, ": needle in the exact top-", top1pct, " for ", found, ", sink mass ",
          sink_mass / rows, ", top-", topk, " mass ", topk_mass / rows, ", mean max weight ", max_weight / rows);
  REQUIRE(targeted >= 20);
  CHECK(found >= targeted * 6 / 10);       // most targeted needles are in the exact top 1%...
  CHECK(found < targeted);                 // ...but not all: weak needles exist
  CHECK(heavier >= targeted * 8 / 10);
  CHECK(sink_mass / rows > 0.15);           // sinks take a large share
  CHECK(topk_mass / rows > 0.8);            // peaked...
  CHECK(topk_mass / rows < 0.995);
  CHECK(max_weight / rows < 0.6);           // ...but not one-hot
}

TEST_CASE("keygen: attention statistics at 32K tokens (slow; run with --no-skip)" * doctest::skip())
{
  keygen_config cfg;  // the defaults: 8 KV heads, GQA 4, d = 128, 32K tokens
  auto const kv = pqkv::test::make_kv(cfg);
  pqkv::host_tensor<float, 2> q(cfg.q_heads(), cfg.dim);
  double mass = 0, sinks = 0;
  int rows = 0, targeted = 0, found = 0;
  for (index_t step = 0; step < 8; ++step) {
    index_t const position = cfg.tokens + step;
    pqkv::test::make_queries(cfg, step, position, q.view());
    for (index_t qh = 0; qh < cfg.q_heads(); ++qh) {
      index_t const h = qh / cfg.q_per_kv;
      auto w = attention(kv.keys.const_view(), h, &q.view()(qh, 0));
      for (index_t t = 0; t < cfg.sinks; ++t) { sinks += w[static_cast<std::size_t>(t)]; }
      index_t const target = pqkv::test::query_target(cfg, step, position, h);
      double const wt = target >= 0 ? w[static_cast<std::size_t>(target)] : 0.0;
      std::sort(w.begin(), w.end(), std::greater<>());
      mass += std::accumulate(w.begin(), w.begin() + 2048, 0.0);
      if (target >= 0) {
        ++targeted;
        found += wt >= w[static_cast<std::size_t>(cfg.tokens / 100 - 1)];
      }
      ++rows;
    }
  }
  MESSAGE("32K: top-2048 mass ", mass / rows, ", sink mass ", sinks / rows, ", needles in the top 1%: ", found,
          " of ", targeted);
  CHECK(mass / rows > 0.8);
  CHECK(mass / rows < 0.97);
}

TEST_CASE("keygen: its normal draws have zero mean, unit variance and normal tails")
{
  std::vector<float> g(1 << 16);
  pqkv::test::detail::gauss_fill(pqkv::test::detail::stream_key(5, pqkv::test::detail::kg_stream::noise, 0), 0,
                                 static_cast<index_t>(g.size()), g.data());
  double s1 = 0, s2 = 0, s4 = 0;
  index_t beyond2 = 0;
  for (float x : g) {
    s1 += x;
    s2 += double{x} * x;
    s4 += double{x} * x * x * x;
    beyond2 += std::abs(x) > 2.f;
  }
  auto const n = static_cast<double>(g.size());
  CHECK(std::abs(s1 / n) < 0.02);
  CHECK(s2 / n == doctest::Approx(1.0).epsilon(0.03));
  CHECK(s4 / n == doctest::Approx(3.0).epsilon(0.1));                          // normal kurtosis
  CHECK(static_cast<double>(beyond2) / n == doctest::Approx(0.0455).epsilon(0.15));  // P(|z| > 2)
}
