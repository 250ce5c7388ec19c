// SPDX-License-Identifier: Apache-2.0
#include <pqkv/attend/dense.hpp>
#include <pqkv/attend/merge_state.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/random.hpp>

#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::error_message;
using pqkv::test::noise;

constexpr float neg_inf = -std::numeric_limits<float>::infinity();

/// Random q [q_heads, dim], keys and values [kv_heads, n, dim]; `gain`
/// scales q so the softmax is flat (small) or peaked (large).
struct problem {
  index_t kv_heads, q_heads, n, dim;
  pqkv::host_tensor<float, 2> q;
  pqkv::host_tensor<float, 3> keys, values;
};

problem make_problem(index_t kv_heads, index_t q_heads, index_t n, index_t dim, float gain, std::uint64_t seed)
{
  problem p{kv_heads, q_heads, n, dim, pqkv::host_tensor<float, 2>(q_heads, dim),
            pqkv::host_tensor<float, 3>(kv_heads, n, dim), pqkv::host_tensor<float, 3>(kv_heads, n, dim)};
  std::uint64_t i = 0;
  for (index_t h = 0; h < q_heads; ++h) {
    for (index_t d = 0; d < dim; ++d) { p.q.view()(h, d) = gain * noise(seed, i++); }
  }
  for (index_t g = 0; g < kv_heads; ++g) {
    for (index_t t = 0; t < n; ++t) {
      for (index_t d = 0; d < dim; ++d) {
        p.keys.view()(g, t, d) = noise(seed + 1, i++);
        p.values.view()(g, t, d) = noise(seed + 2, i++);
      }
    }
  }
  return p;
}

/// Attention state of every q head over the tokens that `part_of` assigns to
/// `part` (per KV head): o [q_heads, dim] and lse [q_heads].
struct state {
  pqkv::host_tensor<float, 2> o;
  std::vector<float> lse;
};

state attend_part(problem const& p, std::vector<int> const& part_of, int part)
{
  // selection [kv_heads, n]: the part's tokens, -1 padded
  pqkv::host_tensor<std::int32_t, 2> sel(p.kv_heads, p.n);
  for (index_t g = 0; g < p.kv_heads; ++g) {
    index_t c = 0;
    for (index_t t = 0; t < p.n; ++t) { sel.view()(g, t) = -1; }
    for (index_t t = 0; t < p.n; ++t) {
      if (part_of[static_cast<std::size_t>(g * p.n + t)] == part) { sel.view()(g, c++) = static_cast<std::int32_t>(t); }
    }
  }
  state s{pqkv::host_tensor<float, 2>(p.q_heads, p.dim), std::vector<float>(static_cast<std::size_t>(p.q_heads))};
  pqkv::cpu::attention_sparse(p.q.const_view(), p.keys.const_view(), p.values.const_view(), sel.const_view(), 0, 0,
                              s.o.view(), 0.f, std::span<float>{s.lse});
  return s;
}

state attend_all(problem const& p)
{
  state s{pqkv::host_tensor<float, 2>(p.q_heads, p.dim), std::vector<float>(static_cast<std::size_t>(p.q_heads))};
  pqkv::cpu::attention_dense(p.q.const_view(), p.keys.const_view(), p.values.const_view(), s.o.view(), 0.f,
                             std::span<float>{s.lse});
  return s;
}

/// Largest relative L2 error over the rows of o vs ref, and largest lse error
/// relative to max(1, |ref lse|).
void check_close(state const& got, state const& ref, double tol)
{
  for (index_t h = 0; h < ref.o.extent(0); ++h) {
    double diff = 0, norm = 0;
    for (index_t d = 0; d < ref.o.extent(1); ++d) {
      double const e = static_cast<double>(got.o.view()(h, d)) - static_cast<double>(ref.o.view()(h, d));
      diff += e * e;
      norm += static_cast<double>(ref.o.view()(h, d)) * static_cast<double>(ref.o.view()(h, d));
    }
    CHECK(std::sqrt(diff / norm) <= tol);
    auto const i = static_cast<std::size_t>(h);
    CHECK(std::abs(static_cast<double>(got.lse[i]) - static_cast<double>(ref.lse[i])) <=
          tol * std::max(1.0, std::abs(static_cast<double>(ref.lse[i]))));
  }
}

