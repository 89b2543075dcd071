#include "torchfit/callbacks/checkpoint.h"

#include <cmath>
#include <filesystem>
#include <limits>

#include <fmt/args.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "detail/async_writer.h"
#include "detail/atomic_file.h"
#include "detail/checkpoint_format.h"
#include "detail/snapshot.h"
#include "torchfit/error.h"
#include "torchfit/log.h"
#include "torchfit/trainer.h"

namespace torchfit {
namespace {

constexpr const char* kPercentSuffix = "__percent";

/// A template with its replacement-field names. Python's `%` presentation type,
/// which fmt lacks, becomes a field `<name>__percent` formatted with `f` and a
/// literal '%' after it.
struct ParsedTemplate {
  std::string pattern;
  std::vector<std::string> names;
  std::vector<std::string> percent_names;
};

ParsedTemplate parse_template(const std::string& pattern) {
  ParsedTemplate out;
  for (size_t i = 0; i < pattern.size(); ++i) {
    char c = pattern[i];
    bool doubled = i + 1 < pattern.size() && pattern[i + 1] == c;
    if ((c == '{' || c == '}') && doubled) {
      out.pattern.append(2, c);
      ++i;
      continue;
    }
    size_t end = c == '{' ? pattern.find('}', i + 1) : std::string::npos;
    if (end == std::string::npos) {
      out.pattern += c;  // left for fmt to report
      continue;
    }
    std::string field = pattern.substr(i + 1, end - i - 1);
    std::string name = field.substr(0, field.find_first_of(":!"));
    out.names.push_back(name);
    if (field.size() > name.size() && field.back() == '%' && field[name.size()] == ':') {
      out.percent_names.push_back(name);
      field = name + kPercentSuffix + field.substr(name.size(), field.size() - name.size() - 1) + "f";
      out.pattern += "{" + field + "}%";
    } else {
      out.pattern += "{" + field + "}";
    }
    i = end;
  }
  return out;
}

std::string format_number(double value) { return fmt::format("{:.5f}", value); }

}  // namespace

SaveFreq SaveFreq::batches(int64_t n) {
  if (n <= 0) {
    throw ValueError(fmt::format(
        "Unrecognized save_freq: batches({}). Expected SaveFreq::epoch() or SaveFreq::batches(n) "
        "with n > 0",
        n));
  }
  return SaveFreq(n);
}

CheckpointCallback::CheckpointCallback(CheckpointOptions options)
    : MonitorCallback("CheckpointCallback", options.monitor(), options.mode(),
                      options.initial_value_threshold()),
      options_(std::move(options)) {
  if (options_.filepath().empty()) {
    throw ValueError("CheckpointCallback: filepath must not be empty");
  }
  if (options_.save_freq().every_n_batches() < 0) {
    throw ValueError(fmt::format("Unrecognized save_freq: batches({})",
                                 options_.save_freq().every_n_batches()));
  }
}

std::string CheckpointCallback::format_filepath(const std::string& filepath, int64_t epoch,
                                                std::optional<int64_t> batch, const Logs& logs) {
  fmt::dynamic_format_arg_store<fmt::format_context> args;
  Logs available;
  args.push_back(fmt::arg("epoch", epoch + 1));
  available["epoch"] = static_cast<double>(epoch + 1);
  if (batch && !logs.count("batch")) {
    args.push_back(fmt::arg("batch", *batch + 1));
    available["batch"] = static_cast<double>(*batch + 1);
  }
  for (const auto& [key, value] : logs) {
    if (available.count(key)) continue;
    args.push_back(fmt::arg(key.c_str(), value));
    available[key] = value;
  }
  auto parsed = parse_template(filepath);
  std::string reason;
  for (const auto& name : parsed.names) {
    if (!available.count(name)) {
      reason = fmt::format("missing key '{}'", name);
      break;
    }
  }
  for (const auto& name : parsed.percent_names) {
    if (available.count(name)) args.push_back(fmt::arg((name + kPercentSuffix).c_str(), 100.0 * available[name]));
  }
  if (reason.empty()) {
    try {
      return fmt::vformat(parsed.pattern, args);
    } catch (const fmt::format_error& e) {
      reason = e.what();
    }
  }
  throw ValueError(fmt::format(
      "Failed to format this callback filepath: \"{}\". Reason: {}; available keys: {}", filepath,
      reason, join_keys(available)));
}

void CheckpointCallback::on_epoch_begin(int64_t epoch, const Logs&) { current_epoch_ = epoch; }

void CheckpointCallback::on_epoch_end(int64_t epoch, const Logs& logs) {
  if (options_.save_freq().is_epoch()) save_model(epoch, std::nullopt, logs);
}

void CheckpointCallback::on_train_batch_end(int64_t batch, const Logs& logs) {
  if (options_.save_freq().is_epoch()) return;
  if (++batches_since_last_save_ < options_.save_freq().every_n_batches()) return;
  batches_since_last_save_ = 0;
  save_model(current_epoch_, batch, logs);
}

bool CheckpointCallback::should_save(int64_t epoch, const Logs& logs, const std::string& path) {
  auto log = logger();
  bool verbose = options_.verbose() > 0;
  if (!options_.save_best_only()) {
    if (verbose) log->info("Epoch {}: saving model to {}", epoch + 1, path);
    return true;
  }
  auto value = current(logs);
  if (!value) {
    log->warn("Can save best model only with {} available, saving anyway", monitor_);
    return true;
  }
  double unset = mode_ == Mode::Max ? -std::numeric_limits<double>::infinity()
                                    : std::numeric_limits<double>::infinity();
  std::string best_str = format_number(best_.value_or(unset));
  if (std::isnan(*value)) {
    log->warn("Epoch {}: {} is NaN, not saving; best stays {}", epoch + 1, monitor_, best_str);
    return false;
  }
  if (!is_improvement(*value, best_)) {
    if (verbose) log->info("Epoch {}: {} did not improve from {}", epoch + 1, monitor_, best_str);
    return false;
  }
  if (verbose) {
    log->info("Epoch {}: {} improved from {} to {}, saving model to {}", epoch + 1, monitor_,
              best_str, format_number(*value), path);
  }
  best_ = *value;
  return true;
}

void CheckpointCallback::save_model(int64_t epoch, std::optional<int64_t> batch,
                                    const Logs& logs) {
  // Formatted before the decision, as Keras does, so a bad template fails early.
  std::string path = format_filepath(options_.filepath(), epoch, batch, logs);
  wait();  // one save in flight at most; its failure surfaces here
  auto previous_best = best_;
  auto previous_path = last_saved_path_;
  if (!should_save(epoch, logs, path)) return;
  try {
    if (std::filesystem::is_directory(path)) {
      throw CheckpointError(fmt::format(
          "Please specify a non-directory filepath for CheckpointCallback. Filepath used is an "
          "existing directory: {}",
          path));
    }
    if (trainer_ == nullptr) {
      throw Error("CheckpointCallback: no trainer set; pass the callback to Trainer::fit");
    }
    last_saved_path_ = path;  // a full checkpoint's saved state names the file it lives in
    write(epoch, path);
  } catch (...) {
    best_ = previous_best;
    last_saved_path_ = previous_path;
    throw;
  }
  best_before_pending_ = previous_best;
  path_before_pending_ = previous_path;
}

void CheckpointCallback::write(int64_t epoch, const std::string& path) {
  const bool weights_only = options_.save_weights_only();
  const bool fsync = options_.fsync();
  const bool verbose = options_.verbose() > 0;
  auto finished = [epoch, path, verbose] {
    if (verbose) logger()->info("Epoch {}: finished saving model to {}", epoch + 1, path);
  };
  if (options_.async_save()) {
    if (!writer_) {
      snapshot_ = std::make_unique<detail::Snapshot>();
      writer_ = std::make_unique<detail::AsyncWriter>();
    }
    if (weights_only || snapshot_->capture_optimizer(trainer_->optimizer())) {
      snapshot_->capture_model(trainer_->model());
      const detail::Snapshot* snapshot = snapshot_.get();
      if (weights_only) {
        writer_->submit([=] {
          detail::commit_weights(path, snapshot->model(), fsync);
          finished();
        });
      } else {
        writer_->submit([=, state = trainer_->state(), callbacks = trainer_->callback_states()] {
          detail::commit_full(path, snapshot->model(), snapshot->optimizer(), state, callbacks, fsync);
          finished();
        });
      }
      return;
    }
    if (!warned_sync_fallback_) {
      logger()->warn("CheckpointCallback {}: async_save cannot snapshot this optimizer's state; saving full "
                     "checkpoints synchronously",
                     options_.filepath());
      warned_sync_fallback_ = true;
    }
  }
  auto tree = detail::ModuleTree::of(trainer_->model());
  if (weights_only) {
    detail::commit_weights(path, tree, fsync);
  } else {
    detail::commit_full(path, tree, trainer_->optimizer(), trainer_->state(), trainer_->callback_states(), fsync);
  }
  finished();
}

void CheckpointCallback::wait() {
  if (!writer_) return;
  try {
    writer_->wait();
  } catch (...) {
    best_ = best_before_pending_;
    last_saved_path_ = path_before_pending_;
    throw;
  }
}

void CheckpointCallback::on_train_begin(const Logs& logs) {
  MonitorCallback::on_train_begin(logs);
  // Leftovers of a killed run in the directory we write to (up to the first field).
  auto literal = options_.filepath().substr(0, options_.filepath().find('{'));
  auto dir = std::filesystem::path(literal).parent_path();
  if (std::filesystem::is_directory(dir)) detail::remove_stale_temporaries(dir.string());
}

void CheckpointCallback::on_train_end(const Logs&) { wait(); }

CheckpointCallback::~CheckpointCallback() {
  writer_.reset();  // waits for the save in flight, which reads the snapshot
}

std::string CheckpointCallback::state_key() const {
  return "CheckpointCallback:" + options_.filepath();
}

CallbackState CheckpointCallback::state() const {
  CallbackState out;
  if (best_) out["best"] = fmt::format("{}", *best_);
  out["batches_since_last_save"] = std::to_string(batches_since_last_save_);
  out["last_saved_path"] = last_saved_path_;
  return out;
}

void CheckpointCallback::load_state(const CallbackState& state) {
  auto field = [&](const char* name) -> const std::string* {
    auto it = state.find(name);
    return it == state.end() ? nullptr : &it->second;
  };
  try {
    if (auto* best = field("best")) best_ = std::stod(*best);
    if (auto* count = field("batches_since_last_save")) batches_since_last_save_ = std::stoll(*count);
  } catch (const std::exception&) {
    throw CheckpointError(fmt::format("CheckpointCallback {}: corrupt saved state",
                                      options_.filepath()));
  }
  if (auto* path = field("last_saved_path")) last_saved_path_ = *path;
}

}  // namespace torchfit
