// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Reading and writing NumPy `.npy` files (format versions 1, 2 and 3)
/// into and out of `pqkv::host_tensor`, so users can feed their own K / Q / V
/// dumps to tests, benchmarks and the demo.
///
/// Supported: little-endian '<f4' (float), '<f2' (half), '<u2' (uint16, also
/// how bfloat16 is stored, since NumPy has no bfloat16: `t.view(torch.uint16)`),
/// '|u1' (uint8), '<i4' (int32), and '<f8' (double) for `load_npy_as_float`; C order
/// only. Anything else (big-endian, Fortran order, structured or object dtypes, a
/// truncated or overlong file, a rank or dtype other than asked for) throws
/// `pqkv::error` naming the file.

#include <pqkv/core/error.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/views.hpp>

#include <array>
#include <bit>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#if __has_include(<cuda_fp16.h>)
#  include <cuda_fp16.h>
#  define PQKV_NPY_HAS_HALF 1
#endif
#if __has_include(<cuda_bf16.h>)
#  include <cuda_bf16.h>
#  define PQKV_NPY_HAS_BF16 1
#endif

namespace pqkv::test {

static_assert(std::endian::native == std::endian::little, "npy.hpp reads and writes little-endian data in place");

/// Element types of a .npy file. `bf16` is stored as '<u2' (the bits of a
/// bfloat16); reading '<u2' gives `u16`, which `load_npy_as_float` reads as bf16.
enum class npy_dtype : std::uint8_t { f32, f16, bf16, u16, u8, i32, f64 };

/// The descr string NumPy writes for `t` ('<u2' for both bf16 and u16).
[[nodiscard]] constexpr std::string_view npy_descr(npy_dtype t) noexcept
{
  switch (t) {
    case npy_dtype::f32: return "<f4";
    case npy_dtype::f16: return "<f2";
    case npy_dtype::bf16: return "<u2";
    case npy_dtype::u16: return "<u2";
    case npy_dtype::u8: return "|u1";
    case npy_dtype::i32: return "<i4";
    case npy_dtype::f64: return "<f8";
  }
  return "?";
}

/// Bytes per element of `t`.
[[nodiscard]] constexpr std::size_t npy_itemsize(npy_dtype t) noexcept
{
  switch (t) {
    case npy_dtype::f32: case npy_dtype::i32: return 4;
    case npy_dtype::f16: case npy_dtype::bf16: case npy_dtype::u16: return 2;
    case npy_dtype::u8: return 1;
    case npy_dtype::f64: return 8;
  }
  return 0;
}

/// What a .npy header says: element type, shape (C order), and where the data starts.
struct npy_header {
  npy_dtype dtype = npy_dtype::f32;
  std::vector<index_t> shape;
  std::size_t data_offset = 0;
  [[nodiscard]] index_t element_count() const noexcept
  {
    index_t n = 1;
    for (index_t e : shape) { n *= e; }
    return n;
  }
};

/// The npy element type of a C++ element type: float, double, std::uint16_t,
/// std::uint8_t, std::int32_t, and __half / __nv_bfloat16 where the CUDA headers exist.
template <class T>
struct npy_type_of;
template <> struct npy_type_of<float> { static constexpr npy_dtype value = npy_dtype::f32; };
template <> struct npy_type_of<double> { static constexpr npy_dtype value = npy_dtype::f64; };
template <> struct npy_type_of<std::uint16_t> { static constexpr npy_dtype value = npy_dtype::u16; };
template <> struct npy_type_of<std::uint8_t> { static constexpr npy_dtype value = npy_dtype::u8; };
template <> struct npy_type_of<std::int32_t> { static constexpr npy_dtype value = npy_dtype::i32; };
#if defined(PQKV_NPY_HAS_HALF)
template <> struct npy_type_of<__half> { static constexpr npy_dtype value = npy_dtype::f16; };
#endif
#if defined(PQKV_NPY_HAS_BF16)
template <> struct npy_type_of<__nv_bfloat16> { static constexpr npy_dtype value = npy_dtype::bf16; };
#endif

// ---- half / bfloat16 bits <-> float, without CUDA headers ---------------------------

/// IEEE binary16 bits to float (exact).
[[nodiscard]] inline float half_bits_to_float(std::uint16_t h) noexcept
{
  std::uint32_t const sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t const exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  std::uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: value man * 2^-24
    float const v = static_cast<float>(man) * 0x1.0p-24f;
    return sign ? -v : v;
  }
  return std::bit_cast<float>(bits);
}