bool same_bits(state const& a, state const& b)
{
  return std::memcmp(a.o.data(), b.o.data(), sizeof(float) * static_cast<std::size_t>(a.o.size())) == 0 &&
         std::memcmp(a.lse.data(), b.lse.data(), sizeof(float) * a.lse.size()) == 0;
}

/// Stacks states into o [S, heads, dv] and lse [S, heads] for merge_states.
struct stacked {
  pqkv::host_tensor<float, 3> o;
  pqkv::host_tensor<float, 2> lse;
};

stacked stack(std::vector<state> const& parts)
{
  auto const s = static_cast<index_t>(parts.size());
  index_t const heads = parts.empty() ? 0 : parts[0].o.extent(0), dv = parts.empty() ? 0 : parts[0].o.extent(1);
  stacked st{pqkv::host_tensor<float, 3>(s, heads, dv), pqkv::host_tensor<float, 2>(s, heads)};
  for (index_t i = 0; i < s; ++i) {
    auto const& part = parts[static_cast<std::size_t>(i)];
    for (index_t h = 0; h < heads; ++h) {
      st.lse.view()(i, h) = part.lse[static_cast<std::size_t>(h)];
      for (index_t d = 0; d < dv; ++d) { st.o.view()(i, h, d) = part.o.view()(h, d); }
    }
  }
  return st;
}

state merge_all(std::vector<state> const& parts, index_t heads, index_t dv)
{
  stacked const st = stack(parts);
  state out{pqkv::host_tensor<float, 2>(heads, dv), std::vector<float>(static_cast<std::size_t>(heads))};
  pqkv::cpu::merge_states(st.o.const_view(), st.lse.const_view(), out.o.view(), std::span<float>{out.lse});
  return out;
}

state fold_in_place(std::vector<state> const& parts)
{
  state acc{pqkv::host_tensor<float, 2>(parts[0].o.extent(0), parts[0].o.extent(1)), parts[0].lse};
  std::copy(parts[0].o.data(), parts[0].o.data() + parts[0].o.size(), acc.o.data());
  for (std::size_t i = 1; i < parts.size(); ++i) {
    pqkv::cpu::merge_state_in_place(acc.o.view(), std::span<float>{acc.lse}, parts[i].o.const_view(),
                                    std::span<float const>{parts[i].lse});
  }
  return acc;
}

/// Token t of KV head g goes to part (hash mod parts); `empty_part` (when >= 0)
/// gets no token of KV head 0 and every KV head's part 0 takes the sink-like
/// first token, so parts differ in size and content per head.
std::vector<int> split(index_t kv_heads, index_t n, int parts, int empty_part, std::uint64_t seed)
{
  std::vector<int> part_of(static_cast<std::size_t>(kv_heads * n));
  for (index_t g = 0; g < kv_heads; ++g) {
    for (index_t t = 0; t < n; ++t) {
      auto p = static_cast<int>(pqkv::detail::random_bits(seed, static_cast<std::uint64_t>(g),
                                                          static_cast<std::uint64_t>(t)) %
                                static_cast<std::uint64_t>(parts));
      if (g == 0 && p == empty_part) { p = (p + 1) % parts; }
      part_of[static_cast<std::size_t>(g * n + t)] = p;
    }
  }
  return part_of;
}

}  // namespace

