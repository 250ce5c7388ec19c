// SPDX-License-Identifier: Apache-2.0
#pragma once
// The example's synthetic model: the K, V and decode queries of every layer
// of a Llama-3.1-8B-shaped attention stack (head dim 128, GQA 4), computed
// on the GPU from random per-layer, per-head projections of a drifting
// latent state, with RoPE (Llama 3.1 scaling), outlier channels, attention
// sinks, recurring topic clumps and planted needles. Every value is a pure
// function of (seed, layer, global KV head, sequence, position), so a head
// generates the same data whichever GPU holds it, and the tokens appended
// during decode continue the prefill's stream.
//
// Structure of a key (pre-RoPE, channel c, token t of KV head g):
//   k = mean_g + B_g z_t + topic_g[c(t)] + needle_g[j] (t the j-th needle) + 0.3 n
// z_t (rank 24, unit variance) = sqrt(.5) (slow part, constant over 64 tokens)
// + sqrt(.5) (per token); c(t) is the topic of t's 256-token clump, drawn from
// 64 topics per head (so topics recur); the first 4 tokens are sinks (a large
// low-frequency direction); mean_g has 4 outlier channels of magnitude ~5.
// "Semantic" directions (topics, needles, sinks) weight RoPE pair i by
// exp(4 (i/63 - 1)), so they survive RoPE at long range; the latent basis
// by exp(1.5 (i/63 - 1)). Values: mean + their own basis times z_t + noise.
// A decode query of group g aims at one topic (70%: a past clump's, else the
// current one) or, for 30% of the (step, group) pairs, at one of the
// needles, with nominal logit boosts: sink 12, topic 4, recency 2, needle
// 6..24, and content spread 2.5 (correlated 0.7 within a group). The target
// and the group's content part hold for 8 consecutive positions, as decode
// queries are correlated from step to step (what makes a GPU cache pay).

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/random.hpp>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace lcd {

inline constexpr int head_dim = 128;
inline constexpr int half_dim = head_dim / 2;
inline constexpr int group = 4;          // q heads per KV head
inline constexpr int latent_rank = 24;   // per-head key / value subspace rank
inline constexpr int topics = 64;        // topic pool per (layer, head)
inline constexpr int clump_tokens = 256; // tokens per topic clump
inline constexpr int drift_tokens = 64;  // tokens per step of the slow latent part
inline constexpr int needles = 16;       // planted needles per (layer, head, sequence)
inline constexpr int model_sinks = 4;    // attention-sink tokens
inline constexpr int outliers = 4;       // outlier channels per head
inline constexpr int query_span = 8;     // consecutive decode positions sharing a query's target
/// Floats of one head's tables: mean_k, mean_v, sink (d each), two bases (d x rank), topics, needles.
inline constexpr std::int64_t table_floats = head_dim * (3 + 2 * latent_rank + topics + needles);

/// Per-(layer, local head) parameter tables, device memory, all float.
struct model_tables {
  float const* mean_k;    // [layers, heads, d]
  float const* mean_v;    // [layers, heads, d]
  float const* sink_dir;  // [layers, heads, d]
  float const* basis_k;   // [layers, heads, d, rank]
  float const* basis_v;   // [layers, heads, d, rank]
  float const* topic;     // [layers, heads, topics, d]
  float const* needle;    // [layers, heads, needles, d]
  double const* inv_freq; // [d / 2] RoPE frequencies (Llama 3.1 scaling)
  int heads = 0;          // local KV heads
  int head_offset = 0;    // global index of local head 0
  std::uint64_t seed = 1;
  std::int64_t prefill = 0;  // needles are planted in [model_sinks, prefill)
};

namespace detail {

enum tag : std::uint64_t {
  t_mean_k = 11, t_mean_v, t_sink, t_basis_k, t_basis_v, t_topic, t_needle, t_outlier, t_clump, t_slow, t_fast,
  t_noise_k, t_noise_v, t_needle_pos, t_q_kind, t_q_pick, t_q_boost, t_q_group, t_q_head, t_q_noise
};

/// Gaussian for (key, counter): Box-Muller on 24 + 24 random bits.
__device__ __forceinline__ float gauss(std::uint64_t key, std::uint64_t counter)
{
  std::uint64_t const b = pqkv::detail::mix64(key + pqkv::detail::mix64(counter));
  float const u1 = (static_cast<float>(b >> 40) + 0.5f) * 0x1.0p-24f;
  float const u2 = static_cast<float>((b >> 8) & 0xFFFFFFu) * 0x1.0p-24f;
  return sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
}

__host__ __device__ inline std::uint64_t key_of(std::uint64_t seed, std::uint64_t tag, std::uint64_t a,
                                                std::uint64_t b = 0, std::uint64_t c = 0)
{
  return pqkv::detail::random_bits(seed, tag, (a << 40) ^ (b << 20) ^ c);
}

__host__ __device__ inline float tilt(int c, float g)
{
  int const pair = c % half_dim;
  return expf(g * (static_cast<float>(pair) / static_cast<float>(half_dim - 1) - 1.f));
}

/// Expected squared norm of a gaussian direction tilted by g: sum_c tilt^2.
inline double tilt_energy(float g)
{
  double s = 0;
  for (int c = 0; c < head_dim; ++c) { s += static_cast<double>(tilt(c, g)) * tilt(c, g); }
  return s;
}

struct table_scales {
  float mean, basis, topic, needle, sink, value_mean, value_basis;
};

/// One thread per table element; layer l, local head h.
__global__ void fill_tables(float* mean_k, float* mean_v, float* sink_dir, float* basis_k, float* basis_v,
                            float* topic, float* needle, int layers, int heads, int head_offset, std::uint64_t seed,
                            table_scales s)
{
  std::int64_t const per_head = table_floats;
  std::int64_t const total = static_cast<std::int64_t>(layers) * heads * per_head;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::int64_t const lh = i / per_head;
    int const l = static_cast<int>(lh / heads), h = static_cast<int>(lh % heads);
    std::uint64_t const g = static_cast<std::uint64_t>(h + head_offset);
    std::int64_t r = i % per_head;
    auto const ul = static_cast<std::uint64_t>(l);
    if (r < head_dim) {  // key mean, with outlier channels in the lower-frequency half
      int const c = static_cast<int>(r);
      float v = s.mean * gauss(key_of(seed, t_mean_k, ul, g), static_cast<std::uint64_t>(c));
      for (int o = 0; o < outliers; ++o) {
        auto const ch = static_cast<int>(pqkv::detail::random_below(seed, t_outlier, (ul << 20) ^ (g << 8) ^ o, half_dim / 2));
        int const chan = half_dim / 2 + ch + (o % 2) * half_dim;  // pairs 32..63, either half
        if (c == chan) {
          float const mag = 5.f * (0.6f + 0.8f * static_cast<float>(pqkv::detail::random_unit(seed, t_outlier + 100, (ul << 20) ^ (g << 8) ^ o)));
          v = (o % 2 == 0) ? mag : -mag;
        }
      }
      mean_k[lh * head_dim + c] = v;
      continue;
    }
    r -= head_dim;
    if (r < head_dim) {
      mean_v[lh * head_dim + r] = s.value_mean * gauss(key_of(seed, t_mean_v, ul, g), static_cast<std::uint64_t>(r));
      continue;
    }
    r -= head_dim;
    if (r < head_dim) {
      int const c = static_cast<int>(r);
      sink_dir[lh * head_dim + c] = s.sink * tilt(c, 4.f) * gauss(key_of(seed, t_sink, ul, g), static_cast<std::uint64_t>(c));
      continue;
    }
    r -= head_dim;
    if (r < head_dim * latent_rank) {
      int const c = static_cast<int>(r / latent_rank);
      basis_k[lh * head_dim * latent_rank + r] = s.basis * tilt(c, 1.5f) * gauss(key_of(seed, t_basis_k, ul, g), static_cast<std::uint64_t>(r));
      continue;
    }
    r -= head_dim * latent_rank;
    if (r < head_dim * latent_rank) {
      basis_v[lh * head_dim * latent_rank + r] = s.value_basis * gauss(key_of(seed, t_basis_v, ul, g), static_cast<std::uint64_t>(r));
      continue;
    }
    r -= head_dim * latent_rank;
    if (r < head_dim * topics) {
      int const c = static_cast<int>(r % head_dim);
      topic[lh * head_dim * topics + r] = s.topic * tilt(c, 4.f) * gauss(key_of(seed, t_topic, ul, g), static_cast<std::uint64_t>(r));
      continue;
    }
    r -= head_dim * topics;
    int const c = static_cast<int>(r % head_dim);
    needle[lh * head_dim * needles + r] = s.needle * tilt(c, 4.f) * gauss(key_of(seed, t_needle, ul, g), static_cast<std::uint64_t>(r));
  }
}

/// Topic of the clump holding token t of (layer, head, sequence).
__device__ __forceinline__ int topic_of(std::uint64_t seed, std::uint64_t l, std::uint64_t g, std::uint64_t b,
                                        std::int64_t t)
{
  return static_cast<int>(pqkv::detail::random_below(key_of(seed, t_clump, l, g, b), 0,
                                                     static_cast<std::uint64_t>(t / clump_tokens), topics));
}

/// The needle index planted at t, or -1.
__device__ __forceinline__ int needle_at(std::uint64_t seed, std::uint64_t l, std::uint64_t g, std::uint64_t b,
                                         std::int64_t t, std::int64_t prefill)
{
  std::int64_t const span = (prefill - model_sinks) / needles;
  if (span < 1 || t < model_sinks) { return -1; }
  std::int64_t const j = (t - model_sinks) / span;
  if (j >= needles) { return -1; }
  auto const off = static_cast<std::int64_t>(pqkv::detail::random_below(key_of(seed, t_needle_pos, l, g, b), 0,
                                                                         static_cast<std::uint64_t>(j), static_cast<std::uint64_t>(span)));
  return (t == model_sinks + j * span + off) ? static_cast<int>(j) : -1;
}

/// Rotates the rotate-half pairs (2 lane, 2 lane + 1) = channels {2l, 2l+1, 2l+64, 2l+65}
/// held by this lane as x[0..3] = (c0, c1, c0 + 64, c1 + 64).
__device__ __forceinline__ void rope_lane(float (&x)[4], int lane, std::int64_t position, double const* inv_freq)
{
  constexpr double two_pi = 6.283185307179586476925;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    int const i = 2 * lane + e;
    double a = static_cast<double>(position) * inv_freq[i];
    a -= two_pi * floor(a / two_pi);
    float sn, cs;
    sincosf(static_cast<float>(a), &sn, &cs);
    float const lo = x[e], hi = x[e + 2];
    x[e] = lo * cs - hi * sn;
    x[e + 2] = hi * cs + lo * sn;
  }
}

