// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::cpu::block_lfu_cache`: PQCache's GPU block cache of one layer,
/// as a CPU model. Blocks of `block_tokens` consecutive positions (all KV heads
/// of a position together) live in `capacity_blocks` GPU slots under LFU with
/// counts that never decay; the cache is emptied at each prefill (`reset`).
///
/// Contract of `step(selection, offloaded_tokens)`, once per decode step after
/// the top-k selection of the layer; a GPU model must reproduce it exactly:
///  1. Every argument is checked before anything changes. Entries of
///     `selection` [kv_heads, k] are token positions in [0, max_tokens); a
///     negative entry is padding and is skipped everywhere.
///  2. Hits are decided on the cache as it was before this step: an entry is a
///     token hit when its block is resident, and `rows` (if given) gets its row
///     in the cache, `slot * block_tokens + position % block_tokens`; every
///     other entry is a token miss, row -1. The step's inserts serve the next
///     step, since their rows are copied after the step's misses.
///  3. Each block's count is its number of entries over all heads (an entry
///     repeated in a head counts each time). Blocks with a count above 0 are
///     ranked by count, highest first, ties by lower block index, and the
///     first `blocks_per_step` are kept (PQCache's `cache_topk`).
///  4. Kept blocks that are not fully offloaded, i.e. whose last position is
///     not below `offloaded_tokens`, are dropped: their rows are not all in the
///     host store yet. They still take their place among the kept blocks, as in
///     PQCache, where the filter follows the ranking. (PQCache compares
///     `block <= offloaded / block_tokens` and so also admits the partly
///     offloaded block; pqkv does not.)
///  5. The remaining blocks are processed in rank order, each a touch with a
///     fresh stamp from a counter that only grows until `reset`. A block
///     resident at that moment gains one use (so at most one per step); any
///     other block enters with use 1 into the lowest free slot, or into the
///     slot of the victim: the lowest use count, then the least recently touched
///     block, i.e. the one that reached its count first (stamps are unique, so
///     this is a total order). Nothing is pinned: an insert may evict a block
///     touched, or inserted, earlier in the same step, as PQCache's does.
///  6. `inserts` lists each insert in processing order; `copy` marks those the
///     caller must copy from the host store once the step's hits are read: the
///     block still holds the slot at the end of the step and did not hold it
///     before (PQCache copies exactly these).

#include <pqkv/cache/policy.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace pqkv::cpu {

/// Shape of one layer's block cache. The defaults are PQCache's for
/// Llama-3.1-8B: 4096 cached tokens in blocks of 128.
struct block_lfu_config {
  std::uint32_t capacity_blocks = 32;  ///< slots, in blocks
  std::uint32_t block_tokens = 128;    ///< positions per block
  std::uint32_t blocks_per_step = 32;  ///< busiest blocks offered to the cache per step (PQCache: = capacity)
  std::int64_t max_tokens = 0;         ///< selected positions must be below this (PQCache: max_seq_len)

  /// Throws `pqkv::error` naming the first bad field; `where` names the call.
  void validate(char const* where = "block_lfu_config") const
  {
    PQKV_EXPECTS(capacity_blocks > 0, where, "capacity_blocks=0 must be positive");
    PQKV_EXPECTS(block_tokens > 0, where, "block_tokens=0 must be positive");
    PQKV_EXPECTS(blocks_per_step > 0, where, "blocks_per_step=0 must be positive");
    PQKV_EXPECTS(max_tokens > 0 && max_tokens <= std::numeric_limits<std::int32_t>::max(), where,
                 "max_tokens=", max_tokens, " must be in [1, 2^31 - 1]");
    PQKV_EXPECTS(std::uint64_t{capacity_blocks} * block_tokens <= std::uint64_t{std::numeric_limits<std::int32_t>::max()},
                 where, "capacity_blocks=", capacity_blocks, " x block_tokens=", block_tokens,
                 " cache rows exceed the int32 row range");
  }
};

/// A block that entered the cache during one step.
struct block_insert {
  std::int32_t block;    ///< block index (positions [block * block_tokens, +block_tokens))
  std::int32_t slot;     ///< the slot it took
  std::int32_t evicted;  ///< the block it evicted, -1 when the slot was free
  bool copy;             ///< the caller copies the block's rows into the slot after the step

  friend bool operator==(block_insert const&, block_insert const&) = default;
};

/// What one step of the block cache decided.
struct block_lfu_step {
  std::int64_t token_hits = 0;         ///< entries whose block was resident before the step
  std::int64_t token_misses = 0;       ///< the other non-padding entries
  std::vector<std::int32_t> promoted;  ///< resident blocks that gained a use, in processing order
  std::vector<block_insert> inserts;   ///< in processing order

