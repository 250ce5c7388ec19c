// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Kernels of `pqkv::gpu::kmeans_trainer` (codebook/kmeans.cuh). Users
/// never name this header.
///
/// One `train` call is a chain of stream-ordered launches over all
/// (head, subspace) problems P = h * m + s of a layer:
///   prologue   zeroes the per-problem state (sums, counts, flags, |x| maxima)
///   subsample  (only when max_train_points < tokens) per head: the
///              reference's partial Fisher-Yates draw, then the rows ascending
///   pack       training rows -> float [P][n][dsub] and norms [P][n]; per key
///              channel the largest |x| (fixed-point scale of the sums)
///   init       random_sample: the reference's distinct draws (one warp per
///              problem); n < ksub: row k mod n; provided: nothing to do;
///              kmeans_plus_plus: ksub - 1 launches of kpp_kernel, one per
///              pick over all problems (see "k-means++" below)
///   assign(0), then per iteration it = 1..max_iter: step(it), assign(it);
///   then step(max_iter + 1), which only records the last objective.
/// assign: the fused gemm-form argmin (distances never written), the clamped
///   distance of each row, and per-cluster sums and counts. Sums are
///   fixed-point integers (each channel scaled by a power of two so its
///   largest |x| is below 2^17, 32-bit per block in shared memory, 64-bit in
///   global memory): integer addition is associative, so the sums, and so the
///   centroids, do not depend on block or atomic order (determinism), and are
///   closer to exact than float sums.
/// step(it): sums the objective of the last assignment in block order,
///   records it and applies the tolerance test on the device (no host round
///   trip): a problem that stops clears its `active` flag, and later
///   assign/step blocks of that problem exit at once. Otherwise it divides
///   sums by counts, repairs empty clusters with the farthest rows (distance
///   descending, row ascending, one distinct row each, clusters ascending)
///   and zeroes the sums for the next assignment.
/// Kernels that are not otherwise templates take an unused template
/// parameter, so that several translation units of one program may include
/// this header (a plain __global__ function would be defined in each).

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/random.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/encode_gpu_kernels.cuh>

#include <cub/block/block_scan.cuh>
#include <cuda/std/limits>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pqkv::detail::kmeans_gpu {

namespace ng = pqkv::detail::nearest_gpu;

inline constexpr int fixed_bits = 17;        ///< |x| * scale < 2^17 per channel
inline constexpr index_t block_rows_max = 8192;  ///< rows one block sums in 32-bit: 8192 * 2^17 = 2^30
inline constexpr int smem_sums_max_dsub = 64;    ///< larger dsub: sums go straight to global memory

/// The RNG streams of the CPU reference (detail::kmeans::stream_id).
__host__ __device__ constexpr std::uint64_t stream_of(std::uint64_t tag, index_t head, index_t sub) noexcept
{
  return (tag << 48) ^ (static_cast<std::uint64_t>(head) << 16) ^ static_cast<std::uint64_t>(sub);
}

/// Per-call header the report reads back.
struct header {
  index_t heads, n, tokens;
  int max_iter, small;  // small: n < ksub (no k-means run)
};

/// Workspace pointers and sizes of one call.
struct args {
  header* hdr;
  float* xp;                  // [P][n][dsub] packed training rows
  float* xn;                  // [P][n] squared norms (fma chain)
  float* dist;                // [P][n] clamped distance to the assigned centroid
  std::uint8_t* assign;       // [P][n] assigned centroid
  unsigned long long* sums;   // [P][ksub][dsub] fixed-point sums
  std::uint32_t* counts;      // [P][ksub]
  std::uint32_t* amax;        // [heads][dim] float bits of max |x|
  double* part_obj;           // [P][bpp]
  double* hist;               // [P][max_iter + 1]
  int* iters;                 // [P]
  int* active;                // [P]
  std::int32_t* rows;         // [heads][n] (subsample)
  std::int32_t* perm;         // [heads][tokens] (subsample)
  std::int32_t* flags;        // [heads][tokens] (subsample)
  float* c;                   // [P][ksub][dsub] centroids (the caller's output)
  double* kpp_sum;            // [P][ceil(n / 16)] k-means++: D^2 block sums, then their running sums
  std::int32_t* kpp_pick;     // [P] k-means++: the row picked last
  std::uint32_t* kpp_ticket;  // [P] k-means++: blocks of the current pick that are done
  index_t heads, tokens, n;
  int m, dsub, ksub, dim;
  int bpp;                    // assign blocks per problem
  int preassigned;            // 1: assign/dist were written by the tensor-core pass; assign only sums
  index_t rows_per_block;     // multiple of bm, <= block_rows_max
  int max_iter;
  double tol;
  std::uint64_t seed;
};

