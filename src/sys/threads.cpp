#include "sys/threads.h"

#include <pthread.h>
#include <sched.h>

#include <exception>
#include <thread>

namespace torchfit::detail {
namespace {

thread_local bool background = false;

/// Every CPU the process may use but this thread's; false when the helper may go anywhere (a
/// background caller, a single CPU).
bool helper_mask(cpu_set_t& mask) {
  if (background || sched_getaffinity(0, sizeof mask, &mask) != 0 || CPU_COUNT(&mask) < 2) return false;
  const int here = sched_getcpu();
  if (here < 0 || here >= CPU_SETSIZE || !CPU_ISSET(here, &mask)) return false;
  CPU_CLR(here, &mask);
  return true;
}

}  // namespace

void mark_background_thread() { background = true; }

void run_pair(const std::function<void()>& first, const std::function<void()>& second) {
  std::exception_ptr error;
  std::thread helper([&] {
    try {
      second();
    } catch (...) {
      error = std::current_exception();
    }
  });
  // Linux often starts a new thread on its parent's CPU, where it waits until the parent blocks
  // or is preempted. A load's caller does neither: measured in save_bench, the helper of an 8 MiB
  // load began after the caller had read and checksummed the whole file alone. The helper lives
  // for one job, so the mask is not undone.
  cpu_set_t mask;
  if (helper_mask(mask)) pthread_setaffinity_np(helper.native_handle(), sizeof mask, &mask);
  try {
    first();
  } catch (...) {
    helper.join();
    throw;
  }
  helper.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace torchfit::detail
