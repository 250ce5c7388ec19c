// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::cpu::rq_encoder`: residual codes of K or V rows, greedy or by
/// beam search, for a whole prefill (`encode`) or a decode step (`append`);
/// and the packed bit-stream layout of the codes (`pack_codes`, `unpack_codes`).
///
/// Codes are [heads, tokens, splits * stages], code n = s * stages + st (split
/// s, stage st), as uint8 for bits <= 8 and uint16 for 9..16 (uint16 also
/// accepted for bits <= 8; uint8 for bits > 8 throws).
///
/// Encoding contract (what a GPU encoder must reproduce on its fp32 path):
/// - Split s of row (h, t) is x_i = float(keys(h, t, perm[s * dsub + i])),
///   i < dsub; splits are coded independently. Codebook head hc = 0 when the
///   centroids are shared (extent(0) == 1), else h.
/// - Distance of a residual r to codeword c of stage st:
///   `d = 0.f; for i ascending: { diff = r_i - C(hc, s, st, c, i); d = fmaf(diff, diff, d); }`.
/// - Residual update: r_i <- r_i - C(hc, s, st, c, i) in float, starting from r = x.
/// - Greedy (beam 1): at each stage the c with the smallest d, ties to the
///   lower c (strict `<` scan from c = 0).
/// - Beam B: a list of at most B partial code tuples, starting with the empty
///   one. At stage st, every kept tuple p extends by every c, scored by
///   d(r_p, c) (the distance of the full residual of the extended tuple);
///   the B best candidates are kept, ordered by (d ascending, then the code
///   tuple (c_0 .. c_st) lexicographically ascending). The result is the
///   first tuple after the last stage. Beam 1 gives the greedy codes; a beam
///   >= 2^(bits * (stages - 1)) gives the exhaustive argmin of the final d
///   under the same order.
/// - Keys and centroids must be finite (checked before anything is written).
/// Determinism: independent of the thread count and of the token chunking;
/// appending token by token equals one `encode`.
///
/// Packed layout: each (h, t) row of codes is one little-endian bit stream of
/// `codes_per_row * bits` bits in ceil(codes_per_row * bits / 8) bytes: bit b
/// of code n is stream bit n * bits + b, stored as bit (k % 8) of byte k / 8;
/// padding bits are 0. E.g. 56 10-bit codes take 70 bytes (1.25 per code).

#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace pqkv {

/// A residual code element type: uint8 (bits <= 8) or uint16 (bits <= 16).
template <class C>
concept RqCode = std::same_as<C, std::uint8_t> || std::same_as<C, std::uint16_t>;

/// Bytes of one row of `codes_per_row` packed `bits`-bit codes.
[[nodiscard]] constexpr index_t packed_row_bytes(index_t codes_per_row, int bits) noexcept
{
  return (codes_per_row * bits + 7) / 8;
}

