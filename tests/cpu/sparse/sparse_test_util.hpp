// SPDX-License-Identifier: Apache-2.0
#pragma once
// Plain double-precision recomputations of the SALE mask and block-sparse
// attention, shared by the sparse CPU tests. Written from the contract, with
// none of the library's helpers, so a slip in either shows as a disagreement.

#include <pqkv/core/dtype.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/views.hpp>

#include "common/test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace pqkv::test {

/// Packed [heads, tokens, dim] values from noise(seed, .) times gain.
inline pqkv::host_tensor<float, 3> noise_tensor(index_t heads, index_t tokens, index_t dim, std::uint64_t seed,
                                                float gain = 1.f)
{
  pqkv::host_tensor<float, 3> t(heads, tokens, dim);
  for (std::size_t i = 0; i < t.size(); ++i) { t.data()[i] = gain * noise(seed, i); }
  return t;
}

/// Adds a per-head offset (the same for every token) so token means matter.
inline void add_bias(pqkv::host_tensor<float, 3>& t, std::uint64_t seed, float gain)
{
  for (index_t h = 0; h < t.extent(0); ++h) {
    for (index_t c = 0; c < t.extent(2); ++c) {
      float const b = gain * noise(seed, static_cast<std::uint64_t>(h * t.extent(2) + c));
      for (index_t i = 0; i < t.extent(1); ++i) { t.view()(h, i, c) += b; }
    }
  }
}

/// Q and K of a packed batch, with biases so the mean subtraction matters and
/// logits wide enough that the rule keeps some blocks and drops others.
struct batch_data {
  pqkv::host_tensor<float, 3> q, k, v;
  std::vector<std::int32_t> cu;
};

inline batch_data make_batch(index_t qh, index_t kvh, index_t dim, std::vector<std::int32_t> cu, std::uint64_t seed)
{
  index_t const tokens = cu.back();
  batch_data b{noise_tensor(qh, tokens, dim, seed, 4.f), noise_tensor(kvh, tokens, dim, seed + 1),
               noise_tensor(kvh, tokens, dim, seed + 2), std::move(cu)};
  add_bias(b.q, seed + 3, 0.5f);
  add_bias(b.k, seed + 4, 2.f);
  // An attention sink: every query and the first 4 keys of each sequence share
  // a direction worth about 10 logits, so most other blocks fall below tau.
  for (std::size_t s = 0; s + 1 < b.cu.size(); ++s) {
    for (index_t c = 0; c < dim; ++c) {
      float const u = noise(seed + 5, static_cast<std::uint64_t>(c));
      for (index_t h = 0; h < qh && s == 0; ++h) {
        for (index_t t = 0; t < tokens; ++t) { b.q.view()(h, t, c) += 1.5f * u; }
      }
      for (index_t g = 0; g < kvh; ++g) {
        for (index_t t = b.cu[s]; t < std::min<index_t>(b.cu[s] + 4, b.cu[s + 1]); ++t) { b.k.view()(g, t, c) += 2.5f * u; }
      }
    }
  }
  return b;
}

/// Naive centring and quantization of one head's rows [t0, t1) (the contract
/// of sparse/quantize.hpp), returning codes [rows][dim], scales per row and the mean.
struct naive_quantized {
  std::vector<std::vector<int>> codes;
  std::vector<float> scale;  // per row (its group's scale)
  std::vector<float> mean;
};

inline naive_quantized naive_quantize(pqkv::host_tensor<float, 3> const& x, index_t h, index_t t0, index_t t1,
                                      index_t group, int qmax)
{
  index_t const dim = x.extent(2);
  naive_quantized r;
  r.mean.assign(static_cast<std::size_t>(dim), 0.f);
  for (index_t c = 0; c < dim; ++c) {
    double s = 0;
    for (index_t t = t0; t < t1; ++t) { s += x.view()(h, t, c); }
    r.mean[static_cast<std::size_t>(c)] = t1 > t0 ? static_cast<float>(s / static_cast<double>(t1 - t0)) : 0.f;
  }
  for (index_t g0 = t0; g0 < t1; g0 += group) {
    index_t const g1 = std::min(g0 + group, t1);
    float amax = 0;
    for (index_t t = g0; t < g1; ++t) {
      for (index_t c = 0; c < dim; ++c) {
        amax = std::max(amax, std::abs(x.view()(h, t, c) - r.mean[static_cast<std::size_t>(c)]));
      }
    }
    float const inv = amax > 0 ? static_cast<float>(qmax) / amax : 0.f;
    for (index_t t = g0; t < g1; ++t) {
      std::vector<int> row;
      for (index_t c = 0; c < dim; ++c) {
        float const y = (x.view()(h, t, c) - r.mean[static_cast<std::size_t>(c)]) * inv;
        double const rounded = y >= 0 ? std::floor(static_cast<double>(y) + 0.5) : -std::floor(-static_cast<double>(y) + 0.5);
        row.push_back(static_cast<int>(std::clamp(rounded, -static_cast<double>(qmax), static_cast<double>(qmax))));
      }
      r.codes.push_back(row);
      r.scale.push_back(amax / static_cast<float>(qmax));
    }
  }
  return r;
}

