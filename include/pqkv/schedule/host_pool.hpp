// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::host_pool`: a fixed set of host worker threads for CPU-side
/// work (CPU k-means, bookkeeping), and `pqkv::signalled_task`, the host half
/// of a task joined to CUDA streams (schedule/host_task.cuh adds the CUDA
/// half). Pure C++: no CUDA headers.
///
/// The pool runs jobs in FIFO order of submission on its threads; with one
/// thread they also finish in that order. Two ways in:
/// - `submit(fn)` allocates a job and returns a `std::future` carrying fn's
///   result or its exception (ordinary host use);
/// - `post(job)` queues a caller-owned intrusive `host_pool::job` without
///   allocating, locking only a short critical section and never waiting for
///   work: what a CUDA host function may call (it must not block or call CUDA).
/// Destruction stops accepting `submit`, runs every job already queued, then
/// joins the threads. A `post` that arrives after the threads are gone runs
/// the job on the posting thread, so a posted job is never lost.
///
/// `signalled_task` is a job with a persistent callable and a 32-bit
/// completion word in caller-provided memory (pinned and mapped, for a
/// stream to wait on): `launch()` sets the word to `pending` (0) and posts
/// the task (or, without a pool, runs it at once); when the task returns the
/// word becomes `done` (1), when it throws `failed` (2) and the exception is
/// kept for `rethrow_if_failed()`. The word is stored with release order
/// after the task's writes, so a reader that sees `done` sees its results.
/// A task is single-flight: launching it again before its previous run ends
/// does not run it twice; the misuse is recorded as its error instead.

#include <pqkv/core/error.hpp>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace pqkv {

/// Fixed host worker threads running queued jobs in FIFO order (see the file comment).
class host_pool {
 public:
  /// A unit of work the pool can queue without allocating. The poster owns
  /// it and keeps it alive until `run` has returned; a job is in at most one
  /// queue at a time.
  class job {
   public:
    job() = default;
    job(job const&) = delete;
    job& operator=(job const&) = delete;
    /// Does the work; must not throw (catch inside).
    virtual void run() noexcept = 0;

   protected:
    ~job() = default;

   private:
    friend class host_pool;
    job* next_ = nullptr;
  };

  /// Starts `threads` workers (at least 1); throws `pqkv::error` otherwise.
  explicit host_pool(int threads)
  {
    PQKV_EXPECTS(threads >= 1 && threads <= 1024, "host_pool", "threads=", threads, " is outside [1, 1024]");
    workers_.reserve(static_cast<std::size_t>(threads));
    live_ = threads;
    for (int t = 0; t < threads; ++t) {
      try {
        workers_.emplace_back([this] { work(); });
      } catch (...) {
        {
          std::lock_guard lock{mutex_};
          live_ -= threads - t;  // the threads that never started
        }
        shutdown();
        throw;
      }
    }
  }
  host_pool(host_pool const&) = delete;
  host_pool& operator=(host_pool const&) = delete;
  /// Runs every queued job, then joins the threads.
  ~host_pool() { shutdown(); }

  /// Worker threads.
  [[nodiscard]] int threads() const noexcept { return static_cast<int>(workers_.size()); }

  /// Queues `fn()`; the future holds its result or exception. Throws
  /// `pqkv::error` once the pool is being destroyed.
  template <class Fn>
  auto submit(Fn&& fn) -> std::future<std::invoke_result_t<std::decay_t<Fn>&>>
  {
    using result = std::invoke_result_t<std::decay_t<Fn>&>;
    auto owned = std::make_unique<packaged_job<result>>(std::forward<Fn>(fn));
    auto future = owned->task.get_future();
    {
      std::lock_guard lock{mutex_};
      PQKV_EXPECTS(!stopping_, "host_pool.submit", "the pool is shutting down");
      push(owned.release());
    }
    ready_.notify_one();
    return future;
  }

  /// Queues a caller-owned job: no allocation, no waiting for other work.
  /// After the workers are gone (late in destruction) it runs `j` here.
  void post(job& j) noexcept
  {
    bool inline_run = false;
    {
      std::lock_guard lock{mutex_};
      if (stopping_ && live_ == 0) {
        inline_run = true;
      } else {
        push(&j);
      }
    }
    if (inline_run) {
      j.run();
    } else {
      ready_.notify_one();
    }
  }

  /// Blocks until every job queued so far (and any queued meanwhile) has finished.
  void wait_idle()
  {
    std::unique_lock lock{mutex_};
    idle_.wait(lock, [this] { return head_ == nullptr && running_ == 0; });
  }

 private:
  template <class Result>
  struct packaged_job final : job {
    template <class Fn>
    explicit packaged_job(Fn&& fn) : task{std::forward<Fn>(fn)} {}
    void run() noexcept override
    {
      task();  // a packaged_task stores fn's exception in the future
      delete this;
    }
    std::packaged_task<Result()> task;
  };

  void push(job* j) noexcept
  {
    j->next_ = nullptr;
    if (tail_ != nullptr) {
      tail_->next_ = j;
    } else {
      head_ = j;
    }
    tail_ = j;
  }

  void work() noexcept
  {
    std::unique_lock lock{mutex_};
    for (;;) {
      ready_.wait(lock, [this] { return head_ != nullptr || stopping_; });
      if (head_ == nullptr) { break; }  // stopping and drained
      job* j = head_;
      head_ = j->next_;
      if (head_ == nullptr) { tail_ = nullptr; }
      ++running_;
      lock.unlock();
      j->run();
      lock.lock();
      --running_;
      if (head_ == nullptr && running_ == 0) { idle_.notify_all(); }
    }
    --live_;
  }

