// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Kernels of the GPU SALE mask (sparse/quantize.cuh, sparse/sale_mask.cuh).
/// Users never name this header.
///
/// Launch sequence of one mask (all on the caller's stream):
///   seq_setup    one thread: per-sequence scale-group offsets from cu_seqlens
///   mean_part    grid (splits, heads, batch): per channel, over a slice of a
///                sequence's tokens, the double sum, the double sum of |x| and
///                the lowest set-bit exponent of the values
///   mean_final   one thread per (sequence, head, channel): the mean (below)
///   quantize     one warp per (head, scale group): amax, scale, codes
///   corrections  one thread per (q head, token): corr and row fma chains
///   row_stats    one block per (sequence, q head, q block): exact logits over
///                the forced keys, lse (double), and the row's threshold on
///                the estimate's pre-scale sum (below)
///   estimate     one block per (sequence, KV head, q-head chunk, q block):
///                int8 tensor-core products of the chunk's rows with every
///                non-forced causal key block, the keep rule, mask words;
///                with a cap (max_blocks >= 0), also each kept block's score
///                (workspace) and, per q head, the top max_blocks (below)
///   density      popcounts per head, then kept / causal
///
/// Bit-exact means. The reference sums a channel in double in ascending
/// token order. When every value is a multiple of 2^L (L: the lowest set bit
/// over the channel) and the sum of |x| is below 2^(L+53), every partial sum in
/// any order is a multiple of 2^L that a double holds exactly, so the sum
/// does not depend on the order: mean_final then adds the slices' sums. Else
/// (float inputs spanning a wide range) it repeats the reference's ascending
/// loop in one thread, which is slow but gives the same bits.
///
/// Keep rule without double arithmetic per element. The reference keeps a
/// block iff double(z~) - lse_i >= log(tau) for some element, where z~ =
/// RN(scale * RN(A + row_i)) and A = fma(RN(sq sk), dot, corr_j). Both maps
/// (A -> z~, z~ -> double(z~) - lse_i) are monotone, so the set of floats A
/// that pass is [T_i, +inf) for one float T_i, which row_stats finds by
/// bisection over the ordered float bit patterns. The estimate kernel then
/// tests A >= T_i per element: the same decision as the reference for the
/// same lse_i.
///
/// The cap, exactly as the reference's stable sort. With a cap the estimate
/// tracks each row's largest A over a block's keys j <= i instead of the
/// per-element test: the row passes iff that max >= T_i (the same decision),
/// and, z~ being monotone in A, it gives the row's largest z~, so the block's
/// score max_i double(z~(max_j A_ij)) - lse_i is the very value the reference
/// ranks. Each kept block's score goes to the workspace as an order-
/// preserving 64-bit key (one entry per causal block of a max_len sequence;
/// a row's scores are its own thread block's writes, so no second launch).
/// After the last key block, per q head whose kept non-forced blocks
/// outnumber max_blocks, a block-wide radix select (8-bit digits, most
/// significant first, stopping once the boundary digit range is taken whole)
/// finds the cut: keys above it stay, keys at it stay in ascending block
/// order up to the cap (the stable sort's tie-break), the rest are cleared.
/// The uncapped instantiation compiles to the same code as before the cap.

#include <pqkv/core/dtype.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/strided3.cuh>
#include <pqkv/sparse/quantize.hpp>
#include <pqkv/sparse/sale_mask.hpp>

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

