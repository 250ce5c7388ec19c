// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Kernels of the GPU slot table and block-LFU cache (cache/gpu_cache.cuh).
/// Users never name this header.
///
/// One CUDA block per row (one (sequence, KV head) of one layer for the slot
/// table; one sequence of one layer for the block cache) runs a whole step:
/// lookup through a dense key -> slot map, first-occurrence detection by an
/// atomicMin claim in that map, order-preserving compactions by block scans,
/// and victims by a block-wide radix select over 64-bit (score, stamp) keys
/// followed by a sort of the selected. Nothing leaves the device.
///
/// The step runs once per block and is a long, branchy program that issues
/// instructions, not memory traffic, at its limit (Nsight Compute on an H100:
/// about 2.5K instructions per warp; waiting for instruction fetch was a third
/// of the stall cycles at twice the code size). So code size counts: one
/// select serves both eviction-key sources and loops stay rolled.

#include <pqkv/cache/gpu_policies.cuh>
#include <pqkv/cache/policy.hpp>
#include <pqkv/core/cuda_try.hpp>

#include <cub/block/block_radix_rank.cuh>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda/functional>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>

namespace pqkv::detail::cache_gpu {

inline constexpr int block_threads = 512;
inline constexpr int scan_items = 4;  ///< consecutive entries per thread in a scan tile
inline constexpr int tile = block_threads * scan_items;
inline constexpr int warps = block_threads / 32;
inline constexpr std::int32_t claim_base = std::numeric_limits<std::int32_t>::min();

/// Count and key range of a candidate set, reduced in one block-wide pass.
struct key_range {
  int count;
  unsigned long long lo, hi;
};
struct merge_key_range {
  __device__ key_range operator()(key_range const& a, key_range const& b) const
  {
    return {a.count + b.count, a.lo < b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi};
  }
};

using block_scan = cub::BlockScan<int, block_threads>;
using block_reduce_range = cub::BlockReduce<key_range, block_threads>;
using block_reduce_int = cub::BlockReduce<int, block_threads>;
using block_sort = cub::BlockRadixSort<unsigned long long, block_threads, scan_items, std::int32_t>;
/// Selections up to this size are ranked pair against pair instead of radix sorted.
inline constexpr int rank_sort_max = 256;
/// Stable ranks of a tile by one 4-bit digit: the passes of the large-selection sort.
inline constexpr int rank_bits = 4;
using block_rank = cub::BlockRadixRank<block_threads, rank_bits, false>;

struct shared_scratch {
  union {
    block_scan::TempStorage scan;
    block_reduce_range::TempStorage range;
    block_reduce_int::TempStorage reduce;
  } temp;
  /// The selected (key, index) pairs of one select, in index order, when at
  /// most a tile of them; the radix sort that orders them reuses the space.
  union {
    struct {
      unsigned long long key[tile];
      std::int32_t idx[tile];
    } sel;
    block_sort::TempStorage sort;
    block_rank::TempStorage rank;
  } order;
  /// The first tile of a step's inserted keys (the slot table's misses), and
  /// on the distinct-keys path the position each came from.
  std::int32_t ins_key[tile];
  std::uint16_t ins_pos[tile];
  unsigned int hist[256];  ///< the radix select's histogram
  int warp_count[warps];   ///< the compaction: per warp (equal << 16 | below)
  unsigned long long warp_lo[warps], warp_hi[warps];
  int digit_start[1 << rank_bits];  // the large-selection sort: a digit's first output position
  int tile_start[1 << rank_bits];   // and its first rank in the current tile
  int total;
  int count;
  int want;
  int done;
  unsigned long long lo, hi;
  int flags[4];
  // The fast path's candidates before the select: the occupied slots' count
  // (from the preload) less the slots this step pins, and a key range that
  // holds them (the occupied slots').
  int pre_count;
  unsigned long long pre_lo, pre_hi;
};

/// Warp-wide minimum and maximum of 64-bit keys: two 32-bit reductions each.
__device__ __forceinline__ unsigned long long warp_min(unsigned long long v)
{
  auto const h = __reduce_min_sync(0xFFFFFFFFu, static_cast<unsigned int>(v >> 32));
  auto const l = __reduce_min_sync(0xFFFFFFFFu, static_cast<unsigned int>(v >> 32) == h ? static_cast<unsigned int>(v) : ~0u);
  return (static_cast<unsigned long long>(h) << 32) | l;
}
__device__ __forceinline__ unsigned long long warp_max(unsigned long long v)
{
  auto const h = __reduce_max_sync(0xFFFFFFFFu, static_cast<unsigned int>(v >> 32));
  auto const l = __reduce_max_sync(0xFFFFFFFFu, static_cast<unsigned int>(v >> 32) == h ? static_cast<unsigned int>(v) : 0u);
  return (static_cast<unsigned long long>(h) << 32) | l;
}

/// Float bits mapped so that unsigned order is float order (-0 as +0).
__device__ __forceinline__ std::uint32_t ordered_bits(float x)
{
  std::uint32_t const b = __float_as_uint(x == 0.f ? 0.f : x);
  return (b & 0x80000000u) != 0 ? ~b : (b | 0x80000000u);
}

/// One 4-bit digit of a key (CUB's digit-extractor interface), for the
/// large-selection sort.
struct lsd_digit {
  int shift;
  __device__ __forceinline__ std::uint32_t Digit(unsigned long long key) const
  {
    return static_cast<std::uint32_t>(key >> shift) & ((1u << rank_bits) - 1);
  }
};

/// Order-preserving compaction over [0, n): calls emit(i, rank) for every i
/// with pred(i), rank counting such i in index order; returns the count (all threads).
template <class Pred, class Emit>
__device__ int compact_in_order(int n, Pred pred, Emit emit, shared_scratch& sh)
{
  // The running offset lives in registers: every thread gets the tile's
  // aggregate from the scan, so no shared word is rewritten while others read it.
  int off = 0;
  for (int base = 0; base < n; base += tile) {
    int flags[scan_items];
    int ranks[scan_items];
#pragma unroll
    for (int u = 0; u < scan_items; ++u) {
      int const i = base + static_cast<int>(threadIdx.x) * scan_items + u;
      flags[u] = i < n && pred(i) ? 1 : 0;
    }
    int tile_total = 0;
    block_scan(sh.temp.scan).ExclusiveSum(flags, ranks, tile_total);
#pragma unroll
    for (int u = 0; u < scan_items; ++u) {
      if (flags[u] != 0) { emit(base + static_cast<int>(threadIdx.x) * scan_items + u, off + ranks[u]); }
    }
    off += tile_total;
    __syncthreads();  // the scan storage is reused, and emitted entries are read next
  }
  if (n <= 0) { __syncthreads(); }
  return off;
}

/// Selects the `want` smallest candidates of [0, n) in (key, index) order and
/// calls emit(rank, index) for each (rank 0 is the smallest; one call per
/// rank, from any thread); returns r = min(want, candidates). keys[i] (shared
/// or global memory) is i's key, ~0 when i is no candidate. sel_key /
/// sel_idx: global scratch of 2 n entries, used only when more than a tile is
/// selected. `known`: the candidates' count and a key range that holds them
/// all (it may be wider), when the caller has them (count < 0: the select
/// reduces them itself).
///
/// Steps: the candidates' count and key range (one reduction, unless
/// `known` gives them); a radix select of the threshold key T, 8 bits a pass
/// from the highest bit where the keys still in play differ (each pass
/// narrows their range first),
/// stopping early once the chosen bucket is taken whole; one ordered
/// compaction of the keys below T and the first keys equal to T; then the
/// order: up to rank_sort_max pairs rank each against the others, up to a
/// tile a stable block radix sort over the bits that still differ, beyond a
/// tile an LSD radix sort in global scratch, 4 bits a pass.
template <class Emit>
__device__ int select_smallest(int n, int want, unsigned long long const* keys, unsigned long long* sel_key,
                               std::int32_t* sel_idx, Emit emit, shared_scratch& sh,
                               key_range known = key_range{-1, 0, 0})
{
  // keys[i] == no_key: i is no candidate. The loops below load a key and
  // select on it without branching around the load.
  constexpr unsigned long long no_key = ~0ull;
  for (int b = static_cast<int>(threadIdx.x); b < 256; b += block_threads) { sh.hist[b] = 0; }
  if (known.count < 0) {
    key_range local{0, no_key, 0};
    for (int i = static_cast<int>(threadIdx.x); i < n; i += block_threads) {
      unsigned long long const k = keys[i];
      bool const c = k != no_key;
      local.count += c ? 1 : 0;
      local.lo = c && k < local.lo ? k : local.lo;
      local.hi = c && k > local.hi ? k : local.hi;
    }
    key_range const all = block_reduce_range(sh.temp.range).Reduce(local, merge_key_range{});
    if (threadIdx.x == 0) { known = all; }
  }
  if (threadIdx.x == 0) {
    sh.total = known.count;
    sh.lo = known.lo;
    sh.hi = known.hi;
  }
  __syncthreads();
  int const total = sh.total;
  int const r = total < want ? total : want;
  if (r <= 0) { return 0; }
  unsigned long long const lo = sh.lo;
  unsigned long long const hi = sh.hi;

  // The threshold T and how many keys equal to T are taken (the lowest
  // indices among them). Every candidate is taken when r == total.
  unsigned long long threshold = hi;
  int take_equal = total;
  if (r < total) {
    // Radix select, 8 bits a pass from the highest bit where the keys still
    // in play differ. The keys in play are the candidates in [plo, phi]; each
    // pass after the first narrows that range to their own minimum and
    // maximum, so bits they all share cost no pass (LFU keys: the use count's
    // float bits, then the stamps).
    unsigned long long plo = lo, phi = hi;
    int want = r;
    for (bool first = true;; first = false) {
      if (!first) {
        // The in-play keys' min and max: warp reductions, then one word per warp.
        unsigned long long mn = no_key, mx = 0;
        for (int i = static_cast<int>(threadIdx.x); i < n; i += block_threads) {
          unsigned long long const k = keys[i];
          bool const in_play = k != no_key && k >= plo && k <= phi;
          mn = in_play && k < mn ? k : mn;
          mx = in_play && k > mx ? k : mx;
        }
        mn = warp_min(mn);
        mx = warp_max(mx);
        if ((threadIdx.x & 31u) == 0) {
          sh.warp_lo[threadIdx.x / 32] = mn;
          sh.warp_hi[threadIdx.x / 32] = mx;
        }
        __syncthreads();
        mn = ~0ull;
        mx = 0;
#pragma unroll
        for (int w = 0; w < warps; ++w) {
          mn = sh.warp_lo[w] < mn ? sh.warp_lo[w] : mn;
          mx = sh.warp_hi[w] > mx ? sh.warp_hi[w] : mx;
        }
        plo = mn;
        phi = mx;
      }
      if (plo == phi) {
        threshold = plo;  // the keys in play are all equal: the lowest indices among them go
        take_equal = want;
        break;
      }
      int const top = 63 - __clzll(static_cast<long long>(plo ^ phi));
      int const shift = top >= 7 ? top - 7 : 0;
      // Histogram of the digit at `shift` (the keys in play share every bit
      // above it). The warp's lanes that share its first active lane's digit
      // add as one: keys of one step often share a stamp.
      unsigned int const lane = threadIdx.x & 31u;
      unsigned int* hist = sh.hist;
      // Each thread loads hist_items keys before counting any: the loads
      // cannot move past the shared atomics on their own.
      constexpr int hist_items = 4;
      for (int i0 = static_cast<int>(threadIdx.x - lane); i0 < n; i0 += block_threads * hist_items) {
        unsigned long long k[hist_items];
#pragma unroll
        for (int u = 0; u < hist_items; ++u) {
          int const i = i0 + u * block_threads + static_cast<int>(lane);
          k[u] = i < n ? keys[i] : no_key;
        }
#pragma unroll
        for (int u = 0; u < hist_items; ++u) {
          bool const in_play = k[u] != no_key && k[u] >= plo && k[u] <= phi;
          unsigned int const active = __ballot_sync(0xFFFFFFFFu, in_play);
          if (active == 0) { continue; }
          auto const digit = static_cast<unsigned int>(k[u] >> shift) & 0xFFu;
          int const leader = __ffs(static_cast<int>(active)) - 1;
          unsigned int const lead_digit = __shfl_sync(0xFFFFFFFFu, digit, leader);
          unsigned int const same = __ballot_sync(0xFFFFFFFFu, in_play && digit == lead_digit);
          if (static_cast<int>(lane) == leader) { atomicAdd(&hist[lead_digit], static_cast<unsigned int>(__popc(same))); }
          if (in_play && digit != lead_digit) { atomicAdd(&hist[digit], 1u); }
        }
      }
      __syncthreads();
      if (threadIdx.x < 32) {
        unsigned int counts[8];
        unsigned int sum = 0;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          counts[q] = sh.hist[threadIdx.x * 8 + q];
          sum += counts[q];
        }
        unsigned int incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          unsigned int const v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
          if (static_cast<int>(threadIdx.x) >= o) { incl += v; }
        }
        auto const w = static_cast<unsigned int>(want);
        unsigned int acc = incl - sum;
        if (acc < w && w <= incl) {
          for (int q = 0; q < 8; ++q) {
            if (acc + counts[q] >= w) {
              // The chosen bucket's range, clipped to the keys in play.
              unsigned long long const span = (1ull << shift) - 1;
              unsigned long long const below = shift + 8 >= 64 ? ~0ull : (1ull << (shift + 8)) - 1;
              unsigned long long const b_lo =
                (plo & ~below) | (static_cast<unsigned long long>(threadIdx.x * 8 + q) << shift);
              unsigned long long const b_hi = b_lo | span;
              sh.lo = b_lo > plo ? b_lo : plo;
              sh.hi = b_hi < phi ? b_hi : phi;
              sh.want = static_cast<int>(w - acc);
              sh.done = acc + counts[q] == w ? 1 : 0;  // the bucket is taken whole
              break;
            }
            acc += counts[q];
          }
        }
      }
      __syncthreads();
      plo = sh.lo;
      phi = sh.hi;
      want = sh.want;
      if (sh.done != 0) {
        threshold = phi;  // every key of the bucket is at most its top: all keys equal to it go
        take_equal = total;
        break;
      }
      if (shift == 0) {
        threshold = plo;  // a one-key bucket
        take_equal = want;
        break;
      }
      for (int b = static_cast<int>(threadIdx.x); b < 256; b += block_threads) { sh.hist[b] = 0; }
      // The next pass writes the warp words and the histogram only after its
      // first barrier, when every thread has read this pass's results.
      __syncthreads();
    }
  }

  // The selected pairs in index order: rank = keys below T before i + the
  // taken keys equal to T before i. A tile of 4096 candidates: warp w takes
  // the 256 from base + 256 w, its lanes striped (conflict-free loads);
  // ballots rank within the warp, one barrier publishes the warps' counts.
  bool const in_smem = r <= tile;
  constexpr int per_lane = 8;
  constexpr int warp_span = 32 * per_lane;
  {
    unsigned int const lane = threadIdx.x & 31u;
    unsigned int const lanes_below = (1u << lane) - 1u;
    int const warp = static_cast<int>(threadIdx.x / 32);
    int run_below = 0, run_equal = 0;  // over the previous tiles
    for (int base = 0; base < n; base += warps * warp_span) {
      unsigned long long key[per_lane];
      unsigned int below[per_lane], equal[per_lane];
      int warp_below = 0, warp_equal = 0;
#pragma unroll
      for (int u = 0; u < per_lane; ++u) {
        int const i = base + warp * warp_span + u * 32 + static_cast<int>(lane);
        key[u] = i < n ? keys[i] : no_key;
        bool const c = key[u] != no_key;
        below[u] = __ballot_sync(0xFFFFFFFFu, c && key[u] < threshold);
        equal[u] = __ballot_sync(0xFFFFFFFFu, c && key[u] == threshold);
        warp_below += __popc(below[u]);
        warp_equal += __popc(equal[u]);
      }
      if (lane == 0) { sh.warp_count[warp] = (warp_equal << 16) | warp_below; }
      __syncthreads();
      int n_below = run_below, n_equal = run_equal;
#pragma unroll
      for (int w = 0; w < warps; ++w) {
        int const c = sh.warp_count[w];
        if (w < warp) {
          n_below += c & 0xFFFF;
          n_equal += c >> 16;
        }
        run_below += c & 0xFFFF;
        run_equal += c >> 16;
      }
#pragma unroll
      for (int u = 0; u < per_lane; ++u) {
        bool const is_below = ((below[u] >> lane) & 1u) != 0;
        bool const is_equal = ((equal[u] >> lane) & 1u) != 0;
        int const b = n_below + __popc(below[u] & lanes_below);
        int const e = n_equal + __popc(equal[u] & lanes_below);
        n_below += __popc(below[u]);
        n_equal += __popc(equal[u]);
        if (!is_below && !(is_equal && e < take_equal)) { continue; }
        int const pos = b + (e < take_equal ? e : take_equal);
        int const i = base + warp * warp_span + u * 32 + static_cast<int>(lane);
        if (in_smem) {
          sh.order.sel.key[pos] = key[u];
          sh.order.sel.idx[pos] = i;
        } else {
          sel_key[pos] = key[u] - lo;
          sel_idx[pos] = i;
        }
      }
      __syncthreads();  // the warp counts are rewritten by the next tile, the pairs read next
    }
  }

  if (in_smem) {
    // Stable sort by key over the bits where the selected keys can differ:
    // equal keys keep their index order.
    int const bits = threshold == lo ? 0 : 64 - __clzll(static_cast<long long>(threshold - lo));
    unsigned long long key[scan_items];
    std::int32_t idx[scan_items];
#pragma unroll
    for (int u = 0; u < scan_items; ++u) {
      int const p = static_cast<int>(threadIdx.x) * scan_items + u;
      key[u] = p < r ? sh.order.sel.key[p] - lo : ~0ull;
      idx[u] = p < r ? sh.order.sel.idx[p] : -1;
    }
    if (bits == 0) {
      // All keys equal: index order is the order.
#pragma unroll
      for (int u = 0; u < scan_items; ++u) {
        int const p = static_cast<int>(threadIdx.x) * scan_items + u;
        if (p < r) { emit(p, idx[u]); }
      }
    } else if (r <= rank_sort_max) {
      // Few pairs: rank each against the others (shared-memory broadcasts;
      // index order breaks key ties) instead of radix passes.
      int const i = static_cast<int>(threadIdx.x);
      if (i < r) {
        unsigned long long const ki = sh.order.sel.key[i];
        int rank = 0;
        for (int j = 0; j < r; ++j) {
          unsigned long long const kj = sh.order.sel.key[j];
          rank += (kj < ki || (kj == ki && j < i)) ? 1 : 0;
        }
        emit(rank, sh.order.sel.idx[i]);
      }
    } else {
      __syncthreads();  // the sort's storage overlays the pairs
      block_sort(sh.order.sort).Sort(key, idx, 0, bits);
#pragma unroll
      for (int u = 0; u < scan_items; ++u) {
        int const p = static_cast<int>(threadIdx.x) * scan_items + u;
        if (p < r) { emit(p, idx[u]); }
      }
    }
  } else {
    // More than a tile selected: a stable LSD radix sort in global scratch,
    // 4 bits a pass over the bits where the selected keys differ. Each pass
    // counts the digits, then ranks tile by tile in index order (stable
    // within a tile) and carries each digit's next position across tiles.
    int const bits = threshold == lo ? 0 : 64 - __clzll(static_cast<long long>(threshold - lo));
    unsigned long long* key_in = sel_key;
    std::int32_t* idx_in = sel_idx;
    unsigned long long* key_out = sel_key + n;
    std::int32_t* idx_out = sel_idx + n;
    constexpr int digits = 1 << rank_bits;
    unsigned int const lane = threadIdx.x & 31u;
    for (int shift = 0; shift < bits; shift += rank_bits) {
      lsd_digit const digit_of{shift};
      // Digit counts: four ballots a round; lane d of each warp counts digit d.
      if (threadIdx.x < digits) { sh.digit_start[threadIdx.x] = 0; }
      int count = 0;
      for (int p0 = static_cast<int>(threadIdx.x - lane); p0 < r; p0 += block_threads) {
        int const p = p0 + static_cast<int>(lane);
        bool const valid = p < r;
        std::uint32_t const d = valid ? digit_of.Digit(key_in[p]) : 0u;
        unsigned int match = __ballot_sync(0xFFFFFFFFu, valid);
#pragma unroll
        for (int b = 0; b < rank_bits; ++b) {
          unsigned int const set = __ballot_sync(0xFFFFFFFFu, ((d >> b) & 1u) != 0);
          match &= ((lane >> b) & 1u) != 0 ? set : ~set;
        }
        count += __popc(match);
      }
      __syncthreads();  // the counters are zero
      if (lane < digits) { atomicAdd(&sh.digit_start[lane], count); }
      __syncthreads();
      if (threadIdx.x == 0) {
        int run = 0;
        for (int d = 0; d < digits; ++d) {
          int const c = sh.digit_start[d];
          sh.digit_start[d] = run;
          run += c;
        }
      }
      __syncthreads();
      for (int base = 0; base < r; base += tile) {
        unsigned long long k[scan_items];
        std::int32_t id[scan_items];
        int ranks[scan_items];
        int prefix[1];
#pragma unroll
        for (int u = 0; u < scan_items; ++u) {
          int const p = base + static_cast<int>(threadIdx.x) * scan_items + u;
          // Past the end: the last digit, ranked after every real key of the tile.
          k[u] = p < r ? key_in[p] : ~0ull;
          id[u] = p < r ? idx_in[p] : -1;
        }
        block_rank(sh.order.rank).RankKeys(k, ranks, digit_of, prefix);
        if (threadIdx.x < digits) { sh.tile_start[threadIdx.x] = prefix[0]; }
        __syncthreads();
#pragma unroll
        for (int u = 0; u < scan_items; ++u) {
          int const p = base + static_cast<int>(threadIdx.x) * scan_items + u;
          if (p >= r) { continue; }
          std::uint32_t const d = digit_of.Digit(k[u]);
          int const pos = sh.digit_start[d] + ranks[u] - sh.tile_start[d];
          key_out[pos] = k[u];
          idx_out[pos] = id[u];
        }
        __syncthreads();
        if (threadIdx.x < digits) {
          int const in_tile = r - base < tile ? r - base : tile;
          int const next = threadIdx.x + 1 < digits ? sh.tile_start[threadIdx.x + 1] : in_tile;
          sh.digit_start[threadIdx.x] += next - sh.tile_start[threadIdx.x];
        }
        __syncthreads();  // the rank storage and the starts are reused by the next tile
      }
      unsigned long long* const kt = key_in;
      std::int32_t* const it = idx_in;
      key_in = key_out;
      idx_in = idx_out;
      key_out = kt;
      idx_out = it;
    }
    for (int p = static_cast<int>(threadIdx.x); p < r; p += block_threads) { emit(p, idx_in[p]); }
  }
  __syncthreads();
  return r;
}

