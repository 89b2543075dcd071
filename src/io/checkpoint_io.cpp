#include "torchfit/io/checkpoint_io.h"

#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <stdexcept>

#include <ATen/core/ivalue.h>
#include <c10/util/ScopeExit.h>
#include <fmt/format.h>

#include "format/checkpoint_file.h"
#include "format/pickle_file.h"
#include "format/zip.h"
#include "io/async_writer.h"
#include "io/atomic_file.h"
#include "io/file_release.h"
#include "io/save_cost.h"
#include "io/snapshot.h"
#include "sys/paths.h"
#include "torchfit/error.h"
#include "torchfit/serialize.h"

namespace torchfit {
namespace fs = std::filesystem;

CheckpointIO::~CheckpointIO() = default;

bool CheckpointIO::exists(const std::string& path) {
  const auto files = list(detail::parent_directory(path));
  return std::find(files.begin(), files.end(), path) != files.end();
}

std::string CheckpointIO::verify(const std::string& path) {
  try {
    load(path);
    return "";
  } catch (const CheckpointError& e) {
    return e.what();
  }
}

void CheckpointIO::rename(const std::string& from, const std::string& to) {
  save(load(from), to);
  remove(from);
}

// ---- files

void FileCheckpointIO::save(const c10::IValue& checkpoint, const std::string& path, const OnCommit& on_commit) {
  save_with_hints(checkpoint, path, SaveHints(), on_commit);
}

void FileCheckpointIO::save_with_hints(const c10::IValue& checkpoint, const std::string& path,
                                       const SaveHints& hints, const OnCommit& on_commit) {
  detail::check_not_directory(path, "the checkpoint");
  detail::create_parent_directories(path);
  {
    detail::AtomicFile file(path, fsync_);
    detail::ChecksumSink sink(file);
    try {
      detail::write_pickle(sink, checkpoint, hints.known_crcs);
    } catch (const c10::Error& e) {
      sink.raise_if_failed();  // an I/O error explains a failing writer best
      throw CheckpointError(fmt::format("Failed writing checkpoint {}: {}", path, e.what_without_backtrace()));
    } catch (const std::invalid_argument& e) {
      throw CheckpointError(fmt::format("Failed writing checkpoint {}: it would not load back: {}", path, e.what()));
    }
    file.commit();
  }
  if (on_commit) on_commit();
}

c10::IValue FileCheckpointIO::load(const std::string& path) {
  return detail::guard_read(path, [&] { return detail::CheckpointFile(path).read_torchfit(); });
}

void FileCheckpointIO::remove(const std::string& path) {
  // Retention deletes checkpoint files only: a name that is now a link or a directory is left alone.
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    throw CheckpointError(fmt::format("Not removing {}: it is {}, not a checkpoint file", path,
                                      S_ISLNK(st.st_mode) ? "a symbolic link" : "not a regular file"));
  }
  std::error_code ec;
  detail::remove_file(path, ec);
  if (ec) throw CheckpointError(fmt::format("Failed removing checkpoint {}: {}", path, ec.message()));
}

std::vector<std::string> FileCheckpointIO::list(const std::string& directory) {
  std::vector<std::pair<fs::file_time_type, std::string>> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(directory.empty() ? "." : directory, ec)) {
    auto name = entry.path().filename().string();
    if (name == kLatestPointer || name.find(detail::kTempMarker) != std::string::npos) continue;
    std::error_code entry_ec;
    if (!entry.is_regular_file(entry_ec)) continue;
    auto time = entry.last_write_time(entry_ec);
    if (entry_ec) continue;  // removed meanwhile
    auto path = directory.empty() ? name : entry.path().string();
    found.emplace_back(time, path);
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a > b; });
  std::vector<std::string> out;
  for (auto& [time, path] : found) out.push_back(std::move(path));
  return out;
}

void FileCheckpointIO::mark_latest(const std::string& path) { detail::write_latest_pointer(path, fsync_); }

bool FileCheckpointIO::exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string FileCheckpointIO::verify(const std::string& path) {
  auto result = verify_checkpoint(path);
  return result.ok ? "" : result.reason;
}

void FileCheckpointIO::rename(const std::string& from, const std::string& to) {
  std::error_code ec;
  fs::rename(from, to, ec);
  if (ec) throw CheckpointError(fmt::format("Failed renaming {} to {}: {}", from, to, ec.message()));
  if (fsync_) detail::fsync_directory(to);
}

void FileCheckpointIO::prepare(const std::string& directory, const std::string& owner) {
  detail::check_writable_directory(directory, owner);
}

void FileCheckpointIO::remove_directory(const std::string& directory) {
  ::rmdir(directory.c_str());  // fails, as it should, unless empty
}

std::optional<std::string> FileCheckpointIO::latest(const std::string& directory) {
  std::ifstream pointer(fs::path(directory) / kLatestPointer);
  std::string name;
  if (!pointer || !std::getline(pointer, name) || name.empty()) return std::nullopt;
  auto path = directory.empty() ? name : (fs::path(directory) / name).string();
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return std::nullopt;
  return path;
}

