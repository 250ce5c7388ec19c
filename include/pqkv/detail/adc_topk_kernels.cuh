// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Kernels of `pqkv::gpu::adc_topk` (score/adc_topk.cuh). Users never
/// name this header.
///
/// One decode step is three stream-ordered launches:
///   lut      grid (m, rows, ksub / 32): the LUT of every row (one (sequence,
///            KV head)) into the workspace
///   score    grid (chunks, rows), all SMs busy whatever the batch: scores
///            every candidate of its chunk of tokens from the codes. gqa::sum
///            and gqa::max write each token's 32-bit rank key and add its top
///            11 bits to the row's histogram; softmax
///            policies write the r logits of each token and the chunk's
///            online softmax statistics (max and sum of exp per q head)
///   select   one thread-block cluster of C blocks per row, each block owning
///            a contiguous slice of the row's candidates: (softmax: the row's
///            max and Z from the chunks' statistics, in chunk order, then the
///            keys) the keys of its slice into shared memory when they fit;
///            3 radix passes (11 + 11 + 10 bits) in which every block sums
///            the blocks' histograms through distributed shared memory and
///            finds the same digit of the k-th best key T (one cluster
///            barrier a pass); then each block counts its keys above and
///            equal to T, takes the counts of the lower-ranked blocks (their
///            tokens come first) and writes its selected token indices
///            ascending (warp ballots, one scan of the warps' counts a tile).
/// score and select start as programmatic dependents of the kernel before
/// them (their launch overlaps its tail; they wait for its results with
/// griddepcontrol.wait). Every reduction has a fixed order, so results do not
/// depend on scheduling. Sequence lengths are read on the device.
///
/// The score kernel reads codes through an addressing type (`contiguous_rows`
/// or `paged_rows`, a template parameter), so the contiguous path compiles
/// to the same loads as before paging existed and the paged one pays only a
/// block-table read per token. The query element type is a template
/// parameter of the LUT kernel only (queries are converted to float there).

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/score/adc_topk.hpp>
#include <pqkv/score/lut.hpp>
#include <pqkv/score/topk.hpp>

#include <cooperative_groups.h>
#include <cub/block/block_scan.cuh>
#include <cuda/std/limits>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pqkv::detail::adc_gpu {

namespace cg = cooperative_groups;

inline constexpr int score_threads = 256;
inline constexpr int select_threads = 1024;
inline constexpr int warps = select_threads / 32;  ///< warps of a select block
inline constexpr int max_group = 8;      ///< largest q-heads-per-KV-head group the kernels take
inline constexpr int max_cluster = 16;   ///< blocks per row (Hopper's non-portable cluster limit)
inline constexpr int hist_bins = 2048;   ///< 11 key bits per pass (the last pass uses 10)
inline constexpr int radix_passes = 3;
inline constexpr int emit_items = 16;    ///< tokens per thread in an emit tile (32 apart)
inline constexpr int lut_threads = 256;
inline constexpr int lut_centroids = 32; ///< centroids per block of the LUT kernel

/// Kernel parameters: plain pointers and sizes, validated on the host.
struct args {
  void const* q;                 // [batch, q_heads, dim], the LUT kernel's Query type
  std::uint8_t const* codes;     // contiguous: [batch, kv_heads, capacity, m]; paged: the page pool
  float const* centroids;        // PQ: [kv_heads, m, ksub, dsub]; residual: [1|kv_heads, splits, stages, ksub, dsub]
  std::int32_t const* seq_lens;  // [batch]
  std::int32_t* out;             // [batch, kv_heads, out_k]
  std::int32_t* valid;           // [batch, kv_heads]
  float* scores;                 // [batch, kv_heads, out_k] or null: the selected tokens' scores
  std::int32_t const* block_table;  // paged codes: [batch, table_pages]; null: contiguous codes
  float* lut;                    // workspace [rows, m, ksub, r]
  std::uint32_t* keys;           // workspace [rows, capacity]
  std::uint32_t* hist;           // workspace [rows, hist_bins]: gqa::sum / max, the keys' top 11 bits
  float* logits;                 // workspace, softmax policies: [rows, capacity, r]
  float* part_max;               // workspace, softmax policies: [rows, r, max_chunks]
  double* part_sum;              // workspace, softmax policies: [rows, r, max_chunks]
  index_t capacity;
  index_t table_pages;             ///< paged: block-table entries per sequence
  index_t page_stride, head_stride, token_stride;  ///< paged: pool strides in bytes
  std::uint32_t last_page;         ///< paged: pool pages - 1 (larger entries are clamped to it)
  int page_size, page_shift;       ///< paged: tokens per page; log2 of it, or -1
  index_t sink;
  index_t window;
  int q_heads, kv_heads, r, dim, m, dsub, ksub;
  int stages;                      ///< codes per channel split (PQ: 1; m / stages splits)
  bool shared_codebook;            ///< one codebook for every KV head (residual codes)
  int k, out_k;
  int chunk_tokens, max_chunks;
  int store_tokens;  ///< keys a select block keeps in shared memory (0: it works in the workspace)
  float scale;
};

/// Waits until the kernel this one depends on (launched before it in the
/// stream as its programmatic primary) has finished and its writes are visible.
__device__ __forceinline__ void wait_for_primary() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

/// The candidates of one row, from its sequence length in device memory
/// (clamped to [0, capacity]).
struct row_info {
  index_t first;
  index_t count;
  int k_eff;
};

__device__ __forceinline__ row_info row_of(args const& a, int b)
{
  index_t n = a.seq_lens[b];
  n = n < 0 ? 0 : (n > a.capacity ? a.capacity : n);
  token_range const cand = candidate_range(n, a.sink, a.window);
  row_info ri;
  ri.first = cand.first;
  ri.count = cand.size();
  ri.k_eff = static_cast<int>(ri.count < a.k ? ri.count : a.k);
  return ri;
}

/// Adds 1 to hist[bin] for every lane with `valid`; lanes of the warp with the
/// same bin add once together (scores crowd into a few bins of the top key
/// bits, where per-lane shared atomics would serialize). All 32 lanes call it.
__device__ __forceinline__ void warp_hist_add(std::uint32_t* hist, std::uint32_t bin, bool valid)
{
  unsigned const peers = __match_any_sync(0xffffffffu, valid ? bin : 0xffffffffu);
  if (valid && static_cast<int>(threadIdx.x % 32) == __ffs(static_cast<int>(peers)) - 1) {
    atomicAdd(hist + bin, static_cast<std::uint32_t>(__popc(peers)));
  }
}