namespace pqkv::detail::sale_gpu {


/// Per-sequence data computed on the device from cu_seqlens.
struct seq_info {
  std::int32_t const* cu;    // [batch + 1]
  std::int32_t* goff;        // [batch + 1] first scale group of each sequence
};

inline constexpr int mean_splits = 64;  ///< token slices per sequence in mean_part
inline constexpr int mean_threads = 256;

template <int Unused = 0>  // a template, so that several translation units may include this header
__global__ void seq_setup_kernel(std::int32_t const* cu, std::int32_t* goff, int batch, int group)
{
  if (threadIdx.x != 0 || blockIdx.x != 0) { return; }
  std::int32_t acc = 0;
  goff[0] = 0;
  for (int s = 0; s < batch; ++s) {
    int const len = cu[s + 1] - cu[s];
    acc += len > 0 ? (len + group - 1) / group : 0;
    goff[s + 1] = acc;
  }
}

/// Lowest set-bit exponent of a nonzero finite float (x = odd * 2^result).
__device__ __forceinline__ int low_bit_exponent(float x)
{
  auto const u = static_cast<std::uint32_t>(__float_as_uint(x));
  std::uint32_t const e = (u >> 23) & 0xffu;
  std::uint32_t const m = (u & 0x7fffffu) | (e != 0 ? 0x800000u : 0u);
  int const base = e != 0 ? static_cast<int>(e) - 150 : -149;
  return base + (__ffs(static_cast<int>(m)) - 1);
}

/// Partial sums of a slice of one sequence's tokens; slot [batch, heads, splits, dim].
template <class T>
__global__ void __launch_bounds__(mean_threads) mean_part_kernel(strided3<T> x, std::int32_t const* cu, int heads,
                                                                 int dim, double* psum, double* pabs, int* plow)
{
  int const split = static_cast<int>(blockIdx.x), h = static_cast<int>(blockIdx.y), s = static_cast<int>(blockIdx.z);
  int const t0 = cu[s], len = cu[s + 1] - t0;
  int const per = (len + mean_splits - 1) / mean_splits;
  int const a = t0 + split * per, b = min(t0 + (split + 1) * per, t0 + len);
  int const lanes = mean_threads / dim;  // dim divides 256
  int const c = static_cast<int>(threadIdx.x) % dim, w = static_cast<int>(threadIdx.x) / dim;
  double sum = 0.0, sabs = 0.0;
  int low = INT_MAX;
  for (int t = a + w; t < b; t += lanes) {
    float const v = x(h, t, c);
    sum += static_cast<double>(v);
    sabs += static_cast<double>(fabsf(v));
    if (v != 0.f) { low = min(low, low_bit_exponent(v)); }
  }
  __shared__ double ssum[mean_threads], sabs_s[mean_threads];
  __shared__ int slow[mean_threads];
  ssum[threadIdx.x] = sum;
  sabs_s[threadIdx.x] = sabs;
  slow[threadIdx.x] = low;
  __syncthreads();
  if (w == 0) {
    for (int l = 1; l < lanes; ++l) {
      sum += ssum[l * dim + c];
      sabs += sabs_s[l * dim + c];
      low = min(low, slow[l * dim + c]);
    }
    std::size_t const slot = ((static_cast<std::size_t>(s) * heads + h) * mean_splits + split) * dim + c;
    psum[slot] = sum;
    pabs[slot] = sabs;
    plow[slot] = low;
  }
}

/// The reference's mean of channel c of (sequence s, head h) (file comment).
template <class T>
__global__ void mean_final_kernel(strided3<T> x, std::int32_t const* cu, int batch, int heads, int dim,
                                  double const* psum, double const* pabs, int const* plow, float* means)
{
  int const idx = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (idx >= batch * heads * dim) { return; }
  int const c = idx % dim, h = (idx / dim) % heads, s = idx / (dim * heads);
  int const t0 = cu[s], len = cu[s + 1] - t0;
  if (len <= 0) {
    means[idx] = 0.f;  // [batch, heads, dim]: idx is its row-major index
    return;
  }
  double sum = 0.0, sabs = 0.0;
  int low = INT_MAX;
  for (int p = 0; p < mean_splits; ++p) {
    std::size_t const slot = ((static_cast<std::size_t>(s) * heads + h) * mean_splits + p) * dim + c;
    sum += psum[slot];
    sabs += pabs[slot];
    low = min(low, plow[slot]);
  }
  // sabs carries relative rounding < len * 2^-53; the factor covers it.
  bool const exact = low == INT_MAX || sabs * (1.0 + 0x1p-20) < ldexp(1.0, low + 53);
  if (!exact) {
    sum = 0.0;
    for (int t = t0; t < t0 + len; ++t) { sum = __dadd_rn(sum, static_cast<double>(x(h, t, c))); }
  }
  means[idx] = __double2float_rn(__ddiv_rn(sum, static_cast<double>(len)));
}

/// One warp per (head, scale group): amax, scale and codes (quantize.hpp's contract).
template <class T>
__global__ void quantize_kernel(strided3<T> x, std::int32_t const* cu, std::int32_t const* goff, int batch, int heads,
                                int dim, int group, int qmax, int scale_stride, float const* means,
                                std::int8_t* codes, float* scales, float* row_scale, int tokens)
{
  int const warp = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  int const lane = static_cast<int>(threadIdx.x & 31);
  int const h = static_cast<int>(blockIdx.y);
  int const total = goff[batch];
  if (warp >= total) { return; }
  int lo = 0, hi = batch - 1;  // the sequence s with goff[s] <= warp < goff[s + 1]
  while (lo < hi) {
    int const mid = (lo + hi + 1) / 2;
    if (goff[mid] <= warp) { lo = mid; } else { hi = mid - 1; }
  }
  int const s = lo;
  int const t0 = cu[s], t1 = cu[s + 1];
  int const r0 = t0 + (warp - goff[s]) * group, r1 = min(r0 + group, t1);
  float const* mean = means + (static_cast<std::size_t>(s) * heads + h) * dim;
  float amax = 0.f;
  for (int t = r0; t < r1; ++t) {
    for (int c = lane; c < dim; c += 32) { amax = fmaxf(amax, fabsf(__fsub_rn(x(h, t, c), mean[c]))); }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) { amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o)); }
  float const fq = static_cast<float>(qmax);
  float const scale = __fdiv_rn(amax, fq);
  float const inv = amax > 0.f ? __fdiv_rn(fq, amax) : 0.f;
  if (lane == 0) { scales[static_cast<std::size_t>(h) * scale_stride + warp] = scale; }
  for (int t = r0; t < r1; ++t) {
    if (row_scale != nullptr && lane == 0) { row_scale[static_cast<std::size_t>(h) * tokens + t] = scale; }
    for (int c = lane; c < dim; c += 32) {
      float const r = roundf(__fmul_rn(__fsub_rn(x(h, t, c), mean[c]), inv));
      codes[(static_cast<std::size_t>(h) * tokens + t) * dim + c] =
          static_cast<std::int8_t>(r > fq ? fq : (r < -fq ? -fq : r));
    }
  }
}

/// The sequence holding packed token t (binary search over cu).
__device__ __forceinline__ int seq_of(std::int32_t const* cu, int batch, int t)
{
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    int const mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) { lo = mid; } else { hi = mid - 1; }
  }
  return lo;
}

/// corr[h][t] and row[h][t] as fma chains in ascending channel order.
template <class Q, class K>
__global__ void corrections_kernel(strided3<Q> q, strided3<K> k, std::int32_t const* cu, int batch, int q_heads,
                                   int kv_heads, int dim, int tokens, float const* q_means, float const* k_means,
                                   float* corr, float* row)
{
  int const t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  int const h = static_cast<int>(blockIdx.y);
  if (t >= tokens) { return; }
  int const s = seq_of(cu, batch, t), g = h / (q_heads / kv_heads);
  float const* qm = q_means + (static_cast<std::size_t>(s) * q_heads + h) * dim;
  float const* km = k_means + (static_cast<std::size_t>(s) * kv_heads + g) * dim;
  float c_acc = 0.f, r_acc = 0.f;
  for (int c = 0; c < dim; ++c) {
    float const kmc = km[c];
    c_acc = __fmaf_rn(qm[c], __fsub_rn(k(g, t, c), kmc), c_acc);
    r_acc = __fmaf_rn(q(h, t, c), kmc, r_acc);
  }
  corr[static_cast<std::size_t>(h) * tokens + t] = c_acc;
  row[static_cast<std::size_t>(h) * tokens + t] = r_acc;
}

// ---- keep-rule thresholds ----------------------------------------------------

/// Order-preserving map of floats to unsigned integers (and back).
__device__ __forceinline__ std::uint32_t float_key(float f)
{
  auto const u = static_cast<std::uint32_t>(__float_as_uint(f));
  return (u & 0x80000000u) != 0 ? ~u : u | 0x80000000u;
}
__device__ __forceinline__ float key_float(std::uint32_t k)
{
  return __uint_as_float(static_cast<unsigned>((k & 0x80000000u) != 0 ? k & 0x7fffffffu : ~k));
}