  /// The blocks evicted during the step, in order (one per insert into a full cache).
  [[nodiscard]] std::vector<std::int32_t> evicted_blocks() const
  {
    std::vector<std::int32_t> out;
    for (auto const& ins : inserts) {
      if (ins.evicted >= 0) { out.push_back(ins.evicted); }
    }
    return out;
  }
};

/// PQCache's block-LFU cache of one layer; see the file comment.
class block_lfu_cache {
 public:
  explicit block_lfu_cache(block_lfu_config const& cfg) : cfg_{cfg}
  {
    cfg.validate("block_lfu_cache");
    auto const blocks = (cfg.max_tokens + cfg.block_tokens - 1) / cfg.block_tokens;
    slot_of_.assign(static_cast<std::size_t>(blocks), -1);
    count_.assign(static_cast<std::size_t>(blocks), 0);
    block_of_.assign(cfg.capacity_blocks, -1);
    use_.assign(cfg.capacity_blocks, 0.f);
    stamp_.assign(cfg.capacity_blocks, 0u);
  }

  /// One decode step without the row output.
  block_lfu_step const& step(selection_view<std::int32_t const> selection, std::int64_t offloaded_tokens)
  {
    return step(selection, offloaded_tokens, selection_view<std::int32_t>{});
  }

  /// One decode step; see the file comment. The result lives in the cache
  /// until the next `step` or `reset`.
  /// @param selection [kv_heads, k] selected positions, -1 padded
  /// @param offloaded_tokens positions [0, offloaded_tokens) are in the host store
  /// @param rows [kv_heads, k] out: the cache row of each hit, -1 elsewhere;
  ///             an empty view (null, 0 x 0) skips it
  block_lfu_step const& step(selection_view<std::int32_t const> selection, std::int64_t offloaded_tokens,
                             selection_view<std::int32_t> rows)
  {
    constexpr char const* where = "block_lfu_cache.step";
    index_t const heads = selection.extent(0);
    index_t const k = selection.extent(1);
    PQKV_EXPECTS(selection.data_handle() != nullptr || heads * k == 0, where, "selection.data_handle() is null");
    PQKV_EXPECTS(offloaded_tokens >= 0 && offloaded_tokens <= cfg_.max_tokens, where,
                 "offloaded_tokens=", offloaded_tokens, " is outside [0, max_tokens=", cfg_.max_tokens, "]");
    bool const want_rows = rows.data_handle() != nullptr || rows.extent(0) != 0 || rows.extent(1) != 0;
    if (want_rows) {
      PQKV_EXPECTS(rows.extent(0) == heads && rows.extent(1) == k, where, "rows is [", rows.extent(0), ", ",
                   rows.extent(1), "], selection is [", heads, ", ", k, "]");
      PQKV_EXPECTS(rows.data_handle() != nullptr || heads * k == 0, where, "rows.data_handle() is null");
    }
    for (index_t h = 0; h < heads; ++h) {
      for (index_t j = 0; j < k; ++j) {
        PQKV_EXPECTS(selection(h, j) < cfg_.max_tokens, where, "selection(", h, ", ", j, ")=", selection(h, j),
                     " >= max_tokens=", cfg_.max_tokens);
      }
    }
    PQKV_EXPECTS(touch_ <= std::numeric_limits<std::uint32_t>::max() - cfg_.blocks_per_step, where,
                 "the touch counter is exhausted after ", touch_, " touches; reset() the cache");

    auto& r = result_;
    r.token_hits = r.token_misses = 0;
    r.promoted.clear();
    r.inserts.clear();
    ranked_.clear();
    auto const bt = static_cast<std::int64_t>(cfg_.block_tokens);
    for (index_t h = 0; h < heads; ++h) {
      for (index_t j = 0; j < k; ++j) {
        std::int32_t const pos = selection(h, j);
        std::int32_t row = -1;
        if (pos >= 0) {
          auto const b = static_cast<std::size_t>(pos / bt);
          if (count_[b]++ == 0) { ranked_.push_back(static_cast<std::int32_t>(b)); }
          if (slot_of_[b] >= 0) {
            row = static_cast<std::int32_t>(slot_of_[b] * bt + pos % bt);
            ++r.token_hits;
          } else {
            ++r.token_misses;
          }
        }
        if (want_rows) { rows(h, j) = row; }
      }
    }

    auto const busier = [&](std::int32_t a, std::int32_t b) {
      auto const ca = count_[static_cast<std::size_t>(a)], cb = count_[static_cast<std::size_t>(b)];
      return ca != cb ? ca > cb : a < b;
    };
    auto const kept = std::min<std::size_t>(ranked_.size(), cfg_.blocks_per_step);
    std::partial_sort(ranked_.begin(), ranked_.begin() + static_cast<std::ptrdiff_t>(kept), ranked_.end(), busier);
    for (std::int32_t const b : ranked_) { count_[static_cast<std::size_t>(b)] = 0; }
    ranked_.resize(kept);

    cache::lfu const policy{};
    cache::slot_state state{use_.data(), stamp_.data(), nullptr, cfg_.capacity_blocks, 0};
    for (std::int32_t const block : ranked_) {
      if ((std::int64_t{block} + 1) * bt > offloaded_tokens) { continue; }
      auto const b = static_cast<std::size_t>(block);
      if (slot_of_[b] >= 0) {
        policy.on_hit(state, static_cast<std::uint32_t>(slot_of_[b]), touch_++);
        r.promoted.push_back(block);
        continue;
      }
      std::uint32_t const slot = size_ < cfg_.capacity_blocks ? size_++ : policy.victim(state);
      std::int32_t const evicted = block_of_[slot];
      if (evicted >= 0) { slot_of_[static_cast<std::size_t>(evicted)] = -1; }
      block_of_[slot] = block;
      slot_of_[b] = static_cast<std::int32_t>(slot);
      policy.on_insert(state, slot, touch_++);
      r.inserts.push_back({block, static_cast<std::int32_t>(slot), evicted, false});
    }
    // A block inserted into a full cache was resident before the step only if
    // an earlier insert of the step evicted it, and then it held that insert's slot.
    for (std::size_t i = 0; i < r.inserts.size(); ++i) {
      auto& ins = r.inserts[i];
      bool held_before = false;
      for (std::size_t j = 0; j < i; ++j) {
        held_before = held_before || (r.inserts[j].evicted == ins.block && r.inserts[j].slot == ins.slot);
      }
      ins.copy = slot_of_[static_cast<std::size_t>(ins.block)] == ins.slot && !held_before;
    }
    return r;
  }

