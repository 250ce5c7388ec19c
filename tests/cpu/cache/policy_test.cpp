// SPDX-License-Identifier: Apache-2.0
#include <pqkv/cache/policy.hpp>
#include <pqkv/cache/slot_table.hpp>
#include <pqkv/core/random.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <list>
#include <map>
#include <set>
#include <tuple>
#include <vector>

namespace {

using pqkv::cpu::reserve;
using pqkv::cpu::slot_insert;
using pqkv::cpu::slot_table;

/// Independent model of the slot-table contract: explicit recency lists for
/// LRU and FIFO, a brute-force minimum over (uses, last step, slot) for LFU.
enum class kind { lru, lfu, fifo };

class oracle {
 public:
  oracle(kind k, int capacity, bool reserve_newest) : k_{k}, managed_{capacity - (reserve_newest ? 1 : 0)}
  {
    reset();
  }

  void reset()
  {
    slot_of_.clear();
    key_at_.assign(static_cast<std::size_t>(managed_), -1);
    uses_.assign(static_cast<std::size_t>(managed_), 0);
    last_.assign(static_cast<std::size_t>(managed_), 0);
    queued_.assign(static_cast<std::size_t>(managed_), 0);
    free_.clear();
    for (int s = 0; s < managed_; ++s) { free_.insert(s); }
    order_.clear();
  }

  struct result {
    std::vector<std::int32_t> slots;
    std::vector<std::uint8_t> hit;
    std::vector<slot_insert> inserts;
  };

  result access(std::vector<std::int32_t> const& keys, std::uint32_t step, std::int32_t newest)
  {
    result r{std::vector<std::int32_t>(keys.size(), -1), std::vector<std::uint8_t>(keys.size(), 0), {}};
    std::set<int> pinned;
    std::vector<int> touched;  // slots used this step, re-queued at the end (LRU) or queued (FIFO inserts)
    for (std::size_t i = 0; i < keys.size(); ++i) {
      int const key = keys[i];
      if (key < 0) { continue; }
      if (key == newest) {
        r.slots[i] = managed_;
        r.hit[i] = 1;
        continue;
      }
      auto it = slot_of_.find(key);
      if (it == slot_of_.end()) { continue; }
      r.slots[i] = it->second;
      r.hit[i] = 1;
      if (pinned.insert(it->second).second) {
        ++uses_[static_cast<std::size_t>(it->second)];
        last_[static_cast<std::size_t>(it->second)] = step;
        if (k_ == kind::lru) {
          order_.remove(it->second);
          touched.push_back(it->second);
        }
      }
    }
    for (std::size_t i = 0; i < keys.size(); ++i) {
      int const key = keys[i];
      if (key < 0 || r.hit[i] != 0) { continue; }
      auto it = slot_of_.find(key);
      if (it != slot_of_.end()) {
        r.slots[i] = it->second;
        continue;
      }
      int slot = -1;
      if (!free_.empty()) {
        slot = *free_.begin();
        free_.erase(free_.begin());
      } else {
        slot = victim(pinned);
      }
      if (slot < 0) { continue; }
      int const evicted = key_at_[static_cast<std::size_t>(slot)];
      if (evicted >= 0) {
        slot_of_.erase(evicted);
        order_.remove(slot);
      }
      key_at_[static_cast<std::size_t>(slot)] = key;
      slot_of_[key] = slot;
      uses_[static_cast<std::size_t>(slot)] = 1;
      last_[static_cast<std::size_t>(slot)] = step;
      pinned.insert(slot);
      touched.push_back(slot);
      r.slots[i] = slot;
      r.inserts.push_back({key, slot, evicted});
    }
    // Queue the slots used now behind every older one; equal steps (several
    // calls with one step value) go in slot order.
    std::sort(touched.begin(), touched.end());
    for (int const s : touched) {
      auto pos = order_.end();
      while (pos != order_.begin()) {
        auto const prev = std::prev(pos);
        if (queued_[static_cast<std::size_t>(*prev)] < step || *prev < s) { break; }
        pos = prev;
      }
      order_.insert(pos, s);
      queued_[static_cast<std::size_t>(s)] = step;
    }
    return r;
  }