/// The smallest finite float f with pass(f), or +inf when none passes;
/// pass must be monotone (false ... false true ... true) over finite floats.
template <class Pass>
__device__ float smallest_passing(Pass pass)
{
  std::uint32_t lo = float_key(-FLT_MAX), hi = float_key(FLT_MAX);
  if (!pass(FLT_MAX)) { return __int_as_float(0x7f800000); }
  if (pass(-FLT_MAX)) { return -FLT_MAX; }
  while (hi - lo > 1) {  // invariant: !pass(lo), pass(hi)
    std::uint32_t const mid = lo + (hi - lo) / 2;
    if (pass(key_float(mid))) { hi = mid; } else { lo = mid; }
  }
  return key_float(hi);
}

/// Row statistics block geometry: TR x TK logits per thread, 32 keys per chunk.
inline constexpr int stats_chunk = 32;

/// Forced-key list of q block qb (sequence of n tokens): positions p in
/// [0, count) map to keys ascending; seg1 = sink blocks, seg2 = the local
/// blocks past them (sale_mask.hpp's forced blocks, keys <= last).
struct forced_keys {
  int seg1_end, seg2_begin, last;
  __device__ __forceinline__ int count() const
  {
    return seg1_end + (last + 1 > seg2_begin ? last + 1 - seg2_begin : 0);
  }
  __device__ __forceinline__ int key(int p) const { return p < seg1_end ? p : seg2_begin + (p - seg1_end); }
};

/// Sink blocks [0, ns), local blocks [kl, nk) of q block qb (first non-forced
/// block = ns, first local = max(kl, ns)).
struct block_ranges {
  int nk, ns, kl;
};
__device__ __forceinline__ block_ranges ranges_of(sparse_config const& cfg, int n, int qb)
{
  int const bq = static_cast<int>(cfg.block_q), bk = static_cast<int>(cfg.block_k);
  int const q_end = min((qb + 1) * bq, n);
  int const nk = (q_end - 1) / bk + 1;
  int const ns = min(nk, (static_cast<int>(cfg.sink) + bk - 1) / bk);
  int const w = q_end - static_cast<int>(cfg.local);
  int const kl = w >= 0 ? min(nk, w / bk) : 0;
  return {nk, ns, kl > ns ? kl : ns};
}

/// Rows per row_stats block (a slice of a q block: rows only share the q
/// block's forced keys). Block: 2 * rows threads, each a 4 x 4 tile of (row,
/// key) logits per 32-key chunk.
PQKV_HD constexpr int stats_rows(int bq) { return bq < 32 ? bq : 32; }

/// Row statistics of one slice of (sequence, q head, q block): lse over the
/// forced keys as the reference computes it, then the row's threshold T_i
/// (file comment). Grid (q_blocks * Bq / rows, q_heads, batch).
template <class Q, class K>
__global__ void row_stats_kernel(strided3<Q> q, strided3<K> k, std::int32_t const* cu, sparse_config cfg, int q_heads,
                                 int kv_heads, int dim, int tokens, float scale, float const* tau, float const* row,
                                 double* lse_out, float* thr_out, int nf_max, int max_len)
{
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int const bq = static_cast<int>(cfg.block_q), bk = static_cast<int>(cfg.block_k), rs = stats_rows(bq);
  int const slices = bq / rs;
  int const qb = static_cast<int>(blockIdx.x) / slices, slice = static_cast<int>(blockIdx.x) % slices;
  int const h = static_cast<int>(blockIdx.y), s = static_cast<int>(blockIdx.z);
  int const t0 = cu[s], n = min(cu[s + 1] - t0, max_len);  // the clamp only guards memory
  int const q0 = qb * bq, r0 = q0 + slice * rs;
  if (r0 >= n) { return; }
  int const g = h / (q_heads / kv_heads);
  int const q_end = min(q0 + bq, n);
  block_ranges const br = ranges_of(cfg, n, qb);
  forced_keys fk{min(br.ns * bk, q_end), br.kl * bk, q_end - 1};
  int const nf = fk.count();  // <= nf_max (host bound)
  float* qs = reinterpret_cast<float*>(smem_raw);        // [rs][dim + 1]
  float* ks = qs + rs * (dim + 1);                        // [32][dim + 1]
  float* sv = ks + stats_chunk * (dim + 1);               // [rs][nf_max]
  int const tid = static_cast<int>(threadIdx.x), nthr = static_cast<int>(blockDim.x);
  for (int e = tid; e < rs * dim; e += nthr) {
    int const i = e / dim, c = e % dim;
    qs[i * (dim + 1) + c] = r0 + i < n ? q(h, t0 + r0 + i, c) : 0.f;
  }
  // thread tile: rows 4 * (tid / 8) .. +3, keys (tid % 8) + 8 * u, u < 4
  int const tr = (tid / 8) * 4, tk = tid % 8;
  for (int p0 = 0; p0 < nf; p0 += stats_chunk) {
    __syncthreads();
    for (int e = tid; e < stats_chunk * dim; e += nthr) {
      int const jj = e / dim, c = e % dim;
      ks[jj * (dim + 1) + c] = p0 + jj < nf ? k(g, t0 + fk.key(p0 + jj), c) : 0.f;
    }
    __syncthreads();
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) { acc[a][b] = 0.f; }
    }
    for (int c = 0; c < dim; ++c) {  // ascending channels: the reference's fma chain
      float qv[4], kv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) { qv[a] = qs[(tr + a) * (dim + 1) + c]; }