__device__ __forceinline__ int lane_channel(int lane, int e) { return 2 * lane + (e & 1) + (e >> 1) * half_dim; }

/// Key and value rows of token t for (layer l, local head h, sequence b), computed by one warp:
/// lane holds channels lane_channel(lane, 0..3). `basis` points at the head's shared-memory copy
/// [2][d][rank] (keys, then values).
__device__ __forceinline__ void kv_row(model_tables const& m, float const* basis_s, int l, int h, int b,
                                       std::int64_t t, int lane, float (&k)[4], float (&v)[4])
{
  auto const ul = static_cast<std::uint64_t>(l), ug = static_cast<std::uint64_t>(h + m.head_offset),
             ub = static_cast<std::uint64_t>(b);
  std::int64_t const lh = static_cast<std::int64_t>(l) * m.heads + h;
  // latent z: lane j < rank holds z_j
  float z = 0.f;
  if (lane < latent_rank) {
    z = 0.70710678f * gauss(key_of(m.seed, t_slow, ul, ug, ub), static_cast<std::uint64_t>(t / drift_tokens) * latent_rank + lane) +
        0.70710678f * gauss(key_of(m.seed, t_fast, ul, ug, ub), static_cast<std::uint64_t>(t) * latent_rank + lane);
  }
  float bk[4] = {0.f, 0.f, 0.f, 0.f}, bv[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
  for (int j = 0; j < latent_rank; ++j) {
    float const zj = __shfl_sync(0xffffffffu, z, j);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      int const c = lane_channel(lane, e);
      bk[e] = fmaf(basis_s[c * latent_rank + j], zj, bk[e]);
      bv[e] = fmaf(basis_s[(head_dim + c) * latent_rank + j], zj, bv[e]);
    }
  }
  int const tp = topic_of(m.seed, ul, ug, ub, t);
  int const nd = needle_at(m.seed, ul, ug, ub, t, m.prefill);
  std::uint64_t const nk = key_of(m.seed, t_noise_k, ul, ug, ub), nv = key_of(m.seed, t_noise_v, ul, ug, ub);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    int const c = lane_channel(lane, e);
    auto const cnt = static_cast<std::uint64_t>(t) * head_dim + c;
    float const mk = m.mean_k[lh * head_dim + c];
    float const noise_k = 0.3f * gauss(nk, cnt), noise_v = 0.4f * gauss(nv, cnt);
    if (t < model_sinks) {
      k[e] = m.sink_dir[lh * head_dim + c] + 0.2f * (mk + noise_k);
      v[e] = 0.1f * noise_v;
      continue;
    }
    float x = mk + bk[e] + m.topic[(lh * topics + tp) * head_dim + c] + noise_k;
    if (nd >= 0) { x += m.needle[(lh * needles + nd) * head_dim + c]; }
    k[e] = x;
    v[e] = m.mean_v[lh * head_dim + c] + bv[e] + noise_v;
  }
  rope_lane(k, lane, t, m.inv_freq);
}