/// float to IEEE binary16 bits, round to nearest even (overflow gives inf, NaN stays NaN).
[[nodiscard]] inline std::uint16_t float_to_half_bits(float f) noexcept
{
  std::uint32_t const x = std::bit_cast<std::uint32_t>(f);
  auto const sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  std::uint32_t const ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) { return static_cast<std::uint16_t>(sign | 0x7E00u); }  // NaN
  if (ax >= 0x477FF000u) { return static_cast<std::uint16_t>(sign | 0x7C00u); }  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // value = ax as float; half subnormal unit is 2^-24: round(value * 2^24) to nearest even
    float const v = std::bit_cast<float>(ax) * 0x1.0p24f;  // exact (power of two scale)
    float const r = std::nearbyint(v);                      // current rounding mode: nearest even
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(r));
  }
  // normal: rebias exponent, round mantissa 23 -> 10 bits to nearest even
  std::uint32_t const m = ax + ((ax >> 13) & 1u) + 0xFFFu;
  return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>((m - 0x38000000u) >> 13));
}

/// bfloat16 bits to float (exact).
[[nodiscard]] inline float bf16_bits_to_float(std::uint16_t b) noexcept
{
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

/// float to bfloat16 bits, round to nearest even (NaN stays NaN).
[[nodiscard]] inline std::uint16_t float_to_bf16_bits(float f) noexcept
{
  std::uint32_t const x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) { return static_cast<std::uint16_t>((x >> 16) | 0x40u); }
  return static_cast<std::uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

namespace detail {

inline std::string npy_where(char const* call, std::filesystem::path const& path)
{
  return std::string(call) + " '" + path.string() + "'";
}

/// A tiny parser for the Python dict literal of a .npy header.
class npy_dict_parser {
 public:
  npy_dict_parser(std::string_view text, std::string const& where) : s_(text), where_(where) {}

  npy_header parse()
  {
    npy_header h;
    bool has_descr = false, has_order = false, has_shape = false;
    expect('{');
    while (true) {
      skip_ws();
      PQKV_EXPECTS(pos_ < s_.size(), where_, "header dict is not closed: '", s_, "'");
      if (s_[pos_] == '}') { ++pos_; break; }
      std::string const key = parse_string();
      expect(':');
      if (key == "descr") {
        skip_ws();
        PQKV_EXPECTS(pos_ < s_.size() && (s_[pos_] == '\'' || s_[pos_] == '"'), where_,
                     "descr is not a simple dtype string (structured dtypes are not supported): '", s_, "'");
        h.dtype = to_dtype(parse_string());
        has_descr = true;
      } else if (key == "fortran_order") {
        bool const fortran = parse_bool();
        PQKV_EXPECTS(!fortran, where_, "fortran_order=True is not supported; save a C-order array "
                                       "(np.ascontiguousarray)");
        has_order = true;
      } else if (key == "shape") {
        h.shape = parse_shape();
        has_shape = true;
      } else {
        PQKV_EXPECTS(false, where_, "unexpected header key '", key, "'");
      }
      skip_ws();
      PQKV_EXPECTS(pos_ < s_.size(), where_, "header dict is not closed: '", s_, "'");
      if (s_[pos_] == ',') { ++pos_; continue; }
      expect('}');
      break;
    }
    skip_ws();
    PQKV_EXPECTS(pos_ == s_.size(), where_, "unexpected text after the header dict: '", s_.substr(pos_), "'");
    PQKV_EXPECTS(has_descr && has_order && has_shape, where_,
                 "header lacks one of 'descr', 'fortran_order', 'shape': '", s_, "'");
    return h;
  }

 private:
  void skip_ws()
  {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) {
      ++pos_;
    }
  }
  void expect(char c)
  {
    skip_ws();
    PQKV_EXPECTS(pos_ < s_.size() && s_[pos_] == c, where_, "malformed header: expected '", c, "' at offset ",
                 pos_, " of '", s_, "'");
    ++pos_;
  }
  std::string parse_string()
  {
    skip_ws();
    PQKV_EXPECTS(pos_ < s_.size() && (s_[pos_] == '\'' || s_[pos_] == '"'), where_,
                 "malformed header: expected a quoted string at offset ", pos_, " of '", s_, "'");
    char const q = s_[pos_++];
    auto const end = s_.find(q, pos_);
    PQKV_EXPECTS(end != std::string_view::npos, where_, "malformed header: unterminated string in '", s_, "'");
    std::string out{s_.substr(pos_, end - pos_)};
    pos_ = end + 1;
    return out;
  }
  bool parse_bool()
  {
    skip_ws();
    if (s_.substr(pos_, 4) == "True") { pos_ += 4; return true; }
    if (s_.substr(pos_, 5) == "False") { pos_ += 5; return false; }
    PQKV_EXPECTS(false, where_, "malformed header: fortran_order is not True or False in '", s_, "'");
    return false;
  }
  std::vector<index_t> parse_shape()
  {
    expect('(');
    std::vector<index_t> shape;
    while (true) {
      skip_ws();
      PQKV_EXPECTS(pos_ < s_.size(), where_, "malformed header: unterminated shape in '", s_, "'");
      if (s_[pos_] == ')') { ++pos_; break; }
      PQKV_EXPECTS(std::isdigit(static_cast<unsigned char>(s_[pos_])), where_,
                   "malformed header: shape entries must be non-negative integers in '", s_, "'");
      index_t v = 0;
      while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) {
        PQKV_EXPECTS(v <= (std::numeric_limits<index_t>::max() - 9) / 10, where_, "shape entry overflows in '", s_,
                     "'");
        v = v * 10 + (s_[pos_++] - '0');
      }
      if (pos_ < s_.size() && s_[pos_] == 'L') { ++pos_; }  // Python 2 longs
      shape.push_back(v);
      skip_ws();
      PQKV_EXPECTS(pos_ < s_.size(), where_, "malformed header: unterminated shape in '", s_, "'");
      if (s_[pos_] == ',') { ++pos_; continue; }
      PQKV_EXPECTS(s_[pos_] == ')', where_, "malformed header: expected ',' or ')' in the shape of '", s_, "'");
    }
    return shape;
  }
  npy_dtype to_dtype(std::string const& d)
  {
    if (d == "<f4") { return npy_dtype::f32; }
    if (d == "<f2") { return npy_dtype::f16; }
    if (d == "<u2") { return npy_dtype::u16; }
    if (d == "|u1" || d == "<u1" || d == "u1") { return npy_dtype::u8; }
    if (d == "<i4") { return npy_dtype::i32; }
    if (d == "<f8") { return npy_dtype::f64; }
    PQKV_EXPECTS(false, where_, "unsupported dtype '", d,
                 "' (supported: '<f4', '<f2', '<u2' (also bf16 bits), '|u1', '<i4', '<f8'; little-endian only)");
    return npy_dtype::f32;
  }

  std::string_view s_;
  std::string const& where_;
  std::size_t pos_ = 0;
};