// ---- LUT -------------------------------------------------------------------------------

/// The query channel of LUT position i: PQ reads channels in order
/// (residual codes pass their `rq_gpu::channel_map`, detail/channel_map.cuh).
struct identity_channels {
  [[nodiscard]] __device__ __forceinline__ int operator()(int i) const { return i; }
};

/// grid (m, rows, ksub / lut_centroids): the LUT of code j of one row,
/// interleaved [c][h_local] as `build_group_lut`. Code j is stage j % stages
/// of split s = j / stages; its query sub-vector is positions [s * dsub,
/// (s + 1) * dsub) of the `Channels` order (PQ: stages 1, split = subspace,
/// identity order). Centroids are staged through shared memory (rows padded
/// to an odd stride, so the threads of a warp reading different centroids
/// hit different banks).
template <class Query, class Channels>
__global__ void __launch_bounds__(lut_threads) lut_kernel(args a, __grid_constant__ Channels const channels)
{
  constexpr int tile_floats = 8192;
  __shared__ float cs[tile_floats];
  __shared__ float qs[max_group * max_lut_dsub];
  int const j = static_cast<int>(blockIdx.x);
  int const row = static_cast<int>(blockIdx.y);
  int const b = row / a.kv_heads, g = row % a.kv_heads;
  if (j == 0 && blockIdx.z == 0) {
    // The score kernel adds the keys' top bits to the row's histogram.
    std::uint32_t* h = a.hist + static_cast<std::size_t>(row) * hist_bins;
    for (int i = static_cast<int>(threadIdx.x); i < hist_bins; i += lut_threads) { h[i] = 0u; }
  }
  int const r = a.r, ksub = a.ksub, dsub = a.dsub, stride = dsub | 1;
  int const split = j / a.stages, stage = j % a.stages;
  for (int i = static_cast<int>(threadIdx.x); i < r * dsub; i += lut_threads) {
    int const hl = i / dsub, d = i % dsub;
    // Exact widening (half and bf16 are subsets of float): the CPU
    // reference on the converted queries gets the same LUT.
    qs[i] = to_float(static_cast<Query const*>(
      a.q)[(static_cast<std::size_t>(b) * a.q_heads + g * r + hl) * a.dim + channels(split * dsub + d)]);
  }
  int const book = a.shared_codebook ? 0 : g;
  float const* cg =
    a.centroids + ((static_cast<std::size_t>(book) * (a.m / a.stages) + split) * a.stages + stage) * ksub * dsub;
  float* out = a.lut + (static_cast<std::size_t>(row) * a.m + j) * ksub * r;
  int const c_begin = static_cast<int>(blockIdx.z) * lut_centroids;
  int const c_end = c_begin + lut_centroids < ksub ? c_begin + lut_centroids : ksub;
  int const ctile = tile_floats / stride;
  for (int c0 = c_begin; c0 < c_end; c0 += ctile) {
    int const nc = c_end - c0 < ctile ? c_end - c0 : ctile;
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < nc * dsub; i += lut_threads) {
      cs[(i / dsub) * stride + i % dsub] = cg[static_cast<std::size_t>(c0) * dsub + i];
    }
    __syncthreads();
    for (int e = static_cast<int>(threadIdx.x); e < nc * r; e += lut_threads) {
      int const c = e / r, hl = e % r;
      // The contract's fma chain over the sub-vector: the CPU's bits.
      out[c0 * r + e] = lut_entry(qs + hl * dsub, cs + c * stride, dsub);
    }
  }
}

// ---- scoring -----------------------------------------------------------------------------

/// The m code bytes of one token, kept as the widest aligned vector M allows
/// (M == 0: any m, read byte by byte when used).
template <int M>
struct code_vec {
  static constexpr int words = M >= 16 ? M / 4 : (M == 8 ? 2 : 1);
  std::uint32_t w[words];

  __device__ __forceinline__ void load(std::uint8_t const* p)
  {
    if constexpr (M == 1) {
      w[0] = *p;
    } else if constexpr (M == 2) {
      w[0] = *reinterpret_cast<std::uint16_t const*>(p);
    } else if constexpr (M == 4) {
      w[0] = *reinterpret_cast<std::uint32_t const*>(p);
    } else if constexpr (M == 8) {
      uint2 const x = *reinterpret_cast<uint2 const*>(p);
      w[0] = x.x;
      w[1] = x.y;
    } else if constexpr (M > 8) {
      static_assert(M % 16 == 0);
#pragma unroll
      for (int i = 0; i < M / 16; ++i) {
        uint4 const x = *reinterpret_cast<uint4 const*>(p + 16 * i);
        w[4 * i] = x.x;
        w[4 * i + 1] = x.y;
        w[4 * i + 2] = x.z;
        w[4 * i + 3] = x.w;
      }
    }
  }
  [[nodiscard]] __device__ __forceinline__ unsigned byte(int j) const { return (w[j / 4] >> (8 * (j % 4))) & 0xFFu; }
};

/// Logits of one token for the r q heads of the group: step 3 of the
/// contract, `s = s + lut[j][code_j]` in subspace order, then `scale * s`,
/// each operation rounded on its own.
/// R == 4: the group's 4 entries of a code are one 16-byte shared load.
/// R == 0: any r <= max_group, one 4-byte load per head.
/// M > 0: m == M, the code from `cv`; M == 0: any m, read from `code`.
template <int M, int R>
__device__ __forceinline__ void token_logits(float const* __restrict__ lut, code_vec<M> const& cv,
                                             std::uint8_t const* __restrict__ code, int m, int ksub, int r,
                                             float scale, float (&x)[max_group])
{
  unsigned const mask = static_cast<unsigned>(ksub - 1);  // keeps a code >= ksub inside the LUT
  float acc[max_group];
#pragma unroll
  for (int h = 0; h < max_group; ++h) { acc[h] = 0.f; }
  auto add = [&](int j, unsigned c) {
    c &= mask;
    if constexpr (R == 4) {
      float4 const e = *reinterpret_cast<float4 const*>(lut + (j * ksub + static_cast<int>(c)) * 4);
      acc[0] = __fadd_rn(acc[0], e.x);
      acc[1] = __fadd_rn(acc[1], e.y);
      acc[2] = __fadd_rn(acc[2], e.z);
      acc[3] = __fadd_rn(acc[3], e.w);
    } else {
      float const* e = lut + (j * ksub + static_cast<int>(c)) * r;
#pragma unroll
      for (int h = 0; h < max_group; ++h) {
        if (h < r) { acc[h] = __fadd_rn(acc[h], e[h]); }
      }
    }
  };
  if constexpr (M > 0) {
#pragma unroll
    for (int j = 0; j < M; ++j) { add(j, cv.byte(j)); }
  } else {
    for (int j = 0; j < m; ++j) { add(j, code[j]); }
  }
#pragma unroll
  for (int h = 0; h < max_group; ++h) { x[h] = __fmul_rn(scale, acc[h]); }
}

