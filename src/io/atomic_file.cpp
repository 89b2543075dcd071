#include "io/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sys/file.h>

#include <atomic>
#include <mutex>
#include <set>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include <fmt/format.h>

#include "format/zip.h"
#include "io/file_release.h"
#include "torchfit/io/checkpoint_io.h"
#include "torchfit/error.h"

namespace torchfit::detail {
namespace fs = std::filesystem;

namespace {

constexpr size_t kNameMax = 255;

std::string unique_temp_path(const std::string& target) {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t salt = std::random_device{}();
  fs::path p(target);
  auto suffix = fmt::format("{}{}.{:x}", kTempMarker, ::getpid(), salt + counter.fetch_add(1));
  // Any legal target name gives a legal temporary name: long ones are shortened,
  // never inside a UTF-8 character.
  std::string name = p.filename().string();
  size_t room = kNameMax - 1 - suffix.size();
  if (name.size() > room) {
    size_t cut = room;
    while (cut > 0 && (static_cast<unsigned char>(name[cut]) & 0xC0) == 0x80) --cut;
    name.resize(cut);
  }
  return (p.parent_path() / ("." + name + suffix)).string();
}

bool same_file(int fd, const std::string& path) {
  struct stat opened {}, named {};
  return ::fstat(fd, &opened) == 0 && ::lstat(path.c_str(), &named) == 0 && opened.st_dev == named.st_dev &&
         opened.st_ino == named.st_ino;
}


/// Whether `name` is one of our temporary files (`.<target>.torchfit-tmp.<pid>.<hex>`).
bool is_temp_name(const std::string& name) {
  auto marker = name.rfind(kTempMarker);
  if (name.empty() || name[0] != '.' || marker == std::string::npos) return false;
  auto rest = name.substr(marker + std::strlen(kTempMarker));
  auto dot = rest.find('.');
  if (dot == std::string::npos || dot == 0 || dot + 1 == rest.size()) return false;
  auto digits = rest.substr(0, dot), hex = rest.substr(dot + 1);
  return digits.find_first_not_of("0123456789") == std::string::npos &&
         hex.find_first_not_of("0123456789abcdef") == std::string::npos;
}

/// Removes `path` if no writer holds its lock. A writer keeps an exclusive flock
/// on its temporary until the rename, in whatever process, PID namespace or host
/// (NFS passes flock on as a byte-range lock) it runs.
bool remove_if_abandoned(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return false;
  bool removed = false;
  if (::flock(fd, LOCK_EX | LOCK_NB) == 0 && same_file(fd, path)) removed = ::unlink(path.c_str()) == 0;
  ::close(fd);
  return removed;
}

/// Once per directory and process, before our first write there: removes the
/// temporary files of writers that are gone.
void clean_directory_once(const fs::path& dir) {
  static std::mutex mutex;
  static std::set<std::string> cleaned;
  std::lock_guard<std::mutex> lock(mutex);
  if (!cleaned.insert(dir.string()).second) return;
  remove_stale_temporaries(dir.string());
}

}  // namespace

void fsync_directory(const std::string& target) {
  auto dir = fs::path(target).parent_path();
  if (dir.empty()) dir = ".";
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw CheckpointError(errno_message("Failed opening directory", dir.string(), errno));
  int rc = ::fsync(fd);
  int error = errno;
  ::close(fd);
  if (rc != 0) throw CheckpointError(errno_message("Failed syncing directory", dir.string(), error));
}

std::vector<std::string> remove_stale_temporaries(const std::string& directory) {
  std::vector<std::string> removed;
  std::error_code ec;
  fs::directory_iterator it(directory.empty() ? "." : directory, ec);
  if (ec) return removed;
  for (const auto& entry : it) {
    if (!is_temp_name(entry.path().filename().string()) || !entry.is_regular_file(ec)) continue;
    if (remove_if_abandoned(entry.path().string())) removed.push_back(entry.path().string());
  }
  return removed;
}


void check_not_directory(const std::string& path, const std::string& owner) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    throw CheckpointError(fmt::format(
        "Please specify a non-directory filepath for {}. Filepath used is an existing directory: {}", owner, path));
  }
}

void check_readable_file(const std::string& path) {
  std::error_code ec;
  auto status = fs::status(path, ec);
  if (!fs::exists(status)) throw CheckpointError(fmt::format("Checkpoint file {} does not exist", path));
  if (fs::is_directory(status)) {
    throw CheckpointError(fmt::format("Checkpoint path {} is a directory, not a file", path));
  }
}

