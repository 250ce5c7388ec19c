// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::rq_encoder and pqkv::gpu::code_attention against their CPU
// references: identical codes (greedy and beam, 1..16-bit codebooks, uint8
// and uint16 codes, splits and permutations, shared codebooks, float / half /
// bf16 and strided keys, planted exact ties); append (host or device
// position, graph replay) equals one encode; code attention within the
// documented tolerance of the CPU contract (shared-memory and workspace LUT,
// several chunks and tiles, device length in a replayed graph) and of
// double-precision attention on the reconstructed K, V; reconstruction equal
// to the CPU's bit for bit; bad inputs throw before any launch and leave the
// outputs untouched.
#include <pqkv/attend/code_attention.cuh>
#include <pqkv/attend/code_attention.hpp>
#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/random.hpp>
#include <pqkv/decode/residual_reconstruct.cuh>
#include <pqkv/decode/residual_reconstruct.hpp>
#include <pqkv/encode/residual.cuh>
#include <pqkv/encode/residual.hpp>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"
#include "common/residual_util.hpp"
#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::download;
using pqkv::test::contains;
using pqkv::test::error_message;
using pqkv::test::noise;
using pqkv::test::upload;

pqkv::rq_config make_cfg(index_t dim, int splits, int stages, int bits, bool permute = false, int beam = 1)
{
  auto c = pqkv::test::rq_test_config(dim, splits, stages, bits, permute);
  c.beam = beam;
  return c;
}

/// Centroids [heads, splits, stages, ksub, dsub], later stages smaller; with
/// `ties`, codeword k + 1 repeats codeword k for every fourth k of every
/// stage (exact distance ties the lower index must win).
std::vector<float> make_centroids(pqkv::rq_config const& cfg, index_t heads, std::uint64_t seed, bool ties,
                                  float decay = 0.6f, float gain = 1.f)
{
  index_t const ksub = cfg.ksub(), dsub = cfg.dsub();
  std::vector<float> c(static_cast<std::size_t>(heads * cfg.splits * cfg.stages * ksub * dsub));
  for (index_t b = 0; b < heads * cfg.splits * cfg.stages; ++b) {
    float const g = gain * std::pow(decay, static_cast<float>(b % cfg.stages));
    for (index_t e = 0; e < ksub * dsub; ++e) {
      c[static_cast<std::size_t>(b * ksub * dsub + e)] = g * noise(seed, static_cast<std::uint64_t>(b * ksub * dsub + e));
    }
    if (ties) {
      for (index_t k = 0; k + 1 < ksub; k += 4) {
        std::copy_n(c.begin() + (b * ksub + k) * dsub, dsub, c.begin() + (b * ksub + k + 1) * dsub);
      }
    }
  }
  return c;
}

std::vector<float> make_values(std::size_t n, std::uint64_t seed)
{
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) { v[i] = noise(seed, i); }
  return v;
}

template <class Key>
std::vector<Key> convert(std::vector<float> const& v)
{
  std::vector<Key> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) { out[i] = pqkv::from_float<Key>(v[i]); }
  return out;
}

auto rq_view(float const* p, pqkv::rq_config const& cfg, index_t heads)
{
  return pqkv::rq_centroids_view<float const>{p, heads, index_t{cfg.splits}, index_t{cfg.stages}, cfg.ksub(),
                                              cfg.dsub()};
}

/// Fails with the first differing code, naming (head, token, code).
template <class Code>
void expect_same_codes(std::vector<Code> const& got, std::vector<Code> const& want, index_t tokens, index_t n,
                       char const* what)
{
  REQUIRE(got.size() == want.size());
  std::size_t diff = 0;
  std::size_t first = got.size();
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i]) {
      ++diff;
      first = std::min(first, i);
    }
  }
  if (diff != 0) {
    auto const idx = static_cast<index_t>(first);
    FAIL(what, ": ", diff, " of ", got.size(), " codes differ; first at (h, t, n)=(", idx / (tokens * n), ", ",
         idx / n % tokens, ", ", idx % n, "): gpu ", index_t{got[first]}, ", cpu ", index_t{want[first]});
  }
}

/// Encodes random keys on the CPU and the GPU; the codes must be equal.
/// `nhd`: the keys are stored [tokens, heads, dim] and seen as [heads, tokens, dim].
template <class Key, class Code>
void check_encoder(pqkv::rq_config const& cfg, index_t heads, index_t tokens, bool shared, std::uint64_t seed,
                   bool nhd = false, bool ties = true, bool row_path = true)
{
  CAPTURE(cfg.dim);
  CAPTURE(cfg.splits);
  CAPTURE(cfg.stages);
  CAPTURE(cfg.bits);
  CAPTURE(cfg.beam);
  CAPTURE(shared);
  CAPTURE(nhd);
  CAPTURE(sizeof(Key));
  CAPTURE(sizeof(Code));
  index_t const dim = cfg.dim, n = cfg.codes_per_row(), cbh = shared ? 1 : heads;
  auto const keys = convert<Key>(make_values(static_cast<std::size_t>(heads * tokens * dim), seed));
  auto const cent = make_centroids(cfg, cbh, seed + 1, ties);
  auto const strides = nhd ? std::array<index_t, 3>{dim, heads * dim, 1} : std::array<index_t, 3>{tokens * dim, dim, 1};
  std::vector<Code> cpu(static_cast<std::size_t>(heads * tokens * n), 0);
  pqkv::cpu::rq_encoder{cfg}.encode(
    pqkv::make_strided_view<Key const, 3>(keys.data(), {heads, tokens, dim}, {strides[0], strides[1], strides[2]}),
    rq_view(cent.data(), cfg, cbh), pqkv::make_view(cpu.data(), heads, tokens, n));
  auto dk = upload(keys);
  auto dc = upload(cent);
  pqkv::device_buffer<Code> dcodes(cpu.size());
  // The tile kernel (prefill) always; the per-row cluster kernel (decode
  // steps) too, for greedy configs, forced by the tuning.
  for (index_t const row_max : {index_t{0}, index_t{1} << 40}) {
    if (row_max > 0 && (!row_path || cfg.beam > 1)) { continue; }
    CAPTURE(row_max);
    PQKV_CUDA_TRY(cudaMemset(dcodes.data(), 0xEE, dcodes.size_bytes()));  // poison
    pqkv::gpu::rq_encoder const enc{cfg, {.row_path_max = row_max}};
    enc.encode(pqkv::make_strided_view<Key const, 3>(dk.data(), {heads, tokens, dim}, {strides[0], strides[1], strides[2]}),
               rq_view(dc.data(), cfg, cbh), pqkv::make_view(dcodes.data(), heads, tokens, n), nullptr);
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
    expect_same_codes(download(dcodes, cpu.size()), cpu, tokens, n, row_max > 0 ? "encode (row kernel)" : "encode (tile kernel)");
  }
}

}  // namespace

