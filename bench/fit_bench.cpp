// fit() throughput with no checkpoint and with sync and async checkpoints every epoch and every
// N batches, on the same workload in one run, in interleaved rounds; where the async saves'
// time went; and loads of the full checkpoint against Python's.
//
//   fit_bench [--samples 4096] [--hidden 512] [--batch 128] [--epochs 2] [--every 10] [--rounds 7]
//             [--dir bench_out] [--json fit_bench.json] [--python /usr/bin/python3] [--only loads]
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <torch/torch.h>
#include <torchfit/torchfit.h>

#include "bench_util.h"
#include "workload.h"

namespace fs = std::filesystem;
using namespace torchfit;

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// The async saves' profiles of one configuration, summed over its rounds.
struct ProfileSum {
  AsyncSaveProfile sum;
  void add(const AsyncSaveProfile& p) {
    sum.background_saves += p.background_saves;
    sum.inline_saves += p.inline_saves;
    for (auto field : {&AsyncSaveProfile::save_wait, &AsyncSaveProfile::capture, &AsyncSaveProfile::inline_save,
                       &AsyncSaveProfile::before_update, &AsyncSaveProfile::wait, &AsyncSaveProfile::step_excess,
                       &AsyncSaveProfile::writer_copy, &AsyncSaveProfile::writer_store, &AsyncSaveProfile::writer_cpu}) {
      sum.*field += p.*field;
    }
    sum.caller_page_faults += p.caller_page_faults;
  }
};

}  // namespace

