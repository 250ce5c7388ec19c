// SPDX-License-Identifier: Apache-2.0
#pragma once
// Command-line options of examples/sale_prefill.

#include "../common/cli.hpp"

#include <pqkv/core/error.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace sp {

struct options {
  std::int64_t tokens = 65536;       // prompt length
  std::int64_t calib_tokens = 8192;  // calibration slice: the prompt's first tokens
  // SALE's calibration bound on the mean row L1 error: its README calibrates
  // Llama-3.1-8B with `run_kv_calib.sh ... 0.4`, the "sale_default" setting.
  double theta = 0.4;
  double needle_frac = 1.0 / 512;  // share of query rows that aim at a needle
  std::int64_t query_span = 64;    // consecutive query rows that share the generator's step (content, topic, needle)
  std::int64_t needles = 16;       // planted needle tokens per KV head
  double needle_share = 0.1;       // a needle row "concentrates" when exact attention gives the needle token this much
  int reps = 3;                    // timed repetitions of each stage (median printed)
  std::uint64_t seed = 1;
  bool check = false;  // pass/fail checks decide the exit status
  bool quick = false;
};

inline void print_usage(std::FILE* f)
{
  std::fputs(
    "usage: sale_prefill [options]\n"
    "  --tokens N         prompt length (default 65536)\n"
    "  --calib-tokens C   calibrate tau on the prompt's first C tokens (default 8192; at most --tokens)\n"
    "  --theta X          calibration bound on each head's mean row L1 error (default 0.4, SALE's setting)\n"
    "  --needle-frac F    share of query rows that aim at a planted needle, in [0, 1/16] (default 1/512)\n"
    "  --needles N        planted needle tokens per KV head (default 16)\n"
    "  --query-span S     consecutive query rows sharing one generator step: content, topic, needle (default 64)\n"
    "  --needle-share S   a needle row counts as concentrated when exact attention puts at least S of\n"
    "                     its mass on the needle token, in (0, 1] (default 0.1)\n"
    "  --reps R           timed repetitions of each stage, median printed (default 3)\n"
    "  --seed S           seed of the synthetic prompt (default 1)\n"
    "  --check            pass/fail quality checks decide the exit status (on with --quick)\n"
    "  --quick            smoke run: 8192 tokens, calibration on the first 2048, --check\n",
    f);
}

namespace detail {
[[noreturn]] inline void bad(std::string const& msg) { pqkv::example::bad_option("sale_prefill", msg); }
}  // namespace detail

/// Parses argv; throws `pqkv::error` with a clear message on a bad flag or
/// value. Returns false when --help was asked.
inline bool parse(int argc, char** argv, options& o)
{
  using detail::bad;
  bool tokens_set = false, calib_set = false;
  pqkv::example::arg_reader args{"sale_prefill", argc, argv};
  while (args.next()) {
    std::string_view const a = args.flag();
    if (a == "--help" || a == "-h") {
      return false;
    } else if (a == "--tokens") {
      o.tokens = args.integer();
      tokens_set = true;
    } else if (a == "--calib-tokens") {
      o.calib_tokens = args.integer();
      calib_set = true;
    } else if (a == "--theta") {
      o.theta = args.real();
    } else if (a == "--needle-frac") {
      o.needle_frac = args.real();
    } else if (a == "--needles") {
      o.needles = args.integer();
    } else if (a == "--query-span") {
      o.query_span = args.integer();
    } else if (a == "--needle-share") {
      o.needle_share = args.real();
    } else if (a == "--reps") {
      o.reps = static_cast<int>(args.integer());
    } else if (a == "--seed") {
      o.seed = static_cast<std::uint64_t>(args.integer());
    } else if (a == "--check") {
      o.check = true;
    } else if (a == "--quick") {
      o.quick = true;
    } else {
      bad("unknown option " + std::string(a) + " (see --help)");
    }
  }
  if (o.quick) {
    if (!tokens_set) { o.tokens = 8192; }
    // A slice shorter than the prompt, so the check sees taus applied beyond
    // the tokens they were calibrated on, as in the full run.
    if (!calib_set) { o.calib_tokens = 2048; }
    o.check = true;
  }
  // The default slice is 8K tokens, or the whole prompt when that is shorter.
  if (!calib_set && o.calib_tokens > o.tokens) { o.calib_tokens = o.tokens; }

  // ---- validation ----
  // 2^24 tokens keeps the int32 cu_seqlens, the mask and the host copies of
  // the example far from their limits (64 GiB of bf16 queries at 2^24).
  if (o.tokens < 256 || o.tokens > (std::int64_t{1} << 24)) {
    bad("--tokens=" + std::to_string(o.tokens) + " is outside [256, 2^24]");
  }
  if (o.calib_tokens < 256 || o.calib_tokens > o.tokens) {
    bad("--calib-tokens=" + std::to_string(o.calib_tokens) + " is outside [256, --tokens=" + std::to_string(o.tokens) +
        "]");
  }
  if (!(o.theta >= 0.0) || !std::isfinite(o.theta)) { bad("--theta=" + std::to_string(o.theta) + " must be finite and >= 0"); }
  // Needle rows are meant to be few: each one's exact attention is probed over its whole causal context.
  if (!(o.needle_frac >= 0.0 && o.needle_frac <= 1.0 / 16)) {
    bad("--needle-frac=" + std::to_string(o.needle_frac) + " is outside [0, 1/16]");
  }
  if (o.needles < 0 || o.needles > 65536) { bad("--needles=" + std::to_string(o.needles) + " is outside [0, 65536]"); }
  if (o.query_span < 1 || o.query_span > o.tokens) {
    bad("--query-span=" + std::to_string(o.query_span) + " is outside [1, --tokens=" + std::to_string(o.tokens) + "]");
  }
  if (!(o.needle_share > 0.0 && o.needle_share <= 1.0)) {
    bad("--needle-share=" + std::to_string(o.needle_share) + " is outside (0, 1]");
  }
  if (o.reps < 1 || o.reps > 1000) { bad("--reps=" + std::to_string(o.reps) + " is outside [1, 1000]"); }
  return true;
}

}  // namespace sp
