#include "torchfit/io/checkpoint_io.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include <ATen/core/ivalue.h>
#include <fmt/format.h>

#include "format/checkpoint_file.h"
#include "format/pickle_file.h"
#include "format/zip.h"
#include "io/async_writer.h"
#include "io/atomic_file.h"
#include "io/file_release.h"
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

AsyncCheckpointIO::AsyncCheckpointIO(std::shared_ptr<CheckpointIO> storage)
    : storage_(std::move(storage)),
      snapshot_(std::make_unique<detail::Snapshot>()),
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
  writer_->wait();  // one save in flight; its buffers are about to be reused
  c10::IValue copy;
  try {
    copy = snapshot_->capture(checkpoint, hints);
  } catch (...) {
    snapshot_->invalidate();
    throw;
  }
  std::function<void()> deferred;
  if (snapshot_->stats().deferred > 0) deferred = [snapshot = snapshot_.get()] { snapshot->copy_deferred(); };
  // The job reads the snapshot's CRCs: the next capture waits for it first.
  writer_->submit(
      [storage = storage_, copy = std::move(copy), path, on_commit, crcs = &snapshot_->crcs()] {
        SaveHints known;
        known.known_crcs = crcs;
        storage->save_with_hints(copy, path, known, on_commit);
      },
      std::move(deferred));
}

void AsyncCheckpointIO::before_update() {
  // Rather than wait for the writer's deferred copies, this thread makes some.
  snapshot_->help_copy_deferred();
  writer_->wait_first();
}

SnapshotStats AsyncCheckpointIO::last_snapshot() const { return snapshot_->stats(); }

c10::IValue AsyncCheckpointIO::load(const std::string& path) {
  writer_->wait();
  return storage_->load(path);
}

// These run on the writer thread too (retention after a commit): they must not wait.
void AsyncCheckpointIO::remove(const std::string& path) { storage_->remove(path); }
std::vector<std::string> AsyncCheckpointIO::list(const std::string& directory) { return storage_->list(directory); }
void AsyncCheckpointIO::wait() { writer_->wait(); }
void AsyncCheckpointIO::mark_latest(const std::string& path) { storage_->mark_latest(path); }
std::optional<std::string> AsyncCheckpointIO::latest(const std::string& directory) {
  return storage_->latest(directory);
}
bool AsyncCheckpointIO::exists(const std::string& path) {
  writer_->wait();
  return storage_->exists(path);
}
std::string AsyncCheckpointIO::verify(const std::string& path) {
  writer_->wait();
  return storage_->verify(path);
}
void AsyncCheckpointIO::rename(const std::string& from, const std::string& to) {
  writer_->wait();
  storage_->rename(from, to);
}
void AsyncCheckpointIO::prepare(const std::string& directory, const std::string& owner) {
  storage_->prepare(directory, owner);
}
void AsyncCheckpointIO::remove_directory(const std::string& directory) {
  writer_->wait();
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