// ---- prologue, subsample, pack, init --------------------------------------------------------

template <int Unused = 0>
__global__ void prologue_kernel(args a, int small)
{
  index_t const problems = a.heads * a.m;
  index_t const nsum = problems * a.ksub * a.dsub;
  index_t const stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  index_t const i0 = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (index_t i = i0; i < nsum; i += stride) { a.sums[i] = 0; }
  for (index_t i = i0; i < problems * a.ksub; i += stride) { a.counts[i] = 0; }
  for (index_t i = i0; i < a.heads * a.dim; i += stride) { a.amax[i] = 0; }
  for (index_t i = i0; i < problems; i += stride) {
    a.active[i] = 1;
    a.iters[i] = 0;
  }
  if (a.kpp_ticket != nullptr) {
    for (index_t i = i0; i < problems; i += stride) { a.kpp_ticket[i] = 0; }
  }
  if (i0 == 0) { *a.hdr = header{a.heads, a.n, a.tokens, a.max_iter, small}; }
}

/// grid heads, 1024 threads: the reference's draw of n distinct rows of
/// [0, tokens) (partial Fisher-Yates, sequential by nature: one thread), then
/// the drawn rows in ascending order by a block-wide compaction of flags.
template <int Unused = 0>
__global__ void __launch_bounds__(1024) subsample_kernel(args a)
{
  using scan = cub::BlockScan<int, 1024>;
  __shared__ typename scan::TempStorage tmp;
  __shared__ int base;
  index_t const h = blockIdx.x;
  std::int32_t* const perm = a.perm + h * a.tokens;
  std::int32_t* const flags = a.flags + h * a.tokens;
  for (index_t t = threadIdx.x; t < a.tokens; t += 1024) {
    perm[t] = static_cast<std::int32_t>(t);
    flags[t] = 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    std::uint64_t const stream = stream_of(1, h, 0);
    for (index_t i = 0; i < a.n; ++i) {
      index_t const j = i + static_cast<index_t>(random_below(a.seed, stream, static_cast<std::uint64_t>(i),
                                                              static_cast<std::uint64_t>(a.tokens - i)));
      std::int32_t const v = perm[j];
      perm[j] = perm[i];
      perm[i] = v;
      flags[v] = 1;
    }
    base = 0;
  }
  __syncthreads();
  for (index_t t0 = 0; t0 < a.tokens; t0 += 1024) {
    index_t const t = t0 + threadIdx.x;
    int const f = t < a.tokens ? flags[t] : 0;
    int offset = 0, total = 0;
    scan(tmp).ExclusiveSum(f, offset, total);
    if (f != 0) { a.rows[h * a.n + base + offset] = static_cast<std::int32_t>(t); }
    __syncthreads();
    if (threadIdx.x == 0) { base += total; }
    __syncthreads();
  }
}

/// grid (row blocks, heads), 256 threads: one thread per (training row, subspace).
template <class Key>
__global__ void __launch_bounds__(256) pack_kernel(args a, Key const* keys, index_t s0, index_t s1, index_t s2)
{
  __shared__ std::uint32_t smax[4096];
  index_t const h = blockIdx.y;
  for (int c = threadIdx.x; c < a.dim; c += blockDim.x) { smax[c] = 0; }
  __syncthreads();
  index_t const e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < a.n * a.m) {
    index_t const i = e / a.m;
    int const s = static_cast<int>(e % a.m);
    index_t const row = a.rows != nullptr ? a.rows[h * a.n + i] : i;
    Key const* src = keys + h * s0 + row * s1 + static_cast<index_t>(s) * a.dsub * s2;
    index_t const p = h * a.m + s;
    float* dst = a.xp + (p * a.n + i) * a.dsub;
    float norm = 0.f;
    for (int j = 0; j < a.dsub; ++j) {
      float const v = to_float(src[j * s2]);
      dst[j] = v;
      norm = fmaf(v, v, norm);
      atomicMax(smax + s * a.dsub + j, __float_as_uint(fabsf(v)));
    }
    a.xn[p * a.n + i] = norm;
  }
  __syncthreads();
  for (int c = threadIdx.x; c < a.dim; c += blockDim.x) {
    if (smax[c] != 0) { atomicMax(a.amax + h * a.dim + c, smax[c]); }
  }
}