/// Tokens a thread keeps in flight: enough code bytes outstanding per SM to
/// cover memory latency, within the register budget.
template <int M, int R>
inline constexpr int tokens_in_flight = M == 0 ? 1 : (R == 4 ? (M <= 8 ? 4 : (M == 16 ? 2 : 1)) : (M <= 8 ? 2 : 1));

/// Online softmax statistics: adds logit x to (max, sum of expf(logit - max)).
__device__ __forceinline__ void online_add(float& mx, double& sum, float x)
{
  if (x > mx) {
    sum = sum * static_cast<double>(expf(__fsub_rn(mx, x))) + 1.0;
    mx = x;
  } else {
    sum += static_cast<double>(expf(__fsub_rn(x, mx)));
  }
}

/// Merges statistics (mx_b, sum_b) into (mx, sum); an empty side has max -inf
/// and sum 0.
__device__ __forceinline__ void online_merge(float& mx, double& sum, float mx_b, double sum_b)
{
  float const m = mx_b > mx ? mx_b : mx;
  if (m == -::cuda::std::numeric_limits<float>::infinity()) { return; }  // both empty
  sum = sum * static_cast<double>(expf(__fsub_rn(mx, m))) + sum_b * static_cast<double>(expf(__fsub_rn(mx_b, m)));
  mx = m;
}

/// Code addressing of a row (one sequence, one KV head) stored contiguously:
/// token t's m bytes at base + t * m.
struct contiguous_rows {
  std::uint8_t const* base;  // [capacity, m]

  template <int M>
  [[nodiscard]] __device__ __forceinline__ std::uint8_t const* at(index_t t, int m) const
  {
    return M > 0 ? base + t * M : base + t * m;
  }
};

/// Code addressing of a row in a page pool: token t lives in page
/// table[t / P] at offset t % P. Page numbers above the pool's last page are
/// clamped to it (a negative entry too), so a bad table entry reads wrong
/// codes but never outside the pool. Token indices fit in 32 bits, so the
/// division is 32-bit (a shift and mask when P is a power of two).
struct paged_rows {
  std::uint8_t const* head_base;  // pool + g * head_stride
  std::int32_t const* table;      // [table_pages] of sequence b
  index_t page_stride, token_stride;
  std::uint32_t last_page;
  std::uint32_t page_size;
  int page_shift;

  template <int M>
  [[nodiscard]] __device__ __forceinline__ std::uint8_t const* at(index_t t, int) const
  {
    auto const tt = static_cast<std::uint32_t>(t);
    std::uint32_t lp = 0, off = 0;
    if (page_shift >= 0) {
      lp = tt >> page_shift;
      off = tt & (page_size - 1u);
    } else {
      lp = tt / page_size;
      off = tt - lp * page_size;
    }
    std::uint32_t phys = static_cast<std::uint32_t>(__ldg(table + lp));
    phys = phys < last_page ? phys : last_page;
    return head_base + static_cast<index_t>(phys) * page_stride + static_cast<index_t>(off) * token_stride;
  }
};

/// Scores the tokens [t0, t1) of one chunk of a row. Each thread takes U
/// tokens per step (t = base + tid + u * score_threads: coalesced for every
/// u) and issues all their code loads before using any.
template <int M, int R, class Aggregation, class Codes>
struct chunk_scorer {
  static constexpr int U = tokens_in_flight<M, R>;

  args const& a;
  Aggregation const& agg;
  float const* lut;               // shared [m, ksub, r]
  Codes codes;                    // the row's codes: contiguous_rows or paged_rows
  std::size_t row;
  index_t t0, t1;

  [[nodiscard]] __device__ __forceinline__ int heads() const { return R > 0 ? R : a.r; }
  [[nodiscard]] __device__ __forceinline__ index_t token(index_t base, int u) const
  {
    return base + static_cast<index_t>(threadIdx.x) + static_cast<index_t>(u) * score_threads;
  }

  /// Logits of the step's U tokens (x[u] undefined where the token is past t1).
  __device__ __forceinline__ void step_logits(index_t base, float (&x)[U][max_group]) const
  {
    code_vec<M> cv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      index_t const t = token(base, u);
      if constexpr (M > 0) {
        if (t < t1) { cv[u].load(codes.template at<M>(t, M)); }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      index_t const t = token(base, u);
      if (t < t1) {
        std::uint8_t const* code = nullptr;  // M > 0: the codes are in cv
        if constexpr (M == 0) { code = codes.template at<0>(t, a.m); }
        token_logits<M, R>(lut, cv[u], code, a.m, a.ksub, heads(), a.scale, x[u]);
      }
    }
  }

  /// gqa::sum / gqa::max: the rank key of every token into the workspace,
  /// its top 11 bits into the block's histogram `hist_s`. Warps stay
  /// converged (uniform trip counts) for the warp-aggregated histogram.
  __device__ __forceinline__ void keys(std::uint32_t* hist_s) const
  {
    std::uint32_t* keys_row = a.keys + row * static_cast<std::size_t>(a.capacity);
    for (index_t base = t0; base < t1; base += static_cast<index_t>(score_threads) * U) {
      float x[U][max_group];
      step_logits(base, x);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        index_t const t = token(base, u);
        bool const valid = t < t1;
        std::uint32_t key = 0;
        if (valid) {
          float acc = agg.init();
#pragma unroll
          for (int h = 0; h < max_group; ++h) {
            if (h < heads()) { acc = agg.combine(acc, x[u][h]); }
          }
          key = score_rank_key(agg.finish(acc));
          keys_row[t] = key;
        }
        warp_hist_add(hist_s, key >> 21, valid);
      }
    }
  }

  /// Softmax policies: the logits of every token into the workspace; returns
  /// this thread's online statistics per head.
  __device__ __forceinline__ void logits(float (&vmax)[max_group], double (&vsum)[max_group]) const
  {
    int const rr = heads();
    float* lg_row = a.logits + row * static_cast<std::size_t>(a.capacity) * rr;
    for (index_t base = t0; base < t1; base += static_cast<index_t>(score_threads) * U) {
      float x[U][max_group];
      step_logits(base, x);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        index_t const t = token(base, u);
        if (t >= t1) { continue; }
        float* lg = lg_row + t * rr;
        if constexpr (R == 4) {
          *reinterpret_cast<float4*>(lg) = make_float4(x[u][0], x[u][1], x[u][2], x[u][3]);
        } else {
#pragma unroll
          for (int h = 0; h < max_group; ++h) {
            if (h < rr) { lg[h] = x[u][h]; }
          }
        }
#pragma unroll
        for (int h = 0; h < max_group; ++h) {
          if (h < rr) { online_add(vmax[h], vsum[h], x[u][h]); }
        }
      }
    }
  }
};

