// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::rq_reconstruct`, `pqkv::gpu::rq_reconstruct_indices`,
/// `pqkv::gpu::rq_reconstruct_paged`: residual codes back to float, half or
/// bf16 K or V rows on the GPU, for a token range, for the scorer's -1-padded
/// index lists, or for those lists into a paged KV cache (the
/// dequantize-then-attend anchor).
///
/// Contract: that of `pqkv::cpu::rq_reconstruct` (decode/residual_reconstruct.hpp),
/// bit for bit: for channel i of split s, `acc = 0.f; acc += C(hc, s, st,
/// code, i)` over stages ascending (`__fadd_rn`), written to channel
/// perm[s * dsub + i] rounded to the output type; index -1 gives a zero row.
///
/// Memory and ordering: device views in and out; one launch on `stream`, no
/// allocation, no synchronization, graph-capturable. Not checked (device
/// memory): codes < 2^bits (a larger code is read modulo 2^bits), index
/// entries in [-1, tokens) (others give a zero row, as -1 does; the paged
/// call skips them, and skips tokens whose logical page is past the block
/// table or maps outside [0, num_pages)), finite centroids. Every shape, null
/// and host pointer is checked before the launch.

#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/encode/residual.cuh>
#include <pqkv/encode/residual.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

namespace pqkv::detail::rq_gpu {

inline constexpr int reconstruct_threads = 128;

template <class Code, class Out>
struct reconstruct_args {
  float const* centroids;  // [1|heads, splits, stages, ksub, dsub]
  Code const* codes;       // [heads, tokens, splits * stages]
  std::int32_t const* indices;  // [heads, count] or null (then rows first + j)
  Out* out;                // [heads, count, dim], strides o0, o1, o2; paged: the pages
  index_t o0, o1, o2;
  std::int32_t const* block_table;  // paged calls: [table_len] physical page of each logical page
  index_t table_len, page_size, num_pages, p0, p1;  // paged: page and slot strides (o0: head, o2: channel)
  index_t tokens, count, first;
  int heads, dim, splits, stages, ksub, dsub;
  bool shared;
  channel_map map;
};

/// grid (count, heads): row j of head h.
template <class Code, class Out>
__global__ void __launch_bounds__(reconstruct_threads) reconstruct_kernel(reconstruct_args<Code, Out> const a)
{
  index_t const j = blockIdx.x;
  int const h = static_cast<int>(blockIdx.y);
  index_t t = a.first + j;
  if (a.indices != nullptr) {
    t = a.indices[static_cast<index_t>(h) * a.count + j];
    if (t >= a.tokens) { t = -1; }
  }
  int const n = a.splits * a.stages;
  Code const* const row = a.codes + (static_cast<index_t>(h) * a.tokens + (t < 0 ? 0 : t)) * n;
  unsigned const mask = static_cast<unsigned>(a.ksub - 1);
  Out* o = a.out + h * a.o0 + j * a.o1;
  if (a.block_table != nullptr) {  // paged: only valid tokens on mapped pages are written
    if (t < 0 || t / a.page_size >= a.table_len) { return; }
    index_t const phys = a.block_table[t / a.page_size];
    if (phys < 0 || phys >= a.num_pages) { return; }
    o = a.out + phys * a.p0 + (t % a.page_size) * a.p1 + h * a.o0;
  }
  for (int d = threadIdx.x; d < a.dim; d += reconstruct_threads) {
    int const s = d / a.dsub, i = d % a.dsub;
    float acc = 0.f;
    if (t >= 0) {
      float const* const c =
        a.centroids + static_cast<std::size_t>((a.shared ? 0 : h) * a.splits + s) * a.stages * a.ksub * a.dsub + i;
      for (int st = 0; st < a.stages; ++st) {
        unsigned const code = static_cast<unsigned>(row[s * a.stages + st]) & mask;
        acc = __fadd_rn(acc, c[(static_cast<std::size_t>(st) * a.ksub + code) * a.dsub]);
      }
    }
    o[index_t{a.map.perm[d]} * a.o2] = from_float<Out>(acc);
  }
}

// ---- sliced path: a channel slice of every stage's codebook in shared memory ------------

/// Channels a block of the sliced kernel rebuilds (a half-warp, one per lane).
inline constexpr int slice_channels = 16;
inline constexpr int sliced_threads = 1024;
/// Rows a half-warp takes per step: their code loads are in flight together.
inline constexpr int sliced_rows = 4;
/// Most stages the sliced kernel takes (one code per lane of a half-warp).
inline constexpr int sliced_max_stages = 16;

/// Dynamic shared memory of the sliced kernel: [stages, ksub, slice_channels] floats.
[[nodiscard]] constexpr std::size_t sliced_smem_bytes(int stages, int ksub) noexcept
{
  return static_cast<std::size_t>(stages) * static_cast<std::size_t>(ksub) * slice_channels * sizeof(float);
}

/// grid (row blocks, dim / slice_channels, heads), sliced_threads threads:
/// slice y holds permuted channels [16 y, 16 y + 16) of split s; the block
/// copies those channels of every codeword of split s into shared memory
/// once, then rebuilds them for rows [x * rows_per_block, ...). Each
/// half-warp takes sliced_rows rows at a time; lane l < stages of it loads
/// stage l's code of a row (one coalesced read), the others get it by
/// shuffle, and lane c adds the stages of channel c in ascending order (the
/// contract's chain, so the values are the row kernel's bit for bit). The
/// codebook then costs one read per block instead of 4 x stages bytes per
/// element written.
template <class Code, class Out>
__global__ void __launch_bounds__(sliced_threads, 1)
  reconstruct_sliced_kernel(reconstruct_args<Code, Out> const a, index_t rows_per_block)
{
  extern __shared__ __align__(16) float book[];  // [stages, ksub, slice_channels]
  int const h = static_cast<int>(blockIdx.z);
  int const c0 = static_cast<int>(blockIdx.y) * slice_channels;
  int const s = c0 / a.dsub, i0 = c0 % a.dsub;
  int const entries = a.stages * a.ksub;
  float const* const src =
    a.centroids + static_cast<std::size_t>((a.shared ? 0 : h) * a.splits + s) * entries * a.dsub + i0;
  for (int e = static_cast<int>(threadIdx.x); e < entries * (slice_channels / 4); e += sliced_threads) {
    int const entry = e / (slice_channels / 4), quarter = e % (slice_channels / 4);
    reinterpret_cast<float4*>(book)[e] =
      __ldg(reinterpret_cast<float4 const*>(src + static_cast<std::size_t>(entry) * a.dsub) + quarter);
  }
  __syncthreads();

  int const lane = static_cast<int>(threadIdx.x) % slice_channels;
  int const warp = static_cast<int>(threadIdx.x) / 32, half = static_cast<int>(threadIdx.x) % 32 / slice_channels;
  constexpr int warps = sliced_threads / 32, warp_rows = 2 * sliced_rows;
  unsigned const mask = static_cast<unsigned>(a.ksub - 1);
  int const n = a.splits * a.stages;
  index_t const out_channel = index_t{a.map.perm[c0 + lane]} * a.o2;
  index_t const j_begin = static_cast<index_t>(blockIdx.x) * rows_per_block;
  index_t const j_end = j_begin + rows_per_block < a.count ? j_begin + rows_per_block : a.count;
  // Trip counts are the warp's (both halves shuffle together); rows past
  // j_end are skipped.
  for (index_t jw = j_begin + static_cast<index_t>(warp) * warp_rows; jw < j_end;
       jw += static_cast<index_t>(warps) * warp_rows) {
    index_t const j0 = jw + static_cast<index_t>(half) * sliced_rows;
    index_t t[sliced_rows];
    unsigned code[sliced_rows];
#pragma unroll
    for (int r = 0; r < sliced_rows; ++r) {
      index_t const j = j0 + r;
      t[r] = -1;
      if (j < j_end) {
        t[r] = a.first + j;
        if (a.indices != nullptr) {
          t[r] = a.indices[static_cast<index_t>(h) * a.count + j];
          if (t[r] >= a.tokens) { t[r] = -1; }
        }
      }
      code[r] = t[r] >= 0 && lane < a.stages
                  ? static_cast<unsigned>(a.codes[(static_cast<index_t>(h) * a.tokens + t[r]) * n + s * a.stages + lane]) & mask
                  : 0u;
    }
#pragma unroll
    for (int r = 0; r < sliced_rows; ++r) {
      index_t const j = j0 + r;
      float acc = 0.f;
      for (int st = 0; st < a.stages; ++st) {
        unsigned const c = __shfl_sync(0xffffffffu, code[r], st, slice_channels);
        acc = __fadd_rn(acc, book[(st * a.ksub + static_cast<int>(c)) * slice_channels + lane]);
      }
      if (j >= j_end) { continue; }
      Out* o = a.out + h * a.o0 + j * a.o1;
      if (a.block_table != nullptr) {  // paged: only valid tokens on mapped pages are written
        if (t[r] < 0 || t[r] / a.page_size >= a.table_len) { continue; }
        index_t const phys = a.block_table[t[r] / a.page_size];
        if (phys < 0 || phys >= a.num_pages) { continue; }
        o = a.out + phys * a.p0 + (t[r] % a.page_size) * a.p1 + h * a.o0;
      }
      o[out_channel] = from_float<Out>(t[r] >= 0 ? acc : 0.f);
    }
  }
}

/// A paged call's destination: the pages' extents and strides and the block table.
struct paging {
  std::int32_t const* block_table;
  index_t table_len, page_size, num_pages, p0, p1;
};

/// Validates a reconstruct call and launches it (indices null: the range
/// path; `pg`: the paged path, `out` then the [heads, k, dim] view of one slot).
template <class Code, class Out>
void reconstruct(rq_config const& cfg, rq_centroids_view<float const> centroids, view<Code const, 3> codes,
                 index_t first, std::int32_t const* indices, index_t index_rows, kv_view<Out> out,
                 cudaStream_t stream, char const* where, paging const* pg = nullptr)
{
  namespace kern = pqkv::detail::rq_gpu;
  using pqkv::detail::gpu_check::expect_device_pointer;
  cfg.validate(where);
  pqkv::detail::rq::check_code_type<Code>(cfg.bits, where);
  PQKV_EXPECTS(cfg.dim <= kern::max_dim, where, "config.dim=", cfg.dim, " exceeds ", kern::max_dim);
  index_t const heads = codes.extent(0), tokens = codes.extent(1), count = out.extent(1);
  PQKV_EXPECTS(codes.extent(2) == cfg.codes_per_row(), where, "codes.extent(2)=", codes.extent(2),
               ", config.splits * config.stages=", cfg.codes_per_row());
  check_rq_centroids(centroids, cfg, heads, where, false);
  PQKV_EXPECTS(out.extent(0) == heads, where, "out.extent(0)=", out.extent(0), ", codes.extent(0)=", heads);
  PQKV_EXPECTS(out.extent(2) == cfg.dim, where, "out.extent(2)=", out.extent(2), ", config.dim=", cfg.dim);
  if (indices == nullptr) {
    PQKV_EXPECTS(first >= 0 && first <= tokens - count, where, "first=", first, " + out.extent(1)=", count,
                 " exceeds codes.extent(1)=", tokens);
  } else {
    PQKV_EXPECTS(index_rows == heads, where, "indices.extent(0)=", index_rows, ", codes.extent(0)=", heads);
  }
  PQKV_EXPECTS(heads <= 65535, where, "codes.extent(0)=", heads, " exceeds 65535");
  PQKV_EXPECTS(count <= 0x7fffffff, where, "out.extent(1)=", count, " exceeds 2^31 - 1");
  if (heads == 0 || count == 0) { return; }
  PQKV_EXPECTS(out.data_handle() != nullptr, where, "out.data_handle() is null");
  PQKV_EXPECTS(tokens == 0 || codes.data_handle() != nullptr, where, "codes.data_handle() is null");
  expect_device_pointer(centroids.data_handle(), where, "centroids.data_handle()");
  expect_device_pointer(out.data_handle(), where, "out.data_handle()");
  if (tokens > 0) { expect_device_pointer(codes.data_handle(), where, "codes.data_handle()"); }
  if (indices != nullptr) { expect_device_pointer(indices, where, "indices.data_handle()"); }
  if (pg != nullptr && pg->table_len > 0) { expect_device_pointer(pg->block_table, where, "block_table.data()"); }

  kern::reconstruct_args<Code, Out> a{};
  a.centroids = centroids.data_handle();
  a.codes = codes.data_handle();
  a.indices = indices;
  a.out = out.data_handle();
  a.o0 = out.stride(0);
  a.o1 = out.stride(1);
  a.o2 = out.stride(2);
  if (pg != nullptr) {
    a.block_table = pg->block_table;
    a.table_len = pg->table_len;
    a.page_size = pg->page_size;
    a.num_pages = pg->num_pages;
    a.p0 = pg->p0;
    a.p1 = pg->p1;
  }
  a.tokens = tokens;
  a.count = count;
  a.first = first;
  a.heads = static_cast<int>(heads);
  a.dim = static_cast<int>(cfg.dim);
  a.splits = cfg.splits;
  a.stages = cfg.stages;
  a.ksub = static_cast<int>(cfg.ksub());
  a.dsub = static_cast<int>(cfg.dsub());
  a.shared = centroids.extent(0) == 1;
  a.map = kern::make_channel_map(cfg);
  // The sliced kernel when a channel slice of every stage's codebook fits in
  // shared memory; else one block per row reading the codebook from L2.
  int device = 0, smem_optin = 0, sms = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  PQKV_CUDA_TRY(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  PQKV_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  std::size_t const book_bytes = kern::sliced_smem_bytes(cfg.stages, a.ksub);
  bool const sliced = cfg.stages <= kern::sliced_max_stages && cfg.dsub() % kern::slice_channels == 0 &&
                      book_bytes <= static_cast<std::size_t>(smem_optin) &&
                      reinterpret_cast<std::uintptr_t>(centroids.data_handle()) % 16 == 0;
  if (sliced) {
    auto* const kernel = kern::reconstruct_sliced_kernel<Code, Out>;
    PQKV_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(book_bytes)));
    // About two blocks per SM in all: each block reads its codebook slice once.
    index_t const slices = cfg.dim / kern::slice_channels;
    index_t const per_pair = std::max<index_t>(1, 2 * static_cast<index_t>(sms) / (heads * slices));
    index_t const rows_per_block = (count + per_pair - 1) / per_pair;
    index_t const row_blocks = (count + rows_per_block - 1) / rows_per_block;
    kernel<<<dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(slices), static_cast<unsigned>(heads)),
             kern::sliced_threads, book_bytes, stream>>>(a, rows_per_block);
    PQKV_CUDA_CHECK_LAST();
    return;
  }
  kern::reconstruct_kernel<Code, Out><<<dim3(static_cast<unsigned>(count), static_cast<unsigned>(heads)),
                                        kern::reconstruct_threads, 0, stream>>>(a);
  PQKV_CUDA_CHECK_LAST();
}

}  // namespace pqkv::detail::rq_gpu

