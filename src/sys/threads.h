#pragma once
// Running two jobs at once on two threads.

#include <functional>

namespace torchfit::detail {

/// Runs `first` here and `second` on a helper thread; rethrows the first's error,
/// else the second's.
void run_pair(const std::function<void()>& first, const std::function<void()>& second);

}  // namespace torchfit::detail