  void invalidate(int key)
  {
    auto it = slot_of_.find(key);
    if (it == slot_of_.end()) { return; }
    int const slot = it->second;
    slot_of_.erase(it);
    key_at_[static_cast<std::size_t>(slot)] = -1;
    order_.remove(slot);
    free_.insert(slot);
  }

  [[nodiscard]] int lookup(int key) const
  {
    auto it = slot_of_.find(key);
    return it == slot_of_.end() ? -1 : it->second;
  }
  [[nodiscard]] std::size_t size() const { return slot_of_.size(); }
  [[nodiscard]] long uses(int slot) const { return uses_[static_cast<std::size_t>(slot)]; }

 private:
  int victim(std::set<int> const& pinned) const
  {
    if (k_ == kind::lfu) {
      std::tuple<long, std::uint32_t, int> best{0, 0, -1};
      for (int s = 0; s < managed_; ++s) {
        if (pinned.count(s) != 0) { continue; }
        std::tuple<long, std::uint32_t, int> const cand{uses_[static_cast<std::size_t>(s)],
                                                        last_[static_cast<std::size_t>(s)], s};
        if (std::get<2>(best) < 0 || cand < best) { best = cand; }
      }
      return std::get<2>(best);
    }
    for (int const s : order_) {  // front = evicted first; LRU re-queues on hit, FIFO does not
      if (pinned.count(s) == 0) { return s; }
    }
    return -1;
  }

  kind k_;
  int managed_;
  std::map<int, int> slot_of_;
  std::vector<int> key_at_;
  std::vector<long> uses_;
  std::vector<std::uint32_t> last_;    // step of the last use (LFU's age)
  std::vector<std::uint32_t> queued_;  // step at which the slot took its place in order_
  std::set<int> free_;
  std::list<int> order_;
};

template <class Policy>
void check_against_oracle(kind k, std::uint32_t capacity, bool reserve_newest, std::uint64_t seed)
{
  using pqkv::detail::random_below;
  std::int32_t const bound = static_cast<std::int32_t>(2 * capacity + 3);
  slot_table<Policy> table{capacity, bound, Policy{}, reserve_newest ? reserve::newest : reserve::none};
  oracle ref{k, static_cast<int>(capacity), reserve_newest};
  std::uint64_t c = 0;
  auto draw = [&](std::uint64_t n) { return random_below(seed, capacity, c++, n); };
  std::uint32_t step = 0;
  std::size_t hits = 0, inserts = 0, bypassed = 0;
  for (int t = 0; t < 3000; ++t) {
    step += static_cast<std::uint32_t>(draw(3));  // gaps and repeats of the step value
    std::vector<std::int32_t> keys(draw(capacity + 4));
    for (auto& key : keys) { key = draw(10) == 0 ? -1 : static_cast<std::int32_t>(draw(static_cast<std::uint64_t>(bound))); }
    std::int32_t const newest = reserve_newest && draw(2) == 0 ? static_cast<std::int32_t>(draw(static_cast<std::uint64_t>(bound))) : -1;
    auto const& got = table.access(keys, step, newest);
    auto const want = ref.access(keys, step, newest);
    REQUIRE(got.slots == want.slots);
    REQUIRE(got.hit == want.hit);
    REQUIRE(got.inserts == want.inserts);
    std::size_t want_hits = 0, want_misses = 0, want_bypassed = 0;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      if (keys[i] < 0) { continue; }
      want_hits += want.hit[i];
      want_misses += 1 - want.hit[i];
      want_bypassed += want.slots[i] < 0 ? 1 : 0;
    }
    REQUIRE(got.hits == want_hits);
    REQUIRE(got.misses == want_misses);
    REQUIRE(got.bypassed == want_bypassed);
    REQUIRE(table.size() == ref.size());
    hits += got.hits;
    inserts += got.inserts.size();
    bypassed += got.bypassed;
    if (k == kind::lfu) {
      for (std::uint32_t s = 0; s < table.managed_slots(); ++s) {
        if (table.key_at(s) >= 0) { REQUIRE(table.score(s) == static_cast<float>(ref.uses(static_cast<int>(s)))); }
      }
    }
    if (draw(40) == 0) {
      std::vector<std::int32_t> drop{static_cast<std::int32_t>(draw(static_cast<std::uint64_t>(bound))), -1,
                                     static_cast<std::int32_t>(draw(static_cast<std::uint64_t>(bound)))};
      table.invalidate(drop);
      for (int const key : drop) {
        if (key >= 0) { ref.invalidate(key); }
      }
    }
    if (draw(997) == 0) {
      table.reset();
      ref.reset();
      step = 0;
    }
  }
  for (std::int32_t key = 0; key < bound; ++key) { CHECK(table.lookup(key) == ref.lookup(key)); }
  // The trace must exercise hits, inserts and (for small caches) bypasses.
  CHECK(hits > 500);
  CHECK(inserts > 500);
  if (capacity <= 3) { CHECK(bypassed > 0); }
}

