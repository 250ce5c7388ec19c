// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::sale_mask`: the SALE block-sparse prefill mask on the
/// GPU (Hopper: INT8 tensor cores through `mma.sync.m16n8k32.s8`), following
/// `pqkv::cpu::sale_estimator` + `pqkv::cpu::build_mask` (sparse/sale_mask.hpp),
/// and its conversions to FlashInfer BSR, FlexAttention BlockMask and
/// SpargeAttn LUT tensors.
///
/// What equals the CPU reference, and what may not:
/// - quantized codes, scales and means, corr and row terms, each row's group
///   scale: bit for bit (sparse/quantize.cuh; fma chains in the reference's
///   order with `__fmaf_rn`);
/// - the forced-key logits s_ij and m_i: bit for bit (the same ascending fma
///   chain, then `__fmul_rn` by the scale);
/// - l_i is the reference's ascending double sum, but CUDA's double `exp` and
///   `log` may differ from the host libm by an ulp, so lse_i may differ in
///   its last bits (about 1e-16 relative);
/// - the estimates z~ are bit for bit (exact s32 MMA sums, then the contract's
///   float operations), and the keep test reproduces the reference's double
///   comparison exactly for a given lse_i (detail/sale_kernels.cuh);
/// so masks equal the CPU's except, in principle, blocks whose score lies
/// within ~1e-12 of log(tau_h) (the reference contract allows 1e-4).
///
/// The cap (`sparse_config::max_blocks` >= 0) is the reference's: per
/// (sequence, q head, q block) the forced blocks stay and do not count; if
/// more than max_blocks other blocks pass the keep test, the max_blocks with
/// the highest scores stay, ties to the lower block index; tau_h = 0 rows
/// stay dense. The scores ranked are the reference's values (max over rows
/// of double(z~) - lse_i, from the same A the keep test compares), so capped
/// masks also equal the CPU's, except where an lse_i that differs in its last
/// ulp (above) swaps two scores within ~1e-16 of each other at the cut. The
/// cap costs a score workspace of 8 bytes per causal block of every
/// (sequence, q head) at max_len (`sale_workspace_layout::scores`, about
/// batch * q_heads * max_len^2 / (2 Bq Bk) * 8 bytes; none without a cap)
/// and no extra launch (detail/sale_kernels.cuh).
///
/// Per-head tau lives in device memory; `load_tau` validates host values and
/// copies them. The kernels read tau on the device and treat a negative or
/// NaN entry (which only a caller writing device memory directly can make) as
/// 0, the dense side. Not supported here: row statistics whose forced keys do
/// not fit shared memory (the constructor throws; the defaults use about 48 KB).
///
/// Memory and ordering: the caller owns everything; a call allocates nothing,
/// never synchronizes, reads no device memory on the host, and is one stream-
/// ordered sequence of launches, so it can be captured in a CUDA graph.
/// cu_seqlens live on the device and are not checked there: they must start
/// at 0, not decrease, end at q.extent(1) and hold no sequence longer than
/// `dims.max_len`. Q and K must be finite (not checked on the device).
/// A workspace must not be shared by calls that may run concurrently.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/sale_kernels.cuh>
#include <pqkv/sparse/quantize.cuh>
#include <pqkv/sparse/quantize.hpp>
#include <pqkv/sparse/sale_mask.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

namespace pqkv::gpu {

/// Sizes a `sale_mask` serves: packed batches of at most `batch` sequences,
/// `tokens` tokens in all, each at most `max_len` long.
struct sale_dims {
  index_t batch = 1, tokens = 0, q_heads = 0, kv_heads = 0, dim = 128, max_len = 0;

