// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::pq_encoder against pqkv::cpu::pq_encoder: identical codes for
// float / half / bf16 and strided keys over m and nbits (including planted
// exact ties); append (host or device position, graph replay) equals one
// full encode; bad inputs throw before any launch. The tensor-core path
// equals the FP32 path and the CPU bit for bit on random and adversarial
// keys (near-tied centroids that force its exact fallback, which is counted;
// groups of near ties re-checked exactly; a large common offset; huge rows
// whose bound overflows), float / half / bf16, tokens not a multiple of 16.
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/random.hpp>
#include <pqkv/encode/encode.cuh>
#include <pqkv/encode/encode.hpp>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"
#include "common/test_util.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::contains;
using pqkv::test::error_message;

using pqkv::test::download;
using pqkv::test::upload;

std::vector<float> make_values(std::size_t n, std::uint64_t seed)
{
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) { v[i] = pqkv::test::noise(seed, i); }
  return v;
}

pqkv::pq_config config_of(index_t dim, index_t m, int nbits)
{
  pqkv::pq_config cfg;
  cfg.dim = dim;
  cfg.m = m;
  cfg.nbits = nbits;
  return cfg;
}

template <class Key>
std::vector<Key> convert(std::vector<float> const& v)
{
  std::vector<Key> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) { out[i] = pqkv::from_float<Key>(v[i]); }
  return out;
}

template <class Key>
void check_equal_to_cpu(index_t heads, index_t tokens, index_t dim, index_t m, int nbits, std::uint64_t seed)
{
  auto const cfg = config_of(dim, m, nbits);
  auto const kf = make_values(static_cast<std::size_t>(heads * tokens * dim), seed);
  auto const keys = convert<Key>(kf);
  auto cent = make_values(static_cast<std::size_t>(heads * m * cfg.ksub() * cfg.dsub()), seed + 1);
  // Plant exact ties: centroid k + 1 repeats centroid k for every fourth k.
  for (index_t p = 0; p < heads * m; ++p) {
    for (index_t k = 0; k + 1 < cfg.ksub(); k += 4) {
      std::copy_n(cent.begin() + (p * cfg.ksub() + k) * cfg.dsub(), cfg.dsub(),
                  cent.begin() + (p * cfg.ksub() + k + 1) * cfg.dsub());
    }
  }
  std::vector<std::uint8_t> cpu(static_cast<std::size_t>(heads * tokens * m), 0);
  pqkv::cpu::pq_encoder{cfg}.encode(pqkv::make_view(keys.data(), heads, tokens, dim),
                                    pqkv::make_view(static_cast<float const*>(cent.data()), heads, m, cfg.ksub(), cfg.dsub()),
                                    pqkv::make_view(cpu.data(), heads, tokens, m));
  auto dk = upload(keys);
  auto dc = upload(cent);
  pqkv::device_buffer<std::uint8_t> dcodes(cpu.size());
  PQKV_CUDA_TRY(cudaMemset(dcodes.data(), 0xEE, dcodes.size()));  // poison
  pqkv::gpu::pq_encoder const enc{cfg};
  enc.encode(pqkv::make_view(static_cast<Key const*>(dk.data()), heads, tokens, dim),
             pqkv::make_view(static_cast<float const*>(dc.data()), heads, m, cfg.ksub(), cfg.dsub()),
             pqkv::make_view(dcodes.data(), heads, tokens, m), nullptr);
  CHECK(download(dcodes, cpu.size()) == cpu);
}

/// "" when equal, else the first (head, token, subspace) that differs and both codes.
std::string first_code_difference(std::vector<std::uint8_t> const& got, std::vector<std::uint8_t> const& want,
                                  index_t tokens, index_t m)
{
  if (got.size() != want.size()) { return "sizes differ"; }
  for (std::size_t e = 0; e < got.size(); ++e) {
    if (got[e] != want[e]) {
      auto const i = static_cast<index_t>(e);
      return "head " + std::to_string(i / (tokens * m)) + " token " + std::to_string(i / m % tokens) + " subspace " +
             std::to_string(i % m) + ": got " + std::to_string(got[e]) + ", want " + std::to_string(want[e]);
    }
  }
  return "";
}