/// Parameters of one slot-table step over one layer; row r = b * kv_heads + h.
struct table_args {
  std::int32_t* slot_of;        // [rows, key_bound] slot of each key, -1 absent (claims inside a step)
  std::int32_t* key_of;         // [rows, managed] key in each slot, -1 free
  float* score;                 // [rows, managed]
  std::uint32_t* stamp;         // [rows, managed]
  std::uint32_t* pinned;        // [rows, managed] step that last used the slot
  std::uint32_t* steps;         // [rows] calls since reset (the policy's step and the pin epoch)
  std::uint32_t* used;          // [rows] occupied slots
  std::int32_t const* keys;     // [rows, n] selection, -1 padded
  std::int32_t const* newest;   // [batch] key of the reserved slot, or null
  std::int32_t* slots;          // [rows, n] out
  std::uint8_t* hit;            // [rows, n] out
  std::int32_t* ins_key;        // [rows, n] out: inserted keys in first-occurrence order
  std::int32_t* ins_slot;       // [rows, n] out
  std::int32_t* ins_evicted;    // [rows, n] out
  std::int32_t* ins_count;      // [rows] out
  std::int32_t* counters;       // [rows, 4] out: hits, misses, bypassed, bad keys
  unsigned long long* sel_key;  // [rows, 2 * managed] scratch
  std::int32_t* sel_idx;        // [rows, 2 * managed] scratch
  unsigned long long* key_cache;  // [rows, managed] scratch when the keys do not fit in shared memory
  bool keys_in_smem;            // eviction keys in dynamic shared memory (managed * 8 bytes)
  // Optional row pointers [rows, n] (null: none): hot row, store row when bypassed, null for padding.
  std::byte const** k_ptr;
  std::byte const** v_ptr;
  std::byte const* hot_k;       // [rows, capacity, row_bytes] hot buffer of the layer
  std::byte const* hot_v;
  std::byte const* store_k;     // [sequences, kv_heads, store_capacity, row_bytes] mapped store of the layer
  std::byte const* store_v;
  std::int64_t row_bytes;
  std::int64_t store_capacity;
  std::int64_t capacity;        // hot rows per row (managed + reserved)
  int n;
  int key_bound;
  int managed;
  int kv_heads;
  bool reserved;
};