  /// Throws `pqkv::error` naming the bad field.
  void validate(char const* where = "sale_dims") const
  {
    PQKV_EXPECTS(batch > 0 && batch <= 65535, where, "batch=", batch, " is outside [1, 65535]");
    PQKV_EXPECTS(tokens >= 0 && tokens <= index_t{std::numeric_limits<std::int32_t>::max() / 2}, where,
                 "tokens=", tokens, " is outside [0, 2^30)");
    PQKV_EXPECTS(kv_heads > 0 && q_heads > 0 && q_heads % kv_heads == 0, where, "q_heads=", q_heads,
                 " is not a positive multiple of kv_heads=", kv_heads);
    PQKV_EXPECTS(q_heads <= 65535, where, "q_heads=", q_heads, " exceeds 65535");
    pqkv::detail::check_head_dim(dim, where);
    PQKV_EXPECTS(max_len >= 0 && max_len <= tokens, where, "max_len=", max_len, " is outside [0, tokens=", tokens,
                 "]");
  }
};

/// Byte offsets of the intermediate results inside a `sale_mask` workspace
/// (for inspection; each region is row-major, 256-byte aligned).
struct sale_workspace_layout {
  std::size_t scratch = 0;   ///< center_quantize scratch
  std::size_t q_codes = 0;   ///< int8 [q_heads, tokens, dim]
  std::size_t k_codes = 0;   ///< int8 [kv_heads, tokens, dim]
  std::size_t q_scales = 0;  ///< float [q_heads, group_bound]
  std::size_t k_scales = 0;  ///< float [kv_heads, group_bound]
  std::size_t q_means = 0;   ///< float [batch, q_heads, dim]
  std::size_t k_means = 0;   ///< float [batch, kv_heads, dim]
  std::size_t q_row_scale = 0;  ///< float [q_heads, tokens]
  std::size_t k_row_scale = 0;  ///< float [kv_heads, tokens]
  std::size_t corr = 0;      ///< float [q_heads, tokens]
  std::size_t row = 0;       ///< float [q_heads, tokens]
  std::size_t lse = 0;       ///< double [q_heads, tokens]
  std::size_t thr = 0;       ///< float [q_heads, tokens]: the keep threshold on fma(sq sk, dot, corr)
  std::size_t counts = 0;    ///< uint64 [q_heads, 2]: kept, causal blocks
  /// uint64 [batch, q_heads, score_stride], only with a cap (0 bytes without):
  /// order keys of the kept non-forced blocks' scores; q block qb's row starts
  /// at the causal blocks of q blocks [0, qb) of a max_len sequence
  std::size_t scores = 0;
  std::size_t total = 0;
  index_t group_bound = 0;   ///< scale columns per head (tokens are the row stride everywhere)
  index_t score_stride = 0;  ///< score entries per (sequence, q head); 0 without a cap
};

/// SALE mask producer on the GPU (the file's contract). Built once per shape
/// for element type T (float, half, bfloat16); each call is stream-ordered
/// and graph-capturable; calls are const.
template <class T = __nv_bfloat16>
  requires KvElement<T>
class sale_mask {
 public:
  /// Validates everything that does not depend on the data and raises the
  /// kernels' shared-memory limits (host calls, once, so that calls stay
  /// capturable); throws `pqkv::error` on bad dims or configs: block_q not
  /// in {16, 32, 64, 128}, block_k not a positive multiple of 16, local <
  /// block_k, max_blocks < -1, head_dim not 64/128/256, q heads not a
  /// multiple of KV heads, shared memory too small. Calls must run on the
  /// device that was current here.
  sale_mask(sale_dims const& dims, sparse_config const& cfg, quant_config const& qcfg = {})
    : dims_{dims}, cfg_{cfg}, qcfg_{qcfg}
  {
    constexpr char const* where = "gpu::sale_mask";
    namespace k = pqkv::detail::sale_gpu;
    cfg_.validate(where);
    qcfg_.validate(where);
    dims_.validate(where);
    scale_ = pqkv::detail::attention_scale(cfg_.scale, dims_.dim, where);
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    int smem_optin = 0;
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
    int const bk = static_cast<int>(cfg_.block_k), d = static_cast<int>(dims_.dim);
    nf_max_ = static_cast<int>(((cfg_.sink + cfg_.block_k - 1) / cfg_.block_k + cfg_.local / cfg_.block_k + 2) *
                               cfg_.block_k);
    int const rs = k::stats_rows(static_cast<int>(cfg_.block_q));
    stats_smem_ = static_cast<std::size_t>(rs * (d + 1) + k::stats_chunk * (d + 1) + rs * nf_max_) * sizeof(float);
    PQKV_EXPECTS(stats_smem_ <= static_cast<std::size_t>(smem_optin), where, "row statistics need ", stats_smem_,
                 " bytes of shared memory (sink=", cfg_.sink, ", local=", cfg_.local, ", block_k=", cfg_.block_k,
                 ", head_dim=", d, "); the device allows ", smem_optin);
    index_t const r = dims_.q_heads / dims_.kv_heads;
    hc_ = static_cast<int>(std::min<index_t>(r, k::est_rows / cfg_.block_q));
    shape_ = mask_shape_of(dims_.batch, dims_.max_len);
    est_ = k::est_smem::make(d, bk, hc_, static_cast<int>(std::max<index_t>(shape_.words, 1)), capped());
    PQKV_EXPECTS(est_.total() <= smem_optin, where, "the estimate kernel needs ", est_.total(),
                 " bytes of shared memory; the device allows ", smem_optin);
    // The device's limit, not this object's need: objects built later with
    // smaller needs must not lower the limit an earlier object relies on.
    PQKV_CUDA_TRY(cudaFuncSetAttribute(k::row_stats_kernel<T, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       smem_optin));
    switch (d) {
      case 64: set_est_attr<64>(smem_optin); break;
      case 128: set_est_attr<128>(smem_optin); break;
      default: set_est_attr<256>(smem_optin); break;
    }
    layout_ = make_layout();
  }

