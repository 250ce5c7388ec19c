// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::host_task`: CPU work (CPU k-means, bookkeeping) joined
/// into CUDA streams. `enqueue(stream)` makes the task start after the work
/// enqueued before it on `stream` and the stream's later work wait for the
/// task's end, with no host thread blocked on the GPU and no polling loop on
/// the host; it is capturable, so a graph replay runs the task again.
///
/// Design. CUDA gives the host no signal from a stream other than a host
/// function (`cudaLaunchHostFunc`), which runs on a driver thread shared by
/// the process's streams and must not call CUDA. So:
/// - `host_join::wait_value` (preferred; `automatic` picks it where the
///   driver supports it): the stream runs a host function that only arms the
///   task's completion word (pinned, mapped) to `pending` and posts the task
///   to the `host_pool` (a short lock, no allocation, no waiting), then the
///   stream waits on the word with the driver's stream memory operation
///   (`cuStreamWaitValue32`, GEQ `done`, resolved through
///   `cudaGetDriverEntryPointByVersion`, so no libcuda link is needed). A
///   pool worker runs the task and stores `done` (or `failed`) with release
///   order; the GPU front end sees the word and the stream proceeds. Under
///   capture these become a host node and a memory-wait node, replayed as is
///   (where the driver cannot capture the wait, captured enqueues use the
///   fallback below; `capture_join()` says which).
/// - `host_join::host_function` (the fallback): the task runs inside the
///   stream's host function. Correct and simple, but while it runs it holds
///   CUDA's callback thread, delaying every other host function of the
///   process (other streams' `host_task`s included).
///
/// Why it cannot deadlock: the host function never waits; the task depends
/// on nothing in CUDA (rule 1 below), so it ends in finite time on a pool
/// thread, and its word is stored even when it throws (`failed` also releases
/// the wait), so a stream never hangs on a failed task. The dependency is
/// invisible to CUDA's scheduler, but it only ever points from a stream to
/// host work that needs no GPU progress.
///
/// Rules for the task (both modes):
/// 1. It must not call CUDA, nor wait for GPU work or for other tasks of a
///    pool that may be full: it reads and writes host (pinned) memory that
///    the stream filled before it (e.g. a D2H copy) and drains after it (an
///    H2D copy enqueued after `enqueue`).
/// 2. One run at a time: enqueues of one `host_task` must be stream-ordered
///    (the same stream, or ordered by events); a launch that finds the
///    previous run unfinished does not run again and is reported by
///    `rethrow_if_failed` (the stream still waits for the earlier run). Use
///    one `host_task` per concurrent site (e.g. per layer).
/// 3. The `host_task` and its pool must outlive the streams' and graphs' use
///    of it. Its destructor waits for its last eager (non-captured) enqueue;
///    graphs that captured it must have finished.
/// Errors: a task's exception is kept and rethrown by `rethrow_if_failed()`
/// (host side, e.g. after the step); the stream continues past the failed
/// task (its outputs are whatever the task left).

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/schedule/device_guard.cuh>
#include <pqkv/schedule/event.cuh>
#include <pqkv/schedule/host_pool.hpp>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace pqkv::gpu {

/// How a `host_task` joins its end back to the stream (see the file comment).
enum class host_join : std::uint8_t {
  automatic,      ///< wait_value where the driver supports it, else host_function
  wait_value,     ///< task on the pool; the stream waits on its completion word
  host_function,  ///< task inside the stream's host function
};

}  // namespace pqkv::gpu

namespace pqkv::detail::host_join_gpu {

using wait_value32_fn = CUresult(CUDAAPI*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

/// The driver's `cuStreamWaitValue32` (the CUDA 12 ABI), or null when the
/// driver does not export it.
inline wait_value32_fn wait_value32()
{
  static wait_value32_fn const fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    cudaError_t const s = cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &p, 12000, cudaEnableDefault, &found);
#else
    cudaError_t const s = cudaGetDriverEntryPoint("cuStreamWaitValue32", &p, cudaEnableDefault, &found);
#endif
    if (s != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<wait_value32_fn>(nullptr);
    }
    return reinterpret_cast<wait_value32_fn>(p);
  }();
  return fn;
}

[[noreturn]] inline void throw_driver_error(CUresult r, char const* call, char const* where)
{
  std::ostringstream os;
  os << "pqkv::cuda_error: " << where << ": " << call << " returned CUresult " << static_cast<int>(r);
  throw cuda_error(os.str(), static_cast<int>(r));
}

