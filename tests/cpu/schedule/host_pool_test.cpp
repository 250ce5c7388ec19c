// SPDX-License-Identifier: Apache-2.0
// pqkv::host_pool and pqkv::signalled_task, the CPU-only half of the stream
// scheduler: FIFO order, results and exceptions through futures, destruction
// that runs every queued job, and the completion word's protocol.
#include <pqkv/schedule/host_pool.hpp>

#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <future>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

TEST_CASE("host_pool: one thread runs jobs in submission order")
{
  pqkv::host_pool pool{1};
  CHECK(pool.threads() == 1);
  std::vector<int> order;
  std::vector<std::future<int>> results;
  for (int i = 0; i < 20; ++i) {
    results.push_back(pool.submit([&order, i] {
      order.push_back(i);  // one worker: no race
      return i * i;
    }));
  }
  for (int i = 0; i < 20; ++i) { CHECK(results[static_cast<std::size_t>(i)].get() == i * i); }
  REQUIRE(order.size() == 20);
  for (int i = 0; i < 20; ++i) { CHECK(order[static_cast<std::size_t>(i)] == i); }
}

TEST_CASE("host_pool: several threads run jobs concurrently and wait_idle waits for all")
{
  pqkv::host_pool pool{3};
  std::atomic<int> inside{0}, peak{0}, done{0};
  for (int i = 0; i < 12; ++i) {
    (void)pool.submit([&] {
      int const now = inside.fetch_add(1) + 1;
      int seen = peak.load();
      while (now > seen && !peak.compare_exchange_weak(seen, now)) {}
      std::this_thread::sleep_for(2ms);
      inside.fetch_sub(1);
      done.fetch_add(1);
    });
  }
  pool.wait_idle();
  CHECK(done.load() == 12);
  CHECK(peak.load() >= 2);  // 12 jobs of 2 ms on 3 threads overlap
  CHECK(peak.load() <= 3);
}

TEST_CASE("host_pool: a job's exception reaches its future; the pool keeps working")
{
  pqkv::host_pool pool{2};
  auto bad = pool.submit([]() -> int { throw std::runtime_error("k-means diverged"); });
  auto good = pool.submit([] { return 7; });
  CHECK_THROWS_WITH_AS(bad.get(), "k-means diverged", std::runtime_error);
  CHECK(good.get() == 7);
}

TEST_CASE("host_pool: destruction runs every queued job, then joins")
{
  std::atomic<int> ran{0};
  {
    pqkv::host_pool pool{2};
    for (int i = 0; i < 16; ++i) {
      (void)pool.submit([&ran] {
        std::this_thread::sleep_for(1ms);
        ran.fetch_add(1);
      });
    }
  }  // ~host_pool
  CHECK(ran.load() == 16);
}

TEST_CASE("host_pool: bad thread counts throw")
{
  using pqkv::test::error_message;
  CHECK(error_message([] { pqkv::host_pool p{0}; }).find("threads=0") != std::string::npos);
  CHECK(error_message([] { pqkv::host_pool p{-3}; }).find("threads=-3") != std::string::npos);
}

TEST_CASE("signalled_task: the word goes pending -> done, once per launch")
{
  pqkv::host_pool pool{2};
  std::uint32_t word = 12345;
  std::atomic<int> calls{0};
  std::atomic<bool> release{false};
  pqkv::signalled_task task{&pool, [&] {
                              while (!release.load()) { std::this_thread::sleep_for(100us); }
                              calls.fetch_add(1);
                            },
                            &word};
  CHECK(task.word() == pqkv::signalled_task::done);  // idle tasks read as done
  task.launch();
  CHECK(task.word() == pqkv::signalled_task::pending);  // launch never waits for the run
  CHECK(task.busy());
  release.store(true);
  task.wait();
  CHECK(task.word() == pqkv::signalled_task::done);
  CHECK(calls.load() == 1);
  CHECK(task.runs() == 1);
  for (int i = 0; i < 5; ++i) {
    task.launch();
    task.wait();
  }
  CHECK(calls.load() == 6);
  CHECK(task.runs() == 6);
  CHECK_NOTHROW(task.rethrow_if_failed());
}