#pragma unroll
      for (int b = 0; b < 4; ++b) { kv[b] = ks[(tk + 8 * b) * (dim + 1) + c]; }
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int b = 0; b < 4; ++b) { acc[a][b] = __fmaf_rn(qv[a], kv[b], acc[a][b]); }
      }
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        int const p = p0 + tk + 8 * b;
        if (p < nf) { sv[(tr + a) * nf_max + p] = __fmul_rn(scale, acc[a][b]); }
      }
    }
  }
  __syncthreads();
  int const ti = tid;
  if (ti >= rs) { return; }
  int const i = r0 + ti;  // row within the sequence
  if (i >= n) { return; }
  std::size_t const o = static_cast<std::size_t>(h) * tokens + t0 + i;
  double lse = -__longlong_as_double(0x7ff0000000000000LL);  // no forced key j <= i
  if (nf > 0 && fk.key(0) <= i) {
    float m = -__int_as_float(0x7f800000);
    for (int p = 0; p < nf && fk.key(p) <= i; ++p) { m = fmaxf(m, sv[ti * nf_max + p]); }
    double l = 0.0;  // ascending keys, as the reference
    for (int p = 0; p < nf && fk.key(p) <= i; ++p) {
      l = __dadd_rn(l, exp(__dsub_rn(static_cast<double>(sv[ti * nf_max + p]), static_cast<double>(m))));
    }
    lse = __dadd_rn(static_cast<double>(m), log(l));
  }
  lse_out[o] = lse;
  float const th = tau[h];
  if (!(th > 0.f)) {  // tau = 0 (or invalid): the head is dense, nothing to test
    thr_out[o] = -__int_as_float(0x7f800000);
    return;
  }
  double const log_tau = log(static_cast<double>(th));
  float const zthr = smallest_passing([&](float z) { return __dsub_rn(static_cast<double>(z), lse) >= log_tau; });
  float const rr = row[o];
  float const athr = zthr == __int_as_float(0x7f800000)
                         ? zthr
                         : smallest_passing([&](float a) { return __fmul_rn(scale, __fadd_rn(a, rr)) >= zthr; });
  thr_out[o] = athr;
}

// ---- int8 tensor-core estimate ----------------------------------------------

__device__ __forceinline__ void mma_s8(int (&d)[4], std::uint32_t const (&a)[4], std::uint32_t b0, std::uint32_t b1)
{
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async16(void* dst, void const* src)
{
  auto const d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/// The s32 accumulators start at the bits of 1.5 * 2^23, so that the result,
/// read as a float, is exactly dot_bias + dot (|dot| <= 127^2 * 256 < 2^22):
/// one float subtract recovers float(dot) instead of a slow int-to-float
/// conversion.
inline constexpr int dot_bias_bits = 0x4B400000;
inline constexpr float dot_bias = 12582912.f;

inline constexpr int est_rows = 256;   ///< most rows (q heads x Bq) one estimate block holds
inline constexpr int est_mtiles = 2;   ///< 16-row tiles per warp

inline constexpr int est_threads = 256;  ///< threads per estimate block (8 warps x est_mtiles x 16 = est_rows)
inline constexpr int cap_digits = 256;   ///< radix-select bins (8-bit digits)

/// Shared-memory layout of the estimate kernel (bytes).
struct est_smem {
  int kstride;      // bytes per staged key row (dim + 16: conflict-free fragment loads)
  int stage_bytes;  // codes + sk + corr of one key block
  int words;        // mask words per (q head, q block)
  int hc;           // q heads per block
  int cap_off;      // with a cap: lse[est_rows] f64, score base u64, best[hc] u64, row[est_rows] f32,
                    // hist[cap_digits] u32, scalars[8], warp counts[8]
  int cap_bytes;    // 0 without a cap
  PQKV_HD static est_smem make(int dim, int bk, int hc, int words, bool cap = false)
  {
    est_smem l{};
    l.kstride = dim + 16;
    l.hc = hc;
    l.words = words;
    l.stage_bytes = bk * l.kstride + bk * 4 + hc * bk * 4;
    l.stage_bytes = (l.stage_bytes + 15) / 16 * 16;
    l.cap_off = (2 * l.stage_bytes + hc * words * 4 + 15) / 16 * 16;
    l.cap_bytes = cap ? est_rows * 12 + 8 + hc * 8 + cap_digits * 4 + 8 * 4 + (est_threads / 32) * 4 : 0;
    return l;
  }
  [[nodiscard]] PQKV_HD int total() const
  {
    return cap_bytes > 0 ? cap_off + cap_bytes : 2 * stage_bytes + hc * words * 4;
  }
};

/// Entries of the score workspace before q block qb's row, per (sequence, q
/// head): the causal blocks of q blocks [0, qb) of a max_len sequence (a
/// sequence of n <= max_len tokens has no more). Closed form: with g =
/// gcd(Bq, Bk), a = Bq / g, b = Bk / g, full q block q has ceil((q+1) a / b)
/// causal blocks, and (-t a) mod b runs over every residue once per b terms.
PQKV_HD constexpr long long score_row_offset(long long bq, long long bk, long long max_len, long long qb)
{
  long long x = bq, y = bk;
  while (y != 0) {
    long long const t = x % y;
    x = y;
    y = t;
  }
  long long const a = bq / x, b = bk / x;
  long long const full = max_len / bq, k_blocks = (max_len + bk - 1) / bk;
  long long const m = qb < full ? qb : full;  // sum_{t=1}^{m} ceil(t a / b)
  long long pad = (m / b) * (b * (b - 1) / 2);
  for (long long t = 1; t <= m % b; ++t) { pad += (b - (t * a) % b) % b; }
  return (a * m * (m + 1) / 2 + pad) / b + (qb > full ? (qb - full) * k_blocks : 0);
}

/// What the capped estimate needs besides the uncapped one's arguments.
struct cap_args {
  int max_blocks;                // >= 0
  float scale;                   // the logit scale
  float const* row;              // [q_heads, tokens] row terms
  double const* lse;             // [q_heads, tokens]
  unsigned long long* scores;    // [batch, q_heads, stride] order keys of kept blocks' scores
  long long stride;              // score_row_offset(.., q_blocks)
};

/// Order-preserving map of doubles to unsigned 64-bit keys (-0 as +0, so
/// equal scores give equal keys).
__device__ __forceinline__ unsigned long long score_key(double d)
{
  auto const u = static_cast<unsigned long long>(__double_as_longlong(__dadd_rn(d, 0.0)));
  return (u >> 63) != 0 ? ~u : u | (1ull << 63);
}

/// Applies the cap to one mask row in shared memory: candidates are the set
/// bits of blocks [ns, kl) (the non-forced causal ones), sc[kb] their keys
/// (global, written by this block before a __syncthreads). Called by every
/// thread of the block; ends with a __syncthreads. hist [cap_digits], sh
/// [8] and wcnt [warps] are shared scratch.
__device__ inline void cap_row(std::uint32_t* row, int ns, int kl, int cap, unsigned long long const* sc,
                               unsigned* hist, int* sh, int* wcnt)
{
  int const tid = static_cast<int>(threadIdx.x), nthr = static_cast<int>(blockDim.x);
  int const lane = tid & 31, warp = tid >> 5, warps = nthr >> 5;
  auto span_bits = [ns, kl](int w) {  // bits of word w inside [ns, kl)
    int const lo = max(ns - w * 32, 0), hi = min(kl - w * 32, 32);
    if (hi <= lo) { return 0u; }
    std::uint32_t const upto = hi == 32 ? 0xffffffffu : (1u << hi) - 1u;
    return upto & ~((1u << lo) - 1u);
  };
  auto is_set = [row](int kb) { return ((row[kb >> 5] >> (kb & 31)) & 1u) != 0; };
  if (tid == 0) { sh[0] = 0; }
  __syncthreads();
  int c = 0;
  for (int w = ns / 32 + tid; w <= (kl - 1) / 32; w += nthr) { c += __popc(row[w] & span_bits(w)); }
  if (c != 0) { atomicAdd(&sh[0], c); }
  __syncthreads();
  int const count = sh[0];
  __syncthreads();  // sh[0] is rewritten below
  if (count <= cap) { return; }
  if (cap == 0) {
    for (int w = ns / 32 + tid; w <= (kl - 1) / 32; w += nthr) { row[w] &= ~span_bits(w); }
    __syncthreads();
    return;
  }
  // Radix select: the cap-th largest key among the candidates. Invariant:
  // 1 <= remaining <= candidates whose key matches prefix under pmask.
  unsigned long long prefix = 0, pmask = 0;
  int remaining = cap;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = tid; i < cap_digits; i += nthr) { hist[i] = 0u; }
    __syncthreads();
    for (int kb = ns + tid; kb < kl; kb += nthr) {
      if (is_set(kb)) {
        unsigned long long const key = sc[kb];
        if ((key & pmask) == prefix) { atomicAdd(&hist[(key >> shift) & 255u], 1u); }
      }
    }
    __syncthreads();
    if (warp == 0) {  // lane l holds bins 255 - 8l .. 248 - 8l, scanned from the top
      unsigned sum = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) { sum += hist[255 - 8 * lane - e]; }
      unsigned incl = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        unsigned const u = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) { incl += u; }
      }
      unsigned above = incl - sum;
      auto const rem = static_cast<unsigned>(remaining);
      if (above < rem && rem <= incl) {
        for (int e = 0; e < 8; ++e) {
          int const bin = 255 - 8 * lane - e;
          unsigned const hcount = hist[bin];
          if (above + hcount >= rem) {
            sh[1] = bin;
            sh[2] = static_cast<int>(above);
            sh[3] = static_cast<int>(hcount);
            break;
          }
          above += hcount;
        }
      }
    }
    __syncthreads();
    int const bin = sh[1], above = sh[2], in_bin = sh[3];
    prefix |= static_cast<unsigned long long>(bin) << shift;
    pmask |= 255ull << shift;
    remaining -= above;
    if (in_bin == remaining) { break; }  // the whole range is taken: no tie to break
  }
  // Keys above the range stay; keys in it stay in ascending block order while
  // fewer than `remaining` were taken; the rest go.
  int taken = 0;
  for (int kb0 = ns; kb0 < kl; kb0 += nthr) {
    int const kb = kb0 + tid;
    bool const cand = kb < kl && is_set(kb);
    unsigned long long const key = cand ? sc[kb] : 0ull;
    bool const in_range = cand && (key & pmask) == prefix;
    unsigned const ballot = __ballot_sync(0xffffffffu, in_range);
    if (lane == 0) { wcnt[warp] = __popc(ballot); }
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < warps; ++w) {
      before += w < warp ? wcnt[w] : 0;
      total += wcnt[w];
    }
    int const rank = taken + before + __popc(ballot & ((1u << lane) - 1u));
    bool const keep = cand && ((key & pmask) > prefix || (in_range && rank < remaining));
    if (cand && !keep) { atomicAnd(&row[kb >> 5], ~(1u << (kb & 31))); }
    taken += total;
    __syncthreads();  // wcnt is rewritten next round
  }
}