/// Forced blocks (the sale_mask.hpp contract), restated.
inline bool naive_forced(index_t n, index_t qb, index_t kb, index_t bq, index_t bk, index_t sink, index_t local)
{
  index_t const q_end = std::min((qb + 1) * bq, n);
  if (qb * bq >= n || kb * bk >= q_end) { return false; }
  return kb * bk < sink || (kb + 1) * bk > q_end - local;
}

/// The SALE decision of every (seq, q head, q block, key block) recomputed in
/// double; margin = best log relative score - log(tau), +inf for forced,
/// NaN for non-causal.
struct naive_mask {
  index_t batch = 0, heads = 0, qblocks = 0, kblocks = 0;
  std::vector<double> margin;  // [batch][heads][qblocks][kblocks]
  double& at(index_t s, index_t h, index_t qb, index_t kb)
  {
    return margin[static_cast<std::size_t>(((s * heads + h) * qblocks + qb) * kblocks + kb)];
  }
};

inline naive_mask naive_sale(pqkv::host_tensor<float, 3> const& q, pqkv::host_tensor<float, 3> const& k,
                             std::vector<std::int32_t> const& cu, index_t bq, index_t bk, index_t sink, index_t local,
                             index_t group, int qmax, std::vector<float> const& tau)
{
  index_t const qh = q.extent(0), kvh = k.extent(0), dim = q.extent(2), r = qh / kvh;
  double const scale = 1.0 / std::sqrt(static_cast<double>(dim));
  naive_mask m;
  m.batch = static_cast<index_t>(cu.size()) - 1;
  m.heads = qh;
  index_t max_len = 0;
  for (std::size_t s = 1; s < cu.size(); ++s) { max_len = std::max<index_t>(max_len, cu[s] - cu[s - 1]); }
  m.qblocks = (max_len + bq - 1) / bq;
  m.kblocks = (max_len + bk - 1) / bk;
  m.margin.assign(static_cast<std::size_t>(m.batch * m.heads * m.qblocks * m.kblocks),
                  std::numeric_limits<double>::quiet_NaN());
  for (index_t s = 0; s < m.batch; ++s) {
    index_t const t0 = cu[static_cast<std::size_t>(s)], n = cu[static_cast<std::size_t>(s) + 1] - t0;
    for (index_t h = 0; h < qh; ++h) {
      index_t const g = h / r;
      auto const nq = naive_quantize(q, h, t0, t0 + n, group, qmax);
      auto const nk = naive_quantize(k, g, t0, t0 + n, group, qmax);
      auto exact = [&](index_t i, index_t j) {
        double d = 0;
        for (index_t c = 0; c < dim; ++c) { d += static_cast<double>(q.view()(h, t0 + i, c)) * k.view()(g, t0 + j, c); }
        return scale * d;
      };
      // q_mean . (k_j - k_mean) per key and q_i . k_mean per query.
      std::vector<double> corr(static_cast<std::size_t>(n), 0.0), row(static_cast<std::size_t>(n), 0.0);
      for (index_t t = 0; t < n; ++t) {
        for (index_t c = 0; c < dim; ++c) {
          auto const cc = static_cast<std::size_t>(c);
          corr[static_cast<std::size_t>(t)] +=
              static_cast<double>(nq.mean[cc]) * (static_cast<double>(k.view()(g, t0 + t, c)) - nk.mean[cc]);
          row[static_cast<std::size_t>(t)] += static_cast<double>(q.view()(h, t0 + t, c)) * nk.mean[cc];
        }
      }
      auto estimate = [&](index_t i, index_t j) {
        auto const& a = nq.codes[static_cast<std::size_t>(i)];
        auto const& b = nk.codes[static_cast<std::size_t>(j)];
        double dot = 0;
        for (std::size_t c = 0; c < a.size(); ++c) { dot += a[c] * b[c]; }
        return scale * (static_cast<double>(nq.scale[static_cast<std::size_t>(i)]) *
                            nk.scale[static_cast<std::size_t>(j)] * dot +
                        corr[static_cast<std::size_t>(j)] + row[static_cast<std::size_t>(i)]);
      };
      for (index_t qb = 0; qb * bq < n; ++qb) {
        index_t const q1 = std::min((qb + 1) * bq, n);
        std::vector<double> lse;
        for (index_t i = qb * bq; i < q1; ++i) {
          double mx = -1e300;
          std::vector<double> sv;
          for (index_t j = 0; j <= i; ++j) {
            if (naive_forced(n, qb, j / bk, bq, bk, sink, local)) { sv.push_back(exact(i, j)); mx = std::max(mx, sv.back()); }
          }
          double l = 0;
          for (double x : sv) { l += std::exp(x - mx); }
          lse.push_back(sv.empty() ? -std::numeric_limits<double>::infinity() : mx + std::log(l));
        }
        for (index_t kb = 0; kb * bk < q1; ++kb) {
          if (naive_forced(n, qb, kb, bq, bk, sink, local)) {
            m.at(s, h, qb, kb) = std::numeric_limits<double>::infinity();
            continue;
          }
          double best = -std::numeric_limits<double>::infinity();
          for (index_t i = qb * bq; i < q1; ++i) {
            for (index_t j = kb * bk; j < std::min((kb + 1) * bk, i + 1); ++j) {
              best = std::max(best, estimate(i, j) - lse[static_cast<std::size_t>(i - qb * bq)]);
            }
          }
          m.at(s, h, qb, kb) = best - std::log(static_cast<double>(tau[static_cast<std::size_t>(h)]));
        }
      }
    }
  }
  return m;
}

