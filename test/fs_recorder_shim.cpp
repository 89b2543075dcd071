// LD_PRELOAD shim for the power-loss tests: records every file-system call that
// changes what is under TORCHFIT_FS_ROOT (creates, writes with their bytes,
// truncations, fsyncs, renames, unlinks, mkdir/rmdir) to the log TORCHFIT_FS_LOG,
// in the order the calls returned; power_loss_test.cpp replays the log into the
// states a power cut could leave. Calls that fail are not recorded: they changed
// nothing. Unset, it passes everything through.
//
// Log records, one line each ('\t' between fields; a write's bytes follow its line):
//   C ino path      a file created          W ino offset n  n bytes written
//   T ino size      truncated               S ino           fsync of a file
//   D path          fsync of a directory    R from to       rename
//   U path          unlink                  M path / X path mkdir / rmdir
//   K text          a mark from the program (torchfit_fs_mark)
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <string>

namespace {

template <typename Fn>
Fn next(const char* name) {
  return reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, name));
}

struct Tracked {
  std::string path;  // relative to the root
  ino_t ino = 0;
  bool directory = false;
};

class Recorder {
 public:
  static Recorder& get() {
    static Recorder* recorder = new Recorder();  // never destroyed: calls may come during exit
    return *recorder;
  }
  bool active() const { return log_fd_ >= 0; }
  std::mutex& mutex() { return mutex_; }

  /// `path` relative to the root, if it lies under it.
  std::optional<std::string> relative(const char* path, int dirfd = AT_FDCWD) const {
    if (!active() || path == nullptr) return std::nullopt;
    std::filesystem::path p(path);
    if (p.is_relative()) {
      if (dirfd != AT_FDCWD) {
        auto it = fds_.find(dirfd);
        if (it == fds_.end() || !it->second.directory) return std::nullopt;
        p = std::filesystem::path(root_) / it->second.path / p;
      } else {
        char cwd[4096];
        if (::getcwd(cwd, sizeof cwd) == nullptr) return std::nullopt;
        p = std::filesystem::path(cwd) / p;
      }
    }
    auto normal = p.lexically_normal().string();
    while (normal.size() > 1 && normal.back() == '/') normal.pop_back();
    if (normal == root_) return std::string(".");
    if (normal.compare(0, root_.size() + 1, root_ + "/") != 0) return std::nullopt;
    return normal.substr(root_.size() + 1);
  }

  const Tracked* tracked(int fd) const {
    auto it = fds_.find(fd);
    return it == fds_.end() ? nullptr : &it->second;
  }
  void track(int fd, const std::string& path) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) return;
    fds_[fd] = Tracked{path, st.st_ino, S_ISDIR(st.st_mode)};
  }
  void forget(int fd) { fds_.erase(fd); }

  void record(const std::string& line, const void* bytes = nullptr, size_t n = 0) {
    static auto write = next<ssize_t (*)(int, const void*, size_t)>("write");
    std::string out = line + "\n";
    if (bytes != nullptr) out.append(static_cast<const char*>(bytes), n);
    const char* p = out.data();
    size_t left = out.size();
    while (left > 0) {
      ssize_t w = write(log_fd_, p, left);
      if (w <= 0) ::abort();  // a log with a hole would replay into nonsense
      p += w;
      left -= static_cast<size_t>(w);
    }
  }

 private:
  Recorder() {
    const char* log = std::getenv("TORCHFIT_FS_LOG");
    const char* root = std::getenv("TORCHFIT_FS_ROOT");
    if (log == nullptr || root == nullptr) return;
    root_ = std::filesystem::path(root).lexically_normal().string();
    while (root_.size() > 1 && root_.back() == '/') root_.pop_back();
    static auto open = next<int (*)(const char*, int, ...)>("open");
    log_fd_ = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  }
  std::string root_;
  int log_fd_ = -1;
  std::mutex mutex_;
  std::map<int, Tracked> fds_;
};

using OpenAt = int (*)(int, const char*, int, ...);

std::string tab(std::initializer_list<std::string> fields) {
  std::string out;
  for (const auto& f : fields) out += (out.empty() ? "" : "\t") + f;
  return out;
}