TEST_CASE("merge_states: attention over 2..5 disjoint parts, merged, equals attention over the union (GQA)")
{
  for (float gain : {0.5f, 4.f}) {  // flat and peaked softmax
    problem const p = make_problem(2, 8, 97, 16, gain, 11);
    state const dense = attend_all(p);
    for (int parts = 2; parts <= 5; ++parts) {
      CAPTURE(gain);
      CAPTURE(parts);
      auto const part_of = split(p.kv_heads, p.n, parts, -1, static_cast<std::uint64_t>(parts));
      std::vector<state> states;
      for (int i = 0; i < parts; ++i) { states.push_back(attend_part(p, part_of, i)); }
      check_close(merge_all(states, p.q_heads, p.dim), dense, 1e-6);
      check_close(fold_in_place(states), dense, 1e-6);
      // Merging the parts in another order gives the same state within rounding.
      std::vector<state> reversed(states.rbegin(), states.rend());
      check_close(merge_all(reversed, p.q_heads, p.dim), dense, 1e-6);
    }
  }
}

TEST_CASE("merge_state: two states equal merge_states over them bit for bit; in place equals out of place")
{
  problem const p = make_problem(2, 4, 40, 8, 2.f, 3);
  auto const part_of = split(p.kv_heads, p.n, 2, -1, 5);
  std::vector<state> const s{attend_part(p, part_of, 0), attend_part(p, part_of, 1)};
  state out{pqkv::host_tensor<float, 2>(p.q_heads, p.dim), std::vector<float>(static_cast<std::size_t>(p.q_heads))};
  pqkv::cpu::merge_state(s[0].o.const_view(), std::span<float const>{s[0].lse}, s[1].o.const_view(),
                         std::span<float const>{s[1].lse}, out.o.view(), std::span<float>{out.lse});
  CHECK(same_bits(out, merge_all(s, p.q_heads, p.dim)));
  CHECK(same_bits(out, fold_in_place(s)));
  check_close(out, attend_all(p), 1e-6);

  // Exact aliasing of the output with input b is allowed.
  state b{pqkv::host_tensor<float, 2>(p.q_heads, p.dim), s[1].lse};
  std::copy(s[1].o.data(), s[1].o.data() + s[1].o.size(), b.o.data());
  pqkv::cpu::merge_state(s[0].o.const_view(), std::span<float const>{s[0].lse}, b.o.const_view(),
                         std::span<float const>{b.lse}, b.o.view(), std::span<float>{b.lse});
  CHECK(same_bits(b, out));
}

TEST_CASE("merge_states: empty parts contribute nothing and their o is never read")
{
  problem const p = make_problem(2, 4, 50, 8, 2.f, 7);
  state const dense = attend_all(p);
  // Part 1 of KV head 0 is empty; part 3 is empty for every head.
  auto part_of = split(p.kv_heads, p.n, 3, 1, 9);
  std::vector<state> states;
  for (int i = 0; i < 4; ++i) { states.push_back(attend_part(p, part_of, i)); }
  for (index_t h = 0; h < 2; ++h) { CHECK(states[1].lse[static_cast<std::size_t>(h)] == neg_inf); }  // KV head 0
  CHECK(states[1].lse[2] != neg_inf);
  for (float x : states[3].lse) { CHECK(x == neg_inf); }
  // Garbage in an empty state's o (engines leave it unwritten) must not leak.
  for (index_t d = 0; d < p.dim; ++d) {
    states[3].o.view()(0, d) = std::numeric_limits<float>::quiet_NaN();
    states[1].o.view()(1, d) = std::numeric_limits<float>::infinity();
  }
  check_close(merge_all(states, p.q_heads, p.dim), dense, 1e-6);
  check_close(fold_in_place(states), dense, 1e-6);

  // A single non-empty state comes out bit for bit, wherever it sits.
  std::vector<state> one{states[3], states[0], states[3]};
  state const only = merge_all(one, p.q_heads, p.dim);
  CHECK(same_bits(only, states[0]));

  // All empty: o = 0, lse = -inf; S = 0 too.
  std::vector<state> none{states[3], states[3]};
  for (std::vector<state> const& v : {none, std::vector<state>{}}) {
    state out{pqkv::host_tensor<float, 2>(p.q_heads, p.dim), std::vector<float>(static_cast<std::size_t>(p.q_heads))};
    std::fill(out.o.data(), out.o.data() + out.o.size(), 7.f);
    stacked const st = v.empty() ? stacked{pqkv::host_tensor<float, 3>(0, p.q_heads, p.dim),
                                           pqkv::host_tensor<float, 2>(0, p.q_heads)}
                                 : stack(v);
    pqkv::cpu::merge_states(st.o.const_view(), st.lse.const_view(), out.o.view(), std::span<float>{out.lse});
    for (index_t h = 0; h < p.q_heads; ++h) {
      CHECK(out.lse[static_cast<std::size_t>(h)] == neg_inf);
      for (index_t d = 0; d < p.dim; ++d) { CHECK(out.o.view()(h, d) == 0.f); }
    }
  }
}