/// Codes of the CPU encoder and of the GPU encoder on both paths, and the
/// rows the tensor-core path sent to its exact fallback.
struct path_codes {
  std::vector<std::uint8_t> cpu, simt, tc;
  unsigned long long fallbacks = 0;
};

template <class Key>
path_codes encode_paths(pqkv::pq_config const& cfg, index_t heads, index_t tokens, std::vector<float> const& kf,
                        std::vector<float> const& cent)
{
  auto const keys = convert<Key>(kf);
  path_codes r;
  r.cpu.assign(static_cast<std::size_t>(heads * tokens * cfg.m), 0);
  pqkv::cpu::pq_encoder{cfg}.encode(pqkv::make_view(keys.data(), heads, tokens, cfg.dim),
                                    pqkv::make_view(cent.data(), heads, cfg.m, cfg.ksub(), cfg.dsub()),
                                    pqkv::make_view(r.cpu.data(), heads, tokens, cfg.m));
  auto dk = upload(keys);
  auto dc = upload(cent);
  pqkv::device_buffer<unsigned long long> counter(1);
  PQKV_CUDA_TRY(cudaMemset(counter.data(), 0, sizeof(unsigned long long)));
  auto const kv = pqkv::make_view(static_cast<Key const*>(dk.data()), heads, tokens, cfg.dim);
  auto const cv = pqkv::make_view(static_cast<float const*>(dc.data()), heads, cfg.m, cfg.ksub(), cfg.dsub());
  pqkv::device_buffer<std::uint8_t> dcodes(r.cpu.size());
  for (auto const path : {pqkv::gpu::assign_path::simt, pqkv::gpu::assign_path::tensor_core}) {
    PQKV_CUDA_TRY(cudaMemset(dcodes.data(), 0xEE, dcodes.size()));
    pqkv::gpu::pq_encoder const enc{cfg, {.path = path, .fallback_counter = counter.data()}};
    REQUIRE(enc.uses_tensor_cores(tokens) == (path == pqkv::gpu::assign_path::tensor_core));
    enc.encode(kv, cv, pqkv::make_view(dcodes.data(), heads, tokens, cfg.m), nullptr);
    (path == pqkv::gpu::assign_path::simt ? r.simt : r.tc) = download(dcodes, dcodes.size());
  }
  PQKV_CUDA_TRY(cudaMemcpy(&r.fallbacks, counter.data(), sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  return r;
}

/// Checks TC == SIMT == CPU; returns the fallback count.
template <class Key>
unsigned long long check_paths(pqkv::pq_config const& cfg, index_t heads, index_t tokens, std::vector<float> const& kf,
                               std::vector<float> const& cent)
{
  auto const r = encode_paths<Key>(cfg, heads, tokens, kf, cent);
  CHECK_MESSAGE(first_code_difference(r.simt, r.cpu, tokens, cfg.m) == "", "simt vs cpu");
  CHECK_MESSAGE(first_code_difference(r.tc, r.cpu, tokens, cfg.m) == "", "tensor cores vs cpu");
  return r.fallbacks;
}

/// Centroids [heads, m, ksub, dsub]: groups of `group` near-copies of a random
/// base (relative perturbation `rel`); group = ksub makes every centroid of a
/// problem a near tie of every other.
std::vector<float> near_copies(pqkv::pq_config const& cfg, index_t heads, index_t group, float rel, std::uint64_t seed)
{
  index_t const ksub = cfg.ksub(), dsub = cfg.dsub();
  std::vector<float> c(static_cast<std::size_t>(heads * cfg.m * ksub * dsub));
  for (index_t p = 0; p < heads * cfg.m; ++p) {
    for (index_t k = 0; k < ksub; ++k) {
      index_t const base = p * ksub + k / group * group;
      for (index_t j = 0; j < dsub; ++j) {
        float const b = pqkv::test::noise(seed, static_cast<std::uint64_t>(base * dsub + j));
        float const e = pqkv::test::noise(seed + 1, static_cast<std::uint64_t>((p * ksub + k) * dsub + j));
        c[static_cast<std::size_t>((p * ksub + k) * dsub + j)] = b + rel * e * (1.f + std::abs(b));
      }
    }
  }
  return c;
}

}  // namespace

TEST_CASE("gpu encoder: codes equal the CPU encoder's")
{
  PQKV_REQUIRE_GPU();
  struct shape {
    index_t dim, m;
    int nbits;
  };
  for (auto const sh : {shape{128, 1, 8}, shape{128, 2, 6}, shape{128, 4, 1}, shape{128, 8, 8}, shape{128, 16, 7},
                        shape{128, 32, 8}, shape{64, 2, 5}, shape{32, 8, 3}}) {
    CAPTURE(sh.m);
    CAPTURE(sh.nbits);
    check_equal_to_cpu<float>(2, 333, sh.dim, sh.m, sh.nbits, 7 + static_cast<std::uint64_t>(sh.m));
  }
  check_equal_to_cpu<__half>(3, 200, 128, 8, 8, 17);
  check_equal_to_cpu<__nv_bfloat16>(3, 200, 128, 16, 6, 18);
}

TEST_CASE("gpu encoder: strided keys")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 3, tokens = 257, dim = 64, m = 4;
  auto const cfg = config_of(dim, m, 6);
  auto const kf = make_values(static_cast<std::size_t>(heads * tokens * dim), 3);
  auto const cent = make_values(static_cast<std::size_t>(heads * m * cfg.ksub() * cfg.dsub()), 4);
  std::vector<std::uint8_t> cpu(static_cast<std::size_t>(heads * tokens * m));
  // NHD storage [tokens, heads, dim] seen as [heads, tokens, dim]
  auto const strides = std::array<index_t, 3>{dim, heads * dim, 1};
  pqkv::cpu::pq_encoder{cfg}.encode(pqkv::make_strided_view<float const, 3>(kf.data(), {heads, tokens, dim}, {dim, heads * dim, 1}),
                                    pqkv::make_view(static_cast<float const*>(cent.data()), heads, m, cfg.ksub(), cfg.dsub()),
                                    pqkv::make_view(cpu.data(), heads, tokens, m));
  auto dk = upload(kf);
  auto dc = upload(cent);
  pqkv::device_buffer<std::uint8_t> dcodes(cpu.size());
  pqkv::gpu::pq_encoder{cfg}.encode(
    pqkv::make_strided_view<float const, 3>(dk.data(), {heads, tokens, dim}, {strides[0], strides[1], strides[2]}),
    pqkv::make_view(static_cast<float const*>(dc.data()), heads, m, cfg.ksub(), cfg.dsub()),
    pqkv::make_view(dcodes.data(), heads, tokens, m), nullptr);
  CHECK(download(dcodes, cpu.size()) == cpu);
}