/// Reads the whole header, checks the file holds exactly the data it announces.
inline npy_header read_header(std::ifstream& in, std::uintmax_t file_size, std::string const& where)
{
  std::array<char, 8> pre{};
  PQKV_EXPECTS(file_size >= 10, where, "file is ", file_size, " bytes, too short for a .npy header");
  in.read(pre.data(), 8);
  PQKV_EXPECTS(in.good() && std::memcmp(pre.data(), "\x93NUMPY", 6) == 0, where,
               "not a .npy file (bad magic string)");
  auto const major = static_cast<unsigned char>(pre[6]);
  PQKV_EXPECTS(major >= 1 && major <= 3, where, "unsupported .npy format version ", static_cast<int>(major), ".",
               static_cast<int>(static_cast<unsigned char>(pre[7])));
  std::size_t len = 0, prefix = 0;
  if (major == 1) {
    std::array<unsigned char, 2> b{};
    in.read(reinterpret_cast<char*>(b.data()), 2);
    len = b[0] | (std::size_t{b[1]} << 8);
    prefix = 10;
  } else {
    std::array<unsigned char, 4> b{};
    in.read(reinterpret_cast<char*>(b.data()), 4);
    len = b[0] | (std::size_t{b[1]} << 8) | (std::size_t{b[2]} << 16) | (std::size_t{b[3]} << 24);
    prefix = 12;
  }
  PQKV_EXPECTS(in.good() && prefix + len <= file_size, where, "truncated header: it announces ", len,
               " bytes, the file has ", file_size);
  std::string text(len, '\0');
  in.read(text.data(), static_cast<std::streamsize>(len));
  PQKV_EXPECTS(in.good(), where, "could not read the ", len, "-byte header");
  npy_header h = npy_dict_parser(text, where).parse();
  h.data_offset = prefix + len;
  std::uintmax_t bytes = npy_itemsize(h.dtype);
  for (index_t e : h.shape) {
    PQKV_EXPECTS(e == 0 || bytes <= std::numeric_limits<std::uintmax_t>::max() / static_cast<std::uintmax_t>(e),
                 where, "shape overflows");
    bytes *= static_cast<std::uintmax_t>(e);
  }
  std::uintmax_t const have = file_size - h.data_offset;
  PQKV_EXPECTS(have >= bytes, where, "truncated data: the header announces ", bytes, " bytes, the file has ", have);
  PQKV_EXPECTS(have == bytes, where, "file has ", have - bytes, " bytes past the ", bytes,
               " bytes of data the header announces");
  return h;
}

