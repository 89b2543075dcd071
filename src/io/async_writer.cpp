#include "io/async_writer.h"

#include <spdlog/spdlog.h>

#include "torchfit/error.h"
#include "torchfit/log.h"
#include "sys/threads.h"

namespace torchfit::detail {

AsyncWriter::AsyncWriter()
    : thread_([this] {
        mark_background_thread();
        run();
      }) {}

AsyncWriter::~AsyncWriter() {
  try {
    wait();
  } catch (const std::exception& e) {
    logger()->error("An async checkpoint save failed and nothing was left to report it to: {}", e.what());
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

void AsyncWriter::submit(std::function<void()> job, std::function<void()> first) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (busy_) throw Error("AsyncWriter: a save is already in flight; wait() first");
  job_ = std::move(job);
  first_ = std::move(first);
  first_pending_ = static_cast<bool>(first_);
  busy_ = true;
  lock.unlock();
  changed_.notify_all();
}

void AsyncWriter::wait_first() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [this] { return !first_pending_; });
}

bool AsyncWriter::busy() {
  std::lock_guard<std::mutex> lock(mutex_);
  return busy_;
}

void AsyncWriter::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [this] { return !busy_; });
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void AsyncWriter::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [this] { return stopping_ || busy_; });
    if (busy_) {
      auto first = std::move(first_);
      auto job = std::move(job_);
      lock.unlock();
      std::exception_ptr error;
      try {
        if (first) first();
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      first_pending_ = false;
      changed_.notify_all();
      lock.unlock();
      if (!error) {
        try {
          job();
        } catch (...) {
          error = std::current_exception();
        }
      }
      lock.lock();
      error_ = error;
      busy_ = false;
      changed_.notify_all();
    } else if (stopping_) {
      return;
    }
  }
}

}  // namespace torchfit::detail
