// SPDX-License-Identifier: Apache-2.0
#include <pqkv/attend/code_attention.hpp>
#include <pqkv/attend/dense.hpp>
#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/decode/residual_reconstruct.hpp>
#include <pqkv/encode/residual.hpp>

#include "common/residual_util.hpp"
#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::error_message;
using pqkv::test::noise;

template <class T, std::size_t R>
void fill(pqkv::host_tensor<T, R>& t, std::uint64_t seed, float gain = 1.f)
{
  for (std::size_t i = 0; i < t.size(); ++i) { t.data()[i] = gain * noise(seed, i); }
}

template <class Code>
void fill_codes(pqkv::host_tensor<Code, 3>& codes, int bits, std::uint64_t seed)
{
  for (std::size_t i = 0; i < codes.size(); ++i) {
    codes.data()[i] = static_cast<Code>(pqkv::detail::random_below(seed, 0, i, std::uint64_t{1} << bits));
  }
}

/// Attention in double over rows [0, length) of reconstructed K, V (float):
/// the accuracy reference.
void double_attention(pqkv::host_tensor<float, 2> const& q, pqkv::host_tensor<float, 3> const& k,
                      pqkv::host_tensor<float, 3> const& v, index_t length, double scale, std::vector<double>& out,
                      std::vector<double>& lse)
{
  index_t const qh = q.extent(0), kvh = k.extent(0), dim = k.extent(2), dv = v.extent(2), r = qh / kvh;
  out.assign(static_cast<std::size_t>(qh * dv), 0.0);
  lse.assign(static_cast<std::size_t>(qh), 0.0);
  for (index_t h = 0; h < qh; ++h) {
    index_t const g = h / r;
    std::vector<double> s(static_cast<std::size_t>(length));
    double mx = -1e300;
    for (index_t t = 0; t < length; ++t) {
      double dot = 0;
      for (index_t d = 0; d < dim; ++d) { dot += static_cast<double>(q.view()(h, d)) * k.view()(g, t, d); }
      s[static_cast<std::size_t>(t)] = scale * dot;
      mx = std::max(mx, scale * dot);
    }
    double z = 0;
    for (index_t t = 0; t < length; ++t) {
      double const w = std::exp(s[static_cast<std::size_t>(t)] - mx);
      z += w;
      for (index_t d = 0; d < dv; ++d) { out[static_cast<std::size_t>(h * dv + d)] += w * v.view()(g, t, d); }
    }
    for (index_t d = 0; d < dv; ++d) { out[static_cast<std::size_t>(h * dv + d)] /= z; }
    lse[static_cast<std::size_t>(h)] = mx + std::log(z);
  }
}

struct setup {
  pqkv::rq_config kcfg, vcfg;
  index_t kv_heads = 2, q_heads = 4, capacity = 300;
  bool shared = false;
};

/// Runs code attention and the double reference on the same codes; returns
/// the worst relative L2 output error over q heads and the worst lse error.
template <class KCode, class VCode>
std::pair<double, double> compare(setup const& s, index_t length, float gain)
{
  index_t const cbh = s.shared ? 1 : s.kv_heads;
  pqkv::host_tensor<float, 5> kc(cbh, s.kcfg.splits, s.kcfg.stages, s.kcfg.ksub(), s.kcfg.dsub());
  pqkv::host_tensor<float, 5> vc(cbh, s.vcfg.splits, s.vcfg.stages, s.vcfg.ksub(), s.vcfg.dsub());
  fill(kc, 3, gain);
  fill(vc, 4);
  pqkv::host_tensor<KCode, 3> kcodes(s.kv_heads, s.capacity, s.kcfg.codes_per_row());
  pqkv::host_tensor<VCode, 3> vcodes(s.kv_heads, s.capacity, s.vcfg.codes_per_row());
  fill_codes(kcodes, s.kcfg.bits, 5);
  fill_codes(vcodes, s.vcfg.bits, 6);
  pqkv::host_tensor<float, 2> q(s.q_heads, s.kcfg.dim);
  fill(q, 7);
  pqkv::host_tensor<float, 3> k(s.kv_heads, s.capacity, s.kcfg.dim), v(s.kv_heads, s.capacity, s.vcfg.dim);
  pqkv::cpu::rq_reconstruct(s.kcfg, kc.const_view(), kcodes.const_view(), 0, k.view());
  pqkv::cpu::rq_reconstruct(s.vcfg, vc.const_view(), vcodes.const_view(), 0, v.view());

  pqkv::host_tensor<float, 2> out(s.q_heads, s.vcfg.dim);
  std::vector<float> lse(static_cast<std::size_t>(s.q_heads));
  pqkv::cpu::code_attention(q.const_view(), s.kcfg, kc.const_view(), kcodes.const_view(), s.vcfg, vc.const_view(),
                            vcodes.const_view(), length, out.view(), 0.f, std::span<float>{lse});
  std::vector<double> want, want_lse;
  double const scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.kcfg.dim)));
  double_attention(q, k, v, length, scale, want, want_lse);
  double worst = 0, worst_lse = 0;
  for (index_t h = 0; h < s.q_heads; ++h) {
    double num = 0, den = 0;
    for (index_t d = 0; d < s.vcfg.dim; ++d) {
      double const w = want[static_cast<std::size_t>(h * s.vcfg.dim + d)];
      num += (out.view()(h, d) - w) * (out.view()(h, d) - w);
      den += w * w;
    }
    worst = std::max(worst, std::sqrt(num / den));
    worst_lse = std::max(worst_lse, std::abs(lse[static_cast<std::size_t>(h)] - want_lse[static_cast<std::size_t>(h)]) /
                                      std::max(1.0, std::abs(want_lse[static_cast<std::size_t>(h)])));
  }
  return {worst, worst_lse};
}