inline std::uintmax_t checked_size(std::filesystem::path const& path, std::string const& where)
{
  std::error_code ec;
  auto const size = std::filesystem::file_size(path, ec);
  PQKV_EXPECTS(!ec, where, "cannot stat the file: ", ec.message());
  return size;
}

template <std::size_t Rank>
std::array<index_t, Rank> checked_extents(npy_header const& h, std::string const& where)
{
  PQKV_EXPECTS(h.shape.size() == Rank, where, "the file has rank ", h.shape.size(), ", expected rank ", Rank);
  std::array<index_t, Rank> e{};
  for (std::size_t r = 0; r < Rank; ++r) { e[r] = h.shape[r]; }
  return e;
}

template <class T, std::size_t Rank>
host_tensor<T, Rank> make_tensor(std::array<index_t, Rank> const& e)
{
  return [&]<std::size_t... I>(std::index_sequence<I...>) { return host_tensor<T, Rank>(e[I]...); }(
      std::make_index_sequence<Rank>{});
}

inline void write_file(std::filesystem::path const& path, npy_dtype dtype, std::span<index_t const> shape,
                       void const* data, std::size_t bytes, char const* call)
{
  std::string const where = npy_where(call, path);
  std::string dict = "{'descr': '" + std::string(npy_descr(dtype)) + "', 'fortran_order': False, 'shape': (";
  for (std::size_t r = 0; r < shape.size(); ++r) {
    PQKV_EXPECTS(shape[r] >= 0, where, "extent(", r, ")=", shape[r], " is negative");
    dict += std::to_string(shape[r]);
    if (shape.size() == 1 || r + 1 < shape.size()) { dict += ","; }
    if (r + 1 < shape.size()) { dict += " "; }
  }
  dict += "), }";
  // Pad with spaces and end with '\n' so the data starts on a 64-byte boundary, as NumPy does.
  auto padded = [&](std::size_t prefix) { return (prefix + dict.size() + 1 + 63) / 64 * 64; };
  bool const v1 = padded(10) - 10 <= 65535;  // version 1 stores the header length in 16 bits
  std::size_t const prefix = v1 ? 10 : 12;
  std::size_t const total = padded(prefix);
  dict.append(total - prefix - dict.size() - 1, ' ');
  dict += '\n';
  std::size_t const len = dict.size();
  std::string head = "\x93NUMPY";
  head += static_cast<char>(v1 ? 1 : 2);
  head += static_cast<char>(0);
  head += static_cast<char>(len & 0xFF);
  head += static_cast<char>((len >> 8) & 0xFF);
  if (!v1) {
    head += static_cast<char>((len >> 16) & 0xFF);
    head += static_cast<char>((len >> 24) & 0xFF);
  }
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  PQKV_EXPECTS(out.is_open(), where, "cannot open the file for writing");
  out.write(head.data(), static_cast<std::streamsize>(head.size()));
  out.write(dict.data(), static_cast<std::streamsize>(dict.size()));
  if (bytes > 0) { out.write(static_cast<char const*>(data), static_cast<std::streamsize>(bytes)); }
  out.flush();
  PQKV_EXPECTS(out.good(), where, "writing ", bytes, " bytes of data failed");
}

}  // namespace detail