/// A user's own policy, as in the style guide: exponentially decayed use counts.
struct decayed_lfu {
  using state_type = pqkv::cache::slot_state;
  float decay = 0.9f;
  PQKV_HD void on_insert(state_type& s, std::uint32_t slot, std::uint32_t step) const
  {
    s.score[slot] = 1.f;
    s.stamp[slot] = step;
  }
  PQKV_HD void on_hit(state_type& s, std::uint32_t slot, std::uint32_t step) const
  {
    s.score[slot] = std::fma(s.score[slot], decay, 1.f);
    s.stamp[slot] = step;
  }
  PQKV_HD std::uint32_t victim(state_type const& s) const { return s.argmin(); }
};
static_assert(pqkv::CachePolicy<decayed_lfu>);

/// A broken policy: always names slot 0, pinned or not.
struct always_zero {
  using state_type = pqkv::cache::slot_state;
  void on_insert(state_type&, std::uint32_t, std::uint32_t) const {}
  void on_hit(state_type&, std::uint32_t, std::uint32_t) const {}
  std::uint32_t victim(state_type const&) const { return 0; }
};

}  // namespace

TEST_CASE("cache policy: argmin orders by score, then stamp, then slot, skipping pinned slots")
{
  std::vector<float> score{2.f, 1.f, 1.f, 1.f, 3.f};
  std::vector<std::uint32_t> stamp{0, 7, 5, 5, 0};
  std::vector<std::uint32_t> pinned{0, 0, 0, 0, 0};
  pqkv::cache::slot_state s{score.data(), stamp.data(), pinned.data(), 5, 1};
  CHECK(s.argmin() == 2);  // score 1, stamp 5, lower slot than 3
  CHECK(s.evicts_before(2, 3));
  CHECK_FALSE(s.evicts_before(3, 2));
  CHECK(s.evicts_before(3, 1));  // older stamp beats lower slot
  CHECK(s.evicts_before(1, 0));  // lower score beats older stamp
  pinned[2] = 1;
  CHECK(s.argmin() == 3);
  pinned[3] = pinned[1] = 1;
  CHECK(s.argmin() == 0);
  std::fill(pinned.begin(), pinned.end(), 1u);
  CHECK(s.argmin() == pqkv::cache::no_slot);
  s.pinned = nullptr;  // nothing pinned
  CHECK(s.argmin() == 2);
  s.capacity = 0;
  CHECK(s.argmin() == pqkv::cache::no_slot);
}

TEST_CASE("cache policy: lru, lfu and fifo write the documented score and stamp")
{
  std::vector<float> score(2, 9.f);
  std::vector<std::uint32_t> stamp(2, 9);
  pqkv::cache::slot_state s{score.data(), stamp.data(), nullptr, 2, 0};
  pqkv::cache::lru{}.on_insert(s, 0, 3);
  pqkv::cache::lru{}.on_hit(s, 0, 5);
  CHECK(score[0] == 0.f);
  CHECK(stamp[0] == 5);
  pqkv::cache::lfu{}.on_insert(s, 1, 4);
  pqkv::cache::lfu{}.on_hit(s, 1, 6);
  pqkv::cache::lfu{}.on_hit(s, 1, 8);
  CHECK(score[1] == 3.f);
  CHECK(stamp[1] == 8);
  pqkv::cache::fifo{}.on_insert(s, 1, 10);
  pqkv::cache::fifo{}.on_hit(s, 1, 12);
  CHECK(score[1] == 0.f);
  CHECK(stamp[1] == 10);
  static_assert(std::is_trivially_copyable_v<pqkv::cache::slot_state>);
}