/// grid P, 32 threads: init centroids. random_sample: ksub distinct rows by
/// the reference's partial Fisher-Yates over [0, n), the displaced values kept
/// in a small map (only positions >= i matter at draw i). small: row k mod n.
template <int Unused = 0>
__global__ void __launch_bounds__(32) init_kernel(args a, int random_sample, int small)
{
  __shared__ std::int32_t map_pos[256], map_val[256], picks[256];
  __shared__ int map_size;
  index_t const p = blockIdx.x, h = p / a.m, s = p % a.m;
  int const lane = threadIdx.x;
  if (small) {
    for (int k = lane; k < a.ksub; k += 32) { picks[k] = static_cast<std::int32_t>(k % a.n); }
  } else if (random_sample) {
    if (lane == 0) { map_size = 0; }
    __syncwarp();
    std::uint64_t const stream = stream_of(2, h, s);
    // value at position q: the map's entry, or q itself
    auto lookup = [&](index_t q, int& slot) {
      slot = -1;
      for (int b = 0; b < map_size; b += 32) {
        bool const hit = b + lane < map_size && map_pos[b + lane] == q;
        unsigned const ballot = __ballot_sync(0xffffffffu, hit);
        if (ballot != 0) {
          slot = b + __ffs(static_cast<int>(ballot)) - 1;
          break;
        }
      }
      return slot >= 0 ? static_cast<index_t>(map_val[slot]) : q;
    };
    for (int i = 0; i < a.ksub; ++i) {
      index_t const j = i + static_cast<index_t>(random_below(a.seed, stream, static_cast<std::uint64_t>(i),
                                                              static_cast<std::uint64_t>(a.n - i)));
      int si = -1, sj = -1;
      index_t const vi = lookup(i, si);
      index_t const vj = lookup(j, sj);
      __syncwarp();
      if (lane == 0) {
        picks[i] = static_cast<std::int32_t>(vj);
        if (j != i) {  // position j now holds vi; position i is never read again
          if (sj >= 0) {
            map_val[sj] = static_cast<std::int32_t>(vi);
          } else {
            map_pos[map_size] = static_cast<std::int32_t>(j);
            map_val[map_size] = static_cast<std::int32_t>(vi);
            ++map_size;
          }
        }
      }
      __syncwarp();
    }
  } else {
    return;
  }
  __syncwarp();
  float* const c = a.c + p * a.ksub * a.dsub;
  float const* const x = a.xp + p * a.n * a.dsub;
  for (int e = lane; e < a.ksub * a.dsub; e += 32) {
    c[e] = x[static_cast<index_t>(picks[e / a.dsub]) * a.dsub + e % a.dsub];
  }
}

// ---- k-means++ --------------------------------------------------------------------------------
//
// The reference's D^2 sampling (detail/kmeans_cpu.hpp, init_kmeans_plus_plus),
// reproduced bit for bit: one launch per pick k = 1..ksub-1 over every problem,
// grid (P, row blocks of kpp_rows). Each block lowers D^2 of its rows with
// centroid k-1 (the reference's exact-form chain: diff = x_j - c_j,
// acc = fma(diff, diff, acc), j ascending), keeps D^2 in `dist`, and writes the
// double `block_tree_sum` of each group of 16 rows. The last block of a
// problem to finish (a ticket counter) then does what cannot be parallel
// without changing the rounding: the running double sum of the group sums in
// group order (one thread, sums staged through shared memory), u =
// random_unit(k) * total, the first group whose running sum passes u (all
// threads: the running sums are monotone, so exactly one group qualifies),
// the row walk inside it (one thread) and the fallbacks; it writes centroid k
// (and centroid 0 at k = 1). Why one launch per pick rather than one
// persistent block per problem: a pick streams all n x dsub floats of the
// problem, and with m = 1..4 there are fewer problems than SMs, so a block per
// problem would use a fraction of the memory bandwidth; spread over the whole
// grid a pick runs at full bandwidth, and the sequential part (n / 16 double
// additions) overlaps with other problems' blocks.

inline constexpr int kpp_threads = 256;
inline constexpr int kpp_rows = 1024;   ///< rows per block (4 per thread): 64 groups of 16
inline constexpr int kpp_group = 16;    ///< rows per D^2 group sum: the reference's `lanes`
inline constexpr int kpp_stage = 2048;  ///< group sums per shared-memory stage of the running sum