/// What the driver supports on a device: stream memory waits at all, and
/// inside a stream capture (a graph node that instantiates and runs).
struct wait_value_support {
  bool eager = false;
  bool capture = false;
};

/// Tries a wait on an already satisfied word on a scratch stream, eagerly and
/// through a captured, instantiated and launched graph; once per device (a
/// set-up cost, cached; it synchronizes the scratch stream only).
inline wait_value_support probe_wait_value(int device)
{
  static std::mutex mutex;
  static std::vector<int> known;  // per device: 0 untested, else 1 + eager + 2 * capture
  std::lock_guard lock{mutex};
  if (known.size() <= static_cast<std::size_t>(device)) { known.resize(static_cast<std::size_t>(device) + 1, 0); }
  int& k = known[static_cast<std::size_t>(device)];
  if (k != 0) { return {((k - 1) & 1) != 0, ((k - 1) & 2) != 0}; }
  wait_value_support got{};
  k = 1;
  wait_value32_fn const wait = wait_value32();
  if (wait == nullptr) { return got; }
  gpu::device_guard guard{device};
  std::uint32_t* word = nullptr;
  if (cudaHostAlloc(reinterpret_cast<void**>(&word), sizeof(std::uint32_t), cudaHostAllocPortable | cudaHostAllocMapped) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return got;
  }
  *word = 1;
  void* dev = nullptr;
  cudaStream_t s = nullptr;
  if (cudaHostGetDevicePointer(&dev, word, 0) == cudaSuccess &&
      cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess) {
    auto const addr = reinterpret_cast<CUdeviceptr>(dev);
    got.eager = wait(s, addr, 1u, CU_STREAM_WAIT_VALUE_GEQ) == CUDA_SUCCESS;
    got.eager = cudaStreamSynchronize(s) == cudaSuccess && got.eager;
    if (got.eager && cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
      bool const captured = wait(s, addr, 1u, CU_STREAM_WAIT_VALUE_GEQ) == CUDA_SUCCESS;
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      bool ok = cudaStreamEndCapture(s, &graph) == cudaSuccess && captured && graph != nullptr;
      ok = ok && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
      ok = ok && cudaGraphLaunch(exec, s) == cudaSuccess;
      ok = cudaStreamSynchronize(s) == cudaSuccess && ok;
      if (exec != nullptr) { (void)cudaGraphExecDestroy(exec); }
      if (graph != nullptr) { (void)cudaGraphDestroy(graph); }
      got.capture = ok;
    }
  }
  if (s != nullptr) { (void)cudaStreamDestroy(s); }
  (void)cudaFreeHost(word);
  (void)cudaGetLastError();
  k = 1 + (got.eager ? 1 : 0) + (got.capture ? 2 : 0);
  return got;
}

}  // namespace pqkv::detail::host_join_gpu