TEST_CASE("slot_table: matches the oracle on random traces (lru, lfu, fifo; several capacities)")
{
  for (std::uint32_t capacity : {1u, 3u, 8u, 33u}) {
    CAPTURE(capacity);
    check_against_oracle<pqkv::cache::lru>(kind::lru, capacity, false, 11);
    check_against_oracle<pqkv::cache::lfu>(kind::lfu, capacity, false, 12);
    check_against_oracle<pqkv::cache::fifo>(kind::fifo, capacity, false, 13);
    if (capacity >= 2) {
      check_against_oracle<pqkv::cache::lru>(kind::lru, capacity, true, 14);
      check_against_oracle<pqkv::cache::lfu>(kind::lfu, capacity, true, 15);
    }
  }
}

TEST_CASE("slot_table: a cyclic scan one key larger than the cache never hits under lru or fifo")
{
  slot_table<pqkv::cache::lru> lru{4, 16};
  slot_table<pqkv::cache::fifo> fifo{4, 16};
  slot_table<pqkv::cache::lfu> lfu{4, 16};
  std::size_t lru_hits = 0, fifo_hits = 0, lfu_hits = 0;
  for (std::uint32_t t = 0; t < 50; ++t) {
    std::int32_t const key = static_cast<std::int32_t>(t % 5);
    lru_hits += lru.access({&key, 1}, t).hits;
    fifo_hits += fifo.access({&key, 1}, t).hits;
    lfu_hits += lfu.access({&key, 1}, t).hits;
  }
  CHECK(lru_hits == 0);
  CHECK(fifo_hits == 0);
  CHECK(lfu_hits == 0);  // every resident key has use 1 and the oldest goes, as in LRU
  // A scan that fits hits from its second pass on.
  slot_table<pqkv::cache::lru> fits{4, 16};
  std::size_t fit_hits = 0;
  for (std::uint32_t t = 0; t < 40; ++t) {
    std::int32_t const key = static_cast<std::int32_t>(t % 4);
    fit_hits += fits.access({&key, 1}, t).hits;
  }
  CHECK(fit_hits == 36);
}

TEST_CASE("slot_table: lfu keeps a hot key through a scan that flushes lru")
{
  slot_table<pqkv::cache::lfu> lfu{3, 64};
  slot_table<pqkv::cache::lru> lru{3, 64};
  std::int32_t const hot = 7;
  for (std::uint32_t t = 0; t < 5; ++t) {
    lfu.access({&hot, 1}, t);
    lru.access({&hot, 1}, t);
  }
  CHECK(lfu.score(0) == 5.f);
  std::vector<std::int32_t> const scan{20, 21, 22, 23, 24, 25};
  for (std::uint32_t i = 0; i < scan.size(); ++i) {
    lfu.access({&scan[i], 1}, 10 + i);
    lru.access({&scan[i], 1}, 10 + i);
  }
  CHECK(lfu.lookup(hot) == 0);
  CHECK(lru.lookup(hot) == -1);
}

TEST_CASE("slot_table: a repeated key misses once, then hits; lfu counts once per step")
{
  slot_table<pqkv::cache::lfu> table{4, 10};
  std::vector<std::int32_t> const keys{5, 5, 5};
  auto const& first = table.access(keys, 1);
  CHECK(first.slots == std::vector<std::int32_t>{0, 0, 0});
  CHECK(first.hit == std::vector<std::uint8_t>{0, 0, 0});
  CHECK(first.misses == 3);
  CHECK(first.hits == 0);
  REQUIRE(first.inserts.size() == 1);
  CHECK(first.inserts[0] == slot_insert{5, 0, -1});
  CHECK(table.score(0) == 1.f);
  for (std::uint32_t t = 2; t <= 10; ++t) {
    auto const& r = table.access(keys, t);
    CHECK(r.hits == 3);
    CHECK(r.inserts.empty());
  }
  CHECK(table.score(0) == 10.f);
  CHECK(table.stamp(0) == 10);
  CHECK(table.size() == 1);
}