template <class Policy>
__global__ void __launch_bounds__(block_threads) table_step_kernel(table_args a, Policy policy)
{
  __shared__ shared_scratch sh;
  __shared__ std::uint32_t s_step;
  std::int64_t const row = blockIdx.x;
  std::int64_t const rm = row * a.managed;
  std::int32_t* slot_of = a.slot_of + row * a.key_bound;
  std::int32_t* key_of = a.key_of + rm;
  std::uint32_t* pinned = a.pinned + rm;
  std::int32_t const* keys = a.keys + row * a.n;
  std::int32_t* slots = a.slots + row * a.n;
  std::uint8_t* hit = a.hit + row * a.n;
  std::int32_t* ins_key = a.ins_key + row * a.n;
  std::int32_t* ins_slot = a.ins_slot + row * a.n;
  std::int32_t* ins_evicted = a.ins_evicted + row * a.n;

  // Fast path (a batched-victim policy whose slots fit in shared memory): the
  // slots' state (score, stamp, key, eviction key) is loaded into shared
  // memory while the first tile's lookups are in flight, and this step's pins
  // are a shared bit set. The policy updates the shared copy, which is
  // written back whole and coalesced at the end: scattered per-hit global
  // stores and read-modify-writes cost more than that.
  bool const fast = gpu::victim_is_argmin_v<Policy> && a.keys_in_smem;
  extern __shared__ unsigned long long dyn_smem[];
  unsigned long long* s_evict_key = dyn_smem;                                      // [managed]
  auto* s_score = reinterpret_cast<float*>(dyn_smem + a.managed);                  // [managed]
  auto* s_stamp = reinterpret_cast<std::uint32_t*>(s_score + a.managed);           // [managed]
  auto* s_key_of = reinterpret_cast<std::int32_t*>(s_stamp + a.managed);           // [managed]
  auto* s_pins = reinterpret_cast<std::uint32_t*>(s_key_of + a.managed);           // [ceil(managed / 32)]
  __shared__ int s_used;
  if (threadIdx.x == 0) {
    std::uint32_t st = a.steps[row] + 1;
    sh.flags[0] = st == 0 ? 1 : 0;  // the epoch wrapped: old pins could match again
    st = st == 0 ? 1 : st;
    a.steps[row] = st;
    s_step = st;
    s_used = static_cast<int>(a.used[row]);
    sh.pre_count = 0;
    sh.pre_lo = ~0ull;
    sh.pre_hi = 0;
  }
  std::int32_t const newest = a.reserved && a.newest != nullptr ? a.newest[row / a.kv_heads] : -1;
  auto const reserved_slot = static_cast<std::int32_t>(a.managed);

  // The first tile's keys and their slots on the map as it was before the
  // call. Each thread takes scan_items consecutive entries per tile and issues
  // their loads together: the step is latency-bound, one block per row.
  auto lookup = [&](int j0, std::int32_t (&key)[scan_items], std::int32_t (&sl)[scan_items]) {
#pragma unroll
    for (int u = 0; u < scan_items; ++u) { key[u] = j0 + u < a.n ? keys[j0 + u] : -1; }
#pragma unroll
    for (int u = 0; u < scan_items; ++u) {
      bool const valid = key[u] >= 0 && key[u] < a.key_bound;
      sl[u] = !valid ? -1 : (key[u] == newest ? reserved_slot : slot_of[key[u]]);
    }
  };
  std::int32_t key0[scan_items], slot0[scan_items];
  int const j00 = static_cast<int>(threadIdx.x) * scan_items;
  std::int32_t const key_before = j00 > 0 && j00 <= a.n ? keys[j00 - 1] : -1;
  lookup(j00, key0, slot0);
  // Distinct-keys path: one tile whose valid keys strictly increase, with
  // any padding or bad keys after the last valid one (the scorer's output).
  // No key repeats, so every miss is its key's first occurrence: no claims
  // in the map, and each insert writes its slot straight to its position.
  bool ascending = a.n <= tile;
  {
    auto valid_key = [&](std::int32_t k) { return k >= 0 && k < a.key_bound; };
    std::int32_t prev = key_before;
#pragma unroll
    for (int u = 0; u < scan_items; ++u) {
      if (j00 + u < a.n && j00 + u > 0 && valid_key(key0[u]) && !(valid_key(prev) && prev < key0[u])) {
        ascending = false;
      }
      prev = key0[u];
    }
  }

  // The occupied slots' count and key range, gathered while loading them:
  // the select then needs no pass of its own for them.
  key_range pre{0, ~0ull, 0};
  if (fast) {
    float const* score = a.score + rm;
    std::uint32_t const* stamp = a.stamp + rm;
    int const occupied = static_cast<int>(a.used[row]);
    // One slot's eviction key: free slots hold the sentinel ~0 (no
    // candidate); so will the pinned ones.
    auto evict_key_of = [&](int at, float sc, std::uint32_t stp) {
      unsigned long long k = (static_cast<unsigned long long>(ordered_bits(sc)) << 32) | stp;
      k = k == ~0ull ? ~0ull - 1 : k;
      if (at >= occupied) { return ~0ull; }
      pre.count += 1;
      pre.lo = k < pre.lo ? k : pre.lo;
      pre.hi = k > pre.hi ? k : pre.hi;
      return k;
    };
    if (a.managed % 4 == 0) {
      // 16-byte loads and stores, 4 slots each (the row and the shared
      // arrays are then 16-byte aligned): 8 slots per thread in flight, the
      // loads one round trip per 4096 slots.
      constexpr int quad_items = 2;
      int const quads = a.managed / 4;
      for (int q0 = static_cast<int>(threadIdx.x); q0 < quads; q0 += block_threads * quad_items) {
        float4 sc[quad_items];
        uint4 stp[quad_items];
        int4 kof[quad_items];
#pragma unroll
        for (int u = 0; u < quad_items; ++u) {
          int const q = q0 + u * block_threads;
          int const ql = q < quads ? q : quads - 1;
          sc[u] = reinterpret_cast<float4 const*>(score)[ql];
          stp[u] = reinterpret_cast<uint4 const*>(stamp)[ql];
          kof[u] = reinterpret_cast<int4 const*>(key_of)[ql];
        }
#pragma unroll
        for (int u = 0; u < quad_items; ++u) {
          int const q = q0 + u * block_threads;
          if (q >= quads) { continue; }
          int const at = 4 * q;
          reinterpret_cast<ulonglong2*>(s_evict_key)[2 * q] =
            make_ulonglong2(evict_key_of(at, sc[u].x, stp[u].x), evict_key_of(at + 1, sc[u].y, stp[u].y));
          reinterpret_cast<ulonglong2*>(s_evict_key)[2 * q + 1] =
            make_ulonglong2(evict_key_of(at + 2, sc[u].z, stp[u].z), evict_key_of(at + 3, sc[u].w, stp[u].w));
          reinterpret_cast<float4*>(s_score)[q] = sc[u];
          reinterpret_cast<uint4*>(s_stamp)[q] = stp[u];
          reinterpret_cast<int4*>(s_key_of)[q] = kof[u];
        }
      }
    } else {
      // 8 slots per thread in flight: the loads are one round trip per 4096 slots.
      constexpr int preload_items = 8;
      for (int s0 = static_cast<int>(threadIdx.x); s0 < a.managed; s0 += block_threads * preload_items) {
        float sc[preload_items];
        std::uint32_t stp[preload_items];
        std::int32_t kof[preload_items];
#pragma unroll
        for (int u = 0; u < preload_items; ++u) {
          int const at = s0 + u * block_threads;
          int const sl = at < a.managed ? at : a.managed - 1;
          sc[u] = score[sl];
          stp[u] = stamp[sl];
          kof[u] = key_of[sl];
        }
#pragma unroll
        for (int u = 0; u < preload_items; ++u) {
          int const at = s0 + u * block_threads;
          if (at >= a.managed) { continue; }
          s_evict_key[at] = evict_key_of(at, sc[u], stp[u]);
          s_score[at] = sc[u];
          s_stamp[at] = stp[u];
          s_key_of[at] = kof[u];
        }
      }
    }
    for (int w = static_cast<int>(threadIdx.x); w < (a.managed + 31) / 32; w += block_threads) { s_pins[w] = 0; }
  }
  bool const distinct = __syncthreads_and(ascending ? 1 : 0) != 0;
  if (!fast && sh.flags[0] != 0) {
    for (int s = static_cast<int>(threadIdx.x); s < a.managed; s += block_threads) { pinned[s] = 0; }
    __syncthreads();
  }
  std::uint32_t const step = s_step;
  // The policy's view: the shared copy on the fast path (pins live in the bit set).
  cache::slot_state state = fast ? cache::slot_state{s_score, s_stamp, nullptr, static_cast<std::uint32_t>(a.managed), step}
                                 : cache::slot_state{a.score + rm, a.stamp + rm, pinned,
                                                     static_cast<std::uint32_t>(a.managed), step};

  // 1. Hits; misses claim their key with the lowest position holding it.
  int hits = 0, bad = 0, valid_count = 0, pins = 0;
  for (int base = 0; base < a.n; base += tile) {
    int const j0 = base + static_cast<int>(threadIdx.x) * scan_items;
    std::int32_t key[scan_items], s[scan_items];
    if (base == 0) {
#pragma unroll
      for (int u = 0; u < scan_items; ++u) {
        key[u] = key0[u];
        s[u] = slot0[u];
      }
    } else {
      lookup(j0, key, s);
    }
    std::uint32_t first[scan_items];
#pragma unroll
    for (int u = 0; u < scan_items; ++u) {
      bool const valid = key[u] >= 0 && key[u] < a.key_bound;
      bad += key[u] >= a.key_bound ? 1 : 0;
      valid_count += valid ? 1 : 0;
      first[u] = 0;
      if (s[u] >= 0 && s[u] != reserved_slot) {
        if (fast) {
          std::uint32_t const bit = 1u << (s[u] & 31);
          first[u] = (atomicOr(&s_pins[s[u] >> 5], bit) & bit) == 0 ? 1u : 0u;
        } else {
          first[u] = atomicExch(&pinned[s[u]], step) != step ? 1u : 0u;
        }
      }
      if (s[u] < 0 && valid && !distinct) { atomicMin(&slot_of[key[u]], claim_base + j0 + u); }
    }
    // The shared stores after all the pin atomics: a store between two of
    // them would hold the next one back until the first returned.
#pragma unroll
    for (int u = 0; u < scan_items; ++u) {
      if (fast && first[u] != 0) { s_evict_key[s[u]] = ~0ull; }  // pinned: no longer a candidate
      pins += static_cast<int>(first[u]);
      if (first[u] != 0) { policy.on_hit(state, static_cast<std::uint32_t>(s[u]), step); }
      hits += s[u] >= 0 ? 1 : 0;
      if (j0 + u < a.n) {
        slots[j0 + u] = s[u];
        hit[j0 + u] = s[u] >= 0 ? 1 : 0;
      }
    }
  }
  if (!distinct) { __syncthreads(); }  // the claims are in the map

  // 2. Distinct misses in first-occurrence order (the first tile from
  //    registers); the first tile of them is mirrored in shared memory.
  int misses = 0;
  for (int base = 0; base < a.n; base += tile) {
    int const j0 = base + static_cast<int>(threadIdx.x) * scan_items;
    std::int32_t key[scan_items];
    int flags[scan_items], ranks[scan_items];
#pragma unroll
    for (int u = 0; u < scan_items; ++u) {
      bool miss = false;
      if (base == 0) {
        key[u] = key0[u];
        miss = slot0[u] < 0;
      } else {
        key[u] = j0 + u < a.n ? keys[j0 + u] : -1;
        miss = j0 + u < a.n && hit[j0 + u] == 0;
      }
      flags[u] = miss && key[u] >= 0 && key[u] < a.key_bound &&
                     (distinct || slot_of[key[u]] == claim_base + j0 + u)
                   ? 1
                   : 0;
    }
    int tile_total = 0;
    block_scan(sh.temp.scan).ExclusiveSum(flags, ranks, tile_total);
#pragma unroll
    for (int u = 0; u < scan_items; ++u) {
      if (flags[u] == 0) { continue; }
      int const rank = misses + ranks[u];
      ins_key[rank] = key[u];
      if (rank < tile) {
        sh.ins_key[rank] = key[u];
        sh.ins_pos[rank] = static_cast<std::uint16_t>(j0 + u);  // distinct path: j0 + u < tile
      }
    }
    misses += tile_total;
    __syncthreads();
  }
  auto inserted_key = [&](int i) { return i < tile ? sh.ins_key[i] : ins_key[i]; };

  // 3. Free slots, lowest first, to the first misses. Slots are freed only by
  //    a reset and filled lowest first, so the free ones are [used, managed).
  int const used = s_used;
  int const free_slots = a.managed - used;
  int const to_free = misses < free_slots ? misses : free_slots;

  // 4. Inserts: into the free slots, then into victims as they are chosen.
  auto insert = [&](int i, std::int32_t s) {
    std::int32_t const key = inserted_key(i);
    std::int32_t const evicted = fast ? s_key_of[s] : key_of[s];
    if (evicted >= 0) { slot_of[evicted] = -1; }
    key_of[s] = key;
    slot_of[key] = s;
    if (!fast) { pinned[s] = step; }  // the fast path's pins live in shared memory
    policy.on_insert(state, static_cast<std::uint32_t>(s), step);
    ins_slot[i] = s;
    ins_evicted[i] = evicted;
    if (distinct) { slots[sh.ins_pos[i]] = s; }
  };
  for (int i = static_cast<int>(threadIdx.x); i < to_free; i += block_threads) { insert(i, used + i); }
  int inserted = to_free;
  if constexpr (gpu::victim_is_argmin_v<Policy>) {
    if (misses > to_free) {
      unsigned long long* sk = a.sel_key + 2 * rm;
      std::int32_t* si = a.sel_idx + 2 * rm;
      // The r-th smallest candidate goes to the (to_free + r)-th miss.
      auto to_victim = [&](int rank, int sl) { insert(to_free + rank, sl); };
      // The candidates' eviction keys, (ordered score bits, stamp), with the
      // sentinel ~0 for the others (free, i.e. at or past `used`, or pinned
      // by this step): in shared memory on the fast path, else computed once
      // into global scratch. One select serves both.
      unsigned long long const* evict_key = s_evict_key;
      if (!fast) {
        // Eviction keys of the candidates, once, in global scratch: (ordered
        // score bits, stamp); non-candidates (free, i.e. at or past `used`, or
        // pinned by this step) hold the sentinel ~0.
        unsigned long long* kc = a.key_cache + rm;
        evict_key = kc;
        float const* score = state.score;
        std::uint32_t const* stamp = state.stamp;
        for (int s0 = static_cast<int>(threadIdx.x) * scan_items; s0 < a.managed; s0 += tile) {
          std::uint32_t pin[scan_items], stp[scan_items];
          float sc[scan_items];
#pragma unroll
          for (int u = 0; u < scan_items; ++u) {
            int const sl = s0 + u < used ? s0 + u : 0;
            pin[u] = pinned[sl];
            sc[u] = score[sl];
            stp[u] = stamp[sl];
          }
#pragma unroll
          for (int u = 0; u < scan_items; ++u) {
            unsigned long long k = (static_cast<unsigned long long>(ordered_bits(sc[u])) << 32) | stp[u];
            k = k == ~0ull ? ~0ull - 1 : k;
            if (s0 + u < a.managed) { kc[s0 + u] = s0 + u < used && pin[u] != step ? k : ~0ull; }
          }
        }
        __syncthreads();
      }
      // The fast path knows its candidates: the occupied slots less this
      // step's pins, each thread's share still in registers.
      key_range known{-1, 0, 0};
      if (fast) {
        int const count = __reduce_add_sync(0xFFFFFFFFu, pre.count - pins);
        unsigned long long const lo = warp_min(pre.lo);
        unsigned long long const hi = warp_max(pre.hi);
        if ((threadIdx.x & 31u) == 0) {
          atomicAdd(&sh.pre_count, count);
          if (lo != ~0ull) {
            atomicMin(&sh.pre_lo, lo);
            atomicMax(&sh.pre_hi, hi);
          }
        }
        __syncthreads();
        known = key_range{sh.pre_count, sh.pre_lo, sh.pre_hi};
      }
      inserted += select_smallest(a.managed, misses - to_free, evict_key, sk, si, to_victim, sh, known);
    }
  } else {
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int i = to_free; i < misses; ++i) {
        std::uint32_t const v = policy.victim(state);
        if (v == cache::no_slot || v >= static_cast<std::uint32_t>(a.managed) || !state.evictable(v)) { break; }
        insert(i, static_cast<std::int32_t>(v));
        ++inserted;
      }
      sh.count = inserted;
    }
    __syncthreads();
    inserted = sh.count;
  }
  for (int i = inserted + static_cast<int>(threadIdx.x); i < misses && !distinct; i += block_threads) {
    slot_of[inserted_key(i)] = -1;  // the bypassed keys' claims
  }
  __syncthreads();

  // 5. Every occurrence of a miss gets its key's slot (-1 when bypassed); row
  //    pointers. On the distinct-keys path the inserts wrote the slots.
  int bypassed = 0;
  for (int base = 0; base < a.n && !(distinct && a.k_ptr == nullptr); base += tile) {
    int const j0 = base + static_cast<int>(threadIdx.x) * scan_items;
    std::int32_t key[scan_items], s[scan_items];
#pragma unroll
    for (int u = 0; u < scan_items; ++u) {
      key[u] = j0 + u < a.n ? keys[j0 + u] : -1;
      s[u] = j0 + u < a.n ? slots[j0 + u] : -1;
    }
#pragma unroll
    for (int u = 0; u < scan_items; ++u) {
      bool const miss = key[u] >= 0 && key[u] < a.key_bound && s[u] < 0;
      if (miss && distinct) {
        ++bypassed;
      } else if (miss) {
        s[u] = slot_of[key[u]];
        slots[j0 + u] = s[u];
        bypassed += s[u] < 0 ? 1 : 0;
      }
    }
    if (a.k_ptr != nullptr) {
#pragma unroll
      for (int u = 0; u < scan_items; ++u) {
        if (j0 + u >= a.n) { continue; }
        bool const valid = key[u] >= 0 && key[u] < a.key_bound;
        std::byte const* kp = nullptr;
        std::byte const* vp = nullptr;
        if (valid && s[u] >= 0) {
          std::int64_t const off = (row * a.capacity + s[u]) * a.row_bytes;
          kp = a.hot_k + off;
          vp = a.hot_v + off;
        } else if (valid) {
          std::int64_t const off = (row * a.store_capacity + key[u]) * a.row_bytes;
          kp = a.store_k + off;
          vp = a.store_v + off;
        }
        a.k_ptr[row * a.n + j0 + u] = kp;
        a.v_ptr[row * a.n + j0 + u] = vp;
      }
    }
  }
  if (fast) {
    // Every occupied slot's state back to global memory, coalesced (the
    // inserts' writes to shared memory are behind the barrier above).
    float* score = a.score + rm;
    std::uint32_t* stamp = a.stamp + rm;
    int const occupied = used + to_free;
    if (a.managed % 4 == 0) {
      // Whole 16-byte quads: the slots past `occupied` go back as they were loaded.
      for (int q = static_cast<int>(threadIdx.x); q < (occupied + 3) / 4; q += block_threads) {
        reinterpret_cast<float4*>(score)[q] = reinterpret_cast<float4 const*>(s_score)[q];
        reinterpret_cast<uint4*>(stamp)[q] = reinterpret_cast<uint4 const*>(s_stamp)[q];
      }
    } else {
      for (int sl = static_cast<int>(threadIdx.x); sl < occupied; sl += block_threads) {
        score[sl] = s_score[sl];
        stamp[sl] = s_stamp[sl];
      }
    }
  }
  // Counters: warp sums, then one shared atomic per warp and counter.
  if (threadIdx.x < 4) { sh.flags[threadIdx.x] = 0; }
  __syncthreads();
  int const w_hits = __reduce_add_sync(0xFFFFFFFFu, hits);
  int const w_valid = __reduce_add_sync(0xFFFFFFFFu, valid_count);
  int const w_bypassed = __reduce_add_sync(0xFFFFFFFFu, bypassed);
  int const w_bad = __reduce_add_sync(0xFFFFFFFFu, bad);
  if ((threadIdx.x & 31u) == 0) {
    atomicAdd(&sh.flags[0], w_hits);
    atomicAdd(&sh.flags[1], w_valid);
    atomicAdd(&sh.flags[2], w_bypassed);
    atomicAdd(&sh.flags[3], w_bad);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a.ins_count[row] = inserted;
    a.used[row] = static_cast<std::uint32_t>(used + to_free);
    std::int32_t* c = a.counters + row * 4;
    c[0] = sh.flags[0];
    c[1] = sh.flags[1] - sh.flags[0];  // misses are occurrences: valid entries that did not hit
    c[2] = distinct && a.k_ptr == nullptr ? misses - inserted : sh.flags[2];
    c[3] = sh.flags[3];
  }
}

