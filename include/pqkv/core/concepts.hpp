// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file The customization points of pqkv, as C++20 concepts.
///
/// A user's own type that models a concept plugs into the library with no base
/// class and no registration. Each concept takes the backend's trailing
/// execution arguments as `Exec...`: none for the CPU backend, `(workspace,
/// stream)` for the GPU backend; e.g. `Trainer<cpu::kmeans_trainer, float>` and
/// `Trainer<gpu::kmeans_trainer, __half, std::span<std::byte>, cudaStream_t>`.

#include <pqkv/core/config.hpp>
#include <pqkv/core/macros.hpp>
#include <pqkv/core/views.hpp>

#include <concepts>
#include <cstdint>
#include <type_traits>

namespace pqkv {

/// Learns PQ centroids [heads, m, ksub, dsub] from keys [heads, tokens, dim].
/// `config()` tells the shape the trainer was built for; `train` writes every
/// (head, subspace) codebook. Model: `cpu::kmeans_trainer`.
template <class T, class Key, class... Exec>
concept Trainer = requires(T& t, kv_view<Key const> keys, centroids_view<float> centroids, Exec... exec) {
  { t.config() } -> std::convertible_to<pq_config>;
  t.train(keys, centroids, exec...);
};

/// Assigns each sub-vector of keys [heads, tokens, dim] its nearest centroid,
/// writing codes [heads, tokens, m]. Appending a decode step's tokens is
/// encoding into the matching token range of the codes. Model: `cpu::pq_encoder`.
template <class E, class Key, class... Exec>
concept Encoder = requires(E const& e, kv_view<Key const> keys, centroids_view<float const> centroids,
                           codes_view<std::uint8_t> codes, Exec... exec) {
  e.encode(keys, centroids, codes, exec...);
};

/// Picks, for one sequence, the past tokens each KV head should attend to:
/// from queries [q_heads, dim] it writes token indices [kv_heads, k], ascending,
/// -1 padded. The scorer owns (or views) its key representation, PQ codes or
/// any other (exact keys, scalar-quantized keys), so non-PQ scorers fit too.
/// Models: `cpu::pq_scorer`, `cpu::exact_scorer`, `cpu::rq_scorer`.
template <class S, class... Exec>
concept KeyScorer = requires(S& s, query_view<float const> queries, selection_view<std::int32_t> selection,
                             Exec... exec) {
  { s.kv_heads() } -> std::convertible_to<index_t>;
  s.select(queries, selection, exec...);
};

/// How the query heads of one GQA group combine their per-token scores into
/// the KV head's score: `init()`, then `combine(acc, x)` once per q head in
/// head order, then `finish(acc)`. When `needs_softmax` is true the per-head
/// inputs are softmax probabilities over the candidate tokens, not logits.
/// Models: `gqa::sum`, `gqa::max`, `gqa::softmax_sum`.
template <class A>
concept GqaAggregation = std::is_trivially_copyable_v<A> && requires(A const a, float acc, float x) {
  { A::needs_softmax } -> std::convertible_to<bool>;
  { a.init() } -> std::same_as<float>;
  { a.combine(acc, x) } -> std::same_as<float>;
  { a.finish(acc) } -> std::same_as<float>;
};

/// Replacement policy of a fixed-capacity cache: the slot table keeps the
/// key -> slot map and fills free slots first; the policy only scores slots.
/// `on_insert` when a key enters a slot, `on_hit` when a resident key is used
/// again (at most once per step), `victim` picks the slot to evict once all are
/// full. Passed by value into kernels, so trivially copyable, and its functions
/// are `PQKV_HD`. On the GPU (`gpu::slot_table`, cache/gpu_policies.cuh) the
/// hits and inserts of one step run concurrently, so `on_hit` and `on_insert`
/// must write only the state of the slot they are given and `victim` must only
/// read; a policy whose victim is `slot_state::argmin()` may declare
/// `static constexpr bool victim_is_argmin = true` to have a step's victims
/// picked in one batch. Models: `cache::lru`, `cache::lfu`, `cache::fifo`.
template <class P>
concept CachePolicy = std::is_trivially_copyable_v<P> &&
  requires(P const p, typename P::state_type& s, typename P::state_type const& cs, std::uint32_t slot,
           std::uint32_t step) {
    { p.on_insert(s, slot, step) } -> std::same_as<void>;
    { p.on_hit(s, slot, step) } -> std::same_as<void>;
    { p.victim(cs) } -> std::convertible_to<std::uint32_t>;
  };

}  // namespace pqkv
