#pragma once
/// \file
/// `TrainingContext`: what callbacks see of a training run. `Trainer` implements
/// it; so can a hand-written loop, which can then drive torchfit's callbacks
/// (EarlyStopping, ReduceLROnPlateau, CheckpointCallback, ...) itself.
///
///     class MyLoop : public torchfit::TrainingContext { ... };  // model(), optimizer(), stop_training(), ...
///     torchfit::CallbackList callbacks({early_stopping});
///     callbacks.set_context(&loop);

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "torchfit/arg.h"
#include "torchfit/engine/checkpoint.h"
#include "torchfit/trainer_state.h"

namespace torch::nn {
class Module;
}
namespace torch::optim {
class Optimizer;
}

namespace torchfit {

class Callback;
class Trainer;
struct Metric;

/// What `TrainingContext::checkpoint` includes.
struct CheckpointScope {
  using CallbackPtr = const Callback*;
  /// The History of the run; backups keep it, `Trainer::load_checkpoint` does not restore it.
  TORCHFIT_ARG(bool, with_history) = true;
  /// A callback whose state is included even when it is not one of the running
  /// fit's callbacks (a callback driven by hand).
  TORCHFIT_ARG(CallbackPtr, caller) = nullptr;
};

/// What the running `fit` was asked for, as Keras's `Callback.params`.
struct FitParams {
  /// The epoch the run ends after, unless stopped early (`FitOptions::epochs`).
  std::optional<int64_t> epochs;
  /// Batches per epoch, when known at the start: `steps_per_epoch`, else a pass
  /// over tensor inputs (unknown for a data loader without `steps_per_epoch`).
  std::optional<int64_t> steps;
  /// `FitOptions::verbose`.
  int verbose = 0;
};

class TrainingContext {
 public:
  virtual ~TrainingContext();

  virtual torch::nn::Module& model() const = 0;
  /// The optimizer; its param groups' options are what lr callbacks change.
  virtual torch::optim::Optimizer& optimizer() const = 0;
  /// The metric registered under `name`, if any (its direction resolves `Mode::Auto`).
  virtual const Metric* find_metric(const std::string& name) const = 0;
  /// The keys the run's epoch logs can have ("loss", the metrics, and their
  /// "val_" forms), for "did you mean" hints; empty if unknown (the default).
  virtual std::vector<std::string> log_keys() const;
  /// Progress of the run.
  virtual const TrainerState& state() const = 0;
  /// What the run was asked for; the default (a loop that does not say) knows nothing.
  virtual FitParams params() const;

  /// Asks the loop to stop; checked after each batch and each epoch.
  virtual void stop_training(bool value) = 0;
  virtual bool stop_training() const = 0;

  /// This process's rank and the number of ranks (0 and 1 when not data-parallel).
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  bool is_main_process() const { return rank() == 0; }
  /// Waits for every rank; `what` names the point in errors.
  virtual void barrier(const char* what) const = 0;
  /// Rank 0's `message` on every rank (a data-parallel run broadcasts it); `what`
  /// names the point in errors. The default, for one process, returns it as is.
  virtual std::string broadcast_from_main(const std::string& message, const char* what) const;

  /// The run's whole state as items, for a full checkpoint.
  virtual Checkpoint checkpoint(const CheckpointScope& scope = CheckpointScope()) = 0;
  /// Restores a full checkpoint into the running loop (BackupAndRestore).
  virtual void restore_backup(const std::string& path) = 0;
  /// Restores a full checkpoint already read (from a storage that is not files), `path`
  /// naming it. The default throws `Error`: override it to back up to such storage.
  virtual void restore_backup(const c10::IValue& state, const std::string& path);
  /// The file the run resumed from (retention never deletes it); empty if none.
  virtual const std::string& resumed_from() const = 0;
};

/// The context of a Trainer (lets `Callback::set_trainer` work with `Trainer` declared only).
TrainingContext* context_of(Trainer* trainer);
const TrainingContext* context_of(const Trainer* trainer);

}  // namespace torchfit
