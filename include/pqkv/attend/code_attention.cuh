// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::code_attention`: one decode step of attention read
/// straight from residual K and V codes on the GPU, never rebuilding K or V;
/// output plus log-sum-exp, to merge with the caller's exact sink / window
/// attention. The GPU twin of `pqkv::cpu::code_attention`
/// (attend/code_attention.hpp), whose contract it follows:
/// - LUT: `lut[n][c] = fma chain over i ascending of qp[s * dsub + i] * Ck(s,
///   st, c, i)`: the CPU's values bit for bit.
/// - Logits: `a = 0; a += lut[n][kcode_n]` for n ascending (`__fadd_rn`),
///   `logit = scale * a` (`__fmul_rn`): the CPU's logits bit for bit.
/// - Softmax and values: the same mathematics in another float order. The
///   tokens are cut into chunks (one block each per KV head); a block runs
///   the online softmax over tiles of 512 tokens and adds exp(logit - m) into
///   a shared-memory histogram per (value code, codeword); the chunks'
///   histograms are merged by their maxima and multiplied by the value
///   codewords, then divided by the merged sum. `expf` (CUDA, <= 2 ulp)
///   replaces the host's. When the group's histogram has at most 8192
///   entries (q heads per KV head x value codes x 2^bits; pqkv's 8 stages of
///   8 bits at 4 q heads), each weight is rounded to a multiple of 2^-22 and
///   added as an integer (a native shared-memory atomic, where a float add is
///   a compare-and-swap loop; integer adds are exact in any order), and each
///   tile's sums are folded into float registers; the result is then the same
///   bits run to run. Larger histograms use float atomic adds, whose order
///   varies run to run.
/// Tolerance (asserted by the tests): per q head, ||out_gpu - out_cpu|| /
/// ||out_cpu|| <= 1e-4 and |lse_gpu - lse_cpu| <= 1e-4 * max(1, |lse_cpu|);
/// the float error of either against exact attention on the reconstructed K,
/// V is about 1e-6 (the integer histogram adds at most 2^-23 per token to a
/// weight, relative to the largest weight, 1). Not bitwise deterministic
/// across runs on the float-histogram path.
/// length == 0 gives out = 0 and lse = -inf, as the CPU.
///
/// Where the LUT lives: the group's LUT [splits * stages, 2^bits, q heads of
/// the group] is copied to shared memory when it fits beside the value
/// histogram (pqkv's 8+8 stages of 8 bits: 32 KiB at 4 q heads per KV head);
/// else (VQKV's 56 x 1024 keys: 896 KiB) the scan reads it from the
/// workspace through L1/L2, which is correct but several times slower;
/// `lut_in_shared_memory()` reports the choice. The value histogram of a
/// group, q heads per KV head x splits * stages x 2^bits x 4 bytes, must fit
/// in shared memory (construction throws otherwise; VQKV's 16 x 512 values:
/// 128 KiB at 4 q heads per KV head).
///
/// Memory and ordering: the caller owns everything; a call allocates
/// nothing, never synchronizes, reads no device memory on the host and
/// launches four kernels on `stream`, so it can be captured in a CUDA graph;
/// with the device-length overload the graph can be replayed as the sequence
/// grows (the work is split by the codes' capacity; blocks past the length
/// return at once). A workspace must not be shared by calls that may run
/// concurrently.
///
/// Not checked (device memory): queries and centroids must be finite, codes
/// < 2^bits (a larger code is read modulo 2^bits: memory-safe, not the
/// reference's answer).

#include <pqkv/attend/code_attention.hpp>
#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/residual_gpu_kernels.cuh>
#include <pqkv/encode/residual.cuh>
#include <pqkv/encode/residual.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

namespace pqkv::gpu {

/// The largest capacity one `code_attention` serves (it sizes the
/// workspace), and tuning.
struct code_attention_limits {
  index_t max_tokens = 131072;  ///< codes.extent(1) (token capacity) per call
  /// Tuning: scan blocks per SM aimed for (the token split of each KV head).
  int blocks_per_sm = 2;
  /// Tuning: keep the group's LUT in shared memory when it fits (false: always
  /// read it from the workspace; the tests use this to cover that path).
  bool lut_in_shared = true;