TEST_CASE("gpu rq_encoder: greedy codes equal the CPU encoder's")
{
  PQKV_REQUIRE_GPU();
  SUBCASE("uint8 codes, 1..8 bits, splits, permutations, shared codebooks")
  {
    check_encoder<float, std::uint8_t>(make_cfg(128, 1, 4, 8), 2, 150, false, 11);
    check_encoder<float, std::uint8_t>(make_cfg(128, 2, 3, 8, true), 2, 150, false, 12);
    check_encoder<float, std::uint8_t>(make_cfg(64, 4, 5, 4), 3, 130, true, 13);
    check_encoder<float, std::uint8_t>(make_cfg(128, 1, 3, 1), 2, 129, false, 14);
    check_encoder<float, std::uint8_t>(make_cfg(64, 1, 6, 5, true), 2, 100, true, 15);
    check_encoder<float, std::uint8_t>(make_cfg(32, 4, 2, 6), 2, 70, false, 16);   // dsub 8
    check_encoder<float, std::uint8_t>(make_cfg(16, 4, 2, 3), 2, 70, false, 17);   // dsub 4
    check_encoder<float, std::uint8_t>(make_cfg(128, 4, 8, 7, true), 2, 140, false, 18);
  }
  SUBCASE("uint16 codes: 8, 9, 10, 12 and 16 bits")
  {
    check_encoder<float, std::uint16_t>(make_cfg(128, 1, 3, 8), 2, 150, false, 21);
    check_encoder<float, std::uint16_t>(make_cfg(64, 2, 3, 9, true), 2, 90, false, 22);
    check_encoder<float, std::uint16_t>(make_cfg(128, 1, 2, 10), 2, 150, false, 23);
    check_encoder<float, std::uint16_t>(make_cfg(128, 2, 2, 12, true), 2, 70, true, 24);
    check_encoder<float, std::uint16_t>(make_cfg(32, 1, 2, 16), 2, 24, true, 25);
  }
  SUBCASE("half and bf16 keys")
  {
    check_encoder<__half, std::uint8_t>(make_cfg(128, 2, 4, 8, true), 2, 150, false, 31);
    check_encoder<__nv_bfloat16, std::uint8_t>(make_cfg(128, 1, 4, 8), 2, 150, true, 32);
    check_encoder<__nv_bfloat16, std::uint16_t>(make_cfg(128, 1, 2, 10), 2, 90, false, 33);
  }
  SUBCASE("strided (NHD) keys")
  {
    check_encoder<float, std::uint8_t>(make_cfg(128, 2, 3, 8, true), 3, 140, false, 41, true);
    check_encoder<__nv_bfloat16, std::uint16_t>(make_cfg(64, 1, 2, 10), 3, 80, true, 42, true);
  }
}

TEST_CASE("gpu rq_encoder: beam codes equal the CPU encoder's")
{
  PQKV_REQUIRE_GPU();
  check_encoder<float, std::uint8_t>(make_cfg(64, 1, 3, 8, false, 4), 2, 60, false, 51);
  check_encoder<float, std::uint8_t>(make_cfg(128, 2, 3, 6, true, 2), 2, 60, true, 52);
  check_encoder<float, std::uint8_t>(make_cfg(32, 1, 4, 4, false, 16), 2, 50, false, 53);
  check_encoder<float, std::uint16_t>(make_cfg(64, 1, 2, 10, false, 3), 2, 40, false, 54);
  check_encoder<__nv_bfloat16, std::uint8_t>(make_cfg(128, 4, 3, 5, true, 5), 2, 40, false, 55, true);
  // 4-entry codebooks, beam = 2^bits: many planted ties between parents
  check_encoder<float, std::uint8_t>(make_cfg(16, 1, 5, 2, false, 4), 2, 80, true, 56);
  check_encoder<__half, std::uint16_t>(make_cfg(64, 2, 2, 9, false, 7), 2, 30, true, 57);
}

TEST_CASE("gpu rq_encoder: moderate shape (2 heads x 2048 tokens, d = 128, 8 stages of 256, bf16)")
{
  PQKV_REQUIRE_GPU();
  check_encoder<__nv_bfloat16, std::uint8_t>(make_cfg(128, 1, 8, 8), 2, 2048, false, 61, false, false, false);
}

namespace {

/// append (host position in chunks, then device position in a replayed
/// graph) equals one encode; rows past the tokens stay untouched.
template <class Code>
void check_append(pqkv::rq_config const& cfg, std::uint64_t seed, pqkv::gpu::rq_encode_tuning tuning = {})
{
  CAPTURE(cfg.beam);
  CAPTURE(cfg.bits);
  CAPTURE(tuning.row_path_max);
  index_t const heads = 2, tokens = 150, cap = 160, dim = cfg.dim, n = cfg.codes_per_row();
  auto const kf = make_values(static_cast<std::size_t>(heads * tokens * dim), seed);
  auto const cent = make_centroids(cfg, heads, seed + 1, true);
  auto dk = upload(kf);
  auto dc = upload(cent);
  pqkv::gpu::rq_encoder const enc{cfg, tuning};
  auto const cv = rq_view(dc.data(), cfg, heads);
  pqkv::device_buffer<Code> full(static_cast<std::size_t>(heads * tokens * n));
  enc.encode(pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens, dim), cv,
             pqkv::make_view(full.data(), heads, tokens, n), nullptr);
  auto const ref = download(full, full.size());
  auto token_slice = [&](index_t t0, index_t count) {
    return pqkv::make_strided_view<float const, 3>(dk.data() + t0 * dim, {heads, count, dim}, {tokens * dim, dim, 1});
  };
  Code poison{};
  std::memset(&poison, 0xEE, sizeof(Code));
  auto check_rows = [&](std::vector<Code> const& got) {
    for (index_t h = 0; h < heads; ++h) {
      for (index_t t = 0; t < cap; ++t) {
        for (index_t j = 0; j < n; ++j) {
          Code const g = got[static_cast<std::size_t>((h * cap + t) * n + j)];
          Code const w = t < tokens ? ref[static_cast<std::size_t>((h * tokens + t) * n + j)] : poison;
          if (g != w) { FAIL("code (", h, ", ", t, ", ", j, ") is ", index_t{g}, ", want ", index_t{w}); }
        }
      }
    }
  };
  pqkv::device_buffer<Code> codes(static_cast<std::size_t>(heads * cap * n));
  auto const codes_v = pqkv::make_view(codes.data(), heads, cap, n);
  SUBCASE("host position, a few tokens at a time")
  {
    PQKV_CUDA_TRY(cudaMemset(codes.data(), 0xEE, codes.size_bytes()));
    enc.append(token_slice(0, 100), cv, codes_v, index_t{0}, nullptr);
    for (index_t t = 100; t < tokens; t += 3) {
      enc.append(token_slice(t, std::min<index_t>(3, tokens - t)), cv, codes_v, t, nullptr);
    }
    PQKV_CUDA_TRY(cudaDeviceSynchronize());
    check_rows(download(codes, codes.size()));
  }
  SUBCASE("device position, one token per step, captured once and replayed")
  {
    PQKV_CUDA_TRY(cudaMemset(codes.data(), 0xEE, codes.size_bytes()));
    enc.append(token_slice(0, 100), cv, codes_v, index_t{0}, nullptr);
    pqkv::device_buffer<float> staging(static_cast<std::size_t>(heads * dim));
    pqkv::device_buffer<index_t> pos(1);
    cudaStream_t stream = nullptr;
    PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    pqkv::test::captured_graph const step(stream, [&] {
      enc.append(pqkv::make_view(static_cast<float const*>(staging.data()), heads, index_t{1}, dim), cv, codes_v,
                 std::span<index_t const>{pos.data(), 1}, stream);
    });
    for (index_t t = 100; t < tokens; ++t) {
      for (index_t h = 0; h < heads; ++h) {
        PQKV_CUDA_TRY(cudaMemcpyAsync(staging.data() + h * dim, dk.data() + (h * tokens + t) * dim,
                                      dim * sizeof(float), cudaMemcpyDeviceToDevice, stream));
      }
      PQKV_CUDA_TRY(cudaMemcpyAsync(pos.data(), &t, sizeof(index_t), cudaMemcpyHostToDevice, stream));
      step.launch(stream);
      PQKV_CUDA_TRY(cudaStreamSynchronize(stream));  // `t` is read by the copy above
    }
    for (index_t const bad : {cap, index_t{-1}}) {  // device positions outside [0, cap - 1] write nothing
      PQKV_CUDA_TRY(cudaMemcpyAsync(pos.data(), &bad, sizeof(index_t), cudaMemcpyHostToDevice, stream));
      step.launch(stream);
      PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    }
    check_rows(download(codes, codes.size()));
    PQKV_CUDA_TRY(cudaStreamDestroy(stream));
  }
}

}  // namespace