  [[nodiscard]] sale_dims const& dims() const noexcept { return dims_; }
  [[nodiscard]] sparse_config const& config() const noexcept { return cfg_; }
  [[nodiscard]] quant_config const& quantization() const noexcept { return qcfg_; }
  /// The logit scale in use (config().scale, or 1/sqrt(dim) when that is 0).
  [[nodiscard]] float scale() const noexcept { return scale_; }
  /// The device the mask producer was built on (calls must run there).
  [[nodiscard]] int device() const noexcept { return device_; }
  /// The bit mask's extents (batch, heads, q_blocks, k_blocks, words from
  /// dims.max_len), as `make_mask_shape` gives for a batch whose longest
  /// sequence is max_len.
  [[nodiscard]] mask_shape shape() const noexcept { return shape_; }
  /// Bytes of scratch a call needs (16-byte aligned start).
  [[nodiscard]] std::size_t workspace_bytes() const noexcept { return layout_.total; }
  [[nodiscard]] sale_workspace_layout const& workspace_layout() const noexcept { return layout_; }

  /// Checks host taus [q_heads] (each >= 0, not NaN; 0: dense head, +inf:
  /// forced blocks only) and copies them to `device_tau` on `stream` (the host
  /// span must stay alive until the copy is done). Throws `pqkv::error` before
  /// copying.
  void load_tau(std::span<float const> host_tau, std::span<float> device_tau, cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::sale_mask::load_tau";
    pqkv::detail::check_taus(host_tau, dims_.q_heads, where);
    PQKV_EXPECTS(device_tau.size() >= host_tau.size() && device_tau.data() != nullptr, where, "device_tau.size()=",
                 device_tau.size(), " is smaller than q_heads=", dims_.q_heads, " (or null)");
    PQKV_CUDA_TRY(cudaMemcpyAsync(device_tau.data(), host_tau.data(), host_tau.size_bytes(), cudaMemcpyHostToDevice,
                                  stream));
  }

