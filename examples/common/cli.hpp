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

/// Walks argv for an example's parser: the current flag, its value and the
/// numbers parsed from it, with errors that name the program and the flag.
class arg_reader {
 public:
  arg_reader(std::string_view program, int argc, char** argv) : program_{program}, argc_{argc}, argv_{argv} {}

  /// Moves to the next argument; false past the last.
  bool next()
  {
    if (++at_ >= argc_) { return false; }
    flag_ = argv_[at_];
    return true;
  }
  [[nodiscard]] std::string_view flag() const noexcept { return flag_; }
  /// The current flag's value: the next argument, consumed.
  std::string value()
  {
    if (at_ + 1 >= argc_) { bad(std::string(flag_) + " needs a value"); }
    return argv_[++at_];
  }
  /// The current flag's value as an integer / a number.
  long long integer() { return integer(value()); }
  double real() { return parse_real(program_, flag_, value()); }
  /// `text` (e.g. one item of a list value) as an integer of the current flag.
  [[nodiscard]] long long integer(std::string const& text) const { return parse_integer(program_, flag_, text); }
  [[noreturn]] void bad(std::string const& msg) const { bad_option(program_, msg); }

 private:
  std::string_view program_;
  int argc_;
  char** argv_;
  int at_ = 0;
  std::string_view flag_;
};

}  // namespace pqkv::example