pqkv::rq_config make_cfg(index_t dim, int splits, int stages, int bits, bool permute)
{
  auto c = pqkv::test::rq_test_config(dim, splits, stages, bits);
  if (permute) { c.permutation = pqkv::test::stride_permutation(dim); }
  return c;
}

}  // namespace

TEST_CASE("code_attention: matches double attention on reconstructed K/V within 1e-3")
{
  struct variant {
    int k_splits, k_stages, k_bits, v_splits, v_stages, v_bits;
    bool permute, shared;
    index_t length;
  };
  variant const vars[] = {
    {1, 4, 8, 1, 4, 8, false, false, 300},   // pqkv point (256x4; 256x4)
    {2, 8, 4, 2, 8, 4, true, true, 257},     // 16-entry codebooks, splits, permutation, shared, ragged tile
    {1, 6, 10, 1, 3, 9, true, false, 130},   // VQKV-like widths (uint16 codes)
    {4, 2, 6, 2, 3, 7, false, true, 64},     // one full tile
  };
  for (auto const& vr : vars) {
    setup s;
    s.kcfg = make_cfg(32, vr.k_splits, vr.k_stages, vr.k_bits, vr.permute);
    s.vcfg = make_cfg(32, vr.v_splits, vr.v_stages, vr.v_bits, vr.permute);
    s.shared = vr.shared;
    for (float gain : {0.3f, 3.f}) {  // soft and peaked softmax
      std::pair<double, double> e;
      if (vr.k_bits <= 8 && vr.v_bits <= 8) {
        e = compare<std::uint8_t, std::uint8_t>(s, vr.length, gain);
      } else {
        e = compare<std::uint16_t, std::uint16_t>(s, vr.length, gain);
      }
      CHECK_MESSAGE(e.first <= 1e-3, "k stages ", vr.k_stages, " bits ", vr.k_bits, " gain ", gain, ": ", e.first);
      CHECK_MESSAGE(e.second <= 1e-5, "lse error ", e.second);
    }
  }
}

