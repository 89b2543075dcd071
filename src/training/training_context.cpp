#include "torchfit/training_context.h"

#include <fmt/format.h>

#include "io/atomic_file.h"
#include "torchfit/error.h"
#include "torchfit/trainer.h"
#include "training/fail_early.h"

namespace torchfit {

TrainingContext::~TrainingContext() = default;

std::vector<std::string> TrainingContext::log_keys() const { return {}; }

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

}  // namespace detail
}  // namespace torchfit