void create_parent_directories(const std::string& path) {
  auto dir = fs::path(path).parent_path();
  if (dir.empty()) return;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    throw CheckpointError(
        fmt::format("Failed creating directory {}: {}", dir.string(), ec.message()));
  }
}

void check_writable_directory(const std::string& directory, const std::string& owner) {
  // Probe the directory, or the nearest ancestor that exists (where the first
  // save will create it); nothing is created here.
  fs::path probe_in = directory.empty() ? fs::path(".") : fs::path(directory);
  std::error_code ec;
  while (!fs::exists(probe_in, ec) && probe_in != ".") {
    // "ckpt" has no parent: it is made in the working directory.
    probe_in = probe_in.has_parent_path() && probe_in.parent_path() != probe_in ? probe_in.parent_path() : ".";
  }
  if (!fs::is_directory(probe_in, ec)) {
    throw CheckpointError(fmt::format("{}: cannot create the directory {}: {} is not a directory", owner,
                                      directory, probe_in.string()));
  }
  // A probe named as our temporaries, so a crash right here leaves nothing that
  // the stale-temporary sweep would not remove.
  auto probe = unique_temp_path((probe_in / "write-check").string());
  int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    throw CheckpointError(fmt::format("{}: cannot write in {}{}: {}", owner, probe_in.string(),
                                      probe_in == fs::path(directory) ? "" : " (to create " + directory + ")",
                                      std::strerror(errno)));
  }
  ::close(fd);
  ::unlink(probe.c_str());
}

void write_latest_pointer(const std::string& checkpoint, bool fsync) {
  fs::path path(checkpoint);
  AtomicFile pointer((path.parent_path() / kLatestPointer).string(), fsync);
  auto line = path.filename().string() + "\n";
  pointer.write(line.data(), line.size());
  pointer.commit();
}

AtomicFile::AtomicFile(std::string target, bool fsync) : target_(std::move(target)), fsync_(fsync) {
  clean_directory_once(fs::path(target_).parent_path());
  for (int attempt = 0;; ++attempt) {
    temp_path_ = unique_temp_path(target_);
    fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd_ < 0) {
      throw CheckpointError(errno_message("Failed opening file", temp_path_, errno) +
                            fmt::format(" (while writing {})", target_));
    }
    // Locked for its whole life; a cleaner may have taken it between open and
    // lock (it then unlinks it): start over under a new name.
    if (::flock(fd_, LOCK_EX) != 0) {
      int error = errno;
      ::close(fd_);
      ::unlink(temp_path_.c_str());
      throw CheckpointError(errno_message("Failed locking file", temp_path_, error));
    }
    if (same_file(fd_, temp_path_)) {
#ifdef O_DIRECT
      if (fsync_) direct_fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);  // -1: not supported
#endif
      return;
    }
    int error = errno;
    ::close(fd_);
    fd_ = -1;
    // Each new name is a new race, which a cleaner sweeping in a loop can win again and again on a
    // loaded machine (4 attempts lost once in a test's sweeping thread).
    if (attempt == 63) throw CheckpointError(errno_message("Failed locking file", temp_path_, error));
  }
}

AtomicFile::~AtomicFile() {
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(temp_path_.c_str());
}

namespace {
constexpr size_t kBufferSize = 1 << 20;
constexpr size_t kWritebackChunk = 8 << 20;
constexpr size_t kWritebackStart = 2 << 20;

/// Whether a write that failed with `error` is worth trying again: interrupted,
/// or the disk was full while replaced files were still being freed.
bool worth_retrying(int error) { return error == EINTR || (error == ENOSPC && wait_for_released_files()); }
}

void AtomicFile::write(const void* data, size_t size) {
  auto* bytes = static_cast<const char*>(data);
  if (buffer_.size() + size <= kBufferSize) {
    if (buffer_.capacity() < kBufferSize) buffer_.reserve(kBufferSize);
    buffer_.append(bytes, size);
    return;
  }
  flush();
  if (size < kBufferSize) {
    buffer_.append(bytes, size);
    return;
  }
  if (direct_fd_ >= 0 && written_ % kPageSize == 0 && reinterpret_cast<uintptr_t>(bytes) % kPageSize == 0) {
    size_t direct = write_direct(bytes, size / kPageSize * kPageSize);
    bytes += direct;
    size -= direct;
  }
  write_fd(bytes, size);
}