/// The mask rows of (sequence, KV head g, q heads [h0, h0 + hc), q block).
/// Warps own 2 row tiles of 16 (tile t: q head h0 + t / (Bq / 16), rows
/// (t % (Bq / 16)) * 16 ..). Every non-forced causal key block is staged in
/// shared memory (cp.async, double-buffered) and multiplied 32 keys at a time.
/// Cap: the file comment's cap (`cap` is read only then).
template <int Dim, bool Cap = false>
__global__ void __launch_bounds__(est_threads) estimate_kernel(
    std::int8_t const* q_codes, std::int8_t const* k_codes, float const* q_rs, float const* k_rs,
    float const* corr, float const* thr, float const* tau, std::int32_t const* cu, sparse_config cfg, int q_heads,
    int kv_heads, int tokens, int max_len, int q_blocks, int words, int hc, est_smem L, std::uint32_t* bitmask,
    cap_args cap)
{
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int const bq = static_cast<int>(cfg.block_q), bk = static_cast<int>(cfg.block_k);
  int const qb = q_blocks - 1 - static_cast<int>(blockIdx.x);  // longest rows first
  int const r = q_heads / kv_heads, chunks = (r + hc - 1) / hc;
  int const g = static_cast<int>(blockIdx.y) / chunks, h0 = g * r + (static_cast<int>(blockIdx.y) % chunks) * hc;
  int const h_end = min(h0 + hc, g * r + r);
  int const s = static_cast<int>(blockIdx.z);
  int const t0 = cu[s], n = min(cu[s + 1] - t0, max_len);  // the clamp only guards memory
  int const q0 = qb * bq;
  int const tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  auto* kept = reinterpret_cast<std::uint32_t*>(smem_raw + 2 * L.stage_bytes);  // [hc][words]
  if (q0 >= n) {  // padding row: all zero
    for (int e = tid; e < (h_end - h0) * words; e += static_cast<int>(blockDim.x)) {
      int const hh = e / words, w = e % words;
      bitmask[((static_cast<std::size_t>(s) * q_heads + h0 + hh) * q_blocks + qb) * words + w] = 0u;
    }
    return;
  }
  block_ranges const br = ranges_of(cfg, n, qb);
  // initial words: forced blocks, or every causal block for a dense head
  for (int e = tid; e < (h_end - h0) * words; e += static_cast<int>(blockDim.x)) {
    int const hh = e / words, w = e % words;
    bool const dense = !(tau[h0 + hh] > 0.f);
    std::uint32_t bits = 0;
    for (int b = 0; b < 32; ++b) {
      int const kb = w * 32 + b;
      bool const causal = kb < br.nk;
      bool const forced = causal && (kb < br.ns || kb >= br.kl);
      if (causal && (dense || forced)) { bits |= 1u << b; }
    }
    kept[hh * words + w] = bits;
  }
  // With a cap: each row slot's lse_i and row term (slot = tile * 16 + row in tile), and best[hh], the
  // order key of the current block's score for q head h0 + hh (0: none yet).
  [[maybe_unused]] auto* c_lse = reinterpret_cast<double*>(smem_raw + L.cap_off);
  auto* c_base = reinterpret_cast<long long*>(c_lse + est_rows);  // score entry of (s, h0, qb, kb = 0)
  auto* best = reinterpret_cast<unsigned long long*>(c_base + 1);
  [[maybe_unused]] auto* c_row = reinterpret_cast<float*>(best + L.hc);
  [[maybe_unused]] auto score_row = [&](int hh) {  // this q block's entries of q head h0 + hh
    return cap.scores + *c_base + static_cast<long long>(hh) * cap.stride;
  };
  if constexpr (Cap) {
    for (int e = tid; e < h_end - h0; e += static_cast<int>(blockDim.x)) { best[e] = 0ull; }
    if (tid == 0) {
      *c_base = (static_cast<long long>(s) * q_heads + h0) * cap.stride + score_row_offset(bq, bk, max_len, qb);
    }
  }
  bool any_sparse = false;
  for (int hh = h0; hh < h_end; ++hh) { any_sparse = any_sparse || tau[hh] > 0.f; }
  int const tiles_per_head = bq / 16, tiles = (h_end - h0) * tiles_per_head;
  if (any_sparse && br.kl > br.ns) {
    // this warp's A fragments, row scales and thresholds
    constexpr int KS = Dim / 32;
    std::uint32_t afr[est_mtiles][KS][4];
    float sq[est_mtiles][2], th[est_mtiles][2];
    int hrow[est_mtiles], irow[est_mtiles][2];
    [[maybe_unused]] unsigned okr = 0;  // Cap: bit 2 mt + half: the row is estimated
    int const gid = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int mt = 0; mt < est_mtiles; ++mt) {
      int const tile = warp * est_mtiles + mt;
      int const hh = tile < tiles ? h0 + tile / tiles_per_head : h0;
      hrow[mt] = hh;
      bool const tile_ok = tile < tiles && tau[hh] > 0.f;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        int const i = q0 + (tile % tiles_per_head) * 16 + gid + 8 * half;
        bool const ok = tile_ok && i < n;
        irow[mt][half] = i;
        std::size_t const o = static_cast<std::size_t>(hh) * tokens + t0 + i;
        sq[mt][half] = ok ? q_rs[o] : 0.f;
        th[mt][half] = ok ? thr[o] : __int_as_float(0x7f800000);
        if constexpr (Cap) {  // the quad's lane tig = 2 mt + half reads the slot back: no barrier
          okr |= ok ? 1u << (2 * mt + half) : 0u;
          if (ok && tig == 2 * mt + half) {
            int const slot = tile * 16 + gid + 8 * half;
            c_row[slot] = cap.row[o];
            c_lse[slot] = cap.lse[o];
          }
        }
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
          for (int hi = 0; hi < 2; ++hi) {
            std::uint32_t v = 0;
            if (ok) {
              v = __ldg(reinterpret_cast<unsigned const*>(q_codes + o * Dim + ks * 32 + hi * 16 + tig * 4));
            }
            afr[mt][ks][half + 2 * hi] = v;  // regs: (g, k lo), (g+8, k lo), (g, k hi), (g+8, k hi)
          }
        }
      }
    }
    auto stage_ptr = [&](int st) { return smem_raw + st * L.stage_bytes; };
    auto load_block = [&](int kb, int st) {
      unsigned char* base = stage_ptr(st);
      int const j0 = t0 + kb * bk;
      int const chunks16 = Dim / 16;
      for (int e = tid; e < bk * chunks16; e += static_cast<int>(blockDim.x)) {
        int const jj = e / chunks16, c16 = e % chunks16;
        cp_async16(base + jj * L.kstride + c16 * 16,
                   k_codes + (static_cast<std::size_t>(g) * tokens + j0 + jj) * Dim + c16 * 16);
      }
      auto* sk = reinterpret_cast<float*>(base + bk * L.kstride);
      auto* cr = sk + bk;
      for (int e = tid; e < bk; e += static_cast<int>(blockDim.x)) {
        sk[e] = k_rs[static_cast<std::size_t>(g) * tokens + j0 + e];
      }
      for (int e = tid; e < (h_end - h0) * bk; e += static_cast<int>(blockDim.x)) {
        int const hh = e / bk, jj = e % bk;
        cr[hh * bk + jj] = corr[static_cast<std::size_t>(h0 + hh) * tokens + j0 + jj];
      }
      cp_async_commit();
    };
    load_block(br.ns, 0);
    for (int kb = br.ns; kb < br.kl; ++kb) {
      int const st = (kb - br.ns) & 1;
      if (kb + 1 < br.kl) {
        load_block(kb + 1, st ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      unsigned char const* base = stage_ptr(st);
      auto const* sk = reinterpret_cast<float const*>(base + bk * L.kstride);
      auto const* cr = sk + bk;
      bool hit[est_mtiles] = {};
      [[maybe_unused]] float amax[est_mtiles][2];  // Cap: each row's largest A over the block's keys j <= i
      if constexpr (Cap) {
#pragma unroll
        for (int mt = 0; mt < est_mtiles; ++mt) { amax[mt][0] = amax[mt][1] = -__int_as_float(0x7f800000); }
      }
      // Blocks that end before the q block's first row need no causal test
      // (always so unless local < Bq); one instantiation each.
      auto multiply = [&](auto causal) {
        for (int n0 = 0; n0 < bk; n0 += 32) {
          int const nt_count = min(4, (bk - n0) / 8);
          int acc[est_mtiles][4][4];
#pragma unroll
          for (int mt = 0; mt < est_mtiles; ++mt) {
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
              for (int e = 0; e < 4; ++e) { acc[mt][nt][e] = dot_bias_bits; }
            }
          }
#pragma unroll
          for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
              if (nt < nt_count) {
                unsigned char const* kp = base + (n0 + nt * 8 + gid) * L.kstride + ks * 32 + tig * 4;
                std::uint32_t const b0 = *reinterpret_cast<std::uint32_t const*>(kp);
                std::uint32_t const b1 = *reinterpret_cast<std::uint32_t const*>(kp + 16);
#pragma unroll
                for (int mt = 0; mt < est_mtiles; ++mt) { mma_s8(acc[mt][nt], afr[mt][ks], b0, b1); }
              }
            }
          }
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            if (nt < nt_count) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                int const jj = n0 + nt * 8 + tig * 2 + e;
                float const skj = sk[jj];
                int const j = kb * bk + jj;
#pragma unroll
                for (int mt = 0; mt < est_mtiles; ++mt) {
                  float const cj = cr[(hrow[mt] - h0) * bk + jj];
#pragma unroll
                  for (int half = 0; half < 2; ++half) {
                    // exact: the accumulator started at the bias's bits and |dot| < 2^22
                    float const dot = __fsub_rn(__int_as_float(acc[mt][nt][2 * half + e]), dot_bias);
                    float const a = __fmaf_rn(__fmul_rn(sq[mt][half], skj), dot, cj);
                    if constexpr (Cap) {  // the keep test is amax >= T_i, after the loop
                      if constexpr (decltype(causal)::value) {
                        amax[mt][half] = j <= irow[mt][half] ? fmaxf(amax[mt][half], a) : amax[mt][half];
                      } else {
                        amax[mt][half] = fmaxf(amax[mt][half], a);
                      }
                    } else {
                      bool pass = a >= th[mt][half];
                      if constexpr (decltype(causal)::value) { pass = pass && j <= irow[mt][half]; }
                      hit[mt] = hit[mt] || pass;
                    }
                  }
                }
              }
            }
          }
        }
      };
      if (warp * est_mtiles < tiles) {
        if ((kb + 1) * bk - 1 > q0) {
          multiply(std::true_type{});
        } else {
          multiply(std::false_type{});
        }
      }
      if constexpr (Cap) {  // a >= T_i for some key iff the row's largest a is (th = +inf on rows not estimated)
#pragma unroll
        for (int mt = 0; mt < est_mtiles; ++mt) {
          hit[mt] = amax[mt][0] >= th[mt][0] || amax[mt][1] >= th[mt][1];
        }
      }