/// The reference's fixed-tree double sum of 16 D^2 values (block_tree_sum).
__device__ __forceinline__ double kpp_tree16(float const* d)
{
  double q[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    q[i] = __dadd_rn(__dadd_rn(static_cast<double>(d[i]), static_cast<double>(d[4 + i])),
                     __dadd_rn(static_cast<double>(d[8 + i]), static_cast<double>(d[12 + i])));
  }
  return __dadd_rn(__dadd_rn(q[0], q[1]), __dadd_rn(q[2], q[3]));
}

/// Pick k (1..ksub-1) of k-means++ for every problem; see above.
template <int Dsub>
__global__ void __launch_bounds__(kpp_threads) kpp_kernel(args a, int k)
{
  __shared__ float sd[kpp_rows];
  __shared__ double sstage[kpp_stage];
  __shared__ __align__(16) float sc[Dsub];
  __shared__ index_t sred[kpp_threads];
  __shared__ int last;
  __shared__ double stotal;
  __shared__ index_t sfound, spick;
  int const tid = threadIdx.x;
  index_t const p = blockIdx.x, h = p / a.m, s = p % a.m, n = a.n;
  std::uint64_t const stream = stream_of(3, h, s);
  float const* const x = a.xp + p * n * Dsub;
  float* const d = a.dist + p * n;
  index_t const nb = (n + kpp_group - 1) / kpp_group;
  double* const bs = a.kpp_sum + p * nb;
  index_t const prev = k == 1 ? static_cast<index_t>(random_below(a.seed, stream, 0, static_cast<std::uint64_t>(n)))
                              : static_cast<index_t>(a.kpp_pick[p]);
  for (int j = tid; j < Dsub; j += kpp_threads) { sc[j] = x[prev * Dsub + j]; }
  __syncthreads();

  // ---- D^2 of this block's rows and their group sums ----
  index_t const r0 = static_cast<index_t>(blockIdx.y) * kpp_rows;
#pragma unroll
  for (int q = 0; q < kpp_rows / kpp_threads; ++q) {
    int const r = q * kpp_threads + tid;
    index_t const i = r0 + r;
    float v = 0.f;  // rows past n count 0, as the reference's padding
    if (i < n) {
      float4 const* xi = reinterpret_cast<float4 const*>(x + i * Dsub);
      float acc = 0.f;
#pragma unroll
      for (int j4 = 0; j4 < Dsub / 4; ++j4) {
        float4 const xv = xi[j4];
        float const e0 = __fsub_rn(xv.x, sc[4 * j4]), e1 = __fsub_rn(xv.y, sc[4 * j4 + 1]);
        float const e2 = __fsub_rn(xv.z, sc[4 * j4 + 2]), e3 = __fsub_rn(xv.w, sc[4 * j4 + 3]);
        acc = fmaf(e0, e0, acc);
        acc = fmaf(e1, e1, acc);
        acc = fmaf(e2, e2, acc);
        acc = fmaf(e3, e3, acc);
      }
      v = k == 1 ? acc : (acc < d[i] ? acc : d[i]);
      d[i] = v;
    }
    sd[r] = v;
  }
  __syncthreads();
  if (tid < kpp_rows / kpp_group) {
    index_t const g = r0 / kpp_group + tid;
    if (g < nb) { bs[g] = kpp_tree16(sd + tid * kpp_group); }
  }

  // ---- the last block of the problem picks ----
  __threadfence();
  __syncthreads();
  if (tid == 0) { last = atomicAdd(a.kpp_ticket + p, 1u) == gridDim.y - 1 ? 1 : 0; }
  __syncthreads();
  if (last == 0) { return; }
  __threadfence();
  if (tid == 0) { a.kpp_ticket[p] = 0; }  // ready for the next pick's launch

  // Running sums in group order, in place: bs[g] = sum of group sums 0..g.
  double run = 0;
  for (index_t g0 = 0; g0 < nb; g0 += kpp_stage) {
    int const cnt = static_cast<int>(nb - g0 < kpp_stage ? nb - g0 : kpp_stage);
    for (int e = tid; e < cnt; e += kpp_threads) { sstage[e] = __ldcg(bs + g0 + e); }
    __syncthreads();
    if (tid == 0) {
      int e = 0;
      for (; e + 8 <= cnt; e += 8) {  // loads ahead of the dependent chain
        double v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) { v[u] = sstage[e + u]; }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          run = __dadd_rn(run, v[u]);
          sstage[e + u] = run;
        }
      }
      for (; e < cnt; ++e) {
        run = __dadd_rn(run, sstage[e]);
        sstage[e] = run;
      }
    }
    __syncthreads();
    for (int e = tid; e < cnt; e += kpp_threads) { __stcg(bs + g0 + e, sstage[e]); }
    __syncthreads();
  }
  if (tid == 0) {
    stotal = run;
    sfound = nb;
    spick = -1;
  }
  __syncthreads();
  double const total = stotal;
  index_t pick = -1;
  if (total > 0) {
    double const u = __dmul_rn(random_unit(a.seed, stream, static_cast<std::uint64_t>(k)), total);
    for (index_t g = tid; g < nb; g += kpp_threads) {
      double const before = g > 0 ? __ldcg(bs + g - 1) : 0.0;
      if (__ldcg(bs + g) > u && !(before > u)) { sfound = g; }  // one g at most: the sums are monotone
    }
    __syncthreads();
    if (tid == 0) {
      // The reference's walk from the first group whose running sum passes u.
      for (index_t g = sfound; g < nb && spick < 0; ++g) {
        double const running = g > 0 ? __ldcg(bs + g - 1) : 0.0;
        if (__ldcg(bs + g) > u) {
          double within = running;
          index_t const i1 = (g + 1) * kpp_group < n ? (g + 1) * kpp_group : n;
          for (index_t i = g * kpp_group; i < i1; ++i) {
            within = __dadd_rn(within, static_cast<double>(__ldcg(d + i)));
            if (within > u) {
              spick = i;
              break;
            }
          }
        }
      }
    }
    __syncthreads();
    pick = spick;
    if (pick < 0) {  // rounding found no row: the last row of positive D^2 (row 0 if none)
      index_t best = 0;
      for (index_t i = n - 1 - tid; i >= 1; i -= kpp_threads) {
        if (__ldcg(d + i) > 0.f) {
          best = i;
          break;
        }
      }
      sred[tid] = best;
      __syncthreads();
      for (int w = kpp_threads / 2; w > 0; w /= 2) {
        if (tid < w && sred[tid + w] > sred[tid]) { sred[tid] = sred[tid + w]; }
        __syncthreads();
      }
      pick = sred[0];
    }
  } else {
    pick = static_cast<index_t>(random_below(a.seed, stream, static_cast<std::uint64_t>(k), static_cast<std::uint64_t>(n)));
  }
  if (tid == 0) { a.kpp_pick[p] = static_cast<std::int32_t>(pick); }
  float* const c = a.c + p * a.ksub * Dsub;
  for (int j = tid; j < Dsub; j += kpp_threads) {
    c[static_cast<index_t>(k) * Dsub + j] = x[pick * Dsub + j];
    if (k == 1) { c[j] = sc[j]; }
  }
}