/// Loads the head's key and value bases into shared memory [2][d][rank].
__device__ __forceinline__ void load_basis(model_tables const& m, int l, int h, float* basis_s)
{
  std::int64_t const lh = static_cast<std::int64_t>(l) * m.heads + h;
  for (int i = static_cast<int>(threadIdx.x); i < head_dim * latent_rank; i += static_cast<int>(blockDim.x)) {
    basis_s[i] = m.basis_k[lh * head_dim * latent_rank + i];
    basis_s[head_dim * latent_rank + i] = m.basis_v[lh * head_dim * latent_rank + i];
  }
  __syncthreads();
}

__device__ __forceinline__ void store_row(__nv_bfloat16* row, int lane, float const (&x)[4])
{
  *reinterpret_cast<__nv_bfloat162*>(row + 2 * lane) = __floats2bfloat162_rn(x[0], x[1]);
  *reinterpret_cast<__nv_bfloat162*>(row + half_dim + 2 * lane) = __floats2bfloat162_rn(x[2], x[3]);
}

inline constexpr int prefill_warps = 8;
inline constexpr int prefill_tokens_per_warp = 16;

/// Prefill: K, V [batch, heads, n, d] of tokens [0, n) of layer l.
/// grid (ceil(n / (warps * tokens_per_warp)), heads, batch), block 32 * warps.
__global__ void __launch_bounds__(32 * prefill_warps) prefill_kv(model_tables m, int l, std::int64_t n,
                                                                 __nv_bfloat16* keys, __nv_bfloat16* values)
{
  __shared__ float basis_s[2 * head_dim * latent_rank];
  int const h = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z);
  load_basis(m, l, h, basis_s);
  int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  std::int64_t const first = static_cast<std::int64_t>(blockIdx.x) * prefill_warps * prefill_tokens_per_warp;
  std::int64_t const row0 = (static_cast<std::int64_t>(b) * m.heads + h) * n;
  for (int i = 0; i < prefill_tokens_per_warp; ++i) {
    std::int64_t const t = first + static_cast<std::int64_t>(i) * prefill_warps + warp;
    if (t >= n) { break; }
    float k[4], v[4];
    kv_row(m, basis_s, l, h, b, t, lane, k, v);
    store_row(keys + (row0 + t) * head_dim, lane, k);
    store_row(values + (row0 + t) * head_dim, lane, v);
  }
}