#pragma unroll
      for (int mt = 0; mt < est_mtiles; ++mt) {
        bool const any = __any_sync(0xffffffffu, hit[mt]);
        int const tile = warp * est_mtiles + mt;
        if (any && lane == 0 && tile < tiles) {
          atomicOr(&kept[(hrow[mt] - h0) * words + kb / 32], 1u << (kb % 32));
        }
      }
      if constexpr (Cap) {  // the block's score: max over rows of double(z~(row's max A)) - lse_i
        static_assert(est_mtiles == 2, "a quad's 4 lanes take its 2 x 2 rows");
        float v[est_mtiles][2];
#pragma unroll
        for (int mt = 0; mt < est_mtiles; ++mt) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {  // the quad's lanes hold the same rows
            v[mt][half] = fmaxf(amax[mt][half], __shfl_xor_sync(0xffffffffu, amax[mt][half], 1));
            v[mt][half] = fmaxf(v[mt][half], __shfl_xor_sync(0xffffffffu, v[mt][half], 2));
          }
        }
        int const my_mt = tig >> 1, my_half = tig & 1;  // this lane's row of the four
        float const vm = tig == 0 ? v[0][0] : (tig == 1 ? v[0][1] : (tig == 2 ? v[1][0] : v[1][1]));
        unsigned long long key = 0ull;
        if (((okr >> tig) & 1u) != 0 && vm != -__int_as_float(0x7f800000)) {
          int const slot = (warp * est_mtiles + my_mt) * 16 + gid + 8 * my_half;
          float const z = __fmul_rn(cap.scale, __fadd_rn(vm, c_row[slot]));
          key = score_key(__dsub_rn(static_cast<double>(z), c_lse[slot]));
        }
        auto max_xor = [&key](int o) {
          unsigned long long const other = __shfl_xor_sync(0xffffffffu, key, o);
          key = other > key ? other : key;
        };
        max_xor(1);  // max over the lanes of one row tile (same tig >> 1)
        max_xor(4);
        max_xor(8);
        max_xor(16);
        if ((lane == 0 || lane == 2) && key != 0ull) { atomicMax(&best[(lane == 0 ? hrow[0] : hrow[1]) - h0], key); }
      }
      __syncthreads();  // the stage is refilled next iteration
      if constexpr (Cap) {  // kept blocks' scores; best is next written after the next iteration's barrier
        for (int hh = tid; hh < h_end - h0; hh += static_cast<int>(blockDim.x)) {
          unsigned long long const key = best[hh];
          best[hh] = 0ull;
          if (key != 0ull && ((kept[hh * words + kb / 32] >> (kb % 32)) & 1u) != 0) { score_row(hh)[kb] = key; }
        }
      }
    }
  }
  __syncthreads();
  if constexpr (Cap) {  // the cap, per sparse q head; scores were written before the barrier above
    if (any_sparse && br.kl > br.ns) {
      auto* hist = reinterpret_cast<unsigned*>(c_row + est_rows);
      int* sh = reinterpret_cast<int*>(hist + cap_digits);
      for (int hh = 0; hh < h_end - h0; ++hh) {
        if (tau[h0 + hh] > 0.f) {
          cap_row(kept + hh * words, br.ns, br.kl, cap.max_blocks, score_row(hh), hist, sh, sh + 8);
        }
      }
    }
  }
  for (int e = tid; e < (h_end - h0) * words; e += static_cast<int>(blockDim.x)) {
    int const hh = e / words, w = e % words;
    bitmask[((static_cast<std::size_t>(s) * q_heads + h0 + hh) * q_blocks + qb) * words + w] = kept[hh * words + w];
  }
}

