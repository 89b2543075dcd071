#include "torchfit/engine/checkpoint_manager.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "engine/filepath_template.h"
#include "format/state_fields.h"
#include "sys/paths.h"
#include "io/atomic_file.h"
#include "torchfit/error.h"
#include "torchfit/log.h"

namespace torchfit {
namespace {

constexpr const char* kManagerKeyPrefix = "torchfit_manager:";

std::string format_number(double value) { return fmt::format("{:.5f}", value); }

/// "Epoch 3", "Step 120" or "Save 4": how messages name a save point, Keras-style.
std::string save_point(const Logs& logs, int64_t saves) {
  for (const char* key : {"epoch", "step"}) {
    auto it = logs.find(key);
    if (it != logs.end()) {
      std::string name(key);
      name[0] = static_cast<char>(std::toupper(name[0]));
      return fmt::format("{} {}", name, static_cast<int64_t>(it->second));
    }
  }
  return fmt::format("Save {}", saves + 1);
}

std::shared_ptr<CheckpointIO> make_io(const CheckpointOptions& options, bool store_nothing) {
  std::shared_ptr<CheckpointIO> io = options.io() ? options.io() : std::make_shared<FileCheckpointIO>(SaveOptions().fsync(options.fsync()));
  if (store_nothing) return std::make_shared<ReadOnlyCheckpointIO>(std::move(io));  // nothing to write late
  if (options.async_save()) io = std::make_shared<AsyncCheckpointIO>(std::move(io), options.async_policy());
  return io;
}

/// The manager's own state inside the files it writes.
class ManagerState : public Stateful {
 public:
  explicit ManagerState(CheckpointManager& manager) : manager_(manager) {}
  c10::IValue state_dict() const override { return manager_.state_dict(); }
  void check_state_dict(const c10::IValue& state, const std::string& where) const override {
    manager_.check_state_dict(state, where);
  }
  void load_state_dict(const c10::IValue& state) override { manager_.load_state_dict(state); }

