// SPDX-License-Identifier: Apache-2.0
#include <pqkv/cache/block_lfu.hpp>
#include <pqkv/core/random.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <list>
#include <map>
#include <utility>
#include <vector>

namespace {

using pqkv::cpu::block_insert;
using pqkv::cpu::block_lfu_cache;
using pqkv::cpu::block_lfu_config;

/// A selection [heads, k] held in a vector.
struct selection {
  pqkv::index_t heads, k;
  std::vector<std::int32_t> data;
  [[nodiscard]] pqkv::selection_view<std::int32_t const> view() const { return pqkv::make_view(data.data(), heads, k); }
};

std::vector<std::int32_t> ints(std::initializer_list<std::int32_t> v) { return v; }

/// PQCache's LFU structure, rebuilt independently: buckets of equal use in
/// ascending use; a block enters its bucket at the front, the victim is the
/// back of the lowest bucket. Slots: a counter while not full, then the
/// victim's slot.
class pqcache_model {
 public:
  pqcache_model(int capacity, int block_tokens, int blocks_per_step)
      : cap_{capacity}, bt_{block_tokens}, bps_{blocks_per_step}
  {
  }

  struct result {
    long hits = 0, misses = 0;
    std::vector<std::int32_t> promoted;
    std::vector<block_insert> inserts;
    std::vector<std::int32_t> rows;
  };

  result step(selection const& sel, long offloaded)
  {
    result r;
    std::map<int, long> count;
    for (std::int32_t const pos : sel.data) {
      if (pos < 0) {
        r.rows.push_back(-1);
        continue;
      }
      int const b = pos / bt_;
      ++count[b];
      auto it = slot_.find(b);
      if (it == slot_.end()) {
        ++r.misses;
        r.rows.push_back(-1);
      } else {
        ++r.hits;
        r.rows.push_back(it->second * bt_ + pos % bt_);
      }
    }
    std::vector<std::pair<long, int>> ranked;  // (-count, block): ascending = busiest first, then lower block
    for (auto const& [b, c] : count) { ranked.emplace_back(-c, b); }
    std::sort(ranked.begin(), ranked.end());
    if (ranked.size() > static_cast<std::size_t>(bps_)) { ranked.resize(static_cast<std::size_t>(bps_)); }
    std::map<int, int> const before = slot_;
    for (auto const& [neg_count, b] : ranked) {
      if (static_cast<long>(b + 1) * bt_ > offloaded) { continue; }
      if (slot_.count(b) != 0) {
        long const u = use_[b];
        bucket_[u].remove(b);
        if (bucket_[u].empty()) { bucket_.erase(u); }
        bucket_[u + 1].push_front(b);
        use_[b] = u + 1;
        r.promoted.push_back(b);
        continue;
      }
      int slot = -1, evicted = -1;
      if (static_cast<int>(slot_.size()) == cap_) {
        auto low = bucket_.begin();
        evicted = low->second.back();
        low->second.pop_back();
        if (low->second.empty()) { bucket_.erase(low); }
        slot = slot_[evicted];
        slot_.erase(evicted);
        use_.erase(evicted);
      } else {
        slot = next_slot_++;
      }
      slot_[b] = slot;
      use_[b] = 1;
      bucket_[1].push_front(b);
      r.inserts.push_back({b, slot, evicted, false});
    }
    for (auto& ins : r.inserts) {  // PQCache's copy loop: new slot >= 0 and old slot != new slot
      auto now = slot_.find(ins.block);
      auto old = before.find(ins.block);
      ins.copy = now != slot_.end() && now->second == ins.slot && (old == before.end() || old->second != ins.slot);
    }
    return r;
  }

  void reset()
  {
    slot_.clear();
    use_.clear();
    bucket_.clear();
    next_slot_ = 0;
  }

  [[nodiscard]] int lookup(int block) const
  {
    auto it = slot_.find(block);
    return it == slot_.end() ? -1 : it->second;
  }
  [[nodiscard]] long use(int block) const
  {
    auto it = use_.find(block);
    return it == use_.end() ? 0 : it->second;
  }

