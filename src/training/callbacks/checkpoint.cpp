#include "torchfit/callbacks/checkpoint.h"

#include <exception>
#include <utility>

#include <ATen/core/ivalue.h>
#include <fmt/format.h>

#include "engine/filepath_template.h"
#include "io/atomic_file.h"
#include "training/rank_policy.h"
#include "torchfit/error.h"
#include "torchfit/training_context.h"

namespace torchfit {

namespace {

std::shared_ptr<MetricMonitor> monitor_for(const CheckpointOptions& options) {
  return std::make_shared<MetricMonitor>("CheckpointCallback", options.monitor(), options.mode(),
                                         options.initial_value_threshold());
}

/// The logs a save point formats its filepath with: 1-based epoch and batch added.
Logs with_position(const Logs& logs, int64_t epoch, std::optional<int64_t> batch) {
  Logs values = logs;
  values["epoch"] = static_cast<double>(epoch + 1);
  if (batch && !logs.count("batch")) values["batch"] = static_cast<double>(*batch + 1);
  return values;
}

/// Data-parallel: every rank raises the error of rank 0's save, if any (`error` from rank 0).
void raise_on_every_rank(const TrainingContext& context, const std::string& error, const char* save) {
  if (error.empty()) return;
  if (context.is_main_process()) throw CheckpointError(error);
  throw CheckpointError(fmt::format("Rank 0's {} failed: {}", save, error));
}

}  // namespace

CheckpointCallback::CheckpointCallback(CheckpointOptions options) : MonitorCallback("CheckpointCallback", monitor_for(options)) {
  if (options.filepath().empty()) throw ValueError("CheckpointCallback: filepath must not be empty");
  async_save_ = options.async_save();
  manager_ = std::make_unique<CheckpointManager>(std::move(options), tracker_);
}

CheckpointCallback::~CheckpointCallback() = default;

std::string CheckpointCallback::format_filepath(const std::string& filepath, int64_t epoch,
                                                std::optional<int64_t> batch, const Logs& logs) {
  return detail::FilepathTemplate(filepath).format(with_position(logs, epoch, batch), {"epoch", "batch"});
}

void CheckpointCallback::on_train_begin(const Logs& logs) {
  MonitorCallback::on_train_begin(logs);
  detail::check_freq_across_ranks(*context_, "CheckpointCallback " + options().filepath(), options().save_freq());
  detail::write_on_main_only(*manager_, *context_);
  if (!context_->resumed_from().empty()) manager_->protect(context_->resumed_from());
  // Fail now, not an epoch later at the first save (the first write into the directory
  // removes what killed writers left there).
  auto dir = detail::FilepathTemplate(options().filepath()).literal_directory();
  detail::check_on_main(*context_, [&] { manager_->io().prepare(dir, "CheckpointCallback"); });
}

void CheckpointCallback::on_train_end(const Logs&) {
  settle_across_ranks();
  wait();
}

void CheckpointCallback::on_before_update() { manager_->before_update(); }

void CheckpointCallback::on_epoch_begin(int64_t epoch, const Logs&) { current_epoch_ = epoch; }

void CheckpointCallback::on_epoch_end(int64_t epoch, const Logs& logs) {
  if (options().save_freq().is_epoch()) save_model(epoch, std::nullopt, logs);
}

void CheckpointCallback::on_train_batch_end(int64_t batch, const Logs& logs) {
  if (!options().save_freq().is_epoch()) save_model(current_epoch_, batch, logs);
}

void CheckpointCallback::save_model(int64_t epoch, std::optional<int64_t> batch, const Logs& logs) {
  if (context_ == nullptr) throw Error("CheckpointCallback: no trainer set; pass the callback to Trainer::fit");
  const int64_t every = options().save_freq().every_n_batches();
  if (every <= 0 || manager_->calls_since_last_save() + 1 >= every) settle_across_ranks();  // a save point
  // An epoch's save after which the run ends (its last epoch, or a stop already asked for)
  // is waited for at once: an async manager stores it inline.
  const FitParams params = context_->params();
  const bool last_of_run = !batch && (context_->stop_training() || (params.epochs && epoch + 1 >= *params.epochs));
  auto save = [&] {
    return manager_->save(context_->checkpoint(CheckpointScope().caller(this)), with_position(logs, epoch, batch),
                          last_of_run);
  };
  if (context_->world_size() == 1) {
    save();
    return;
  }
  // Data-parallel: only rank 0 stores, so a save fails on rank 0 alone, and every rank must
  // raise its error (not hang, or fail later at an unrelated collective).
  bool saved = false;
  std::string error;
  std::exception_ptr failure;
  try {
    saved = save();
    if (saved && !async_save_) manager_->wait();
  } catch (const CheckpointError& e) {
    if (!context_->is_main_process()) throw;
    error = e.what();
    failure = std::current_exception();
    saved = true;  // the other ranks decided to save too
  }
  if (!saved) return;
  if (async_save_) {
    // Run inline or in the background, its outcome is shared at the next save point or the end.
    inline_error_ = std::move(error);
    background_save_ = true;
    return;
  }
  // Sync: also the barrier, so rank 0's file is durable before any rank runs ahead of it.
  error = context_->broadcast_from_main(error, "checkpoint barrier");
  if (failure) std::rethrow_exception(failure);
  raise_on_every_rank(*context_, error, "checkpoint save");
}

void CheckpointCallback::settle_across_ranks() {
  if (!background_save_) return;
  background_save_ = false;
  // Rank 0 finishes its background save; every rank learns how it went and fails alike.
  std::string error = std::exchange(inline_error_, {});
  if (context_->is_main_process() && error.empty()) {
    try {
      manager_->wait();
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  raise_on_every_rank(*context_, context_->broadcast_from_main(error, "checkpoint status broadcast"),
                      "async checkpoint save");
}

void CheckpointCallback::wait() { manager_->wait(); }

std::string CheckpointCallback::state_key() const {
  const auto& o = options();
  // A time trigger is named only when there is one, so keys of earlier files stay the same.
  const double seconds = o.save_freq().every_seconds();
  return fmt::format("CheckpointCallback{{filepath={}, monitor={}, mode={}, save_best_only={}, save_weights_only={}, "
                     "save_freq={}{}, save_top_k={}, max_to_keep={}}}",
                     o.filepath(), o.monitor(), to_string(o.mode()), o.save_best_only(), o.save_weights_only(),
                     o.save_freq().every_n_batches(), seconds > 0 ? fmt::format(", save_seconds={}", seconds) : "",
                     o.save_top_k(), o.max_to_keep());
}

c10::IValue CheckpointCallback::state_dict() const { return manager_->state_dict(); }

void CheckpointCallback::load_state_dict(const c10::IValue& state) {
  manager_->load_state_dict(state);
  restored_ = true;
}

}  // namespace torchfit