TEST_CASE("gpu rq_encoder: append equals a full encode (greedy and beam)")
{
  PQKV_REQUIRE_GPU();
  SUBCASE("greedy, 8 bits (row kernel for the steps)") { check_append<std::uint8_t>(make_cfg(128, 2, 4, 8, true), 71); }
  SUBCASE("greedy, 8 bits, tile kernel only") { check_append<std::uint8_t>(make_cfg(128, 2, 4, 8, true), 74, {.row_path_max = 0}); }
  SUBCASE("greedy, 10 bits") { check_append<std::uint16_t>(make_cfg(64, 1, 3, 10), 72); }
  SUBCASE("beam 3") { check_append<std::uint8_t>(make_cfg(64, 1, 3, 6, false, 3), 73); }
}

TEST_CASE("gpu rq_encoder: bad inputs throw before any launch")
{
  PQKV_REQUIRE_GPU();
  CHECK(contains(error_message([] { pqkv::gpu::rq_encoder{make_cfg(96, 1, 2, 8)}; }), "dim / splits=96"));
  CHECK(contains(error_message([] { pqkv::gpu::rq_encoder{make_cfg(64, 3, 2, 8)}; }), "splits=3"));
  CHECK(contains(error_message([] { pqkv::gpu::rq_encoder{make_cfg(64, 1, 65, 8)}; }), "stages=65"));
  CHECK(contains(error_message([] { pqkv::gpu::rq_encoder{make_cfg(64, 1, 2, 17)}; }), "bits=17"));
  CHECK(contains(error_message([] { pqkv::gpu::rq_encoder{make_cfg(64, 1, 2, 2, false, 5)}; }), "beam=5"));
  CHECK(contains(error_message([] { pqkv::gpu::rq_encoder{make_cfg(64, 1, 2, 2), {.row_path_max = -1}}; }),
                 "row_path_max=-1"));
  index_t const heads = 2, tokens = 40, dim = 64;
  auto const cfg = make_cfg(dim, 2, 3, 6);
  index_t const n = cfg.codes_per_row();
  pqkv::gpu::rq_encoder const enc{cfg};
  auto const kf = make_values(static_cast<std::size_t>(heads * tokens * dim), 81);
  auto const cent = make_centroids(cfg, heads, 82, false);
  auto dk = upload(kf);
  auto dc = upload(cent);
  pqkv::device_buffer<std::uint8_t> codes(static_cast<std::size_t>(heads * tokens * n));
  pqkv::device_buffer<std::uint16_t> codes16(static_cast<std::size_t>(heads * tokens * n));
  PQKV_CUDA_TRY(cudaMemset(codes.data(), 0x5A, codes.size_bytes()));
  PQKV_CUDA_TRY(cudaMemset(codes16.data(), 0x5A, codes16.size_bytes()));
  auto const kv = pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens, dim);
  auto const cv = rq_view(dc.data(), cfg, heads);
  auto const out = pqkv::make_view(codes.data(), heads, tokens, n);
  CHECK(contains(error_message([&] {
                   enc.encode(pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens, dim / 2), cv, out,
                              nullptr);
                 }),
                 "keys.extent(2)=32"));
  CHECK(contains(error_message([&] { enc.encode(kv, cv, pqkv::make_view(codes.data(), heads, tokens, n - 1), nullptr); }),
                 "codes.extent(2)=5"));
  CHECK(contains(error_message([&] { enc.encode(kv, cv, pqkv::make_view(codes.data(), heads, tokens - 1, n), nullptr); }),
                 "codes.extent(1)"));
  CHECK(contains(error_message([&] { enc.encode(kv, cv, pqkv::make_view(codes.data(), heads + 1, tokens, n), nullptr); }),
                 "codes.extent(0)=3"));
  CHECK(contains(error_message([&] {
                   enc.encode(kv,
                              pqkv::rq_centroids_view<float const>{dc.data(), heads, index_t{2}, index_t{2},
                                                                   cfg.ksub(), cfg.dsub()},
                              out, nullptr);
                 }),
                 "centroids.extent(2)=2"));
  CHECK(contains(error_message([&] {
                   enc.encode(kv,
                              pqkv::rq_centroids_view<float const>{dc.data(), index_t{3}, index_t{2}, index_t{3},
                                                                   cfg.ksub(), cfg.dsub()},
                              out, nullptr);
                 }),
                 "centroids.extent(0)=3"));
  CHECK(contains(error_message([&] { enc.encode(pqkv::make_view(kf.data(), heads, tokens, dim), cv, out, nullptr); }),
                 "not device-accessible"));
  CHECK(contains(error_message([&] { enc.encode(kv, rq_view(cent.data(), cfg, heads), out, nullptr); }),
                 "centroids.data_handle() is not device-accessible"));
  CHECK(contains(error_message([&] {
                   enc.encode(kv, cv, pqkv::make_view(static_cast<std::uint8_t*>(nullptr), heads, tokens, n), nullptr);
                 }),
                 "codes.data_handle() is null"));
  CHECK(contains(error_message([&] { enc.encode(kv, rq_view(dc.data() + 1, cfg, heads), out, nullptr); }),
                 "16-byte aligned"));
  CHECK(contains(error_message([&] { enc.append(kv, cv, out, index_t{1}, nullptr); }), "exceeds codes.extent(1)"));
  CHECK(contains(error_message([&] { enc.append(kv, cv, out, index_t{-1}, nullptr); }), "position=-1"));
  index_t host_pos = 0;
  CHECK(contains(error_message([&] { enc.append(kv, cv, out, std::span<index_t const>{&host_pos, 1}, nullptr); }),
                 "position.data() is not device-accessible"));
  // 10-bit codes do not fit uint8
  auto const cfg10 = make_cfg(dim, 2, 3, 10);
  pqkv::gpu::rq_encoder const enc10{cfg10};
  pqkv::device_buffer<float> dc10(static_cast<std::size_t>(heads * cfg10.codes_per_row() * cfg10.ksub() * cfg10.dsub()));
  CHECK(contains(error_message([&] { enc10.encode(kv, rq_view(dc10.data(), cfg10, heads), out, nullptr); }),
                 "too narrow for bits=10"));
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const after = download(codes, codes.size());
  CHECK(std::all_of(after.begin(), after.end(), [](std::uint8_t c) { return c == 0x5A; }));
}

// ---- code attention ----------------------------------------------------------------------------