namespace detail::rq {

/// Throws unless `Code` holds `bits`-bit codes.
template <class Code>
void check_code_type(int bits, char const* where)
{
  PQKV_EXPECTS(bits <= 8 * static_cast<int>(sizeof(Code)), where, "codes dtype uint", 8 * sizeof(Code),
               " is too narrow for bits=", bits, "; use uint16 codes");
}

/// Throws unless bits is in 1..16.
inline void check_bits(int bits, char const* where)
{
  PQKV_EXPECTS(bits >= 1 && bits <= 16, where, "bits=", bits, " is outside 1..16");
}

/// Throws unless every code of rows [t0, t1) of codes [heads, tokens, n] is < ksub.
template <class Code>
void check_code_values(view<Code const, 3> codes, index_t t0, index_t t1, index_t ksub, char const* where)
{
  for (index_t h = 0; h < codes.extent(0); ++h) {
    for (index_t t = t0; t < t1; ++t) {
      for (index_t n = 0; n < codes.extent(2); ++n) {
        PQKV_EXPECTS(codes(h, t, n) < ksub, where, "codes(", h, ", ", t, ", ", n, ")=", index_t{codes(h, t, n)},
                     " >= 2^bits=", ksub);
      }
    }
  }
}

/// The checks `pack_codes` and `unpack_codes` share: bits, a code type wide
/// enough for it, packed [heads, tokens, packed_row_bytes(n, bits)] against
/// codes [heads, tokens, n], and non-null data.
template <class Code, class Codes, class Packed>
void check_pack_args(Codes const& codes, Packed const& packed, int bits, char const* where)
{
  check_bits(bits, where);
  check_code_type<Code>(bits, where);
  index_t const heads = codes.extent(0), tokens = codes.extent(1), n = codes.extent(2);
  PQKV_EXPECTS(packed.extent(0) == heads && packed.extent(1) == tokens, where, "packed extents (", packed.extent(0),
               ", ", packed.extent(1), ") differ from codes' (", heads, ", ", tokens, ")");
  PQKV_EXPECTS(packed.extent(2) == packed_row_bytes(n, bits), where, "packed.extent(2)=", packed.extent(2),
               ", packed_row_bytes(", n, ", ", bits, ")=", packed_row_bytes(n, bits));
  PQKV_EXPECTS(codes.data_handle() != nullptr || element_count(codes) == 0, where, "codes.data_handle() is null");
  PQKV_EXPECTS(packed.data_handle() != nullptr || element_count(packed) == 0, where, "packed.data_handle() is null");
}

/// Code n of a packed row.
inline std::uint32_t packed_get(std::uint8_t const* row, index_t n, int bits) noexcept
{
  index_t const first = n * bits;
  std::uint32_t v = 0;
  for (int b = 0; b < bits; ++b) {
    index_t const k = first + b;
    v |= static_cast<std::uint32_t>((row[k / 8] >> (k % 8)) & 1u) << b;
  }
  return v;
}

/// One (head, token, split) search: writes the split's `stages` codes to out
/// (stride `stride`). `x` holds the permuted split; `cb` is the split's
/// centroids [stages, ksub, dsub]. Scratch is resized as needed.
struct beam_scratch {
  std::vector<float> r, r_next;          // [beam, dsub]
  std::vector<std::int32_t> code, code_next;  // [beam, stages]
  std::vector<index_t> rank;             // lexicographic rank of each kept tuple
  struct cand {
    float d;
    index_t p, c;
  };
  std::vector<cand> best;
};

inline void beam_search(float const* x, float const* cb, index_t stages, index_t ksub, index_t dsub, index_t beam,
                        beam_scratch& s, std::int32_t* out)
{
  s.r.assign(x, x + dsub);
  s.code.assign(static_cast<std::size_t>(stages), 0);
  index_t kept = 1;
  for (index_t st = 0; st < stages; ++st) {
    float const* c_st = cb + st * ksub * dsub;
    // Ranks of the kept tuples by their codes, so candidates compare by
    // (d, tuple) with one integer comparison.
    s.rank.assign(static_cast<std::size_t>(kept), 0);
    for (index_t p = 0; p < kept; ++p) {
      for (index_t q = 0; q < kept; ++q) {
        if (std::lexicographical_compare(s.code.begin() + q * stages, s.code.begin() + q * stages + st,
                                         s.code.begin() + p * stages, s.code.begin() + p * stages + st)) {
          ++s.rank[static_cast<std::size_t>(p)];
        }
      }
    }
    auto less = [&](beam_scratch::cand const& a, beam_scratch::cand const& b) {
      if (a.d != b.d) { return a.d < b.d; }
      if (a.p != b.p) { return s.rank[static_cast<std::size_t>(a.p)] < s.rank[static_cast<std::size_t>(b.p)]; }
      return a.c < b.c;
    };
    index_t const width = std::min(beam, kept * ksub);
    s.best.clear();
    for (index_t p = 0; p < kept; ++p) {
      float const* r = s.r.data() + p * dsub;
      for (index_t c = 0; c < ksub; ++c) {
        beam_scratch::cand const k{distance(r, c_st + c * dsub, dsub), p, c};
        if (static_cast<index_t>(s.best.size()) == width) {
          if (!less(k, s.best.back())) { continue; }
          s.best.pop_back();
        }
        s.best.insert(std::upper_bound(s.best.begin(), s.best.end(), k, less), k);
      }
    }
    s.r_next.resize(static_cast<std::size_t>(width * dsub));
    s.code_next.resize(static_cast<std::size_t>(width * stages));
    for (index_t k = 0; k < width; ++k) {
      auto const& b = s.best[static_cast<std::size_t>(k)];
      float const* r = s.r.data() + b.p * dsub;
      float const* c = c_st + b.c * dsub;
      for (index_t i = 0; i < dsub; ++i) { s.r_next[static_cast<std::size_t>(k * dsub + i)] = r[i] - c[i]; }
      std::copy_n(s.code.begin() + b.p * stages, stages, s.code_next.begin() + k * stages);
      s.code_next[static_cast<std::size_t>(k * stages + st)] = static_cast<std::int32_t>(b.c);
    }
    std::swap(s.r, s.r_next);
    std::swap(s.code, s.code_next);
    kept = width;
  }
  std::copy_n(s.code.begin(), stages, out);
}

/// Greedy search of one split (beam 1, without the beam bookkeeping).
inline void greedy_search(float* r, float const* cb, index_t stages, index_t ksub, index_t dsub, std::int32_t* out)
{
  for (index_t st = 0; st < stages; ++st) {
    float const* c_st = cb + st * ksub * dsub;
    index_t const c = nearest(r, c_st, ksub, dsub);
    for (index_t i = 0; i < dsub; ++i) { r[i] = r[i] - c_st[c * dsub + i]; }
    out[st] = static_cast<std::int32_t>(c);
  }
}

}  // namespace detail::rq