TEST_CASE("slot_table: an all-padding step changes nothing")
{
  slot_table<pqkv::cache::lfu> table{2, 10};
  std::int32_t const one = 3;
  table.access({&one, 1}, 1);
  std::vector<std::int32_t> const pad(6, -1);
  auto const& r = table.access(pad, 2);
  CHECK(r.slots == std::vector<std::int32_t>(6, -1));
  CHECK(r.hits + r.misses + r.bypassed == 0);
  CHECK(r.inserts.empty());
  CHECK(table.score(0) == 1.f);
  CHECK(table.stamp(0) == 1);
  CHECK(table.size() == 1);
  CHECK(table.access({}, 3).slots.empty());
}

TEST_CASE("slot_table: a step never evicts a key it uses, and bypasses misses once all slots are in use")
{
  slot_table<pqkv::cache::lru> table{2, 10};
  std::int32_t const a = 1, b = 2;
  table.access({&a, 1}, 1);
  table.access({&b, 1}, 2);  // a is now the least recently used
  std::vector<std::int32_t> const keys{1, 3, 4, 3};
  auto const& r = table.access(keys, 3);
  CHECK(r.slots == std::vector<std::int32_t>{0, 1, -1, 1});  // 3 evicts b, not the older but pinned a
  CHECK(r.hit == std::vector<std::uint8_t>{1, 0, 0, 0});
  REQUIRE(r.inserts.size() == 1);
  CHECK(r.inserts[0] == slot_insert{3, 1, 2});
  CHECK(r.bypassed == 1);
  CHECK(r.misses == 3);
  CHECK(table.lookup(4) == -1);
  CHECK(table.lookup(2) == -1);
}

TEST_CASE("slot_table: free slots fill lowest first, also after invalidate")
{
  slot_table<pqkv::cache::lru> table{4, 100};
  std::vector<std::int32_t> const fill{40, 41, 42, 43};
  CHECK(table.access(fill, 1).slots == std::vector<std::int32_t>{0, 1, 2, 3});
  std::vector<std::int32_t> const drop{42, -1, 99, 40};  // 99 is not resident: skipped
  table.invalidate(drop);
  CHECK(table.size() == 2);
  CHECK(table.key_at(0) == -1);
  CHECK(table.key_at(2) == -1);
  std::vector<std::int32_t> const next{50, 51, 52};
  auto const& r = table.access(next, 2);
  CHECK(r.slots == std::vector<std::int32_t>{0, 2, 1});  // two free slots, then the LRU victim (slot 1)
  CHECK(r.inserts[2] == slot_insert{52, 1, 41});
  std::vector<std::int32_t> const slots{3, -1, 0};
  table.invalidate_slots(slots);
  CHECK(table.lookup(43) == -1);
  CHECK(table.lookup(50) == -1);
  CHECK(table.size() == 2);
  table.reset();
  CHECK(table.size() == 0);
  for (std::int32_t key : {40, 41, 42, 43, 50, 51, 52}) { CHECK(table.lookup(key) == -1); }
  CHECK(table.access(fill, 0).slots == std::vector<std::int32_t>{0, 1, 2, 3});  // any step after reset
}

TEST_CASE("slot_table: reserve::newest serves the newest token from the last slot")
{
  slot_table<pqkv::cache::lru> table{3, 32, {}, reserve::newest};
  CHECK(table.managed_slots() == 2);
  CHECK(table.reserved_slot() == 2);
  std::vector<std::int32_t> const s1{7, 1, 2, 7};
  auto const& r1 = table.access(s1, 1, 7);
  CHECK(r1.slots == std::vector<std::int32_t>{2, 0, 1, 2});
  CHECK(r1.hit == std::vector<std::uint8_t>{1, 0, 0, 1});
  CHECK(table.lookup(7) == -1);  // never in the map
  std::vector<std::int32_t> const s2{7, 8, 1};  // 7 is no longer the newest: it misses
  auto const& r2 = table.access(s2, 2, 8);
  CHECK(r2.slots == std::vector<std::int32_t>{1, 2, 0});
  CHECK(r2.inserts == std::vector<slot_insert>{{7, 1, 2}});
  slot_table<pqkv::cache::lru> plain{3, 32};
  CHECK(plain.reserved_slot() == -1);
}