inline void launch_kpp(args const& a, int k, cudaStream_t stream)
{
  dim3 const grid(static_cast<unsigned>(a.heads * a.m), static_cast<unsigned>((a.n + kpp_rows - 1) / kpp_rows));
  switch (a.dsub) {
    case 4: kpp_kernel<4><<<grid, kpp_threads, 0, stream>>>(a, k); break;
    case 8: kpp_kernel<8><<<grid, kpp_threads, 0, stream>>>(a, k); break;
    case 16: kpp_kernel<16><<<grid, kpp_threads, 0, stream>>>(a, k); break;
    case 32: kpp_kernel<32><<<grid, kpp_threads, 0, stream>>>(a, k); break;
    case 64: kpp_kernel<64><<<grid, kpp_threads, 0, stream>>>(a, k); break;
    default: kpp_kernel<128><<<grid, kpp_threads, 0, stream>>>(a, k); break;
  }
  PQKV_CUDA_CHECK_LAST();
}

// ---- assign -----------------------------------------------------------------------------------

/// Shared memory of the assign kernel.
[[nodiscard]] constexpr std::size_t assign_smem_bytes(int dsub, int ksub) noexcept
{
  std::size_t bytes = (ng::centroid_floats(dsub, ksub, true) + static_cast<std::size_t>(dsub) * ng::xs_stride) * 4;
  // codes, shifts, reduction
  bytes += static_cast<std::size_t>(ng::bm) * 4 + static_cast<std::size_t>(dsub) * 4 + ng::threads * 8;
  bytes += static_cast<std::size_t>(ksub) * 4;                                                           // counts
  if (dsub <= smem_sums_max_dsub) { bytes += static_cast<std::size_t>(ksub) * dsub * 4; }
  return bytes;
}