TEST_CASE("signalled_task: an exception sets the word to failed and is rethrown once")
{
  pqkv::host_pool pool{1};
  std::uint32_t word = 0;
  bool fail = true;
  pqkv::signalled_task task{&pool, [&] {
                              if (fail) { throw std::runtime_error("bookkeeping failed"); }
                            },
                            &word};
  task.launch();
  task.wait();
  CHECK(task.word() == pqkv::signalled_task::failed);
  CHECK_THROWS_WITH_AS(task.rethrow_if_failed(), "bookkeeping failed", std::runtime_error);
  CHECK_NOTHROW(task.rethrow_if_failed());  // cleared
  fail = false;
  task.launch();
  task.wait();
  CHECK(task.word() == pqkv::signalled_task::done);
  CHECK(task.runs() == 2);
}

TEST_CASE("signalled_task: a launch while busy is recorded, not run twice")
{
  pqkv::host_pool pool{2};
  std::uint32_t word = 0;
  std::atomic<int> calls{0};
  std::atomic<bool> release{false};
  pqkv::signalled_task task{&pool, [&] {
                              while (!release.load()) { std::this_thread::sleep_for(100us); }
                              calls.fetch_add(1);
                            },
                            &word};
  task.launch();
  task.launch();  // misuse: the first run has not finished
  release.store(true);
  task.wait();
  pool.wait_idle();
  CHECK(calls.load() == 1);
  std::string const what = pqkv::test::error_message([&] { task.rethrow_if_failed(); });
  CHECK(what.find("launched again before its previous run finished") != std::string::npos);
}

TEST_CASE("signalled_task: without a pool the task runs inside launch")
{
  std::uint32_t word = 0;
  int calls = 0;
  pqkv::signalled_task task{nullptr, [&] { ++calls; }, &word};
  task.launch();
  CHECK(calls == 1);
  CHECK(task.word() == pqkv::signalled_task::done);
  CHECK_FALSE(task.busy());
}

TEST_CASE("signalled_task: launch_here runs on the calling thread even with a pool")
{
  pqkv::host_pool pool{1};
  std::uint32_t word = 0;
  std::thread::id ran_on;
  pqkv::signalled_task task{&pool, [&] { ran_on = std::this_thread::get_id(); }, &word};
  task.launch_here();
  CHECK(ran_on == std::this_thread::get_id());
  CHECK(task.word() == pqkv::signalled_task::done);
  task.launch();
  task.wait();
  CHECK(ran_on != std::this_thread::get_id());
  CHECK(task.runs() == 2);
}

TEST_CASE("signalled_task: relaunching as soon as the word reads done never loses a run")
{
  // What a stream does on graph replays: the next launch comes right after
  // the word is seen, possibly before the worker has left `run`.
  pqkv::host_pool pool{2};
  std::uint32_t word = 0;
  std::atomic<int> calls{0};
  pqkv::signalled_task task{&pool, [&] { calls.fetch_add(1); }, &word};
  for (int i = 0; i < 200; ++i) {
    task.launch();
    while (std::atomic_ref<std::uint32_t>{word}.load(std::memory_order_acquire) == pqkv::signalled_task::pending) {
      std::this_thread::yield();
    }
  }
  task.wait();
  CHECK(calls.load() == 200);
  CHECK_NOTHROW(task.rethrow_if_failed());
}

TEST_CASE("signalled_task: bad arguments throw")
{
  using pqkv::test::error_message;
  std::uint32_t word = 0;
  CHECK(error_message([&] { pqkv::signalled_task t{nullptr, {}, &word}; }).find("fn is empty") != std::string::npos);
  CHECK(error_message([&] { pqkv::signalled_task t{nullptr, [] {}, nullptr}; }).find("word is null") !=
        std::string::npos);
}

TEST_CASE("host_pool: posts from many threads all run")
{
  struct counter_job final : pqkv::host_pool::job {
    std::atomic<int>* n = nullptr;
    void run() noexcept override { n->fetch_add(1); }
  };
  std::atomic<int> n{0};
  std::vector<counter_job> jobs(64);
  for (auto& j : jobs) { j.n = &n; }
  {
    pqkv::host_pool pool{2};
    std::vector<std::thread> posters;
    for (int t = 0; t < 4; ++t) {
      posters.emplace_back([&pool, &jobs, t] {
        for (std::size_t i = static_cast<std::size_t>(t); i < jobs.size(); i += 4) { pool.post(jobs[i]); }
      });
    }
    for (auto& p : posters) { p.join(); }
    pool.wait_idle();
    CHECK(n.load() == 64);
  }
}