TEST_CASE("merge_state: a state with much smaller lse barely moves the result; exp does not overflow")
{
  // lse values far apart and large: a naive exp(lse) would overflow float.
  pqkv::host_tensor<float, 2> oa(1, 2), ob(1, 2), out(1, 2);
  oa.view()(0, 0) = 1.f, oa.view()(0, 1) = -2.f;
  ob.view()(0, 0) = 3.f, ob.view()(0, 1) = 5.f;
  std::vector<float> la{200.f}, lb{200.f - std::log(3.f)}, lo(1);
  pqkv::cpu::merge_state(oa.const_view(), std::span<float const>{la}, ob.const_view(), std::span<float const>{lb},
                         out.view(), std::span<float>{lo});
  // weights 3/4 and 1/4
  CHECK(out.view()(0, 0) == doctest::Approx(0.75 * 1 + 0.25 * 3).epsilon(1e-5));
  CHECK(out.view()(0, 1) == doctest::Approx(0.75 * -2 + 0.25 * 5).epsilon(1e-5));
  CHECK(lo[0] == doctest::Approx(200.0 + std::log(4.0 / 3.0)).epsilon(1e-6));
  lb[0] = -1e30f;
  pqkv::cpu::merge_state(oa.const_view(), std::span<float const>{la}, ob.const_view(), std::span<float const>{lb},
                         out.view(), std::span<float>{lo});
  CHECK(out.view()(0, 0) == 1.f);
  CHECK(out.view()(0, 1) == -2.f);
  CHECK(lo[0] == 200.f);
}