/// Per-head block reduction of online softmax statistics into (out_max[h],
/// out_sum[h]) (thread h < rr writes them): a fixed shuffle tree in each warp,
/// then the warps in order.
template <int Warps>
struct stats_scratch {
  float max[Warps][max_group];
  double sum[Warps][max_group];
};

template <int Warps>
__device__ __forceinline__ void block_reduce_stats(float (&mx)[max_group], double (&sum)[max_group], int rr,
                                                   stats_scratch<Warps>& s_red, float& out_max, double& out_sum)
{
  int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
#pragma unroll
  for (int h = 0; h < max_group; ++h) {
    if (h < rr) {
      for (int o = 16; o > 0; o /= 2) {
        float const mb = __shfl_xor_sync(0xffffffffu, mx[h], o);
        double const sb = __shfl_xor_sync(0xffffffffu, sum[h], o);
        online_merge(mx[h], sum[h], mb, sb);
      }
      if (lane == 0) {
        s_red.max[warp][h] = mx[h];
        s_red.sum[warp][h] = sum[h];
      }
    }
  }
  __syncthreads();
  int const h = static_cast<int>(threadIdx.x);
  if (h < rr) {
    float m = s_red.max[0][h];
    double z = s_red.sum[0][h];
    for (int w = 1; w < Warps; ++w) { online_merge(m, z, s_red.max[w][h], s_red.sum[w][h]); }
    out_max = m;
    out_sum = z;
  }
}

/// grid (chunks, rows), score_threads threads, dynamic shared memory: the
/// row's LUT. Scores the chunk's candidates (the file's comment).
template <int R, class Aggregation, bool Paged>
__global__ void __launch_bounds__(score_threads) score_kernel(__grid_constant__ args const a, Aggregation agg)
{
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ stats_scratch<score_threads / 32> s_red;
  __shared__ std::uint32_t hist_s[Aggregation::needs_softmax ? 1 : hist_bins];
  int const chunk = static_cast<int>(blockIdx.x), row = static_cast<int>(blockIdx.y);
  row_info const ri = row_of(a, row / a.kv_heads);
  index_t const t0 = ri.first + static_cast<index_t>(chunk) * a.chunk_tokens;
  if (ri.k_eff == 0 || t0 >= ri.first + ri.count) { return; }
  index_t const t1 = t0 + a.chunk_tokens < ri.first + ri.count ? t0 + a.chunk_tokens : ri.first + ri.count;
  int const rr = R > 0 ? R : a.r;
  int const lut_n = a.m * a.ksub * rr;
  auto* lut = reinterpret_cast<float*>(smem);
  if constexpr (!Aggregation::needs_softmax) {
    for (int i = static_cast<int>(threadIdx.x); i < hist_bins; i += score_threads) { hist_s[i] = 0u; }
  }
  wait_for_primary();  // the LUT kernel's output
  float const* lut_g = a.lut + static_cast<std::size_t>(row) * lut_n;
  if (lut_n % 4 == 0) {
    for (int i = static_cast<int>(threadIdx.x); i < lut_n / 4; i += score_threads) {
      reinterpret_cast<float4*>(lut)[i] = reinterpret_cast<float4 const*>(lut_g)[i];
    }
  } else {
    for (int i = static_cast<int>(threadIdx.x); i < lut_n; i += score_threads) { lut[i] = lut_g[i]; }
  }
  __syncthreads();
  auto run = [&](auto scorer) {
    if constexpr (Aggregation::needs_softmax) {
      float vmax[max_group];
      double vsum[max_group];
#pragma unroll
      for (int h = 0; h < max_group; ++h) {
        vmax[h] = -::cuda::std::numeric_limits<float>::infinity();
        vsum[h] = 0.0;
      }
      scorer.logits(vmax, vsum);
      float m = 0.f;
      double z = 0.0;
      block_reduce_stats(vmax, vsum, rr, s_red, m, z);
      int const h = static_cast<int>(threadIdx.x);
      if (h < rr) {
        std::size_t const at = (static_cast<std::size_t>(row) * rr + h) * a.max_chunks + chunk;
        a.part_max[at] = m;
        a.part_sum[at] = z;
      }
    } else {
      scorer.keys(hist_s);
      __syncthreads();
      std::uint32_t* hist_g = a.hist + static_cast<std::size_t>(row) * hist_bins;
      for (int i = static_cast<int>(threadIdx.x); i < hist_bins; i += score_threads) {
        if (hist_s[i] != 0u) { atomicAdd(hist_g + i, hist_s[i]); }
      }
    }
  };
  auto dispatch = [&](auto codes) {
    using codes_t = decltype(codes);
    switch (a.m) {
#define PQKV_ADC_SCORE_CASE(MM)                                                                               \
  case MM:                                                                                                    \
    run(chunk_scorer<MM, R, Aggregation, codes_t>{a, agg, lut, codes, static_cast<std::size_t>(row), t0, t1}); \
    break;
      PQKV_ADC_SCORE_CASE(1)
      PQKV_ADC_SCORE_CASE(2)
      PQKV_ADC_SCORE_CASE(4)
      PQKV_ADC_SCORE_CASE(8)
      PQKV_ADC_SCORE_CASE(16)
      PQKV_ADC_SCORE_CASE(32)
#undef PQKV_ADC_SCORE_CASE
      default:
        run(chunk_scorer<0, R, Aggregation, codes_t>{a, agg, lut, codes, static_cast<std::size_t>(row), t0, t1});
        break;
    }
  };
  if constexpr (Paged) {
    int const b = row / a.kv_heads, g = row % a.kv_heads;
    dispatch(paged_rows{a.codes + static_cast<index_t>(g) * a.head_stride,
                        a.block_table + static_cast<std::size_t>(b) * a.table_pages, a.page_stride, a.token_stride,
                        a.last_page, static_cast<std::uint32_t>(a.page_size), a.page_shift});
  } else {
    dispatch(contiguous_rows{a.codes + static_cast<std::size_t>(row) * a.capacity * a.m});
  }
}

