// SPDX-License-Identifier: Apache-2.0
#include "common/npy.hpp"
#include "common/test_util.hpp"

#include <pqkv/core/random.hpp>

#include <doctest/doctest.h>

#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

namespace {

using pqkv::test::error_message;

namespace fs = std::filesystem;
using pqkv::index_t;

/// A scratch folder under the system temp directory, removed with everything in it.
class scratch_dir {
 public:
  scratch_dir()
  {
    auto const tag = pqkv::detail::mix64(static_cast<std::uint64_t>(
        std::hash<std::string>{}(fs::temp_directory_path().string()) ^
        static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(this)) ^
        static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count())));
    path_ = fs::temp_directory_path() / ("pqkv_npy_test_" + std::to_string(tag));
    fs::create_directories(path_);
  }
  scratch_dir(scratch_dir const&) = delete;
  scratch_dir& operator=(scratch_dir const&) = delete;
  ~scratch_dir()
  {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  [[nodiscard]] fs::path file(std::string const& name) const { return path_ / name; }

 private:
  fs::path path_;
};

void write_bytes(fs::path const& p, std::string const& bytes)
{
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_bytes(fs::path const& p)
{
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// A .npy file of format `major` with header `dict` (padded as NumPy pads it) and raw `data`.
std::string npy_bytes(int major, std::string dict, std::string const& data, bool pad = true)
{
  std::size_t const prefix = major == 1 ? 10 : 12;
  if (pad) {
    std::size_t const total = (prefix + dict.size() + 1 + 63) / 64 * 64;
    dict.append(total - prefix - dict.size() - 1, ' ');
    dict += '\n';
  }
  std::string out = "\x93NUMPY";
  out += static_cast<char>(major);
  out += '\0';
  std::size_t const len = dict.size();
  out += static_cast<char>(len & 0xFF);
  out += static_cast<char>((len >> 8) & 0xFF);
  if (major != 1) {
    out += static_cast<char>((len >> 16) & 0xFF);
    out += static_cast<char>((len >> 24) & 0xFF);
  }
  return out + dict + data;
}

template <class T>
std::string raw(std::vector<T> const& v)
{
  return {reinterpret_cast<char const*>(v.data()), v.size() * sizeof(T)};
}

}  // namespace

TEST_CASE("npy: each supported dtype round-trips exactly")
{
  scratch_dir dir;
  pqkv::host_tensor<float, 3> f(2, 3, 5);
  for (std::size_t i = 0; i < f.size(); ++i) { f.storage()[i] = static_cast<float>(i) * 0.37f - 4.f; }
  f.storage()[7] = std::numeric_limits<float>::denorm_min();
  pqkv::test::save_npy(dir.file("f.npy"), f);
  auto const f2 = pqkv::test::load_npy<float, 3>(dir.file("f.npy"));
  CHECK(f2.extent(0) == 2);
  CHECK(f2.extent(1) == 3);
  CHECK(f2.extent(2) == 5);
  CHECK(f2.storage() == f.storage());

  pqkv::host_tensor<std::uint16_t, 2> u(4, 3);
  for (std::size_t i = 0; i < u.size(); ++i) { u.storage()[i] = static_cast<std::uint16_t>(i * 5000 + 1); }
  pqkv::test::save_npy(dir.file("u16.npy"), u.view());  // a mutable view works as well
  CHECK(pqkv::test::load_npy<std::uint16_t, 2>(dir.file("u16.npy")).storage() == u.storage());

  pqkv::host_tensor<std::uint8_t, 1> b(300);
  for (std::size_t i = 0; i < b.size(); ++i) { b.storage()[i] = static_cast<std::uint8_t>(i * 7); }
  pqkv::test::save_npy(dir.file("u8.npy"), b);
  CHECK(pqkv::test::load_npy<std::uint8_t, 1>(dir.file("u8.npy")).storage() == b.storage());

  pqkv::host_tensor<std::int32_t, 2> c(3, 2);
  for (std::size_t i = 0; i < c.size(); ++i) { c.storage()[i] = static_cast<std::int32_t>(i) * -123456 + 7; }
  pqkv::test::save_npy(dir.file("i32.npy"), c);
  CHECK(pqkv::test::load_npy<std::int32_t, 2>(dir.file("i32.npy")).storage() == c.storage());

  // Empty arrays round-trip too.
  pqkv::host_tensor<float, 2> empty(0, 4);
  pqkv::test::save_npy(dir.file("empty.npy"), empty);
  auto const e2 = pqkv::test::load_npy<float, 2>(dir.file("empty.npy"));
  CHECK(e2.extent(0) == 0);
  CHECK(e2.extent(1) == 4);

  // Half and bfloat16 as float, written with rounding and read back exactly.
  pqkv::host_tensor<float, 2> h(2, 4);
  std::vector<float> const exact = {0.5f, -2.f, 1024.f, 57344.f, 0x1.0p-24f, -0x1.8p-20f, 3.140625f, 0.f};
  std::copy(exact.begin(), exact.end(), h.storage().begin());
  pqkv::test::save_npy_as(dir.file("f16.npy"), h.const_view(), pqkv::test::npy_dtype::f16);
  CHECK(pqkv::test::read_npy_header(dir.file("f16.npy")).dtype == pqkv::test::npy_dtype::f16);
  CHECK(pqkv::test::load_npy_as_float<2>(dir.file("f16.npy")).storage() == h.storage());
  pqkv::test::save_npy_as(dir.file("bf16.npy"), h.const_view(), pqkv::test::npy_dtype::bf16);
  auto const hb = pqkv::test::read_npy_header(dir.file("bf16.npy"));
  CHECK(hb.dtype == pqkv::test::npy_dtype::u16);  // stored as '<u2'
  CHECK(pqkv::test::load_npy_as_float<2>(dir.file("bf16.npy")).storage() == h.storage());
  pqkv::test::save_npy_as(dir.file("f32.npy"), h.const_view(), pqkv::test::npy_dtype::f32);
  CHECK(pqkv::test::load_npy<float, 2>(dir.file("f32.npy")).storage() == h.storage());

  pqkv::host_tensor<double, 1> d(3);
  d.storage() = {1.5, -0.25, 1e300};
  pqkv::test::save_npy(dir.file("f64.npy"), d);
  auto const d2 = pqkv::test::load_npy_as_float<1>(dir.file("f64.npy"));
  CHECK(d2.storage()[0] == 1.5f);
  CHECK(d2.storage()[1] == -0.25f);
  CHECK(std::isinf(d2.storage()[2]));

#if defined(PQKV_NPY_HAS_HALF)
  pqkv::host_tensor<__half, 1> hh(3);
  for (std::size_t i = 0; i < 3; ++i) { hh.storage()[i] = __float2half_rn(exact[i]); }
  pqkv::test::save_npy(dir.file("half.npy"), hh);
  auto const hh2 = pqkv::test::load_npy_as_float<1>(dir.file("half.npy"));
  for (std::size_t i = 0; i < 3; ++i) { CHECK(hh2.storage()[i] == exact[i]); }
  auto const hh3 = pqkv::test::load_npy<__half, 1>(dir.file("half.npy"));
  CHECK(std::memcmp(hh3.data(), hh.data(), 6) == 0);
#endif
#if defined(PQKV_NPY_HAS_BF16)
  pqkv::host_tensor<__nv_bfloat16, 1> bb(3);
  for (std::size_t i = 0; i < 3; ++i) { bb.storage()[i] = __float2bfloat16_rn(exact[i]); }
  pqkv::test::save_npy(dir.file("bf.npy"), bb);
  CHECK(pqkv::test::read_npy_header(dir.file("bf.npy")).dtype == pqkv::test::npy_dtype::u16);
  auto const bb2 = pqkv::test::load_npy<__nv_bfloat16, 1>(dir.file("bf.npy"));
  CHECK(std::memcmp(bb2.data(), bb.data(), 6) == 0);
#endif
}

TEST_CASE("npy: the written header is NumPy's: version 1, 64-byte aligned, Python dict")
{
  scratch_dir dir;
  pqkv::host_tensor<float, 2> f(2, 3);
  pqkv::test::save_npy(dir.file("f.npy"), f);
  std::string const bytes = read_bytes(dir.file("f.npy"));
  std::string const dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  REQUIRE(bytes.size() == 128 + 24);
  CHECK(bytes.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));
  CHECK(static_cast<unsigned char>(bytes[8]) == 118);
  CHECK(bytes[9] == 0);
  CHECK(bytes.substr(10, dict.size()) == dict);
  CHECK(bytes[127] == '\n');
  pqkv::host_tensor<std::uint8_t, 1> one(5);
  pqkv::test::save_npy(dir.file("one.npy"), one);
  CHECK(read_bytes(dir.file("one.npy")).find("{'descr': '|u1', 'fortran_order': False, 'shape': (5,), }") == 10);
}