  /// Throws `pqkv::error` naming the first field out of range.
  void validate(char const* where = "code_attention_limits") const
  {
    PQKV_EXPECTS(max_tokens >= 0 && max_tokens <= index_t{0x7fffffff}, where, "limits.max_tokens=", max_tokens,
                 " is outside [0, 2^31)");
    PQKV_EXPECTS(blocks_per_sm >= 1 && blocks_per_sm <= 64, where, "limits.blocks_per_sm=", blocks_per_sm,
                 " is outside [1, 64]");
  }
};

/// Decode attention from residual K and V codes on the GPU (the file's
/// contract). Built once per shape; each call is one decode step,
/// stream-ordered and graph-capturable. Calls are const; the object may be
/// shared by threads that give each call its own workspace.
class code_attention {
 public:
  /// Validates both configs (dsub in {4, .., 128}), q_heads a multiple of
  /// kv_heads with at most 8 q heads per KV head, the limits, the scale, and
  /// that the value histogram fits in shared memory on the current device
  /// (calls must run there; each call raises its kernels' shared-memory
  /// limits, a host-side call allowed during capture).
  /// `scale` 0 means 1/sqrt(key dim), as the CPU.
  code_attention(rq_config key_cfg, rq_config value_cfg, index_t q_heads, index_t kv_heads,
                 code_attention_limits const& limits = {}, float scale = 0.f)
    : key_cfg_{std::move(key_cfg)}, value_cfg_{std::move(value_cfg)}, q_heads_{q_heads}, kv_heads_{kv_heads},
      limits_{limits}
  {
    constexpr char const* where = "gpu::code_attention";
    namespace kern = pqkv::detail::rq_gpu;
    key_cfg_.validate(where);
    value_cfg_.validate(where);
    limits_.validate(where);
    PQKV_EXPECTS(pqkv::detail::nearest_gpu::dsub_supported(key_cfg_.dsub()), where, "key_cfg dim / splits=",
                 key_cfg_.dsub(), " is not one of 4, 8, 16, 32, 64, 128");
    PQKV_EXPECTS(pqkv::detail::nearest_gpu::dsub_supported(value_cfg_.dsub()), where, "value_cfg dim / splits=",
                 value_cfg_.dsub(), " is not one of 4, 8, 16, 32, 64, 128");
    PQKV_EXPECTS(kv_heads > 0, where, "kv_heads=", kv_heads, " must be positive");
    PQKV_EXPECTS(q_heads > 0 && q_heads % kv_heads == 0, where, "q_heads=", q_heads,
                 " is not a positive multiple of kv_heads=", kv_heads);
    PQKV_EXPECTS(q_heads / kv_heads <= kern::max_group, where, "q_heads / kv_heads=", q_heads / kv_heads,
                 " exceeds ", kern::max_group);
    PQKV_EXPECTS(q_heads <= 65535, where, "q_heads=", q_heads, " exceeds 65535");
    scale_ = pqkv::detail::attention_scale(scale, key_cfg_.dim, where);
    group_ = static_cast<int>(q_heads / kv_heads);

    int sms = 0, optin = 0;
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
    sms_ = sms > 0 ? sms : 132;
    // The scan kernel's static shared memory (a reduction buffer) comes off the top.
    std::size_t const budget = static_cast<std::size_t>(optin) - 1024;
    int const nk = static_cast<int>(key_cfg_.codes_per_row()), nv = static_cast<int>(value_cfg_.codes_per_row());
    int const ksub_k = static_cast<int>(key_cfg_.ksub()), ksub_v = static_cast<int>(value_cfg_.ksub());
    std::size_t const hist_bytes = kern::scan_smem_bytes(group_, nv, ksub_v, nk, ksub_k, false);
    PQKV_EXPECTS(hist_bytes <= budget, where, "the value histogram of a group (q_heads / kv_heads=", group_,
                 " x splits * stages=", nv, " x 2^bits=", ksub_v, " x 4 bytes) needs ", hist_bytes,
                 " bytes of shared memory; the device allows ", budget);
    std::size_t const with_lut = kern::scan_smem_bytes(group_, nv, ksub_v, nk, ksub_k, true);
    lut_in_smem_ = limits_.lut_in_shared && with_lut <= budget;
    scan_smem_ = lut_in_smem_ ? with_lut : hist_bytes;

    chunks_per_head_ = std::max<index_t>(1, static_cast<index_t>(sms_) * limits_.blocks_per_sm / kv_heads_);
    index_t const per_split = index_t{value_cfg_.stages} * ksub_v;
    index_t const target = std::max<index_t>(1, sms_ / (kv_heads_ * value_cfg_.splits));
    slices_ = std::max((per_split + kern::value_slice_max - 1) / kern::value_slice_max,
                       std::min(target, (per_split + 31) / 32));
    slice_ = (per_split + slices_ - 1) / slices_;
    value_smem_ = kern::value_smem_bytes(group_, static_cast<int>(chunks_per_head_), static_cast<int>(slice_));
    lut_smem_ = static_cast<std::size_t>(kern::lut_codewords + q_heads_) * (key_cfg_.dsub() + 1) * sizeof(float);
    PQKV_EXPECTS(value_smem_ <= budget, where, "the value kernel needs ", value_smem_,
                 " bytes of shared memory (limits.blocks_per_sm=", limits_.blocks_per_sm, "); the device allows ",
                 budget);
    PQKV_EXPECTS(lut_smem_ <= budget, where, "the LUT kernel needs ", lut_smem_, " bytes of shared memory (q_heads=",
                 q_heads_, "); the device allows ", budget);

    auto align = [](std::size_t floats) { return (floats + 63) / 64 * 64; };  // 256-byte sections
    layout_.lut = 0;
    layout_.ml = align(static_cast<std::size_t>(q_heads_) * nk * ksub_k);
    layout_.hist = layout_.ml + align(static_cast<std::size_t>(q_heads_) * chunks_per_head_ * 2);
    layout_.part = layout_.hist + align(static_cast<std::size_t>(q_heads_) * chunks_per_head_ * nv * ksub_v);
    layout_.total_floats =
      layout_.part + align(static_cast<std::size_t>(value_cfg_.splits) * slices_ * q_heads_ * value_cfg_.dim);
  }

