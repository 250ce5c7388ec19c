// SPDX-License-Identifier: Apache-2.0
#pragma once
// Command-line options of examples/long_context_decode.

#include "../common/cli.hpp"

#include <pqkv/core/error.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace lcd {

/// A token budget: a fixed k, or a fraction of the context (k = n * frac).
struct budget {
  std::int64_t k = 0;
  double frac = 0.0;
  [[nodiscard]] std::int64_t resolve(std::int64_t n) const
  {
    return frac > 0 ? static_cast<std::int64_t>(static_cast<double>(n) * frac) : k;
  }
  [[nodiscard]] std::string label() const
  {
    if (frac <= 0) { return std::to_string(k); }
    char buf[64];
    double const inv = 1.0 / frac;
    if (inv == static_cast<double>(static_cast<long long>(inv))) {
      std::snprintf(buf, sizeof(buf), "n/%lld", static_cast<long long>(inv));
    } else {
      std::snprintf(buf, sizeof(buf), "%.3g n", frac);
    }
    return buf;
  }
};

struct options {
  std::int64_t tokens = 131072;
  int layers = 32;
  std::vector<int> batches{1};
  int steps = 64;
  std::vector<budget> budgets{{2048, 0.0}, {0, 0.2}};
  int sink = 32;
  int window = 64;
  int m = 32;
  int nbits = 8;
  std::int64_t cache_slots = 0;  // 0: k
  int gpus = 1;
  bool check = false;
  bool check_set = false;
  int check_steps = 2;
  bool graph = true;
  std::int64_t train_points = 16384;
  int iters = 16;
  std::uint64_t seed = 1;
  bool quick = false;
};

inline void print_usage(std::FILE* f)
{
  std::fputs(
    "usage: long_context_decode [options]\n"
    "  --tokens N        prefill length per sequence (default 131072)\n"
    "  --layers L        layers prefilled and decoded (default 32; full K/V of 32 layers at 1M tokens is 128 GiB)\n"
    "  --batch B[,B..]   sequences per decode step; a list runs each (default 1)\n"
    "  --steps S         decode steps per timing mode (default 64)\n"
    "  --k K[,K..]       tokens selected per KV head; an item n/D means n / D (default 2048,n/5)\n"
    "  --k-frac F        select k = F * n per KV head (replaces --k unless both are given)\n"
    "  --sink N          leading tokens always attended (default 32)\n"
    "  --window N        trailing tokens always attended, >= 1 (default 64)\n"
    "  --m M             PQ subspaces: 128 / M in {4, 8, 16, 32, 64, 128} (default 32)\n"
    "  --nbits B         bits per code, 1..8 (default 8)\n"
    "  --cache-slots C   hot-cache rows per (layer, sequence, KV head); 0: k (default 0)\n"
    "  --gpus G          split the 8 KV heads over G devices, one host thread each (default 1)\n"
    "  --train-points P  k-means trains on a subsample of P keys per head (default 16384; 0: all)\n"
    "  --iters I         k-means iterations (default 16)\n"
    "  --seed S          model and k-means seed (default 1)\n"
    "  --check           recall@k, attention mass and output error vs dense on the GPU (default off; on with --quick)\n"
    "  --no-check        disable the check\n"
    "  --check-steps S   decode steps checked (default 2)\n"
    "  --no-graph        skip the CUDA-graph timing\n"
    "  --quick           smoke run: 8192 tokens, 2 layers, 4 steps, check on\n",
    f);
}

namespace detail {
[[noreturn]] inline void bad(std::string const& msg) { pqkv::example::bad_option("long_context_decode", msg); }

inline std::vector<std::string> split(std::string const& s)
{
  std::vector<std::string> out;
  std::size_t at = 0;
  while (true) {
    std::size_t const c = s.find(',', at);
    out.push_back(s.substr(at, c == std::string::npos ? std::string::npos : c - at));
    if (c == std::string::npos) { break; }
    at = c + 1;
  }
  return out;
}
}  // namespace detail

