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
  // raise its error (not break at an unrelated collective later).
  bool saved = false;
  std::exception_ptr failure = detail::catch_on_main(*context_, [&] {
    saved = save();
    if (saved && !async_save_) manager_->wait();
  });
  if (!saved && !failure) return;  // the other ranks decided alike
  if (async_save_) {
    // Run inline or in the background, its outcome is shared at the next save point or the end.
    inline_failure_ = failure;
    background_save_ = true;
    return;
  }
  // Sync: also the barrier, so rank 0's file is durable before any rank runs ahead of it.
  detail::raise_main_failure(*context_, failure, "checkpoint save");
}

void CheckpointCallback::settle_across_ranks() {
  if (!background_save_) return;
  background_save_ = false;
  // Rank 0 finishes its background save; every rank learns how it went and fails alike.
  std::exception_ptr failure = std::exchange(inline_failure_, nullptr);
  if (!failure && context_->is_main_process()) {
    try {
      manager_->wait();
    } catch (...) {
      failure = std::current_exception();
    }
  }
  detail::raise_main_failure(*context_, failure, "async checkpoint save");
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
