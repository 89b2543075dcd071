// LD_PRELOAD shim for fault tests: once armed with torchfit_fail_read_after(n),
// the n-th pread from then on fails with EIO. Unarmed (0), reads pass through.
#include <dlfcn.h>
#include <errno.h>
#include <sys/types.h>

#include <atomic>

namespace {

std::atomic<long> countdown{0};

bool fail_this_read() {
  long left = countdown.load();
  while (left > 0) {
    if (countdown.compare_exchange_weak(left, left - 1)) return left == 1;
  }
  return false;
}

template <typename Fn>
Fn next(const char* name) {
  return reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, name));
}

}  // namespace

extern "C" {

void torchfit_fail_read_after(long n) { countdown = n; }

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
