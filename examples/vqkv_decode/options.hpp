// SPDX-License-Identifier: Apache-2.0
#pragma once
// Command-line options of examples/vqkv_decode.

#include "../common/cli.hpp"

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace vq {

struct options {
  std::int64_t tokens = 32768;  // prefill length (codebooks are trained on it)
  std::int64_t steps = 256;     // decode steps
  int key_stages = 8, key_bits = 8, value_stages = 8, value_bits = 8;
  int splits = 1;                // sub-vectors per row, each with its own residual quantizer
  bool shared = false;           // one codebook for the layer's KV heads (else one per head)
  int iters = 10;                // Lloyd iterations per stage
  std::int64_t sink = 4, local = 1024, chunk = 64;  // VQKV's window: 4 sink and 1024 local tokens
  int blocks_per_sm = 2;  // code attention's scan blocks per SM (tuning)
  std::uint64_t seed = 1;
  bool check = false;  // pass/fail checks decide the exit status
  bool quick = false;
};

inline void print_usage(std::FILE* f)
{
  std::fputs(
    "usage: vqkv_decode [options]\n"
    "  --tokens N          prefill length; the codebooks are trained on it (default 32768)\n"
    "  --steps S           decode steps (default 256)\n"
    "  --key-stages S      residual stages of the key codes (default 8)\n"
    "  --key-bits B        bits per key code, 1..8 (default 8: 256 codewords)\n"
    "  --value-stages S    residual stages of the value codes (default 8)\n"
    "  --value-bits B      bits per value code, 1..8 (default 8)\n"
    "  --splits P          sub-vectors per row, 1, 2 or 4 (default 1)\n"
    "  --shared            one codebook for all KV heads of the layer (default: one per head)\n"
    "  --iters I           Lloyd iterations per stage (default 10)\n"
    "  --sink N            first tokens kept in bf16 (default 4)\n"
    "  --local N           latest tokens kept in bf16 (default 1024)\n"
    "  --chunk C           tokens leaving the window are encoded C at a time (default 64)\n"
    "  --blocks-per-sm B   code attention's scan blocks per SM, tuning (default 2)\n"
    "  --seed S            seed of the synthetic keys (default 1)\n"
    "  --check             pass/fail checks decide the exit status (on with --quick)\n"
    "  --quick             smoke run: 4096 tokens, 64 steps, local 256, chunk 16, --check\n",
    f);
}

/// Parses argv; throws `pqkv::error` naming the flag on a bad value. Returns
/// false when --help was asked.
inline bool parse(int argc, char** argv, options& o)
{
  pqkv::example::arg_reader args{"vqkv_decode", argc, argv};
  bool tokens_set = false, steps_set = false, local_set = false, chunk_set = false;
  while (args.next()) {
    std::string_view const a = args.flag();
    if (a == "--help" || a == "-h") { return false; }
    if (a == "--tokens") {
      o.tokens = args.integer();
      tokens_set = true;
    } else if (a == "--steps") {
      o.steps = args.integer();
      steps_set = true;
    } else if (a == "--key-stages") {
      o.key_stages = static_cast<int>(args.integer());
    } else if (a == "--key-bits") {
      o.key_bits = static_cast<int>(args.integer());
    } else if (a == "--value-stages") {
      o.value_stages = static_cast<int>(args.integer());
    } else if (a == "--value-bits") {
      o.value_bits = static_cast<int>(args.integer());
    } else if (a == "--splits") {
      o.splits = static_cast<int>(args.integer());
    } else if (a == "--shared") {
      o.shared = true;
    } else if (a == "--iters") {
      o.iters = static_cast<int>(args.integer());
    } else if (a == "--sink") {
      o.sink = args.integer();
    } else if (a == "--local") {
      o.local = args.integer();
      local_set = true;
    } else if (a == "--chunk") {
      o.chunk = args.integer();
      chunk_set = true;
    } else if (a == "--blocks-per-sm") {
      o.blocks_per_sm = static_cast<int>(args.integer());
    } else if (a == "--seed") {
      o.seed = static_cast<std::uint64_t>(args.integer());
    } else if (a == "--check") {
      o.check = true;
    } else if (a == "--quick") {
      o.quick = true;
    } else {
      args.bad("unknown option " + std::string(a) + " (see --help)");
    }
  }
  if (o.quick) {
    if (!tokens_set) { o.tokens = 4096; }
    if (!steps_set) { o.steps = 64; }
    if (!local_set) { o.local = 256; }
    if (!chunk_set) { o.chunk = 16; }
    o.check = true;
  }
  auto in = [&](char const* flag, std::int64_t v, std::int64_t lo, std::int64_t hi) {
    if (v < lo || v > hi) {
      args.bad(std::string(flag) + "=" + std::to_string(v) + " is outside [" + std::to_string(lo) + ", " +
               std::to_string(hi) + "]");
    }
  };
  in("--tokens", o.tokens, 1024, std::int64_t{1} << 20);
  in("--steps", o.steps, 1, 65536);
  in("--key-stages", o.key_stages, 1, 64);
  in("--value-stages", o.value_stages, 1, 64);
  // The GPU trainer trains up to 8-bit stages (wider codebooks are imported).
  in("--key-bits", o.key_bits, 1, 8);
  in("--value-bits", o.value_bits, 1, 8);
  if (o.splits != 1 && o.splits != 2 && o.splits != 4) { args.bad("--splits=" + std::to_string(o.splits) + " must be 1, 2 or 4"); }
  in("--iters", o.iters, 0, 1000);
  in("--sink", o.sink, 0, 1024);
  in("--local", o.local, 1, o.tokens);
  in("--chunk", o.chunk, 1, 4096);
  in("--blocks-per-sm", o.blocks_per_sm, 1, 8);
  return true;
}

}  // namespace vq