/// Power-of-two exponent that maps the channel's max |x| below 2^fixed_bits.
__device__ __forceinline__ int fixed_shift(std::uint32_t amax_bits)
{
  float const m = __uint_as_float(amax_bits);
  if (!(m > 0.f)) { return 0; }
  int e = 0;
  frexpf(m, &e);  // m = f * 2^e, f in [0.5, 1)
  return fixed_bits - e;
}

/// grid (P, bpp), 256 threads: assigns rows [by * rows_per_block, ...) of
/// problem P to the current centroids; writes assign/dist, adds sums and
/// counts, and the block's objective to part_obj[P][by]. With
/// `preassigned`, the assignment and distances come from the tensor-core
/// kernel (detail/assign_tc_kernels.cuh) launched just before, and this
/// kernel only sums.
template <int Dsub, int Tn>
__global__ void __launch_bounds__(ng::threads, Dsub >= 64 ? 1 : 2) assign_kernel(args a)
{
  constexpr bool smem_sums = Dsub <= smem_sums_max_dsub;
  index_t const p = blockIdx.x;
  if (a.active[p] == 0) { return; }
  extern __shared__ __align__(16) float smem[];
  int const kpad = ng::kpad_for(a.ksub);
  float* const cs = smem;                                      // [Dsub][kpad]: -2 c
  float* const cn = cs + static_cast<std::size_t>(Dsub) * kpad;  // [kpad]
  float* const xs = cn + kpad;                                  // [Dsub][xs_stride]
  int* const scode = reinterpret_cast<int*>(xs + Dsub * ng::xs_stride);  // [bm]
  int* const sshift = scode + ng::bm;                            // [Dsub]
  double* const sred = reinterpret_cast<double*>(sshift + Dsub + (Dsub % 2));  // [threads]
  std::uint32_t* const scount = reinterpret_cast<std::uint32_t*>(sred + ng::threads);  // [ksub]
  int* const ssum = reinterpret_cast<int*>(scount + a.ksub);     // [ksub][Dsub] (smem_sums)

  int const tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  index_t const h = p / a.m, s = p % a.m;
  float const* const c = a.c + p * a.ksub * Dsub;
  for (int k = tid; k < kpad; k += ng::threads) {
    float norm = ::cuda::std::numeric_limits<float>::infinity();
    if (k < a.ksub) {
      norm = 0.f;
      for (int j = 0; j < Dsub; ++j) {
        float const v = c[k * Dsub + j];
        norm = fmaf(v, v, norm);
      }
    }
    cn[k] = norm;
  }
  for (int e = tid; e < kpad * Dsub; e += ng::threads) {
    int const k = e / Dsub, ch = e % Dsub;
    cs[ch * kpad + k] = k < a.ksub ? -2.f * c[e] : 0.f;
  }
  for (int j = tid; j < Dsub; j += ng::threads) { sshift[j] = fixed_shift(a.amax[h * a.dim + s * Dsub + j]); }
  for (int k = tid; k < a.ksub; k += ng::threads) { scount[k] = 0; }
  if constexpr (smem_sums) {
    for (int e = tid; e < a.ksub * Dsub; e += ng::threads) { ssum[e] = 0; }
  }

  index_t const r0 = static_cast<index_t>(blockIdx.y) * a.rows_per_block;
  index_t const r1 = r0 + a.rows_per_block < a.n ? r0 + a.rows_per_block : a.n;
  float const* const x = a.xp + p * a.n * Dsub;
  float const* const xn = a.xn + p * a.n;
  unsigned long long* const gsum = a.sums + p * a.ksub * Dsub;
  double obj = 0;
  for (index_t t0 = r0; t0 < r1; t0 += ng::bm) {
    __syncthreads();
    for (int e = tid; e < ng::bm * Dsub; e += ng::threads) {
      int const r = e / Dsub, ch = e % Dsub;
      index_t const t = t0 + r;
      xs[ch * ng::xs_stride + r] = t < r1 ? x[t * Dsub + ch] : 0.f;
    }
    __syncthreads();
    if (a.preassigned != 0) {  // the tensor-core pass wrote assign and dist for these rows
      if (tx == 0) {
#pragma unroll
        for (int i = 0; i < ng::tm; ++i) {
          int const r = ty * ng::tm + i;
          index_t const t = t0 + r;
          if (t < r1) {
            obj += static_cast<double>(a.dist[p * a.n + t]);
            scode[r] = a.assign[p * a.n + t];
          } else {
            scode[r] = -1;
          }
        }
      }
    } else {
      float best[ng::tm];
      int bidx[ng::tm];
      ng::tile_argmin<Dsub, Tn, ng::form::gemm>(cs, cn, kpad, a.ksub, xs, ty, tx, best, bidx);
      if (tx == 0) {
#pragma unroll
        for (int i = 0; i < ng::tm; ++i) {
          int const r = ty * ng::tm + i;
          index_t const t = t0 + r;
          if (t < r1) {
            float const d = fmaxf(0.f, __fadd_rn(best[i], xn[t]));
            a.dist[p * a.n + t] = d;
            a.assign[p * a.n + t] = static_cast<std::uint8_t>(bidx[i]);
            obj += static_cast<double>(d);
            scode[r] = bidx[i];
          } else {
            scode[r] = -1;
          }
        }
      }
    }
    __syncthreads();
    for (int e = tid; e < ng::bm * Dsub; e += ng::threads) {
      int const r = e / Dsub, ch = e % Dsub;
      int const code = scode[r];
      if (code >= 0) {
        int const v = __float2int_rn(ldexpf(xs[ch * ng::xs_stride + r], sshift[ch]));
        if constexpr (smem_sums) {
          atomicAdd(ssum + code * Dsub + ch, v);
        } else {
          atomicAdd(gsum + code * Dsub + ch, static_cast<unsigned long long>(static_cast<long long>(v)));
        }
      }
    }
    if (tid < ng::bm && scode[tid] >= 0) { atomicAdd(scount + scode[tid], 1u); }
  }
  sred[tid] = obj;
  __syncthreads();
  for (int w = ng::threads / 2; w > 0; w /= 2) {  // fixed tree: deterministic
    if (tid < w) { sred[tid] += sred[tid + w]; }
    __syncthreads();
  }
  if (tid == 0) { a.part_obj[p * a.bpp + blockIdx.y] = sred[0]; }
  for (int k = tid; k < a.ksub; k += ng::threads) {
    if (scount[k] != 0) { atomicAdd(a.counts + p * a.ksub + k, scount[k]); }
  }
  if constexpr (smem_sums) {
    for (int e = tid; e < a.ksub * Dsub; e += ng::threads) {
      if (ssum[e] != 0) { atomicAdd(gsum + e, static_cast<unsigned long long>(static_cast<long long>(ssum[e]))); }
    }
  }
}