namespace pqkv::gpu {

/// Rows [first, first + out.extent(1)) of codes [heads, tokens, splits *
/// stages] into out [heads, count, dim] (float, half or bf16; any strides),
/// all in device memory. Throws `pqkv::error` before the launch on a shape
/// mismatch, a range past the codes, a code type too narrow for bits, or a
/// null or host pointer.
template <class Code, class Out, class Layout, class Accessor>
  requires(RqCode<std::remove_const_t<Code>> && KvElement<Out> && !std::is_const_v<Out>)
void rq_reconstruct(rq_config const& cfg,
                    rq_centroids_view<float const> centroids,  // [1|heads, splits, stages, ksub, dsub], device
                    view<Code, 3> codes,                       // [heads, tokens, splits * stages], device
                    index_t first,
                    ::cuda::std::mdspan<Out, extents<3>, Layout, Accessor> out,  // [heads, count, dim], device
                    cudaStream_t stream)
{
  pqkv::detail::rq_gpu::reconstruct(cfg, centroids, pqkv::as_const(codes), first, nullptr, 0, kv_view<Out>{out}, stream,
                         "gpu::rq_reconstruct");
}

/// Rows indices(h, j) of head h into out(h, j, :), a zero row where the
/// index is -1 (the scorer's padding). Throws as `rq_reconstruct`, and
/// unless indices is [heads, out.extent(1)].
template <class Code, class Out, class Layout, class Accessor>
  requires(RqCode<std::remove_const_t<Code>> && KvElement<Out> && !std::is_const_v<Out>)
void rq_reconstruct_indices(rq_config const& cfg,
                            rq_centroids_view<float const> centroids,  // [1|heads, splits, stages, ksub, dsub], device
                            view<Code, 3> codes,                       // [heads, tokens, splits * stages], device
                            selection_view<std::int32_t const> indices,  // [heads, k], -1 padded, device
                            ::cuda::std::mdspan<Out, extents<3>, Layout, Accessor> out,  // [heads, k, dim], device
                            cudaStream_t stream)
{
  constexpr char const* where = "gpu::rq_reconstruct_indices";
  PQKV_EXPECTS(indices.extent(1) == out.extent(1), where, "indices.extent(1)=", indices.extent(1),
               ", out.extent(1)=", out.extent(1));
  PQKV_EXPECTS(indices.data_handle() != nullptr || element_count(indices) == 0, where,
               "indices.data_handle() is null");
  pqkv::detail::rq_gpu::reconstruct(cfg, centroids, pqkv::as_const(codes), 0, indices.data_handle(), indices.extent(0),
                         kv_view<Out>{out}, stream, where);
}

/// The rows of indices [heads, k] (-1 padded) into a paged cache pages
/// [num_pages, P, heads, dim] (float, half or bf16; any strides: HND is the
/// same call with the strides permuted) through the sequence's block_table,
/// all device memory: token t = indices(h, j) goes to pages(block_table[t /
/// P], t % P, h, :), the CPU's values bit for bit (`cpu::rq_reconstruct_paged`);
/// nothing else in the pages is written. Throws as `rq_reconstruct_indices`
/// before the launch; index and table values are device data, not checked:
/// entries outside their ranges are skipped.
template <class Code, class Out, class Layout, class Accessor>
  requires(RqCode<std::remove_const_t<Code>> && KvElement<Out> && !std::is_const_v<Out>)
void rq_reconstruct_paged(rq_config const& cfg,
                          rq_centroids_view<float const> centroids,    // [1|heads, splits, stages, ksub, dsub], device
                          view<Code, 3> codes,                         // [heads, tokens, splits * stages], device
                          selection_view<std::int32_t const> indices,  // [heads, k], -1 padded, device
                          std::span<std::int32_t const> block_table,   // [logical pages], device
                          ::cuda::std::mdspan<Out, extents<4>, Layout, Accessor> pages,  // [num_pages, P, heads, dim]
                          cudaStream_t stream)
{
  constexpr char const* where = "gpu::rq_reconstruct_paged";
  index_t const codes_heads = codes.extent(0);
  PQKV_EXPECTS(pages.extent(2) == codes_heads && pages.extent(3) == cfg.dim, where, "pages extents (",
               pages.extent(0), ", ", pages.extent(1), ", ", pages.extent(2), ", ", pages.extent(3),
               ") differ from (num_pages, P, heads=", codes_heads, ", dim=", cfg.dim, ")");
  PQKV_EXPECTS(pages.extent(1) > 0, where, "pages.extent(1)=", pages.extent(1), " (the page size) must be positive");
  PQKV_EXPECTS(indices.data_handle() != nullptr || element_count(indices) == 0, where,
               "indices.data_handle() is null");
  PQKV_EXPECTS(block_table.data() != nullptr || block_table.empty(), where, "block_table.data() is null");
  if (block_table.empty()) { return; }  // no page is mapped: nothing to write
  pqkv::detail::rq_gpu::paging const pg{block_table.data(), static_cast<index_t>(block_table.size()),
                                        pages.extent(1), pages.extent(0), pages.stride(0), pages.stride(1)};
  // One slot's [heads, k, dim] view (the j stride unused) carries the head and channel strides.
  auto const slot = make_strided_view<Out, 3>(pages.data_handle(), {pages.extent(2), indices.extent(1), pages.extent(3)},
                                              {pages.stride(2), 0, pages.stride(3)});
  pqkv::detail::rq_gpu::reconstruct(cfg, centroids, pqkv::as_const(codes), 0, indices.data_handle(), indices.extent(0),
                                    slot, stream, where, &pg);
}

}  // namespace pqkv::gpu
