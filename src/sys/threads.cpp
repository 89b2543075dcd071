#include "sys/threads.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>

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

/// One job for a helper: what it runs, the mask it takes once running (nullptr: keep the one it
/// has), and the error it leaves for the caller.
struct Job {
  const std::function<void()>* run;
  const cpu_set_t* everywhere;
  std::exception_ptr error;

  void operator()() {
    if (everywhere != nullptr) pthread_setaffinity_np(pthread_self(), sizeof(cpu_set_t), everywhere);
    try {
      (*run)();
    } catch (...) {
      error = std::current_exception();
    }
  }
};

/// A helper thread kept between run_pair calls and woken for each: creating and joining a thread
/// cost 0.1-0.15 ms on this VM (clone3 alone about 0.1 ms), a tenth of an 8 MiB load. One serves
/// one call at a time; a call that finds it busy starts a thread of its own.
class KeptHelper {
 public:
  /// The process's helper, reserved for the caller until release(); nullptr while another call
  /// (or an outer call on this thread) holds it.
  static KeptHelper* acquire() {
    static std::mutex creating;
    static KeptHelper* kept = nullptr;
    KeptHelper* helper = nullptr;
    {
      std::lock_guard<std::mutex> lock(creating);
      // A forked child has the parent's object but not its thread: it makes its own.
      if (kept == nullptr || kept->owner_ != ::getpid()) kept = new KeptHelper();  // lives as long as its thread
      helper = kept;
    }
    return helper->in_use_.exchange(true) ? nullptr : helper;
  }
  void release() { in_use_ = false; }

  /// Wakes the helper ahead of a job, on a CPU of `start`: it then waits for one spinning, for
  /// at most kWarmSpin. Its wake-up (0.04-0.05 ms on this VM) overlaps the caller's work until
  /// the job comes.
  void warm(const cpu_set_t& start) {
    if (awake_.load()) return;
    pthread_setaffinity_np(thread_, sizeof(cpu_set_t), &start);  // asleep: nothing moves
    {
      std::lock_guard<std::mutex> lock(mutex_);
      warm_ = true;
    }
    wake_.notify_one();
  }
  /// Runs `job` on the helper, whose mask is `start` (nullptr: any CPU) when it wakes. A helper
  /// already awake (warmed) takes the job where it runs.
  void start(Job& job, const cpu_set_t* start) {
    if (start != nullptr && !awake_.load()) pthread_setaffinity_np(thread_, sizeof(cpu_set_t), start);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = false;
      job_ = &job;
    }
    wake_.notify_one();  // no system call while the helper spins: nobody waits
  }
  /// Waits until the job is done. It usually ends about when the caller's part does: a short
  /// spin saves the wake-up of a sleeping caller.
  void wait() {
    for (int spins = 0; spins < 2000 && !done_.load(std::memory_order_acquire); ++spins) std::this_thread::yield();
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, [&] { return done_.load(); });
  }

 private:
  static constexpr auto kWarmSpin = std::chrono::milliseconds(1);

  KeptHelper() : owner_(::getpid()) {
    std::thread thread([this] { loop(); });
    thread_ = thread.native_handle();
    thread.detach();
  }
  void loop() {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        awake_ = false;
        wake_.wait(lock, [&] { return job_.load() != nullptr || warm_; });
        awake_ = true;
        warm_ = false;
      }
      Job* job = job_.exchange(nullptr);
      for (auto until = std::chrono::steady_clock::now() + kWarmSpin;
           job == nullptr && std::chrono::steady_clock::now() < until; job = job_.exchange(nullptr)) {
        cpu_relax();
      }
      if (job == nullptr) continue;  // warmed for a job that did not come
      (*job)();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.store(true, std::memory_order_release);
      }
      finished_.notify_one();
    }
  }
  static void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  const pid_t owner_;
  pthread_t thread_;
  std::atomic<bool> in_use_{false};  // by the run_pair call it serves
  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  std::atomic<Job*> job_{nullptr};  // set under mutex_, taken by the helper spinning or woken
  bool warm_ = false;                // under mutex_: woken ahead of a job
  std::atomic<bool> awake_{false};   // out of its wait: runs where it is, and takes a job without a wake-up
  std::atomic<bool> done_{false};
};

}  // namespace

void mark_background_thread() { background = true; }

void expect_run_pair() {
  cpu_set_t everywhere, away;
  if (!start_away(everywhere, away)) return;
  if (KeptHelper* helper = KeptHelper::acquire()) {
    helper->warm(away);
    helper->release();
  }
}

struct HelperRun::State {
  std::function<void()> second;
  Job job{nullptr, nullptr, nullptr};
  cpu_set_t everywhere, away;
  KeptHelper* kept = nullptr;
  pthread_t thread{};
  bool joined = false;

  void wait() {
    if (joined) return;
    joined = true;
    if (kept != nullptr) {
      kept->wait();
      kept->release();
    } else {
      pthread_join(thread, nullptr);
    }
  }
};

HelperRun::HelperRun(std::function<void()> second) : state_(std::make_unique<State>()) {
  // Linux often starts a new thread on its parent's CPU, where it waits until the parent blocks
  // or is preempted. A load's caller does neither: measured in save_bench, the helper of an 8 MiB
  // load began after the caller had read and checksummed the whole file alone. So the helper
  // starts elsewhere, then may go anywhere again: kept off the caller's CPU for a whole 512 MiB
  // load, it shared the other CPU with the caller whenever the scheduler moved the caller there.
  auto& state = *state_;
  const bool steer = start_away(state.everywhere, state.away);
  state.second = std::move(second);
  state.job = Job{&state.second, steer ? &state.everywhere : nullptr, nullptr};
  state.kept = KeptHelper::acquire();
  if (state.kept != nullptr) {
    state.kept->start(state.job, steer ? &state.away : nullptr);
    return;
  }
  // Its first mask is set at creation: moving a thread that already runs needs the CPU's stopper.
  pthread_attr_t attributes;
  pthread_attr_init(&attributes);
  if (steer) pthread_attr_setaffinity_np(&attributes, sizeof state.away, &state.away);
  const int created = pthread_create(
      &state.thread, &attributes, [](void* context) -> void* { return (*static_cast<Job*>(context))(), nullptr; },
      &state.job);
  pthread_attr_destroy(&attributes);
  if (created != 0) throw std::system_error(created, std::generic_category(), "starting a helper thread");
}

HelperRun::~HelperRun() { state_->wait(); }

void HelperRun::join() {
  state_->wait();
  if (state_->job.error) std::rethrow_exception(std::exchange(state_->job.error, nullptr));
}

void run_pair(const std::function<void()>& first, const std::function<void()>& second) {
  HelperRun helper(second);
  first();  // on an error, the destructor waits for the helper
  helper.join();
}

}  // namespace torchfit::detail