/// The header of the .npy file at `path`, after checking that the file holds
/// exactly the bytes it announces.
[[nodiscard]] inline npy_header read_npy_header(std::filesystem::path const& path)
{
  std::string const where = detail::npy_where("read_npy_header", path);
  auto const size = detail::checked_size(path, where);
  std::ifstream in(path, std::ios::binary);
  PQKV_EXPECTS(in.is_open(), where, "cannot open the file");
  return detail::read_header(in, size, where);
}

/// Loads a .npy file whose dtype is exactly T's (`npy_type_of<T>`; a bf16 tensor
/// reads '<u2') and whose rank is Rank.
template <class T, std::size_t Rank>
[[nodiscard]] host_tensor<T, Rank> load_npy(std::filesystem::path const& path)
{
  std::string const where = detail::npy_where("load_npy", path);
  auto const size = detail::checked_size(path, where);
  std::ifstream in(path, std::ios::binary);
  PQKV_EXPECTS(in.is_open(), where, "cannot open the file");
  npy_header const h = detail::read_header(in, size, where);
  constexpr npy_dtype want = npy_type_of<T>::value;
  bool const ok = h.dtype == want || (want == npy_dtype::bf16 && h.dtype == npy_dtype::u16);
  PQKV_EXPECTS(ok, where, "dtype '", npy_descr(h.dtype), "' does not match the requested '", npy_descr(want), "'");
  auto t = detail::make_tensor<T, Rank>(detail::checked_extents<Rank>(h, where));
  std::size_t const bytes = t.size() * sizeof(T);
  if (bytes > 0) {
    in.read(reinterpret_cast<char*>(t.data()), static_cast<std::streamsize>(bytes));
    PQKV_EXPECTS(in.good(), where, "could not read ", bytes, " bytes of data");
  }
  return t;
}