TEST_CASE("gpu encoder: append equals a full encode (host position, device position, graph replay)")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 150, dim = 128, m = 8, cap = 160;
  auto const cfg = config_of(dim, m, 8);
  auto const kf = make_values(static_cast<std::size_t>(heads * tokens * dim), 5);
  auto const cent = make_values(static_cast<std::size_t>(heads * m * cfg.ksub() * cfg.dsub()), 6);
  auto dk = upload(kf);
  auto dc = upload(cent);
  pqkv::gpu::pq_encoder const enc{cfg};
  auto const cv = pqkv::make_view(static_cast<float const*>(dc.data()), heads, m, cfg.ksub(), cfg.dsub());
  pqkv::device_buffer<std::uint8_t> full(static_cast<std::size_t>(heads * tokens * m));
  enc.encode(pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens, dim), cv,
             pqkv::make_view(full.data(), heads, tokens, m), nullptr);
  auto const ref = download(full, full.size());
  // the first 100 tokens as a prefill, the rest appended
  auto token_slice = [&](index_t t0, index_t count) {
    return pqkv::make_strided_view<float const, 3>(dk.data() + t0 * dim, {heads, count, dim}, {tokens * dim, dim, 1});
  };
  auto check_rows = [&](std::vector<std::uint8_t> const& got) {
    for (index_t h = 0; h < heads; ++h) {
      for (index_t t = 0; t < tokens; ++t) {
        for (index_t s = 0; s < m; ++s) {
          if (got[static_cast<std::size_t>((h * cap + t) * m + s)] != ref[static_cast<std::size_t>((h * tokens + t) * m + s)]) {
            FAIL("code (", h, ", ", t, ", ", s, ") differs");
          }
        }
      }
      for (index_t t = tokens; t < cap; ++t) {
        CHECK(got[static_cast<std::size_t>((h * cap + t) * m)] == 0xEE);  // untouched
      }
    }
  };
  pqkv::device_buffer<std::uint8_t> codes(static_cast<std::size_t>(heads * cap * m));
  auto const codes_v = pqkv::make_view(codes.data(), heads, cap, m);
  SUBCASE("encode into a buffer with more rows than the keys")
  {
    PQKV_CUDA_TRY(cudaMemset(codes.data(), 0xEE, codes.size()));
    enc.encode(pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens, dim), cv, codes_v, nullptr);
    check_rows(download(codes, codes.size()));
  }
  SUBCASE("host position, a few tokens at a time")
  {
    PQKV_CUDA_TRY(cudaMemset(codes.data(), 0xEE, codes.size()));
    enc.append(token_slice(0, 100), cv, codes_v, index_t{0}, nullptr);
    for (index_t t = 100; t < tokens; t += 3) {
      enc.append(token_slice(t, std::min<index_t>(3, tokens - t)), cv, codes_v, t, nullptr);
    }
    check_rows(download(codes, codes.size()));
  }
  SUBCASE("device position, one token per step, captured once and replayed")
  {
    PQKV_CUDA_TRY(cudaMemset(codes.data(), 0xEE, codes.size()));
    enc.append(token_slice(0, 100), cv, codes_v, index_t{0}, nullptr);
    // the new token's key is copied into a fixed staging buffer, as a decode step would
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
        PQKV_CUDA_TRY(cudaMemcpyAsync(staging.data() + h * dim, dk.data() + (h * tokens + t) * dim, dim * sizeof(float),
                                      cudaMemcpyDeviceToDevice, stream));
      }
      PQKV_CUDA_TRY(cudaMemcpyAsync(pos.data(), &t, sizeof(index_t), cudaMemcpyHostToDevice, stream));
      step.launch(stream);
      PQKV_CUDA_TRY(cudaStreamSynchronize(stream));  // `t` is read by the copy above
    }
    // a device position past the capacity writes nothing
    index_t const bad = cap;
    PQKV_CUDA_TRY(cudaMemcpyAsync(pos.data(), &bad, sizeof(index_t), cudaMemcpyHostToDevice, stream));
    step.launch(stream);
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    check_rows(download(codes, codes.size()));
    PQKV_CUDA_TRY(cudaStreamDestroy(stream));
  }
}

