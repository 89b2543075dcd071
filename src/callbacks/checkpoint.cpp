#include "torchfit/callbacks/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <sstream>
#include <filesystem>
#include <fstream>
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
#include "torchfit/serialize.h"
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
  if (options_.save_top_k() < -1) {
    throw ValueError(fmt::format("Invalid save_top_k: {} (must be -1 to keep all, or >= 0)", options_.save_top_k()));
  }
  if (options_.max_to_keep() == 0 || options_.max_to_keep() < -1) {
    throw ValueError(
        fmt::format("Invalid max_to_keep: {} (must be >= 1, or -1 to keep all)", options_.max_to_keep()));
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
  const Record before = record();
  if (!should_save(epoch, logs, path)) return;
  auto score = current(logs);
  if (score && std::isnan(*score)) score.reset();
  if (!ranks_in_top_k(path, score)) {
    if (options_.verbose() > 0) {
      logger()->info("Epoch {}: {} is not among the {} best, not saving", epoch + 1, monitor_, options_.save_top_k());
    }
    restore(before);
    return;
  }
  try {
    detail::check_not_directory(path, "CheckpointCallback");
    if (trainer_ == nullptr) {
      throw Error("CheckpointCallback: no trainer set; pass the callback to Trainer::fit");
    }
    last_saved_path_ = path;  // a full checkpoint's saved state names the file it lives in
    write(epoch, path, plan_retention(path, score));
  } catch (...) {
    restore(before);
    throw;
  }
  before_pending_ = before;
}

CheckpointCallback::Record CheckpointCallback::record() const {
  return {best_, last_saved_path_, top_k_, recent_};
}

void CheckpointCallback::restore(const Record& record) {
  best_ = record.best;
  last_saved_path_ = record.last_saved_path;
  top_k_ = record.top_k;
  recent_ = record.recent;
}

bool CheckpointCallback::ranks_in_top_k(const std::string& path, std::optional<double> score) const {
  const int64_t k = options_.save_top_k();
  if (k == -1) return true;
  if (k == 0) return false;
  if (!score) return true;  // unranked: kept, and never evicted by rank
  bool replaces_own_entry = std::any_of(top_k_.begin(), top_k_.end(), [&](const auto& e) { return e.first == path; });
  return replaces_own_entry || static_cast<int64_t>(top_k_.size()) < k ||
         is_improvement(*score, top_k_.back().second);
}

std::vector<std::string> CheckpointCallback::plan_retention(const std::string& path, std::optional<double> score) {
  std::vector<std::string> candidates;
  auto drop = [&](auto& table, auto matches) {
    table.erase(std::remove_if(table.begin(), table.end(), matches), table.end());
  };
  if (options_.save_top_k() > 0 && score) {
    drop(top_k_, [&](const auto& e) { return e.first == path; });
    top_k_.emplace_back(path, *score);
    // Best first; a later file wins a tie, as it replaced the earlier in ranking.
    std::stable_sort(top_k_.begin(), top_k_.end(), [&](const auto& a, const auto& b) {
      return is_improvement(a.second, b.second);
    });
    while (static_cast<int64_t>(top_k_.size()) > options_.save_top_k()) {
      candidates.push_back(top_k_.back().first);
      top_k_.pop_back();
    }
  }
  if (options_.max_to_keep() > 0 && !options_.save_best_only()) {
    drop(recent_, [&](const std::string& p) { return p == path; });
    recent_.push_back(path);
    while (static_cast<int64_t>(recent_.size()) > options_.max_to_keep()) {
      candidates.push_back(recent_.front());
      recent_.erase(recent_.begin());
    }
  }
  // Delete only what no table still keeps, never the new file or the one the run resumed from.
  std::vector<std::string> evict;
  const std::string resumed = trainer_ ? trainer_->resumed_from() : std::string();
  for (const auto& candidate : candidates) {
    bool kept = candidate == path || candidate == resumed ||
                std::any_of(top_k_.begin(), top_k_.end(), [&](const auto& e) { return e.first == candidate; }) ||
                std::find(recent_.begin(), recent_.end(), candidate) != recent_.end() ||
                std::find(evict.begin(), evict.end(), candidate) != evict.end();
    if (!kept) evict.push_back(candidate);
  }
  return evict;
}