TEST_CASE("merge_state: bad inputs throw naming the argument, and nothing is written")
{
  pqkv::host_tensor<float, 2> oa(2, 3), ob(2, 3), out(2, 3), small(2, 2);
  std::fill(oa.data(), oa.data() + oa.size(), 1.f);
  std::fill(ob.data(), ob.data() + ob.size(), 2.f);
  std::fill(out.data(), out.data() + out.size(), 9.f);
  std::vector<float> la{0.f, 1.f}, lb{0.5f, 0.f}, lo{9.f, 9.f}, l3{0.f, 0.f, 0.f};
  auto merge = [&](pqkv::strided_view<float const, 2> a, std::span<float const> sa,
                   pqkv::strided_view<float const, 2> b, std::span<float const> sb, pqkv::strided_view<float, 2> o,
                   std::span<float> so) {
    return error_message([&] { pqkv::cpu::merge_state(a, sa, b, sb, o, so); });
  };
  auto const a = oa.const_view(), b = ob.const_view();
  CHECK(merge(a, la, small.const_view(), lb, out.view(), lo).find("o_b extents (2, 2)") != std::string::npos);
  CHECK(merge(a, la, b, lb, small.view(), lo).find("out extents (2, 2)") != std::string::npos);
  CHECK(merge(a, l3, b, lb, out.view(), lo).find("lse_a.size()=3") != std::string::npos);
  CHECK(merge(a, la, b, lb, out.view(), std::span<float>{l3}).find("lse_out.size()=3") != std::string::npos);
  CHECK(merge(pqkv::strided_view<float const, 2>{}, {}, b, lb, out.view(), lo).find("o_b extents") !=
        std::string::npos);

  std::vector<float> bad = lb;
  bad[1] = std::numeric_limits<float>::quiet_NaN();
  std::string msg = merge(a, la, b, bad, out.view(), lo);
  CHECK(msg.rfind("pqkv::error: merge_state: lse_b[1]=", 0) == 0);
  CHECK(msg.find("(attend/merge_state.hpp:") != std::string::npos);
  bad[1] = std::numeric_limits<float>::infinity();
  CHECK(merge(a, la, b, bad, out.view(), lo).find("lse_b[1]=inf") != std::string::npos);
  oa.view()(1, 2) = std::numeric_limits<float>::quiet_NaN();
  CHECK(merge(a, la, b, lb, out.view(), lo).find("o_a(1, 2)=") != std::string::npos);
  la[1] = neg_inf;  // an empty state's NaN is fine
  CHECK(merge(a, la, b, lb, out.view(), lo).empty());
  std::fill(out.data(), out.data() + out.size(), 9.f);
  lo = {9.f, 9.f};
  la[1] = 1.f;
  CHECK(!merge(a, la, b, lb, out.view(), lo).empty());
  for (std::size_t i = 0; i < static_cast<std::size_t>(out.size()); ++i) { CHECK(out.data()[i] == 9.f); }
  CHECK(lo[0] == 9.f);

  auto const null_o = pqkv::make_view(static_cast<float const*>(nullptr), 2, 3);
  CHECK(merge(a, la, null_o, lb, out.view(), lo).find("o_b.data_handle() is null") != std::string::npos);

  // In place: the same checks under its own name.
  oa.view()(1, 2) = 1.f;
  msg = error_message([&] {
    pqkv::cpu::merge_state_in_place(oa.view(), std::span<float>{la}, small.const_view(), std::span<float const>{lb});
  });
  CHECK(msg.rfind("pqkv::error: merge_state_in_place: o_other extents (2, 2)", 0) == 0);
  bad = lb;
  bad[0] = std::numeric_limits<float>::quiet_NaN();
  msg = error_message([&] {
    pqkv::cpu::merge_state_in_place(oa.view(), std::span<float>{la}, b, std::span<float const>{bad});
  });
  CHECK(msg.find("merge_state_in_place: lse_other[0]=") != std::string::npos);
}

TEST_CASE("merge_states: bad inputs throw naming the argument")
{
  pqkv::host_tensor<float, 3> o(3, 2, 4);
  pqkv::host_tensor<float, 2> lse(3, 2), lse_wrong(2, 2), out(2, 4), out_wrong(2, 3);
  std::fill(o.data(), o.data() + o.size(), 1.f);
  std::fill(lse.data(), lse.data() + lse.size(), 0.f);
  std::vector<float> lo(2), lo_wrong(3);
  auto merge = [&](pqkv::view<float const, 2> l, pqkv::strided_view<float, 2> dst, std::span<float> so) {
    return error_message([&] { pqkv::cpu::merge_states(o.const_view(), l, dst, so); });
  };
  CHECK(merge(lse.const_view(), out.view(), lo).empty());
  CHECK(merge(lse_wrong.const_view(), out.view(), lo).find("lse extents (2, 2) differ from o's (S, heads)=(3, 2)") !=
        std::string::npos);
  CHECK(merge(lse.const_view(), out_wrong.view(), lo).find("out extents (2, 3)") != std::string::npos);
  CHECK(merge(lse.const_view(), out.view(), lo_wrong).find("lse_out.size()=3") != std::string::npos);
  lse.view()(2, 1) = std::numeric_limits<float>::infinity();
  CHECK(merge(lse.const_view(), out.view(), lo).find("lse(2, 1)=inf") != std::string::npos);
  lse.view()(2, 1) = 0.f;
  o.view()(1, 0, 3) = -std::numeric_limits<float>::infinity();
  CHECK(merge(lse.const_view(), out.view(), lo).find("o(1, 0, 3)=-inf") != std::string::npos);
  lse.view()(1, 0) = neg_inf;
  CHECK(merge(lse.const_view(), out.view(), lo).empty());
}
