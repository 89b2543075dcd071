#include "torchfit/training_context.h"

#include <fmt/format.h>

#include "io/atomic_file.h"
#include "torchfit/engine/checkpoint_manager.h"
#include "torchfit/error.h"
#include "torchfit/trainer.h"
#include "training/rank_policy.h"

namespace torchfit {

TrainingContext::~TrainingContext() = default;

std::vector<std::string> TrainingContext::log_keys() const { return {}; }

FitParams TrainingContext::params() const { return {}; }

std::string TrainingContext::broadcast_from_main(const std::string& message, const char*) const { return message; }

void TrainingContext::restore_backup(const c10::IValue&, const std::string& path) {
  throw Error(fmt::format("This training loop restores backups from files only, not {} from its storage", path));
}

TrainingContext* context_of(Trainer* trainer) { return trainer; }
const TrainingContext* context_of(const Trainer* trainer) { return trainer; }

namespace detail {

void check_on_main(const TrainingContext& context, const std::function<void()>& check) {
  std::string error;
  if (context.is_main_process()) {
    try {
      check();
    } catch (const CheckpointError& e) {
      error = e.what();
    }
  }
  error = context.broadcast_from_main(error, "directory check");
  if (error.empty()) return;
  throw CheckpointError(context.is_main_process() ? error : fmt::format("Rank 0: {}", error));
}

void write_on_main_only(CheckpointManager& manager, const TrainingContext& context) {
  if (context.world_size() > 1 && !context.is_main_process()) manager.store_nothing();
}

void check_freq_across_ranks(const TrainingContext& context, const std::string& owner, const SaveFreq& freq) {
  if (context.world_size() == 1 || freq.every_seconds() == 0) return;
  throw ValueError(fmt::format("{}: save_freq {} is not supported in data-parallel training; use SaveFreq::batches(n)",
                               owner, freq.to_string()));
}

}  // namespace detail
}  // namespace torchfit
