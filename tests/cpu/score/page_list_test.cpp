// SPDX-License-Identifier: Apache-2.0
// pqkv::cpu page-list helpers: selections -> pages, FlashInfer paged-KV
// arrays and physical slots, on hand-checked rows and on random rows against
// a direct set-based recomputation.
#include <pqkv/core/error.hpp>
#include <pqkv/core/random.hpp>
#include <pqkv/score/page_list.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <set>
#include <span>
#include <vector>

namespace {

using pqkv::index_t;

}  // namespace

TEST_CASE("page_list: hand-checked pages, paged-KV arrays and slots")
{
  // batch 2, kv_heads 2, k 6, P = 4.
  std::vector<std::int32_t> const sel{
    0,  1,  5,  6,  15, -1,   // b0 g0: pages 0 1 3
    3,  4,  7,  8,  -1, -1,   // b0 g1: pages 0 1 2
    -1, -1, -1, -1, -1, -1,   // b1 g0: none
    9,  10, 11, 12, 21, 22};  // b1 g1: pages 2 3 5 (only 4 valid: 2 3)
  std::vector<std::int32_t> const valid{5, 4, 0, 4};
  std::vector<std::int32_t> const table{7, 2, 9, 4, -1, -1,   // b0: page 4, 5 unused
                                        1, 0, 3, 5, 6, 8};
  auto const s = pqkv::make_view(static_cast<std::int32_t const*>(sel.data()), 2, 2, 6);
  auto const v = pqkv::make_view(static_cast<std::int32_t const*>(valid.data()), 2, 2);
  auto const bt = pqkv::make_view(static_cast<std::int32_t const*>(table.data()), 2, 6);

  std::vector<std::int32_t> pages(24, 77), counts(4, 77);
  pqkv::cpu::to_page_indices(s, v, 4, {}, pqkv::make_view(pages.data(), 2, 2, 6), pqkv::make_view(counts.data(), 2, 2));
  CHECK(counts == std::vector<std::int32_t>{3, 3, 0, 2});
  CHECK(pages == std::vector<std::int32_t>{0, 1, 3, -1, -1, -1, 0, 1, 2, -1, -1, -1,
                                           -1, -1, -1, -1, -1, -1, 2, 3, -1, -1, -1, -1});
  pqkv::cpu::to_page_indices(s, v, 4, bt, pqkv::make_view(pages.data(), 2, 2, 6), pqkv::make_view(counts.data(), 2, 2));
  CHECK(counts == std::vector<std::int32_t>{3, 3, 0, 2});
  CHECK(pages == std::vector<std::int32_t>{7, 2, 4, -1, -1, -1, 7, 2, 9, -1, -1, -1,
                                           -1, -1, -1, -1, -1, -1, 3, 5, -1, -1, -1, -1});

  std::vector<std::int32_t> const lens{17, 14};
  std::vector<std::int32_t> indptr(5, 77), indices(24, 77), last(4, 77);
  pqkv::cpu::to_paged_kv(s, v, lens, 4, bt, indptr, indices, last);
  CHECK(indptr == std::vector<std::int32_t>{0, 3, 6, 6, 8});
  CHECK(std::vector<std::int32_t>(indices.begin(), indices.begin() + 8) ==
        std::vector<std::int32_t>{7, 2, 4, 7, 2, 9, 3, 5});
  CHECK(std::all_of(indices.begin() + 8, indices.end(), [](std::int32_t x) { return x == -1; }));
  // b0 g0: last page 3 of a 17-token sequence holds 17 - 12 = 4 -> clamp 4;
  // b0 g1: page 2 -> full; b1 g1: page 3 of 14 tokens -> 2.
  CHECK(last == std::vector<std::int32_t>{4, 4, 0, 2});

  std::vector<std::int32_t> slots(24, 77);
  pqkv::cpu::to_physical_slots(s, 4, bt, pqkv::make_view(slots.data(), 2, 2, 6));
  CHECK(std::vector<std::int32_t>(slots.begin(), slots.begin() + 6) ==
        std::vector<std::int32_t>{28, 29, 9, 10, 19, -1});  // page 3 -> 4: 4*4+3
  CHECK(slots[18] == 3 * 4 + 1);   // t = 9: page 2 -> 3
  CHECK(slots[22] == 8 * 4 + 1);   // t = 21: page 5 -> 8 (all k entries are mapped)
  // A stride other than P (e.g. slots counted in a layer-interleaved pool).
  pqkv::cpu::to_physical_slots(s, 4, bt, pqkv::make_view(slots.data(), 2, 2, 6), 10);
  CHECK(slots[0] == 70);
  CHECK(slots[2] == 21);
}