 private:
  int cap_, bt_, bps_;
  int next_slot_ = 0;
  std::map<int, int> slot_;
  std::map<int, long> use_;
  std::map<long, std::list<int>> bucket_;
};

}  // namespace

TEST_CASE("block_lfu: the busiest blocks enter first, ties by lower block; hits serve from the next step")
{
  block_lfu_cache cache{{.capacity_blocks = 2, .block_tokens = 4, .blocks_per_step = 2, .max_tokens = 64}};
  // block 0: positions 0, 1; block 1: 4, 5; block 2: 8, 9, 10 (counts over both heads)
  selection const sel{2, 4, ints({0, 4, 5, 8, 9, 10, 1, -1})};
  std::vector<std::int32_t> rows(8, 7);
  auto const rows_view = pqkv::make_view(rows.data(), 2, 4);
  auto const& s1 = cache.step(sel.view(), 64, rows_view);
  CHECK(s1.token_hits == 0);
  CHECK(s1.token_misses == 7);
  CHECK(rows == std::vector<std::int32_t>(8, -1));  // new blocks are copied after the step's misses
  CHECK(s1.inserts == std::vector<block_insert>{{2, 0, -1, true}, {0, 1, -1, true}});
  CHECK(s1.promoted.empty());
  CHECK(cache.lookup(1) == -1);  // count 2 ties block 0, which has the lower index
  CHECK(cache.size() == 2);

  auto const& s2 = cache.step(sel.view(), 64, rows_view);
  CHECK(s2.token_hits == 5);
  CHECK(s2.token_misses == 2);
  // rows: slot * 4 + position % 4; block 2 is in slot 0, block 0 in slot 1
  CHECK(rows == ints({4, -1, -1, 0, 1, 2, 5, -1}));
  CHECK(s2.promoted == ints({2, 0}));
  CHECK(s2.inserts.empty());
  CHECK(cache.use_count(2) == 2);
  CHECK(cache.use_count(0) == 2);
  CHECK(cache.use_count(1) == 0);
}

TEST_CASE("block_lfu: a block gains one use per step however many of its tokens are selected")
{
  block_lfu_cache cache{{.capacity_blocks = 4, .block_tokens = 128, .blocks_per_step = 4, .max_tokens = 1024}};
  std::vector<std::int32_t> many;
  for (std::int32_t h = 0; h < 8; ++h) {
    for (std::int32_t j = 0; j < 16; ++j) { many.push_back(256 + j * 8 + h); }
  }
  selection const sel{8, 16, many};
  cache.step(sel.view(), 1024);
  CHECK(cache.use_count(2) == 1);
  for (int t = 0; t < 5; ++t) {
    auto const& s = cache.step(sel.view(), 1024);
    CHECK(s.token_hits == 128);
  }
  CHECK(cache.use_count(2) == 6);
}

TEST_CASE("block_lfu: the victim has the lowest use, then was touched least recently")
{
  block_lfu_config const cfg{.capacity_blocks = 2, .block_tokens = 4, .blocks_per_step = 2, .max_tokens = 64};
  auto one_block = [](std::int32_t block, int tokens) {
    std::vector<std::int32_t> v;
    for (int i = 0; i < tokens; ++i) { v.push_back(block * 4 + i % 4); }
    return selection{1, static_cast<pqkv::index_t>(v.size()), v};
  };
  {
    block_lfu_cache cache{cfg};
    // Block 0 (3 tokens) is busier, so it is processed, and stamped, before block 1.
    selection const both{1, 4, ints({0, 1, 2, 4})};
    CHECK(cache.step(both.view(), 64).inserts == std::vector<block_insert>{{0, 0, -1, true}, {1, 1, -1, true}});
    // Equal use 1: block 0 reached it first and goes, though it was the busier block.
    CHECK(cache.step(one_block(3, 1).view(), 64).inserts == std::vector<block_insert>{{3, 0, 0, true}});
    CHECK(cache.step(one_block(1, 1).view(), 64).promoted == ints({1}));  // block 1: use 2
    CHECK(cache.step(one_block(5, 1).view(), 64).evicted_blocks() == ints({3}));  // lowest use
  }
  // Oldest means "reached its count first", not "inserted first".
  for (bool x_first : {true, false}) {
    CAPTURE(x_first);
    block_lfu_cache cache{cfg};
    selection const both{1, 3, ints({8, 8, 12})};  // X = block 2 then Y = block 3
    cache.step(both.view(), 64);
    cache.step(one_block(x_first ? 2 : 3, 1).view(), 64);
    cache.step(one_block(x_first ? 3 : 2, 1).view(), 64);
    CHECK(cache.use_count(2) == 2);
    CHECK(cache.use_count(3) == 2);
    auto const& s = cache.step(one_block(9, 1).view(), 64);
    CHECK(s.evicted_blocks() == ints({x_first ? 2 : 3}));
  }
}

