// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file The cache policies on the GPU. The library's policies (`cache::lru`,
/// `cache::lfu`, `cache::fifo`, cache/policy.hpp) are already `PQKV_HD` types
/// over a `cache::slot_state`, so the GPU table (cache/gpu_cache.cuh) runs the
/// very same objects; this header adds what the GPU needs to run them fast.
///
/// Batched victims. When a step has R misses beyond the free slots, the CPU
/// model asks `victim(state)` R times, pinning each chosen slot before the next
/// ask. For a policy whose victim is `slot_state::argmin()` and whose
/// `on_insert` writes only the inserted slot's state, those R answers are
/// exactly the R first evictable slots in (score, stamp, slot) order as they
/// stood before the first insert: an insert only pins (removes) its own slot.
/// The GPU then picks all R in one block-wide radix select instead of R
/// scans. A policy opts in with `static constexpr bool victim_is_argmin = true`
/// (or a specialization of `victim_is_argmin_v`); any other policy runs its
/// `victim` serially, one ask per miss, which is correct for every policy
/// that honours the contract below, just slower.
///
/// Contract for a user policy on the GPU (besides `CachePolicy`): `on_hit`
/// and `on_insert` write only the state of the slot they are given (hits of
/// one step run concurrently, one thread per distinct slot, in no particular
/// order; inserts of one step run concurrently on the batched path), and
/// `victim` reads the state only.

#include <pqkv/cache/policy.hpp>
#include <pqkv/core/concepts.hpp>

#include <type_traits>

namespace pqkv::detail {
template <class P, class = void>
struct declares_argmin : std::false_type {};
template <class P>
struct declares_argmin<P, std::void_t<decltype(P::victim_is_argmin)>> : std::bool_constant<P::victim_is_argmin> {};
}  // namespace pqkv::detail

namespace pqkv::gpu {

/// True when `P::victim` is `slot_state::argmin()` and `on_insert` writes only
/// its slot: the GPU table may pick a step's victims in one batch.
template <class P>
inline constexpr bool victim_is_argmin_v = pqkv::detail::declares_argmin<P>::value;

template <>
inline constexpr bool victim_is_argmin_v<cache::lru> = true;
template <>
inline constexpr bool victim_is_argmin_v<cache::lfu> = true;
template <>
inline constexpr bool victim_is_argmin_v<cache::fifo> = true;

/// A policy the GPU slot table runs: a `CachePolicy` over `cache::slot_state`.
template <class P>
concept GpuCachePolicy = CachePolicy<P> && std::is_same_v<typename P::state_type, cache::slot_state>;

}  // namespace pqkv::gpu
