#pragma once
// One background thread that runs at most one save at a time; its errors are
// kept and raised on the caller's thread.

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

namespace torchfit::detail {

class AsyncWriter {
 public:
  AsyncWriter();
  /// Waits for the job in flight; an error it raised is logged, not thrown.
  ~AsyncWriter();
  AsyncWriter(const AsyncWriter&) = delete;
  AsyncWriter& operator=(const AsyncWriter&) = delete;

  /// Runs `first` (if any), then `job`, in the background; `job` is skipped when
  /// `first` fails. Call `wait()` first: one job at a time.
  void submit(std::function<void()> job, std::function<void()> first = {});
  /// Blocks until `first` of the job in flight is done (or failed); errors are
  /// left to `wait()`.
  void wait_first();
  /// Whether a job is in flight.
  bool busy();
  /// Blocks until no job is in flight, then rethrows the error of the last job, once.
  void wait();

 private:
  void run();

  std::mutex mutex_;
  std::condition_variable changed_;
  std::function<void()> first_;
  std::function<void()> job_;
  bool busy_ = false;
  bool first_pending_ = false;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::thread thread_;
};

}  // namespace torchfit::detail