/// Scales of a decode query's components (see the file comment).
struct query_scales {
  float topic, sink, recency, content, needle_per_logit;
};

/// Decode: the new token of every sequence at position positions[b] (device):
/// its K and V into new_k / new_v [batch, heads, d] and into the layer's
/// window ring [batch, heads, window, d] at slot position % window, and the
/// group's 4 queries into q [batch, heads * 4, d].
/// grid (heads, batch), block 32 * (1 + group).
__global__ void __launch_bounds__(32 * (1 + group)) decode_qkv(model_tables m, int l, std::int64_t const* positions,
                                                               __nv_bfloat16* new_k, __nv_bfloat16* new_v,
                                                               __nv_bfloat16* win_k, __nv_bfloat16* win_v, int window,
                                                               __nv_bfloat16* q, query_scales qs)
{
  __shared__ float basis_s[2 * head_dim * latent_rank];
  int const h = static_cast<int>(blockIdx.x), b = static_cast<int>(blockIdx.y);
  load_basis(m, l, h, basis_s);
  int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  std::int64_t const p = positions[b];
  std::int64_t const row = static_cast<std::int64_t>(b) * m.heads + h;
  auto const ul = static_cast<std::uint64_t>(l), ug = static_cast<std::uint64_t>(h + m.head_offset),
             ub = static_cast<std::uint64_t>(b);
  if (warp == 0) {
    float k[4], v[4];
    kv_row(m, basis_s, l, h, b, p, lane, k, v);
    store_row(new_k + row * head_dim, lane, k);
    store_row(new_v + row * head_dim, lane, v);
    if (window > 0) {
      std::int64_t const slot = row * window + p % window;
      store_row(win_k + slot * head_dim, lane, k);
      store_row(win_v + slot * head_dim, lane, v);
    }
    return;
  }
  int const qh = warp - 1;  // 0..3 within the group
  std::int64_t const lh = static_cast<std::int64_t>(l) * m.heads + h;
  auto const step_key = key_of(m.seed, t_q_kind, ul, ug, ub);
  auto const up = static_cast<std::uint64_t>(p);
  // What a query asks for persists over query_span consecutive tokens (decode
  // steps are correlated); the per-head content part changes every step.
  auto const span = up / query_span;
  bool const wants_needle = m.prefill > model_sinks + needles && pqkv::detail::random_unit(step_key, 0, span) < 0.3;
  int target = 0;
  float needle_boost = 0.f;
  if (wants_needle) {
    target = static_cast<int>(pqkv::detail::random_below(step_key, 1, span, needles));
    needle_boost = 6.f + 18.f * static_cast<float>(pqkv::detail::random_unit(step_key, 2, span));
  } else if (pqkv::detail::random_unit(step_key, 3, span) < 0.3) {
    target = topic_of(m.seed, ul, ug, ub, p);
  } else {
    auto const past = static_cast<std::int64_t>(pqkv::detail::random_below(step_key, 4, span, up > 0 ? up : 1));
    target = topic_of(m.seed, ul, ug, ub, past);
  }
  // content latent: correlated 0.7 within the group; the group part persists with the target
  float zeta = 0.f;
  if (lane < latent_rank) {
    zeta = 0.83666f * gauss(key_of(m.seed, t_q_group, ul, ug, ub), span * latent_rank + lane) +
           0.54772f * gauss(key_of(m.seed, t_q_head, ul, ug * group + qh, ub), up * latent_rank + lane);
  }
  float bz[4] = {0.f, 0.f, 0.f, 0.f};
  for (int j = 0; j < latent_rank; ++j) {
    float const zj = __shfl_sync(0xffffffffu, zeta, j);
#pragma unroll
    for (int e = 0; e < 4; ++e) { bz[e] = fmaf(basis_s[lane_channel(lane, e) * latent_rank + j], zj, bz[e]); }
  }
  float x[4];
  auto const nq = key_of(m.seed, t_q_noise, ul, ug * group + qh, ub);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    int const c = lane_channel(lane, e);
    float v = qs.sink * m.sink_dir[lh * head_dim + c] + qs.content * bz[e] + 0.3f * gauss(nq, up * head_dim + c);
    // recency: the non-outlier part of the mean direction (RoPE turns it into a recency bias)
    float const mk = m.mean_k[lh * head_dim + c];
    v += qs.recency * (fabsf(mk) < 2.f ? mk : 0.f);
    if (wants_needle) {
      v += qs.needle_per_logit * needle_boost * m.needle[(lh * needles + target) * head_dim + c];
    } else {
      v += qs.topic * m.topic[(lh * topics + target) * head_dim + c];
    }
    x[e] = v;
  }
  rope_lane(x, lane, p, m.inv_freq);
  store_row(q + ((static_cast<std::int64_t>(b) * m.heads + h) * group + qh) * head_dim, lane, x);
}

}  // namespace detail