size_t AtomicFile::write_direct(const char* bytes, size_t size) {
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pwrite(direct_fd_, bytes + done, size - done, static_cast<off_t>(written_));
    if (n < 0 && errno == EINVAL) {
      // This file system or device wants other alignments: buffered writes from here on.
      ::close(direct_fd_);
      direct_fd_ = -1;
      break;
    }
    if (n < 0) {
      int error = errno;
      if (worth_retrying(error)) continue;
      throw CheckpointError(errno_message("Failed writing file", target_, error));
    }
    done += static_cast<size_t>(n);
    written_ += static_cast<uint64_t>(n);
    if (n % kPageSize != 0) break;  // a short write left the rest unaligned
  }
  return done;
}

void AtomicFile::flush() {
  write_fd(buffer_.data(), buffer_.size());
  buffer_.clear();
}

void AtomicFile::write_fd(const char* bytes, size_t size) {
  while (size > 0) {
    // A durable file streams in pieces of one writeback chunk: at most four of
    // them are in the page cache at a time, however large the tensor.
    ssize_t n = ::pwrite(fd_, bytes, fsync_ ? std::min<size_t>(size, kWritebackChunk) : size,
                         static_cast<off_t>(written_));
    if (n < 0) {
      int error = errno;
      if (worth_retrying(error)) continue;
      throw CheckpointError(errno_message("Failed writing file", target_, error));
    }
    bytes += n;
    size -= static_cast<size_t>(n);
    written_ += static_cast<uint64_t>(n);
    if (fsync_) stream_to_disk();
  }
}

void AtomicFile::stream_to_disk() {
#ifdef SYNC_FILE_RANGE_WRITE
  // Start the disk on every 2 MiB written (every 8 MiB made 8 MiB saves 15-20 %
  // slower), so the final fsync waits only for the tail; keep the last three
  // chunks in flight (one kept the disk idle between them, 10-20 % slower) and
  // wait for the ones before, then drop those from the page cache. A durable
  // file needs no cached copy, and the next chunks reuse the pages just dropped
  // instead of taking fresh memory (which on a VM can cost more than the disk)
  // and evicting what training reads.
  constexpr uint64_t kInFlight = 3 * kWritebackChunk;
  if (!streaming_ || written_ - started_ < kWritebackStart) return;
  auto ok = [&](int rc) {
    if (rc == 0) return true;
    if (errno == EINVAL || errno == ESPIPE || errno == ENOSYS || errno == EOPNOTSUPP) {
      streaming_ = false;  // not on this file system: the final fsync does it all
      return false;
    }
    // A writeback error waited for here is not reported again by fsync.
    throw CheckpointError(errno_message("Failed writing file", target_, errno));
  };
  if (!ok(::sync_file_range(fd_, static_cast<off64_t>(started_), static_cast<off64_t>(written_ - started_),
                            SYNC_FILE_RANGE_WRITE))) {
    return;
  }
  started_ = written_;
  if (started_ - dropped_ > kInFlight) {
    uint64_t done = started_ - kInFlight;
    if (!ok(::sync_file_range(fd_, static_cast<off64_t>(dropped_), static_cast<off64_t>(done - dropped_),
                              SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER))) {
      return;
    }
    ::posix_fadvise(fd_, static_cast<off_t>(dropped_), static_cast<off_t>(done - dropped_), POSIX_FADV_DONTNEED);
    dropped_ = done;
  }
#endif
}

void AtomicFile::commit() {
  flush();
  if (fsync_ && ::fsync(fd_) != 0) {
    throw CheckpointError(errno_message("Failed syncing file", target_, errno));
  }
  if (fsync_) ::posix_fadvise(fd_, static_cast<off_t>(dropped_), 0, POSIX_FADV_DONTNEED);  // the tail, now clean
  // Renamed while still open and locked: cleanup never takes a temporary being committed.
  DeferredRelease replaced(target_);  // its blocks are freed after the directory fsync, elsewhere
  if (::rename(temp_path_.c_str(), target_.c_str()) != 0) {
    throw CheckpointError(errno_message("Failed renaming a temporary file onto", target_, errno));
  }
  committed_ = true;
  int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) throw CheckpointError(errno_message("Failed closing file", target_, errno));
  if (fsync_) fsync_directory(target_);
}

}  // namespace torchfit::detail