int main(int argc, char** argv) try {
  bench::Args args(argc, argv);
  auto samples = static_cast<int64_t>(args.number("samples", 4096));
  auto hidden = static_cast<int64_t>(args.number("hidden", 512));
  auto batch = static_cast<int64_t>(args.number("batch", 128));
  auto epochs = static_cast<int64_t>(args.number("epochs", 2));
  auto every = static_cast<int64_t>(args.number("every", 10));
  auto rounds = static_cast<int>(args.number("rounds", 7));
  auto python = args.get("python", "/usr/bin/python3");
  const bool loads_only = args.get("only", "") == "loads";  // the full-checkpoint loads alone
  auto dir = fs::path(args.get("dir", "bench_out")) / "fit";
  fs::create_directories(dir);

  auto [x, y] = bench::make_samples(samples);

  struct Config {
    std::string name;
    std::string file;  // empty: no checkpoint
    bool async = false;
    SaveFreq freq = SaveFreq::epoch();
    AsyncPolicy policy = AsyncPolicy::Measured;
    int group = 0;  // configurations compared with each other run back to back in a round
  };
  const std::string n = std::to_string(every);
  // Each group has its own no-checkpoint run, so every ratio pairs runs made back to back.
  std::vector<Config> configs = {
      {"no checkpoint", "", false, SaveFreq::epoch(), AsyncPolicy::Measured, 1},
      {"sync, every epoch", "sync.pt", false, SaveFreq::epoch(), AsyncPolicy::Measured, 1},
      {"async, every epoch", "async.pt", true, SaveFreq::epoch(), AsyncPolicy::Measured, 1},
      {"sync, every " + n + " batches", "sync_n.pt", false, SaveFreq::batches(every), AsyncPolicy::Measured, 2},
      {"async, every " + n + " batches", "async_n.pt", true, SaveFreq::batches(every), AsyncPolicy::Measured, 2},
      {"async (always background), every " + n + " batches", "always_n.pt", true, SaveFreq::batches(every),
       AsyncPolicy::Always, 2},
      {"no checkpoint", "", false, SaveFreq::epoch(), AsyncPolicy::Measured, 2},
  };
  const std::vector<int> groups = {1, 2};
  auto baseline_of = [&](size_t config) {  // the no-checkpoint configuration of its group
    size_t none = 0;
    while (!configs[none].file.empty() || configs[none].group != configs[config].group) ++none;
    return none;
  };
  std::vector<ProfileSum> profiles(configs.size());

  bench::JsonRows json;
  double state_bytes = 0;
  auto run = [&](size_t index, int64_t run_epochs) {
    const Config& config = configs[index];
    torch::manual_seed(1);
    auto model = bench::make_mlp(hidden);
    auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-3);
    Trainer trainer(model, adam, bench::cross_entropy);
    state_bytes = 0;
    for (const auto& p : model->parameters()) state_bytes += 3.0 * static_cast<double>(p.nbytes());  // + Adam moments
    std::shared_ptr<CheckpointCallback> checkpoint;
    std::vector<std::shared_ptr<Callback>> callbacks;
    if (!config.file.empty()) {
      checkpoint = std::make_shared<CheckpointCallback>(CheckpointOptions((dir / config.file).string())
                                                            .monitor("loss")
                                                            .save_freq(config.freq)
                                                            .async_save(config.async)
                                                            .async_policy(config.policy));
      callbacks.push_back(checkpoint);
    }
    auto start = std::chrono::steady_clock::now();
    trainer.fit(x, y, FitOptions().epochs(run_epochs).batch_size(batch).seed(2).callbacks(callbacks));
    const double seconds = seconds_since(start);
    if (checkpoint) {
      if (auto* async = dynamic_cast<AsyncCheckpointIO*>(&checkpoint->manager().io())) {
        profiles[index].add(async->profile());
      }
    }
    return seconds;
  };
  if (!loads_only) {
    run(0, 1);  // warm-up
    // Rounds in a new order each, so slow phases of the machine hit every configuration alike. The
    // configurations of a group run back to back (in a new order each round too): their difference,
    // taken round by round, leaves out the machine's drift over a round, which swings throughput by
    // several percent here against about 0.1 % for a save.
    std::vector<std::vector<double>> seconds(configs.size());
    std::vector<int> group_order = groups;
    std::mt19937 shuffle(42);
    for (int round = 0; round < rounds; ++round) {
      std::shuffle(group_order.begin(), group_order.end(), shuffle);
      for (int g : group_order) {
        std::vector<size_t> members;
        for (size_t i = 0; i < configs.size(); ++i) {
          if (configs[i].group == g) members.push_back(i);
        }
        std::shuffle(members.begin(), members.end(), shuffle);
        for (size_t i : members) seconds[i].push_back(run(i, epochs));
      }
    }

    fmt::print("workload: MLP 784-{}-{}-10, Adam, {} samples, batch {}, {} epochs, {} interleaved rounds; full checkpoint "
               "{:.1f} MiB; {} intra-op threads, {} cores\n\n",
               hidden, hidden, samples, batch, epochs, rounds, state_bytes / (1 << 20), at::get_num_threads(),
               std::thread::hardware_concurrency());
    fmt::print("Throughput against the no-checkpoint run of the same group, round by round: median (min to max)\n\n"
               "| configuration | samples/s (median) | vs no checkpoint |\n|---|---|---|\n");
    for (size_t i = 0; i < configs.size(); ++i) {  // one no-checkpoint row, of every group's runs
      if (configs[i].file.empty() && i != 0) continue;
      std::vector<double> ratios, runs;
      for (int r = 0; r < rounds; ++r) ratios.push_back(seconds[baseline_of(i)][r] / seconds[i][r]);
      for (size_t j = 0; j < configs.size(); ++j) {
        if (j != i && !(i == 0 && configs[j].file.empty())) continue;
        runs.insert(runs.end(), seconds[j].begin(), seconds[j].end());
      }
      const auto ratio = bench::Spread::of(ratios);
      const double throughput = static_cast<double>(samples * epochs) / bench::Spread::of(runs).median;
      fmt::print("| {} | {:.0f} | {} |\n", configs[i].name, throughput, ratio.str());
      json.add({{"samples_per_s", throughput},
                {"ratio", ratio.median},
                {"ratio_min", ratio.min},
                {"ratio_max", ratio.max},
                {"state_bytes", state_bytes}},
               {{"configuration", configs[i].name}});
    }

    // Async against sync in the same round, back to back: the goal is async >= sync - 0.01.
    fmt::print("\nAsync minus sync, both × no checkpoint, round by round: median (min to max)\n\n"
               "| saves | async − sync |\n|---|---|\n");
    for (auto [sync, async] : {std::pair<size_t, size_t>{1, 2}, {3, 4}}) {
      std::vector<double> differences;
      for (int r = 0; r < rounds; ++r) {
        const double none = seconds[baseline_of(sync)][r];
        differences.push_back(none / seconds[async][r] - none / seconds[sync][r]);
      }
      const auto difference = bench::Spread::of(differences);
      const auto saves = configs[sync].name.substr(configs[sync].name.find(", ") + 2);
      fmt::print("| {} | {} |\n", saves, difference.str("{:+.3f}"));
      json.add({{"async_minus_sync", difference.median},
                {"async_minus_sync_min", difference.min},
                {"async_minus_sync_max", difference.max}},
               {{"configuration", saves}});
    }

    // Where the async saves' time went, per save, over all rounds.
    fmt::print("\nAsync saves, ms per save over all rounds (caller: the training thread)\n\n"
               "| configuration | saves (inline) | caller: save wait | capture | inline save | before_update | wait "
               "| step excess | page faults/save | writer: copy | store | CPU |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (size_t i = 0; i < configs.size(); ++i) {
      if (!configs[i].async) continue;
      const auto& p = profiles[i].sum;
      const double saves = static_cast<double>(std::max<int64_t>(1, p.background_saves + p.inline_saves));
      auto ms = [&](double s) { return fmt::format("{:.2f}", s * 1e3 / saves); };
      fmt::print("| {} | {} ({}) | {} | {} | {} | {} | {} | {} | {:.0f} | {} | {} | {} |\n", configs[i].name,
                 p.background_saves + p.inline_saves, p.inline_saves, ms(p.save_wait), ms(p.capture), ms(p.inline_save),
                 ms(p.before_update), ms(p.wait), ms(p.step_excess), static_cast<double>(p.caller_page_faults) / saves,
                 ms(p.writer_copy), ms(p.writer_store), ms(p.writer_cpu));
    }
  }

  // Loads of the full checkpoint into a model and Adam that already hold state.
  {
    torch::manual_seed(1);
    auto model = bench::make_mlp(hidden);
    auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-3);
    Trainer trainer(model, adam, bench::cross_entropy);
    trainer.fit(x.slice(0, 0, batch), y.slice(0, 0, batch), FitOptions().epochs(1).batch_size(batch));
    const auto file = (dir / "load.pt").string();
    trainer.save_checkpoint(file);
    trainer.load_checkpoint(file);  // the target's state exists before the first timed load
    bench::Interleaved loads;
    loads.add("torchfit", [&] { trainer.load_checkpoint(file); });
    bench::PythonWorker worker(python, {});
    if (worker.ready()) {
      loads.add_timed("python", [&] { return worker.request(fmt::format("load_full {} {}", file, hidden)); });
    }
    const auto times = loads.run_rounds(rounds);
    const auto ours = bench::Spread::of(times.at("torchfit"));
    fmt::print("\nLoads of the full checkpoint into a model and Adam holding state, ms: median (min to max) of {} "
               "rounds\n\n| Trainer::load_checkpoint | Python torch.load + load_state_dict (model, Adam) | Python/torchfit, round by round |\n|---|---|---|\n",
               rounds);
    std::string python_column = "n/a", ratio_column = "n/a";
    if (times.count("python")) {
      std::vector<double> ratios;
      for (int r = 0; r < rounds; ++r) ratios.push_back(times.at("python")[r] / times.at("torchfit")[r]);
      auto theirs = bench::Spread::of(times.at("python"));
      python_column = fmt::format("{:.2f} ({:.2f} to {:.2f})", theirs.median * 1e3, theirs.min * 1e3, theirs.max * 1e3);
      ratio_column = bench::Spread::of(ratios).str("{:.2f}");
      json.add({{"python_load_s", theirs.median}, {"load_s", ours.median},
                {"python_over_load", bench::Spread::of(ratios).median}},
               {{"configuration", "load"}});
    }
    fmt::print("| {:.2f} ({:.2f} to {:.2f}) | {} | {} |\n", ours.median * 1e3, ours.min * 1e3, ours.max * 1e3,
               python_column, ratio_column);
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