 private:
  CheckpointManager& manager_;
};

}  // namespace

CheckpointManager::CheckpointManager(CheckpointOptions options)
    : CheckpointManager(options, std::make_shared<MetricMonitor>("CheckpointManager", options.monitor(), options.mode(),
                                                                 options.initial_value_threshold())) {}

CheckpointManager::CheckpointManager(CheckpointOptions options, std::shared_ptr<MetricMonitor> monitor)
    : options_(std::move(options)), monitor_(std::move(monitor)) {
  if (options_.filepath().empty()) throw ValueError("CheckpointManager: filepath must not be empty");
  if (!monitor_) throw ValueError("CheckpointManager: monitor must not be null");
  if (options_.save_freq().every_n_batches() < 0) {
    throw ValueError(fmt::format("Unrecognized save_freq: batches({})", options_.save_freq().every_n_batches()));
  }
  if (options_.save_top_k() < -1) {
    throw ValueError(fmt::format("Invalid save_top_k: {} (must be -1 to keep all, or >= 0)", options_.save_top_k()));
  }
  if (options_.max_to_keep() == 0 || options_.max_to_keep() < -1) {
    throw ValueError(
        fmt::format("Invalid max_to_keep: {} (must be >= 1, or -1 to keep all)", options_.max_to_keep()));
  }
  template_ = std::make_unique<detail::FilepathTemplate>(options_.filepath());
  io_ = make_io(options_, false);
  hook_failure_ = std::make_shared<HookFailure>();
}

CheckpointManager::~CheckpointManager() {
  try {
    io_->wait();
    raise_hook_failure();
  } catch (const std::exception& e) {
    logger()->error("CheckpointManager {}: a background save failed and nothing was left to report it to: {}",
                    options_.filepath(), e.what());
  }
}

void CheckpointManager::store_nothing() {
  if (dynamic_cast<ReadOnlyCheckpointIO*>(io_.get())) return;
  wait();
  io_ = make_io(options_, true);
}

bool CheckpointManager::is_integer_key(const std::string& key) {
  return key == "epoch" || key == "batch" || key == "step";
}

/// A failure of the on_commit hook, kept until the caller's thread can raise it.
struct CheckpointManager::HookFailure {
  std::mutex mutex;
  std::string error;
};

Logs CheckpointManager::values_for(const Checkpoint& state, const Logs& logs, std::set<std::string>& integers) const {
  Logs values = state.numeric_values(&integers);
  for (const auto& [key, value] : logs) {
    values[key] = value;
    integers.erase(key);
    if (is_integer_key(key) && std::isfinite(value) && value == std::floor(value)) integers.insert(key);
  }
  return values;
}

bool CheckpointManager::save(const Checkpoint& state, const Logs& logs, bool last_of_run) {
  if (!trigger_.fires(options_.save_freq(), ++record_.calls_since_last_save)) return false;
  record_.calls_since_last_save = 0;
  std::set<std::string> integers;
  const Logs values = values_for(state, logs, integers);
  // Formatted before the decision, as Keras does, so a bad template fails early.
  const std::string path = template_->format(values, integers);
  wait();  // one save in flight at most; its failure surfaces here
  const Record before = record();
  const std::string point = save_point(values, saves_);
  try {
    if (!should_save(point, values, path)) return false;
    auto score = monitor_->current(values);
    if (score && std::isnan(*score)) score.reset();
    if (!ranks_in_top_k(path, score)) {
      if (options_.verbose() > 0) {
        logger()->info("{}: {} is not among the {} best, not saving", point, monitor_->monitor(), options_.save_top_k());
      }
      restore_record(before);
      return false;
    }
    record_.last_saved_path = path;  // the saved state names the file it lives in
    write(state, path, plan_retention(path, score), point, last_of_run);
  } catch (...) {
    restore_record(before);
    throw;
  }
  before_pending_ = before;
  ++saves_;
  raise_hook_failure();  // a sync save ran its hook already
  return true;
}

void CheckpointManager::raise_hook_failure() {
  std::string error;
  {
    std::lock_guard<std::mutex> lock(hook_failure_->mutex);
    error.swap(hook_failure_->error);
  }
  if (!error.empty()) throw CheckpointError(error);
}

bool CheckpointManager::should_save(const std::string& point, const Logs& logs, const std::string& path) {
  auto log = logger();
  const bool verbose = options_.verbose() > 0;
  const auto& name = monitor_->monitor();
  if (!options_.save_best_only()) {
    if (verbose) log->info("{}: saving model to {}", point, path);
    return true;
  }
  auto value = monitor_->current(logs);
  if (!value) {
    log->warn("Can save best model only with {} available, saving anyway. Available metrics are: {}.{}", name,
              join_keys(logs), did_you_mean(name, logs));
    return true;
  }
  monitor_->resolve();
  double unset = monitor_->mode() == Mode::Max ? -std::numeric_limits<double>::infinity()
                                               : std::numeric_limits<double>::infinity();
  std::string best_str = format_number(monitor_->best().value_or(unset));
  if (std::isnan(*value)) {
    log->warn("{}: {} is NaN, not saving; best stays {}", point, name, best_str);
    return false;
  }
  if (!monitor_->is_improvement(*value, monitor_->best())) {
    if (verbose) log->info("{}: {} did not improve from {}", point, name, best_str);
    return false;
  }
  if (verbose) {
    log->info("{}: {} improved from {} to {}, saving model to {}", point, name, best_str, format_number(*value), path);
  }
  monitor_->set_best(*value);
  return true;
}

CheckpointManager::Record CheckpointManager::record() const {
  Record out = record_;
  out.best = monitor_->best();
  return out;
}

void CheckpointManager::restore_record(const Record& record) {
  int64_t calls = record_.calls_since_last_save;
  record_ = record;
  record_.calls_since_last_save = calls;  // the call was counted either way
  monitor_->set_best(record.best);
}

bool CheckpointManager::ranks_in_top_k(const std::string& path, std::optional<double> score) {
  const int64_t k = options_.save_top_k();
  if (k == -1) return true;
  if (k == 0) return false;
  if (!score) return true;  // unranked: kept, and never evicted by rank
  const auto& top = record_.top_k;
  bool replaces_own_entry = std::any_of(top.begin(), top.end(), [&](const auto& e) { return e.first == path; });
  return replaces_own_entry || static_cast<int64_t>(top.size()) < k || monitor_->is_improvement(*score, top.back().second);
}

std::vector<std::string> CheckpointManager::plan_retention(const std::string& path, std::optional<double> score) {
  std::vector<std::string> candidates;
  auto& top = record_.top_k;
  auto& recent = record_.recent;
  auto drop = [&](auto& table, auto matches) { table.erase(std::remove_if(table.begin(), table.end(), matches), table.end()); };
  if (options_.save_top_k() > 0 && score) {
    drop(top, [&](const auto& e) { return e.first == path; });
    top.emplace_back(path, *score);
    // Best first; a later file wins a tie, as it replaced the earlier in ranking.
    std::stable_sort(top.begin(), top.end(),
                     [&](const auto& a, const auto& b) { return monitor_->is_improvement(a.second, b.second); });
    while (static_cast<int64_t>(top.size()) > options_.save_top_k()) {
      candidates.push_back(top.back().first);
      top.pop_back();
    }
  }
  if (options_.max_to_keep() > 0 && !options_.save_best_only()) {
    drop(recent, [&](const std::string& p) { return p == path; });
    recent.push_back(path);
    while (static_cast<int64_t>(recent.size()) > options_.max_to_keep()) {
      candidates.push_back(recent.front());
      recent.erase(recent.begin());
    }
  }
  // Delete only what no table still keeps, never the new file or the one the run resumed from.
  std::vector<std::string> evict;
  for (const auto& candidate : candidates) {
    bool kept = candidate == path || candidate == protected_path_ ||
                std::any_of(top.begin(), top.end(), [&](const auto& e) { return e.first == candidate; }) ||
                std::find(recent.begin(), recent.end(), candidate) != recent.end() ||
                std::find(evict.begin(), evict.end(), candidate) != evict.end();
    if (!kept) evict.push_back(candidate);
  }
  return evict;
}

void CheckpointManager::write(const Checkpoint& state, const std::string& path, std::vector<std::string> evict,
                              const std::string& point, bool last_of_run) {
  c10::IValue data;
  if (options_.save_weights_only()) {
    data = state.weights_state_dict();
  } else {
    Checkpoint with_manager = state;
    with_manager.add(kManagerKeyPrefix + state_key(), std::make_shared<ManagerState>(*this));
    data = with_manager.state_dict();
  }
  const bool verbose = options_.verbose() > 0;
  const bool save_last = options_.save_last();
  // After the commit, and only then: retention deletes and the latest pointer.
  auto io = io_;
  // Ranks other than 0 store nothing (ReadOnlyCheckpointIO): no file, no hook.
  auto hook = dynamic_cast<ReadOnlyCheckpointIO*>(io_.get()) ? nullptr : options_.on_commit();
  auto on_commit = [io, path, point, verbose, save_last, evict = std::move(evict), hook, failure = hook_failure_,
                    filepath = options_.filepath()] {
    if (verbose) logger()->info("{}: finished saving model to {}", point, path);
    // The pointer moves first, so it never names a file retention is deleting.
    if (save_last) {
      try {
        io->mark_latest(path);
      } catch (const std::exception& e) {
        // The checkpoint is committed; the pointer is a convenience the next save retries.
        logger()->warn("Checkpoint {} is saved, but recording it as the latest failed: {}", path, e.what());
      }
    }
    for (const auto& old : evict) {
      try {
        io->remove(old);
        if (verbose) logger()->info("Removed {} (retention)", old);
      } catch (const std::exception& e) {
        logger()->warn("Could not remove old checkpoint {}: {}", old, e.what());
      }
    }
    // Last, so its failure never leaves retention half done; the file stays saved.
    if (!hook) return;
    std::string error;
    try {
      hook(path);
    } catch (const std::exception& e) {
      error = e.what();
    } catch (...) {
      error = "an exception that is not a std::exception";
    }
    if (error.empty()) return;
    std::lock_guard<std::mutex> lock(failure->mutex);
    failure->error = fmt::format("CheckpointManager {}: {} is saved, but its on_commit hook failed: {}", filepath,
                                 path, error);
  };
  SaveHints hints;
  hints.updated_by_step = state.updated_by_step();
  hints.defer_copy = guards_updates_;
  hints.caller_waits = last_of_run;
  io_->save_with_hints(data, path, hints, on_commit);
}

void CheckpointManager::before_update() {
  guards_updates_ = true;
  io_->before_update();
}

void CheckpointManager::wait() {
  try {
    io_->wait();
  } catch (...) {
    restore_record(before_pending_);
    throw;
  }
  raise_hook_failure();
}

std::vector<std::string> CheckpointManager::candidates() {
  const std::string dir = template_->literal_directory();
  std::vector<std::string> out;
  if (options_.save_last()) {
    if (auto latest = io_->latest(dir); latest && template_->matches(*latest)) out.push_back(*latest);
  }
  for (auto& path : io_->list(dir)) {
    if (template_->matches(path) && std::find(out.begin(), out.end(), path) == out.end()) out.push_back(path);
  }
  return out;
}

void CheckpointManager::check_directory() {
  if (directory_checked_) return;
  io_->prepare(template_->literal_directory(), "CheckpointManager " + options_.filepath());
  directory_checked_ = true;
}

std::optional<std::string> CheckpointManager::restore_latest(Checkpoint& state) {
  wait();
  check_directory();
  std::vector<std::string> problems;
  // Another process's retention may delete a candidate before we open it: list again then.
  for (int round = 0; round < 3; ++round) {
    bool vanished = false;
    problems.clear();
    for (const auto& path : candidates()) {
      try {
        restore(state, path);
        return path;
      } catch (const StorageError&) {
        // Not damage: skipping the file would resume an older run, whose retention could then
        // delete this intact one.
        throw;
      } catch (const CheckpointError& e) {
        if (!io_->exists(path)) {
          vanished = true;
          continue;
        }
        logger()->warn("CheckpointManager: skipping {}: {}", path, e.what());
        problems.push_back(e.what());
      }
    }
    if (!vanished) break;
  }
  if (!problems.empty()) {
    // Starting over would silently throw the run away: let the user decide.
    throw CheckpointError(fmt::format("CheckpointManager {}: no checkpoint could be restored ({})",
                                      options_.filepath(), fmt::join(problems, "; ")));
  }
  return std::nullopt;
}

void CheckpointManager::restore(Checkpoint& state, const std::string& path) {
  wait();
  auto data = io_->load(path);
  Checkpoint with_manager = state;
  auto manager_state = std::make_shared<ManagerState>(*this);
  with_manager.add_optional(kManagerKeyPrefix + state_key(), manager_state);
  // Files of torchfit 0.2 keyed every manager's state with its monitor.
  const std::string key_0_2 = fmt::format("{}|monitor={}", options_.filepath(), options_.monitor());
  if (key_0_2 != state_key()) with_manager.add_optional(kManagerKeyPrefix + key_0_2, manager_state);
  if (io_->loads_fresh_tensors()) {
    detail::load_read_state(with_manager, std::move(data), path);
  } else {
    with_manager.load_state_dict(data, path);
  }
  protect(path);
  trigger_.restart_clock();  // the time the run was down does not count
}

void CheckpointManager::remove_saved() {
  wait();
  std::vector<std::string> files = record_.recent;
  for (const auto& [path, score] : record_.top_k) files.push_back(path);
  if (!record_.last_saved_path.empty()) files.push_back(record_.last_saved_path);
  std::sort(files.begin(), files.end());
  files.erase(std::unique(files.begin(), files.end()), files.end());
  for (const auto& path : files) io_->remove(path);
  record_.top_k.clear();
  record_.recent.clear();
}

std::string CheckpointManager::state_key() const {
  const bool monitors = options_.save_best_only() || options_.save_top_k() > 0;
  return monitors ? fmt::format("{}|monitor={}", options_.filepath(), options_.monitor()) : options_.filepath();
}

c10::IValue CheckpointManager::state_dict() const {
  c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
  auto best = monitor_->best();
  out.insert("best", best ? c10::IValue(*best) : c10::IValue());
  out.insert("last_saved_path", record_.last_saved_path);
  c10::impl::GenericList top_paths(c10::StringType::get());
  c10::impl::GenericList top_scores(c10::FloatType::get());
  for (const auto& [path, score] : record_.top_k) {
    top_paths.push_back(path);
    top_scores.push_back(score);
  }
  out.insert("top_k_paths", top_paths);
  out.insert("top_k_scores", top_scores);
  c10::impl::GenericList recent(c10::StringType::get());
  for (const auto& path : record_.recent) recent.push_back(path);
  out.insert("recent", recent);
  out.insert("calls_since_last_save", record_.calls_since_last_save);
  return out;
}

void CheckpointManager::check_state_dict(const c10::IValue& state, const std::string& where) const {
  const detail::StateFields fields(state, where, "corrupt CheckpointManager state");
  auto best = fields.dict().find("best");
  if (best == fields.dict().end() || !(best->value().isNone() || best->value().isDouble())) {
    fields.fail("field 'best' is missing or neither None nor a float");
  }
  fields.string("last_saved_path");
  const auto path_list = fields.list("top_k_paths");
  const auto score_list = fields.list("top_k_scores");
  auto paths = path_list.toListRef();
  auto scores = score_list.toListRef();
  if (paths.size() != scores.size()) fields.fail("top_k_paths and top_k_scores differ in length");
  for (size_t i = 0; i < paths.size(); ++i) {
    if (!paths[i].isString() || !scores[i].isDouble()) fields.fail(fmt::format("top-k entry {}", i));
  }
  const auto recent = fields.list("recent");  // named: the loop views its list
  for (const auto& path : recent.toListRef()) {
    if (!path.isString()) fields.fail("an entry of 'recent' is not a string");
  }
  fields.integer("calls_since_last_save");
}

void CheckpointManager::load_state_dict(const c10::IValue& state) {
  check_state_dict(state, "CheckpointManager " + options_.filepath());
  const auto& dict = state.toGenericDict();
  auto best = dict.at("best");
  monitor_->set_best(best.isNone() ? std::nullopt : std::optional<double>(best.toDouble()));
  // Retention deletes what the record names, and a file is no authority on that: only paths this
  // manager's template could have written stay (no "..", no other directory).
  auto ours = [&](const std::string& path) {
    if (!detail::climbs(path) && template_->matches(path)) return true;
    logger()->warn("CheckpointManager {}: the restored record names {}, which is not a file of this template; "
                   "it is left alone",
                   options_.filepath(), path);
    return false;
  };
  const auto& last_saved = dict.at("last_saved_path").toStringRef();
  record_.last_saved_path = last_saved.empty() || ours(last_saved) ? last_saved : std::string();
  record_.top_k.clear();
  const auto path_list = dict.at("top_k_paths");
  const auto score_list = dict.at("top_k_scores");
  auto paths = path_list.toListRef();
  auto scores = score_list.toListRef();
  for (size_t i = 0; i < paths.size(); ++i) {
    if (ours(paths[i].toStringRef())) record_.top_k.emplace_back(paths[i].toStringRef(), scores[i].toDouble());
  }
  record_.recent.clear();
  const auto recent = dict.at("recent");  // named: the loop views its list
  for (const auto& path : recent.toListRef()) {
    if (ours(path.toStringRef())) record_.recent.push_back(path.toStringRef());
  }
  record_.calls_since_last_save = dict.at("calls_since_last_save").toInt();
}

}  // namespace torchfit