TEST_CASE("code_attention: uint16 codes of <= 8-bit codebooks give the uint8 result; length 0 is an empty state")
{
  setup s;
  s.kcfg = make_cfg(16, 1, 3, 5, false);
  s.vcfg = make_cfg(16, 1, 2, 5, false);
  pqkv::host_tensor<float, 5> kc(2, 1, 3, 32, 16), vc(2, 1, 2, 32, 16);
  fill(kc, 1);
  fill(vc, 2);
  pqkv::host_tensor<std::uint8_t, 3> k8(2, 70, 3), v8(2, 70, 2);
  fill_codes(k8, 5, 3);
  fill_codes(v8, 5, 4);
  pqkv::host_tensor<std::uint16_t, 3> k16(2, 70, 3), v16(2, 70, 2);
  std::copy(k8.storage().begin(), k8.storage().end(), k16.storage().begin());
  std::copy(v8.storage().begin(), v8.storage().end(), v16.storage().begin());
  pqkv::host_tensor<float, 2> q(6, 16);
  fill(q, 5);
  pqkv::host_tensor<float, 2> a(6, 16), b(6, 16);
  std::vector<float> la(6), lb(6);
  pqkv::cpu::code_attention(q.const_view(), s.kcfg, kc.const_view(), k8.const_view(), s.vcfg, vc.const_view(),
                            v8.const_view(), 70, a.view(), 0.25f, std::span<float>{la});
  pqkv::cpu::code_attention(q.const_view(), s.kcfg, kc.const_view(), k16.const_view(), s.vcfg, vc.const_view(),
                            v16.const_view(), 70, b.view(), 0.25f, std::span<float>{lb});
  CHECK(a.storage() == b.storage());
  CHECK(la == lb);
  // codes past length are never read: garbage there changes nothing
  for (index_t t = 65; t < 70; ++t) { k8.view()(1, t, 0) = 255; }
  pqkv::cpu::code_attention(q.const_view(), s.kcfg, kc.const_view(), k8.const_view(), s.vcfg, vc.const_view(),
                            v8.const_view(), 65, a.view(), 0.25f, std::span<float>{la});
  pqkv::cpu::code_attention(q.const_view(), s.kcfg, kc.const_view(), k8.const_view(), s.vcfg, vc.const_view(),
                            v8.const_view(), 0, a.view(), 0.25f, std::span<float>{la});
  for (float x : a.storage()) { CHECK(x == 0.f); }
  for (float x : la) { CHECK(x == -std::numeric_limits<float>::infinity()); }
}

TEST_CASE("code_attention: merged by lse with exact sink/window attention it equals attention over all tokens")
{
  // tokens [0, 4) sink and [20, 24) window exact; [4, 20) coded (given as
  // their reconstruction, so the merge must reproduce full attention)
  auto const kcfg = make_cfg(16, 2, 3, 4, true), vcfg = make_cfg(16, 1, 3, 4, false);
  pqkv::host_tensor<float, 5> kc(1, 2, 3, 16, 8), vc(1, 1, 3, 16, 16);
  fill(kc, 1, 0.8f);
  fill(vc, 2);
  pqkv::host_tensor<std::uint8_t, 3> kcodes(2, 16, 6), vcodes(2, 16, 3);
  fill_codes(kcodes, 4, 3);
  fill_codes(vcodes, 4, 4);
  pqkv::host_tensor<float, 3> kall(2, 24, 16), vall(2, 24, 16);
  fill(kall, 8);
  fill(vall, 9);
  pqkv::host_tensor<float, 3> kmid(2, 16, 16), vmid(2, 16, 16);
  pqkv::cpu::rq_reconstruct(kcfg, kc.const_view(), kcodes.const_view(), 0, kmid.view());
  pqkv::cpu::rq_reconstruct(vcfg, vc.const_view(), vcodes.const_view(), 0, vmid.view());
  for (index_t g = 0; g < 2; ++g) {
    for (index_t t = 0; t < 16; ++t) {
      for (index_t d = 0; d < 16; ++d) {
        kall.view()(g, 4 + t, d) = kmid.view()(g, t, d);
        vall.view()(g, 4 + t, d) = vmid.view()(g, t, d);
      }
    }
  }
  pqkv::host_tensor<float, 2> q(4, 16);
  fill(q, 10);
  pqkv::host_tensor<float, 2> full(4, 16), coded(4, 16), exact(4, 16);
  std::vector<float> lc(4), le(4);
  pqkv::cpu::attention_dense(q.const_view(), kall.const_view(), vall.const_view(), full.view());
  pqkv::cpu::code_attention(q.const_view(), kcfg, kc.const_view(), kcodes.const_view(), vcfg, vc.const_view(),
                            vcodes.const_view(), 16, coded.view(), 0.f, std::span<float>{lc});
  pqkv::host_tensor<std::int32_t, 2> none(2, 1);
  none.view()(0, 0) = none.view()(1, 0) = -1;
  // the exact part: sink 4 + window 4 of the same 24 tokens
  pqkv::cpu::attention_sparse(q.const_view(), kall.const_view(), vall.const_view(), none.const_view(), 4, 4,
                              exact.view(), 0.f, std::span<float>{le});
  double worst = 0;
  for (index_t h = 0; h < 4; ++h) {
    double const m = std::max(lc[static_cast<std::size_t>(h)], le[static_cast<std::size_t>(h)]);
    double const wc = std::exp(lc[static_cast<std::size_t>(h)] - m), we = std::exp(le[static_cast<std::size_t>(h)] - m);
    for (index_t d = 0; d < 16; ++d) {
      double const merged = (wc * coded.view()(h, d) + we * exact.view()(h, d)) / (wc + we);
      worst = std::max(worst, std::abs(merged - full.view()(h, d)));
    }
  }
  CHECK(worst < 1e-5);
}