  [[nodiscard]] rq_config const& key_config() const noexcept { return key_cfg_; }
  [[nodiscard]] rq_config const& value_config() const noexcept { return value_cfg_; }
  [[nodiscard]] index_t q_heads() const noexcept { return q_heads_; }
  [[nodiscard]] index_t kv_heads() const noexcept { return kv_heads_; }
  [[nodiscard]] code_attention_limits const& limits() const noexcept { return limits_; }
  /// The logit scale in use.
  [[nodiscard]] float scale() const noexcept { return scale_; }
  /// The device the object was built on (calls must run there).
  [[nodiscard]] int device() const noexcept { return device_; }
  /// Whether the scan keeps the group's LUT in shared memory (else it reads
  /// it from the workspace).
  [[nodiscard]] bool lut_in_shared_memory() const noexcept { return lut_in_smem_; }
  /// Bytes of scratch a call needs (256-byte aligned start).
  [[nodiscard]] std::size_t workspace_bytes() const noexcept { return layout_.total_floats * sizeof(float); }
  /// Tokens per scan block for codes of this capacity.
  [[nodiscard]] index_t chunk_tokens(index_t capacity) const noexcept
  {
    namespace kern = pqkv::detail::rq_gpu;
    index_t const c = (capacity + chunks_per_head_ - 1) / chunks_per_head_;
    return std::max<index_t>(kern::scan_tile, (c + kern::scan_tile - 1) / kern::scan_tile * kern::scan_tile);
  }

  /// out [q_heads, value dim] and lse [q_heads] (or empty) of attention over
  /// tokens [0, length) of the codes (the file's contract). Throws
  /// `pqkv::error` before any launch on a shape mismatch, a code type too
  /// narrow for bits, length outside [0, capacity], a capacity over
  /// limits.max_tokens, a null or host pointer, or a short workspace.
  template <class KCode, class VCode>
    requires(RqCode<std::remove_const_t<KCode>> && RqCode<std::remove_const_t<VCode>>)
  void operator()(query_view<float const> q,                       // [q_heads, dim], device
                  rq_centroids_view<float const> key_centroids,    // [1|kv_heads, splits, stages, ksub, dsub], device
                  view<KCode, 3> key_codes,                        // [kv_heads, capacity, splits * stages], device
                  rq_centroids_view<float const> value_centroids,  // [1|kv_heads, splits, stages, ksub, dsub], device
                  view<VCode, 3> value_codes,                      // [kv_heads, capacity, splits * stages], device
                  index_t length,
                  view<float, 2> out,              // [q_heads, value dim], device
                  std::span<float> lse,            // [q_heads] or empty, device
                  std::span<std::byte> workspace,  // workspace_bytes(), device
                  cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::code_attention";
    PQKV_EXPECTS(length >= 0 && length <= key_codes.extent(1), where, "length=", length,
                 " is outside [0, capacity=", key_codes.extent(1), "]");
    call(q, key_centroids, pqkv::as_const(key_codes), value_centroids, pqkv::as_const(value_codes), length, nullptr,
         out, lse, workspace, stream);
  }