  /// Builds the bit mask [batch, q_heads, q_blocks, words] (device) of q
  /// [q_heads, tokens, dim] and k [kv_heads, tokens, dim] (device, any
  /// strides) packed by cu_seqlens [batch + 1] (device) with per-head tau
  /// [q_heads] (device), and, when density is not empty, density [q_heads]
  /// (device, double) = kept / causal blocks. Throws `pqkv::error` before any
  /// launch on a Q/K element type other than T, shape mismatches, a batch or
  /// token count over dims, null pointers, an output or workspace smaller than
  /// its size, or a call on another device.
  template <class Qe, class Ke>
  void operator()(kv_view<Qe const> q,                        // [q_heads, tokens, dim], device
                  kv_view<Ke const> k,                        // [kv_heads, tokens, dim], device
                  std::span<std::int32_t const> cu_seqlens,   // [batch + 1], device
                  std::span<float const> tau,                 // [q_heads], device
                  view<std::uint32_t, 4> bitmask,             // [batch, q_heads, q_blocks, words], device
                  std::span<double> density,                  // [q_heads] or empty, device
                  std::span<std::byte> workspace,             // workspace_bytes(), device
                  cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::sale_mask";
    namespace kern = pqkv::detail::sale_gpu;
    PQKV_EXPECTS((std::is_same_v<Qe, Ke>), where, "q dtype=", dtype_traits<Qe>::name, " differs from k dtype=",
                 dtype_traits<Ke>::name);
    PQKV_EXPECTS((std::is_same_v<Qe, T>), where, "q dtype=", dtype_traits<Qe>::name,
                 " differs from the dtype this sale_mask was built for, ", dtype_traits<T>::name);
    index_t const tokens = q.extent(1), dim = dims_.dim;
    PQKV_EXPECTS(q.extent(0) == dims_.q_heads, where, "q heads=", q.extent(0), ", dims.q_heads=", dims_.q_heads);
    PQKV_EXPECTS(k.extent(0) == dims_.kv_heads, where, "k heads=", k.extent(0), ", dims.kv_heads=", dims_.kv_heads);
    PQKV_EXPECTS(q.extent(2) == dim && k.extent(2) == dim, where, "head_dim q=", q.extent(2), ", k=", k.extent(2),
                 ", dims.dim=", dim);
    PQKV_EXPECTS(k.extent(1) == tokens, where, "k tokens=", k.extent(1), ", q tokens=", tokens);
    PQKV_EXPECTS(tokens <= dims_.tokens, where, "tokens=", tokens, " exceeds dims.tokens=", dims_.tokens);
    PQKV_EXPECTS(static_cast<index_t>(cu_seqlens.size()) == dims_.batch + 1 && cu_seqlens.data() != nullptr, where,
                 "cu_seqlens.size()=", cu_seqlens.size(), ", dims.batch + 1=", dims_.batch + 1, " (or null)");
    PQKV_EXPECTS(static_cast<index_t>(tau.size()) == dims_.q_heads && tau.data() != nullptr, where, "tau.size()=",
                 tau.size(), ", q_heads=", dims_.q_heads, " (or null)");
    detail::check_device_rows(q, "q", where);
    detail::check_device_rows(k, "k", where);
    pqkv::detail::check_bitmask(as_const(bitmask), shape_, where);
    PQKV_EXPECTS(density.empty() || (static_cast<index_t>(density.size()) >= dims_.q_heads &&
                                     density.data() != nullptr),
                 where, "density.size()=", density.size(), " is smaller than q_heads=", dims_.q_heads);
    PQKV_EXPECTS(workspace.size() >= layout_.total && workspace.data() != nullptr, where, "workspace.size()=",
                 workspace.size(), " is smaller than workspace_bytes=", layout_.total);
    PQKV_EXPECTS(reinterpret_cast<std::uintptr_t>(workspace.data()) % 16 == 0, where,
                 "workspace is not 16-byte aligned");
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    if (bitmask_size(shape_) == 0) { return; }
    if constexpr (std::is_same_v<Qe, T> && std::is_same_v<Ke, T>) {
      run(q, k, cu_seqlens, tau, bitmask, density, workspace, stream);
    }
  }