/// Owns the model tables of one device's heads.
class synthetic_model {
 public:
  synthetic_model(int layers, int heads, int head_offset, std::uint64_t seed, std::int64_t prefill)
    : layers_{layers}, heads_{heads}
  {
    auto const lh = static_cast<std::size_t>(layers) * static_cast<std::size_t>(heads);
    auto alloc = [&](float*& p, std::size_t n) { PQKV_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&p), n * sizeof(float))); };
    alloc(mean_k_, lh * head_dim);
    alloc(mean_v_, lh * head_dim);
    alloc(sink_, lh * head_dim);
    alloc(basis_k_, lh * head_dim * latent_rank);
    alloc(basis_v_, lh * head_dim * latent_rank);
    alloc(topic_, lh * head_dim * topics);
    alloc(needle_, lh * head_dim * needles);
    PQKV_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&inv_freq_), half_dim * sizeof(double)));
    std::vector<double> f(half_dim);
    for (int i = 0; i < half_dim; ++i) {  // Llama 3.1: theta 500000, factor 8, low 1, high 4, original 8192
      double const base = std::pow(500000.0, -2.0 * i / head_dim);
      double const wavelength = 2.0 * 3.14159265358979323846 / base;
      double const low_wl = 8192.0 / 1.0, high_wl = 8192.0 / 4.0;
      if (wavelength < high_wl) {
        f[static_cast<std::size_t>(i)] = base;
      } else if (wavelength > low_wl) {
        f[static_cast<std::size_t>(i)] = base / 8.0;
      } else {
        double const smooth = (8192.0 / wavelength - 1.0) / (4.0 - 1.0);
        f[static_cast<std::size_t>(i)] = (1 - smooth) * base / 8.0 + smooth * base;
      }
    }
    PQKV_CUDA_TRY(cudaMemcpy(inv_freq_, f.data(), f.size() * sizeof(double), cudaMemcpyHostToDevice));
    double const d = head_dim;
    detail::table_scales s{};
    s.mean = static_cast<float>(std::sqrt(0.30));  // |mean|^2 = 0.3 d (plus the outliers)
    s.basis = static_cast<float>(std::sqrt(0.45 * d / (latent_rank * detail::tilt_energy(1.5f))));
    s.topic = static_cast<float>(std::sqrt(0.15 * d / detail::tilt_energy(4.f)));
    s.needle = static_cast<float>(std::sqrt(1.5 * d / detail::tilt_energy(4.f)));
    s.sink = static_cast<float>(std::sqrt(2.0 * d / detail::tilt_energy(4.f)));
    s.value_mean = static_cast<float>(std::sqrt(0.2));
    s.value_basis = static_cast<float>(std::sqrt(0.6 / latent_rank));
    std::int64_t const total = static_cast<std::int64_t>(lh) * table_floats;
    int const blocks = static_cast<int>(std::min<std::int64_t>((total + 255) / 256, 65535));
    detail::fill_tables<<<blocks, 256>>>(mean_k_, mean_v_, sink_, basis_k_, basis_v_, topic_, needle_, layers, heads,
                                         head_offset, seed, s);
    PQKV_CUDA_CHECK_LAST();
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
    tables_ = {mean_k_, mean_v_, sink_, basis_k_, basis_v_, topic_, needle_, inv_freq_, heads, head_offset, seed, prefill};
    // Query scales: a component's logit boost = its scale x |direction|^2 / sqrt(d)
    // (unit directions scaled by the boost's ratio), see the file comment.
    double const sq = std::sqrt(d);
    qs_.topic = static_cast<float>(4.0 * sq / (0.15 * d));
    qs_.sink = static_cast<float>(12.0 * sq / (2.0 * d));
    qs_.recency = static_cast<float>(2.0 * sq / (0.30 * d));
    qs_.content = static_cast<float>(2.5 * std::sqrt(double{latent_rank}) * sq / (0.45 * d));  // B^T B ~ (0.45 d / rank) I
    qs_.needle_per_logit = static_cast<float>(sq / (1.5 * d));
  }
  synthetic_model(synthetic_model const&) = delete;
  synthetic_model& operator=(synthetic_model const&) = delete;
  ~synthetic_model()
  {
    for (float* p : {mean_k_, mean_v_, sink_, basis_k_, basis_v_, topic_, needle_}) { cudaFree(p); }
    cudaFree(inv_freq_);
  }

  [[nodiscard]] model_tables const& tables() const noexcept { return tables_; }
  [[nodiscard]] detail::query_scales const& query_scales() const noexcept { return qs_; }

  /// K, V [batch, heads, n, d] of the prefill tokens of layer l, on `stream`.
  void prefill(int l, int batch, std::int64_t n, __nv_bfloat16* keys, __nv_bfloat16* values, cudaStream_t stream) const
  {
    std::int64_t const per_block = detail::prefill_warps * detail::prefill_tokens_per_warp;
    dim3 const grid(static_cast<unsigned>((n + per_block - 1) / per_block), static_cast<unsigned>(heads_),
                    static_cast<unsigned>(batch));
    detail::prefill_kv<<<grid, 32 * detail::prefill_warps, 0, stream>>>(tables_, l, n, keys, values);
    PQKV_CUDA_CHECK_LAST();
  }

  /// The new token's K, V and queries of layer l at positions[b] (device), on `stream`.
  void decode(int l, int batch, std::int64_t const* positions, __nv_bfloat16* new_k, __nv_bfloat16* new_v,
              __nv_bfloat16* win_k, __nv_bfloat16* win_v, int window, __nv_bfloat16* q, cudaStream_t stream) const
  {
    dim3 const grid(static_cast<unsigned>(heads_), static_cast<unsigned>(batch));
    detail::decode_qkv<<<grid, 32 * (1 + group), 0, stream>>>(tables_, l, positions, new_k, new_v, win_k, win_v,
                                                               window, q, qs_);
    PQKV_CUDA_CHECK_LAST();
  }

 private:
  int layers_, heads_;
  float *mean_k_ = nullptr, *mean_v_ = nullptr, *sink_ = nullptr, *basis_k_ = nullptr, *basis_v_ = nullptr,
        *topic_ = nullptr, *needle_ = nullptr;
  double* inv_freq_ = nullptr;
  model_tables tables_{};
  detail::query_scales qs_{};
};

}  // namespace lcd
