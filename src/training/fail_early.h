#pragma once
// Checks callbacks run when a fit starts, so a bad path fails then, on every rank.

#include <string>

namespace torchfit {
class TrainingContext;
}

namespace torchfit::detail {

/// Rank 0 checks that `directory` is writable or can be created
/// (check_writable_directory), if `check` is true there; every rank then raises
/// rank 0's CheckpointError, so a data-parallel run stops alike instead of
/// hanging at its next collective. Every rank calls it, whatever its `check`.
void check_directory_on_main(const TrainingContext& context, const std::string& directory, const std::string& owner,
                             bool check = true);

}  // namespace torchfit::detail
