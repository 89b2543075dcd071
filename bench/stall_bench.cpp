// How much training time an async checkpoint costs inside fit (P1, P1f), and
// where the writer's time goes. One compute thread, as the measurements.
//
//   stall_bench [--width 2048] [--layers 8] [--batch 16] [--every 16] [--window 8] [--saves 3]
//               [--rounds 5] [--dir bench_out] [--json stall_bench.json]
//
// P1 is the time the training thread loses per save: over the `window` step
// intervals after each save point, the excess over the median of the
// `every - window` step intervals just before it (with `window` >= `every`: of a
// run without checkpoints in the same round); median over saves and rounds.
// Comparing neighbouring steps of one run keeps the machine's drift out. It is
// compared with a synchronous torch::save of the same model, timed side by side.
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <torch/torch.h>
#include <torchfit/torchfit.h>

#include "bench_util.h"
#include "format/crc32.h"  // the CRC32 torchfit uses, timed alone

namespace fs = std::filesystem;
using namespace torchfit;
using Clock = std::chrono::steady_clock;

namespace {

double now() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }

double cpu_seconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  auto s = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) * 1e-6; };
  return s(usage.ru_utime) + s(usage.ru_stime);
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// CPU time of the calling thread.
double thread_cpu_seconds() {
  timespec t{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
}

/// Times each batch start on the training thread, in wall time and in the
/// training thread's CPU time.
struct StepClock : Callback {
  std::vector<double> starts, cpu_starts;
  double cpu_begin = 0;
  void on_train_begin(const Logs&) override { cpu_begin = thread_cpu_seconds(); }
  void on_train_batch_begin(int64_t, const Logs&) override { mark(); }
  void on_train_end(const Logs&) override { mark(); }
  void mark() {
    starts.push_back(now());
    cpu_starts.push_back(thread_cpu_seconds());
  }
};

/// Wall time the training thread spends in the callbacks listed between an
/// `Enter` and a `Leave` sharing one `HookTime`: the checkpoint callback's save
/// points and before_update() waits, where it blocks the training thread.
struct HookTime {
  double entered = 0, total = 0;
};
struct EnterHooks : Callback {
  explicit EnterHooks(std::shared_ptr<HookTime> time) : time(std::move(time)) {}
  void on_train_batch_end(int64_t, const Logs&) override { time->entered = now(); }
  void on_before_update() override { time->entered = now(); }
  std::shared_ptr<HookTime> time;
};
struct LeaveHooks : Callback {
  explicit LeaveHooks(std::shared_ptr<HookTime> time) : time(std::move(time)) {}
  void on_train_batch_end(int64_t, const Logs&) override { time->total += now() - time->entered; }
  void on_before_update() override { time->total += now() - time->entered; }
  std::shared_ptr<HookTime> time;
};

/// One fit: its step intervals, the CPU time of the threads other than the
/// training thread (the writer's), and the time spent in the checkpoint's hooks.
struct Run {
  std::vector<double> intervals, cpu_intervals;
  double background_cpu = 0;
  double in_hooks = 0;
};

std::vector<double> differences(const std::vector<double>& v) {
  std::vector<double> out;
  for (size_t i = 1; i < v.size(); ++i) out.push_back(v[i] - v[i - 1]);
  return out;
}

/// An async storage that ignores the hints: every save copies everything at once
/// on the training thread, as torchfit 0.1 did.
class EagerAsync : public CheckpointIO {
 public:
  EagerAsync() : inner_(std::make_shared<FileCheckpointIO>()) {}
  void save(const c10::IValue& c, const std::string& p, const OnCommit& on_commit) override { inner_.save(c, p, on_commit); }
  c10::IValue load(const std::string& p) override { return inner_.load(p); }
  void remove(const std::string& p) override { inner_.remove(p); }
  std::vector<std::string> list(const std::string& d) override { return inner_.list(d); }
  void wait() override { inner_.wait(); }

 private:
  AsyncCheckpointIO inner_;
};

torch::nn::Sequential make_model(int64_t width, int64_t layers, int64_t frozen) {
  torch::nn::Sequential model;
  for (int64_t i = 0; i < layers; ++i) {
    model->push_back(torch::nn::Linear(width, width));
    if (i + 1 < layers) model->push_back(torch::nn::ReLU());
  }
  int64_t index = 0;
  for (auto& child : model->children()) {
    auto params = child->parameters();
    if (params.empty()) continue;
    if (index++ < frozen) {
      for (auto& p : params) p.set_requires_grad(false);
    }
  }
  return model;
}

}  // namespace

