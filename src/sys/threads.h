#pragma once
// Running two jobs at once on two threads.

#include <functional>
#include <memory>

namespace torchfit::detail {

/// Runs `first` here and `second` on a helper thread; rethrows the first's error,
/// else the second's. The helper starts on another CPU than the caller's (when the process may
/// run on another), unless the caller is a background thread.
void run_pair(const std::function<void()>& first, const std::function<void()>& second);

/// run_pair's helper half, for a caller whose own half spans calls: `second` starts on the
/// helper at construction and is waited for by join() or, at the latest, the destructor.
class HelperRun {
 public:
  explicit HelperRun(std::function<void()> second);
  ~HelperRun();
  HelperRun(const HelperRun&) = delete;
  HelperRun& operator=(const HelperRun&) = delete;
  /// Waits for `second`, then rethrows its error. Once only.
  void join();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

/// A run_pair call from this thread comes soon: wakes the helper now, so that its wake-up
/// overlaps what the caller does until then. Without a call within about a millisecond, it goes
/// back to sleep.
void expect_run_pair();

/// Marks the calling thread as one that works beside training (the async writer): its
/// `run_pair` helpers go where the scheduler puts them, since the other CPU is training's.
void mark_background_thread();

}  // namespace torchfit::detail
