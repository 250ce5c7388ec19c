// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::pq_encoder against pqkv::cpu::pq_encoder: identical codes for
// float / half / bf16 and strided keys over m and nbits (including planted
// exact ties); append (host or device position, graph replay) equals one
// full encode; bad inputs throw before any launch.
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/random.hpp>
#include <pqkv/encode/encode.cuh>
#include <pqkv/encode/encode.hpp>

#include "common/cuda_util.cuh"
#include "common/gpu.hpp"
#include "common/test_util.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::error_message;

bool contains(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }

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