// ---- selection over the cluster ----------------------------------------------------------

/// The score a rank key was made from (`score_rank_key` inverted): exact for
/// every score except -0.0 (read back as +0.0) and NaN (one canonical NaN).
__device__ __forceinline__ float rank_key_score(std::uint32_t key)
{
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

using block_scan = cub::BlockScan<std::uint32_t, select_threads>;

/// Block-wide sums of two per-thread counters, returned to every thread.
__device__ __forceinline__ void block_sum_pair(std::uint32_t& a, std::uint32_t& b, std::uint32_t (&s_red)[2][warps])
{
  for (int o = 16; o > 0; o /= 2) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  __syncthreads();  // s_red may still be read from an earlier call
  if (lane == 0) {
    s_red[0][warp] = a;
    s_red[1][warp] = b;
  }
  __syncthreads();
  a = 0;
  b = 0;
  for (int w = 0; w < warps; ++w) {
    a += s_red[0][w];
    b += s_red[1][w];
  }
}

/// Where a select block keeps the keys of its slice [t0, t1): its shared
/// memory when they fit, else the row's part of the workspace.
struct token_store {
  std::uint32_t* keys;  // key of token t at keys[t - offset]
  index_t offset;

  __device__ __forceinline__ std::uint32_t& key(index_t t) const { return keys[t - offset]; }
};

// ---- radix select over the cluster --------------------------------------------------------

/// Bits of pass p: [shift, shift + width) of the key.
__device__ __forceinline__ int pass_shift(int p) { return p == 0 ? 21 : (p == 1 ? 10 : 0); }
__device__ __forceinline__ int pass_bins(int p) { return p == 2 ? 1024 : 2048; }

struct threshold {
  std::uint32_t key;        ///< prefix of the k-th best key (all of it after 3 passes)
  std::uint32_t remaining;  ///< how many of the keys matching `key` are still to take
};

/// Finds, in bins h[0, nb) walked from the top bin down, the bin that holds
/// the `want`-th key; returns (bin, keys still to take in it) to every
/// thread. Block-wide.
__device__ __forceinline__ uint2 walk_down(std::uint32_t const* h, int nb, std::uint32_t want,
                                           block_scan::TempStorage& temp, uint2* s_pick)
{
  constexpr int max_per = hist_bins / select_threads;
  int const per = (nb + select_threads - 1) / select_threads;
  int const top = nb - 1 - static_cast<int>(threadIdx.x) * per;  // this thread's bins: top, top-1, ...
  std::uint32_t local[max_per];
  std::uint32_t sum = 0;
#pragma unroll
  for (int i = 0; i < max_per; ++i) {
    local[i] = i < per && top - i >= 0 ? h[top - i] : 0u;
    sum += local[i];
  }
  std::uint32_t above = 0;
  block_scan(temp).ExclusiveSum(sum, above);
#pragma unroll
  for (int i = 0; i < max_per; ++i) {
    if (i < per && top - i >= 0 && above < want && want <= above + local[i]) {
      *s_pick = make_uint2(static_cast<std::uint32_t>(top - i), want - above);
    }
    above += local[i];
  }
  __syncthreads();
  uint2 const pick = *s_pick;
  __syncthreads();
  return pick;
}


/// Dynamic shared memory of a select block: histograms, then the keys of
/// its slice when they fit.
struct select_smem {
  static constexpr std::size_t hist = 0;                                         // u32 [2][hist_bins]
  static constexpr std::size_t comb = 2 * hist_bins * sizeof(std::uint32_t);     // u32 [hist_bins]
  static constexpr std::size_t keys = comb + hist_bins * sizeof(std::uint32_t);  // u32 [store_tokens]
  [[nodiscard]] static constexpr std::size_t bytes(int store_tokens)
  {
    return keys + static_cast<std::size_t>(store_tokens) * sizeof(std::uint32_t);
  }
};

/// The row's softmax statistics from the score kernel's per-chunk partials:
/// warp h merges head h, its lanes striding over the chunks, then a fixed
/// shuffle tree (the same M and Z in every block).
template <int R>
__device__ __forceinline__ void row_stats(args const& a, int row, int chunks, float* s_max, float* s_inv_z)
{
  int const rr = R > 0 ? R : a.r;
  int const h = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  if (h >= rr) { return; }
  std::size_t const base = (static_cast<std::size_t>(row) * rr + h) * a.max_chunks;
  float mx = -::cuda::std::numeric_limits<float>::infinity();
  double z = 0.0;
  for (int c = lane; c < chunks; c += 32) { online_merge(mx, z, a.part_max[base + c], a.part_sum[base + c]); }
  for (int o = 16; o > 0; o /= 2) {
    float const mb = __shfl_xor_sync(0xffffffffu, mx, o);
    double const zb = __shfl_xor_sync(0xffffffffu, z, o);
    online_merge(mx, z, mb, zb);
  }
  if (lane == 0) {
    s_max[h] = mx;
    s_inv_z[h] = static_cast<float>(1.0 / z);
  }
}

/// Per-warp offsets of one emit tile, and the tile's totals.
struct emit_scratch {
  std::uint32_t first_out[warps];  ///< output position of the warp's first selected token
  std::uint32_t first_eq[warps];   ///< rank among the row's keys equal to T of the warp's first one
  std::uint32_t sel_total, eq_total;
};

/// Writes the selected tokens of the slice [t0, t1) ascending from output
/// position `pos`: every key above T, and keys equal to T while their rank
/// among the row's equal keys (`eq_before` in lower blocks) is below
/// th.remaining. Tiles of select_threads * emit_items tokens; warp w takes
/// tokens [w * 32 * emit_items, (w + 1) * 32 * emit_items) of a tile, item i
/// of lane l being token i * 32 + l (conflict-free shared loads, coalesced
/// stores). Ballots give each warp its counts; warp 0 scans the 32 warps'
/// counts, so a tile costs two block barriers.
__device__ __forceinline__ void emit_slice(args const& a, int row, token_store const& st, index_t t0, index_t t1,
                                           threshold const& th, std::uint32_t pos, std::uint32_t eq_before,
                                           emit_scratch& s)
{
  constexpr unsigned full = 0xffffffffu;
  int const lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  unsigned const lanes_below = (1u << lane) - 1u;
  std::int32_t* out_row = a.out + static_cast<std::size_t>(row) * a.out_k;
  constexpr index_t tile = static_cast<index_t>(select_threads) * emit_items;
  for (index_t base = t0; base < t1; base += tile) {
    index_t const wbase = base + static_cast<index_t>(warp) * (32 * emit_items) + lane;
    // Lane i < emit_items keeps the ballot of keys above T of item i, lane
    // emit_items + i the ballot of keys equal to T.
    unsigned mask = 0;
    std::uint32_t key[emit_items];
#pragma unroll
    for (int i = 0; i < emit_items; ++i) {
      index_t const t = wbase + i * 32;
      key[i] = t < t1 ? st.key(t) : 0u;
    }
#pragma unroll
    for (int i = 0; i < emit_items; ++i) {
      bool const valid = wbase + i * 32 < t1;
      unsigned const gt = __ballot_sync(full, valid && key[i] > th.key);
      unsigned const eq = __ballot_sync(full, valid && key[i] == th.key);
      mask = lane == i ? gt : (lane == emit_items + i ? eq : mask);
    }
    static_assert(2 * emit_items <= 32);
    std::uint32_t const gt_count = __reduce_add_sync(full, lane < emit_items ? __popc(mask) : 0u);
    std::uint32_t const eq_count = __reduce_add_sync(full, lane >= emit_items ? __popc(mask) : 0u);
    if (lane == 0) {
      s.first_out[warp] = gt_count;
      s.first_eq[warp] = eq_count;
    }
    __syncthreads();
    if (warp == 0) {
      // Warps in token order: the equal keys each takes, then its output offset.
      std::uint32_t const g = s.first_out[lane], e = s.first_eq[lane];
      std::uint32_t e_incl = e;
      for (int o = 1; o < 32; o *= 2) {
        std::uint32_t const y = __shfl_up_sync(full, e_incl, o);
        if (lane >= o) { e_incl += y; }
      }
      std::uint32_t const e_first = eq_before + e_incl - e;
      std::uint32_t const room = e_first < th.remaining ? th.remaining - e_first : 0u;
      std::uint32_t const sel = g + (e < room ? e : room);
      std::uint32_t sel_incl = sel;
      for (int o = 1; o < 32; o *= 2) {
        std::uint32_t const y = __shfl_up_sync(full, sel_incl, o);
        if (lane >= o) { sel_incl += y; }
      }
      s.first_out[lane] = pos + sel_incl - sel;
      s.first_eq[lane] = e_first;
      if (lane == 31) {
        s.sel_total = sel_incl;
        s.eq_total = e_incl;
      }
    }
    __syncthreads();
    std::uint32_t q = s.first_out[warp], e_rank = s.first_eq[warp];
#pragma unroll
    for (int i = 0; i < emit_items; ++i) {
      unsigned const gt = __shfl_sync(full, mask, i);
      unsigned const eq = __shfl_sync(full, mask, emit_items + i);
      bool const take = ((gt >> lane) & 1u) != 0u ||
                        (((eq >> lane) & 1u) != 0u && e_rank + static_cast<std::uint32_t>(__popc(eq & lanes_below)) < th.remaining);
      unsigned const taken = __ballot_sync(full, take);
      if (take) {
        std::uint32_t const at = q + static_cast<std::uint32_t>(__popc(taken & lanes_below));
        // The score is re-read from the key only when asked for: the
        // index-only path keeps its registers.
        if (a.scores != nullptr) { a.scores[static_cast<std::size_t>(row) * a.out_k + at] = rank_key_score(key[i]); }
        out_row[at] = static_cast<std::int32_t>(wbase + i * 32);
      }
      q += static_cast<std::uint32_t>(__popc(taken));
      e_rank += static_cast<std::uint32_t>(__popc(eq));
    }
    pos += s.sel_total;
    eq_before += s.eq_total;
  }
}

/// grid (C, rows), cluster (C, 1, 1), select_threads threads: the selection
/// of the file's comment.
template <int R, class Aggregation>
__global__ void __launch_bounds__(select_threads, 1) select_kernel(__grid_constant__ args const a, Aggregation agg)
{
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ std::uint32_t s_above;  ///< this block's keys whose 22-bit prefix beats T's (other blocks read it)
  __shared__ float s_max[max_group], s_inv_z[max_group];
  __shared__ std::uint32_t s_red[2][warps];
  __shared__ uint2 s_pick;
  __shared__ block_scan::TempStorage temp;
  __shared__ emit_scratch s_emit;

  cg::cluster_group cluster = cg::this_cluster();
  int const rank = static_cast<int>(cluster.block_rank());
  int const C = static_cast<int>(cluster.num_blocks());
  int const row = static_cast<int>(blockIdx.y);
  int const tid = static_cast<int>(threadIdx.x);
  row_info const ri = row_of(a, row / a.kv_heads);

  std::int32_t* out_row = a.out + static_cast<std::size_t>(row) * a.out_k;
  // The scores' row is addressed from the kernel parameters where it is
  // used, so that no register stays live for it through the selection.
  if (rank == 0) {
    for (int i = ri.k_eff + tid; i < a.out_k; i += select_threads) { out_row[i] = -1; }
    if (a.scores != nullptr) {
      for (int i = ri.k_eff + tid; i < a.out_k; i += select_threads) {
        a.scores[static_cast<std::size_t>(row) * a.out_k + i] = -::cuda::std::numeric_limits<float>::infinity();
      }
    }
    if (tid == 0) { a.valid[row] = ri.k_eff; }
  }
  if (ri.k_eff == 0) { return; }  // the same for every block of the cluster: none waits at a barrier

  auto* hist = reinterpret_cast<std::uint32_t*>(smem + select_smem::hist);
  auto* comb = reinterpret_cast<std::uint32_t*>(smem + select_smem::comb);
  for (int i = tid; i < 2 * hist_bins; i += select_threads) { hist[i] = 0u; }
  if (tid == 0) { s_above = 0u; }

  // This block's slice of the candidates, its keys in shared memory when
  // they fit, else in place in the workspace.
  index_t const per = (ri.count + C - 1) / C;
  index_t const lo = static_cast<index_t>(rank) * per < ri.count ? static_cast<index_t>(rank) * per : ri.count;
  index_t const hi = lo + per < ri.count ? lo + per : ri.count;
  index_t const t0 = ri.first + lo, t1 = ri.first + hi;
  std::uint32_t* keys_g = a.keys + static_cast<std::size_t>(row) * a.capacity;
  bool const in_smem = per <= a.store_tokens;
  token_store st{};
  st.keys = in_smem ? reinterpret_cast<std::uint32_t*>(smem + select_smem::keys) : keys_g;
  st.offset = in_smem ? t0 : 0;
  int const rr = R > 0 ? R : a.r;

  wait_for_primary();  // the score kernel's keys or logits and statistics
  if constexpr (Aggregation::needs_softmax) {
    int const chunks = static_cast<int>((ri.count + a.chunk_tokens - 1) / a.chunk_tokens);
    row_stats<R>(a, row, chunks, s_max, s_inv_z);
  }
  __syncthreads();

  // The slice's keys (softmax: from the logits and the row's statistics) and
  // the histogram of their top 11 bits. Warps stay converged (uniform trip
  // counts) for the warp-aggregated histogram.
  // gqa::sum / gqa::max: the score kernel made the row's histogram of the
  // top 11 bits; only keys that live in shared memory need a copy here.
  constexpr int V = 4;
  bool const scan = Aggregation::needs_softmax || in_smem;
  float const* lg_row = a.logits + static_cast<std::size_t>(row) * a.capacity * rr;
  for (index_t base = t0; scan && base < t1; base += static_cast<index_t>(select_threads) * V) {
    std::uint32_t key[V];
    if constexpr (Aggregation::needs_softmax) {
      float x[V][max_group];
#pragma unroll
      for (int u = 0; u < V; ++u) {
        index_t const t = base + tid + static_cast<index_t>(u) * select_threads;
        if (t >= t1) { continue; }
        float const* lg = lg_row + t * rr;
        if constexpr (R == 4) {
          float4 const v = *reinterpret_cast<float4 const*>(lg);
          x[u][0] = v.x;
          x[u][1] = v.y;
          x[u][2] = v.z;
          x[u][3] = v.w;
        } else {
#pragma unroll
          for (int h = 0; h < max_group; ++h) { x[u][h] = h < rr ? lg[h] : 0.f; }
        }
      }
#pragma unroll
      for (int u = 0; u < V; ++u) {
        float acc = agg.init();
#pragma unroll
        for (int h = 0; h < max_group; ++h) {
          if (h < rr) { acc = agg.combine(acc, __fmul_rn(expf(__fsub_rn(x[u][h], s_max[h])), s_inv_z[h])); }
        }
        key[u] = score_rank_key(agg.finish(acc));
      }
    } else {
#pragma unroll
      for (int u = 0; u < V; ++u) {
        index_t const t = base + tid + static_cast<index_t>(u) * select_threads;
        key[u] = t < t1 ? keys_g[t] : 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < V; ++u) {
      index_t const t = base + tid + static_cast<index_t>(u) * select_threads;
      bool const valid = t < t1;
      if (valid) { st.key(t) = key[u]; }
      if constexpr (Aggregation::needs_softmax) { warp_hist_add(hist, key[u] >> 21, valid); }
    }
  }

  // ---- radix select: 3 digits of the k-th best key T, the same in every block.
  threshold th{0u, static_cast<std::uint32_t>(ri.k_eff)};
  std::uint32_t gt_before = 0, eq_before = 0;  // keys above T, equal to T, in the lower-ranked blocks
  for (int p = 0; p < radix_passes; ++p) {
    std::uint32_t* own = hist + (p & 1) * hist_bins;
    int const nb = pass_bins(p), shift = pass_shift(p);
    std::uint32_t above_prefix = 0;  // last pass: keys whose 22-bit prefix beats T's
    if (p > 0) {
      // Pass p - 2 used this buffer; every block of the cluster is past it.
      for (int i = tid; i < nb; i += select_threads) { own[i] = 0u; }
      __syncthreads();
      int const prev_shift = pass_shift(p - 1);
      std::uint32_t const want = th.key >> prev_shift, digit_mask = static_cast<std::uint32_t>(nb - 1);
      // Several keys in flight per thread: the keys may live in the workspace.
      constexpr int V = 8;
      for (index_t base = t0; base < t1; base += static_cast<index_t>(select_threads) * V) {
        std::uint32_t key[V];
#pragma unroll
        for (int u = 0; u < V; ++u) {
          index_t const t = base + tid + static_cast<index_t>(u) * select_threads;
          key[u] = t < t1 ? st.key(t) : 0u;
        }
#pragma unroll
        for (int u = 0; u < V; ++u) {
          index_t const t = base + tid + static_cast<index_t>(u) * select_threads;
          std::uint32_t const pre = key[u] >> prev_shift;
          if (t < t1 && pre == want) { atomicAdd(own + ((key[u] >> shift) & digit_mask), 1u); }
          above_prefix += t < t1 && pre > want ? 1u : 0u;
        }
      }
    }
    uint2 pick;
    if (p == 0 && !Aggregation::needs_softmax) {
      // The score kernel's histogram of the whole row.
      pick = walk_down(a.hist + static_cast<std::size_t>(row) * hist_bins, nb, th.remaining, temp, &s_pick);
    } else if (C == 1) {
      __syncthreads();
      pick = walk_down(own, nb, th.remaining, temp, &s_pick);
    } else {
      bool const last = p == radix_passes - 1;
      if (last) {
        std::uint32_t const w = __reduce_add_sync(0xffffffffu, above_prefix);
        if (tid % 32 == 0 && w != 0u) { atomicAdd(&s_above, w); }
      }
      cluster.sync();  // every block's histogram of this pass is complete
      // The cluster's histogram, summed in rank order: every block reads
      // all blocks' bins (loads of all sources in flight together) and walks
      // the sum itself, so a pass needs one cluster barrier. The other
      // blocks read `own` until they reach the next pass's barrier; it is
      // rewritten two passes later.
      // The last pass has one bin per thread; `lower` keeps its count in
      // the lower-ranked blocks, whose tokens come first in the output.
      static_assert(select_threads == 1024, "the last pass has one bin per thread");
      std::uint32_t lower = 0;
      for (int i = tid; i < nb; i += select_threads) {
        std::uint32_t v[max_cluster];
#pragma unroll
        for (int src = 0; src < max_cluster; ++src) { v[src] = src < C ? cluster.map_shared_rank(own, src)[i] : 0u; }
        std::uint32_t sum = 0;
#pragma unroll
        for (int src = 0; src < max_cluster; ++src) {
          lower += src < rank ? v[src] : 0u;
          sum += v[src];
        }
        comb[i] = sum;
      }
      __syncthreads();
      pick = walk_down(comb, nb, th.remaining, temp, &s_pick);
      if (last) {
        // Lower blocks' keys above T: above its 22-bit prefix, or in a
        // higher last digit; equal to T: in its last digit.
        std::uint32_t g = tid > static_cast<int>(pick.x) ? lower : 0u;
        std::uint32_t e = tid == static_cast<int>(pick.x) ? lower : 0u;
        if (tid < rank) { g += *cluster.map_shared_rank(&s_above, tid); }
        block_sum_pair(g, e, s_red);
        gt_before = g;
        eq_before = e;
      }
    }
    th.key |= pick.x << shift;
    th.remaining = pick.y;
  }

  // ---- emit: this block's tokens come after those of the lower ranks.
  std::uint32_t pos = gt_before + (eq_before < th.remaining ? eq_before : th.remaining);
  emit_slice(a, row, st, t0, t1, th, pos, eq_before, s_emit);
  // No block leaves while another may still read its shared memory.
  if (C > 1) { cluster.sync(); }
}

// ---- launch ------------------------------------------------------------------------------

/// Workspace layout: offsets of each part, 256-byte aligned.
struct workspace_layout {
  std::size_t lut = 0, keys = 0, hist = 0, logits = 0, part_max = 0, part_sum = 0, total = 0;

  static workspace_layout make(index_t rows, int r, int m, int ksub, index_t capacity, index_t max_chunks,
                               bool softmax)
  {
    auto const up = [](std::size_t x) { return (x + 255) / 256 * 256; };
    auto const urows = static_cast<std::size_t>(rows);
    auto const cells = urows * static_cast<std::size_t>(capacity);
    std::size_t const partials = softmax ? urows * static_cast<std::size_t>(r) * static_cast<std::size_t>(max_chunks) : 0;
    workspace_layout w;
    std::size_t at = 0;
    w.lut = at;
    at += up(urows * static_cast<std::size_t>(m) * ksub * r * sizeof(float));
    w.keys = at;
    at += up(cells * sizeof(std::uint32_t));
    w.hist = at;
    at += up(urows * hist_bins * sizeof(std::uint32_t));
    w.logits = at;
    at += up(softmax ? cells * static_cast<std::size_t>(r) * sizeof(float) : 0);
    w.part_max = at;
    at += up(partials * sizeof(float));
    w.part_sum = at;
    at += up(partials * sizeof(double));
    w.total = at;
    return w;
  }
};

/// Raises the dynamic shared-memory limits of the kernels this policy uses
/// and allows clusters of 16.
template <class Aggregation>
void prepare_kernels(int score_smem, int select_smem_bytes)
{
  for (auto* kernel : {score_kernel<4, Aggregation, false>, score_kernel<0, Aggregation, false>,
                       score_kernel<4, Aggregation, true>, score_kernel<0, Aggregation, true>}) {
    PQKV_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, score_smem));
  }
  for (auto* kernel : {select_kernel<4, Aggregation>, select_kernel<0, Aggregation>}) {
    PQKV_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, select_smem_bytes));
    PQKV_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  }
}