namespace pqkv::gpu {

/// A host task joined into CUDA streams (see the file comment). Movable, not copyable.
class host_task {
 public:
  /// Binds `fn` to `pool` on the current device. Allocates the pinned
  /// completion word; with `wait_value` throws `pqkv::error` when the driver
  /// lacks stream memory waits (`automatic` falls back instead).
  host_task(host_pool& pool, std::function<void()> fn, host_join join = host_join::automatic)
    : device_{current_device()}
  {
    constexpr char const* where = "host_task";
    PQKV_EXPECTS(fn != nullptr, where, "fn is empty");
    auto const support = join != host_join::host_function ? pqkv::detail::host_join_gpu::probe_wait_value(device_)
                                                          : pqkv::detail::host_join_gpu::wait_value_support{};
    PQKV_EXPECTS(join != host_join::wait_value || support.eager, where,
                 "host_join::wait_value asked for, but cuStreamWaitValue32 is not available on device ", device_);
    join_ = support.eager ? host_join::wait_value : host_join::host_function;
    capture_join_ = support.capture ? join_ : host_join::host_function;
    std::uint32_t* word = nullptr;
    PQKV_CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&word), sizeof(std::uint32_t),
                                cudaHostAllocPortable | cudaHostAllocMapped));
    word_.reset(word);
    void* dev = nullptr;
    PQKV_CUDA_TRY(cudaHostGetDevicePointer(&dev, word, 0));
    dev_word_ = reinterpret_cast<CUdeviceptr>(dev);
    core_ = std::make_unique<signalled_task>(&pool, std::move(fn), word);
    done_ = std::make_unique<event>();
  }
  host_task(host_task&&) noexcept = default;
  host_task& operator=(host_task&& o) noexcept
  {
    if (this != &o) {
      drain();
      core_ = std::move(o.core_);
      done_ = std::move(o.done_);
      word_ = std::move(o.word_);
      dev_word_ = o.dev_word_;
      device_ = o.device_;
      join_ = o.join_;
      capture_join_ = o.capture_join_;
      recorded_ = std::exchange(o.recorded_, false);
    }
    return *this;
  }
  host_task(host_task const&) = delete;
  host_task& operator=(host_task const&) = delete;
  /// Waits for the last eager enqueue (stream work and the task's run).
  ~host_task() { drain(); }

  /// Enqueues the task on `stream` (a stream of this task's device): it runs
  /// after the stream's earlier work, and the stream's later work waits for
  /// its end. Asynchronous, capturable; throws `pqkv::error` / `cuda_error`.
  void enqueue(cudaStream_t stream)
  {
    constexpr char const* where = "host_task.enqueue";
    PQKV_EXPECTS(core_ != nullptr, where, "the task was moved from");
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    PQKV_CUDA_TRY(cudaStreamIsCapturing(stream, &capture));
#if CUDART_VERSION >= 12080
    if (capture == cudaStreamCaptureStatusNone) {  // a query kept out of captures
      int d = -1;
      PQKV_CUDA_TRY(cudaStreamGetDevice(stream, &d));
      PQKV_EXPECTS(d == device_, where, "the stream is on device ", d, ", the task on device ", device_);
    }
#endif
    host_join const use = capture == cudaStreamCaptureStatusNone ? join_ : capture_join_;
    if (use == host_join::wait_value) {
      PQKV_CUDA_TRY(cudaLaunchHostFunc(stream, &host_task::arm, core_.get()));
      CUresult const r = pqkv::detail::host_join_gpu::wait_value32()(stream, dev_word_, signalled_task::done,
                                                                      CU_STREAM_WAIT_VALUE_GEQ);
      if (r != CUDA_SUCCESS) { pqkv::detail::host_join_gpu::throw_driver_error(r, "cuStreamWaitValue32", where); }
    } else {
      PQKV_CUDA_TRY(cudaLaunchHostFunc(stream, &host_task::run_here, core_.get()));
    }
    if (capture == cudaStreamCaptureStatusNone) {
      done_->record(stream);
      recorded_ = true;
    }
  }

  /// The join of eager enqueues (`automatic` resolved).
  [[nodiscard]] host_join join() const noexcept { return join_; }
  /// The join of enqueues under stream capture: `join()`, or `host_function`
  /// where the driver cannot capture stream memory waits.
  [[nodiscard]] host_join capture_join() const noexcept { return capture_join_; }
  /// The device the task was made on.
  [[nodiscard]] int device() const noexcept { return device_; }
  /// Runs completed so far (failed ones included).
  [[nodiscard]] std::uint64_t runs() const noexcept { return core_ ? core_->runs() : 0; }
  /// Rethrows (and clears) the first error since the last call: the task's
  /// exception, or a `pqkv::error` for overlapping runs.
  void rethrow_if_failed()
  {
    if (core_) { core_->rethrow_if_failed(); }
  }

 private:
  /// The stream's host function: arms the word and posts (or, in
  /// host_function mode, runs) the task. No CUDA calls, never throws.
  static void CUDART_CB arm(void* task) { static_cast<signalled_task*>(task)->launch(); }
  /// The host_function join's host function: runs the task right here.
  static void CUDART_CB run_here(void* task) { static_cast<signalled_task*>(task)->launch_here(); }

  void drain() noexcept
  {
    if (recorded_ && done_) { (void)cudaEventSynchronize(done_->get()); }
    recorded_ = false;
    if (core_) { core_->wait(); }
  }

  struct free_host {
    void operator()(std::uint32_t* p) const noexcept { (void)cudaFreeHost(p); }
  };

  // Declaration order matters for destruction: the task (which waits for its
  // run) goes before the word it writes.
  std::unique_ptr<std::uint32_t, free_host> word_;
  std::unique_ptr<signalled_task> core_;
  std::unique_ptr<event> done_;
  CUdeviceptr dev_word_ = 0;
  int device_ = 0;
  host_join join_ = host_join::host_function;
  host_join capture_join_ = host_join::host_function;
  bool recorded_ = false;
};

}  // namespace pqkv::gpu