TEST_CASE("page_list: unmapped pages and bad entries give -1, never a read out of range")
{
  std::vector<std::int32_t> const sel{2, 9, 30, -5};  // batch 1, heads 1, k 4
  std::vector<std::int32_t> const valid{4};
  std::vector<std::int32_t> const table{3, -1};       // page 1 unmapped, pages >= 2 outside the table
  auto const s = pqkv::make_view(static_cast<std::int32_t const*>(sel.data()), 1, 1, 4);
  auto const v = pqkv::make_view(static_cast<std::int32_t const*>(valid.data()), 1, 1);
  auto const bt = pqkv::make_view(static_cast<std::int32_t const*>(table.data()), 1, 2);
  std::vector<std::int32_t> pages(4), counts(1);
  pqkv::cpu::to_page_indices(s, v, 8, bt, pqkv::make_view(pages.data(), 1, 1, 4), pqkv::make_view(counts.data(), 1, 1));
  CHECK(counts[0] == 3);
  CHECK(pages == std::vector<std::int32_t>{3, -1, -1, -1});
  std::vector<std::int32_t> slots(4);
  pqkv::cpu::to_physical_slots(s, 8, bt, pqkv::make_view(slots.data(), 1, 1, 4));
  CHECK(slots == std::vector<std::int32_t>{26, -1, -1, -1});
  // A slot past INT32_MAX is -1 too.
  std::vector<std::int32_t> const big{2147483647};
  pqkv::cpu::to_physical_slots(s, 8, pqkv::make_view(static_cast<std::int32_t const*>(big.data()), 1, 1),
                               pqkv::make_view(slots.data(), 1, 1, 4));
  CHECK(slots[0] == -1);
  // Counts outside [0, k] are clamped.
  std::vector<std::int32_t> const over{9};
  pqkv::cpu::to_page_indices(s, pqkv::make_view(static_cast<std::int32_t const*>(over.data()), 1, 1), 8, {},
                             pqkv::make_view(pages.data(), 1, 1, 4), pqkv::make_view(counts.data(), 1, 1));
  CHECK(counts[0] == 3);
  CHECK(pages == std::vector<std::int32_t>{0, 1, 3, -1});
}