namespace {

template <class Code>
std::vector<Code> random_codes(std::size_t n, int bits, std::uint64_t seed)
{
  std::vector<Code> c(n);
  for (std::size_t i = 0; i < n; ++i) {
    c[i] = static_cast<Code>(pqkv::detail::random_below(seed, 0, i, std::uint64_t{1} << bits));
  }
  return c;
}

struct attn_case {
  pqkv::rq_config kcfg, vcfg;
  index_t kv_heads = 2, q_heads = 8, capacity = 600;
  bool kshared = false, vshared = false;
  float key_gain = 1.f;
  float scale = 0.f;
  pqkv::gpu::code_attention_limits limits{};
};

/// Host data of one attention case and the CPU contract's answer.
template <class KCode, class VCode>
struct attn_data {
  attn_case c;
  std::vector<float> q, kc, vc;
  std::vector<KCode> kcodes;
  std::vector<VCode> vcodes;

  attn_data(attn_case const& cs, std::uint64_t seed) : c{cs}
  {
    index_t const kh = c.kshared ? 1 : c.kv_heads, vh = c.vshared ? 1 : c.kv_heads;
    q = make_values(static_cast<std::size_t>(c.q_heads * c.kcfg.dim), seed);
    kc = make_centroids(c.kcfg, kh, seed + 1, false, 0.8f, c.key_gain);
    vc = make_centroids(c.vcfg, vh, seed + 2, false, 0.8f);
    kcodes = random_codes<KCode>(static_cast<std::size_t>(c.kv_heads * c.capacity * c.kcfg.codes_per_row()),
                                 c.kcfg.bits, seed + 3);
    vcodes = random_codes<VCode>(static_cast<std::size_t>(c.kv_heads * c.capacity * c.vcfg.codes_per_row()),
                                 c.vcfg.bits, seed + 4);
  }
  [[nodiscard]] auto kview() const
  {
    return pqkv::make_view(kcodes.data(), c.kv_heads, c.capacity, c.kcfg.codes_per_row());
  }
  [[nodiscard]] auto vview() const
  {
    return pqkv::make_view(vcodes.data(), c.kv_heads, c.capacity, c.vcfg.codes_per_row());
  }
  void cpu(index_t length, std::vector<float>& out, std::vector<float>& lse) const
  {
    out.assign(static_cast<std::size_t>(c.q_heads * c.vcfg.dim), 0.f);
    lse.assign(static_cast<std::size_t>(c.q_heads), 0.f);
    pqkv::cpu::code_attention(pqkv::query_view<float const>{pqkv::make_view(q.data(), c.q_heads, c.kcfg.dim)}, c.kcfg,
                              rq_view(kc.data(), c.kcfg, c.kshared ? 1 : c.kv_heads), kview(), c.vcfg,
                              rq_view(vc.data(), c.vcfg, c.vshared ? 1 : c.kv_heads), vview(), length,
                              pqkv::make_view(out.data(), c.q_heads, c.vcfg.dim), c.scale, std::span<float>{lse});
  }
};

/// Device copies of an attention case's inputs.
template <class KCode, class VCode>
struct attn_device {
  pqkv::device_buffer<float> q, kc, vc, out, lse;
  pqkv::device_buffer<KCode> kcodes;
  pqkv::device_buffer<VCode> vcodes;
  pqkv::device_buffer<std::byte> ws;
  explicit attn_device(attn_data<KCode, VCode> const& d, std::size_t ws_bytes)
    : q{upload(d.q)}, kc{upload(d.kc)}, vc{upload(d.vc)},
      out{static_cast<std::size_t>(d.c.q_heads * d.c.vcfg.dim)}, lse{static_cast<std::size_t>(d.c.q_heads)},
      kcodes{upload(d.kcodes)}, vcodes{upload(d.vcodes)}, ws{std::max<std::size_t>(ws_bytes, 1)}
  {
  }
  void poison() const
  {
    PQKV_CUDA_TRY(cudaMemset(out.data(), 0xFF, out.size_bytes()));  // NaN
    PQKV_CUDA_TRY(cudaMemset(lse.data(), 0xFF, lse.size_bytes()));
  }
};

/// The worst per-head relative L2 error of `got` against `want`, and the
/// worst lse error relative to max(1, |lse|); -inf lse must match exactly.
std::pair<double, double> attn_error(std::vector<float> const& got, std::vector<float> const& got_lse,
                                     std::vector<float> const& want, std::vector<float> const& want_lse,
                                     index_t q_heads, index_t dv)
{
  double worst = 0, worst_lse = 0;
  for (index_t h = 0; h < q_heads; ++h) {
    double num = 0, den = 0;
    for (index_t d = 0; d < dv; ++d) {
      double const g = got[static_cast<std::size_t>(h * dv + d)], w = want[static_cast<std::size_t>(h * dv + d)];
      if (!std::isfinite(g)) { return {std::numeric_limits<double>::infinity(), 0}; }
      num += (g - w) * (g - w);
      den += w * w;
    }
    worst = std::max(worst, den > 0 ? std::sqrt(num / den) : std::sqrt(num));
    double const gl = got_lse[static_cast<std::size_t>(h)], wl = want_lse[static_cast<std::size_t>(h)];
    if (std::isinf(wl) || std::isinf(gl)) {
      if (gl != wl) { worst_lse = std::numeric_limits<double>::infinity(); }
    } else {
      worst_lse = std::max(worst_lse, std::abs(gl - wl) / std::max(1.0, std::abs(wl)));
    }
  }
  return {worst, worst_lse};
}

constexpr double out_tol = 1e-4;  // the documented GPU-vs-CPU tolerance
constexpr double lse_tol = 1e-4;

template <class KCode, class VCode>
void check_attention(attn_case const& c, std::vector<index_t> const& lengths, std::uint64_t seed,
                     int expect_lut_shared = -1)
{
  CAPTURE(c.kcfg.stages);
  CAPTURE(c.kcfg.bits);
  CAPTURE(c.vcfg.stages);
  CAPTURE(c.vcfg.bits);
  CAPTURE(c.q_heads);
  CAPTURE(c.kv_heads);
  CAPTURE(c.capacity);
  attn_data<KCode, VCode> const d{c, seed};
  pqkv::gpu::code_attention const op{c.kcfg, c.vcfg, c.q_heads, c.kv_heads, c.limits, c.scale};
  if (expect_lut_shared >= 0) { CHECK(op.lut_in_shared_memory() == (expect_lut_shared == 1)); }
  attn_device<KCode, VCode> dev{d, op.workspace_bytes()};
  index_t const kh = c.kshared ? 1 : c.kv_heads, vh = c.vshared ? 1 : c.kv_heads, dv = c.vcfg.dim;
  for (index_t const length : lengths) {
    CAPTURE(length);
    std::vector<float> want, want_lse;
    d.cpu(length, want, want_lse);
    dev.poison();
    auto const run = [&] {
      op(pqkv::query_view<float const>{pqkv::make_view(static_cast<float const*>(dev.q.data()), c.q_heads, c.kcfg.dim)},
         rq_view(dev.kc.data(), c.kcfg, kh),
         pqkv::make_view(static_cast<KCode const*>(dev.kcodes.data()), c.kv_heads, c.capacity, c.kcfg.codes_per_row()),
         rq_view(dev.vc.data(), c.vcfg, vh),
         pqkv::make_view(static_cast<VCode const*>(dev.vcodes.data()), c.kv_heads, c.capacity, c.vcfg.codes_per_row()),
         length, pqkv::make_view(dev.out.data(), c.q_heads, dv), dev.lse.span(), dev.ws.span(), nullptr);
      PQKV_CUDA_TRY(cudaDeviceSynchronize());
    };
    run();
    auto const got = download(dev.out, dev.out.size());
    auto const hist_entries = static_cast<std::size_t>(c.q_heads / c.kv_heads * c.vcfg.codes_per_row() * c.vcfg.ksub());
    if (pqkv::detail::rq_gpu::int_hist_fits(hist_entries)) {  // the integer histogram: the same bits again
      run();
      CHECK(download(dev.out, dev.out.size()) == got);
    }
    auto const got_lse = download(dev.lse, dev.lse.size());
    auto const [err, err_lse] = attn_error(got, got_lse, want, want_lse, c.q_heads, dv);
    INFO("worst relative L2 output error ", err, ", worst lse error ", err_lse);
    CHECK(err <= out_tol);
    CHECK(err_lse <= lse_tol);
  }
}

/// Attention in double over rows [0, length) of reconstructed K, V.
void double_attention(std::vector<float> const& q, pqkv::host_tensor<float, 3> const& k,
                      pqkv::host_tensor<float, 3> const& v, index_t q_heads, index_t length, double scale,
                      std::vector<double>& out)
{
  index_t const kvh = k.extent(0), dim = k.extent(2), dv = v.extent(2), r = q_heads / kvh;
  out.assign(static_cast<std::size_t>(q_heads * dv), 0.0);
  for (index_t h = 0; h < q_heads; ++h) {
    index_t const g = h / r;
    std::vector<double> s(static_cast<std::size_t>(length));
    double mx = -1e300;
    for (index_t t = 0; t < length; ++t) {
      double dot = 0;
      for (index_t d = 0; d < dim; ++d) { dot += double{q[static_cast<std::size_t>(h * dim + d)]} * k.view()(g, t, d); }
      s[static_cast<std::size_t>(t)] = scale * dot;
      mx = std::max(mx, scale * dot);
    }
    double z = 0;
    for (index_t t = 0; t < length; ++t) {
      double const w = std::exp(s[static_cast<std::size_t>(t)] - mx);
      z += w;
      for (index_t d = 0; d < dv; ++d) { out[static_cast<std::size_t>(h * dv + d)] += w * v.view()(g, t, d); }
    }
    for (index_t d = 0; d < dv; ++d) { out[static_cast<std::size_t>(h * dv + d)] /= z; }
  }
}

attn_case case_8x8()
{
  attn_case c;
  c.kcfg = make_cfg(128, 1, 8, 8);
  c.vcfg = make_cfg(128, 1, 8, 8);
  return c;
}

}  // namespace

