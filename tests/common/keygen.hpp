// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Synthetic keys, values and decode queries that look like a
/// Llama-3-class model's (RoPE'd, low-rank, outlier channels, attention sinks,
/// topic clumps, planted needles), shared by tests, benchmarks and examples.
///
/// Every value is a pure function of (config, head, position) or of
/// (config, step, position) for queries, so any token range can be generated
/// on its own, in parallel, and the prefill and the tokens appended during
/// decode come from one stream. docs/synthetic_keys.md explains the model.
///
/// Attention logits are meant as `q . k / sqrt(dim)`: the query scale is set
/// so that this softmax is peaked but far from one-hot.

#include <pqkv/core/error.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/random.hpp>
#include <pqkv/core/views.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

namespace pqkv::test {

/// Shape and structure of the synthetic data. The defaults model one layer of
/// a Llama-3-8B-like model (8 KV heads, GQA 4, head dim 128). Knobs given "in
/// logits" are the extra `q . k / sqrt(dim)` a query gives the tokens that carry
/// the matching component, before RoPE decorrelates it at long distance.
struct keygen_config {
  index_t kv_heads = 8, q_per_kv = 4, dim = 128, tokens = 32768;  ///< tokens = prefill length
  std::uint64_t seed = 1;

  // ---- positions ----
  double rope_base = 500000.0;  ///< RoPE theta (Llama 3.1: 500000; Llama 2: 10000), rotate-half pairs (i, i + dim/2)
  /// Llama 3.1 frequency scaling ("rope_type": "llama3"): pairs with wavelength above
  /// original_context / low_freq_factor turn `factor` times slower, below
  /// original_context / high_freq_factor unchanged, smooth in between. factor 1: plain RoPE.
  double rope_factor = 8.0, rope_low_freq_factor = 1.0, rope_high_freq_factor = 4.0;
  double rope_original_context = 8192.0;

  // ---- keys (pre-RoPE energies are fractions of dim, i.e. mean squared value per channel) ----
  index_t rank = 24;             ///< per-head key subspace rank
  double spectrum_decay = 0.5;   ///< latent j has std proportional to (1 + j)^-decay
  double latent_energy = 0.45;   ///< E|low-rank part|^2 / dim
  double mean_energy = 0.30;     ///< |per-head mean (bias) direction|^2 / dim
  double noise = 0.30;           ///< isotropic per-channel noise std
  double semantic_low_freq = 4.0;  ///< needle/topic/sink directions weight RoPE pair i by exp(g (i/(dim/2-1) - 1))
  double latent_low_freq = 1.5;    ///< the same tilt for the low-rank basis (milder)
  index_t outlier_channels = 4;  ///< per head, pre-RoPE channels among the lower-frequency half of the pairs
  double outlier_scale = 5.0;    ///< their bias magnitude (each head's channels get 0.6x to 1.4x of it)
  double outlier_spread = 0.5;   ///< token-to-token std of an outlier channel, as a fraction of its bias

  // ---- sinks, topics, needles ----
  index_t sinks = 4;             ///< the first `sinks` tokens are attention sinks
  double sink_logit = 16.0;      ///< nominal logit boost every query gives the sinks
  index_t topic_span = 256;      ///< mean length of a topic clump (lengths vary in (0, 2 * span))
  index_t topics = 64;           ///< topic pool per head; clumps draw topics from it, so topics recur
  double topic_energy = 0.10;    ///< |topic component of a key|^2 / dim
  double topic_logit = 4.0;      ///< boost a query gives tokens of the topic it asks about
  index_t needles = 16;          ///< planted needle tokens per KV head (fewer when tokens is small)
  double needle_logit_min = 6.0, needle_logit_max = 24.0;  ///< nominal needle boosts, uniform in this range
  double needle_energy = 1.5;    ///< |needle component of the strongest needle's key|^2 / dim
  double needle_query_fraction = 0.5;  ///< fraction of decode steps whose group aims at one of its needles

  // ---- queries ----
  double logit_std = 2.5;        ///< spread of content logits over typical tokens
  double recency_logit = 2.0;    ///< boost of the per-head mean direction, which RoPE turns into a recency bias
  double group_correlation = 0.7;  ///< correlation of the content of q heads sharing a KV head
  double query_noise = 0.3;      ///< isotropic per-channel noise of queries (pre-scale)

  // ---- values ----
  index_t value_rank = 32;
  double value_mean_energy = 0.2, value_latent_energy = 0.6, value_noise = 0.4;
  double needle_value_energy = 1.0;  ///< a needle's value carries a distinctive direction of this energy / dim

  [[nodiscard]] index_t q_heads() const noexcept { return kv_heads * q_per_kv; }
  [[nodiscard]] bool operator==(keygen_config const&) const = default;