TEST_CASE("gpu encoder: the tensor-core path equals the FP32 path and the CPU")
{
  PQKV_REQUIRE_GPU();
  struct shape {
    index_t dim, m;
    int nbits;
  };
  index_t const heads = 2;
  SUBCASE("random keys, several (m, nbits), float / half / bf16")
  {
    for (auto const sh : {shape{128, 1, 8}, shape{128, 2, 6}, shape{128, 8, 8}, shape{64, 2, 5}, shape{128, 4, 4},
                          shape{32, 2, 7}, shape{128, 8, 6}}) {
      CAPTURE(sh.dim);
      CAPTURE(sh.m);
      CAPTURE(sh.nbits);
      auto const cfg = config_of(sh.dim, sh.m, sh.nbits);
      index_t const tokens = 333;  // not a multiple of the 16-row tile
      auto const kf = make_values(static_cast<std::size_t>(heads * tokens * sh.dim), 40 + static_cast<std::uint64_t>(sh.m));
      auto cent = make_values(static_cast<std::size_t>(heads * sh.m * cfg.ksub() * cfg.dsub()), 41);
      // planted exact ties: centroid k + 1 repeats centroid k for every third k
      for (index_t p = 0; p < heads * sh.m; ++p) {
        for (index_t k = 0; k + 1 < cfg.ksub(); k += 3) {
          std::copy_n(cent.begin() + (p * cfg.ksub() + k) * cfg.dsub(), cfg.dsub(),
                      cent.begin() + (p * cfg.ksub() + k + 1) * cfg.dsub());
        }
      }
      check_paths<float>(cfg, heads, tokens, kf, cent);
      check_paths<__half>(cfg, heads, 37, kf, cent);
      check_paths<__nv_bfloat16>(cfg, heads, 37, kf, cent);
    }
  }
  SUBCASE("every centroid a near tie: every row takes the exact fallback")
  {
    for (auto const sh : {shape{128, 8, 8}, shape{128, 2, 5}, shape{128, 1, 6}}) {
      CAPTURE(sh.m);
      CAPTURE(sh.nbits);
      auto const cfg = config_of(sh.dim, sh.m, sh.nbits);
      index_t const tokens = 45;
      auto const kf = make_values(static_cast<std::size_t>(heads * tokens * sh.dim), 50);
      auto const cent = near_copies(cfg, heads, cfg.ksub(), 0x1p-18f, 51);
      CHECK(check_paths<float>(cfg, heads, tokens, kf, cent) == static_cast<unsigned long long>(heads * tokens * sh.m));
    }
  }
  SUBCASE("groups of four near ties: re-checked exactly, few fallbacks")
  {
    for (auto const sh : {shape{128, 8, 8}, shape{128, 2, 6}}) {
      CAPTURE(sh.m);
      auto const cfg = config_of(sh.dim, sh.m, sh.nbits);
      index_t const tokens = 301;
      auto const kf = make_values(static_cast<std::size_t>(heads * tokens * sh.dim), 60);
      auto const cent = near_copies(cfg, heads, 4, 0x1p-20f, 61);
      auto const fb = check_paths<float>(cfg, heads, tokens, kf, cent);
      CHECK(fb < static_cast<unsigned long long>(heads * tokens * sh.m));
      MESSAGE("fallback rows: ", fb, " of ", heads * tokens * sh.m);
    }
  }
  SUBCASE("a large common offset and huge rows")
  {
    auto const cfg = config_of(128, 2, 8);
    index_t const tokens = 200;
    auto kf = make_values(static_cast<std::size_t>(heads * tokens * 128), 70);
    auto cent = make_values(static_cast<std::size_t>(heads * 2 * cfg.ksub() * cfg.dsub()), 71);
    for (auto& v : kf) { v += 1000.f; }
    for (auto& v : cent) { v += 1000.f; }
    check_paths<float>(cfg, heads, tokens, kf, cent);
    // rows 0..9 of head 0 at 3e18: distances overflow, the bound is not finite
    for (std::size_t e = 0; e < 10 * 128; ++e) { kf[e] = 3e18f; }
    CHECK(check_paths<float>(cfg, heads, tokens, kf, cent) >= 20);
  }
  SUBCASE("forcing the tensor cores where they are not built throws")
  {
    CHECK(contains(error_message([&] {
                     pqkv::gpu::pq_encoder{config_of(128, 16, 8), {.path = pqkv::gpu::assign_path::tensor_core}};
                   }),
                   "assign_path::tensor_core"));
    CHECK(!pqkv::gpu::pq_encoder{config_of(128, 16, 8)}.uses_tensor_cores(1000));   // dsub 8: FP32
    CHECK(!pqkv::gpu::pq_encoder{config_of(128, 8, 8)}.uses_tensor_cores(1000));    // automatic: FP32 (measured faster)
    CHECK(!pqkv::gpu::pq_encoder{config_of(128, 8, 8)}.uses_tensor_cores(3));       // a decode step: FP32
  }
}