TEST_CASE("gpu code_attention: equals the CPU contract within the tolerance (uint8 codes)")
{
  PQKV_REQUIRE_GPU();
  SUBCASE("8+8 stages of 256, group 4, LUT in shared memory")
  {
    check_attention<std::uint8_t, std::uint8_t>(case_8x8(), {600, 1, 63, 64, 65, 513}, 101, 1);
  }
  SUBCASE("the same with the LUT read from the workspace")
  {
    auto c = case_8x8();
    c.limits.lut_in_shared = false;
    check_attention<std::uint8_t, std::uint8_t>(c, {600, 300}, 102, 0);
  }
  SUBCASE("splits 2 with permutations, shared codebooks, 6- and 5-bit, explicit scale, larger logits")
  {
    attn_case c;
    c.kcfg = make_cfg(128, 2, 4, 6, true);
    c.vcfg = make_cfg(128, 2, 3, 5, true);
    c.kshared = c.vshared = true;
    c.scale = 0.2f;
    c.key_gain = 2.f;
    check_attention<std::uint8_t, std::uint8_t>(c, {600, 257}, 103);
  }
  SUBCASE("group 1 and group 8; 16-entry codebooks; value dim 64 with 4 splits")
  {
    attn_case c;
    c.kcfg = make_cfg(64, 1, 16, 4);
    c.vcfg = make_cfg(64, 4, 2, 4);
    c.q_heads = 2;
    check_attention<std::uint8_t, std::uint8_t>(c, {600}, 104);
    c.q_heads = 16;
    check_attention<std::uint8_t, std::uint8_t>(c, {600}, 105);
  }
  SUBCASE("several chunks of several tiles (8 KV / 32 q heads, 16K tokens)")
  {
    auto c = case_8x8();
    c.kv_heads = 8;
    c.q_heads = 32;
    c.capacity = 16384;
    c.limits.blocks_per_sm = 1;
    check_attention<std::uint8_t, std::uint8_t>(c, {16384, 15000}, 106);
  }
}

TEST_CASE("gpu code_attention: uint16 codes and a VQKV-sized key LUT")
{
  PQKV_REQUIRE_GPU();
  SUBCASE("10-bit keys, 9-bit values, group 2")
  {
    attn_case c;
    c.kcfg = make_cfg(128, 1, 4, 10);
    c.vcfg = make_cfg(128, 1, 3, 9);
    c.q_heads = 4;
    check_attention<std::uint16_t, std::uint16_t>(c, {600, 77}, 111);
  }
  SUBCASE("uint8 keys with uint16 values and the reverse")
  {
    attn_case c;
    c.kcfg = make_cfg(128, 1, 3, 8);
    c.vcfg = make_cfg(128, 1, 2, 12);
    check_attention<std::uint8_t, std::uint16_t>(c, {600}, 112);
    std::swap(c.kcfg, c.vcfg);
    check_attention<std::uint16_t, std::uint8_t>(c, {600}, 113);
  }
  SUBCASE("VQKV point (1024 x 56; 512 x 16), shared codebooks: the LUT does not fit in shared memory")
  {
    attn_case c;
    c.kcfg = make_cfg(128, 1, 56, 10);
    c.vcfg = make_cfg(128, 1, 16, 9);
    c.kshared = c.vshared = true;
    c.key_gain = 0.3f;
    c.capacity = 700;
    check_attention<std::uint16_t, std::uint16_t>(c, {700}, 114, 0);
  }
}