  void shutdown() noexcept
  {
    {
      std::lock_guard lock{mutex_};
      stopping_ = true;
    }
    ready_.notify_all();
    for (auto& w : workers_) {
      if (w.joinable()) { w.join(); }
    }
    // A job posted between the last worker's exit and `live_` reaching 0
    // cannot exist (both happen under the mutex), so the queue is empty here.
  }

  std::mutex mutex_;
  std::condition_variable ready_, idle_;
  job* head_ = nullptr;
  job* tail_ = nullptr;
  int running_ = 0;
  int live_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

/// A persistent task with a 32-bit completion word, launched onto a pool
/// without allocating (see the file comment). Not copyable or movable: a
/// queued pointer to it must stay valid.
class signalled_task final : public host_pool::job {
 public:
  /// Values of the completion word.
  static constexpr std::uint32_t pending = 0, done = 1, failed = 2;

  /// `pool` null: `launch` runs the task on the calling thread (as
  /// `launch_here` always does). `word`: 4-byte aligned memory that outlives
  /// the task; it is set to `done` here.
  signalled_task(host_pool* pool, std::function<void()> fn, std::uint32_t* word)
    : pool_{pool}, fn_{std::move(fn)}, word_{word}
  {
    PQKV_EXPECTS(fn_ != nullptr, "signalled_task", "fn is empty");
    PQKV_EXPECTS(word_ != nullptr, "signalled_task", "word is null");
    PQKV_EXPECTS(reinterpret_cast<std::uintptr_t>(word_) % alignof(std::uint32_t) == 0, "signalled_task",
                 "word is not 4-byte aligned");
    std::atomic_ref<std::uint32_t>{*word_}.store(done, std::memory_order_release);
  }
  signalled_task(signalled_task const&) = delete;
  signalled_task& operator=(signalled_task const&) = delete;
  ~signalled_task() { wait(); }

  /// Sets the word to `pending` and starts the task: posted to the pool, or
  /// run here without one. Never throws or allocates; safe to call from a
  /// CUDA host function when a pool is set (it does not wait for the task).
  void launch() noexcept { start(pool_); }

  /// Like `launch`, but runs the task on the calling thread (returns when it has).
  void launch_here() noexcept { start(nullptr); }

  /// True from `launch` until the run has finished.
  [[nodiscard]] bool busy() const
  {
    std::lock_guard lock{mutex_};
    return busy_;
  }

  /// Blocks the calling host thread until the current run (if any) has finished.
  void wait() const
  {
    std::unique_lock lock{mutex_};
    finished_.wait(lock, [this] { return !busy_; });
  }

  /// Runs completed since construction (failed ones included).
  [[nodiscard]] std::uint64_t runs() const noexcept { return runs_.load(std::memory_order_acquire); }

  /// The completion word as last stored.
  [[nodiscard]] std::uint32_t word() const noexcept
  {
    return std::atomic_ref<std::uint32_t>{*word_}.load(std::memory_order_acquire);
  }

  /// Rethrows (and clears) the first error since the last call: the task's
  /// exception, or a `pqkv::error` for a launch while busy.
  void rethrow_if_failed()
  {
    std::exception_ptr e;
    {
      std::lock_guard lock{mutex_};
      e = std::exchange(error_, nullptr);
    }
    if (e) { std::rethrow_exception(e); }
  }

  /// The pool's entry point; runs the task once and signals the word.
  void run() noexcept override
  {
    std::uint32_t outcome = done;
    try {
      fn_();
    } catch (...) {
      outcome = failed;
      std::lock_guard lock{mutex_};
      if (!error_) { error_ = std::current_exception(); }
    }
    runs_.fetch_add(1, std::memory_order_acq_rel);
    // One critical section: a reader that sees the word may launch again at
    // once and must find the task idle. Release: whoever sees the word (host
    // or device) sees the task's writes. Notified under the lock, since a
    // waiter may destroy the task as soon as it can take the lock.
    std::lock_guard lock{mutex_};
    busy_ = false;
    std::atomic_ref<std::uint32_t>{*word_}.store(outcome, std::memory_order_release);
    finished_.notify_all();
  }

 private:
  void start(host_pool* pool) noexcept
  {
    {
      // Under the lock: a run that ends meanwhile stores `done` either
      // before this `pending` or not at all for this launch.
      std::lock_guard lock{mutex_};
      if (busy_) {
        if (!error_) { error_ = misuse(); }
        return;
      }
      busy_ = true;
      std::atomic_ref<std::uint32_t>{*word_}.store(pending, std::memory_order_release);
    }
    if (pool != nullptr) {
      pool->post(*this);
    } else {
      run();
    }
  }

  static std::exception_ptr misuse() noexcept
  {
    try {
      throw pqkv::error("pqkv::error: signalled_task.launch: launched again before its previous run finished "
                        "(order the launches: one run of a task at a time)");
    } catch (...) {
      return std::current_exception();
    }
  }

  host_pool* pool_;
  std::function<void()> fn_;
  std::uint32_t* word_;
  mutable std::mutex mutex_;
  mutable std::condition_variable finished_;
  bool busy_ = false;
  std::exception_ptr error_;
  std::atomic<std::uint64_t> runs_{0};
};

}  // namespace pqkv