 private:
  /// The launches of one call (arguments checked).
  void run(kv_view<T const> q, kv_view<T const> k, std::span<std::int32_t const> cu_seqlens,
           std::span<float const> tau, view<std::uint32_t, 4> bitmask, std::span<double> density,
           std::span<std::byte> workspace, cudaStream_t stream) const
  {
    namespace kern = pqkv::detail::sale_gpu;
    index_t const tokens = q.extent(1), dim = dims_.dim;
    std::byte* const ws = workspace.data();
    auto at = [ws](std::size_t off) { return ws + off; };
    auto* q_codes = reinterpret_cast<std::int8_t*>(at(layout_.q_codes));
    auto* k_codes = reinterpret_cast<std::int8_t*>(at(layout_.k_codes));
    auto* q_rs = reinterpret_cast<float*>(at(layout_.q_row_scale));
    auto* k_rs = reinterpret_cast<float*>(at(layout_.k_row_scale));
    auto* q_means = reinterpret_cast<float*>(at(layout_.q_means));
    auto* k_means = reinterpret_cast<float*>(at(layout_.k_means));
    auto* corr = reinterpret_cast<float*>(at(layout_.corr));
    auto* rowt = reinterpret_cast<float*>(at(layout_.row));
    auto* lse = reinterpret_cast<double*>(at(layout_.lse));
    auto* thr = reinterpret_cast<float*>(at(layout_.thr));
    auto const scratch =
        detail::carve_quantize(at(layout_.scratch), std::max(dims_.q_heads, dims_.kv_heads), dims_.batch, dim);
    index_t const b = dims_.batch;
    // Tokens are the row stride of every per-token region (<= dims.tokens).
    detail::launch_center_quantize<T>(q, cu_seqlens.data(), b, qcfg_, q_codes,
                                      reinterpret_cast<float*>(at(layout_.q_scales)), layout_.group_bound, q_means,
                                      q_rs, scratch, stream);
    detail::launch_center_quantize<T>(k, cu_seqlens.data(), b, qcfg_, k_codes,
                                      reinterpret_cast<float*>(at(layout_.k_scales)), layout_.group_bound, k_means,
                                      k_rs, scratch, stream);
    auto const qa = detail::accessor(q);
    auto const ka = detail::accessor(k);
    int const qh = static_cast<int>(dims_.q_heads), kvh = static_cast<int>(dims_.kv_heads);
    if (tokens > 0) {
      dim3 const cgrid(static_cast<unsigned>((tokens + 127) / 128), static_cast<unsigned>(qh));
      kern::corrections_kernel<T, T><<<cgrid, 128, 0, stream>>>(qa, ka, cu_seqlens.data(), static_cast<int>(b), qh,
                                                                kvh, static_cast<int>(dim), static_cast<int>(tokens),
                                                                q_means, k_means, corr, rowt);
      PQKV_CUDA_CHECK_LAST();
    }
    int const rs = kern::stats_rows(static_cast<int>(cfg_.block_q));
    dim3 const sgrid(static_cast<unsigned>(shape_.q_blocks * (cfg_.block_q / rs)), static_cast<unsigned>(qh),
                     static_cast<unsigned>(b));
    kern::row_stats_kernel<T, T><<<sgrid, 2 * rs, stats_smem_, stream>>>(
        qa, ka, cu_seqlens.data(), cfg_, qh, kvh, static_cast<int>(dim), static_cast<int>(tokens), scale_,
        tau.data(), rowt, lse, thr, nf_max_, static_cast<int>(shape_.max_len));
    PQKV_CUDA_CHECK_LAST();
    index_t const r = dims_.q_heads / dims_.kv_heads, chunks = (r + hc_ - 1) / hc_;
    dim3 const egrid(static_cast<unsigned>(shape_.q_blocks), static_cast<unsigned>(dims_.kv_heads * chunks),
                     static_cast<unsigned>(b));
    kern::cap_args cap{};
    if (capped()) {
      cap.max_blocks = static_cast<int>(std::min<index_t>(cfg_.max_blocks, shape_.k_blocks));
      cap.scale = scale_;
      cap.row = rowt;
      cap.lse = lse;
      cap.scores = reinterpret_cast<unsigned long long*>(at(layout_.scores));
      cap.stride = static_cast<long long>(layout_.score_stride);
    }
    auto launch_est = [&](auto kernel) {
      kernel<<<egrid, kern::est_threads, static_cast<std::size_t>(est_.total()), stream>>>(
          q_codes, k_codes, q_rs, k_rs, corr, thr, tau.data(), cu_seqlens.data(), cfg_, qh, kvh,
          static_cast<int>(tokens), static_cast<int>(shape_.max_len), static_cast<int>(shape_.q_blocks),
          static_cast<int>(shape_.words), hc_, est_,
          bitmask.data_handle(), cap);
      PQKV_CUDA_CHECK_LAST();
    };
    auto launch_dim = [&](auto d) {
      if (capped()) {
        launch_est(kern::estimate_kernel<decltype(d)::value, true>);
      } else {
        launch_est(kern::estimate_kernel<decltype(d)::value>);
      }
    };
    switch (dim) {
      case 64: launch_dim(std::integral_constant<int, 64>{}); break;
      case 128: launch_dim(std::integral_constant<int, 128>{}); break;
      default: launch_dim(std::integral_constant<int, 256>{}); break;
    }
    if (!density.empty()) {
      auto* counts = reinterpret_cast<unsigned long long*>(at(layout_.counts));
      PQKV_CUDA_TRY(cudaMemsetAsync(counts, 0, static_cast<std::size_t>(qh) * 2 * sizeof(unsigned long long), stream));
      kern::density_count_kernel<><<<dim3(static_cast<unsigned>(qh), static_cast<unsigned>(b)), 256, 0, stream>>>(
          bitmask.data_handle(), cu_seqlens.data(), cfg_, qh, static_cast<int>(shape_.q_blocks),
          static_cast<int>(shape_.words), static_cast<int>(shape_.max_len), counts);
      PQKV_CUDA_CHECK_LAST();
      kern::density_final_kernel<><<<(qh + 127) / 128, 128, 0, stream>>>(counts, qh, density.data());
      PQKV_CUDA_CHECK_LAST();
    }
  }