TEST_CASE("slot_table: a user policy plugs in, and a copied table keeps its own state")
{
  slot_table<decayed_lfu> table{2, 10, decayed_lfu{0.5f}};
  std::int32_t const key = 4;
  table.access({&key, 1}, 1);
  table.access({&key, 1}, 2);
  table.access({&key, 1}, 3);
  CHECK(table.score(0) == 1.75f);  // (1 * 0.5 + 1) * 0.5 + 1
  auto copy = table;
  std::int32_t const other = 5;
  copy.access({&other, 1}, 4);
  copy.access({&key, 1}, 5);
  CHECK(copy.score(0) == 1.875f);
  CHECK(table.score(0) == 1.75f);
  CHECK(table.size() == 1);
  CHECK(copy.size() == 2);
}

TEST_CASE("slot_table: each bad argument throws pqkv::error naming it, and leaves the table as it was")
{
  using doctest::Contains;
  using lru_table = slot_table<pqkv::cache::lru>;
  CHECK_THROWS_WITH_AS(lru_table(0, 10), Contains("slot_table: capacity=0"), pqkv::error);
  CHECK_THROWS_WITH_AS(lru_table(1, 10, {}, reserve::newest), Contains("capacity=1 leaves no slot"), pqkv::error);
  CHECK_THROWS_WITH_AS(lru_table(4, 0), Contains("key_bound=0"), pqkv::error);
  CHECK_THROWS_WITH_AS(lru_table(4, -3), Contains("key_bound=-3"), pqkv::error);
  CHECK_THROWS_WITH_AS(lru_table(0x80000000u, 10), Contains("capacity=2147483648"), pqkv::error);

  lru_table table{4, 10};
  std::vector<std::int32_t> const ok{1, 2};
  table.access(ok, 5);
  std::vector<std::int32_t> const bad{3, 10};
  CHECK_THROWS_WITH_AS(table.access(bad, 6), Contains("pqkv::error: slot_table.access: keys[1]=10 >= key_bound=10 (cache/slot_table.hpp:"),
                       pqkv::error);
  CHECK(table.lookup(3) == -1);  // nothing of the failed call happened
  CHECK(table.stamp(0) == 5);
  CHECK_THROWS_WITH_AS(table.access(ok, 4), Contains("step=4 is before the previous step=5"), pqkv::error);
  CHECK(table.stamp(0) == 5);
  CHECK_THROWS_WITH_AS(table.access(ok, 6, 3), Contains("newest_key=3 needs a table built with reserve::newest"),
                       pqkv::error);
  CHECK_THROWS_WITH_AS((void)table.lookup(11), Contains("slot_table.lookup: key=11"), pqkv::error);
  CHECK(table.lookup(-1) == -1);
  std::vector<std::int32_t> const far{1, 12};
  CHECK_THROWS_WITH_AS(table.invalidate(far), Contains("slot_table.invalidate: keys[1]=12"), pqkv::error);
  CHECK(table.lookup(1) == 0);  // validated before any slot was freed
  std::vector<std::int32_t> const far_slots{0, 4};
  CHECK_THROWS_WITH_AS(table.invalidate_slots(far_slots), Contains("slots[1]=4"), pqkv::error);
  CHECK(table.lookup(1) == 0);
  CHECK_THROWS_WITH_AS((void)table.key_at(4), Contains("slot_table.key_at: slot=4"), pqkv::error);
  CHECK_THROWS_WITH_AS((void)table.score(9), Contains("slot_table.score: slot=9"), pqkv::error);
  CHECK_THROWS_WITH_AS((void)table.stamp(9), Contains("slot_table.stamp: slot=9"), pqkv::error);

  lru_table reserved{4, 10, {}, reserve::newest};
  CHECK_THROWS_WITH_AS(reserved.access(ok, 1, 10), Contains("newest_key=10 >= key_bound=10"), pqkv::error);
  std::vector<std::int32_t> const reserved_slot{3};
  CHECK_THROWS_WITH_AS(reserved.invalidate_slots(reserved_slot), Contains("slots[0]=3"), pqkv::error);

  slot_table<always_zero> broken{1, 10};
  std::vector<std::int32_t> const two{1, 2};
  CHECK_THROWS_WITH_AS(broken.access(two, 1), Contains("victim slot=0 is out of range or pinned"), pqkv::error);
}
