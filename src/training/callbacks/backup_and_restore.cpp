#include "torchfit/callbacks/backup_and_restore.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "sys/paths.h"
#include "training/rank_policy.h"
#include "torchfit/error.h"
#include "torchfit/log.h"
#include "torchfit/serialize.h"
#include "torchfit/training_context.h"

namespace torchfit {

BackupAndRestore::BackupAndRestore(BackupOptions options) : options_(std::move(options)) {
  if (options_.backup_dir().empty()) throw ValueError("BackupAndRestore: backup_dir must not be empty");
  manager_ = std::make_unique<CheckpointManager>(CheckpointOptions(backup_path())
                                                     .monitor("loss")
                                                     .mode(Mode::Min)
                                                     .fsync(options_.fsync())
                                                     .async_save(options_.async_save())
                                                     .io(options_.io()));
}

std::string BackupAndRestore::backup_path() const { return detail::join_path(options_.backup_dir(), "backup.pt"); }

std::string BackupAndRestore::previous_backup_path() const {
  return detail::join_path(options_.backup_dir(), "backup.prev.pt");
}

void BackupAndRestore::on_train_setup() {
  detail::check_freq_across_ranks(*context_, "BackupAndRestore " + options_.backup_dir(), options_.save_freq());
  detail::write_on_main_only(*manager_, *context_);  // first: it changes the manager's storage
  CheckpointIO& storage = manager_->io();
  detail::check_on_main(*context_, [&] { storage.prepare(options_.backup_dir(), "BackupAndRestore"); });
  restored_ = false;
  batches_since_backup_ = 0;
  trigger_.restart_clock();  // the time a run was down does not count
  last_backup_step_ = -1;
  std::vector<std::string> candidates{backup_path()};
  if (options_.double_checkpoint()) candidates.push_back(previous_backup_path());
  std::vector<std::string> problems;
  for (const auto& path : candidates) {
    if (!storage.exists(path)) continue;
    const std::string damage = storage.verify(path);
    if (!damage.empty()) {
      problems.push_back(fmt::format("{}: {}", path, damage));
      logger()->warn("BackupAndRestore: skipping backup {}: {}", path, damage);
      continue;
    }
    // Files go through the Trainer's own reader, which also reads torchfit 0.1's.
    if (options_.io()) {
      context_->restore_backup(storage.load(path), path);
    } else {
      context_->restore_backup(path);
    }
    restored_ = true;
    last_backup_step_ = context_->state().global_step;
    logger()->info("BackupAndRestore: resumed from {} at epoch {}, batch {}", path, context_->state().epoch + 1,
                   context_->state().batch_in_epoch);
    return;
  }
  if (!problems.empty()) {
    // Starting over would silently throw the run away: let the user decide.
    throw CheckpointError(fmt::format(
        "BackupAndRestore: no usable backup in {} ({}); remove it to start over, or use double_checkpoint(true)",
        options_.backup_dir(), fmt::join(problems, "; ")));
  }
}

void BackupAndRestore::backup() {
  const auto& state = context_->state();
  if (state.global_step == last_backup_step_) return;  // nothing new since the last backup or restore
  last_backup_step_ = state.global_step;
  batches_since_backup_ = 0;
  // Ranks other than 0 store nothing. Data-parallel: rank 0's backup is durable before any
  // rank runs ahead of it, and its failure is raised on every rank.
  auto failure = detail::catch_on_main(*context_, [&] {
    write_backup();
    if (context_->world_size() > 1) manager_->wait();
  });
  detail::raise_main_failure(*context_, failure, "backup");
}

void BackupAndRestore::write_backup() {
  manager_->wait();  // the previous backup is committed before it becomes the previous one
  CheckpointIO& storage = manager_->io();
  if (options_.double_checkpoint() && storage.exists(backup_path())) {
    // The newest becomes the previous one atomically; a crash before the new
    // commit leaves the previous backup to restore from.
    storage.rename(backup_path(), previous_backup_path());
  }
  manager_->save(context_->checkpoint(), {});
}

// Backups are taken at the start of an epoch or batch: every callback has then
// finished with the previous one (history, checkpoints, counters), so the saved
// state is exactly what an uninterrupted run has at that point.
void BackupAndRestore::on_epoch_begin(int64_t, const Logs&) {
  if (options_.save_freq().is_epoch()) backup();
}

void BackupAndRestore::on_train_batch_begin(int64_t, const Logs&) {
  const SaveFreq& freq = options_.save_freq();
  if (!freq.is_epoch() && trigger_.fires(freq, batches_since_backup_)) backup();
}

void BackupAndRestore::on_train_batch_end(int64_t, const Logs&) { ++batches_since_backup_; }

void BackupAndRestore::on_before_update() { manager_->before_update(); }

void BackupAndRestore::on_train_end(const Logs&) {
  manager_->wait();
  if (!options_.delete_checkpoint()) return;
  context_->barrier("backup removal barrier");  // no rank may still be reading it
  // Ranks other than 0 remove nothing. The older backup goes first: a power cut between the two removals leaves the newest one (the
  // run resumes at its end), never the older alone (the run would train its last steps again).
  CheckpointIO& storage = manager_->io();
  for (const auto& path : {previous_backup_path(), backup_path()}) {
    try {
      storage.remove(path);
    } catch (const CheckpointError& e) {
      logger()->warn("BackupAndRestore: could not remove {}: {}", path, e.what());
    }
  }
  storage.remove_directory(options_.backup_dir());
}

}  // namespace torchfit
