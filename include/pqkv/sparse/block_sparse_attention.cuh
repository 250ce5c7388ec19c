// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::block_sparse_attention`: block-sparse causal prefill
/// attention on the GPU driven by pqkv's bit mask, with the contract of
/// `pqkv::cpu::block_sparse_attention` (sparse/block_sparse_attention.hpp):
/// row i of sequence s and q head h (KV head h / (q_heads / kv_heads))
/// attends the keys j <= i whose key block j / Bk has its bit set in mask row
/// (s, h, i / Bq); a row with no such key is 0; out [q_heads, tokens, dv].
///
/// Arithmetic: the logits are the reference's floats bit for bit (ascending
/// `fmaf` chain over the head dim, then one rounded multiply by the scale);
/// the softmax is online in float (`expf`, running max and sum per row) and
/// the weighted sum of V accumulates in float, where the reference uses
/// double. Outputs differ from the CPU's by about 1e-6 of the values' scale
/// (the tests allow 1e-5 on float inputs, 1e-3 on bf16 inputs against the CPU
/// run on the same bf16 values). Deterministic: the same inputs give the same
/// bits on the same device (no atomics; fixed key order).
///
/// Kernel: one CTA of 256 threads per (q block, q head, sequence); the CTA
/// walks its q block in passes of 32 rows, visits the key blocks whose bit is
/// set (ascending; blocks past the pass's last row are not causal for it and
/// are skipped), stages K and V through shared memory 32 keys at a time (as
/// float) and keeps each row's max, sum and value columns in registers. It is
/// a correctness-first kernel on the CUDA cores (no tensor cores, K/V
/// re-read per 32-row pass): the reference a fast kernel fed pqkv's masks is
/// compared with, and the engine of `gpu::tau_calibrator`. `dense()` visits
/// every causal block without reading a mask: the exact causal attention that
/// calibration compares against.
///
/// Memory and ordering: the caller owns everything; a call allocates
/// nothing, never synchronizes and reads no device memory on the host (one
/// launch), so it can be captured in a CUDA graph. cu_seqlens live on the
/// device and are not checked there: they must start at 0, not decrease, end
/// at q.extent(1) and hold no sequence longer than `dims.max_len` (a longer
/// one is cut at max_len: its later rows are not written). Q, K, V must be
/// finite (not checked on the device).

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/block_sparse_kernels.cuh>
#include <pqkv/sparse/block_sparse_attention.hpp>
#include <pqkv/sparse/sale_mask.cuh>
#include <pqkv/sparse/sale_mask.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>

namespace pqkv::gpu {

/// Block-sparse causal attention on the GPU (the file's contract) for Q/K of
/// element type T and V of element type Ve (float, half, bfloat16). Built
/// once per shape; calls are const, stream-ordered and graph-capturable.
template <class T = __nv_bfloat16, class Ve = T>
  requires(KvElement<T> && KvElement<Ve>)
class block_sparse_attention {
 public:
  /// Validates the sizes and config and raises the kernel's shared-memory
  /// limit (host calls, once, so that calls stay capturable). `dv` is V's
  /// head dim (0: dims.dim); the GPU takes dv a multiple of 32 up to 256.
  /// Throws `pqkv::error` on bad dims (sale_dims::validate), a bad config
  /// (block_q not in {16, 32, 64, 128}, block_k not a positive multiple of
  /// 16, ...), a bad dv, or shared memory too small. Calls must run on the
  /// device that was current here.
  block_sparse_attention(sale_dims const& dims, sparse_config const& cfg, index_t dv = 0)
    : dims_{dims}, cfg_{cfg}, dv_{dv == 0 ? dims.dim : dv}
  {
    constexpr char const* where = "gpu::block_sparse_attention";
    namespace kern = pqkv::detail::bsa_gpu;
    cfg_.validate(where);
    dims_.validate(where);
    PQKV_EXPECTS(dv_ > 0 && dv_ % 32 == 0 && dv_ <= kern::max_dv, where, "dv=", dv_,
                 " must be a positive multiple of 32 up to ", kern::max_dv, " on the GPU");
    scale_ = pqkv::detail::attention_scale(cfg_.scale, dims_.dim, where);
    shape_.batch = dims_.batch;
    shape_.q_heads = dims_.q_heads;
    shape_.kv_heads = dims_.kv_heads;
    shape_.max_len = dims_.max_len;
    shape_.q_blocks = (dims_.max_len + cfg_.block_q - 1) / cfg_.block_q;
    shape_.k_blocks = (dims_.max_len + cfg_.block_k - 1) / cfg_.block_k;
    shape_.words = (shape_.k_blocks + 31) / 32;
    smem_ = kern::attention_smem(static_cast<int>(dims_.dim), static_cast<int>(dv_));
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    int smem_optin = 0;
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
    PQKV_EXPECTS(smem_ <= static_cast<std::size_t>(smem_optin), where, "the kernel needs ", smem_,
                 " bytes of shared memory (head_dim=", dims_.dim, ", dv=", dv_, "); the device allows ", smem_optin);
    // The device's limit, not this object's need: an object built later with
    // a smaller need must not lower the limit this one relies on.
    switch (dims_.dim) {
      case 64: set_attr<64>(smem_optin); break;
      case 128: set_attr<128>(smem_optin); break;
      default: set_attr<256>(smem_optin); break;
    }
  }