/// Parses argv; throws `pqkv::error` with a clear message on a bad flag or value.
/// Returns false when --help was asked.
inline bool parse(int argc, char** argv, options& o)
{
  using detail::bad;
  bool tokens_set = false, layers_set = false, steps_set = false, k_set = false, frac_set = false;
  std::vector<budget> ks, fracs;
  pqkv::example::arg_reader args{"long_context_decode", argc, argv};
  while (args.next()) {
    std::string_view const a = args.flag();
    if (a == "--help" || a == "-h") {
      return false;
    } else if (a == "--tokens") {
      o.tokens = args.integer();
      tokens_set = true;
    } else if (a == "--layers") {
      o.layers = static_cast<int>(args.integer());
      layers_set = true;
    } else if (a == "--batch") {
      o.batches.clear();
      for (auto const& s : detail::split(args.value())) {
        long long const b = args.integer(s);
        if (b < 1 || b > 64) { bad("--batch item " + s + " is outside [1, 64]"); }
        o.batches.push_back(static_cast<int>(b));
      }
    } else if (a == "--steps") {
      o.steps = static_cast<int>(args.integer());
      steps_set = true;
    } else if (a == "--k") {
      k_set = true;
      for (auto const& s : detail::split(args.value())) {
        if (s.size() > 2 && s[0] == 'n' && s[1] == '/') {
          long long const d = args.integer(s.substr(2));
          if (d < 1) { bad("--k item " + s + ": the divisor must be >= 1"); }
          ks.push_back({0, 1.0 / static_cast<double>(d)});
        } else {
          long long const k = args.integer(s);
          if (k < 1) { bad("--k item " + s + " must be >= 1"); }
          ks.push_back({k, 0.0});
        }
      }
    } else if (a == "--k-frac") {
      frac_set = true;
      double const f = args.real();
      if (!(f > 0.0 && f <= 1.0)) { bad("--k-frac=" + std::to_string(f) + " is outside (0, 1]"); }
      fracs.push_back({0, f});
    } else if (a == "--sink") {
      o.sink = static_cast<int>(args.integer());
    } else if (a == "--window") {
      o.window = static_cast<int>(args.integer());
    } else if (a == "--m") {
      o.m = static_cast<int>(args.integer());
    } else if (a == "--nbits") {
      o.nbits = static_cast<int>(args.integer());
    } else if (a == "--cache-slots") {
      o.cache_slots = args.integer();
    } else if (a == "--gpus") {
      o.gpus = static_cast<int>(args.integer());
    } else if (a == "--train-points") {
      o.train_points = args.integer();
    } else if (a == "--iters") {
      o.iters = static_cast<int>(args.integer());
    } else if (a == "--seed") {
      o.seed = static_cast<std::uint64_t>(args.integer());
    } else if (a == "--check") {
      o.check = true;
      o.check_set = true;
    } else if (a == "--no-check") {
      o.check = false;
      o.check_set = true;
    } else if (a == "--check-steps") {
      o.check_steps = static_cast<int>(args.integer());
    } else if (a == "--no-graph") {
      o.graph = false;
    } else if (a == "--quick") {
      o.quick = true;
    } else {
      bad("unknown option " + std::string(a) + " (see --help)");
    }
  }
  if (o.quick) {
    if (!tokens_set) { o.tokens = 8192; }
    if (!layers_set) { o.layers = 2; }
    if (!steps_set) { o.steps = 4; }
    if (!o.check_set) { o.check = true; }
  }
  if (k_set || frac_set) {
    o.budgets = ks;
    o.budgets.insert(o.budgets.end(), fracs.begin(), fracs.end());
  }
  // ---- validation ----
  if (o.tokens < 1 || o.tokens > (std::int64_t{1} << 30)) { bad("--tokens=" + std::to_string(o.tokens) + " is outside [1, 2^30]"); }
  if (o.layers < 1 || o.layers > 128) { bad("--layers=" + std::to_string(o.layers) + " is outside [1, 128]"); }
  if (o.steps < 1 || o.steps > 100000) { bad("--steps=" + std::to_string(o.steps) + " is outside [1, 100000]"); }
  if (o.sink < 0) { bad("--sink=" + std::to_string(o.sink) + " must be >= 0"); }
  if (o.window < 1) { bad("--window=" + std::to_string(o.window) + " must be >= 1 (the new token lives in the window)"); }
  if (o.sink + o.window >= o.tokens) {
    bad("--sink + --window = " + std::to_string(o.sink + o.window) + " leaves no candidates among --tokens=" +
        std::to_string(o.tokens));
  }
  if (o.m < 1 || 128 % o.m != 0 || 128 / o.m > 128 || (128 / o.m) < 4) {
    bad("--m=" + std::to_string(o.m) + ": 128 / m must be one of 4, 8, 16, 32, 64, 128");
  }
  if (o.nbits < 1 || o.nbits > 8) { bad("--nbits=" + std::to_string(o.nbits) + " is outside 1..8"); }
  if (o.cache_slots < 0) { bad("--cache-slots=" + std::to_string(o.cache_slots) + " must be >= 0"); }
  if (o.gpus < 1 || 8 % o.gpus != 0) { bad("--gpus=" + std::to_string(o.gpus) + " must divide the 8 KV heads (1, 2, 4, 8)"); }
  if (o.train_points < 0) { bad("--train-points=" + std::to_string(o.train_points) + " must be >= 0"); }
  if (o.train_points > 0 && o.train_points < (std::int64_t{1} << o.nbits)) {
    bad("--train-points=" + std::to_string(o.train_points) + " must be 0 or >= 2^nbits=" + std::to_string(1 << o.nbits));
  }
  if (o.iters < 0 || o.iters > 1000) { bad("--iters=" + std::to_string(o.iters) + " is outside [0, 1000]"); }
  if (o.check_steps < 0) { bad("--check-steps=" + std::to_string(o.check_steps) + " must be >= 0"); }
  if (o.budgets.empty()) { bad("no token budget (--k / --k-frac)"); }
  for (auto const& b : o.budgets) {
    std::int64_t const k = b.resolve(o.tokens);
    if (k < 1) { bad("token budget " + b.label() + " resolves to k=" + std::to_string(k) + " at --tokens=" + std::to_string(o.tokens)); }
    if (k > o.tokens - o.sink - o.window) {
      bad("token budget " + b.label() + " resolves to k=" + std::to_string(k) + ", more than the " +
          std::to_string(o.tokens - o.sink - o.window) + " candidates outside sink and window");
    }
    if (o.cache_slots > (std::int64_t{1} << 24) || (o.cache_slots == 0 && k > (std::int64_t{1} << 24))) {
      bad("the hot cache may hold at most 2^24 rows per head");
    }
  }
  return true;
}

}  // namespace lcd
