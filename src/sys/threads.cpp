#include "sys/threads.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <exception>
#include <thread>

namespace torchfit::detail {
namespace {

thread_local bool background = false;

/// Where a helper starts: every CPU the process may use (`everywhere`) but this thread's
/// (`away`). False when it may start anywhere: a background caller, a single CPU.
bool start_away(cpu_set_t& everywhere, cpu_set_t& away) {
  if (background || sched_getaffinity(0, sizeof everywhere, &everywhere) != 0 || CPU_COUNT(&everywhere) < 2) return false;
  const int here = sched_getcpu();
  if (here < 0 || here >= CPU_SETSIZE || !CPU_ISSET(here, &everywhere)) return false;
  away = everywhere;
  CPU_CLR(here, &away);
  return true;
}

}  // namespace

void mark_background_thread() { background = true; }

void run_pair(const std::function<void()>& first, const std::function<void()>& second) {
  // Linux often starts a new thread on its parent's CPU, where it waits until the parent blocks
  // or is preempted. A load's caller does neither: measured in save_bench, the helper of an 8 MiB
  // load began after the caller had read and checksummed the whole file alone. So the helper
  // starts elsewhere, then may go anywhere again: kept off the caller's CPU for a whole 512 MiB
  // load, it shared the other CPU with the caller whenever the scheduler moved the caller there.
  cpu_set_t everywhere, away;
  const bool steer = start_away(everywhere, away);
  std::atomic<bool> placed{!steer};
  std::exception_ptr error;
  std::thread helper([&] {
    while (!placed.load()) std::this_thread::yield();  // the caller is setting where it runs
    if (steer) pthread_setaffinity_np(pthread_self(), sizeof everywhere, &everywhere);
    try {
      second();
    } catch (...) {
      error = std::current_exception();
    }
  });
  if (steer) {
    pthread_setaffinity_np(helper.native_handle(), sizeof away, &away);
    placed = true;
  }
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