// ---- step -------------------------------------------------------------------------------------

/// Whether (d, r) comes strictly after (ld, lr) in the repair order
/// (distance descending, row ascending).
__device__ __forceinline__ bool after(float d, index_t r, float ld, index_t lr)
{
  return d < ld || (d == ld && r > lr);
}

/// grid P, 256 threads; see the file comment. `it` is the iteration whose
/// update this would be; the objective recorded is that of assignment it - 1.
template <int Unused = 0>
__global__ void __launch_bounds__(256) step_kernel(args a, int it)
{
  __shared__ int decide;  // 1: update
  __shared__ std::uint32_t cnt[256];
  __shared__ int empties[256];
  __shared__ int n_empty;
  __shared__ float red_d[256];
  __shared__ index_t red_r[256];
  __shared__ int shift[128];
  index_t const p = blockIdx.x;
  if (a.active[p] == 0) { return; }
  int const tid = threadIdx.x;
  index_t const h = p / a.m, s = p % a.m;
  if (tid == 0) {
    double obj = 0;
    for (int b = 0; b < a.bpp; ++b) { obj += a.part_obj[p * a.bpp + b]; }
    double* const hist = a.hist + p * (a.max_iter + 1);
    hist[it - 1] = obj;
    bool stop = false;
    if (it - 1 >= 1 && a.tol > 0) {
      double const prev = hist[it - 2];
      stop = prev - obj <= a.tol * prev;
    }
    if (stop) { a.active[p] = 0; }
    decide = (!stop && it <= a.max_iter) ? 1 : 0;
    if (decide) { a.iters[p] = it; }
  }
  __syncthreads();
  if (decide == 0) { return; }

  int const dsub = a.dsub, ksub = a.ksub;
  for (int k = tid; k < ksub; k += 256) { cnt[k] = a.counts[p * ksub + k]; }
  for (int j = tid; j < dsub; j += 256) { shift[j] = fixed_shift(a.amax[h * a.dim + s * dsub + j]); }
  __syncthreads();
  float* const c = a.c + p * ksub * dsub;
  unsigned long long* const gsum = a.sums + p * ksub * dsub;
  for (int e = tid; e < ksub * dsub; e += 256) {
    int const k = e / dsub;
    if (cnt[k] != 0) {
      double const sum = ldexp(static_cast<double>(static_cast<long long>(gsum[e])), -shift[e % dsub]);
      c[e] = static_cast<float>(sum / static_cast<double>(cnt[k]));
    }
  }
  if (tid == 0) {
    int ne = 0;
    for (int k = 0; k < ksub; ++k) {
      if (cnt[k] == 0) { empties[ne++] = k; }
    }
    n_empty = ne;
  }
  __syncthreads();
  // Empty clusters: the next row in (distance desc, row asc) order, one per cluster.
  float last_d = ::cuda::std::numeric_limits<float>::infinity();
  index_t last_r = -1;
  float const* const dist = a.dist + p * a.n;
  for (int q = 0; q < n_empty; ++q) {
    float bd = -1.f;
    index_t br = -1;
    for (index_t r = tid; r < a.n; r += 256) {
      float const d = dist[r];
      if (after(d, r, last_d, last_r) && (br < 0 || d > bd)) {  // rows ascending per thread: keep the first
        bd = d;
        br = r;
      }
    }
    red_d[tid] = bd;
    red_r[tid] = br;
    __syncthreads();
    for (int w = 128; w > 0; w /= 2) {
      if (tid < w) {
        float const od = red_d[tid + w];
        index_t const orow = red_r[tid + w];
        if (orow >= 0 && (red_r[tid] < 0 || od > red_d[tid] || (od == red_d[tid] && orow < red_r[tid]))) {
          red_d[tid] = od;
          red_r[tid] = orow;
        }
      }
      __syncthreads();
    }
    last_d = red_d[0];
    last_r = red_r[0];
    int const k = empties[q];
    for (int j = tid; j < dsub; j += 256) { c[k * dsub + j] = a.xp[(p * a.n + last_r) * dsub + j]; }
    __syncthreads();
  }
  for (int e = tid; e < ksub * dsub; e += 256) { gsum[e] = 0; }
  for (int k = tid; k < ksub; k += 256) { a.counts[p * ksub + k] = 0; }
}