TEST_CASE("block_lfu: blocks not fully offloaded are not inserted but use up their rank")
{
  block_lfu_config cfg{.capacity_blocks = 4, .block_tokens = 4, .blocks_per_step = 1, .max_tokens = 64};
  selection const sel{1, 3, ints({4, 5, 0})};  // block 1: 2 tokens, block 0: 1 token
  {
    block_lfu_cache cache{cfg};
    auto const& s = cache.step(sel.view(), 6);  // positions 6, 7 of block 1 are not offloaded
    CHECK(s.inserts.empty());  // block 1 took the only place and was dropped
    CHECK(s.token_misses == 3);
    CHECK(cache.step(sel.view(), 8).inserts == std::vector<block_insert>{{1, 0, -1, true}});
  }
  cfg.blocks_per_step = 2;
  {
    block_lfu_cache cache{cfg};
    CHECK(cache.step(sel.view(), 7).inserts == std::vector<block_insert>{{0, 0, -1, true}});
    CHECK(cache.lookup(1) == -1);
    CHECK(cache.step(sel.view(), 0).inserts.empty());  // nothing offloaded: nothing enters
    CHECK(cache.step(sel.view(), 0).token_hits == 1);  // residents still serve hits
  }
}

TEST_CASE("block_lfu: an insert may evict a block inserted or touched earlier in the same step")
{
  {
    block_lfu_cache cache{{.capacity_blocks = 1, .block_tokens = 4, .blocks_per_step = 3, .max_tokens = 64}};
    selection const sel{1, 6, ints({0, 1, 2, 4, 5, 8})};  // block 0: 3, block 1: 2, block 2: 1
    auto const& s = cache.step(sel.view(), 64);
    CHECK(s.inserts == std::vector<block_insert>{{0, 0, -1, false}, {1, 0, 0, false}, {2, 0, 1, true}});
    CHECK(s.evicted_blocks() == ints({0, 1}));
    CHECK(cache.lookup(2) == 0);
    CHECK(cache.size() == 1);
  }
  {
    // Resident X = block 1 is evicted by the busier new block 0, then re-enters
    // the same slot with use 1: no copy is needed, the rows never left.
    block_lfu_cache cache{{.capacity_blocks = 1, .block_tokens = 4, .blocks_per_step = 2, .max_tokens = 64}};
    selection const x{1, 1, ints({4})};
    cache.step(x.view(), 64);
    cache.step(x.view(), 64);
    CHECK(cache.use_count(1) == 2);
    selection const sel{1, 3, ints({0, 1, 6})};
    auto const& s = cache.step(sel.view(), 64);
    CHECK(s.token_hits == 1);
    CHECK(s.inserts == std::vector<block_insert>{{0, 0, 1, false}, {1, 0, 0, false}});
    CHECK(cache.use_count(1) == 1);
  }
  {
    // The same with two slots: X moves to the other slot and must be copied there.
    block_lfu_cache cache{{.capacity_blocks = 2, .block_tokens = 4, .blocks_per_step = 3, .max_tokens = 64}};
    selection const xy{1, 3, ints({20, 21, 24})};  // X = block 5 (slot 0), Y = block 6 (slot 1)
    cache.step(xy.view(), 64);
    selection const sel{1, 5, ints({0, 1, 2, 20, 21})};  // A = block 0 (3 tokens), then X (2 tokens)
    auto const& s = cache.step(sel.view(), 64);
    CHECK(s.inserts == std::vector<block_insert>{{0, 0, 5, true}, {5, 1, 6, true}});
    CHECK(s.token_hits == 2);
  }
}