  [[nodiscard]] sale_dims const& dims() const noexcept { return dims_; }
  [[nodiscard]] sparse_config const& config() const noexcept { return cfg_; }
  /// V's head dim.
  [[nodiscard]] index_t dv() const noexcept { return dv_; }
  /// The logit scale in use (config().scale, or 1/sqrt(dim) when that is 0).
  [[nodiscard]] float scale() const noexcept { return scale_; }
  /// The device the object was built on (calls must run there).
  [[nodiscard]] int device() const noexcept { return device_; }
  /// The bit mask's extents (from dims.max_len), as `gpu::sale_mask::shape()`.
  [[nodiscard]] mask_shape shape() const noexcept { return shape_; }

  /// out [q_heads, tokens, dv] (device, any strides) = block-sparse attention
  /// of q [q_heads, tokens, dim], k [kv_heads, tokens, dim], v [kv_heads,
  /// tokens, dv] (device, any strides) packed by cu_seqlens [batch + 1]
  /// (device) under bitmask [batch, q_heads, q_blocks, words] (device). One
  /// launch. Throws `pqkv::error` before it on a Q/K or V element type other
  /// than T / Ve, shape mismatches, a batch or token count over dims, null
  /// or host (pageable) pointers, or a call on another device.
  template <class Qe, class Ke, class Vv>
  void operator()(kv_view<Qe const> q,                        // [q_heads, tokens, dim], device
                  kv_view<Ke const> k,                        // [kv_heads, tokens, dim], device
                  kv_view<Vv const> v,                        // [kv_heads, tokens, dv], device
                  std::span<std::int32_t const> cu_seqlens,   // [batch + 1], device
                  view<std::uint32_t const, 4> bitmask,       // [batch, q_heads, q_blocks, words], device
                  kv_view<float> out,                         // [q_heads, tokens, dv], device
                  cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::block_sparse_attention";
    check(q, k, v, cu_seqlens, out, where);
    pqkv::detail::check_bitmask(bitmask, shape_, where);
    if (bitmask_size(shape_) > 0) {
      pqkv::detail::gpu_check::expect_device_pointer(bitmask.data_handle(), where, "bitmask");
    }
    if constexpr (std::is_same_v<Qe, T> && std::is_same_v<Ke, T> && std::is_same_v<Vv, Ve>) {
      launch(q, k, v, cu_seqlens, bitmask.data_handle(), out, stream);
    }
  }

  /// The dense mode: every causal block, no mask read (exact causal
  /// attention; the same result as a mask with every causal bit set, bit for
  /// bit). Same arguments and checks as the masked call, without the mask.
  template <class Qe, class Ke, class Vv>
  void dense(kv_view<Qe const> q,                       // [q_heads, tokens, dim], device
             kv_view<Ke const> k,                       // [kv_heads, tokens, dim], device
             kv_view<Vv const> v,                       // [kv_heads, tokens, dv], device
             std::span<std::int32_t const> cu_seqlens,  // [batch + 1], device
             kv_view<float> out,                        // [q_heads, tokens, dv], device
             cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::block_sparse_attention::dense";
    check(q, k, v, cu_seqlens, out, where);
    if constexpr (std::is_same_v<Qe, T> && std::is_same_v<Ke, T> && std::is_same_v<Vv, Ve>) {
      launch(q, k, v, cu_seqlens, nullptr, out, stream);
    }
  }

