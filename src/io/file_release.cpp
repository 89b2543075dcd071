#include "io/file_release.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <filesystem>
#include <mutex>
#include <thread>

namespace torchfit::detail {
namespace {

constexpr off_t kWorthReleasing = 1 << 20;  // smaller files free in microseconds
constexpr size_t kMaxQueued = 64;           // beyond this the caller closes: bounded descriptors

/// Local file systems, where an unlinked file that is still open has no name. NFS
/// and FUSE rename it to a hidden `.nfs…` or `.fuse_hidden…` file in the same
/// directory until the last close, which would show up among the checkpoints.
bool frees_namelessly(int fd) {
  constexpr unsigned long kExt4 = 0xEF53, kXfs = 0x58465342, kBtrfs = 0x9123683E, kTmpfs = 0x01021994,
                          kF2fs = 0xF2F52010, kOverlay = 0x794C7630;
  struct statfs fs {};
  if (::fstatfs(fd, &fs) != 0) return false;
  auto type = static_cast<unsigned long>(fs.f_type);
  return type == kExt4 || type == kXfs || type == kBtrfs || type == kTmpfs || type == kF2fs || type == kOverlay;
}

class Releaser {
 public:
  /// False when the caller should close `fd` itself.
  bool push(int fd) {
    if (::getpid() != owner_) return false;  // a forked child has no thread, maybe a copied lock
    std::lock_guard<std::mutex> lock(mutex_);
    if (queue_.size() + busy_ >= kMaxQueued) return false;
    if (!thread_started_) {
      std::thread([this] { run(); }).detach();  // lives as long as the process
      thread_started_ = true;
    }
    queue_.push_back(fd);
    changed_.notify_all();
    return true;
  }

  /// Closes what is queued on the calling thread and waits for the close in
  /// progress; returns whether there was any.
  bool drain() {
    if (::getpid() != owner_) return false;
    std::unique_lock<std::mutex> lock(mutex_);
    bool pending = !queue_.empty() || busy_ > 0;
    while (!queue_.empty()) close_front(lock);
    changed_.wait(lock, [&] { return busy_ == 0; });
    return pending;
  }

  uint64_t released() {
    if (::getpid() != owner_) return released_;  // the child's copy: no thread changes it there
    std::lock_guard<std::mutex> lock(mutex_);
    return released_;
  }

  void pause(bool on) {
    if (::getpid() != owner_) return;  // a child has no thread to pause
    std::lock_guard<std::mutex> lock(mutex_);
    paused_ += on ? 1 : -1;
    changed_.notify_all();
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      changed_.wait(lock, [&] { return !queue_.empty() && paused_ == 0; });
      close_front(lock);
    }
  }

  void close_front(std::unique_lock<std::mutex>& lock) {
    int fd = queue_.front();
    queue_.pop_front();
    ++busy_;
    lock.unlock();
    ::close(fd);  // an error here cannot lose data: the file was already unlinked
    lock.lock();
    --busy_;
    ++released_;
    changed_.notify_all();
  }

  const pid_t owner_ = ::getpid();
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<int> queue_;
  size_t busy_ = 0;
  uint64_t released_ = 0;
  int paused_ = 0;
  bool thread_started_ = false;
};

/// Never destroyed: saves may still run during static destruction, and the
/// detached thread must not outlive its queue.
Releaser& releaser() {
  static auto* instance = new Releaser;
  return *instance;
}

}  // namespace

DeferredRelease::DeferredRelease(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) return;
  struct stat st {};
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_nlink == 1 && st.st_size >= kWorthReleasing &&
      frees_namelessly(fd)) {
    fd_ = fd;
  } else {
    ::close(fd);
  }
}

DeferredRelease::~DeferredRelease() {
  if (fd_ < 0) return;
  bool queued = false;
  try {
    queued = releaser().push(fd_);
  } catch (...) {  // no thread or memory for it: close here, as before
  }
  if (!queued) ::close(fd_);
}

bool remove_file(const std::string& path, std::error_code& ec) {
  DeferredRelease held(path);
  return std::filesystem::remove(path, ec);
}

bool wait_for_released_files() { return releaser().drain(); }

uint64_t files_released_in_background() { return releaser().released(); }

ReleasesPaused::ReleasesPaused() { releaser().pause(true); }
ReleasesPaused::~ReleasesPaused() { releaser().pause(false); }

}  // namespace torchfit::detail