int open_common(int dirfd, const char* path, int flags, mode_t mode, OpenAt real) {
  auto& r = Recorder::get();
  if (!r.active()) return real(dirfd, path, flags, mode);
  std::lock_guard<std::mutex> lock(r.mutex());
  auto rel = r.relative(path, dirfd);
  if (!rel) return real(dirfd, path, flags, mode);
  struct stat before {};
  bool existed = ::fstatat(dirfd, path, &before, AT_SYMLINK_NOFOLLOW) == 0;
  int fd = real(dirfd, path, flags, mode);
  if (fd < 0) return fd;
  r.track(fd, *rel);
  const Tracked* t = r.tracked(fd);
  if (t == nullptr) return fd;
  if (!existed && (flags & O_CREAT) != 0) r.record(tab({"C", std::to_string(t->ino), *rel}));
  if (existed && (flags & O_TRUNC) != 0 && !t->directory) r.record(tab({"T", std::to_string(t->ino), "0"}));
  return fd;
}

/// Runs `call` (which returns < 0 on failure) under the lock and records `line` if it succeeded.
template <typename Call>
int changed(const std::optional<std::string>& line, Call call) {
  auto& r = Recorder::get();
  if (!line) return call();
  int rc = call();
  if (rc == 0) r.record(*line);
  return rc;
}


OpenAt real_openat(const char* name) {
  static OpenAt plain = next<OpenAt>("openat"), large = next<OpenAt>("openat64");
  return std::strcmp(name, "openat") == 0 ? plain : large;
}

/// open's third argument, present when the flags create a file.
mode_t mode_argument(int flags, va_list args) {
  return (flags & (O_CREAT | O_TMPFILE)) != 0 ? static_cast<mode_t>(va_arg(args, int)) : 0;
}

/// fsync or fdatasync of `fd`, recorded for a file or directory under the root.
int record_sync(int fd, int (*real)(int)) {
  auto& r = Recorder::get();
  if (!r.active()) return real(fd);
  std::lock_guard<std::mutex> lock(r.mutex());
  const Tracked* t = r.tracked(fd);
  std::optional<std::string> line;
  if (t != nullptr) line = t->directory ? tab({"D", t->path}) : tab({"S", std::to_string(t->ino)});
  return changed(line, [&] { return real(fd); });
}

void record_write(int fd, const void* data, ssize_t n, off_t offset) {
  auto& r = Recorder::get();
  const Tracked* t = r.tracked(fd);
  if (t == nullptr || n <= 0) return;
  r.record(tab({"W", std::to_string(t->ino), std::to_string(offset), std::to_string(n)}), data,
           static_cast<size_t>(n));
}

}  // namespace