  /// As above with the length read on the device from `length[0]` (int64,
  /// clamped to [0, capacity]), so a captured graph can be replayed as the
  /// sequence grows.
  template <class KCode, class VCode>
    requires(RqCode<std::remove_const_t<KCode>> && RqCode<std::remove_const_t<VCode>>)
  void operator()(query_view<float const> q,                       // [q_heads, dim], device
                  rq_centroids_view<float const> key_centroids,    // [1|kv_heads, splits, stages, ksub, dsub], device
                  view<KCode, 3> key_codes,                        // [kv_heads, capacity, splits * stages], device
                  rq_centroids_view<float const> value_centroids,  // [1|kv_heads, splits, stages, ksub, dsub], device
                  view<VCode, 3> value_codes,                      // [kv_heads, capacity, splits * stages], device
                  std::span<index_t const> length,                 // [1], device
                  view<float, 2> out,                              // [q_heads, value dim], device
                  std::span<float> lse,                            // [q_heads] or empty, device
                  std::span<std::byte> workspace,                  // workspace_bytes(), device
                  cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::code_attention";
    PQKV_EXPECTS(length.size() == 1, where, "length.size()=", length.size(), " must be 1");
    PQKV_EXPECTS(length.data() != nullptr, where, "length.data() is null");
    pqkv::detail::gpu_check::expect_device_pointer(length.data(), where, "length.data()");
    call(q, key_centroids, pqkv::as_const(key_codes), value_centroids, pqkv::as_const(value_codes), 0, length.data(),
         out, lse, workspace, stream);
  }