/// grid (row blocks, heads): codes(h, t, s) = the final assignment (no subsample).
template <int Unused = 0>
__global__ void __launch_bounds__(256) codes_kernel(args a, std::uint8_t* codes)
{
  index_t const h = blockIdx.y;
  index_t const e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= a.n * a.m) { return; }
  index_t const t = e / a.m, s = e % a.m;
  codes[(h * a.tokens + t) * a.m + s] = a.assign[(h * a.m + s) * a.n + t];
}

// ---- launches ---------------------------------------------------------------------------------

template <class F>
void dispatch(int dsub, int ksub, F&& f)
{
  ng::dispatch(dsub, ksub, static_cast<F&&>(f));
}

inline void prepare_assign(int dsub, int ksub)
{
  dispatch(dsub, ksub, [&]<int D, int Tn>() {
    PQKV_CUDA_TRY(cudaFuncSetAttribute(assign_kernel<D, Tn>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(assign_smem_bytes(D, ksub))));
  });
}

/// Resident assign blocks per SM.
inline int assign_occupancy(int dsub, int ksub)
{
  int occ = 1;
  dispatch(dsub, ksub, [&]<int D, int Tn>() {
    PQKV_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, assign_kernel<D, Tn>, ng::threads,
                                                                assign_smem_bytes(D, ksub)));
  });
  return occ > 0 ? occ : 1;
}

inline void launch_assign(args const& a, cudaStream_t stream)
{
  dispatch(a.dsub, a.ksub, [&]<int D, int Tn>() {
    assign_kernel<D, Tn><<<dim3(static_cast<unsigned>(a.heads * a.m), static_cast<unsigned>(a.bpp)), ng::threads,
                           assign_smem_bytes(D, a.ksub), stream>>>(a);
    PQKV_CUDA_CHECK_LAST();
  });
}

}  // namespace pqkv::detail::kmeans_gpu