// ---- density and conversions ---------------------------------------------------

/// counts[2 h] += kept blocks, counts[2 h + 1] += causal blocks; one block per (s, h).
template <int Unused = 0>  // a template, so that several translation units may include this header
__global__ void density_count_kernel(std::uint32_t const* bitmask, std::int32_t const* cu, sparse_config cfg,
                                     int q_heads, int q_blocks, int words, int max_len,
                                     unsigned long long* counts)
{
  int const h = static_cast<int>(blockIdx.x), s = static_cast<int>(blockIdx.y);
  int const n = min(cu[s + 1] - cu[s], max_len);
  unsigned long long kept = 0, causal = 0;
  std::uint32_t const* rowp = bitmask + (static_cast<std::size_t>(s) * q_heads + h) * q_blocks * words;
  for (int e = static_cast<int>(threadIdx.x); e < q_blocks * words; e += static_cast<int>(blockDim.x)) {
    kept += static_cast<unsigned long long>(__popc(rowp[e]));
  }
  for (int qb = static_cast<int>(threadIdx.x); qb < q_blocks; qb += static_cast<int>(blockDim.x)) {
    causal += static_cast<unsigned long long>(causal_blocks(cfg, n, qb));
  }
  for (int o = 16; o > 0; o >>= 1) {
    kept += __shfl_xor_sync(0xffffffffu, kept, o);
    causal += __shfl_xor_sync(0xffffffffu, causal, o);
  }
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(&counts[2 * h], kept);
    atomicAdd(&counts[2 * h + 1], causal);
  }
}