// ---- background saves

namespace {

double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double thread_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

int64_t thread_minor_faults() {
  rusage usage{};
  ::getrusage(RUSAGE_THREAD, &usage);
  return usage.ru_minflt;
}

}  // namespace

/// The profile, and the cost rule with the caller's step clock. The rule and the step clock are
/// the caller's alone; the profile is written by both threads, under the mutex.
struct AsyncCheckpointIO::Timing {
  explicit Timing(AsyncPolicy policy) : rule(policy) {}

  /// Runs `work` on the writer thread, adding its wall and CPU time to `field`.
  template <typename Work>
  void writer_timed(double AsyncSaveProfile::*field, Work&& work) {
    const double start = seconds_now(), cpu = thread_cpu_seconds();
    auto account = c10::make_scope_exit([&] {  // a failed store took its time too
      std::lock_guard<std::mutex> lock(mutex);
      profile.*field += seconds_now() - start;
      profile.writer_cpu += thread_cpu_seconds() - cpu;
    });
    work();
  }
  void add(double AsyncSaveProfile::*field, double seconds) {
    std::lock_guard<std::mutex> lock(mutex);
    profile.*field += seconds;
  }
  void add_faults(int64_t since) {
    std::lock_guard<std::mutex> lock(mutex);
    profile.caller_page_faults += thread_minor_faults() - since;
  }

  std::mutex mutex;
  AsyncSaveProfile profile;
  detail::SaveCostRule rule;
  std::optional<double> last_step;  // when the last before_update began
  double saving_since_step = 0;     // the caller's time in save since then
  bool in_flight_since_step = false;
};

AsyncCheckpointIO::AsyncCheckpointIO(std::shared_ptr<CheckpointIO> storage, AsyncPolicy policy)
    : storage_(std::move(storage)),
      snapshot_(std::make_unique<detail::Snapshot>()),
      timing_(std::make_unique<Timing>(policy)),
      writer_(std::make_unique<detail::AsyncWriter>()) {
  if (!storage_) throw ValueError("AsyncCheckpointIO: storage must not be null");
}

AsyncCheckpointIO::~AsyncCheckpointIO() {
  writer_.reset();  // waits for the save in flight, which reads the snapshot
}

void AsyncCheckpointIO::save(const c10::IValue& checkpoint, const std::string& path, const OnCommit& on_commit) {
  save_with_hints(checkpoint, path, SaveHints(), on_commit);
}

void AsyncCheckpointIO::save_with_hints(const c10::IValue& checkpoint, const std::string& path,
                                        const SaveHints& hints, const OnCommit& on_commit) {
  Timing& timing = *timing_;
  const double start = seconds_now();
  const int64_t faults = thread_minor_faults();
  // Whatever happens, the time spent here is not a training step's.
  auto in_save = c10::make_scope_exit([&] { timing.saving_since_step += seconds_now() - start; });
  wait_for_writer(&AsyncSaveProfile::save_wait);  // one save in flight; its buffers are about to be reused
  if (timing.rule.place_inline(hints.caller_waits)) {
    const double store_start = seconds_now();
    auto account = c10::make_scope_exit([&] {  // a failed save took its time too
      const double took = seconds_now() - store_start;
      timing.rule.inline_saved(took);
      timing.add(&AsyncSaveProfile::inline_save, took);
      std::lock_guard<std::mutex> lock(timing.mutex);
      ++timing.profile.inline_saves;
    });
    storage_->save(checkpoint, path, on_commit);
    return;
  }
  const double capture_start = seconds_now();
  c10::IValue copy;
  try {
    copy = snapshot_->capture(checkpoint, hints);
  } catch (...) {
    snapshot_->invalidate();
    throw;
  }
  std::function<void()> deferred;
  if (snapshot_->stats().deferred > 0) {
    deferred = [snapshot = snapshot_.get(), &timing] {
      timing.writer_timed(&AsyncSaveProfile::writer_copy, [&] { snapshot->copy_deferred(); });
    };
  }
  // The job reads the snapshot's CRCs: the next capture waits for it first.
  writer_->submit(
      [storage = storage_, copy = std::move(copy), path, on_commit, crcs = &snapshot_->crcs(), &timing] {
        SaveHints known;
        known.known_crcs = crcs;
        timing.writer_timed(&AsyncSaveProfile::writer_store,
                            [&] { storage->save_with_hints(copy, path, known, on_commit); });
      },
      std::move(deferred));
  const double captured = seconds_now() - capture_start;
  timing.rule.background_started(captured);
  timing.in_flight_since_step = true;
  timing.add(&AsyncSaveProfile::capture, captured);
  timing.add_faults(faults);
  std::lock_guard<std::mutex> lock(timing.mutex);
  ++timing.profile.background_saves;
}