  /// Throws `pqkv::error` naming the first field out of range.
  void validate(char const* where = "keygen_config") const
  {
    PQKV_EXPECTS(kv_heads > 0 && kv_heads <= 4096, where, "kv_heads=", kv_heads, " must be in 1..4096");
    PQKV_EXPECTS(q_per_kv > 0 && q_per_kv <= 256, where, "q_per_kv=", q_per_kv, " must be in 1..256");
    PQKV_EXPECTS(dim >= 4 && dim <= 1024 && dim % 2 == 0, where, "dim=", dim, " must be even and in 4..1024");
    PQKV_EXPECTS(tokens >= 0 && tokens < (index_t{1} << 40), where, "tokens=", tokens, " must be in [0, 2^40)");
    PQKV_EXPECTS(std::isfinite(rope_base) && rope_base > 1, where, "rope_base=", rope_base, " must be > 1");
    PQKV_EXPECTS(std::isfinite(rope_factor) && rope_factor >= 1, where, "rope_factor=", rope_factor, " must be >= 1");
    PQKV_EXPECTS(rope_factor == 1 || (rope_low_freq_factor > 0 && rope_high_freq_factor > rope_low_freq_factor &&
                                      rope_original_context > 0 && std::isfinite(rope_original_context)),
                 where, "rope scaling needs 0 < rope_low_freq_factor=", rope_low_freq_factor,
                 " < rope_high_freq_factor=", rope_high_freq_factor, " and rope_original_context=",
                 rope_original_context, " > 0");
    PQKV_EXPECTS(rank >= 1 && rank <= dim, where, "rank=", rank, " must be in 1..dim=", dim);
    PQKV_EXPECTS(value_rank >= 1 && value_rank <= dim, where, "value_rank=", value_rank, " must be in 1..dim=", dim);
    PQKV_EXPECTS(outlier_channels >= 0 && outlier_channels <= dim / 2, where, "outlier_channels=", outlier_channels,
                 " must be in 0..dim/2=", dim / 2);
    PQKV_EXPECTS(sinks >= 0, where, "sinks=", sinks, " must be >= 0");
    PQKV_EXPECTS(topic_span >= 1, where, "topic_span=", topic_span, " must be >= 1");
    PQKV_EXPECTS(topics >= 1 && topics <= 65536, where, "topics=", topics, " must be in 1..65536");
    PQKV_EXPECTS(needles >= 0 && needles <= 65536, where, "needles=", needles, " must be in 0..65536");
    PQKV_EXPECTS(needle_logit_min <= needle_logit_max, where, "needle_logit_min=", needle_logit_min,
                 " exceeds needle_logit_max=", needle_logit_max);
    PQKV_EXPECTS(needle_query_fraction >= 0 && needle_query_fraction <= 1, where,
                 "needle_query_fraction=", needle_query_fraction, " must be in [0, 1]");
    PQKV_EXPECTS(group_correlation >= 0 && group_correlation <= 1, where, "group_correlation=", group_correlation,
                 " must be in [0, 1]");
    struct knob {
      char const* name;
      double value;
    };
    knob const nonneg[] = {{"spectrum_decay", spectrum_decay}, {"latent_energy", latent_energy},
                           {"mean_energy", mean_energy}, {"noise", noise}, {"outlier_scale", outlier_scale},
                           {"outlier_spread", outlier_spread}, {"sink_logit", sink_logit},
                           {"topic_energy", topic_energy}, {"topic_logit", topic_logit},
                           {"needle_energy", needle_energy}, {"needle_logit_min", needle_logit_min},
                           {"logit_std", logit_std}, {"recency_logit", recency_logit}, {"query_noise", query_noise},
                           {"value_mean_energy", value_mean_energy}, {"value_latent_energy", value_latent_energy},
                           {"value_noise", value_noise}, {"needle_value_energy", needle_value_energy},
                           {"semantic_low_freq", semantic_low_freq}, {"latent_low_freq", latent_low_freq}};
    for (knob const& k : nonneg) {
      PQKV_EXPECTS(std::isfinite(k.value) && k.value >= 0, where, k.name, "=", k.value, " must be finite and >= 0");
    }
  }
};

namespace detail {

/// Stream tags: each kind of draw has its own stream so one knob does not
/// shift the random numbers of another.
enum class kg_stream : std::uint64_t {
  basis = 1, mean, sink, topic_dir, needle_dir, needle_pos, needle_strength, outlier, value_basis, value_mean,
  needle_value, segment, latent, noise, outlier_noise, value_latent, value_noise, query_kind, query_group,
  query_latent, query_noise, query_gain, topic_ref,
};

/// The hoisted key of `random_bits(seed, stream, .)`: bits(key, c) == random_bits(seed, stream, c).
inline std::uint64_t stream_key(std::uint64_t seed, kg_stream tag, std::uint64_t sub) noexcept
{
  std::uint64_t const stream = (static_cast<std::uint64_t>(tag) << 48) ^ sub;
  return pqkv::detail::mix64(seed ^ pqkv::detail::mix64(stream));
}
inline std::uint64_t bits(std::uint64_t key, std::uint64_t counter) noexcept
{
  return pqkv::detail::mix64(key + counter);
}
inline double unit(std::uint64_t key, std::uint64_t counter) noexcept
{
  return static_cast<double>(bits(key, counter) >> 11) * 0x1.0p-53;
}
/// Approximately standard normal: the sum of four 16-bit uniforms (Irwin-Hall),
/// one 64-bit draw, bounded at +-3.46 sigma. Cheap enough for 10^8 draws.
inline float gauss(std::uint64_t key, std::uint64_t counter) noexcept
{
  std::uint64_t const b = bits(key, counter);
  auto const s = static_cast<std::int64_t>((b & 0xFFFF) + ((b >> 16) & 0xFFFF) + ((b >> 32) & 0xFFFF) + (b >> 48));
  return static_cast<float>(static_cast<double>(s - 131070) * (1.0 / 37837.726));
}

/// Node values of an interpolated inverse normal CDF: node j (1..4095) is the
/// j/4096 quantile, the end nodes are the 0.25/4096 quantiles (so the law is
/// symmetric and bounded at about 3.7 sigma), and all are rescaled so the law
/// has unit variance.
inline std::array<float, 4097> const& normal_nodes()
{
  static std::array<float, 4097> const nodes = [] {
    std::array<double, 4097> x{};
    double const rsqrt2 = 0.70710678118654752440, rsqrt2pi = 0.39894228040143267794;
    for (int j = 0; j <= 2048; ++j) {
      double const p = j == 0 ? 0.25 / 4096 : j / 4096.0;
      double z = 4.91 * (std::pow(p, 0.14) - std::pow(1 - p, 0.14));  // Tukey-lambda start, then Newton
      for (int it = 0; it < 8; ++it) {
        z -= (0.5 * std::erfc(-z * rsqrt2) - p) / (rsqrt2pi * std::exp(-0.5 * z * z));
      }
      x[static_cast<std::size_t>(j)] = j == 2048 ? 0.0 : z;
      x[static_cast<std::size_t>(4096 - j)] = j == 2048 ? 0.0 : -z;
    }
    // Each cell is uniform between its nodes a, b: E[v^2] = (a^2 + a b + b^2) / 3.
    double var = 0;
    for (std::size_t j = 0; j < 4096; ++j) { var += (x[j] * x[j] + x[j] * x[j + 1] + x[j + 1] * x[j + 1]) / 3; }
    double const s = 1.0 / std::sqrt(var / 4096);
    std::array<float, 4097> out{};
    for (std::size_t j = 0; j <= 4096; ++j) { out[j] = static_cast<float>(x[j] * s); }
    return out;
  }();
  return nodes;
}

/// n standard normal values (quantized to 2^16 levels) from ceil(n / 4) draws
/// at counters first, first + 1, ...: each 16-bit lane picks a cell of the
/// inverse CDF by its top 12 bits and a point in it by the low 4.
inline void gauss_fill(std::uint64_t key, std::uint64_t first, index_t n, float* out) noexcept
{
  auto const& t = normal_nodes();
  for (index_t i = 0; i < n; i += 4) {
    std::uint64_t b = bits(key, first + static_cast<std::uint64_t>(i / 4));
    for (index_t l = 0; l < 4 && i + l < n; ++l, b >>= 16) {
      auto const c = static_cast<std::size_t>((b & 0xFFFF) >> 4);
      float const f = (static_cast<float>(b & 15) + 0.5f) * (1.f / 16);
      out[i + l] = t[c] + f * (t[c + 1] - t[c]);
    }
  }
}

/// Per-channel weights exp(g (x - 1)), x = i / (dim/2 - 1) for pre-RoPE channel
/// c in pair i = c mod dim/2 (rotate-half pairs run from the highest frequency,
/// i = 0, to the lowest), zero on the channels of `masked` pairs.
inline std::vector<double> tilt_weights(index_t dim, double g, std::vector<index_t> const& masked = {})
{
  index_t const half = dim / 2;
  std::vector<double> w(static_cast<std::size_t>(dim));
  for (index_t c = 0; c < dim; ++c) {
    double const x = static_cast<double>(c % half) / static_cast<double>(std::max<index_t>(half - 1, 1));
    w[static_cast<std::size_t>(c)] = std::exp(g * (x - 1.0));
  }
  for (index_t c : masked) {
    w[static_cast<std::size_t>(c % half)] = 0.0;
    w[static_cast<std::size_t>(c % half + half)] = 0.0;
  }
  return w;
}

/// A random direction with channel weights `w`, scaled to norm `norm`.
inline void tilted_direction(std::uint64_t key, std::uint64_t first, std::vector<double> const& w, double norm,
                             float* out)
{
  auto const dim = static_cast<index_t>(w.size());
  double ss = 0;
  std::vector<double> v(w.size());
  for (std::size_t c = 0; c < w.size(); ++c) {
    v[c] = gauss(key, first + c) * w[c];
    ss += v[c] * v[c];
  }
  double const s = ss > 0 ? norm / std::sqrt(ss) : 0.0;
  for (index_t c = 0; c < dim; ++c) { out[c] = static_cast<float>(v[static_cast<std::size_t>(c)] * s); }
}

/// Orthonormal rows (Gram-Schmidt in double) of `rows` random vectors with
/// channel weights `w`, row j scaled by lambda_j = (1 + j)^-decay, normalized
/// so sum lambda_j^2 = energy. Rows past the weights' support come out zero.
inline std::vector<float> scaled_basis(std::uint64_t key, index_t rows, std::vector<double> const& w, double decay,
                                       double energy)
{
  auto const dim = static_cast<index_t>(w.size());
  std::vector<double> b(static_cast<std::size_t>(rows * dim));
  for (index_t j = 0; j < rows; ++j) {
    double* r = b.data() + j * dim;
    for (int attempt = 0;; ++attempt) {
      for (index_t c = 0; c < dim; ++c) {
        r[c] = gauss(key, static_cast<std::uint64_t>(((j * 16 + attempt) * dim) + c)) * w[static_cast<std::size_t>(c)];
      }
      for (index_t i = 0; i < j; ++i) {
        double const* q = b.data() + i * dim;
        double d = 0;
        for (index_t c = 0; c < dim; ++c) { d += r[c] * q[c]; }
        for (index_t c = 0; c < dim; ++c) { r[c] -= d * q[c]; }
      }
      double ss = 0;
      for (index_t c = 0; c < dim; ++c) { ss += r[c] * r[c]; }
      if (ss > 1e-12 || attempt == 15) {
        double const s = ss > 1e-12 ? 1.0 / std::sqrt(ss) : 0.0;
        for (index_t c = 0; c < dim; ++c) { r[c] *= s; }
        break;
      }
    }
  }
  double lsum = 0;
  for (index_t j = 0; j < rows; ++j) { lsum += std::pow(1.0 + static_cast<double>(j), -2.0 * decay); }
  std::vector<float> out(b.size());
  for (index_t j = 0; j < rows; ++j) {
    double const lam = std::sqrt(energy / lsum) * std::pow(1.0 + static_cast<double>(j), -decay);
    for (index_t c = 0; c < dim; ++c) {
      out[static_cast<std::size_t>(j * dim + c)] = static_cast<float>(b[static_cast<std::size_t>(j * dim + c)] * lam);
    }
  }
  return out;
}

/// Removes from x [dim] its components along the `rows` rows of `basis` (one at a time).
inline void orthogonalize(float* x, index_t dim, float const* basis, index_t rows)
{
  for (index_t j = 0; j < rows; ++j) {
    float const* b = basis + j * dim;
    double xb = 0, bb = 0;
    for (index_t c = 0; c < dim; ++c) {
      xb += double{x[c]} * b[c];
      bb += double{b[c]} * b[c];
    }
    if (bb <= 0) { continue; }
    double const f = xb / bb;
    for (index_t c = 0; c < dim; ++c) { x[c] = static_cast<float>(x[c] - f * b[c]); }
  }
}
inline void normalize(float* x, index_t dim)
{
  double ss = 0;
  for (index_t c = 0; c < dim; ++c) { ss += double{x[c]} * x[c]; }
  double const s = ss > 0 ? 1.0 / std::sqrt(ss) : 0.0;
  for (index_t c = 0; c < dim; ++c) { x[c] = static_cast<float>(x[c] * s); }
}

/// Everything about one KV head that does not depend on the token.
struct kg_head {
  std::vector<float> basis;        // [rank, dim]  lambda-scaled orthonormal rows
  std::vector<float> mean;         // [dim]
  std::vector<float> sink;         // [dim] unit
  std::vector<float> topic_dirs;   // [topics, dim] unit
  std::vector<index_t> needle_pos;     // sorted
  std::vector<float> needle_frac;      // strength / strongest, in (0, 1]
  std::vector<float> needle_dirs;      // [needles, dim] unit
  std::vector<index_t> outliers;       // pre-RoPE channels, sorted
  std::vector<float> outlier_bias;     // [outliers]
  std::vector<float> value_basis;  // [value_rank, dim]
  std::vector<float> value_mean;   // [dim]
  std::vector<float> needle_values;  // [needles, dim]
};

struct kg_model {
  keygen_config cfg;
  std::vector<double> inv_freq;  // [dim/2] theta_i = base^(-2i/dim)
  std::vector<kg_head> heads;
};

/// Stratified needle positions in [sinks, tokens): needle j lies in the j-th of
/// `count` equal strata, so they spread over the whole context.
inline std::vector<index_t> make_needle_positions(keygen_config const& cfg, index_t h)
{
  index_t const lo = std::min(cfg.sinks, cfg.tokens);
  index_t const span = cfg.tokens - lo;
  index_t const count = std::min(cfg.needles, span);
  std::vector<index_t> pos(static_cast<std::size_t>(count));
  std::uint64_t const key = stream_key(cfg.seed, kg_stream::needle_pos, static_cast<std::uint64_t>(h));
  for (index_t j = 0; j < count; ++j) {
    index_t const a = lo + span * j / count, b = lo + span * (j + 1) / count;
    pos[static_cast<std::size_t>(j)] =
        a + static_cast<index_t>(pqkv::detail::mix64(key + static_cast<std::uint64_t>(j)) % static_cast<std::uint64_t>(b - a));
  }
  return pos;
}

inline std::shared_ptr<kg_model const> build_model(keygen_config const& cfg)
{
  auto m = std::make_shared<kg_model>();
  m->cfg = cfg;
  index_t const d = cfg.dim, half = d / 2;
  m->inv_freq.resize(static_cast<std::size_t>(half));
  for (index_t i = 0; i < half; ++i) {
    double f = std::pow(cfg.rope_base, -2.0 * static_cast<double>(i) / static_cast<double>(d));
    if (cfg.rope_factor != 1.0) {  // Llama 3.1's rule, as its reference code states it
      double const wavelen = 2.0 * 3.14159265358979323846 / f;
      double const low_wavelen = cfg.rope_original_context / cfg.rope_low_freq_factor;
      double const high_wavelen = cfg.rope_original_context / cfg.rope_high_freq_factor;
      if (wavelen > low_wavelen) {
        f /= cfg.rope_factor;
      } else if (wavelen >= high_wavelen) {
        double const smooth = (cfg.rope_original_context / wavelen - cfg.rope_low_freq_factor) /
                              (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor);
        f = (1.0 - smooth) * f / cfg.rope_factor + smooth * f;
      }
    }
    m->inv_freq[static_cast<std::size_t>(i)] = f;
  }
  auto const dd = static_cast<double>(d);
  m->heads.resize(static_cast<std::size_t>(cfg.kv_heads));
  for (index_t h = 0; h < cfg.kv_heads; ++h) {
    auto& H = m->heads[static_cast<std::size_t>(h)];
    auto const uh = static_cast<std::uint64_t>(h);
    auto key = [&](kg_stream t) { return stream_key(cfg.seed, t, uh); };
    // Outliers: distinct channels whose pairs are in the lower-frequency half,
    // where real models show them; either member of the pair.
    std::uint64_t const ok = key(kg_stream::outlier);
    index_t const cand = half - half / 2;
    std::vector<index_t> pool(static_cast<std::size_t>(cand));
    for (index_t i = 0; i < cand; ++i) { pool[static_cast<std::size_t>(i)] = half / 2 + i; }
    for (index_t j = 0; j < std::min(cfg.outlier_channels, cand); ++j) {  // partial Fisher-Yates
      auto const r = j + static_cast<index_t>(bits(ok, static_cast<std::uint64_t>(j)) %
                                              static_cast<std::uint64_t>(cand - j));
      std::swap(pool[static_cast<std::size_t>(j)], pool[static_cast<std::size_t>(r)]);
      index_t const pair = pool[static_cast<std::size_t>(j)];
      H.outliers.push_back(pair + ((bits(ok, 1000 + static_cast<std::uint64_t>(j)) & 1) ? half : 0));
    }
    for (index_t j = cand; j < cfg.outlier_channels; ++j) {  // more than cand: the partners of chosen ones
      index_t const c = H.outliers[static_cast<std::size_t>(j - cand)];
      H.outliers.push_back(c < half ? c + half : c - half);
    }
    std::sort(H.outliers.begin(), H.outliers.end());
    for (std::size_t j = 0; j < H.outliers.size(); ++j) {
      double const mag = cfg.outlier_scale * (0.6 + 0.8 * unit(ok, 2000 + j));
      H.outlier_bias.push_back(static_cast<float>((bits(ok, 3000 + j) & 1) ? mag : -mag));
    }
    // Semantic directions avoid the outlier pairs: the outliers are a large,
    // nearly constant offset that queries do not read content from.
    auto const w_latent = tilt_weights(d, cfg.latent_low_freq, H.outliers);
    auto const w_semantic = tilt_weights(d, cfg.semantic_low_freq, H.outliers);
    auto const w_sink = tilt_weights(d, 2.0 * cfg.semantic_low_freq, H.outliers);
    auto const w_flat = tilt_weights(d, 0.0);
    H.basis = scaled_basis(key(kg_stream::basis), cfg.rank, w_latent, cfg.spectrum_decay, cfg.latent_energy * dd);
    H.mean.resize(static_cast<std::size_t>(d));
    // Flat: the mean spans all frequencies, so RoPE turns q . mean into a recency bias.
    tilted_direction(key(kg_stream::mean), 0, w_flat, std::sqrt(cfg.mean_energy * dd), H.mean.data());
    H.sink.resize(static_cast<std::size_t>(d));
    tilted_direction(key(kg_stream::sink), 0, w_sink, 1.0, H.sink.data());
    // Ordinary keys barely vary along the sink direction, so the sink component
    // of a query lifts the sinks without adding noise to every other logit.
    orthogonalize(H.sink.data(), d, H.basis.data(), cfg.rank);
    normalize(H.sink.data(), d);
    H.topic_dirs.resize(static_cast<std::size_t>(cfg.topics * d));
    for (index_t t = 0; t < cfg.topics; ++t) {
      tilted_direction(key(kg_stream::topic_dir), static_cast<std::uint64_t>(t * d), w_semantic, 1.0,
                       H.topic_dirs.data() + t * d);
    }
    H.needle_pos = make_needle_positions(cfg, h);
    auto const nn = static_cast<index_t>(H.needle_pos.size());
    H.needle_frac.resize(static_cast<std::size_t>(nn));
    H.needle_dirs.resize(static_cast<std::size_t>(nn * d));
    H.needle_values.resize(static_cast<std::size_t>(nn * d));
    for (index_t j = 0; j < nn; ++j) {
      double const u = unit(key(kg_stream::needle_strength), static_cast<std::uint64_t>(j));
      double const logit = cfg.needle_logit_min + u * (cfg.needle_logit_max - cfg.needle_logit_min);
      H.needle_frac[static_cast<std::size_t>(j)] =
          cfg.needle_logit_max > 0 ? static_cast<float>(logit / cfg.needle_logit_max) : 0.f;
      float* nd = H.needle_dirs.data() + j * d;
      tilted_direction(key(kg_stream::needle_dir), static_cast<std::uint64_t>(j * d), w_semantic, 1.0, nd);
      // A needle is a distinctive token: its direction is one that ordinary keys
      // barely vary along (outside the latent subspace, the mean and the sink).
      orthogonalize(nd, d, H.basis.data(), cfg.rank);
      orthogonalize(nd, d, H.mean.data(), 1);
      orthogonalize(nd, d, H.sink.data(), 1);
      normalize(nd, d);
      tilted_direction(key(kg_stream::needle_value), static_cast<std::uint64_t>(j * d), w_flat,
                       std::sqrt(cfg.needle_value_energy * dd), H.needle_values.data() + j * d);
    }
    H.value_basis = scaled_basis(key(kg_stream::value_basis), cfg.value_rank, w_flat, cfg.spectrum_decay,
                                 cfg.value_latent_energy * dd);
    H.value_mean.resize(static_cast<std::size_t>(d));
    tilted_direction(key(kg_stream::value_mean), 0, w_flat, std::sqrt(cfg.value_mean_energy * dd),
                     H.value_mean.data());
  }
  return m;
}

/// The model of `cfg`, built once and shared by the calls that follow with the
/// same config (decode loops call the fill functions once per token).
inline std::shared_ptr<kg_model const> model_for(keygen_config const& cfg)
{
  static std::mutex mutex;
  static std::shared_ptr<kg_model const> last;
  {
    std::lock_guard lock{mutex};
    if (last && last->cfg == cfg) { return last; }
  }
  auto m = build_model(cfg);
  std::lock_guard lock{mutex};
  last = m;
  return m;
}

/// cos / sin of position * theta_i for the dim/2 pairs.
inline void rope_table(kg_model const& m, index_t position, float* cs, float* sn)
{
  auto const half = static_cast<index_t>(m.inv_freq.size());
  for (index_t i = 0; i < half; ++i) {
    double const a = static_cast<double>(position) * m.inv_freq[static_cast<std::size_t>(i)];
    cs[i] = static_cast<float>(std::cos(a));
    sn[i] = static_cast<float>(std::sin(a));
  }
}

/// Rotate-half RoPE in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) for pair i = (i, i + dim/2).
inline void rope_apply(index_t dim, float const* cs, float const* sn, float* x)
{
  index_t const half = dim / 2;
  for (index_t i = 0; i < half; ++i) {
    float const a = x[i], b = x[i + half];
    x[i] = a * cs[i] - b * sn[i];
    x[i + half] = b * cs[i] + a * sn[i];
  }
}

/// Topic clump of `position`: clump j nominally starts at j * span plus a
/// random offset in [0, span), so lengths vary; clumps share topics across heads
/// (they are the text's topics) and draw them from the pool, so topics recur.
inline index_t topic_of(keygen_config const& cfg, index_t position)
{
  std::uint64_t const key = stream_key(cfg.seed, kg_stream::segment, 0);
  index_t j = position / cfg.topic_span;
  auto const start = [&](index_t s) {
    return s * cfg.topic_span + static_cast<index_t>(bits(key, 2 * static_cast<std::uint64_t>(s)) %
                                                     static_cast<std::uint64_t>(cfg.topic_span));
  };
  if (j > 0 && position < start(j)) { --j; }
  return static_cast<index_t>(bits(key, 2 * static_cast<std::uint64_t>(j) + 1) % static_cast<std::uint64_t>(cfg.topics));
}

/// Index of `position` in head h's needles, or -1.
inline index_t needle_index(kg_head const& H, index_t position)
{
  auto const it = std::lower_bound(H.needle_pos.begin(), H.needle_pos.end(), position);
  return (it != H.needle_pos.end() && *it == position) ? static_cast<index_t>(it - H.needle_pos.begin()) : -1;
}

/// out[c] = mean[c] + noise * out[c] + s1 * a1[c] + s2 * a2[c] + sum_j z[j] * basis[j, c]
/// (out holds standard normals on entry). `Dim` > 0 fixes the row length at
/// compile time so the row stays in registers and vectorizes at any -O level;
/// Dim = 0 takes it from `dim`. Each channel is summed in the same order on
/// every call, so a row's bits do not depend on the range it is made in.
template <index_t Dim>
void combine_row(index_t dim, float const* mean, float noise, float s1, float const* a1, float s2, float const* a2,
                 index_t rank, float const* z, float const* basis, float* out) noexcept
{
  index_t const d = Dim > 0 ? Dim : dim;
  constexpr index_t cap = Dim > 0 ? Dim : 1024;  // dim <= 1024 (keygen_config::validate)
  float acc[cap];
  for (index_t c = 0; c < d; ++c) { acc[c] = mean[c] + noise * out[c] + s1 * a1[c] + s2 * a2[c]; }
  for (index_t j = 0; j < rank; ++j) {
    float const zj = z[j];
    float const* b = basis + j * d;
    for (index_t c = 0; c < d; ++c) { acc[c] += zj * b[c]; }
  }
  for (index_t c = 0; c < d; ++c) { out[c] = acc[c]; }
}

inline void combine_row(index_t dim, float const* mean, float noise, float s1, float const* a1, float s2,
                        float const* a2, index_t rank, float const* z, float const* basis, float* out) noexcept
{
  switch (dim) {  // the head sizes of common models
    case 64: combine_row<64>(dim, mean, noise, s1, a1, s2, a2, rank, z, basis, out); return;
    case 128: combine_row<128>(dim, mean, noise, s1, a1, s2, a2, rank, z, basis, out); return;
    case 256: combine_row<256>(dim, mean, noise, s1, a1, s2, a2, rank, z, basis, out); return;
    default: combine_row<0>(dim, mean, noise, s1, a1, s2, a2, rank, z, basis, out);
  }
}

/// Key of (h, p): pre-RoPE mean + low-rank latent + topic (or sink) + needle +
/// noise + outliers, then rotated at p. `z` is scratch of `rank` floats.
inline void key_row(kg_model const& m, index_t h, index_t p, float const* cs, float const* sn, float* out, float* z)
{
  auto const& cfg = m.cfg;
  auto const& H = m.heads[static_cast<std::size_t>(h)];
  index_t const d = cfg.dim;
  auto const dd = static_cast<double>(d);
  auto const uh = static_cast<std::uint64_t>(h), row = static_cast<std::uint64_t>(p) << 8;
  gauss_fill(stream_key(cfg.seed, kg_stream::latent, uh), row, cfg.rank, z);
  gauss_fill(stream_key(cfg.seed, kg_stream::noise, uh), row, d, out);
  bool const sink = p < cfg.sinks;
  if (sink) {  // a sink token's key is mostly its sink direction, with a little ordinary content
    for (index_t j = 0; j < cfg.rank; ++j) { z[j] *= 0.3f; }
  }
  // Sink keys have norm sqrt(d) along the sink direction, so a query's unit sink component gives sink_logit.
  float const* a1 = sink ? H.sink.data() : H.topic_dirs.data() + topic_of(cfg, p) * d;
  auto const s1 = static_cast<float>(sink ? std::sqrt(dd) : std::sqrt(cfg.topic_energy * dd));
  float const* a2 = a1;
  float s2 = 0.f;
  if (index_t const n = needle_index(H, p); n >= 0) {
    a2 = H.needle_dirs.data() + n * d;
    s2 = static_cast<float>(std::sqrt(cfg.needle_energy * dd)) * H.needle_frac[static_cast<std::size_t>(n)];
  }
  combine_row(d, H.mean.data(), static_cast<float>(cfg.noise), s1, a1, s2, a2, cfg.rank, z, H.basis.data(), out);
  if (!H.outliers.empty()) {
    auto const no = static_cast<index_t>(H.outliers.size());
    std::array<float, 512> g;  // outlier_channels <= dim / 2 <= 512
    auto const spread = static_cast<float>(cfg.outlier_spread);
    gauss_fill(stream_key(cfg.seed, kg_stream::outlier_noise, uh), row, no, g.data());
    for (index_t j = 0; j < no; ++j) {
      float const bias = H.outlier_bias[static_cast<std::size_t>(j)];
      out[H.outliers[static_cast<std::size_t>(j)]] += bias + spread * std::abs(bias) * g[static_cast<std::size_t>(j)];
    }
  }
  rope_apply(d, cs, sn, out);
}

/// Value of (h, p): mean + low-rank latent + noise (+ the needle's value
/// direction); independent of the key but for needles. `y` is scratch of
/// `value_rank` floats.
inline void value_row(kg_model const& m, index_t h, index_t p, float* out, float* y)
{
  auto const& cfg = m.cfg;
  auto const& H = m.heads[static_cast<std::size_t>(h)];
  index_t const d = cfg.dim;
  auto const uh = static_cast<std::uint64_t>(h), row = static_cast<std::uint64_t>(p) << 8;
  gauss_fill(stream_key(cfg.seed, kg_stream::value_latent, uh), row, cfg.value_rank, y);
  gauss_fill(stream_key(cfg.seed, kg_stream::value_noise, uh), row, d, out);
  float const* a1 = H.value_mean.data();
  float s1 = 0.f;
  if (index_t const n = needle_index(H, p); n >= 0) {
    a1 = H.needle_values.data() + n * d;
    s1 = 1.f;
  }
  combine_row(d, H.value_mean.data(), static_cast<float>(cfg.value_noise), s1, a1, 0.f, a1, cfg.value_rank, y,
              H.value_basis.data(), out);
}

template <class Row>
void fill_rows(char const* where, keygen_config const& cfg, index_t first, pqkv::view<float, 3> out, bool rope,
               Row&& row)
{
  cfg.validate(where);
  PQKV_EXPECTS(first >= 0, where, "first=", first, " must be >= 0");
  PQKV_EXPECTS(out.extent(0) == cfg.kv_heads, where, "out.extent(0)=", out.extent(0), ", config.kv_heads=",
               cfg.kv_heads);
  PQKV_EXPECTS(out.extent(2) == cfg.dim, where, "out.extent(2)=", out.extent(2), ", config.dim=", cfg.dim);
  index_t const count = out.extent(1);
  PQKV_EXPECTS(first <= (index_t{1} << 40) - count, where, "first=", first, " + count=", count,
               " exceeds 2^40 positions");
  if (count == 0) { return; }
  PQKV_EXPECTS(out.data_handle() != nullptr, where, "out.data_handle() is null for ", element_count(out),
               " elements");
  auto const model = model_for(cfg);
  auto const& m = *model;
  index_t const d = cfg.dim, heads = cfg.kv_heads;
  constexpr index_t chunk = 256;
  float* const base = out.data_handle();
  cpu::parallel_for(cpu::chunk_count(count, chunk), [&](index_t ci) {
    std::vector<float> cs(static_cast<std::size_t>(d / 2)), sn(static_cast<std::size_t>(d / 2));
    std::vector<float> scratch(static_cast<std::size_t>(d));
    index_t const t1 = std::min(count, (ci + 1) * chunk);
    for (index_t t = ci * chunk; t < t1; ++t) {
      index_t const p = first + t;
      if (rope) { rope_table(m, p, cs.data(), sn.data()); }
      for (index_t h = 0; h < heads; ++h) {
        row(m, h, p, cs.data(), sn.data(), base + (h * count + t) * d, scratch.data());
      }
    }
  });
}

}  // namespace detail

/// Applies rotate-half RoPE at `position` to `x` (dim values) in place, with the
/// config's frequencies (base and Llama 3.1 scaling) and the same float
/// arithmetic as the keys; a negative position undoes the rotation at -position.
inline void apply_rope(keygen_config const& cfg, index_t position, std::span<float> x)
{
  cfg.validate("apply_rope");
  PQKV_EXPECTS(static_cast<index_t>(x.size()) == cfg.dim, "apply_rope", "x.size()=", x.size(), ", config.dim=",
               cfg.dim);
  auto const m = detail::model_for(cfg);
  std::vector<float> cs(static_cast<std::size_t>(cfg.dim / 2)), sn(cs.size());
  detail::rope_table(*m, position, cs.data(), sn.data());
  detail::rope_apply(cfg.dim, cs.data(), sn.data(), x.data());
}

/// Keys [kv_heads, count, dim] for token positions [first, first + count), RoPE'd
/// at their positions: a pure function of (config, head, position), so the
/// prefill and tokens appended during decode come from one stream, and any
/// split of a range gives the same bits.
inline void make_keys(keygen_config const& cfg, index_t first, pqkv::view<float, 3> out)  // [kv_heads, count, dim]
{
  detail::fill_rows("make_keys", cfg, first, out, true,
                    [](detail::kg_model const& m, index_t h, index_t p, float const* cs, float const* sn, float* row,
                       float* z) { detail::key_row(m, h, p, cs, sn, row, z); });
}

/// Values [kv_heads, count, dim] for positions [first, first + count) (no RoPE).
inline void make_values(keygen_config const& cfg, index_t first, pqkv::view<float, 3> out)  // [kv_heads, count, dim]
{
  detail::fill_rows("make_values", cfg, first, out, false,
                    [](detail::kg_model const& m, index_t h, index_t p, float const*, float const*, float* row,
                       float* y) { detail::value_row(m, h, p, row, y); });
}

/// Sorted positions (< tokens, >= sinks) of kv head `h`'s planted needle tokens;
/// min(needles, tokens - sinks) of them, one in each equal stratum of the context.
inline std::vector<index_t> needle_positions(keygen_config const& cfg, index_t h)
{
  cfg.validate("needle_positions");
  PQKV_EXPECTS(h >= 0 && h < cfg.kv_heads, "needle_positions", "h=", h, " is outside [0, kv_heads=", cfg.kv_heads,
               ")");
  return detail::make_needle_positions(cfg, h);
}

/// Pre-RoPE channels of kv head `h` that carry outliers (sorted). After RoPE an
/// outlier in channel c spreads over its pair (c mod dim/2, c mod dim/2 + dim/2).
inline std::vector<index_t> outlier_channels(keygen_config const& cfg, index_t h)
{
  cfg.validate("outlier_channels");
  PQKV_EXPECTS(h >= 0 && h < cfg.kv_heads, "outlier_channels", "h=", h, " is outside [0, kv_heads=",
               cfg.kv_heads, ")");
  return detail::model_for(cfg)->heads[static_cast<std::size_t>(h)].outliers;
}

/// The needle position that the queries of kv head `h`'s group aim at in decode
/// step `step` issued at `position`, or -1 for an ordinary step. Only needles
/// before `position` are aimed at.
inline index_t query_target(keygen_config const& cfg, index_t step, index_t position, index_t h)
{
  cfg.validate("query_target");
  PQKV_EXPECTS(step >= 0 && step < (index_t{1} << 40), "query_target", "step=", step, " must be in [0, 2^40)");
  PQKV_EXPECTS(position >= 0, "query_target", "position=", position, " must be >= 0");
  PQKV_EXPECTS(h >= 0 && h < cfg.kv_heads, "query_target", "h=", h, " is outside [0, kv_heads=", cfg.kv_heads, ")");
  auto const m = detail::model_for(cfg);
  auto const& pos = m->heads[static_cast<std::size_t>(h)].needle_pos;
  auto const avail = static_cast<std::uint64_t>(std::lower_bound(pos.begin(), pos.end(), position) - pos.begin());
  std::uint64_t const key = detail::stream_key(cfg.seed, detail::kg_stream::query_kind, static_cast<std::uint64_t>(h));
  auto const us = static_cast<std::uint64_t>(step);
  if (avail == 0 || detail::unit(key, 2 * us) >= cfg.needle_query_fraction) { return -1; }
  return pos[static_cast<std::size_t>(detail::bits(key, 2 * us + 1) % avail)];
}

/// Queries [q_heads, dim] for decode step `step` issued at `position` (RoPE'd
/// there). q head g * q_per_kv + j reads kv head g. The heads of a group share a
/// content component (correlation `group_correlation`), a topic and, for a
/// `needle_query_fraction` of steps, a needle they aim at (`query_target`); every
/// query has a sink component and the recency (mean) component.
inline void make_queries(keygen_config const& cfg, index_t step, index_t position,
                         pqkv::view<float, 2> out)  // [q_heads, dim]
{
  char const* where = "make_queries";
  cfg.validate(where);
  PQKV_EXPECTS(step >= 0 && step < (index_t{1} << 40), where, "step=", step, " must be in [0, 2^40)");
  PQKV_EXPECTS(position >= 0 && position < (index_t{1} << 40), where, "position=", position,
               " must be in [0, 2^40)");
  PQKV_EXPECTS(out.extent(0) == cfg.q_heads(), where, "out.extent(0)=", out.extent(0), ", config.q_heads()=",
               cfg.q_heads());
  PQKV_EXPECTS(out.extent(1) == cfg.dim, where, "out.extent(1)=", out.extent(1), ", config.dim=", cfg.dim);
  PQKV_EXPECTS(out.data_handle() != nullptr, where, "out.data_handle() is null");
  auto const model = detail::model_for(cfg);
  auto const& m = *model;
  index_t const d = cfg.dim;
  auto const dd = static_cast<double>(d), sd = std::sqrt(dd);
  auto const us = static_cast<std::uint64_t>(step);
  std::vector<float> cs(static_cast<std::size_t>(d / 2)), sn(cs.size());
  detail::rope_table(m, position, cs.data(), sn.data());
  std::vector<double> zg(static_cast<std::size_t>(cfg.rank)), z(zg.size()), q(static_cast<std::size_t>(d));
  for (index_t g = 0; g < cfg.kv_heads; ++g) {
    auto const& H = m.heads[static_cast<std::size_t>(g)];
    auto const ug = static_cast<std::uint64_t>(g);
    std::uint64_t const grp = detail::stream_key(cfg.seed, detail::kg_stream::query_group, ug);
    std::uint64_t const tref = detail::stream_key(cfg.seed, detail::kg_stream::topic_ref, ug);
    for (index_t r = 0; r < cfg.rank; ++r) {
      zg[static_cast<std::size_t>(r)] = detail::gauss(grp, (us << 11) + static_cast<std::uint64_t>(r));
    }
    // The topic asked about is that of an earlier token, so it is one the context has.
    index_t const horizon = std::max<index_t>(1, std::min(position, cfg.tokens));
    index_t const topic =
        detail::topic_of(cfg, static_cast<index_t>(detail::bits(tref, us) % static_cast<std::uint64_t>(horizon)));
    index_t const target = query_target(cfg, step, position, g);
    index_t const needle = target >= 0 ? detail::needle_index(H, target) : -1;
    double const rho = cfg.group_correlation, rho_c = std::sqrt(std::max(0.0, 1.0 - rho * rho));
    for (index_t j = 0; j < cfg.q_per_kv; ++j) {
      index_t const qh = g * cfg.q_per_kv + j;
      auto const uq = static_cast<std::uint64_t>(qh);
      std::uint64_t const lat = detail::stream_key(cfg.seed, detail::kg_stream::query_latent, uq);
      std::uint64_t const nz = detail::stream_key(cfg.seed, detail::kg_stream::query_noise, uq);
      std::uint64_t const gain = detail::stream_key(cfg.seed, detail::kg_stream::query_gain, uq);
      std::uint64_t const ctr = us << 11;
      // Content: a direction in the head's key subspace. Its logit against a
      // token with latent x is sum_r lambda_r^2 z_r x_r / sqrt(d); scaled so its
      // spread over typical tokens is logit_std.
      double var = 0;
      for (index_t r = 0; r < cfg.rank; ++r) {
        z[static_cast<std::size_t>(r)] = rho * zg[static_cast<std::size_t>(r)] +
                                         rho_c * detail::gauss(lat, ctr + static_cast<std::uint64_t>(r));
      }
      std::fill(q.begin(), q.end(), 0.0);
      for (index_t r = 0; r < cfg.rank; ++r) {
        float const* b = H.basis.data() + r * d;
        double l2 = 0;
        for (index_t c = 0; c < d; ++c) { l2 += double{b[c]} * b[c]; }
        var += l2 * l2 * z[static_cast<std::size_t>(r)] * z[static_cast<std::size_t>(r)];
        for (index_t c = 0; c < d; ++c) { q[static_cast<std::size_t>(c)] += z[static_cast<std::size_t>(r)] * b[c]; }
      }
      double const content = var > 0 ? cfg.logit_std * sd / std::sqrt(var) : 0.0;
      for (auto& v : q) { v *= content; }
      // Per-head gains in [0.75, 1.25): heads of a group weigh the shared parts differently.
      auto head_gain = [&](std::uint64_t k) { return 0.75 + 0.5 * detail::unit(gain, (us << 3) + k); };
      auto add = [&](float const* dir, double scale) {
        for (index_t c = 0; c < d; ++c) { q[static_cast<std::size_t>(c)] += scale * dir[c]; }
      };
      // Each boost is the logit it gives a token carrying the unit component of
      // the matching key norm: key norms are sqrt(energy * d), logit = q.k / sqrt(d).
      add(H.sink.data(), cfg.sink_logit * head_gain(0));  // sink key norm sqrt(d): boost = sink_logit
      if (cfg.topic_energy > 0) {
        add(H.topic_dirs.data() + topic * d, cfg.topic_logit * head_gain(1) / std::sqrt(cfg.topic_energy));
      }
      if (cfg.mean_energy > 0) {
        add(H.mean.data(), cfg.recency_logit * head_gain(2) / (cfg.mean_energy * sd));
      }
      if (needle >= 0 && cfg.needle_energy > 0) {
        add(H.needle_dirs.data() + needle * d, cfg.needle_logit_max * head_gain(3) / std::sqrt(cfg.needle_energy));
      }
      float* row = &out(qh, 0);
      for (index_t c = 0; c < d; ++c) {
        row[c] = static_cast<float>(q[static_cast<std::size_t>(c)] +
                                    cfg.query_noise * detail::gauss(nz, ctr + static_cast<std::uint64_t>(c)));
      }
      detail::rope_apply(d, cs.data(), sn.data(), row);
    }
  }
}

/// Keys and values [kv_heads, tokens, dim] of positions [0, tokens).
struct synthetic_kv {
  pqkv::host_tensor<float, 3> keys, values;
};

/// Keys and values of the whole prefill, positions [0, config.tokens).
inline synthetic_kv make_kv(keygen_config const& cfg)
{
  cfg.validate("make_kv");
  synthetic_kv kv{pqkv::host_tensor<float, 3>(cfg.kv_heads, cfg.tokens, cfg.dim),
                  pqkv::host_tensor<float, 3>(cfg.kv_heads, cfg.tokens, cfg.dim)};
  make_keys(cfg, 0, kv.keys.view());
  make_values(cfg, 0, kv.values.view());
  return kv;
}

}  // namespace pqkv::test
