#pragma once
// What each rank of a data-parallel run does at the start of a fit: rank 0 checks and writes,
// every rank decides alike and fails alike.

#include <functional>
#include <string>

namespace torchfit {
class CheckpointManager;
class SaveFreq;
class TrainingContext;
}  // namespace torchfit

namespace torchfit::detail {

/// Rank 0 runs `check` (a storage's `prepare`, say), which throws CheckpointError; every
/// rank then raises rank 0's error, so a data-parallel run stops alike instead of hanging
/// at its next collective. Every rank calls it.
void check_on_main(const TrainingContext& context, const std::function<void()>& check);

/// Every writer's policy: on ranks other than 0, `manager` goes on deciding each save as
/// rank 0 does but stores nothing (`CheckpointManager::store_nothing`).
void write_on_main_only(CheckpointManager& manager, const TrainingContext& context);

/// Throws `ValueError` naming `owner` for a time trigger in data-parallel training: each
/// rank's clock would decide alone, and the ranks would part at the next barrier.
void check_freq_across_ranks(const TrainingContext& context, const std::string& owner, const SaveFreq& freq);

}  // namespace torchfit::detail
