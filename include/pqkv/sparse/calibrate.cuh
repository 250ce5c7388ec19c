// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::tau_calibrator`: SALE's per-head threshold calibration on
/// the GPU, with the contract and result type of `pqkv::cpu::calibrate_tau`
/// (sparse/calibrate.hpp): per q head, tau_0 = tau_start (0.008), tau_{k+1} =
/// tau_k / 2 (float); the result is the first tau_k whose mean row L1 error
/// (mean over the batch's rows of sum_d |out(tau) - out_ref|, double) is <=
/// theta, or 0 (error 0, the head stays dense) once tau_k < tau_floor (1e-4).
///
/// One call: the dense reference once (`block_sparse_attention::dense`), then
/// rounds; a round builds the masks of all heads with their current tau
/// (`gpu::sale_mask`, per-head tau in device memory; heads already decided
/// get +inf, forced blocks only, which costs the least), runs the sparse
/// attention, reduces each head's error on the GPU (double, fixed order:
/// the same bits every run) and copies the q_heads errors to the host, the
/// one host synchronization of the round (calibration is offline: a call
/// takes at most about log2(tau_start / tau_floor) + 2 rounds, 8 with the
/// defaults). Heads above theta halve their tau, heads at or below stop,
/// and a tau below tau_floor becomes 0 without another round (a tau = 0 mask
/// keeps every causal block, which the attention visits in the dense mode's
/// order, so its error is 0 exactly). Last, the mask of the final taus gives
/// the density.
///
/// What may differ from the CPU: the GPU attention accumulates in float
/// (the reference in double), so the errors differ by about 1e-6 relative,
/// and a GPU mask may differ from the CPU's for blocks whose score lies
/// within ~1e-12 of log(tau) (sparse/sale_mask.cuh). The taus are therefore
/// the CPU's except where some tau's error lies within about 1e-5 relative of
/// theta (a tie at theta), where the two may pick neighbouring taus.
///
/// Memory: the caller provides the workspace (`workspace_bytes()`: the mask's
/// workspace, the bit mask, two float outputs [q_heads, tokens, dv] and a few
/// per-head values; dominated by the outputs, 2 * q_heads * tokens * dv * 4
/// bytes). A call allocates no device memory but synchronizes `stream` once
/// per round, so it cannot be captured in a CUDA graph.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/block_sparse_kernels.cuh>
#include <pqkv/sparse/block_sparse_attention.cuh>
#include <pqkv/sparse/calibrate.hpp>
#include <pqkv/sparse/sale_mask.cuh>
#include <pqkv/sparse/sale_mask.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace pqkv::gpu {

/// Byte offsets of a `tau_calibrator` workspace's regions (256-byte aligned).
struct calibration_workspace_layout {
  std::size_t mask = 0;     ///< gpu::sale_mask workspace
  std::size_t tau = 0;      ///< float [q_heads]
  std::size_t bitmask = 0;  ///< uint32 [batch, q_heads, q_blocks, words]
  std::size_t ref = 0;      ///< float [q_heads, tokens, dv]: dense output
  std::size_t out = 0;      ///< float [q_heads, tokens, dv]: sparse output
  std::size_t partial = 0;  ///< double [q_heads, l1_chunks]
  std::size_t error = 0;    ///< double [q_heads]
  std::size_t density = 0;  ///< double [q_heads]
  std::size_t total = 0;
};

/// SALE calibration on the GPU (the file's contract) for Q/K of element type
/// T and V of Ve. Built once per shape (it holds a `sale_mask<T>` and a
/// `block_sparse_attention<T, Ve>`); the caller provides the workspace.
template <class T = __nv_bfloat16, class Ve = T>
  requires(KvElement<T> && KvElement<Ve>)
class tau_calibrator {
 public:
  /// Throws what `sale_mask` and `block_sparse_attention` throw on these
  /// sizes and configs. Calls must run on the device that was current here.
  tau_calibrator(sale_dims const& dims, sparse_config const& cfg, quant_config const& qcfg = {}, index_t dv = 0)
    : mask_{dims, cfg, qcfg}, attn_{dims, cfg, dv}
  {
    layout_ = make_layout();
  }