void AsyncCheckpointIO::before_update() {
  Timing& timing = *timing_;
  const double start = seconds_now();
  const int64_t faults = thread_minor_faults();
  if (timing.last_step) {
    timing.rule.step(start - *timing.last_step - timing.saving_since_step, timing.in_flight_since_step);
  }
  timing.last_step = start;
  timing.saving_since_step = 0;
  // Rather than wait for the writer's deferred copies, this thread makes some.
  snapshot_->help_copy_deferred();
  writer_->wait_first();
  timing.in_flight_since_step = writer_->busy();
  timing.add(&AsyncSaveProfile::before_update, seconds_now() - start);
  timing.add_faults(faults);
}

SnapshotStats AsyncCheckpointIO::last_snapshot() const { return snapshot_->stats(); }

AsyncSaveProfile AsyncCheckpointIO::profile() const {
  std::lock_guard<std::mutex> lock(timing_->mutex);
  AsyncSaveProfile out = timing_->profile;
  out.step_excess = timing_->rule.step_excess();
  out.background_cost = timing_->rule.background_cost();
  out.inline_cost = timing_->rule.inline_cost();
  return out;
}

void AsyncCheckpointIO::wait() { wait_for_writer(&AsyncSaveProfile::wait); }

void AsyncCheckpointIO::wait_for_writer(double AsyncSaveProfile::*field) {
  const double start = seconds_now();
  auto account = c10::make_scope_exit([&] {  // a wait that raises the writer's error waited too
    const double waited = seconds_now() - start;
    timing_->rule.caller_waited(waited);
    timing_->add(field, waited);
    // Not a training step's time either (save counts its own wait with the rest of it).
    if (field != &AsyncSaveProfile::save_wait) timing_->saving_since_step += waited;
  });
  writer_->wait();
}

c10::IValue AsyncCheckpointIO::load(const std::string& path) {
  wait();
  return storage_->load(path);
}

// These run on the writer thread too (retention after a commit): they must not wait.
void AsyncCheckpointIO::remove(const std::string& path) { storage_->remove(path); }
std::vector<std::string> AsyncCheckpointIO::list(const std::string& directory) { return storage_->list(directory); }
void AsyncCheckpointIO::mark_latest(const std::string& path) { storage_->mark_latest(path); }
std::optional<std::string> AsyncCheckpointIO::latest(const std::string& directory) {
  return storage_->latest(directory);
}
bool AsyncCheckpointIO::exists(const std::string& path) {
  wait();
  return storage_->exists(path);
}
std::string AsyncCheckpointIO::verify(const std::string& path) {
  wait();
  return storage_->verify(path);
}
void AsyncCheckpointIO::rename(const std::string& from, const std::string& to) {
  wait();
  storage_->rename(from, to);
}
void AsyncCheckpointIO::prepare(const std::string& directory, const std::string& owner) {
  storage_->prepare(directory, owner);
}
void AsyncCheckpointIO::remove_directory(const std::string& directory) {
  wait();
  storage_->remove_directory(directory);
}

// ---- read-only (data-parallel ranks other than 0)

ReadOnlyCheckpointIO::ReadOnlyCheckpointIO(std::shared_ptr<CheckpointIO> storage) : storage_(std::move(storage)) {
  if (!storage_) throw ValueError("ReadOnlyCheckpointIO: storage must not be null");
}

void ReadOnlyCheckpointIO::save(const c10::IValue&, const std::string&, const OnCommit& on_commit) {
  if (on_commit) on_commit();
}
c10::IValue ReadOnlyCheckpointIO::load(const std::string& path) { return storage_->load(path); }
void ReadOnlyCheckpointIO::remove(const std::string&) {}
std::vector<std::string> ReadOnlyCheckpointIO::list(const std::string& directory) { return storage_->list(directory); }
std::optional<std::string> ReadOnlyCheckpointIO::latest(const std::string& directory) {
  return storage_->latest(directory);
}
bool ReadOnlyCheckpointIO::exists(const std::string& path) { return storage_->exists(path); }
std::string ReadOnlyCheckpointIO::verify(const std::string& path) { return storage_->verify(path); }
void ReadOnlyCheckpointIO::rename(const std::string&, const std::string&) {}

std::optional<std::string> latest_checkpoint(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return std::nullopt;
  // The pointer may move on (and retention delete what it named) while we look.
  for (int attempt = 0; attempt < 3; ++attempt) {
    std::ifstream pointer(fs::path(dir) / kLatestPointer);
    std::string name;
    if (!pointer || !std::getline(pointer, name) || name.empty()) break;
    auto path = (fs::path(dir) / name).string();
    if (verify_checkpoint(path).ok) return path;
    if (fs::exists(path, ec)) break;  // there but damaged: fall back to the newest intact file
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
    if (ec) continue;  // removed meanwhile
    bool newer = !newest || time > newest_time || (time == newest_time && entry.path().string() > *newest);
    if (newer && verify_checkpoint(entry.path().string()).ok) {
      newest = entry.path().string();
      newest_time = time;
    }
  }
  return newest;
}

}  // namespace torchfit