void CheckpointCallback::write(int64_t epoch, const std::string& path, std::vector<std::string> evict) {
  if (trainer_->world_size() == 1) return write_here(epoch, path, std::move(evict));
  // Data-parallel: rank 0 writes (an async save completes here), then every rank
  // meets at a barrier, so none runs ahead of a save it believes happened.
  if (trainer_->is_main_process()) {
    write_here(epoch, path, std::move(evict));
    wait();
  }
  trainer_->barrier("checkpoint barrier");
}

void CheckpointCallback::write_here(int64_t epoch, const std::string& path, std::vector<std::string> evict) {
  // Our own state goes in even when we are driven outside a fit.
  auto callback_states = [this] {
    auto states = trainer_->callback_states();
    states[state_key()] = state();
    return states;
  };
  const bool weights_only = options_.save_weights_only();
  const bool fsync = options_.fsync();
  const bool verbose = options_.verbose() > 0;
  const bool save_last = options_.save_last();
  // After the commit, and only then: retention deletes and the latest pointer.
  auto finished = [epoch, path, verbose, save_last, fsync, evict = std::move(evict)] {
    if (verbose) logger()->info("Epoch {}: finished saving model to {}", epoch + 1, path);
    for (const auto& old : evict) {
      std::error_code ec;
      if (std::filesystem::remove(old, ec) && verbose) logger()->info("Removed {} (retention)", old);
      if (ec) logger()->warn("Could not remove old checkpoint {}: {}", old, ec.message());
    }
    if (save_last) detail::write_latest_pointer(path, fsync);
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
        writer_->submit([=, state = trainer_->checkpoint_state(), callbacks = callback_states()] {
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
    detail::commit_full(path, tree, trainer_->optimizer(), trainer_->checkpoint_state(), callback_states(), fsync);
  }
  finished();
}

void CheckpointCallback::wait() {
  if (!writer_) return;
  try {
    writer_->wait();
  } catch (...) {
    restore(before_pending_);
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

std::optional<std::string> latest_checkpoint(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return std::nullopt;
  std::ifstream pointer(fs::path(dir) / kLatestPointer);
  std::string name;
  if (pointer && std::getline(pointer, name) && !name.empty()) {
    auto path = (fs::path(dir) / name).string();
    if (verify_checkpoint(path).ok) return path;
  }
  // No usable pointer: the newest file that verifies.
  std::optional<std::string> newest;
  fs::file_time_type newest_time;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    auto file = entry.path().filename().string();
    if (!entry.is_regular_file(ec) || file == kLatestPointer || file.find(detail::kTempMarker) != std::string::npos) {
      continue;
    }
    auto time = entry.last_write_time(ec);
    bool newer = !newest || time > newest_time || (time == newest_time && entry.path().string() > *newest);
    if (newer && verify_checkpoint(entry.path().string()).ok) {
      newest = entry.path().string();
      newest_time = time;
    }
  }
  return newest;
}

std::string CheckpointCallback::state_key() const {
  return "CheckpointCallback:" + options_.filepath();
}

CallbackState CheckpointCallback::state() const {
  auto out = MonitorCallback::state();
  out["batches_since_last_save"] = std::to_string(batches_since_last_save_);
  out["last_saved_path"] = last_saved_path_;
  std::string top_k, recent;
  for (const auto& [path, score] : top_k_) top_k += fmt::format("{}\t{}\n", score, path);
  for (const auto& path : recent_) recent += path + "\n";
  out["top_k"] = top_k;
  out["recent"] = recent;
  return out;
}

void CheckpointCallback::load_state(const CallbackState& state) {
  auto field = [&](const char* name) -> const std::string* {
    auto it = state.find(name);
    return it == state.end() ? nullptr : &it->second;
  };
  MonitorCallback::load_state(state);
  read_field(state, "batches_since_last_save", batches_since_last_save_);
  if (auto* path = field("last_saved_path")) last_saved_path_ = *path;
  auto lines = [](const std::string& text) {
    std::vector<std::string> out;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
      if (!line.empty()) out.push_back(line);
    }
    return out;
  };
  if (auto* text = field("top_k")) {
    top_k_.clear();
    for (const auto& line : lines(*text)) {
      auto tab = line.find('\t');
      char* end = nullptr;
      double score = tab == std::string::npos ? 0.0 : std::strtod(line.c_str(), &end);
      if (tab == std::string::npos || end != line.c_str() + tab) {
        throw CheckpointError(fmt::format("CheckpointCallback {}: corrupt saved top-k entry '{}'", options_.filepath(), line));
      }
      top_k_.emplace_back(line.substr(tab + 1), score);
    }
  }
  if (auto* text = field("recent")) recent_ = lines(*text);
}

}  // namespace torchfit