extern "C" {

void torchfit_fs_mark(const char* text) {
  auto& r = Recorder::get();
  if (!r.active()) return;
  std::lock_guard<std::mutex> lock(r.mutex());
  r.record(tab({"K", text}));
}

int open(const char* path, int flags, ...) {
  va_list args;
  va_start(args, flags);
  const mode_t mode = mode_argument(flags, args);
  va_end(args);
  return open_common(AT_FDCWD, path, flags, mode, real_openat("openat"));
}

int open64(const char* path, int flags, ...) {
  va_list args;
  va_start(args, flags);
  const mode_t mode = mode_argument(flags, args);
  va_end(args);
  return open_common(AT_FDCWD, path, flags, mode, real_openat("openat64"));
}

int openat(int dirfd, const char* path, int flags, ...) {
  va_list args;
  va_start(args, flags);
  const mode_t mode = mode_argument(flags, args);
  va_end(args);
  return open_common(dirfd, path, flags, mode, real_openat("openat"));
}

int openat64(int dirfd, const char* path, int flags, ...) {
  va_list args;
  va_start(args, flags);
  const mode_t mode = mode_argument(flags, args);
  va_end(args);
  return open_common(dirfd, path, flags, mode, real_openat("openat64"));
}

int close(int fd) {
  static auto real = next<int (*)(int)>("close");
  auto& r = Recorder::get();
  if (!r.active()) return real(fd);
  std::lock_guard<std::mutex> lock(r.mutex());
  r.forget(fd);
  return real(fd);
}

ssize_t write(int fd, const void* data, size_t n) {
  static auto real = next<ssize_t (*)(int, const void*, size_t)>("write");
  auto& r = Recorder::get();
  if (!r.active()) return real(fd, data, n);
  std::lock_guard<std::mutex> lock(r.mutex());
  if (r.tracked(fd) == nullptr) return real(fd, data, n);
  off_t at = ::lseek(fd, 0, SEEK_CUR);
  ssize_t done = real(fd, data, n);
  if ((::fcntl(fd, F_GETFL) & O_APPEND) != 0) at = ::lseek(fd, 0, SEEK_CUR) - done;
  record_write(fd, data, done, at);
  return done;
}

ssize_t pwrite(int fd, const void* data, size_t n, off_t offset) {
  static auto real = next<ssize_t (*)(int, const void*, size_t, off_t)>("pwrite");
  auto& r = Recorder::get();
  if (!r.active()) return real(fd, data, n, offset);
  std::lock_guard<std::mutex> lock(r.mutex());
  ssize_t done = real(fd, data, n, offset);
  record_write(fd, data, done, offset);
  return done;
}

ssize_t pwrite64(int fd, const void* data, size_t n, off64_t offset) {
  static auto real = next<ssize_t (*)(int, const void*, size_t, off64_t)>("pwrite64");
  auto& r = Recorder::get();
  if (!r.active()) return real(fd, data, n, offset);
  std::lock_guard<std::mutex> lock(r.mutex());
  ssize_t done = real(fd, data, n, offset);
  record_write(fd, data, done, static_cast<off_t>(offset));
  return done;
}

int ftruncate(int fd, off_t size) {
  static auto real = next<int (*)(int, off_t)>("ftruncate");
  auto& r = Recorder::get();
  if (!r.active()) return real(fd, size);
  std::lock_guard<std::mutex> lock(r.mutex());
  const Tracked* t = r.tracked(fd);
  std::optional<std::string> line;
  if (t != nullptr) line = tab({"T", std::to_string(t->ino), std::to_string(size)});
  return changed(line, [&] { return real(fd, size); });
}

int fsync(int fd) {
  static auto real = next<int (*)(int)>("fsync");
  return record_sync(fd, real);
}

int fdatasync(int fd) {
  static auto real = next<int (*)(int)>("fdatasync");
  return record_sync(fd, real);
}

int renameat2(int olddirfd, const char* from, int newdirfd, const char* to, unsigned int flags) {
  static auto real = next<int (*)(int, const char*, int, const char*, unsigned int)>("renameat2");
  auto& r = Recorder::get();
  if (!r.active()) return real(olddirfd, from, newdirfd, to, flags);
  std::lock_guard<std::mutex> lock(r.mutex());
  auto a = r.relative(from, olddirfd), b = r.relative(to, newdirfd);
  std::optional<std::string> line;
  if (a && b) line = tab({"R", *a, *b});
  return changed(line, [&] { return real(olddirfd, from, newdirfd, to, flags); });
}

int renameat(int olddirfd, const char* from, int newdirfd, const char* to) {
  return renameat2(olddirfd, from, newdirfd, to, 0);
}

int rename(const char* from, const char* to) { return renameat2(AT_FDCWD, from, AT_FDCWD, to, 0); }

int unlinkat(int dirfd, const char* path, int flags) {
  static auto real = next<int (*)(int, const char*, int)>("unlinkat");
  auto& r = Recorder::get();
  if (!r.active()) return real(dirfd, path, flags);
  std::lock_guard<std::mutex> lock(r.mutex());
  auto rel = r.relative(path, dirfd);
  std::optional<std::string> line;
  if (rel) line = tab({(flags & AT_REMOVEDIR) != 0 ? "X" : "U", *rel});
  return changed(line, [&] { return real(dirfd, path, flags); });
}

int unlink(const char* path) { return unlinkat(AT_FDCWD, path, 0); }
int rmdir(const char* path) { return unlinkat(AT_FDCWD, path, AT_REMOVEDIR); }

int remove(const char* path) {
  struct stat st {};
  bool directory = ::lstat(path, &st) == 0 && S_ISDIR(st.st_mode);
  return unlinkat(AT_FDCWD, path, directory ? AT_REMOVEDIR : 0);
}

int mkdirat(int dirfd, const char* path, mode_t mode) {
  static auto real = next<int (*)(int, const char*, mode_t)>("mkdirat");
  auto& r = Recorder::get();
  if (!r.active()) return real(dirfd, path, mode);
  std::lock_guard<std::mutex> lock(r.mutex());
  auto rel = r.relative(path, dirfd);
  std::optional<std::string> line;
  if (rel) line = tab({"M", *rel});
  return changed(line, [&] { return real(dirfd, path, mode); });
}

int mkdir(const char* path, mode_t mode) { return mkdirat(AT_FDCWD, path, mode); }

}  // extern "C"