TEST_CASE("block_lfu: counts never decay and reset empties the cache")
{
  block_lfu_cache cache{{.capacity_blocks = 2, .block_tokens = 4, .blocks_per_step = 2, .max_tokens = 64}};
  selection const hot{1, 1, ints({0})};
  for (int t = 0; t < 20; ++t) { cache.step(hot.view(), 64); }
  selection const other{1, 1, ints({8})};
  for (int t = 0; t < 10; ++t) { cache.step(other.view(), 64); }
  CHECK(cache.use_count(0) == 20);  // idle for 10 steps, still 20
  CHECK(cache.use_count(2) == 10);
  cache.reset();
  CHECK(cache.size() == 0);
  CHECK(cache.lookup(0) == -1);
  CHECK(cache.use_count(2) == 0);
  auto const& s = cache.step(hot.view(), 64);
  CHECK(s.token_hits == 0);
  CHECK(s.inserts == std::vector<block_insert>{{0, 0, -1, true}});
  CHECK(cache.block_at(0) == 0);
  CHECK(cache.block_at(1) == -1);
}

TEST_CASE("block_lfu: padding and empty selections change nothing")
{
  block_lfu_cache cache{{.capacity_blocks = 2, .block_tokens = 4, .blocks_per_step = 2, .max_tokens = 64}};
  selection const pad{2, 3, std::vector<std::int32_t>(6, -1)};
  auto const& s = cache.step(pad.view(), 64);
  CHECK(s.token_hits + s.token_misses == 0);
  CHECK(s.inserts.empty());
  CHECK(cache.step(pqkv::selection_view<std::int32_t const>{}, 64).inserts.empty());
  CHECK(cache.size() == 0);
}

TEST_CASE("block_lfu: matches a model built like PQCache's LFU on random traces")
{
  using pqkv::detail::random_below;
  for (std::uint32_t bps : {2u, 5u, 8u}) {
    CAPTURE(bps);
    block_lfu_config const cfg{.capacity_blocks = 5, .block_tokens = 8, .blocks_per_step = bps, .max_tokens = 256};
    block_lfu_cache cache{cfg};
    pqcache_model model{5, 8, static_cast<int>(bps)};
    std::uint64_t c = 0;
    auto draw = [&](std::uint64_t n) { return random_below(99, bps, c++, n); };
    long hits = 0, inserts = 0, evictions = 0;
    std::vector<std::int32_t> rows(12);
    for (int t = 0; t < 2000; ++t) {
      long const offloaded = std::min<long>(256, 100 + t / 10);
      selection sel{2, 6, std::vector<std::int32_t>(12)};
      std::uint64_t const hot = draw(4);  // a few hot blocks at a time, with noise around them
      for (auto& pos : sel.data) {
        std::uint64_t const r = draw(10);
        pos = r == 0   ? -1
              : r < 7 ? static_cast<std::int32_t>(std::min<std::uint64_t>(255, (hot * 3 + draw(3)) * 8 + draw(8)))
                      : static_cast<std::int32_t>(draw(256));
      }
      auto const& got = cache.step(sel.view(), offloaded, pqkv::make_view(rows.data(), 2, 6));
      auto const want = model.step(sel, offloaded);
      REQUIRE(got.token_hits == want.hits);
      REQUIRE(got.token_misses == want.misses);
      REQUIRE(rows == want.rows);
      REQUIRE(got.promoted == want.promoted);
      REQUIRE(got.inserts == want.inserts);
      for (std::int32_t b = 0; b < 32; ++b) {
        REQUIRE(cache.lookup(b) == model.lookup(b));
        REQUIRE(cache.use_count(b) == static_cast<std::uint32_t>(model.use(b)));
      }
      hits += got.token_hits;
      inserts += static_cast<long>(got.inserts.size());
      evictions += static_cast<long>(got.evicted_blocks().size());
      if (draw(500) == 0) {
        cache.reset();
        model.reset();
      }
    }
    CHECK(hits > 2000);
    CHECK(inserts > 200);
    CHECK(evictions > 100);
  }
}