int main(int argc, char** argv) try {
  bench::Args args(argc, argv);
  auto width = static_cast<int64_t>(args.number("width", 2048));
  auto layers = static_cast<int64_t>(args.number("layers", 8));
  auto batch = static_cast<int64_t>(args.number("batch", 16));
  auto every = static_cast<int64_t>(args.number("every", 16));
  auto window = std::min(every, static_cast<int64_t>(args.number("window", 8)));
  auto saves = static_cast<int64_t>(args.number("saves", 3));
  auto rounds = static_cast<int>(args.number("rounds", 5));
  auto dir = fs::path(args.get("dir", "bench_out")) / "stall";
  fs::create_directories(dir);
  at::set_num_threads(1);

  const int64_t steps = every * (saves + 1);
  torch::manual_seed(0);
  auto x = torch::randn({steps * batch, width});
  auto y = torch::randn({steps * batch, width});
  auto mse = [](const torch::Tensor& o, const torch::Tensor& t) { return torch::mse_loss(o, t); };

  struct Config {
    std::string name;
    int64_t frozen;
    std::string storage;  // "", "deferred", "eager", "sync"
  };
  std::vector<Config> configs = {
      {"no checkpoint", 0, ""},
      {"async, copy at the save point (0.1)", 0, "eager"},
      {"async, deferred copy", 0, "deferred"},
      {"no checkpoint, 7 of 8 frozen", layers - 1, ""},
      {"async (0.1), 7 of 8 frozen", layers - 1, "eager"},
      {"async, deferred + unchanged skipped, 7 of 8 frozen", layers - 1, "deferred"},
  };

  struct Result {
    std::vector<double> lost;           // per save
    std::vector<double> lost_cpu;       // per save, the same in the training thread's CPU time
    std::vector<double> quiet_vs_base;  // per save: the steps just before it / the run without checkpoints
    std::vector<double> background_cpu;  // per save: CPU seconds of the other threads
    std::vector<double> in_hooks;        // per save: wall seconds in the checkpoint's hooks
  };
  std::vector<Result> results(configs.size());
  double state_bytes = 0;
  std::vector<double> torch_save_s;

  auto run = [&](const Config& config, Run& out) {
    torch::manual_seed(1);
    auto model = make_model(width, layers, config.frozen);
    state_bytes = 0;
    for (const auto& p : model->parameters()) state_bytes += static_cast<double>(p.nbytes());
    auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 1e-3);
    Trainer trainer(model, sgd, mse);
    auto clock = std::make_shared<StepClock>();
    std::shared_ptr<HookTime> hook_time;
    std::vector<std::shared_ptr<Callback>> callbacks{clock};
    if (!config.storage.empty()) {
      auto options = CheckpointOptions((dir / "w.pt").string())
                         .save_weights_only(true)
                         .save_freq(SaveFreq::batches(every))
                         .async_save(config.storage == "deferred");
      if (config.storage == "eager") options.io(std::make_shared<EagerAsync>());
      auto hooks = std::make_shared<HookTime>();
      callbacks.push_back(std::make_shared<EnterHooks>(hooks));
      callbacks.push_back(std::make_shared<CheckpointCallback>(options));
      callbacks.push_back(std::make_shared<LeaveHooks>(hooks));
      hook_time = hooks;
    }
    double cpu_start = cpu_seconds();
    trainer.fit(x, y, FitOptions().epochs(1).batch_size(batch).shuffle(false).callbacks(callbacks));
    double cpu = cpu_seconds() - cpu_start;
    out.intervals = differences(clock->starts);
    out.cpu_intervals = differences(clock->cpu_starts);
    out.background_cpu = cpu - (clock->cpu_starts.back() - clock->cpu_begin);
    out.in_hooks = hook_time ? hook_time->total : 0;
    // The model for the side-by-side torch::save.
    return model;
  };

  { Run warm; run(configs[0], warm); }
  for (int round = 0; round < rounds; ++round) {
    Run base;
    for (size_t i = 0; i < configs.size(); ++i) {
      Run current;
      auto model = run(configs[i], current);
      if (configs[i].storage.empty()) {
        base = current;
        if (configs[i].frozen == 0) {
          ::sync();
          double start = now();
          torch::save(model, (dir / "torch_save.pt").string());
          torch_save_s.push_back(now() - start);
        }
        continue;
      }
      // Saves happen at the end of batches every-1, 2*every-1, ...: the `window`
      // intervals from each save point on are the ones its background work can
      // slow. Each is compared with the quiet steps just before its save point:
      // this machine's step time shifts by up to 20 % for stretches of several
      // steps, which a run-wide median would count as lost or won time.
      const int64_t quiet = every - window;
      // The time lost per save in `intervals`, each save against the steps before it.
      auto lost_per_save = [&](const std::vector<double>& intervals, const std::vector<double>& base_intervals,
                               std::vector<double>& lost_out, std::vector<double>* quiet_vs_base) {
        for (int64_t s = 0; s < saves; ++s) {
          const int64_t start = (s + 1) * every - 1;
          if (start + window > static_cast<int64_t>(intervals.size())) break;
          double step = median(base_intervals);
          if (quiet > 0) {
            step = median(std::vector<double>(intervals.begin() + start - quiet, intervals.begin() + start));
            if (quiet_vs_base) quiet_vs_base->push_back(step / median(base_intervals));
          }
          double lost = 0;
          for (int64_t j = start; j < start + window; ++j) lost += intervals[static_cast<size_t>(j)] - step;
          lost_out.push_back(lost);
        }
      };
      lost_per_save(current.intervals, base.intervals, results[i].lost, &results[i].quiet_vs_base);
      lost_per_save(current.cpu_intervals, base.cpu_intervals, results[i].lost_cpu, nullptr);
      results[i].background_cpu.push_back((current.background_cpu - base.background_cpu) /
                                          static_cast<double>(saves));
      results[i].in_hooks.push_back(current.in_hooks / static_cast<double>(saves));
      if (args.number("verbose", 0) > 0) {
        fmt::print(stderr, "{}: median base step {:.1f} ms; intervals ms:", configs[i].name, median(base.intervals) * 1e3);
        for (double t : current.intervals) fmt::print(stderr, " {:.0f}", t * 1e3);
        fmt::print(stderr, "\n");
      }
    }
  }

  // Where a save's time goes, each phase alone on the same bytes.
  std::vector<char> source(static_cast<size_t>(state_bytes), 1), target(source.size(), 0);
  std::vector<double> memcpy_s, crc_s, write_s, write_cpu_s, fsync_s, direct_s, direct_cpu_s;
  const size_t direct_bytes = source.size() / 4096 * 4096;
  bench::AlignedBuffer aligned(direct_bytes);  // as O_DIRECT needs
  for (int r = 0; r < rounds; ++r) {
    double t0 = now();
    std::memcpy(target.data(), source.data(), source.size());
    memcpy_s.push_back(now() - t0);
    t0 = now();
    volatile auto crc = torchfit::detail::crc32_of(source.data(), source.size());
    (void)crc;
    crc_s.push_back(now() - t0);
    auto file = (dir / "raw.bin").string();
    int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    t0 = now();
    double c0 = thread_cpu_seconds();
    for (size_t done = 0; done < target.size();) {
      auto n = ::write(fd, target.data() + done, target.size() - done);
      if (n <= 0) throw std::runtime_error("write failed");
      done += static_cast<size_t>(n);
    }
    write_s.push_back(now() - t0);
    write_cpu_s.push_back(thread_cpu_seconds() - c0);
    t0 = now();
    ::fsync(fd);
    fsync_s.push_back(now() - t0);
    ::close(fd);
    // What durable background saves do with large records: straight to the disk.
    fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT, 0644);
    if (fd < 0) continue;  // a file system without O_DIRECT
    t0 = now();
    c0 = thread_cpu_seconds();
    for (size_t done = 0; done < direct_bytes;) {
      auto n = ::pwrite(fd, aligned.data() + done, direct_bytes - done, static_cast<off_t>(done));
      if (n <= 0) break;
      done += static_cast<size_t>(n);
    }
    ::fsync(fd);
    direct_s.push_back(now() - t0);
    direct_cpu_s.push_back(thread_cpu_seconds() - c0);
    ::close(fd);
  }

  double torch_save = median(torch_save_s);
  bench::JsonRows json;
  fmt::print("workload: {} x Linear({}, {}), SGD, batch {}, one compute thread; weights-only async save every {} batches; "
             "state {:.0f} MiB; {} steps after each save point against the steps just before it; median of {} saves x {} "
             "rounds; sync torch::save of the model {:.1f} ms\n\n",
             layers, width, width, batch, every, state_bytes / (1 << 20), window, saves, rounds, torch_save * 1e3);
  fmt::print("| configuration | lost per save ms | vs torch::save | training thread's CPU time lost per save ms | "
             "other threads' CPU per save ms | in the checkpoint's hooks per save ms | "
             "steps before saves / run without checkpoints |\n"
             "|---|---|---|---|---|---|---|\n");
  for (size_t i = 0; i < configs.size(); ++i) {
    if (configs[i].storage.empty()) continue;
    double lost = median(results[i].lost), lost_cpu = median(results[i].lost_cpu);
    double background = median(results[i].background_cpu);
    double in_hooks = median(results[i].in_hooks);
    fmt::print("| {} | {:.1f} | {:.3f} | {:.1f} | {:.1f} | {:.1f} | {:.3f} |\n", configs[i].name, lost * 1e3,
               lost / torch_save, lost_cpu * 1e3, background * 1e3, in_hooks * 1e3, median(results[i].quiet_vs_base));
    json.add({{"lost_s", lost}, {"ratio", lost / torch_save}, {"lost_thread_cpu_s", lost_cpu}, {"in_hooks_s", in_hooks},
              {"background_cpu_s", background}, {"torch_save_s", torch_save}, {"state_bytes", state_bytes}},
             {{"configuration", configs[i].name}});
  }
  fmt::print("\n| phase, alone, {:.0f} MiB | ms | CPU ms |\n|---|---|---|\n", state_bytes / (1 << 20));
  fmt::print("| memcpy | {:.1f} | |\n| CRC32 (crc32_of) | {:.1f} | |\n| write to page cache | {:.1f} | {:.1f} |\n"
             "| fsync after it | {:.1f} | |\n| write with O_DIRECT, then fsync | {:.1f} | {:.1f} |\n",
             median(memcpy_s) * 1e3, median(crc_s) * 1e3, median(write_s) * 1e3, median(write_cpu_s) * 1e3,
             median(fsync_s) * 1e3, median(direct_s) * 1e3, median(direct_cpu_s) * 1e3);
  auto json_path = args.get("json", (dir.parent_path() / "stall_bench.json").string());
  std::ofstream(json_path) << json.str();
  fmt::print("\nJSON: {}\n", json_path);
  fs::remove_all(dir);
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "stall_bench: {}\n", e.what());
  return 1;
}
