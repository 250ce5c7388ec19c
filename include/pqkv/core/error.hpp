// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Exceptions and host-side argument checks.

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace pqkv {

/// Host-side misuse: a shape, size or value that a call cannot accept.
/// The message names the call and the argument and shows the values:
/// `pqkv::error: adc_topk: codes.extent(2)=8, config.m=16 (score/adc_topk.hpp:88)`.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A CUDA runtime call failed; the message holds the call text, the CUDA error
/// name and string, and file:line.
class cuda_error : public error {
 public:
  cuda_error(std::string const& what, int code) : error(what), code_(code) {}
  /// The `cudaError_t` value, as an int so this header needs no CUDA headers.
  [[nodiscard]] int code() const noexcept { return code_; }

 private:
  int code_;
};

namespace detail {

/// Keeps the part of a path from `include/pqkv/` on, so messages stay short
/// and do not show where the library was installed.
constexpr std::string_view short_path(std::string_view file) noexcept
{
  constexpr std::string_view marker = "pqkv/";
  auto const pos = file.rfind(marker);
  return pos == std::string_view::npos ? file : file.substr(pos + marker.size());
}

template <class... Parts>
[[noreturn]] void throw_error(std::string_view where, char const* file, int line, Parts const&... parts)
{
  std::ostringstream os;
  os << "pqkv::error: " << where << ": ";
  (os << ... << parts);
  os << " (" << short_path(file) << ':' << line << ')';
  throw error(os.str());
}

}  // namespace detail
}  // namespace pqkv

/// Throws `pqkv::error` unless `cond` holds. `where` names the call; the
/// remaining arguments are streamed into the message, e.g.
/// `PQKV_EXPECTS(m > 0, "pq_config", "m=", m, " must be positive")`.
#define PQKV_EXPECTS(cond, where, ...)                                         \
  do {                                                                         \
    if (!(cond)) [[unlikely]] {                                                \
      ::pqkv::detail::throw_error((where), __FILE__, __LINE__, __VA_ARGS__);   \
    }                                                                          \
  } while (0)