/// Dynamic shared memory of the step's fast path: per slot its eviction key,
/// its score, stamp and key and a pin bit.
inline std::size_t table_smem_bytes(int managed)
{
  auto const m = static_cast<std::size_t>(managed);
  return m * (sizeof(unsigned long long) + sizeof(float) + 2 * sizeof(std::uint32_t)) +
         (m + 31) / 32 * sizeof(std::uint32_t);
}

/// Raises the step kernel's dynamic shared memory limit on the current device
/// to all the block can have, and returns how many slots' eviction keys that
/// holds. Called once by the table's constructor (not a stream operation).
template <class Policy>
int prepare_table_step()
{
  int device = 0;
  int optin = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  PQKV_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr{};
  PQKV_CUDA_TRY(cudaFuncGetAttributes(&attr, table_step_kernel<Policy>));
  int const room = optin - static_cast<int>(attr.sharedSizeBytes);
  // The most slots whose fast-path state fits (20 bytes and a bit each).
  int slots = room > 0 ? static_cast<int>(static_cast<long long>(room) * 8 / 161) : 0;
  while (slots > 0 && table_smem_bytes(slots) > static_cast<std::size_t>(room)) { --slots; }
  if (slots == 0) { return 0; }
  PQKV_CUDA_TRY(cudaFuncSetAttribute(table_step_kernel<Policy>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(table_smem_bytes(slots))));
  return slots;
}