/// Causal attention of q head h, packed row t0 + i, over keys j <= i of the
/// sequence for which keep(j) holds, in double.
template <class Keep>
std::vector<double> naive_row_attention(pqkv::host_tensor<float, 3> const& q, pqkv::host_tensor<float, 3> const& k,
                                        pqkv::host_tensor<float, 3> const& v, index_t h, index_t t0, index_t i,
                                        Keep&& keep)
{
  index_t const dim = q.extent(2), dv = v.extent(2), g = h / (q.extent(0) / k.extent(0));
  double const scale = 1.0 / std::sqrt(static_cast<double>(dim));
  std::vector<double> logit;
  std::vector<index_t> keys;
  double mx = -1e300;
  for (index_t j = 0; j <= i; ++j) {
    if (!keep(j)) { continue; }
    double d = 0;
    for (index_t c = 0; c < dim; ++c) { d += static_cast<double>(q.view()(h, t0 + i, c)) * k.view()(g, t0 + j, c); }
    logit.push_back(scale * d);
    keys.push_back(j);
    mx = std::max(mx, scale * d);
  }
  std::vector<double> out(static_cast<std::size_t>(dv), 0.0);
  double z = 0;
  for (std::size_t a = 0; a < keys.size(); ++a) {
    double const w = std::exp(logit[a] - mx);
    z += w;
    for (index_t d = 0; d < dv; ++d) { out[static_cast<std::size_t>(d)] += w * v.view()(g, t0 + keys[a], d); }
  }
  for (auto& o : out) { o = keys.empty() ? 0.0 : o / z; }
  return out;
}

/// x converted to element type T (float: unchanged).
template <class T>
pqkv::host_tensor<T, 3> convert(pqkv::host_tensor<float, 3> const& x)
{
  pqkv::host_tensor<T, 3> y(x.extent(0), x.extent(1), x.extent(2));
  for (std::size_t i = 0; i < x.size(); ++i) { y.data()[i] = pqkv::dtype_traits<T>::from_float(x.data()[i]); }
  return y;
}

}  // namespace pqkv::test
