// How much training time an async checkpoint costs inside fit (P1, P1f), and
// where the writer's time goes. One compute thread, as the measurements.
//
//   stall_bench [--width 2048] [--layers 8] [--batch 16] [--every 8] [--saves 4] [--rounds 5]
//               [--dir bench_out] [--json stall_bench.json]
//
// P1 is the time the training thread loses per save: over the `every` step
// intervals after each save point, the excess over the median step interval of a
// run without checkpoints in the same round; median over saves and rounds. It is
// compared with a synchronous torch::save of the same model, timed side by side.
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>
#include <libdeflate.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <torch/torch.h>
#include <torchfit/torchfit.h>

#include "bench_util.h"

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

/// Times each batch start on the training thread.
struct StepClock : Callback {
  std::vector<double> starts;
  void on_train_batch_begin(int64_t, const Logs&) override { starts.push_back(now()); }
  void on_train_end(const Logs&) override { starts.push_back(now()); }
};

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
  auto every = static_cast<int64_t>(args.number("every", 8));
  auto saves = static_cast<int64_t>(args.number("saves", 4));
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
    std::vector<double> lost;  // per save
    std::vector<double> cpu;   // extra CPU seconds per save (all threads)
  };
  std::vector<Result> results(configs.size());
  double state_bytes = 0;
  std::vector<double> torch_save_s;

  auto run = [&](const Config& config, std::vector<double>& intervals, double& cpu) {
    torch::manual_seed(1);
    auto model = make_model(width, layers, config.frozen);
    state_bytes = 0;
    for (const auto& p : model->parameters()) state_bytes += static_cast<double>(p.nbytes());
    auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 1e-3);
    Trainer trainer(model, sgd, mse);
    auto clock = std::make_shared<StepClock>();
    std::vector<std::shared_ptr<Callback>> callbacks{clock};
    if (!config.storage.empty()) {
      auto options = CheckpointOptions((dir / "w.pt").string())
                         .save_weights_only(true)
                         .save_freq(SaveFreq::batches(every))
                         .async_save(config.storage == "deferred");
      if (config.storage == "eager") options.io(std::make_shared<EagerAsync>());
      callbacks.push_back(std::make_shared<CheckpointCallback>(options));
    }
    double cpu_start = cpu_seconds();
    trainer.fit(x, y, FitOptions().epochs(1).batch_size(batch).shuffle(false).callbacks(callbacks));
    cpu = cpu_seconds() - cpu_start;
    intervals.clear();
    for (size_t i = 1; i < clock->starts.size(); ++i) intervals.push_back(clock->starts[i] - clock->starts[i - 1]);
    // The model for the side-by-side torch::save.
    return model;
  };

  { std::vector<double> warm; double cpu; run(configs[0], warm, cpu); }
  for (int round = 0; round < rounds; ++round) {
    std::vector<double> base_intervals;
    double base_cpu = 0;
    for (size_t i = 0; i < configs.size(); ++i) {
      std::vector<double> intervals;
      double cpu = 0;
      auto model = run(configs[i], intervals, cpu);
      if (configs[i].storage.empty()) {
        base_intervals = intervals;
        base_cpu = cpu;
        if (configs[i].frozen == 0) {
          ::sync();
          double start = now();
          torch::save(model, (dir / "torch_save.pt").string());
          torch_save_s.push_back(now() - start);
        }
        continue;
      }
      // Saves happen at the end of batches every-1, 2*every-1, ...: the intervals
      // from each save point to the next are the ones its background work can slow.
      double step = median(base_intervals);
      for (int64_t s = 0; s < saves; ++s) {
        double lost = 0;
        for (int64_t j = (s + 1) * every - 1; j < (s + 2) * every - 1 && j < static_cast<int64_t>(intervals.size()); ++j) {
          lost += intervals[j] - step;
        }
        results[i].lost.push_back(lost);
      }
      results[i].cpu.push_back((cpu - base_cpu) / static_cast<double>(saves));
      if (args.number("verbose", 0) > 0) {
        fmt::print(stderr, "{}: median base step {:.1f} ms; intervals ms:", configs[i].name, step * 1e3);
        for (double t : intervals) fmt::print(stderr, " {:.0f}", t * 1e3);
        fmt::print(stderr, "\n");
      }
    }
  }

  // Where a save's time goes, each phase alone on the same bytes.
  std::vector<char> source(static_cast<size_t>(state_bytes), 1), target(source.size(), 0);
  std::vector<double> memcpy_s, crc_s, write_s, fsync_s;
  for (int r = 0; r < rounds; ++r) {
    double t0 = now();
    std::memcpy(target.data(), source.data(), source.size());
    memcpy_s.push_back(now() - t0);
    t0 = now();
    volatile auto crc = libdeflate_crc32(0, source.data(), source.size());
    (void)crc;
    crc_s.push_back(now() - t0);
    auto file = (dir / "raw.bin").string();
    int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    t0 = now();
    for (size_t done = 0; done < target.size();) {
      auto n = ::write(fd, target.data() + done, target.size() - done);
      if (n <= 0) throw std::runtime_error("write failed");
      done += static_cast<size_t>(n);
    }
    write_s.push_back(now() - t0);
    t0 = now();
    ::fsync(fd);
    fsync_s.push_back(now() - t0);
    ::close(fd);
  }

  double torch_save = median(torch_save_s);
  bench::JsonRows json;
  fmt::print("workload: {} x Linear({}, {}), SGD, batch {}, one compute thread; weights-only async save every {} batches; "
             "state {:.0f} MiB; median of {} saves x {} rounds; sync torch::save of the model {:.1f} ms\n\n",
             layers, width, width, batch, every, state_bytes / (1 << 20), saves, rounds, torch_save * 1e3);
  fmt::print("| configuration | lost per save ms | vs torch::save | extra CPU per save ms |\n|---|---|---|---|\n");
  for (size_t i = 0; i < configs.size(); ++i) {
    if (configs[i].storage.empty()) continue;
    double lost = median(results[i].lost), cpu = median(results[i].cpu);
    fmt::print("| {} | {:.1f} | {:.3f} | {:.1f} |\n", configs[i].name, lost * 1e3, lost / torch_save, cpu * 1e3);
    json.add({{"lost_s", lost}, {"ratio", lost / torch_save}, {"extra_cpu_s", cpu}, {"torch_save_s", torch_save},
              {"state_bytes", state_bytes}},
             {{"configuration", configs[i].name}});
  }
  fmt::print("\n| phase, alone, {:.0f} MiB | ms |\n|---|---|\n", state_bytes / (1 << 20));
  fmt::print("| memcpy | {:.1f} |\n| CRC32 (libdeflate) | {:.1f} |\n| write to page cache | {:.1f} |\n| fsync | {:.1f} |\n",
             median(memcpy_s) * 1e3, median(crc_s) * 1e3, median(write_s) * 1e3, median(fsync_s) * 1e3);
  auto json_path = args.get("json", (dir.parent_path() / "stall_bench.json").string());
  std::ofstream(json_path) << json.str();
  fmt::print("\nJSON: {}\n", json_path);
  fs::remove_all(dir);
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "stall_bench: {}\n", e.what());
  return 1;
}
