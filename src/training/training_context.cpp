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

std::exception_ptr catch_on_main(const TrainingContext& context, const std::function<void()>& run) {
  if (!context.is_main_process()) {
    run();
    return nullptr;
  }
  try {
    run();
  } catch (const CheckpointError&) {
    return std::current_exception();
  }
  return nullptr;
}

void raise_main_failure(const TrainingContext& context, const std::exception_ptr& failure, const char* what) {
  std::string error;
  if (failure) {
    try {
      std::rethrow_exception(failure);
    } catch (const std::exception& e) {
      error = e.what();
    } catch (...) {
      error = "an exception that is not a std::exception";
    }
  }
  error = context.broadcast_from_main(error, what);
  if (failure) std::rethrow_exception(failure);
  if (!error.empty()) throw CheckpointError(fmt::format("Rank 0's {} failed: {}", what, error));
}

void check_on_main(const TrainingContext& context, const std::function<void()>& check) {
  raise_main_failure(context, catch_on_main(context, [&] {
                       if (context.is_main_process()) check();
                     }),
                     "directory check");
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