/// Loads a floating-point .npy file of rank Rank as float: '<f4', '<f2', '<f8',
/// and '<u2' read as bfloat16 bits.
template <std::size_t Rank>
[[nodiscard]] host_tensor<float, Rank> load_npy_as_float(std::filesystem::path const& path)
{
  std::string const where = detail::npy_where("load_npy_as_float", path);
  auto const size = detail::checked_size(path, where);
  std::ifstream in(path, std::ios::binary);
  PQKV_EXPECTS(in.is_open(), where, "cannot open the file");
  npy_header const h = detail::read_header(in, size, where);
  PQKV_EXPECTS(h.dtype == npy_dtype::f32 || h.dtype == npy_dtype::f16 || h.dtype == npy_dtype::u16 ||
                   h.dtype == npy_dtype::f64,
               where, "dtype '", npy_descr(h.dtype), "' is not floating point ('<f4', '<f2', '<u2' as bf16, '<f8')");
  auto t = detail::make_tensor<float, Rank>(detail::checked_extents<Rank>(h, where));
  std::size_t const n = t.size(), item = npy_itemsize(h.dtype);
  std::vector<char> raw(n * item);
  if (!raw.empty()) {
    in.read(raw.data(), static_cast<std::streamsize>(raw.size()));
    PQKV_EXPECTS(in.good(), where, "could not read ", raw.size(), " bytes of data");
  }
  float* out = t.data();
  for (std::size_t i = 0; i < n; ++i) {
    char const* p = raw.data() + i * item;
    switch (h.dtype) {
      case npy_dtype::f32: std::memcpy(out + i, p, 4); break;
      case npy_dtype::f64: {
        double v;
        std::memcpy(&v, p, 8);
        out[i] = static_cast<float>(v);
        break;
      }
      default: {
        std::uint16_t b;
        std::memcpy(&b, p, 2);
        out[i] = h.dtype == npy_dtype::f16 ? half_bits_to_float(b) : bf16_bits_to_float(b);
      }
    }
  }
  return t;
}

/// Writes a row-major view as a .npy file (version 1, or 2 for a header
/// beyond 64 KiB) with T's dtype (`npy_type_of<T>`; bf16 is written as '<u2').
template <class T, class Extents>
void save_npy(std::filesystem::path const& path, ::cuda::std::mdspan<T, Extents, ::cuda::std::layout_right> v)
{
  using E = std::remove_const_t<T>;
  std::array<index_t, Extents::rank()> shape{};
  for (std::size_t r = 0; r < Extents::rank(); ++r) { shape[r] = static_cast<index_t>(v.extent(r)); }
  std::size_t const bytes = static_cast<std::size_t>(element_count(v)) * sizeof(E);
  PQKV_EXPECTS(bytes == 0 || v.data_handle() != nullptr, detail::npy_where("save_npy", path),
               "view data is null for ", element_count(v), " elements");
  detail::write_file(path, npy_type_of<E>::value, shape, v.data_handle(), bytes, "save_npy");
}

/// Writes a host tensor as a .npy file (see the view overload).
template <class T, std::size_t Rank>
void save_npy(std::filesystem::path const& path, host_tensor<T, Rank> const& t)
{
  save_npy(path, t.const_view());
}

/// Writes float data as '<f4', '<f2' (dtype f16) or '<u2' bfloat16 bits (dtype
/// bf16), rounding to nearest even.
template <class T, class Extents>
  requires std::is_same_v<std::remove_const_t<T>, float>
void save_npy_as(std::filesystem::path const& path, ::cuda::std::mdspan<T, Extents, ::cuda::std::layout_right> v,
                 npy_dtype dtype)
{
  std::string const where = detail::npy_where("save_npy_as", path);
  PQKV_EXPECTS(dtype == npy_dtype::f32 || dtype == npy_dtype::f16 || dtype == npy_dtype::bf16, where, "dtype '",
               npy_descr(dtype), "' is not one of f32, f16, bf16");
  auto const n = static_cast<std::size_t>(element_count(v));
  PQKV_EXPECTS(n == 0 || v.data_handle() != nullptr, where, "view data is null for ", n, " elements");
  std::array<index_t, Extents::rank()> shape{};
  for (std::size_t r = 0; r < Extents::rank(); ++r) { shape[r] = static_cast<index_t>(v.extent(r)); }
  if (dtype == npy_dtype::f32) {
    detail::write_file(path, dtype, shape, v.data_handle(), n * 4, "save_npy_as");
    return;
  }
  std::vector<std::uint16_t> bits(n);
  float const* src = v.data_handle();
  for (std::size_t i = 0; i < n; ++i) {
    bits[i] = dtype == npy_dtype::f16 ? float_to_half_bits(src[i]) : float_to_bf16_bits(src[i]);
  }
  detail::write_file(path, dtype, shape, bits.data(), n * 2, "save_npy_as");
}

}  // namespace pqkv::test