TEST_CASE("page_list: random ascending selections match a set-based recomputation")
{
  for (index_t page : {index_t{1}, index_t{7}, index_t{16}, index_t{64}}) {
    index_t const batch = 3, heads = 2, k = 40, n = 700;
    index_t const width = (n + page - 1) / page + 2;  // two unused entries per row
    std::vector<std::int32_t> sel(static_cast<std::size_t>(batch * heads * k), -1), valid(
      static_cast<std::size_t>(batch * heads));
    std::vector<std::int32_t> table(static_cast<std::size_t>(batch * width), -1);
    std::vector<std::int32_t> lens(static_cast<std::size_t>(batch));
    std::uint64_t const seed = 100 + static_cast<std::uint64_t>(page);
    for (index_t b = 0; b < batch; ++b) {
      lens[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(n - 50 * b);
      for (index_t p = 0; p < width - 2; ++p) {
        table[static_cast<std::size_t>(b * width + p)] =
          static_cast<std::int32_t>(pqkv::detail::random_below(seed, 1, static_cast<std::uint64_t>(b * width + p), 5000));
      }
      for (index_t g = 0; g < heads; ++g) {
        std::set<std::int32_t> picked;
        index_t const want = static_cast<index_t>(pqkv::detail::random_below(seed, 2, static_cast<std::uint64_t>(b * heads + g), k + 1));
        for (std::uint64_t i = 0; static_cast<index_t>(picked.size()) < want; ++i) {
          picked.insert(static_cast<std::int32_t>(pqkv::detail::random_below(seed, 3 + static_cast<std::uint64_t>(b * heads + g), i,
                                                                            static_cast<std::uint64_t>(lens[static_cast<std::size_t>(b)]))));
        }
        std::copy(picked.begin(), picked.end(), sel.begin() + (b * heads + g) * k);
        valid[static_cast<std::size_t>(b * heads + g)] = static_cast<std::int32_t>(want);
      }
    }
    auto const s = pqkv::make_view(static_cast<std::int32_t const*>(sel.data()), batch, heads, k);
    auto const v = pqkv::make_view(static_cast<std::int32_t const*>(valid.data()), batch, heads);
    auto const bt = pqkv::make_view(static_cast<std::int32_t const*>(table.data()), batch, width);
    std::vector<std::int32_t> pages(sel.size()), counts(valid.size());
    pqkv::cpu::to_page_indices(s, v, page, bt, pqkv::make_view(pages.data(), batch, heads, k),
                               pqkv::make_view(counts.data(), batch, heads));
    std::vector<std::int32_t> indptr(static_cast<std::size_t>(batch * heads + 1)), indices(sel.size()),
      last(valid.size());
    pqkv::cpu::to_paged_kv(s, v, lens, page, bt, indptr, indices, last);
    for (index_t b = 0; b < batch; ++b) {
      for (index_t g = 0; g < heads; ++g) {
        index_t const row = b * heads + g;
        std::set<std::int64_t> logical;
        for (index_t i = 0; i < valid[static_cast<std::size_t>(row)]; ++i) { logical.insert(sel[static_cast<std::size_t>(row * k + i)] / page); }
        CAPTURE(page);
        CAPTURE(row);
        REQUIRE(counts[static_cast<std::size_t>(row)] == static_cast<std::int32_t>(logical.size()));
        REQUIRE(indptr[static_cast<std::size_t>(row + 1)] - indptr[static_cast<std::size_t>(row)] ==
                static_cast<std::int32_t>(logical.size()));
        index_t i = 0;
        for (std::int64_t p : logical) {
          std::int32_t const phys = table[static_cast<std::size_t>(b * width + p)];
          CHECK(pages[static_cast<std::size_t>(row * k + i)] == phys);
          CHECK(indices[static_cast<std::size_t>(indptr[static_cast<std::size_t>(row)] + i)] == phys);
          ++i;
        }
        for (; i < k; ++i) { CHECK(pages[static_cast<std::size_t>(row * k + i)] == -1); }
        if (logical.empty()) {
          CHECK(last[static_cast<std::size_t>(row)] == 0);
        } else {
          std::int64_t const l = lens[static_cast<std::size_t>(b)] - *logical.rbegin() * page;
          CHECK(last[static_cast<std::size_t>(row)] == static_cast<std::int32_t>(std::min<std::int64_t>(l, page)));
        }
      }
    }
    std::vector<std::int32_t> slots(sel.size());
    pqkv::cpu::to_physical_slots(s, page, bt, pqkv::make_view(slots.data(), batch, heads, k));
    for (std::size_t i = 0; i < sel.size(); ++i) {
      std::int32_t const t = sel[i];
      index_t const b = static_cast<index_t>(i) / (heads * k);
      std::int32_t const want = t < 0 ? -1
                                      : static_cast<std::int32_t>(table[static_cast<std::size_t>(b * width + t / page)] * page + t % page);
      CHECK(slots[i] == want);
    }
  }
}

TEST_CASE("page_list: bad arguments throw pqkv::error naming them, outputs untouched")
{
  std::vector<std::int32_t> const sel(12, -1), valid(4, 0), table(4, 0);
  auto const s = pqkv::make_view(static_cast<std::int32_t const*>(sel.data()), 2, 2, 3);
  auto const v = pqkv::make_view(static_cast<std::int32_t const*>(valid.data()), 2, 2);
  auto const bt = pqkv::make_view(static_cast<std::int32_t const*>(table.data()), 2, 2);
  std::vector<std::int32_t> pages(12, 77), counts(4, 77);
  auto const pv = pqkv::make_view(pages.data(), 2, 2, 3);
  auto const cv = pqkv::make_view(counts.data(), 2, 2);
  CHECK_THROWS_WITH_AS(pqkv::cpu::to_page_indices(s, v, 0, {}, pv, cv), doctest::Contains("page_size=0"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::to_page_indices(s, v, 4, {}, pqkv::make_view(pages.data(), 2, 2, 2), cv),
                       doctest::Contains("pages.extent(2)=2"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::to_page_indices(s, pqkv::make_view(static_cast<std::int32_t const*>(valid.data()), 2, 1),
                                                  4, {}, pv, cv),
                       doctest::Contains("valid_counts extents"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::to_page_indices(s, v, 4, pqkv::make_view(static_cast<std::int32_t const*>(table.data()), 1, 4),
                                                  pv, cv),
                       doctest::Contains("block_table.extent(0)=1"), pqkv::error);
  CHECK(std::all_of(pages.begin(), pages.end(), [](std::int32_t x) { return x == 77; }));
  CHECK(std::all_of(counts.begin(), counts.end(), [](std::int32_t x) { return x == 77; }));

  std::vector<std::int32_t> const lens{3, 3};
  std::vector<std::int32_t> indptr(5, 77), indices(12, 77), last(4, 77);
  CHECK_THROWS_WITH_AS(pqkv::cpu::to_paged_kv(s, v, lens, 4, bt, std::span(indptr).first(4), indices, last),
                       doctest::Contains("kv_indptr.size()=4"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::to_paged_kv(s, v, lens, 4, bt, indptr, std::span(indices).first(11), last),
                       doctest::Contains("kv_indices.size()=11"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::to_paged_kv(s, v, std::span(lens).first(1), 4, bt, indptr, indices, last),
                       doctest::Contains("seq_lens.size()=1"), pqkv::error);
  CHECK(std::all_of(indptr.begin(), indptr.end(), [](std::int32_t x) { return x == 77; }));

  std::vector<std::int32_t> slots(12, 77);
  CHECK_THROWS_WITH_AS(pqkv::cpu::to_physical_slots(s, 4, {}, pqkv::make_view(slots.data(), 2, 2, 3)),
                       doctest::Contains("block_table is required"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::to_physical_slots(s, 4, bt, pqkv::make_view(slots.data(), 2, 2, 3), -1),
                       doctest::Contains("page_stride=-1"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::to_physical_slots(s, 4, bt, pqkv::make_view(slots.data(), 2, 3, 2)),
                       doctest::Contains("slots extents"), pqkv::error);
  CHECK(std::all_of(slots.begin(), slots.end(), [](std::int32_t x) { return x == 77; }));
}