 private:
  /// Every host-side check of a call but the mask's.
  template <class Qe, class Ke, class Vv>
  void check(kv_view<Qe const> q, kv_view<Ke const> k, kv_view<Vv const> v,
             std::span<std::int32_t const> cu_seqlens, kv_view<float> out, char const* where) const
  {
    namespace gc = pqkv::detail::gpu_check;
    PQKV_EXPECTS((std::is_same_v<Qe, Ke>), where, "q dtype=", dtype_traits<Qe>::name, " differs from k dtype=",
                 dtype_traits<Ke>::name);
    PQKV_EXPECTS((std::is_same_v<Qe, T>), where, "q dtype=", dtype_traits<Qe>::name,
                 " differs from the dtype this object was built for, ", dtype_traits<T>::name);
    PQKV_EXPECTS((std::is_same_v<Vv, Ve>), where, "v dtype=", dtype_traits<Vv>::name,
                 " differs from the value dtype this object was built for, ", dtype_traits<Ve>::name);
    index_t const tokens = q.extent(1);
    PQKV_EXPECTS(q.extent(0) == dims_.q_heads, where, "q heads=", q.extent(0), ", dims.q_heads=", dims_.q_heads);
    PQKV_EXPECTS(k.extent(0) == dims_.kv_heads && v.extent(0) == dims_.kv_heads, where, "k heads=", k.extent(0),
                 ", v heads=", v.extent(0), ", dims.kv_heads=", dims_.kv_heads);
    PQKV_EXPECTS(q.extent(2) == dims_.dim && k.extent(2) == dims_.dim, where, "head_dim q=", q.extent(2),
                 ", k=", k.extent(2), ", dims.dim=", dims_.dim);
    PQKV_EXPECTS(v.extent(2) == dv_, where, "v.extent(2)=", v.extent(2), ", dv=", dv_);
    PQKV_EXPECTS(k.extent(1) == tokens && v.extent(1) == tokens, where, "k tokens=", k.extent(1), ", v tokens=",
                 v.extent(1), ", q tokens=", tokens);
    PQKV_EXPECTS(tokens <= dims_.tokens, where, "tokens=", tokens, " exceeds dims.tokens=", dims_.tokens);
    PQKV_EXPECTS(out.extent(0) == dims_.q_heads && out.extent(1) == tokens && out.extent(2) == dv_, where,
                 "out extents (", out.extent(0), ", ", out.extent(1), ", ", out.extent(2),
                 ") differ from (q_heads, tokens, dv)=(", dims_.q_heads, ", ", tokens, ", ", dv_, ")");
    PQKV_EXPECTS(static_cast<index_t>(cu_seqlens.size()) == dims_.batch + 1 && cu_seqlens.data() != nullptr, where,
                 "cu_seqlens.size()=", cu_seqlens.size(), ", dims.batch + 1=", dims_.batch + 1, " (or null)");
    gc::expect_device_pointer(cu_seqlens.data(), where, "cu_seqlens");
    if (tokens > 0) {
      PQKV_EXPECTS(q.data_handle() != nullptr, where, "q.data_handle() is null");
      PQKV_EXPECTS(k.data_handle() != nullptr, where, "k.data_handle() is null");
      PQKV_EXPECTS(v.data_handle() != nullptr, where, "v.data_handle() is null");
      PQKV_EXPECTS(out.data_handle() != nullptr, where, "out.data_handle() is null");
      gc::expect_device_pointer(q.data_handle(), where, "q");
      gc::expect_device_pointer(k.data_handle(), where, "k");
      gc::expect_device_pointer(v.data_handle(), where, "v");
      gc::expect_device_pointer(out.data_handle(), where, "out");
    }
    gc::expect_current_device(device_, where);
  }

  /// The launch of one call (arguments checked); bits null: dense.
  void launch(kv_view<T const> q, kv_view<T const> k, kv_view<Ve const> v, std::span<std::int32_t const> cu_seqlens,
              std::uint32_t const* bits, kv_view<float> out, cudaStream_t stream) const
  {
    namespace kern = pqkv::detail::bsa_gpu;
    if (q.extent(1) == 0 || shape_.q_blocks == 0) { return; }
    kern::attention_args const a{static_cast<int>(dims_.q_heads), static_cast<int>(dims_.kv_heads),
                                 static_cast<int>(shape_.q_blocks), static_cast<int>(shape_.words),
                                 static_cast<int>(dims_.max_len), static_cast<int>(cfg_.block_q),
                                 static_cast<int>(cfg_.block_k), static_cast<int>(dv_), scale_};
    auto const qa = accessor(q);
    auto const ka = accessor(k);
    auto const va = accessor(v);
    kern::out3 const oa{out.data_handle(), out.mapping().stride(0), out.mapping().stride(1), out.mapping().stride(2)};
    dim3 const grid(static_cast<unsigned>(shape_.q_blocks), static_cast<unsigned>(dims_.q_heads),
                    static_cast<unsigned>(dims_.batch));
    auto go = [&](auto kernel) {
      kernel<<<grid, kern::threads, smem_, stream>>>(qa, ka, va, cu_seqlens.data(), bits, a, oa);
      PQKV_CUDA_CHECK_LAST();
    };
    switch (dims_.dim) {
      case 64: go(kern::attention_kernel<T, Ve, 64>); break;
      case 128: go(kern::attention_kernel<T, Ve, 128>); break;
      default: go(kern::attention_kernel<T, Ve, 256>); break;
    }
  }

  template <class U>
  static pqkv::detail::strided3<U> accessor(kv_view<U const> x)
  {
    return {x.data_handle(), x.mapping().stride(0), x.mapping().stride(1), x.mapping().stride(2)};
  }

  template <int Dim>
  static void set_attr(int bytes)
  {
    PQKV_CUDA_TRY(cudaFuncSetAttribute(pqkv::detail::bsa_gpu::attention_kernel<T, Ve, Dim>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }

  sale_dims dims_;
  sparse_config cfg_;
  index_t dv_ = 0;
  float scale_ = 0.f;
  int device_ = 0;
  std::size_t smem_ = 0;
  mask_shape shape_;
};

}  // namespace pqkv::gpu