  [[nodiscard]] sale_mask<T> const& mask() const noexcept { return mask_; }
  [[nodiscard]] block_sparse_attention<T, Ve> const& attention() const noexcept { return attn_; }
  /// Bytes of scratch a call needs (16-byte aligned start).
  [[nodiscard]] std::size_t workspace_bytes() const noexcept { return layout_.total; }
  [[nodiscard]] calibration_workspace_layout const& workspace_layout() const noexcept { return layout_; }

  /// Calibrates tau per q head for error bound theta on one packed batch: q
  /// [q_heads, tokens, dim], k [kv_heads, tokens, dim], v [kv_heads, tokens,
  /// dv] and cu_seqlens [batch + 1], all device. Returns per q head the tau,
  /// its error and the final mask's density (host). Synchronizes `stream`
  /// once per round. Throws `pqkv::error` before any launch on theta
  /// negative or NaN, a bad option (tau_start not finite and positive,
  /// tau_floor negative or NaN), a workspace smaller than workspace_bytes()
  /// or not 16-byte aligned, or anything `block_sparse_attention` rejects.
  template <class Qe, class Ke, class Vv>
  calibration_result operator()(kv_view<Qe const> q,                       // [q_heads, tokens, dim], device
                                kv_view<Ke const> k,                       // [kv_heads, tokens, dim], device
                                kv_view<Vv const> v,                       // [kv_heads, tokens, dv], device
                                std::span<std::int32_t const> cu_seqlens,  // [batch + 1], device
                                double theta, calibration_options const& opt,
                                std::span<std::byte> workspace,  // workspace_bytes(), device
                                cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::tau_calibrator";
    namespace kern = pqkv::detail::bsa_gpu;
    PQKV_EXPECTS(!std::isnan(theta) && theta >= 0.0, where, "theta=", theta, " must be >= 0 and not NaN");
    PQKV_EXPECTS(std::isfinite(opt.tau_start) && opt.tau_start > 0.f, where, "tau_start=", opt.tau_start,
                 " must be finite and positive");
    PQKV_EXPECTS(!std::isnan(opt.tau_floor) && opt.tau_floor >= 0.f, where, "tau_floor=", opt.tau_floor,
                 " must be >= 0 and not NaN");
    PQKV_EXPECTS(workspace.size() >= layout_.total && workspace.data() != nullptr, where, "workspace.size()=",
                 workspace.size(), " is smaller than workspace_bytes=", layout_.total);
    PQKV_EXPECTS(reinterpret_cast<std::uintptr_t>(workspace.data()) % 16 == 0, where,
                 "workspace is not 16-byte aligned");
    pqkv::detail::gpu_check::expect_device_pointer(workspace.data(), where, "workspace");
    sale_dims const& dims = mask_.dims();
    mask_shape const m = mask_.shape();
    index_t const heads = dims.q_heads, tokens = q.extent(1), dv = attn_.dv();
    std::byte* const ws = workspace.data();
    auto* const dtau = reinterpret_cast<float*>(ws + layout_.tau);
    auto const bits = make_view(reinterpret_cast<std::uint32_t*>(ws + layout_.bitmask), m.batch, m.q_heads,
                                m.q_blocks, m.words);
    auto* const ref = reinterpret_cast<float*>(ws + layout_.ref);
    auto* const out = reinterpret_cast<float*>(ws + layout_.out);
    auto* const part = reinterpret_cast<double*>(ws + layout_.partial);
    auto* const derr = reinterpret_cast<double*>(ws + layout_.error);
    auto* const ddens = reinterpret_cast<double*>(ws + layout_.density);
    std::span<std::byte> const mask_ws{ws + layout_.mask, mask_.workspace_bytes()};
    std::span<float const> const tau_span{dtau, static_cast<std::size_t>(heads)};
    auto const hs = static_cast<std::size_t>(heads);

    // The reference; its checks (dtypes, extents, pointers, device) run before any launch.
    attn_.dense(q, k, v, cu_seqlens, kv_view<float>{make_view(ref, heads, tokens, dv)}, stream);

    calibration_result result{std::vector<float>(hs), std::vector<double>(hs), std::vector<double>(hs)};
    std::vector<float> cur(hs, opt.tau_start), round_tau(hs);
    std::vector<char> active(hs, 1);
    std::vector<double> err(hs);
    int const chunks = l1_chunks(tokens);
    for (;;) {
      bool any = false;
      for (std::size_t h = 0; h < hs; ++h) {
        round_tau[h] = active[h] != 0 ? cur[h] : std::numeric_limits<float>::infinity();
        any = any || active[h] != 0;
      }
      if (!any) { break; }
      mask_.load_tau(round_tau, std::span<float>{dtau, hs}, stream);
      mask_(q, k, cu_seqlens, tau_span, bits, {}, mask_ws, stream);
      attn_(q, k, v, cu_seqlens, as_const(bits), kv_view<float>{make_view(out, heads, tokens, dv)}, stream);
      if (heads > 0) {
        kern::l1_partial_kernel<><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(heads)),
                                    kern::l1_threads, 0, stream>>>(out, ref, tokens, static_cast<int>(dv),
                                                                   l1_rows(tokens), part);
        PQKV_CUDA_CHECK_LAST();
        kern::l1_final_kernel<><<<static_cast<unsigned>((heads + 127) / 128), 128, 0, stream>>>(
            part, static_cast<int>(heads), chunks, tokens, derr);
        PQKV_CUDA_CHECK_LAST();
      }
      PQKV_CUDA_TRY(cudaMemcpyAsync(err.data(), derr, hs * sizeof(double), cudaMemcpyDeviceToHost, stream));
      PQKV_CUDA_TRY(cudaStreamSynchronize(stream));  // the round's one host sync (round_tau, err)
      for (std::size_t h = 0; h < hs; ++h) {
        if (active[h] == 0) { continue; }
        if (err[h] <= theta) {
          result.tau[h] = cur[h];
          result.error[h] = err[h];
          active[h] = 0;
          continue;
        }
        cur[h] /= 2.f;
        if (cur[h] < opt.tau_floor) {  // dense: error 0 by construction, no round needed
          result.tau[h] = 0.f;
          result.error[h] = 0.0;
          active[h] = 0;
        }
      }
    }
    // Density of the final masks of all heads together.
    mask_.load_tau(result.tau, std::span<float>{dtau, hs}, stream);
    mask_(q, k, cu_seqlens, tau_span, bits, std::span<double>{ddens, hs}, mask_ws, stream);
    PQKV_CUDA_TRY(
        cudaMemcpyAsync(result.density.data(), ddens, hs * sizeof(double), cudaMemcpyDeviceToHost, stream));
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    return result;
  }

 private:
  /// Token chunks of the error reduction: a fixed function of the token count.
  [[nodiscard]] static int l1_chunks(index_t tokens) noexcept
  {
    return static_cast<int>(std::clamp<index_t>((tokens + 63) / 64, 1, 1024));
  }
  [[nodiscard]] static int l1_rows(index_t tokens) noexcept
  {
    index_t const c = l1_chunks(tokens);
    return static_cast<int>(std::max<index_t>((tokens + c - 1) / c, 1));
  }

  [[nodiscard]] calibration_workspace_layout make_layout() const
  {
    calibration_workspace_layout l;
    sale_dims const& d = mask_.dims();
    mask_shape const m = mask_.shape();
    auto const qh = static_cast<std::size_t>(d.q_heads);
    auto const rows = static_cast<std::size_t>(d.q_heads * d.tokens * attn_.dv());
    std::size_t off = 0;
    auto take = [&off](std::size_t bytes) {
      std::size_t const at = off;
      off += (bytes + 255) / 256 * 256;
      return at;
    };
    l.mask = take(mask_.workspace_bytes());
    l.tau = take(qh * sizeof(float));
    l.bitmask = take(static_cast<std::size_t>(bitmask_size(m)) * sizeof(std::uint32_t));
    l.ref = take(rows * sizeof(float));
    l.out = take(rows * sizeof(float));
    l.partial = take(qh * static_cast<std::size_t>(l1_chunks(d.tokens)) * sizeof(double));
    l.error = take(qh * sizeof(double));
    l.density = take(qh * sizeof(double));
    l.total = off;
    return l;
  }

  sale_mask<T> mask_;
  block_sparse_attention<T, Ve> attn_;
  calibration_workspace_layout layout_;
};

}  // namespace pqkv::gpu
