// fit() throughput with no checkpoint, a sync checkpoint every epoch, and async
// checkpoints every epoch and every N batches, on the same workload in one run.
//
//   fit_bench [--samples 4096] [--hidden 512] [--batch 128] [--epochs 2] [--every 10] [--rounds 3]
//             [--dir bench_out] [--json fit_bench.json]
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>

#include <torch/torch.h>
#include <torchfit/torchfit.h>

#include "bench_util.h"
#include "workload.h"

namespace fs = std::filesystem;
using namespace torchfit;


int main(int argc, char** argv) try {
  bench::Args args(argc, argv);
  auto samples = static_cast<int64_t>(args.number("samples", 4096));
  auto hidden = static_cast<int64_t>(args.number("hidden", 512));
  auto batch = static_cast<int64_t>(args.number("batch", 128));
  auto epochs = static_cast<int64_t>(args.number("epochs", 2));
  auto every = static_cast<int64_t>(args.number("every", 10));
  auto dir = fs::path(args.get("dir", "bench_out")) / "fit";
  fs::create_directories(dir);

  auto [x, y] = bench::make_samples(samples);

  struct Config {
    std::string name;
    std::function<std::vector<std::shared_ptr<Callback>>()> callbacks;
  };
  auto checkpoint = [&](const std::string& name, bool async, SaveFreq freq) {
    return std::vector<std::shared_ptr<Callback>>{std::make_shared<CheckpointCallback>(
        CheckpointOptions((dir / name).string()).monitor("loss").save_freq(freq).async_save(async))};
  };
  std::vector<Config> configs = {
      {"no checkpoint", [] { return std::vector<std::shared_ptr<Callback>>{}; }},
      {"sync full, every epoch", [&] { return checkpoint("sync.pt", false, SaveFreq::epoch()); }},
      {"async full, every epoch", [&] { return checkpoint("async.pt", true, SaveFreq::epoch()); }},
      {fmt::format("async full, every {} batches", every),
       [&] { return checkpoint("async_n.pt", true, SaveFreq::batches(every)); }},
  };

  double state_bytes = 0;
  auto run = [&](const Config& config, int64_t run_epochs) {
    torch::manual_seed(1);
    auto model = bench::make_mlp(hidden);
    auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-3);
    Trainer trainer(model, adam, bench::cross_entropy);
    state_bytes = 0;
    for (const auto& p : model->parameters()) state_bytes += 3.0 * static_cast<double>(p.nbytes());  // + Adam moments
    auto start = std::chrono::steady_clock::now();
    trainer.fit(x, y, FitOptions().epochs(run_epochs).batch_size(batch).seed(2).callbacks(config.callbacks()));
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  run(configs[0], 1);  // warm-up
  // Round-robin rounds, so slow phases of the machine hit every configuration alike.
  auto rounds = static_cast<int>(args.number("rounds", 3));
  std::vector<std::vector<double>> seconds(configs.size());
  for (int round = 0; round < rounds; ++round) {
    for (size_t i = 0; i < configs.size(); ++i) seconds[i].push_back(run(configs[i], epochs));
  }
  std::vector<double> throughput;
  for (auto& s : seconds) {
    std::sort(s.begin(), s.end());
    throughput.push_back(static_cast<double>(samples * epochs) / s[s.size() / 2]);
  }
  bench::JsonRows json;
  fmt::print("workload: MLP 784-{}-{}-10, Adam, {} samples, batch {}, {} epochs, median of {} rounds; full checkpoint "
             "{:.1f} MiB\n\n",
             hidden, hidden, samples, batch, epochs, rounds, state_bytes / (1 << 20));
  fmt::print("| configuration | samples/s | vs no checkpoint |\n|---|---|---|\n");
  for (size_t i = 0; i < configs.size(); ++i) {
    fmt::print("| {} | {:.0f} | {:.3f} |\n", configs[i].name, throughput[i], throughput[i] / throughput[0]);
    json.add({{"samples_per_s", throughput[i]}, {"ratio", throughput[i] / throughput[0]}, {"state_bytes", state_bytes}},
             {{"configuration", configs[i].name}});
  }
  auto json_path = args.get("json", (dir.parent_path() / "fit_bench.json").string());
  std::ofstream(json_path) << json.str();
  fmt::print("\nJSON: {}\n", json_path);
  fs::remove_all(dir);
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "fit_bench: {}\n", e.what());
  return 1;
}