 private:
  template <class KCode, class VCode>
  void call(query_view<float const> q, rq_centroids_view<float const> kcent, view<KCode const, 3> kcodes,
            rq_centroids_view<float const> vcent, view<VCode const, 3> vcodes, index_t length,
            index_t const* length_dev, view<float, 2> out, std::span<float> lse, std::span<std::byte> workspace,
            cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::code_attention";
    namespace kern = pqkv::detail::rq_gpu;
    using pqkv::detail::gpu_check::expect_device_pointer;
    index_t const capacity = kcodes.extent(1);
    pqkv::detail::rq::check_code_type<KCode>(key_cfg_.bits, "gpu::code_attention (key_codes)");
    pqkv::detail::rq::check_code_type<VCode>(value_cfg_.bits, "gpu::code_attention (value_codes)");
    PQKV_EXPECTS(q.extent(0) == q_heads_, where, "q.extent(0)=", q.extent(0), ", q_heads=", q_heads_);
    PQKV_EXPECTS(q.extent(1) == key_cfg_.dim, where, "q.extent(1)=", q.extent(1), ", key_cfg.dim=", key_cfg_.dim);
    PQKV_EXPECTS(kcodes.extent(0) == kv_heads_, where, "key_codes.extent(0)=", kcodes.extent(0), ", kv_heads=",
                 kv_heads_);
    PQKV_EXPECTS(kcodes.extent(2) == key_cfg_.codes_per_row(), where, "key_codes.extent(2)=", kcodes.extent(2),
                 ", key_cfg.splits * key_cfg.stages=", key_cfg_.codes_per_row());
    PQKV_EXPECTS(vcodes.extent(0) == kv_heads_ && vcodes.extent(1) == capacity, where, "value_codes extents (",
                 vcodes.extent(0), ", ", vcodes.extent(1), ") differ from key_codes' (", kv_heads_, ", ", capacity,
                 ")");
    PQKV_EXPECTS(vcodes.extent(2) == value_cfg_.codes_per_row(), where, "value_codes.extent(2)=", vcodes.extent(2),
                 ", value_cfg.splits * value_cfg.stages=", value_cfg_.codes_per_row());
    PQKV_EXPECTS(capacity <= limits_.max_tokens, where, "key_codes.extent(1)=", capacity,
                 " exceeds limits.max_tokens=", limits_.max_tokens);
    PQKV_EXPECTS(out.extent(0) == q_heads_ && out.extent(1) == value_cfg_.dim, where, "out extents (",
                 out.extent(0), ", ", out.extent(1), ") differ from (q_heads, value_cfg.dim)=(", q_heads_, ", ",
                 value_cfg_.dim, ")");
    PQKV_EXPECTS(lse.empty() || static_cast<index_t>(lse.size()) == q_heads_, where, "lse.size()=", lse.size(),
                 ", q_heads=", q_heads_);
    check_rq_centroids(kcent, key_cfg_, kv_heads_, "gpu::code_attention (key_centroids)", false);
    check_rq_centroids(vcent, value_cfg_, kv_heads_, "gpu::code_attention (value_centroids)", false);
    PQKV_EXPECTS(q.data_handle() != nullptr, where, "q.data_handle() is null");
    PQKV_EXPECTS(out.data_handle() != nullptr, where, "out.data_handle() is null");
    PQKV_EXPECTS(capacity == 0 || kcodes.data_handle() != nullptr, where, "key_codes.data_handle() is null");
    PQKV_EXPECTS(capacity == 0 || vcodes.data_handle() != nullptr, where, "value_codes.data_handle() is null");
    PQKV_EXPECTS(workspace.size() >= workspace_bytes(), where, "workspace.size()=", workspace.size(),
                 " is less than workspace_bytes()=", workspace_bytes());
    PQKV_EXPECTS(workspace.data() != nullptr, where, "workspace.data() is null");
    kern::expect_aligned(workspace.data(), 256, where, "workspace.data()");
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    expect_device_pointer(q.data_handle(), where, "q.data_handle()");
    expect_device_pointer(kcent.data_handle(), where, "key_centroids.data_handle()");
    expect_device_pointer(vcent.data_handle(), where, "value_centroids.data_handle()");
    if (capacity > 0) {
      expect_device_pointer(kcodes.data_handle(), where, "key_codes.data_handle()");
      expect_device_pointer(vcodes.data_handle(), where, "value_codes.data_handle()");
    }
    expect_device_pointer(out.data_handle(), where, "out.data_handle()");
    if (!lse.empty()) { expect_device_pointer(lse.data(), where, "lse.data()"); }
    expect_device_pointer(workspace.data(), where, "workspace.data()");

    kern::attn_args<KCode, VCode> a{};
    auto* const ws = reinterpret_cast<float*>(workspace.data());
    a.q = q.data_handle();
    a.qs0 = q.stride(0);
    a.qs1 = q.stride(1);
    a.kcent = kcent.data_handle();
    a.vcent = vcent.data_handle();
    a.kcodes = kcodes.data_handle();
    a.vcodes = vcodes.data_handle();
    a.out = out.data_handle();
    a.lse = lse.empty() ? nullptr : lse.data();
    a.lut = ws + layout_.lut;
    a.ml = ws + layout_.ml;
    a.hist = ws + layout_.hist;
    a.part = ws + layout_.part;
    a.capacity = capacity;
    a.length = length;
    a.length_dev = length_dev;
    a.chunk_tokens = chunk_tokens(capacity);
    a.chunks = static_cast<int>(std::max<index_t>(1, (capacity + a.chunk_tokens - 1) / a.chunk_tokens));
    a.q_heads = static_cast<int>(q_heads_);
    a.kv_heads = static_cast<int>(kv_heads_);
    a.group = group_;
    a.dim = static_cast<int>(key_cfg_.dim);
    a.splits_k = key_cfg_.splits;
    a.stages_k = key_cfg_.stages;
    a.ksub_k = static_cast<int>(key_cfg_.ksub());
    a.dsub_k = static_cast<int>(key_cfg_.dsub());
    a.nk = static_cast<int>(key_cfg_.codes_per_row());
    a.dv = static_cast<int>(value_cfg_.dim);
    a.splits_v = value_cfg_.splits;
    a.stages_v = value_cfg_.stages;
    a.ksub_v = static_cast<int>(value_cfg_.ksub());
    a.dsub_v = static_cast<int>(value_cfg_.dsub());
    a.nv = static_cast<int>(value_cfg_.codes_per_row());
    a.kshared = kcent.extent(0) == 1 ? 1 : 0;
    a.vshared = vcent.extent(0) == 1 ? 1 : 0;
    a.slices = static_cast<int>(slices_);
    a.slice = static_cast<int>(slice_);
    a.scale = scale_;
    a.lut_in_smem = lut_in_smem_ ? 1 : 0;
    a.kmap = kern::make_channel_map(key_cfg_);
    a.vmap = kern::make_channel_map(value_cfg_);
    // The value kernel's f buffer is sized for chunks_per_head_ chunks.
    PQKV_EXPECTS(a.chunks <= chunks_per_head_, where, "internal: ", a.chunks, " chunks exceed ", chunks_per_head_);
    kern::launch_attention(a, static_cast<int>(kcent.extent(0)), lut_smem_, scan_smem_, value_smem_, stream);
  }

  rq_config key_cfg_, value_cfg_;
  index_t q_heads_ = 0, kv_heads_ = 0;
  code_attention_limits limits_{};
  float scale_ = 1.f;
  int group_ = 1;
  int device_ = 0;
  int sms_ = 132;
  bool lut_in_smem_ = false;
  index_t chunks_per_head_ = 1, slices_ = 1, slice_ = 1;
  std::size_t lut_smem_ = 0, scan_smem_ = 0, value_smem_ = 0;
  pqkv::detail::rq_gpu::attn_layout layout_{};
};

}  // namespace pqkv::gpu