TEST_CASE("gpu encoder: tensor-core append equals a full encode")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 90, dim = 128, m = 8, cap = 100;
  auto const cfg = config_of(dim, m, 8);
  auto const kf = make_values(static_cast<std::size_t>(heads * tokens * dim), 80);
  auto const cent = make_values(static_cast<std::size_t>(heads * m * cfg.ksub() * cfg.dsub()), 81);
  auto dk = upload(kf);
  auto dc = upload(cent);
  auto const cv = pqkv::make_view(static_cast<float const*>(dc.data()), heads, m, cfg.ksub(), cfg.dsub());
  pqkv::gpu::pq_encoder const simt{cfg, {.path = pqkv::gpu::assign_path::simt}};
  pqkv::gpu::pq_encoder const tc{cfg, {.path = pqkv::gpu::assign_path::tensor_core}};
  pqkv::device_buffer<std::uint8_t> full(static_cast<std::size_t>(heads * tokens * m));
  simt.encode(pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens, dim), cv,
              pqkv::make_view(full.data(), heads, tokens, m), nullptr);
  auto const ref = download(full, full.size());
  pqkv::device_buffer<std::uint8_t> codes(static_cast<std::size_t>(heads * cap * m));
  PQKV_CUDA_TRY(cudaMemset(codes.data(), 0xEE, codes.size()));
  auto const codes_v = pqkv::make_view(codes.data(), heads, cap, m);
  auto slice = [&](index_t t0, index_t count) {
    return pqkv::make_strided_view<float const, 3>(dk.data() + t0 * dim, {heads, count, dim}, {tokens * dim, dim, 1});
  };
  tc.append(slice(0, 50), cv, codes_v, index_t{0}, nullptr);
  pqkv::device_buffer<index_t> pos(1);
  for (index_t t = 50; t < tokens; t += 7) {
    index_t const count = std::min<index_t>(7, tokens - t);
    PQKV_CUDA_TRY(cudaMemcpy(pos.data(), &t, sizeof(index_t), cudaMemcpyHostToDevice));
    tc.append(slice(t, count), cv, codes_v, std::span<index_t const>{pos.data(), 1}, nullptr);
  }
  auto const got = download(codes, codes.size());
  for (index_t h = 0; h < heads; ++h) {
    for (index_t t = 0; t < cap; ++t) {
      for (index_t s = 0; s < m; ++s) {
        auto const g = got[static_cast<std::size_t>((h * cap + t) * m + s)];
        auto const want = t < tokens ? ref[static_cast<std::size_t>((h * tokens + t) * m + s)] : std::uint8_t{0xEE};
        if (g != want) { FAIL("code (", h, ", ", t, ", ", s, "): got ", int{g}, ", want ", int{want}); }
      }
    }
  }
}

