#pragma once
// Checks callbacks run when a fit starts, so a bad path fails then, on every rank.

#include <functional>
#include <string>

namespace torchfit {
class TrainingContext;
}

namespace torchfit::detail {

/// Rank 0 runs `check` (a storage's `prepare`, say), which throws CheckpointError; every
/// rank then raises rank 0's error, so a data-parallel run stops alike instead of hanging
/// at its next collective. Every rank calls it.
void check_on_main(const TrainingContext& context, const std::function<void()>& check);

}  // namespace torchfit::detail