/// Static shared memory of the select kernel (the dynamic part comes on top).
template <class Aggregation>
int select_static_smem()
{
  cudaFuncAttributes attr{};
  PQKV_CUDA_TRY(cudaFuncGetAttributes(&attr, select_kernel<0, Aggregation>));
  return static_cast<int>(attr.sharedSizeBytes);
}

/// A launch configuration; `cluster` > 0 adds the cluster dimension, and
/// `dependent` makes the kernel a programmatic dependent of the one before.
inline cudaLaunchConfig_t launch_config(dim3 grid, int threads, std::size_t smem, cudaStream_t stream,
                                        int cluster, bool dependent, cudaLaunchAttribute (&attr)[2])
{
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(static_cast<unsigned>(threads), 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  unsigned n = 0;
  if (cluster > 0) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  if (dependent) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cfg;
}

/// How many clusters of `cluster` blocks the device runs at once with `smem`
/// bytes of dynamic shared memory per select block (0: that size never fits).
template <class Aggregation>
int active_clusters(int cluster, std::size_t smem)
{
  cudaLaunchAttribute attr[2];
  auto cfg = launch_config(dim3(static_cast<unsigned>(cluster), 1, 1), select_threads, smem, nullptr, cluster, false, attr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, select_kernel<0, Aggregation>, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // a refused size is an answer, not an error
    return 0;
  }
  return n;
}

/// Fills p[0, n) with `value` (the scores' padding when no row has a candidate).
template <int Unused = 0>
__global__ void fill_kernel(float* p, std::size_t n, float value)
{
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    p[i] = value;
  }
}