TEST_CASE("gpu encoder: records its device and throws when called from another")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 8, dim = 64, m = 4;
  auto const cfg = config_of(dim, m, 4);
  int device = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  pqkv::gpu::pq_encoder const enc{cfg};
  CHECK(enc.device() == device);
  int const other = pqkv::test::other_device();
  if (other < 0) {
    MESSAGE("cross-device part skipped: it needs 2 GPUs");
    return;
  }
  auto dk = upload(make_values(static_cast<std::size_t>(heads * tokens * dim), 8));
  auto dc = upload(make_values(static_cast<std::size_t>(heads * m * cfg.ksub() * cfg.dsub()), 9));
  pqkv::device_buffer<std::uint8_t> codes(static_cast<std::size_t>(heads * tokens * m));
  auto const kv = pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens, dim);
  auto const cv = pqkv::make_view(static_cast<float const*>(dc.data()), heads, m, cfg.ksub(), cfg.dsub());
  auto const out = pqkv::make_view(codes.data(), heads, tokens, m);
  {
    pqkv::test::device_scope on_other{other};
    CHECK_THROWS_WITH_AS(enc.encode(kv, cv, out, nullptr), doctest::Contains("the object was built on device"),
                         pqkv::error);
    CHECK_THROWS_WITH_AS(enc.append(kv, cv, out, index_t{0}, nullptr),
                         doctest::Contains("the object was built on device"), pqkv::error);
  }
  int now = -1;
  PQKV_CUDA_TRY(cudaGetDevice(&now));
  CHECK(now == device);
}