TEST_CASE("code_attention: bad inputs throw naming the argument")
{
  auto const kcfg = make_cfg(16, 1, 2, 4, false), vcfg = make_cfg(16, 1, 2, 4, false);
  pqkv::host_tensor<float, 5> kc(1, 1, 2, 16, 16), vc(1, 1, 2, 16, 16);
  fill(kc, 1);
  fill(vc, 2);
  pqkv::host_tensor<std::uint8_t, 3> kcodes(2, 10, 2), vcodes(2, 10, 2);
  pqkv::host_tensor<float, 2> q(4, 16), out(4, 16);
  fill(q, 3);
  std::vector<float> lse(4);
  auto call = [&](auto const& qq, auto const& kcd, auto const& vcd, index_t length, auto outv, std::span<float> l,
                  pqkv::rq_config const& kk, pqkv::rq_config const& vv) {
    return error_message([&] {
      pqkv::cpu::code_attention(qq, kk, kc.const_view(), kcd, vv, vc.const_view(), vcd, length, outv, 0.f, l);
    });
  };
  auto has = [](std::string const& m, char const* what) {
    INFO(m);
    return m.find(what) != std::string::npos;
  };
  auto const ok = call(q.const_view(), kcodes.const_view(), vcodes.const_view(), 10, out.view(), lse, kcfg, vcfg);
  CHECK(ok.empty());
  CHECK(has(call(q.const_view(), kcodes.const_view(), vcodes.const_view(), 11, out.view(), lse, kcfg, vcfg),
            "length=11"));
  pqkv::host_tensor<float, 2> q3(3, 16);
  CHECK(has(call(q3.const_view(), kcodes.const_view(), vcodes.const_view(), 10, out.view(), lse, kcfg, vcfg),
            "q.extent(0)=3"));
  pqkv::host_tensor<std::uint8_t, 3> vshort(2, 9, 2);
  CHECK(has(call(q.const_view(), kcodes.const_view(), vshort.const_view(), 9, out.view(), lse, kcfg, vcfg),
            "value_codes extents"));
  pqkv::host_tensor<std::uint8_t, 3> k3(2, 10, 3);
  CHECK(has(call(q.const_view(), k3.const_view(), vcodes.const_view(), 10, out.view(), lse, kcfg, vcfg),
            "key_codes.extent(2)=3"));
  kcodes.view()(1, 3, 1) = 16;
  CHECK(has(call(q.const_view(), kcodes.const_view(), vcodes.const_view(), 10, out.view(), lse, kcfg, vcfg),
            "codes(1, 3, 1)=16 >= 2^bits=16"));
  kcodes.view()(1, 3, 1) = 0;
  q.view()(2, 5) = std::numeric_limits<float>::quiet_NaN();
  CHECK(has(call(q.const_view(), kcodes.const_view(), vcodes.const_view(), 10, out.view(), lse, kcfg, vcfg),
            "q(2, 5)=nan"));
  fill(q, 3);
  std::vector<float> lse3(3);
  CHECK(has(call(q.const_view(), kcodes.const_view(), vcodes.const_view(), 10, out.view(), lse3, kcfg, vcfg),
            "lse.size()=3"));
  pqkv::host_tensor<float, 2> out8(4, 8);
  CHECK(has(call(q.const_view(), kcodes.const_view(), vcodes.const_view(), 10, out8.view(), lse, kcfg, vcfg),
            "out extents"));
  auto const null_codes = pqkv::make_view<std::uint8_t const>(nullptr, 2, 10, 2);
  CHECK(has(call(q.const_view(), null_codes, vcodes.const_view(), 10, out.view(), lse, kcfg, vcfg),
            "key_codes.data_handle() is null"));
  auto wide = kcfg;
  wide.bits = 9;
  CHECK(has(call(q.const_view(), kcodes.const_view(), vcodes.const_view(), 10, out.view(), lse, wide, vcfg),
            "too narrow for bits=9"));
  auto bad = vcfg;
  bad.stages = 3;
  CHECK(has(call(q.const_view(), kcodes.const_view(), vcodes.const_view(), 10, out.view(), lse, kcfg, bad),
            "value_codes.extent(2)=2"));
  kc.view()(0, 0, 1, 3, 2) = std::numeric_limits<float>::infinity();
  CHECK(has(call(q.const_view(), kcodes.const_view(), vcodes.const_view(), 10, out.view(), lse, kcfg, vcfg),
            "code_attention (key_centroids)"));
}