template <class Policy>
void launch_table_step(table_args const& a, Policy policy, int rows, cudaStream_t stream)
{
  std::size_t const smem =
    gpu::victim_is_argmin_v<Policy> && a.keys_in_smem ? table_smem_bytes(a.managed) : std::size_t{0};
  table_step_kernel<Policy><<<rows, block_threads, smem, stream>>>(a, policy);
  PQKV_CUDA_CHECK_LAST();
}

/// Empties `rows` rows of a layer: every key absent, every slot free with
/// score, stamp, pin and step 0.
template <int Unused = 0>
__global__ void table_reset_kernel(table_args a)
{
  std::int64_t const row = blockIdx.y;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < a.key_bound;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    a.slot_of[row * a.key_bound + i] = -1;
  }
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < a.managed;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    std::int64_t const at = row * a.managed + i;
    a.key_of[at] = -1;
    a.score[at] = 0.f;
    a.stamp[at] = 0;
    a.pinned[at] = 0;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    a.steps[row] = 0;
    a.used[row] = 0;
  }
}

inline void launch_table_reset(table_args const& a, int rows, cudaStream_t stream)
{
  dim3 const grid{64, static_cast<unsigned>(rows)};
  table_reset_kernel<><<<grid, 256, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
}

// ---------------------------------------------------------------------------
// PQCache's block LFU (cpu::block_lfu_cache), one block per sequence.