  [[nodiscard]] mask_shape mask_shape_of(index_t batch, index_t max_len) const
  {
    mask_shape m;
    m.batch = batch;
    m.q_heads = dims_.q_heads;
    m.kv_heads = dims_.kv_heads;
    m.max_len = max_len;
    m.q_blocks = (max_len + cfg_.block_q - 1) / cfg_.block_q;
    m.k_blocks = (max_len + cfg_.block_k - 1) / cfg_.block_k;
    m.words = (m.k_blocks + 31) / 32;
    return m;
  }

  template <int Dim>
  void set_est_attr(int bytes) const
  {
    namespace k = pqkv::detail::sale_gpu;
    if (capped()) {
      PQKV_CUDA_TRY(cudaFuncSetAttribute(k::estimate_kernel<Dim, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         bytes));
    } else {
      PQKV_CUDA_TRY(cudaFuncSetAttribute(k::estimate_kernel<Dim>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         bytes));
    }
  }

  /// Whether the mask has a cap (the estimate ranks kept blocks by score).
  [[nodiscard]] bool capped() const noexcept { return cfg_.max_blocks >= 0; }

  [[nodiscard]] sale_workspace_layout make_layout() const
  {
    sale_workspace_layout l;
    auto const qh = static_cast<std::size_t>(dims_.q_heads), kvh = static_cast<std::size_t>(dims_.kv_heads);
    auto const tok = static_cast<std::size_t>(dims_.tokens), d = static_cast<std::size_t>(dims_.dim);
    auto const b = static_cast<std::size_t>(dims_.batch);
    l.group_bound = quant_group_bound(dims_.tokens, dims_.batch, qcfg_.group);
    auto const gb = static_cast<std::size_t>(l.group_bound);
    std::size_t off = 0;
    auto take = [&off](std::size_t bytes) {
      std::size_t const at = off;
      off += (bytes + 255) / 256 * 256;
      return at;
    };
    l.scratch = take(center_quantize_workspace_bytes(dims_.q_heads > dims_.kv_heads ? dims_.q_heads : dims_.kv_heads,
                                                     dims_.batch, dims_.dim));
    l.q_codes = take(qh * tok * d);
    l.k_codes = take(kvh * tok * d);
    l.q_scales = take(qh * gb * 4);
    l.k_scales = take(kvh * gb * 4);
    l.q_means = take(b * qh * d * 4);
    l.k_means = take(b * kvh * d * 4);
    l.q_row_scale = take(qh * tok * 4);
    l.k_row_scale = take(kvh * tok * 4);
    l.corr = take(qh * tok * 4);
    l.row = take(qh * tok * 4);
    l.lse = take(qh * tok * 8);
    l.thr = take(qh * tok * 4);
    l.counts = take(qh * 2 * 8);
    if (capped()) {
      l.score_stride = static_cast<index_t>(pqkv::detail::sale_gpu::score_row_offset(
          cfg_.block_q, cfg_.block_k, shape_.max_len, shape_.q_blocks));
      l.scores = take(b * qh * static_cast<std::size_t>(l.score_stride) * 8);
    } else {
      l.scores = off;
    }
    l.total = off;
    return l;
  }