namespace cpu {

/// Packs codes [heads, tokens, n] (each < 2^bits) into bytes [heads, tokens,
/// packed_row_bytes(n, bits)] (layout in this file's header). Throws on a bad
/// bits, a shape mismatch, a null view or a code >= 2^bits.
template <class Code>
  requires RqCode<std::remove_const_t<Code>>
void pack_codes(view<Code, 3> codes, int bits, view<std::uint8_t, 3> packed)
{
  constexpr char const* where = "pack_codes";
  pqkv::detail::rq::check_pack_args<std::remove_const_t<Code>>(codes, packed, bits, where);
  index_t const heads = codes.extent(0), tokens = codes.extent(1), n = codes.extent(2);
  pqkv::detail::rq::check_code_values(as_const(codes), 0, tokens, index_t{1} << bits, where);
  parallel_for(heads, [&](index_t h) {
    for (index_t t = 0; t < tokens; ++t) {
      std::uint8_t* row = &packed(h, t, 0);
      std::fill_n(row, packed.extent(2), std::uint8_t{0});
      for (index_t j = 0; j < n; ++j) {
        std::uint32_t const v = codes(h, t, j);
        for (int b = 0; b < bits; ++b) {
          index_t const k = j * bits + b;
          row[k / 8] = static_cast<std::uint8_t>(row[k / 8] | (((v >> b) & 1u) << (k % 8)));
        }
      }
    }
  });
}

/// Unpacks bytes [heads, tokens, packed_row_bytes(n, bits)] into codes
/// [heads, tokens, n]. Throws on a bad bits, a code type too narrow for
/// bits, a shape mismatch or a null view.
template <RqCode Code>
void unpack_codes(view<std::uint8_t const, 3> packed, int bits, view<Code, 3> codes)
{
  constexpr char const* where = "unpack_codes";
  pqkv::detail::rq::check_pack_args<Code>(codes, packed, bits, where);
  index_t const heads = codes.extent(0), tokens = codes.extent(1), n = codes.extent(2);
  parallel_for(heads, [&](index_t h) {
    for (index_t t = 0; t < tokens; ++t) {
      for (index_t j = 0; j < n; ++j) {
        codes(h, t, j) = static_cast<Code>(pqkv::detail::rq::packed_get(&packed(h, t, 0), j, bits));
      }
    }
  });
}

/// CPU residual encoder for one `rq_config` (greedy when beam == 1, else beam
/// search; contract in this file's header); models `pqkv::Encoder` through
/// the 4-D centroids view. Stateless past its config, so calls are
/// thread-safe; each call is multi-threaded over heads x token chunks.
class rq_encoder {
 public:
  /// Validates `config`; throws `pqkv::error` naming a bad field.
  explicit rq_encoder(rq_config config) : config_{std::move(config)} { config_.validate("rq_encoder"); }

  [[nodiscard]] rq_config const& config() const noexcept { return config_; }

  /// codes [heads, tokens, splits * stages] of rows [heads, tokens, dim]
  /// (float, half or bf16; any strides). Throws `pqkv::error` on a shape
  /// mismatch, a null view, a code type too narrow for bits, or a key or
  /// centroid that is not finite; nothing is written then.
  template <class Key, class Layout, class Accessor, RqCode Code>
    requires KvElement<std::remove_const_t<Key>>
  void encode(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys,  // [heads, tokens, dim]
              rq_centroids_view<float const> centroids,                    // [1|heads, splits, stages, ksub, dsub]
              view<Code, 3> codes) const                                    // [heads, tokens, splits * stages]
  {
    kv_view<std::remove_const_t<Key> const> const k{keys};
    PQKV_EXPECTS(codes.extent(1) == k.extent(1), "rq_encoder.encode", "codes.extent(1)=", codes.extent(1),
                 ", keys.extent(1)=", k.extent(1));
    run(k, centroids, codes, 0, "rq_encoder.encode");
  }

  /// As `encode`, with centroids seen as [1|heads, splits * stages, ksub, dsub].
  template <class Key, class Layout, class Accessor, RqCode Code>
    requires KvElement<std::remove_const_t<Key>>
  void encode(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys, centroids_view<float const> centroids,
              view<Code, 3> codes) const
  {
    encode(keys, as_rq_centroids(centroids, config_, "rq_encoder.encode"), codes);
  }