template <int Unused = 0>  // a template, so that several translation units may include this header
__global__ void density_final_kernel(unsigned long long const* counts, int q_heads, double* density)
{
  int const h = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (h >= q_heads) { return; }
  unsigned long long const causal = counts[2 * h + 1];
  density[h] = causal > 0 ? static_cast<double>(counts[2 * h]) / static_cast<double>(causal) : 1.0;
}

/// BSR pass 1: indptr[r + 1] = set bits of row r (indptr[0] = 0).
template <int Unused = 0>  // a template, so that several translation units may include this header
__global__ void bsr_count_kernel(std::uint32_t const* bitmask, int rows, int words, std::int32_t* indptr)
{
  int const r = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (r == 0) { indptr[0] = 0; }
  if (r >= rows) { return; }
  int cnt = 0;
  for (int w = 0; w < words; ++w) { cnt += __popc(bitmask[static_cast<std::size_t>(r) * words + w]); }
  indptr[r + 1] = cnt;
}

/// BSR pass 2: inclusive scan of indptr[1 .. rows] in one block of 1024 threads.
template <int Unused = 0>  // a template, so that several translation units may include this header
__global__ void __launch_bounds__(1024) bsr_scan_kernel(std::int32_t* indptr, int rows)
{
  __shared__ std::int32_t warp_sums[32];
  __shared__ std::int32_t carry;
  if (threadIdx.x == 0) { carry = 0; }
  __syncthreads();
  int const lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
  for (int base = 0; base < rows; base += 1024) {
    int const r = base + static_cast<int>(threadIdx.x);
    std::int32_t v = r < rows ? indptr[r + 1] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      std::int32_t const u = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) { v += u; }
    }
    if (lane == 31) { warp_sums[warp] = v; }
    __syncthreads();
    if (warp == 0) {
      std::int32_t w = warp_sums[lane];
      for (int o = 1; o < 32; o <<= 1) {
        std::int32_t const u = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) { w += u; }
      }
      warp_sums[lane] = w;
    }
    __syncthreads();
    std::int32_t const total = v + (warp > 0 ? warp_sums[warp - 1] : 0) + carry;
    if (r < rows) { indptr[r + 1] = total; }
    __syncthreads();
    if (threadIdx.x == 1023) { carry = total; }
    __syncthreads();
  }
}

/// BSR pass 3: the set block indices of each row, ascending.
template <int Unused = 0>  // a template, so that several translation units may include this header
__global__ void bsr_fill_kernel(std::uint32_t const* bitmask, int rows, int words, std::int32_t const* indptr,
                                std::int32_t* indices)
{
  int const r = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (r >= rows) { return; }
  int at = indptr[r];
  for (int w = 0; w < words; ++w) {
    std::uint32_t bits = bitmask[static_cast<std::size_t>(r) * words + w];
    while (bits != 0u) {
      int const b = __ffs(static_cast<int>(bits)) - 1;
      indices[at++] = w * 32 + b;
      bits &= bits - 1u;
    }
  }
}

/// Consumer-block rows, one warp per (s, h, Q): the set consumer key blocks
/// ascending (FlexAttention BlockMask) or, with Deltas, the steps between them,
/// the first from block 0 (SpargeAttn's LUT); then 0-padded, and the count.
template <bool Deltas = false>
__global__ void block_mask_kernel(std::uint32_t const* bitmask, int batch, int q_heads, int q_blocks, int k_blocks,
                                  int words, int fq, int fk, int cq_blocks, int ck_blocks, std::int32_t* num,
                                  std::int32_t* idx)
{
  int const row = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  int const lane = static_cast<int>(threadIdx.x & 31);
  if (row >= batch * q_heads * cq_blocks) { return; }
  int const Q = row % cq_blocks, sh = row / cq_blocks;  // sh = s * q_heads + h
  std::uint32_t const* base = bitmask + static_cast<std::size_t>(sh) * q_blocks * words;
  std::int32_t* out = idx + static_cast<std::size_t>(row) * ck_blocks;
  int cnt = 0, last = 0;  // last: the highest set block of earlier chunks (0 before the first)
  for (int K0 = 0; K0 < ck_blocks; K0 += 32) {
    int const K = K0 + lane;
    bool any = false;
    if (K < ck_blocks) {
      for (int qb = Q * fq; qb < min((Q + 1) * fq, q_blocks) && !any; ++qb) {
        for (int kb = K * fk; kb < min((K + 1) * fk, k_blocks) && !any; ++kb) {
          any = ((base[static_cast<std::size_t>(qb) * words + kb / 32] >> (kb % 32)) & 1u) != 0;
        }
      }
    }
    unsigned const ballot = __ballot_sync(0xffffffffu, any);
    unsigned const below = ballot & ((1u << lane) - 1u);
    if (any) {
      int value = K;
      if constexpr (Deltas) { value = K - (below != 0u ? K0 + 31 - __clz(static_cast<int>(below)) : last); }
      out[cnt + __popc(below)] = value;
    }
    if (ballot != 0u) { last = K0 + 31 - __clz(static_cast<int>(ballot)); }
    cnt += __popc(ballot);
  }
  for (int K = cnt + lane; K < ck_blocks; K += 32) { out[K] = 0; }
  if (lane == 0) { num[row] = cnt; }
}

}  // namespace pqkv::detail::sale_gpu