  sale_dims dims_;
  sparse_config cfg_;
  quant_config qcfg_;
  float scale_ = 0.f;
  int device_ = 0;
  int nf_max_ = 0;
  int hc_ = 1;
  std::size_t stats_smem_ = 0;
  pqkv::detail::sale_gpu::est_smem est_{};
  mask_shape shape_;
  sale_workspace_layout layout_;
};

/// The most BSR indices a mask of `m` can have on the GPU, whatever the
/// sequence lengths: batch * q_heads * causal blocks of a max_len sequence.
[[nodiscard]] inline index_t bsr_indices_bound(mask_shape const& m, sparse_config const& cfg)
{
  index_t per = 0;
  for (index_t qb = 0; qb < m.q_blocks; ++qb) { per += causal_blocks(cfg, m.max_len, qb); }
  return m.batch * m.q_heads * per;
}

/// The bit mask as FlashInfer-style BSR on the device, as
/// `pqkv::cpu::bitmask_to_bsr` (same rows, same ascending indices): indptr
/// [bsr_indptr_size(m)], indices [>= bsr_indices_bound(m, cfg)]. Three
/// launches (count, one-block scan, fill); no allocation, no sync. Throws
/// `pqkv::error` before any launch on a bitmask shape mismatch or outputs
/// that are too small or null.
inline void bitmask_to_bsr(view<std::uint32_t const, 4> bitmask, mask_shape const& m, sparse_config const& cfg,
                           std::span<std::int32_t> indptr, std::span<std::int32_t> indices, cudaStream_t stream)
{
  constexpr char const* where = "gpu::bitmask_to_bsr";
  namespace kern = pqkv::detail::sale_gpu;
  pqkv::detail::check_bitmask(bitmask, m, where);
  PQKV_EXPECTS(static_cast<index_t>(indptr.size()) >= bsr_indptr_size(m) && indptr.data() != nullptr, where,
               "indptr.size()=", indptr.size(), " is smaller than bsr_indptr_size=", bsr_indptr_size(m));
  index_t const bound = bsr_indices_bound(m, cfg);
  PQKV_EXPECTS(static_cast<index_t>(indices.size()) >= bound && (indices.data() != nullptr || bound == 0), where,
               "indices.size()=", indices.size(), " is smaller than bsr_indices_bound=", bound);
  PQKV_EXPECTS(bsr_indptr_size(m) <= index_t{std::numeric_limits<std::int32_t>::max()}, where,
               "too many block rows for int32 indptr: ", bsr_indptr_size(m));
  auto const rows = static_cast<int>(bsr_indptr_size(m) - 1);
  unsigned const blocks = static_cast<unsigned>((rows + 255) / 256) > 0 ? static_cast<unsigned>((rows + 255) / 256) : 1;
  kern::bsr_count_kernel<><<<blocks, 256, 0, stream>>>(bitmask.data_handle(), rows, static_cast<int>(m.words),
                                                     indptr.data());
  PQKV_CUDA_CHECK_LAST();
  if (rows == 0) { return; }
  kern::bsr_scan_kernel<><<<1, 1024, 0, stream>>>(indptr.data(), rows);
  PQKV_CUDA_CHECK_LAST();
  kern::bsr_fill_kernel<><<<blocks, 256, 0, stream>>>(bitmask.data_handle(), rows, static_cast<int>(m.words),
                                                    indptr.data(), indices.data());
  PQKV_CUDA_CHECK_LAST();
}

namespace detail {

/// One launch of the consumer-row kernel for checked arguments of shape b.
template <bool Deltas>
void launch_consumer_rows(view<std::uint32_t const, 4> bitmask, mask_shape const& m, sparse_config const& cfg,
                          index_t cq, index_t ck, block_mask_shape const& b, std::int32_t* num, std::int32_t* idx,
                          char const* where, cudaStream_t stream)
{
  index_t const rows = b.batch * b.q_heads * b.q_blocks;
  PQKV_EXPECTS(rows <= index_t{std::numeric_limits<int>::max() / 32}, where, "too many consumer rows: ", rows);
  if (rows == 0) { return; }
  auto const grid = static_cast<unsigned>((rows * 32 + 255) / 256);
  pqkv::detail::sale_gpu::block_mask_kernel<Deltas><<<grid, 256, 0, stream>>>(
      bitmask.data_handle(), static_cast<int>(m.batch), static_cast<int>(m.q_heads), static_cast<int>(m.q_blocks),
      static_cast<int>(m.k_blocks), static_cast<int>(m.words), static_cast<int>(cq / cfg.block_q),
      static_cast<int>(ck / cfg.block_k), static_cast<int>(b.q_blocks), static_cast<int>(b.k_blocks), num, idx);
  PQKV_CUDA_CHECK_LAST();
}

}  // namespace detail

/// The bit mask OR-reduced to consumer blocks cq x ck as FlexAttention
/// `BlockMask` tensors on the device, as `pqkv::cpu::bitmask_to_block_mask`:
/// kv_num_blocks [batch, q_heads, Q], kv_indices [batch, q_heads, Q, K]
/// (ascending, then 0-padded). One launch. Throws `pqkv::error` before it on
/// bad consumer sizes, extents that differ from `make_block_mask_shape`, or
/// null outputs.
inline void bitmask_to_block_mask(view<std::uint32_t const, 4> bitmask, mask_shape const& m,
                                  sparse_config const& cfg, index_t cq, index_t ck,
                                  view<std::int32_t, 3> kv_num_blocks,  // [batch, q_heads, Q], device
                                  view<std::int32_t, 4> kv_indices,     // [batch, q_heads, Q, K], device
                                  cudaStream_t stream)
{
  constexpr char const* where = "gpu::bitmask_to_block_mask";
  block_mask_shape const b =
    pqkv::detail::check_block_mask_args(bitmask, m, cfg, cq, ck, kv_num_blocks, kv_indices, where);
  detail::launch_consumer_rows<false>(bitmask, m, cfg, cq, ck, b, kv_num_blocks.data_handle(),
                                      kv_indices.data_handle(), where, stream);
}

/// The bit mask OR-reduced to consumer blocks cq x ck as SpargeAttn's LUT on
/// the device, as `pqkv::cpu::bitmask_to_sparge_lut` (the layout and its
/// source are documented there): valid_block_num [batch, q_heads, Q] and lut
/// [batch, q_heads, Q, K] int32, the first kept block then the steps between
/// kept blocks, 0-padded. One launch (a warp per row), no allocation, no sync,
/// graph-capturable. Throws `pqkv::error` before it on bad consumer sizes,
/// extents that differ from `make_block_mask_shape`, or null or host outputs.
inline void bitmask_to_sparge_lut(view<std::uint32_t const, 4> bitmask, mask_shape const& m,
                                  sparse_config const& cfg, index_t cq, index_t ck,
                                  view<std::int32_t, 3> valid_block_num,  // [batch, q_heads, Q], device
                                  view<std::int32_t, 4> lut,              // [batch, q_heads, Q, K], device
                                  cudaStream_t stream)
{
  constexpr char const* where = "gpu::bitmask_to_sparge_lut";
  block_mask_shape const b = pqkv::detail::check_block_mask_args(bitmask, m, cfg, cq, ck, valid_block_num, lut,
                                                                  where, "valid_block_num", "lut");
  if (sparge_valid_size(b) == 0) { return; }
  pqkv::detail::gpu_check::expect_device_pointer(bitmask.data_handle(), where, "bitmask");
  pqkv::detail::gpu_check::expect_device_pointer(valid_block_num.data_handle(), where, "valid_block_num");
  if (sparge_lut_size(b) > 0) { pqkv::detail::gpu_check::expect_device_pointer(lut.data_handle(), where, "lut"); }
  detail::launch_consumer_rows<true>(bitmask, m, cfg, cq, ck, b, valid_block_num.data_handle(), lut.data_handle(),
                                     where, stream);
}

}  // namespace pqkv::gpu
