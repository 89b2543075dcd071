#pragma once
// What each rank of a data-parallel run does around writes: rank 0 checks and writes, every
// rank decides alike and fails alike.

#include <exception>
#include <functional>
#include <string>

namespace torchfit {
class CheckpointManager;
class SaveFreq;
class TrainingContext;
}  // namespace torchfit

namespace torchfit::detail {

/// Every rank runs `run`. On rank 0, which alone writes files, a `CheckpointError` (a write
/// failed) is returned instead of thrown, for `raise_main_failure` to share; any other error,
/// and every error on the other ranks, is thrown (those arise alike on every rank).
std::exception_ptr catch_on_main(const TrainingContext& context, const std::function<void()>& run);

/// Every rank calls it, after `catch_on_main`: rank 0 broadcasts how its write went (so no
/// rank returns before rank 0's write is done), then every rank raises its `failure`: rank 0
/// rethrows it, the others throw `CheckpointError` "Rank 0's <what> failed: ...". So a
/// data-parallel run stops alike instead of breaking at its next collective.
void raise_main_failure(const TrainingContext& context, const std::exception_ptr& failure, const char* what);

/// Rank 0 runs `check` (a storage's `prepare`, say), which throws CheckpointError; every
/// rank then raises rank 0's error. Every rank calls it.
void check_on_main(const TrainingContext& context, const std::function<void()>& check);

/// Every writer's policy: on ranks other than 0, `manager` goes on deciding each save as
/// rank 0 does but stores nothing (`CheckpointManager::store_nothing`).
void write_on_main_only(CheckpointManager& manager, const TrainingContext& context);

/// Throws `ValueError` naming `owner` for a time trigger in data-parallel training: each
/// rank's clock would decide alone, and the ranks would part at the next barrier.
void check_freq_across_ranks(const TrainingContext& context, const std::string& owner, const SaveFreq& freq);

}  // namespace torchfit::detail