TEST_CASE("gpu code_attention: within 1e-3 of double attention on the reconstructed K, V")
{
  PQKV_REQUIRE_GPU();
  auto c = case_8x8();
  c.kcfg = make_cfg(128, 2, 6, 8, true);
  index_t const length = 900;
  c.capacity = length;
  attn_data<std::uint8_t, std::uint8_t> const d{c, 121};
  pqkv::host_tensor<float, 3> k(c.kv_heads, c.capacity, c.kcfg.dim), v(c.kv_heads, c.capacity, c.vcfg.dim);
  pqkv::cpu::rq_reconstruct(c.kcfg, rq_view(d.kc.data(), c.kcfg, c.kv_heads), d.kview(), 0, k.view());
  pqkv::cpu::rq_reconstruct(c.vcfg, rq_view(d.vc.data(), c.vcfg, c.kv_heads), d.vview(), 0, v.view());
  std::vector<double> want;
  double const scale = static_cast<float>(1.0 / std::sqrt(128.0));
  double_attention(d.q, k, v, c.q_heads, length, scale, want);
  pqkv::gpu::code_attention const op{c.kcfg, c.vcfg, c.q_heads, c.kv_heads};
  attn_device<std::uint8_t, std::uint8_t> dev{d, op.workspace_bytes()};
  dev.poison();
  op(pqkv::query_view<float const>{pqkv::make_view(static_cast<float const*>(dev.q.data()), c.q_heads, c.kcfg.dim)},
     rq_view(dev.kc.data(), c.kcfg, c.kv_heads),
     pqkv::make_view(static_cast<std::uint8_t const*>(dev.kcodes.data()), c.kv_heads, c.capacity, c.kcfg.codes_per_row()),
     rq_view(dev.vc.data(), c.vcfg, c.kv_heads),
     pqkv::make_view(static_cast<std::uint8_t const*>(dev.vcodes.data()), c.kv_heads, c.capacity, c.vcfg.codes_per_row()),
     length, pqkv::make_view(dev.out.data(), c.q_heads, c.vcfg.dim), std::span<float>{}, dev.ws.span(), nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const got = download(dev.out, dev.out.size());
  double worst = 0;
  for (index_t h = 0; h < c.q_heads; ++h) {
    double num = 0, den = 0;
    for (index_t i = 0; i < c.vcfg.dim; ++i) {
      double const w = want[static_cast<std::size_t>(h * c.vcfg.dim + i)];
      double const g = got[static_cast<std::size_t>(h * c.vcfg.dim + i)];
      num += (g - w) * (g - w);
      den += w * w;
    }
    worst = std::max(worst, std::isfinite(num) ? std::sqrt(num / den) : 1e9);
  }
  INFO("worst relative L2 error against double attention ", worst);
  CHECK(worst <= 1e-3);
}

TEST_CASE("gpu code_attention: device length in a captured graph, replayed as the sequence grows")
{
  PQKV_REQUIRE_GPU();
  auto c = case_8x8();
  c.capacity = 2500;
  attn_data<std::uint8_t, std::uint8_t> const d{c, 131};
  pqkv::gpu::code_attention const op{c.kcfg, c.vcfg, c.q_heads, c.kv_heads};
  attn_device<std::uint8_t, std::uint8_t> dev{d, op.workspace_bytes()};
  pqkv::device_buffer<index_t> len(1);
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  pqkv::test::captured_graph const step(stream, [&] {
    op(pqkv::query_view<float const>{pqkv::make_view(static_cast<float const*>(dev.q.data()), c.q_heads, c.kcfg.dim)},
       rq_view(dev.kc.data(), c.kcfg, c.kv_heads),
       pqkv::make_view(static_cast<std::uint8_t const*>(dev.kcodes.data()), c.kv_heads, c.capacity, c.kcfg.codes_per_row()),
       rq_view(dev.vc.data(), c.vcfg, c.kv_heads),
       pqkv::make_view(static_cast<std::uint8_t const*>(dev.vcodes.data()), c.kv_heads, c.capacity, c.vcfg.codes_per_row()),
       std::span<index_t const>{len.data(), 1}, pqkv::make_view(dev.out.data(), c.q_heads, c.vcfg.dim), dev.lse.span(),
       dev.ws.span(), stream);
  });
  for (index_t const length : {index_t{0}, index_t{1}, index_t{700}, index_t{1024}, index_t{2500}}) {
    CAPTURE(length);
    std::vector<float> want, want_lse;
    d.cpu(length, want, want_lse);
    dev.poison();
    PQKV_CUDA_TRY(cudaMemcpyAsync(len.data(), &length, sizeof(index_t), cudaMemcpyHostToDevice, stream));
    step.launch(stream);
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    auto const got = download(dev.out, dev.out.size());
    auto const got_lse = download(dev.lse, dev.lse.size());
    if (length == 0) {
      CHECK(std::all_of(got.begin(), got.end(), [](float x) { return x == 0.f; }));
      CHECK(std::all_of(got_lse.begin(), got_lse.end(), [](float x) { return std::isinf(x) && x < 0; }));
      continue;
    }
    auto const [err, err_lse] = attn_error(got, got_lse, want, want_lse, c.q_heads, c.vcfg.dim);
    INFO("worst relative L2 output error ", err, ", worst lse error ", err_lse);
    CHECK(err <= out_tol);
    CHECK(err_lse <= lse_tol);
  }
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
}

TEST_CASE("gpu code_attention: bad inputs throw before any launch")
{
  PQKV_REQUIRE_GPU();
  auto const kcfg = make_cfg(128, 1, 4, 8), vcfg = make_cfg(128, 1, 4, 8);
  CHECK(contains(error_message([&] { pqkv::gpu::code_attention{kcfg, vcfg, 32, 2}; }), "q_heads / kv_heads=16"));
  CHECK(contains(error_message([&] { pqkv::gpu::code_attention{kcfg, vcfg, 6, 4}; }), "q_heads=6"));
  CHECK(contains(error_message([&] { pqkv::gpu::code_attention{kcfg, make_cfg(96, 1, 4, 8), 8, 2}; }),
                 "value_cfg dim / splits=96"));
  CHECK(contains(error_message([&] { pqkv::gpu::code_attention{kcfg, make_cfg(128, 1, 4, 16), 8, 2}; }),
                 "value histogram"));
  CHECK(contains(error_message([&] { pqkv::gpu::code_attention{kcfg, vcfg, 8, 2, {}, -1.f}; }), "scale=-1"));
  attn_case c = case_8x8();
  c.kcfg = kcfg;
  c.vcfg = vcfg;
  c.capacity = 100;
  c.limits.max_tokens = 100;
  attn_data<std::uint8_t, std::uint8_t> const d{c, 141};
  pqkv::gpu::code_attention const op{c.kcfg, c.vcfg, c.q_heads, c.kv_heads, c.limits};
  attn_device<std::uint8_t, std::uint8_t> dev{d, op.workspace_bytes()};
  pqkv::device_buffer<std::uint16_t> codes16(static_cast<std::size_t>(c.kv_heads * c.capacity * 4));
  dev.poison();
  auto const qv = pqkv::query_view<float const>{pqkv::make_view(static_cast<float const*>(dev.q.data()), c.q_heads, index_t{128})};
  auto const kcv = rq_view(dev.kc.data(), c.kcfg, c.kv_heads);
  auto const vcv = rq_view(dev.vc.data(), c.vcfg, c.kv_heads);
  auto const kc = pqkv::make_view(static_cast<std::uint8_t const*>(dev.kcodes.data()), c.kv_heads, c.capacity, index_t{4});
  auto const vc = pqkv::make_view(static_cast<std::uint8_t const*>(dev.vcodes.data()), c.kv_heads, c.capacity, index_t{4});
  auto const out = pqkv::make_view(dev.out.data(), c.q_heads, index_t{128});
  auto const ws = dev.ws.span();
  auto run = [&](auto&&... args) { return error_message([&] { op(args...); }); };
  CHECK(contains(run(qv, kcv, kc, vcv, vc, index_t{101}, out, dev.lse.span(), ws, cudaStream_t{}), "length=101"));
  CHECK(contains(run(qv, kcv, kc, vcv, vc, index_t{-1}, out, dev.lse.span(), ws, cudaStream_t{}), "length=-1"));
  CHECK(contains(run(qv, kcv, kc, vcv, vc, index_t{50}, out, dev.lse.span(), ws.first(ws.size() - 4), cudaStream_t{}),
                 "workspace.size()"));
  CHECK(contains(run(qv, kcv, kc, vcv, vc, index_t{50}, out, dev.lse.span().first(3), ws, cudaStream_t{}),
                 "lse.size()=3"));
  CHECK(contains(run(qv, kcv, kc, vcv, vc, index_t{50}, pqkv::make_view(dev.out.data(), c.q_heads, index_t{64}),
                     dev.lse.span(), ws, cudaStream_t{}),
                 "out extents"));
  CHECK(contains(run(pqkv::query_view<float const>{pqkv::make_view(d.q.data(), c.q_heads, index_t{128})}, kcv, kc, vcv,
                     vc, index_t{50}, out, dev.lse.span(), ws, cudaStream_t{}),
                 "q.data_handle() is not device-accessible"));
  CHECK(contains(run(qv, kcv,
                     pqkv::make_view(static_cast<std::uint8_t const*>(dev.kcodes.data()), c.kv_heads, c.capacity, index_t{3}),
                     vcv, vc, index_t{50}, out, dev.lse.span(), ws, cudaStream_t{}),
                 "key_codes.extent(2)=3"));
  CHECK(contains(run(qv, kcv, kc, vcv,
                     pqkv::make_view(static_cast<std::uint8_t const*>(dev.vcodes.data()), c.kv_heads, c.capacity - 1, index_t{4}),
                     index_t{50}, out, dev.lse.span(), ws, cudaStream_t{}),
                 "value_codes extents"));
  CHECK(contains(run(qv, rq_view(dev.kc.data(), c.kcfg, index_t{3}), kc, vcv, vc, index_t{50}, out, dev.lse.span(), ws,
                     cudaStream_t{}),
                 "centroids.extent(0)=3"));
  CHECK(contains(run(qv, kcv, kc, vcv, vc, index_t{50}, out, dev.lse.span(), ws.subspan(16), cudaStream_t{}),
                 "workspace"));
  index_t host_len = 10;
  CHECK(contains(run(qv, kcv, kc, vcv, vc, std::span<index_t const>{&host_len, 1}, out, dev.lse.span(), ws, cudaStream_t{}),
                 "length.data() is not device-accessible"));
  // capacity over the limits
  pqkv::device_buffer<std::uint8_t> big(static_cast<std::size_t>(c.kv_heads * 200 * 4));
  auto const bigv = pqkv::make_view(static_cast<std::uint8_t const*>(big.data()), c.kv_heads, index_t{200}, index_t{4});
  CHECK(contains(run(qv, kcv, bigv, vcv, bigv, index_t{50}, out, dev.lse.span(), ws, cudaStream_t{}),
                 "exceeds limits.max_tokens=100"));
  // 10-bit keys need uint16 codes
  auto const k10 = make_cfg(128, 1, 4, 10);
  pqkv::gpu::code_attention const op10{k10, vcfg, c.q_heads, c.kv_heads, c.limits};
  pqkv::device_buffer<std::byte> ws10(op10.workspace_bytes());
  CHECK(contains(error_message([&] {
                   op10(qv, rq_view(dev.kc.data(), k10, c.kv_heads), kc, vcv, vc, index_t{50}, out, dev.lse.span(),
                        ws10.span(), cudaStream_t{});
                 }),
                 "too narrow for bits=10"));
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const after = download(dev.out, dev.out.size());
  CHECK(std::all_of(after.begin(), after.end(), [](float x) { return std::isnan(x); }));
  auto const after_lse = download(dev.lse, dev.lse.size());
  CHECK(std::all_of(after_lse.begin(), after_lse.end(), [](float x) { return std::isnan(x); }));
}

// ---- reconstruction ----------------------------------------------------------------------------

namespace {

/// Range and index-list reconstruction on both sides; the bytes must match.
template <class Code, class Out>
void check_reconstruct(pqkv::rq_config const& cfg, index_t heads, index_t tokens, bool shared, bool nhd,
                       std::uint64_t seed)
{
  CAPTURE(cfg.splits);
  CAPTURE(cfg.bits);
  CAPTURE(shared);
  CAPTURE(nhd);
  CAPTURE(sizeof(Out));
  index_t const dim = cfg.dim, n = cfg.codes_per_row(), cbh = shared ? 1 : heads, first = 5, count = tokens - 9;
  auto const cent = make_centroids(cfg, cbh, seed, false);
  auto const codes = random_codes<Code>(static_cast<std::size_t>(heads * tokens * n), cfg.bits, seed + 1);
  index_t const k = 37;
  std::vector<std::int32_t> idx(static_cast<std::size_t>(heads * k));
  for (std::size_t i = 0; i < idx.size(); ++i) {
    idx[i] = i % 5 == 3 ? -1 : static_cast<std::int32_t>(pqkv::detail::random_below(seed + 2, 0, i, static_cast<std::uint64_t>(tokens)));
  }
  auto const cview = pqkv::make_view(codes.data(), heads, tokens, n);
  auto out_view = [&](Out* p, index_t rows) {
    return nhd ? pqkv::make_strided_view<Out, 3>(p, {heads, rows, dim}, {dim, heads * dim, 1})
               : pqkv::make_strided_view<Out, 3>(p, {heads, rows, dim}, {rows * dim, dim, 1});
  };
  std::vector<Out> want(static_cast<std::size_t>(heads * count * dim)), want_idx(static_cast<std::size_t>(heads * k * dim));
  pqkv::cpu::rq_reconstruct(cfg, rq_view(cent.data(), cfg, cbh), cview, first, out_view(want.data(), count));
  pqkv::cpu::rq_reconstruct_indices(cfg, rq_view(cent.data(), cfg, cbh), cview,
                                    pqkv::make_view(static_cast<std::int32_t const*>(idx.data()), heads, k),
                                    out_view(want_idx.data(), k));
  auto dc = upload(cent);
  auto dcodes = upload(codes);
  auto didx = upload(idx);
  pqkv::device_buffer<Out> got(want.size()), got_idx(want_idx.size());
  PQKV_CUDA_TRY(cudaMemset(got.data(), 0x7F, got.size_bytes()));
  PQKV_CUDA_TRY(cudaMemset(got_idx.data(), 0x7F, got_idx.size_bytes()));
  auto const dview = pqkv::make_view(static_cast<Code const*>(dcodes.data()), heads, tokens, n);
  pqkv::gpu::rq_reconstruct(cfg, rq_view(dc.data(), cfg, cbh), dview, first, out_view(got.data(), count), nullptr);
  pqkv::gpu::rq_reconstruct_indices(cfg, rq_view(dc.data(), cfg, cbh), dview,
                                    pqkv::make_view(static_cast<std::int32_t const*>(didx.data()), heads, k),
                                    out_view(got_idx.data(), k), nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const g = download(got, got.size());
  auto const gi = download(got_idx, got_idx.size());
  CHECK(std::memcmp(g.data(), want.data(), want.size() * sizeof(Out)) == 0);
  CHECK(std::memcmp(gi.data(), want_idx.data(), want_idx.size() * sizeof(Out)) == 0);

  // Paged: the same lists into pages [num_pages, P, heads, dim] through a
  // block table (logical page p on physical page num_pages - 1 - p); NHD, or
  // HND seen through strides.
  index_t const page = 8, logical = (tokens + page - 1) / page, num_pages = logical + 2;
  std::vector<std::int32_t> table(static_cast<std::size_t>(logical));
  for (index_t p = 0; p < logical; ++p) { table[static_cast<std::size_t>(p)] = static_cast<std::int32_t>(num_pages - 1 - p); }
  auto pages_view = [&](Out* p) {
    return nhd ? pqkv::make_strided_view<Out, 4>(p, {num_pages, page, heads, dim}, {page * heads * dim, heads * dim, dim, 1})
               : pqkv::make_strided_view<Out, 4>(p, {num_pages, page, heads, dim}, {heads * page * dim, dim, page * dim, 1});
  };
  auto const idx_view = [&](std::int32_t const* p) { return pqkv::make_view(p, heads, k); };
  std::vector<Out> want_pages(static_cast<std::size_t>(num_pages * page * heads * dim), pqkv::from_float<Out>(5.f));
  auto want_holes = want_pages;
  pqkv::cpu::rq_reconstruct_paged(cfg, rq_view(cent.data(), cfg, cbh), cview, idx_view(idx.data()), table,
                                  pages_view(want_pages.data()));
  // On the GPU, entries it cannot use are skipped: logical page 0 unmapped (-1),
  // page 1 mapped past the pages, and an index past the tokens.
  auto holes = table;
  holes[0] = -1;
  holes[1] = static_cast<std::int32_t>(num_pages);
  auto idx_bad = idx;
  idx_bad[1] = static_cast<std::int32_t>(tokens);
  auto idx_kept = idx;
  for (auto& t : idx_kept) { t = (t >= 0 && t < 2 * page) ? -1 : t; }
  idx_kept[1] = -1;
  pqkv::cpu::rq_reconstruct_paged(cfg, rq_view(cent.data(), cfg, cbh), cview, idx_view(idx_kept.data()), table,
                                  pages_view(want_holes.data()));
  auto dpages = upload(std::vector<Out>(want_pages.size(), pqkv::from_float<Out>(5.f)));
  auto dholes = upload(std::vector<Out>(want_pages.size(), pqkv::from_float<Out>(5.f)));
  auto const dtable = upload(table), dholes_table = upload(holes);
  auto const didx_bad = upload(idx_bad);
  pqkv::gpu::rq_reconstruct_paged(cfg, rq_view(dc.data(), cfg, cbh), dview, idx_view(didx.data()),
                                  std::span<std::int32_t const>{dtable.data(), table.size()}, pages_view(dpages.data()),
                                  nullptr);
  pqkv::gpu::rq_reconstruct_paged(cfg, rq_view(dc.data(), cfg, cbh), dview, idx_view(didx_bad.data()),
                                  std::span<std::int32_t const>{dholes_table.data(), holes.size()},
                                  pages_view(dholes.data()), nullptr);
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  CHECK(std::memcmp(download(dpages, want_pages.size()).data(), want_pages.data(), want_pages.size() * sizeof(Out)) == 0);
  CHECK(std::memcmp(download(dholes, want_holes.size()).data(), want_holes.data(), want_holes.size() * sizeof(Out)) == 0);
  // Bad shapes throw before the launch.
  CHECK(contains(error_message([&] {
                   pqkv::gpu::rq_reconstruct_paged(
                     cfg, rq_view(dc.data(), cfg, cbh), dview, idx_view(didx.data()),
                     std::span<std::int32_t const>{dtable.data(), table.size()},
                     pqkv::make_strided_view<Out, 4>(dpages.data(), {num_pages, page, heads + 1, dim},
                                                     {page * heads * dim, heads * dim, dim, 1}),
                     nullptr);
                 }),
                 "pages extents"));
  CHECK(contains(error_message([&] {
                   pqkv::gpu::rq_reconstruct_paged(cfg, rq_view(dc.data(), cfg, cbh), dview, idx_view(didx.data()),
                                                   std::span<std::int32_t const>{table}, pages_view(dpages.data()),
                                                   nullptr);
                 }),
                 "block_table.data() is not device-accessible"));
}

}  // namespace

TEST_CASE("gpu rq_reconstruct: rows, index lists and pages equal the CPU's bit for bit")
{
  PQKV_REQUIRE_GPU();
  check_reconstruct<std::uint8_t, float>(make_cfg(128, 1, 8, 8), 2, 100, false, false, 151);
  check_reconstruct<std::uint8_t, __half>(make_cfg(128, 2, 4, 6, true), 3, 90, true, true, 152);
  check_reconstruct<std::uint16_t, __nv_bfloat16>(make_cfg(128, 1, 5, 10), 2, 80, false, false, 153);
  check_reconstruct<std::uint16_t, float>(make_cfg(64, 4, 3, 16), 2, 40, true, true, 154);
  check_reconstruct<std::uint16_t, __half>(make_cfg(128, 1, 3, 8), 2, 60, false, false, 155);
  // Enough rows for several row blocks of the sliced kernel (a 192 KB codebook slice).
  check_reconstruct<std::uint8_t, __nv_bfloat16>(make_cfg(128, 1, 12, 8), 2, 3001, true, false, 156);
}

TEST_CASE("gpu rq_reconstruct: bad inputs throw before the launch")
{
  PQKV_REQUIRE_GPU();
  auto const cfg = make_cfg(64, 2, 3, 6);
  index_t const heads = 2, tokens = 30, n = cfg.codes_per_row();
  auto const cent = make_centroids(cfg, heads, 161, false);
  auto dc = upload(cent);
  pqkv::device_buffer<std::uint8_t> codes(static_cast<std::size_t>(heads * tokens * n));
  PQKV_CUDA_TRY(cudaMemset(codes.data(), 1, codes.size_bytes()));
  pqkv::device_buffer<float> out(static_cast<std::size_t>(heads * tokens * 64));
  PQKV_CUDA_TRY(cudaMemset(out.data(), 0xFF, out.size_bytes()));
  auto const cv = rq_view(dc.data(), cfg, heads);
  auto const codes_v = pqkv::make_view(static_cast<std::uint8_t const*>(codes.data()), heads, tokens, n);
  auto const out_v = pqkv::make_view(out.data(), heads, index_t{10}, index_t{64});
  CHECK(contains(error_message([&] { pqkv::gpu::rq_reconstruct(cfg, cv, codes_v, index_t{25}, out_v, nullptr); }),
                 "first=25"));
  CHECK(contains(error_message([&] {
                   pqkv::gpu::rq_reconstruct(cfg, cv, codes_v, index_t{0},
                                             pqkv::make_view(out.data(), heads, index_t{10}, index_t{32}), nullptr);
                 }),
                 "out.extent(2)=32"));
  CHECK(contains(error_message([&] {
                   pqkv::gpu::rq_reconstruct(cfg, cv, pqkv::make_view(static_cast<std::uint8_t const*>(codes.data()), heads, tokens, n - 1),
                                             index_t{0}, out_v, nullptr);
                 }),
                 "codes.extent(2)=5"));
  std::vector<float> host(out.size());
  CHECK(contains(error_message([&] {
                   pqkv::gpu::rq_reconstruct(cfg, cv, codes_v, index_t{0},
                                             pqkv::make_view(host.data(), heads, index_t{10}, index_t{64}), nullptr);
                 }),
                 "out.data_handle() is not device-accessible"));
  pqkv::device_buffer<std::int32_t> idx(static_cast<std::size_t>(heads * 7));
  CHECK(contains(error_message([&] {
                   pqkv::gpu::rq_reconstruct_indices(cfg, cv, codes_v,
                                                     pqkv::make_view(static_cast<std::int32_t const*>(idx.data()), heads, index_t{7}),
                                                     out_v, nullptr);
                 }),
                 "indices.extent(1)=7"));
  auto const cfg10 = make_cfg(64, 2, 3, 10);
  CHECK(contains(error_message([&] { pqkv::gpu::rq_reconstruct(cfg10, cv, codes_v, index_t{0}, out_v, nullptr); }),
                 "too narrow for bits=10"));
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const after = download(out, out.size());
  CHECK(std::all_of(after.begin(), after.end(), [](float x) { return std::isnan(x); }));
}