TEST_CASE("npy: versions 2 and 3, other key orders and spacing are read")
{
  scratch_dir dir;
  std::vector<float> const v = {1.f, 2.f, 3.f, 4.f, 5.f, 6.f};
  write_bytes(dir.file("v2.npy"), npy_bytes(2, "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }", raw(v)));
  write_bytes(dir.file("v3.npy"),
              npy_bytes(3, "{\"shape\":(6,),\"fortran_order\":False,\"descr\":\"<f4\"}", raw(v)));
  write_bytes(dir.file("tight.npy"), npy_bytes(1, "{'descr':'<f4','fortran_order':False,'shape':(1,2,3)}", raw(v),
                                               /*pad=*/false));
  auto const a = pqkv::test::load_npy<float, 2>(dir.file("v2.npy"));
  CHECK(a.extent(0) == 3);
  CHECK(a.view()(2, 1) == 6.f);
  CHECK(pqkv::test::load_npy<float, 1>(dir.file("v3.npy")).storage() == v);
  auto const t = pqkv::test::load_npy_as_float<3>(dir.file("tight.npy"));
  CHECK(t.view()(0, 1, 2) == 6.f);
  auto const h = pqkv::test::read_npy_header(dir.file("v2.npy"));
  CHECK(h.shape == std::vector<index_t>{3, 2});
  CHECK(h.data_offset % 64 == 0);
}