  /// Slot of `block`, -1 when it is not resident.
  [[nodiscard]] std::int32_t lookup(std::int32_t block) const
  {
    PQKV_EXPECTS(block >= 0 && static_cast<std::size_t>(block) < slot_of_.size(), "block_lfu_cache.lookup",
                 "block=", block, " is outside [0, ", slot_of_.size(), ")");
    return slot_of_[static_cast<std::size_t>(block)];
  }

  /// Block held by `slot`, -1 when the slot is free.
  [[nodiscard]] std::int32_t block_at(std::uint32_t slot) const
  {
    PQKV_EXPECTS(slot < cfg_.capacity_blocks, "block_lfu_cache.block_at", "slot=", slot,
                 " >= capacity_blocks=", cfg_.capacity_blocks);
    return block_of_[slot];
  }

  /// Use count of `block`, 0 when it is not resident.
  [[nodiscard]] std::uint32_t use_count(std::int32_t block) const
  {
    std::int32_t const slot = lookup(block);
    return slot < 0 ? 0u : static_cast<std::uint32_t>(use_[static_cast<std::size_t>(slot)]);
  }

  /// Resident blocks.
  [[nodiscard]] std::uint32_t size() const noexcept { return size_; }
  [[nodiscard]] block_lfu_config const& config() const noexcept { return cfg_; }

  /// Empties the cache, as PQCache does at each prefill.
  void reset()
  {
    for (std::int32_t const block : block_of_) {
      if (block >= 0) { slot_of_[static_cast<std::size_t>(block)] = -1; }
    }
    std::fill(block_of_.begin(), block_of_.end(), -1);
    std::fill(use_.begin(), use_.end(), 0.f);
    std::fill(stamp_.begin(), stamp_.end(), 0u);
    size_ = 0;
    touch_ = 0;
    result_ = {};
  }

 private:
  block_lfu_config cfg_;
  std::vector<std::int32_t> slot_of_;   // [max blocks] slot of each block, -1 when not resident
  std::vector<std::uint32_t> count_;    // [max blocks] this step's entries per block; 0 between steps
  std::vector<std::int32_t> block_of_;  // [capacity_blocks] block in each slot, -1 when free
  std::vector<float> use_;              // [capacity_blocks] LFU use counts (the policy's score)
  std::vector<std::uint32_t> stamp_;    // [capacity_blocks] touch of the last use (the policy's stamp)
  std::vector<std::int32_t> ranked_;    // this step's blocks, busiest first
  std::uint32_t size_ = 0;
  std::uint32_t touch_ = 0;
  block_lfu_step result_;
};

}  // namespace pqkv::cpu