struct block_args {
  std::int32_t* slot_of;        // [seqs, max_blocks] slot of each block, -1 absent
  std::uint32_t* count;         // [seqs, max_blocks] this step's entries per block; 0 between steps
  std::int32_t* block_of;       // [seqs, cap] block in each slot, -1 free
  float* use;                   // [seqs, cap]
  std::uint32_t* stamp;         // [seqs, cap]
  std::uint32_t* size;          // [seqs] resident blocks
  std::uint32_t* touch;         // [seqs] touch counter
  std::int32_t const* selection;  // [seqs, kv_heads, k]
  std::int32_t const* offloaded;  // [seqs] positions in the store (device)
  std::int32_t* rows;           // [seqs, kv_heads, k] out, or null
  std::int32_t* distinct;       // [seqs, kv_heads * k] scratch: this step's blocks
  unsigned long long* sel_key;  // [seqs, 3 * kv_heads * k] scratch: the ranked keys, then the select's
  std::int32_t* sel_idx;        // [seqs, 2 * kv_heads * k] scratch
  std::int32_t* ranked;         // [seqs, per_step] scratch: kept blocks, busiest first
  std::int32_t* promoted;       // [seqs, per_step] out
  std::int32_t* ins_block;      // [seqs, per_step] out
  std::int32_t* ins_slot;       // [seqs, per_step] out
  std::int32_t* ins_evicted;    // [seqs, per_step] out
  std::uint8_t* ins_copy;       // [seqs, per_step] out
  std::int32_t* counters;       // [seqs, 5] out: token hits, token misses, promoted, inserts, bad entries
  std::int32_t* copy_src;       // [seqs, kv_heads, per_step * block_tokens] out: store rows to copy
  std::int32_t* copy_dst;       // same: hot rows they go to
  std::int32_t* copy_count;     // [seqs * kv_heads] out
  std::int64_t max_blocks;
  std::int64_t max_tokens;
  int kv_heads;
  int k;
  int cap;
  int block_tokens;
  int per_step;
};