inline void fill_async(float* p, std::size_t n, float value, cudaStream_t stream)
{
  if (n == 0) { return; }
  auto const blocks = static_cast<unsigned>(n / 256 + 1 < 1024 ? n / 256 + 1 : 1024);
  fill_kernel<><<<blocks, 256, 0, stream>>>(p, n, value);
  PQKV_CUDA_CHECK_LAST();
}

/// Launches the three kernels on `stream`; `a` is complete, `chunks` the
/// score grid's extent per row. Query is the queries' element type; paged
/// codes when a.block_table is set; `channels` the LUT's query channel order.
template <class Query, class Aggregation, class Channels>
void launch(args const& a, Aggregation const& agg, Channels const& channels, unsigned rows, int chunks, int cluster,
            cudaStream_t stream)
{
  if (rows == 0) { return; }
  auto const lut_z = static_cast<unsigned>((a.ksub + lut_centroids - 1) / lut_centroids);
  lut_kernel<Query, Channels><<<dim3(static_cast<unsigned>(a.m), rows, lut_z), lut_threads, 0, stream>>>(a, channels);
  PQKV_CUDA_CHECK_LAST();
  bool const group4 = a.r == 4;
  cudaLaunchAttribute attr[2];
  std::size_t const lut_bytes = static_cast<std::size_t>(a.m) * a.ksub * a.r * sizeof(float);
  auto score_cfg = launch_config(dim3(static_cast<unsigned>(chunks), rows, 1), score_threads, lut_bytes, stream, 0,
                                 true, attr);
  auto* const score = a.block_table != nullptr
                        ? (group4 ? score_kernel<4, Aggregation, true> : score_kernel<0, Aggregation, true>)
                        : (group4 ? score_kernel<4, Aggregation, false> : score_kernel<0, Aggregation, false>);
  PQKV_CUDA_TRY(cudaLaunchKernelEx(&score_cfg, score, a, agg));
  auto select_cfg = launch_config(dim3(static_cast<unsigned>(cluster), rows, 1), select_threads,
                                  select_smem::bytes(a.store_tokens), stream, cluster, true, attr);
  PQKV_CUDA_TRY(cudaLaunchKernelEx(&select_cfg, group4 ? select_kernel<4, Aggregation> : select_kernel<0, Aggregation>,
                                   a, agg));
}

}  // namespace pqkv::detail::adc_gpu
