// Data-parallel throughput, allreduce share and checkpoint blocking time.
//
//   ddp_bench [--samples 8192] [--hidden 512] [--batch 64] [--epochs 2] [--rounds 5] [--dir bench_out]
//   examples/launch.sh 2 ddp_bench ...      # the same with 2 processes
//
// Each rank trains on its shard with `--batch` per rank; rank 0 prints the rows.
// P3d: fit throughput with a full async checkpoint every epoch against none,
// interleaved rounds, medians.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>

#include <torch/torch.h>
#include <torchfit/torchfit.h>

#include "bench_util.h"
#include "workload.h"

namespace fs = std::filesystem;
using namespace torchfit;

int main(int argc, char** argv) try {
  bench::Args args(argc, argv);
  auto samples = static_cast<int64_t>(args.number("samples", 8192));
  auto hidden = static_cast<int64_t>(args.number("hidden", 512));
  auto batch = static_cast<int64_t>(args.number("batch", 64));
  auto epochs = static_cast<int64_t>(args.number("epochs", 2));
  auto dir = fs::path(args.get("dir", "bench_out")) / "ddp";

  auto [x, y] = bench::make_samples(samples);
  auto model = bench::make_mlp(hidden);
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-3);
  Trainer trainer(model, adam, bench::cross_entropy);
  if (std::getenv("WORLD_SIZE") != nullptr) trainer.set_process_group(distributed::init_from_env());

  auto rounds = static_cast<int>(args.number("rounds", 5));
  auto fit_seconds = [&](const std::string& checkpoint) {
    std::vector<std::shared_ptr<Callback>> callbacks;
    if (!checkpoint.empty()) {
      callbacks.push_back(std::make_shared<CheckpointCallback>(
          CheckpointOptions((dir / (checkpoint + ".pt")).string()).monitor("loss").async_save(checkpoint == "async")));
    }
    auto start = std::chrono::steady_clock::now();
    trainer.fit(x, y, FitOptions().epochs(epochs).batch_size(batch).seed(1).callbacks(callbacks));
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  fit_seconds("");  // warm-up
  const std::vector<std::string> modes = {"", "async", "sync"};
  std::map<std::string, std::vector<double>> times;
  double plain_allreduce = 0, plain_total = 0;  // fits without checkpoints
  for (int round = 0; round < rounds; ++round) {
    for (const auto& mode : modes) {
      double before = trainer.allreduce_seconds();
      times[mode].push_back(fit_seconds(mode));
      if (mode.empty()) {
        plain_total += times[mode].back();
        plain_allreduce += trainer.allreduce_seconds() - before;
      }
    }
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  double seconds = median(times[""]);
  double allreduce_share = plain_allreduce / plain_total;

  // Checkpoint blocking time: the save point as every rank sees it (rank 0 writes, all meet at a barrier).
  auto blocking_ms = [&](bool async) {
    auto cb = std::make_shared<CheckpointCallback>(
        CheckpointOptions((dir / (async ? "async.pt" : "sync.pt")).string()).monitor("loss").async_save(async));
    cb->set_trainer(&trainer);
    cb->on_train_begin({});
    std::vector<double> times;
    for (int i = 0; i < 5; ++i) {
      auto t = std::chrono::steady_clock::now();
      cb->on_epoch_begin(i, {});
      cb->on_epoch_end(i, {{"loss", 1.0}});
      times.push_back(1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
    }
    cb->on_train_end({});
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
  };
  double sync_ms = blocking_ms(false), async_ms = blocking_ms(true);
  if (trainer.is_main_process()) {
    fmt::print("| processes | samples/s | allreduce share of fit time | checkpoint blocking, sync (ms) | checkpoint blocking, async (ms) | P3d fit, async ckpt every epoch / none | fit, sync ckpt every epoch / none |\n");
    fmt::print("|---|---|---|---|---|---|---|\n");
    fmt::print("| {} | {:.0f} | {:.1f} % | {:.1f} | {:.1f} | {:.3f} | {:.3f} |\n", trainer.world_size(),
               static_cast<double>(samples * epochs) / seconds, 100.0 * allreduce_share, sync_ms, async_ms,
               seconds / median(times["async"]), seconds / median(times["sync"]));
    fs::remove_all(dir);
  }
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "ddp_bench: {}\n", e.what());
  return 1;
}