template <int Unused = 0>
__global__ void __launch_bounds__(block_threads) block_lfu_step_kernel(block_args a)
{
  __shared__ shared_scratch sh;
  __shared__ int s_distinct, s_promoted, s_inserted;
  std::int64_t const seq = blockIdx.x;
  std::int32_t* slot_of = a.slot_of + seq * a.max_blocks;
  std::uint32_t* count = a.count + seq * a.max_blocks;
  std::int32_t* block_of = a.block_of + seq * a.cap;
  float* use = a.use + seq * a.cap;
  std::uint32_t* stamp = a.stamp + seq * a.cap;
  int const entries = a.kv_heads * a.k;
  std::int32_t const* sel = a.selection + seq * entries;
  std::int32_t* distinct = a.distinct + seq * entries;
  std::int64_t const ps = seq * a.per_step;
  auto const bt = static_cast<std::int64_t>(a.block_tokens);
  if (threadIdx.x == 0) {
    s_distinct = 0;
    s_promoted = 0;
    s_inserted = 0;
  }
  __syncthreads();

  // 1-2. Hits on the cache as it was; per-block counts; the step's distinct blocks.
  int hits = 0, misses = 0, bad = 0;
  for (int e = static_cast<int>(threadIdx.x); e < entries; e += block_threads) {
    std::int32_t const pos = sel[e];
    std::int32_t row = -1;
    if (pos >= a.max_tokens) {
      ++bad;
    } else if (pos >= 0) {
      std::int64_t const b = pos / bt;
      if (atomicAdd(&count[b], 1u) == 0) { distinct[atomicAdd(&s_distinct, 1)] = static_cast<std::int32_t>(b); }
      std::int32_t const s = slot_of[b];
      if (s >= 0) {
        row = static_cast<std::int32_t>(s * bt + pos % bt);
        ++hits;
      } else {
        ++misses;
      }
    }
    if (a.rows != nullptr) { a.rows[seq * entries + e] = row; }
  }
  __syncthreads();
  int const nd = s_distinct;

  // 3. The busiest blocks: count descending, then block ascending (unique keys).
  std::int32_t* ranked = a.ranked + ps;
  //    Keys (~count, block) are unique and never the select's no-candidate sentinel.
  unsigned long long* block_keys = a.sel_key + 3 * seq * entries;
  for (int i = static_cast<int>(threadIdx.x); i < nd; i += block_threads) {
    std::int32_t const b = distinct[i];
    block_keys[i] = (static_cast<unsigned long long>(~count[b]) << 32) | static_cast<std::uint32_t>(b);
  }
  __syncthreads();
  int const kept = select_smallest(nd, a.per_step, block_keys, block_keys + entries,
                                   a.sel_idx + 2 * seq * entries, [&](int rank, int i) { ranked[rank] = i; }, sh);
  for (int i = static_cast<int>(threadIdx.x); i < kept; i += block_threads) { ranked[i] = distinct[ranked[i]]; }
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < nd; i += block_threads) { count[distinct[i]] = 0; }

  // 4-5. Kept blocks in rank order, by warp 0 (each insert may evict the last one's block).
  if (threadIdx.x < 32) {
    unsigned const lane = threadIdx.x;
    std::int64_t const offloaded = a.offloaded[seq];
    std::uint32_t size = a.size[seq];
    std::uint32_t touch = a.touch[seq];
    int promoted = 0, inserted = 0;
    cache::lfu const policy{};
    cache::slot_state state{use, stamp, nullptr, static_cast<std::uint32_t>(a.cap), 0};
    for (int i = 0; i < kept; ++i) {
      std::int32_t const block = ranked[i];
      if ((std::int64_t{block} + 1) * bt > offloaded) { continue; }
      std::int32_t const held = slot_of[block];
      if (held >= 0) {
        if (lane == 0) {
          policy.on_hit(state, static_cast<std::uint32_t>(held), touch);
          a.promoted[ps + promoted] = block;
        }
        ++touch;
        ++promoted;
        __syncwarp();
        continue;
      }
      std::uint32_t slot = 0;
      if (size < static_cast<std::uint32_t>(a.cap)) {
        slot = size++;
      } else {
        // Warp argmin in eviction order (lowest use, then oldest stamp, then slot).
        std::uint32_t best = cache::no_slot;
        for (std::uint32_t s = lane; s < static_cast<std::uint32_t>(a.cap); s += 32) {
          if (best == cache::no_slot || state.evicts_before(s, best)) { best = s; }
        }
        for (int o = 16; o > 0; o >>= 1) {
          std::uint32_t const other = __shfl_xor_sync(0xFFFFFFFFu, best, o);
          if (other != cache::no_slot && (best == cache::no_slot || state.evicts_before(other, best))) { best = other; }
        }
        slot = best;
      }
      if (lane == 0) {
        std::int32_t const evicted = block_of[slot];
        if (evicted >= 0) { slot_of[evicted] = -1; }
        block_of[slot] = block;
        slot_of[block] = static_cast<std::int32_t>(slot);
        policy.on_insert(state, slot, touch);
        a.ins_block[ps + inserted] = block;
        a.ins_slot[ps + inserted] = static_cast<std::int32_t>(slot);
        a.ins_evicted[ps + inserted] = evicted;
      }
      ++touch;
      ++inserted;
      __syncwarp();
    }
    if (lane == 0) {
      a.size[seq] = size;
      a.touch[seq] = touch;
      s_promoted = promoted;
      s_inserted = inserted;
    }
  }
  __syncthreads();
  int const inserted = s_inserted;

  // 6. Copy flags: the block still holds the slot and did not hold it before.
  for (int i = static_cast<int>(threadIdx.x); i < inserted; i += block_threads) {
    std::int32_t const block = a.ins_block[ps + i];
    std::int32_t const slot = a.ins_slot[ps + i];
    bool held_before = false;
    for (int j = 0; j < i; ++j) {
      held_before = held_before || (a.ins_evicted[ps + j] == block && a.ins_slot[ps + j] == slot);
    }
    a.ins_copy[ps + i] = slot_of[block] == slot && !held_before ? 1 : 0;
  }
  __syncthreads();
  // The copy lists of every head: rows of the copied blocks, in insert order.
  int const copies = compact_in_order(
    inserted, [&](int i) { return a.ins_copy[ps + i] != 0; },
    [&](int i, int rank) {
      std::int32_t const block = a.ins_block[ps + i];
      std::int32_t const slot = a.ins_slot[ps + i];
      for (int h = 0; h < a.kv_heads; ++h) {
        std::int64_t const base = (seq * a.kv_heads + h) * a.per_step * bt + rank * bt;
        for (int t = 0; t < a.block_tokens; ++t) {
          a.copy_src[base + t] = static_cast<std::int32_t>(block * bt + t);
          a.copy_dst[base + t] = static_cast<std::int32_t>(slot * bt + t);
        }
      }
    },
    sh);
  int const t_hits = block_reduce_int(sh.temp.reduce).Sum(hits);
  __syncthreads();
  int const t_misses = block_reduce_int(sh.temp.reduce).Sum(misses);
  __syncthreads();
  int const t_bad = block_reduce_int(sh.temp.reduce).Sum(bad);
  if (threadIdx.x == 0) {
    std::int32_t* c = a.counters + seq * 5;
    c[0] = t_hits;
    c[1] = t_misses;
    c[2] = s_promoted;
    c[3] = inserted;
    c[4] = t_bad;
  }
  for (int h = static_cast<int>(threadIdx.x); h < a.kv_heads; h += block_threads) {
    a.copy_count[seq * a.kv_heads + h] = copies * a.block_tokens;
  }
}

inline void launch_block_lfu_step(block_args const& a, int seqs, cudaStream_t stream)
{
  block_lfu_step_kernel<><<<seqs, block_threads, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
}

template <int Unused = 0>
__global__ void block_lfu_reset_kernel(block_args a)
{
  std::int64_t const seq = blockIdx.y;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < a.max_blocks;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    a.slot_of[seq * a.max_blocks + i] = -1;
    a.count[seq * a.max_blocks + i] = 0;
  }
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < a.cap;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    a.block_of[seq * a.cap + i] = -1;
    a.use[seq * a.cap + i] = 0.f;
    a.stamp[seq * a.cap + i] = 0;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    a.size[seq] = 0;
    a.touch[seq] = 0;
  }
}

inline void launch_block_lfu_reset(block_args const& a, int seqs, cudaStream_t stream)
{
  dim3 const grid{32, static_cast<unsigned>(seqs)};
  block_lfu_reset_kernel<><<<grid, 256, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
}

}  // namespace pqkv::detail::cache_gpu
