// LD_PRELOAD shim for fault tests: once armed with torchfit_fail_read_after(n),
// the n-th pread from then on fails with EIO; armed with
// torchfit_fail_writeback_after(n), the n-th sync_file_range that waits for
// writeback does (as when the disk fails under a streamed write). Unarmed (0),
// calls pass through.
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/types.h>

#include <atomic>

namespace {

std::atomic<long> reads_left{0};
std::atomic<long> writeback_waits_left{0};

bool fail_this_call(std::atomic<long>& countdown) {
  long left = countdown.load();
  while (left > 0) {
    if (countdown.compare_exchange_weak(left, left - 1)) return left == 1;
  }
  return false;
}

bool fail_this_read() { return fail_this_call(reads_left); }

template <typename Fn>
Fn next(const char* name) {
  return reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, name));
}

}  // namespace

extern "C" {

void torchfit_fail_read_after(long n) { reads_left = n; }
void torchfit_fail_writeback_after(long n) { writeback_waits_left = n; }

int sync_file_range(int fd, off64_t offset, off64_t n, unsigned int flags) {
  static auto real = next<int (*)(int, off64_t, off64_t, unsigned int)>("sync_file_range");
  if ((flags & SYNC_FILE_RANGE_WAIT_AFTER) != 0 && fail_this_call(writeback_waits_left)) {
    errno = EIO;
    return -1;
  }
  return real(fd, offset, n, flags);
}

ssize_t pread(int fd, void* buffer, size_t n, off_t offset) {
  static auto real = next<ssize_t (*)(int, void*, size_t, off_t)>("pread");
  if (fail_this_read()) {
    errno = EIO;
    return -1;
  }
  return real(fd, buffer, n, offset);
}

ssize_t pread64(int fd, void* buffer, size_t n, off64_t offset) {
  static auto real = next<ssize_t (*)(int, void*, size_t, off64_t)>("pread64");
  if (fail_this_read()) {
    errno = EIO;
    return -1;
  }
  return real(fd, buffer, n, offset);
}

}  // extern "C"
