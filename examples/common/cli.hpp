// SPDX-License-Identifier: Apache-2.0
#pragma once
// Command-line value parsing shared by the examples: a bad value throws
// pqkv::error naming the program, the flag and the text.

#include <pqkv/core/error.hpp>

#include <cmath>
#include <cstdlib>
#include <string>
#include <string_view>

namespace pqkv::example {

/// Throws pqkv::error "<program>: <msg>".
[[noreturn]] inline void bad_option(std::string_view program, std::string const& msg)
{
  throw pqkv::error(std::string(program) + ": " + msg);
}

/// The integer `text` given to `flag`, or a pqkv::error.
inline long long parse_integer(std::string_view program, std::string_view flag, std::string const& text)
{
  char* end = nullptr;
  long long const v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || end == text.c_str() || *end != '\0') {
    bad_option(program, std::string(flag) + "=" + text + " is not an integer");
  }
  return v;
}

/// The number `text` given to `flag` (not NaN), or a pqkv::error.
inline double parse_real(std::string_view program, std::string_view flag, std::string const& text)
{
  char* end = nullptr;
  double const v = std::strtod(text.c_str(), &end);
  if (text.empty() || end == text.c_str() || *end != '\0' || std::isnan(v)) {
    bad_option(program, std::string(flag) + "=" + text + " is not a number");
  }
  return v;
}

}  // namespace pqkv::example