  /// Encodes a decode step's rows keys_new [heads, t, dim] into code rows
  /// [position, position + t) of codes [heads, capacity, splits * stages];
  /// other rows are left as they are. Appending token by token gives the
  /// codes of one `encode`.
  template <class Key, class Layout, class Accessor, RqCode Code>
    requires KvElement<std::remove_const_t<Key>>
  void append(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys_new,  // [heads, t, dim]
              rq_centroids_view<float const> centroids,                        // [1|heads, splits, stages, ksub, dsub]
              view<Code, 3> codes,                                              // [heads, capacity, splits * stages]
              index_t position) const
  {
    kv_view<std::remove_const_t<Key> const> const k{keys_new};
    PQKV_EXPECTS(position >= 0, "rq_encoder.append", "position=", position, " must be >= 0");
    PQKV_EXPECTS(position <= codes.extent(1) - k.extent(1), "rq_encoder.append", "position=", position,
                 " + keys_new.extent(1)=", k.extent(1), " exceeds codes.extent(1)=", codes.extent(1));
    run(k, centroids, codes, position, "rq_encoder.append");
  }

  /// As `append`, with centroids seen as [1|heads, splits * stages, ksub, dsub].
  template <class Key, class Layout, class Accessor, RqCode Code>
    requires KvElement<std::remove_const_t<Key>>
  void append(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys_new, centroids_view<float const> centroids,
              view<Code, 3> codes, index_t position) const
  {
    append(keys_new, as_rq_centroids(centroids, config_, "rq_encoder.append"), codes, position);
  }

 private:
  template <class Key, class Code>
  void run(kv_view<Key const> keys, rq_centroids_view<float const> centroids, view<Code, 3> codes, index_t position,
           char const* where) const
  {
    index_t const heads = keys.extent(0), tokens = keys.extent(1), dim = config_.dim;
    pqkv::detail::rq::check_code_type<Code>(config_.bits, where);
    PQKV_EXPECTS(keys.extent(2) == dim, where, "keys.extent(2)=", keys.extent(2), ", config.dim=", dim);
    PQKV_EXPECTS(codes.extent(0) == heads, where, "codes.extent(0)=", codes.extent(0), ", keys.extent(0)=", heads);
    PQKV_EXPECTS(codes.extent(2) == config_.codes_per_row(), where, "codes.extent(2)=", codes.extent(2),
                 ", config.splits * config.stages=", config_.codes_per_row());
    PQKV_EXPECTS(keys.data_handle() != nullptr || element_count(keys) == 0, where, "keys.data_handle() is null");
    PQKV_EXPECTS(codes.data_handle() != nullptr || element_count(codes) == 0, where, "codes.data_handle() is null");
    check_rq_centroids(centroids, config_, heads, where);
    pqkv::detail::rq::check_finite_rows(keys, "keys", where);
    if (heads == 0 || tokens == 0) { return; }

    index_t const splits = config_.splits, stages = config_.stages, ksub = config_.ksub(), dsub = config_.dsub();
    index_t const beam = config_.beam, chunk = 16, chunks = chunk_count(tokens, chunk);
    bool const shared = centroids.extent(0) == 1;
    parallel_for(heads * chunks, [&](index_t w) {
      index_t const h = w / chunks, t0 = (w % chunks) * chunk, hc = shared ? 0 : h;
      std::vector<float> x(static_cast<std::size_t>(dim));
      std::vector<std::int32_t> out(static_cast<std::size_t>(stages));
      pqkv::detail::rq::beam_scratch scratch;
      for (index_t t = t0; t < std::min(tokens, t0 + chunk); ++t) {
        for (index_t i = 0; i < dim; ++i) { x[static_cast<std::size_t>(i)] = to_float(keys(h, t, config_.channel(i))); }
        for (index_t s = 0; s < splits; ++s) {
          float const* cb = &centroids(hc, s, 0, 0, 0);
          if (beam == 1) {
            pqkv::detail::rq::greedy_search(x.data() + s * dsub, cb, stages, ksub, dsub, out.data());
          } else {
            pqkv::detail::rq::beam_search(x.data() + s * dsub, cb, stages, ksub, dsub, beam, scratch, out.data());
          }
          for (index_t st = 0; st < stages; ++st) {
            codes(h, position + t, s * stages + st) = static_cast<Code>(out[static_cast<std::size_t>(st)]);
          }
        }
      }
    });
  }

  rq_config config_;
};

static_assert(Encoder<rq_encoder, float>);
#if defined(PQKV_HAS_HALF)
static_assert(Encoder<rq_encoder, __half>);
#endif
#if defined(PQKV_HAS_BF16)
static_assert(Encoder<rq_encoder, __nv_bfloat16>);
#endif

}  // namespace cpu
}  // namespace pqkv