TEST_CASE("npy: half and bfloat16 conversions round to nearest even")
{
  using pqkv::test::bf16_bits_to_float;
  using pqkv::test::float_to_bf16_bits;
  using pqkv::test::float_to_half_bits;
  using pqkv::test::half_bits_to_float;
  CHECK(float_to_half_bits(1.f) == 0x3C00);
  CHECK(float_to_half_bits(-2.f) == 0xC000);
  CHECK(float_to_half_bits(65504.f) == 0x7BFF);
  CHECK(float_to_half_bits(65520.f) == 0x7C00);            // rounds up to inf
  CHECK(float_to_half_bits(65519.f) == 0x7BFF);
  CHECK(float_to_half_bits(1.f + 0x1.0p-11f) == 0x3C00);  // tie: to even
  CHECK(float_to_half_bits(1.f + 0x1.8p-10f) == 0x3C02);  // tie: to even (up)
  CHECK(float_to_half_bits(0x1.0p-24f) == 0x0001);         // smallest subnormal
  CHECK(float_to_half_bits(0x1.0p-25f) == 0x0000);         // tie to even: zero
  CHECK(float_to_half_bits(0x1.8p-24f) == 0x0002);         // 1.5 units: to even (2)
  CHECK(float_to_half_bits(-0.f) == 0x8000);
  CHECK(std::isnan(half_bits_to_float(float_to_half_bits(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(half_bits_to_float(0x7C00) == std::numeric_limits<float>::infinity());
  CHECK(half_bits_to_float(0x03FF) == 1023 * 0x1.0p-24f);
  CHECK(half_bits_to_float(0x0400) == 0x1.0p-14f);
  CHECK(float_to_bf16_bits(1.f) == 0x3F80);
  CHECK(float_to_bf16_bits(std::bit_cast<float>(0x3F808000u)) == 0x3F80);  // tie: to even
  CHECK(float_to_bf16_bits(std::bit_cast<float>(0x3F818000u)) == 0x3F82);  // tie: to even (up)
  CHECK(float_to_bf16_bits(std::bit_cast<float>(0x3F808001u)) == 0x3F81);
  CHECK(std::isnan(bf16_bits_to_float(float_to_bf16_bits(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(bf16_bits_to_float(0xC2F7) == -123.5f);
  // Every half value survives half -> float -> half.
  bool all = true;
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    auto const h = static_cast<std::uint16_t>(b);
    if ((h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0) { continue; }  // NaN payloads
    all = all && float_to_half_bits(half_bits_to_float(h)) == h;
  }
  CHECK(all);
#if defined(PQKV_NPY_HAS_HALF) && defined(PQKV_NPY_HAS_BF16)
  // Agree with the CUDA headers' host conversions on many values.
  bool agree = true;
  for (std::uint64_t i = 0; i < 20000; ++i) {
    auto const bits = static_cast<std::uint32_t>(pqkv::detail::random_bits(7, 0, i));
    float const x = std::bit_cast<float>(bits);
    if (std::isnan(x)) { continue; }
    __half const h = __float2half_rn(x);
    __nv_bfloat16 const bf = __float2bfloat16_rn(x);
    std::uint16_t hb, bb;
    std::memcpy(&hb, &h, 2);
    std::memcpy(&bb, &bf, 2);
    agree = agree && float_to_half_bits(x) == hb && float_to_bf16_bits(x) == bb;
  }
  CHECK(agree);
#endif
}

TEST_CASE("npy: malformed or unsupported files throw pqkv::error naming the file")
{
  scratch_dir dir;
  std::vector<float> const v = {1.f, 2.f, 3.f, 4.f, 5.f, 6.f};
  std::string const good_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  auto fails_with = [&](std::string const& name, std::string const& bytes, std::string const& what) {
    write_bytes(dir.file(name), bytes);
    std::string const msg = error_message([&] { (void)pqkv::test::load_npy<float, 2>(dir.file(name)); });
    INFO(name, ": ", msg);
    CHECK(msg.find(what) != std::string::npos);
    CHECK(msg.find(name) != std::string::npos);
  };
  std::string const good = npy_bytes(1, good_dict, raw(v));
  fails_with("trunc_data.npy", good.substr(0, good.size() - 1), "truncated data");
  fails_with("trunc_header.npy", good.substr(0, 40), "truncated header");
  fails_with("tiny.npy", good.substr(0, 7), "too short");
  fails_with("trailing.npy", good + "xx", "past the");
  fails_with("magic.npy", "\x93NUMPX" + good.substr(6), "bad magic");
  fails_with("version.npy", npy_bytes(4, good_dict, raw(v)), "version 4");
  fails_with("big_endian.npy", npy_bytes(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", raw(v)),
             "unsupported dtype '>f4'");
  fails_with("complex.npy", npy_bytes(1, "{'descr': '<c8', 'fortran_order': False, 'shape': (2, 3), }", raw(v)),
             "unsupported dtype '<c8'");
  fails_with("structured.npy",
             npy_bytes(1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2, 3), }", raw(v)),
             "structured");
  fails_with("fortran.npy", npy_bytes(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", raw(v)),
             "fortran_order=True");
  fails_with("no_shape.npy", npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, }", raw(v)), "lacks");
  fails_with("bad_shape.npy", npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }", raw(v)),
             "non-negative");
  fails_with("open_dict.npy", npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)", raw(v)),
             "not closed");
  fails_with("unknown_key.npy",
             npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1, }", raw(v)),
             "unexpected header key 'x'");
  fails_with("rank.npy", npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }", raw(v)),
             "rank 1, expected rank 2");
  fails_with("huge.npy",
             npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }", raw(v)),
             "overflow");
  // A dtype other than the one asked for.
  std::vector<double> const dv(6, 1.0);
  fails_with("f64.npy", npy_bytes(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", raw(dv)),
             "dtype '<f8' does not match the requested '<f4'");
  write_bytes(dir.file("u8.npy"), npy_bytes(1, "{'descr': '|u1', 'fortran_order': False, 'shape': (6,), }", "abcdef"));
  CHECK(error_message([&] { (void)pqkv::test::load_npy_as_float<1>(dir.file("u8.npy")); }).find("not floating point") !=
        std::string::npos);
  CHECK(error_message([&] { (void)pqkv::test::load_npy<float, 1>(dir.file("missing.npy")); }).find("missing.npy") !=
        std::string::npos);
  CHECK(error_message([&] { (void)pqkv::test::read_npy_header(dir.file("missing.npy")); }).find("cannot stat") !=
        std::string::npos);
  pqkv::host_tensor<float, 1> f(2);
  CHECK(error_message([&] {
          pqkv::test::save_npy_as(dir.file("x.npy"), f.const_view(), pqkv::test::npy_dtype::i32);
        }).find("not one of f32, f16, bf16") != std::string::npos);
  CHECK(error_message([&] { pqkv::test::save_npy(dir.file("no_dir") / "x.npy", f); }).find("cannot open") !=
        std::string::npos);
}