TEST_CASE("gpu encoder: bad inputs throw before any launch")
{
  PQKV_REQUIRE_GPU();
  index_t const heads = 2, tokens = 40, dim = 64, m = 4;
  auto const cfg = config_of(dim, m, 4);
  CHECK(contains(error_message([&] { pqkv::gpu::pq_encoder{config_of(64, 32, 4)}; }), "dim / m=2"));
  CHECK(contains(error_message([&] { pqkv::gpu::pq_encoder{config_of(64, 4, 9)}; }), "nbits=9"));
  pqkv::gpu::pq_encoder const enc{cfg};
  auto const kf = make_values(static_cast<std::size_t>(heads * tokens * dim), 8);
  auto const cent = make_values(static_cast<std::size_t>(heads * m * cfg.ksub() * cfg.dsub()), 9);
  auto dk = upload(kf);
  auto dc = upload(cent);
  pqkv::device_buffer<std::uint8_t> codes(static_cast<std::size_t>(heads * tokens * m));
  PQKV_CUDA_TRY(cudaMemset(codes.data(), 0x5A, codes.size()));
  auto const kv = pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens, dim);
  auto const cv = pqkv::make_view(static_cast<float const*>(dc.data()), heads, m, cfg.ksub(), cfg.dsub());
  auto const out = pqkv::make_view(codes.data(), heads, tokens, m);
  CHECK(contains(error_message([&] {
                   enc.encode(pqkv::make_view(static_cast<float const*>(dk.data()), heads, tokens, dim / 2), cv, out,
                              nullptr);
                 }),
                 "keys.extent(2)=32"));
  CHECK(contains(error_message([&] { enc.encode(kv, cv, pqkv::make_view(codes.data(), heads, tokens, m / 2), nullptr); }),
                 "codes.extent(2)=2"));
  CHECK(contains(error_message([&] { enc.encode(kv, cv, pqkv::make_view(codes.data(), heads, tokens - 1, m), nullptr); }),
                 "codes.extent(1)"));
  CHECK(contains(error_message([&] {
                   enc.encode(kv, pqkv::make_view(static_cast<float const*>(dc.data()), heads, m, cfg.ksub() / 2, cfg.dsub()),
                              out, nullptr);
                 }),
                 "centroids.extent(2)"));
  CHECK(contains(error_message([&] { enc.encode(pqkv::make_view(kf.data(), heads, tokens, dim), cv, out, nullptr); }),
                 "not device-accessible"));
  CHECK(contains(error_message([&] {
                   enc.encode(kv, cv, pqkv::make_view(static_cast<std::uint8_t*>(nullptr), heads, tokens, m), nullptr);
                 }),
                 "codes.data_handle() is null"));
  CHECK(contains(error_message([&] { enc.append(kv, cv, out, index_t{1}, nullptr); }), "exceeds codes.extent(1)"));
  CHECK(contains(error_message([&] { enc.append(kv, cv, out, index_t{-1}, nullptr); }), "position=-1"));
  index_t host_pos = 0;
  CHECK(contains(error_message([&] { enc.append(kv, cv, out, std::span<index_t const>{&host_pos, 1}, nullptr); }),
                 "position.data() is not device-accessible"));
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  auto const after = download(codes, codes.size());
  CHECK(std::all_of(after.begin(), after.end(), [](std::uint8_t c) { return c == 0x5A; }));
}