TEST_CASE("block_lfu: each bad argument throws pqkv::error naming it, and leaves the cache as it was")
{
  using doctest::Contains;
  block_lfu_config const good{.capacity_blocks = 2, .block_tokens = 4, .blocks_per_step = 2, .max_tokens = 64};
  auto with = [&](auto edit) {
    block_lfu_config c = good;
    edit(c);
    return c;
  };
  CHECK_THROWS_WITH_AS(block_lfu_cache{with([](auto& c) { c.capacity_blocks = 0; })},
                       Contains("block_lfu_cache: capacity_blocks=0"), pqkv::error);
  CHECK_THROWS_WITH_AS(block_lfu_cache{with([](auto& c) { c.block_tokens = 0; })}, Contains("block_tokens=0"),
                       pqkv::error);
  CHECK_THROWS_WITH_AS(block_lfu_cache{with([](auto& c) { c.blocks_per_step = 0; })}, Contains("blocks_per_step=0"),
                       pqkv::error);
  CHECK_THROWS_WITH_AS(block_lfu_cache{with([](auto& c) { c.max_tokens = 0; })}, Contains("max_tokens=0"),
                       pqkv::error);
  CHECK_THROWS_WITH_AS(block_lfu_cache{with([](auto& c) { c.max_tokens = 1LL << 31; })},
                       Contains("max_tokens=2147483648"), pqkv::error);
  CHECK_THROWS_WITH_AS(block_lfu_cache{with([](auto& c) {
                         c.capacity_blocks = 1u << 20;
                         c.block_tokens = 1u << 12;
                       })},
                       Contains("capacity_blocks=1048576 x block_tokens=4096"), pqkv::error);
  CHECK_THROWS_WITH_AS(block_lfu_cache{block_lfu_config{}}, Contains("block_lfu_cache: max_tokens=0"), pqkv::error);

  block_lfu_cache cache{good};
  selection const ok{1, 2, ints({0, 1})};
  cache.step(ok.view(), 64);
  selection const far{1, 2, ints({3, 64})};
  CHECK_THROWS_WITH_AS(cache.step(far.view(), 64),
                       Contains("pqkv::error: block_lfu_cache.step: selection(0, 1)=64 >= max_tokens=64 (cache/block_lfu.hpp:"),
                       pqkv::error);
  CHECK(cache.use_count(0) == 1);  // the failed step changed nothing
  CHECK_THROWS_WITH_AS(cache.step(ok.view(), 65), Contains("offloaded_tokens=65"), pqkv::error);
  CHECK_THROWS_WITH_AS(cache.step(ok.view(), -1), Contains("offloaded_tokens=-1"), pqkv::error);
  std::vector<std::int32_t> rows(4);
  CHECK_THROWS_WITH_AS(cache.step(ok.view(), 64, pqkv::make_view(rows.data(), 2, 2)),
                       Contains("rows is [2, 2], selection is [1, 2]"), pqkv::error);
  CHECK_THROWS_WITH_AS(cache.step(ok.view(), 64, pqkv::make_view(static_cast<std::int32_t*>(nullptr), 1, 2)),
                       Contains("rows.data_handle() is null"), pqkv::error);
  CHECK_THROWS_WITH_AS(cache.step(pqkv::make_view(static_cast<std::int32_t const*>(nullptr), 1, 2), 64),
                       Contains("selection.data_handle() is null"), pqkv::error);
  CHECK(cache.use_count(0) == 1);
  CHECK_THROWS_WITH_AS((void)cache.lookup(16), Contains("block_lfu_cache.lookup: block=16"), pqkv::error);
  CHECK_THROWS_WITH_AS((void)cache.lookup(-1), Contains("block=-1"), pqkv::error);
  CHECK_THROWS_WITH_AS((void)cache.block_at(2), Contains("block_lfu_cache.block_at: slot=2"), pqkv::error);
}
