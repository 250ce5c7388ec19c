// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file A small fork-join `parallel_for` for the CPU backend.
///
/// Work is cut into chunks whose boundaries depend only on the problem size,
/// never on the thread count, so a reduction that combines per-chunk partial
/// results in chunk order gives bit-identical results with 1 or 64 threads.

#include <pqkv/core/views.hpp>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace pqkv::cpu {

namespace detail {
inline std::atomic<int>& thread_setting() noexcept
{
  static std::atomic<int> threads{0};
  return threads;
}
}  // namespace detail

/// Threads the CPU backend uses; 0 (the default) means all hardware threads.
inline void set_num_threads(int threads) noexcept { detail::thread_setting().store(std::max(threads, 0)); }

/// Threads the CPU backend will use.
[[nodiscard]] inline int num_threads() noexcept
{
  int const set = detail::thread_setting().load();
  if (set > 0) { return set; }
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

/// Calls `fn(chunk)` for every chunk in [0, chunks), spread over up to
/// `num_threads()` threads (the calling thread is one of them). Chunks are
/// claimed dynamically; the first exception thrown is rethrown here after all
/// threads have joined.
template <class Fn>
void parallel_for(index_t chunks, Fn&& fn)
{
  if (chunks <= 0) { return; }
  auto const threads = static_cast<index_t>(std::min<index_t>(num_threads(), chunks));
  if (threads <= 1) {
    for (index_t c = 0; c < chunks; ++c) { fn(c); }
    return;
  }
  std::atomic<index_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto worker = [&] {
    for (index_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      try {
        fn(c);
      } catch (...) {
        std::lock_guard lock{failure_mutex};
        if (!failure) { failure = std::current_exception(); }
        next.store(chunks);
      }
    }
  };
  std::vector<std::jthread> pool;
  pool.reserve(static_cast<std::size_t>(threads - 1));
  for (index_t t = 1; t < threads; ++t) { pool.emplace_back(worker); }
  worker();
  pool.clear();  // joins
  if (failure) { std::rethrow_exception(failure); }
}

/// Number of fixed-size chunks covering `n` items.
[[nodiscard]] constexpr index_t chunk_count(index_t n, index_t chunk) noexcept
{
  return n <= 0 ? 0 : (n + chunk - 1) / chunk;
}

}  // namespace pqkv::cpu
