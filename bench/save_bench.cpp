// Save and load overhead of torchfit checkpoints against the physical limits and
// the usual alternatives, on the same bytes, in the same directory, in one run.
//
//   save_bench [--sizes 1,8,64,128,512] [--small 2000] [--reps 7] [--dir bench_out]
//              [--json save_bench.json] [--python /usr/bin/python3]
//
// Sizes are MiB of float32 state in 4 tensors; --small adds a case of that many
// 4 KiB tensors (0 to skip).
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <torch/torch.h>
#include <torchfit/torchfit.h>

#include <fmt/ranges.h>

#include "bench_util.h"
#include "sys/posix_file.h"  // allocate_for_filling, as large loads use it

namespace fs = std::filesystem;
using namespace torchfit;

namespace {

struct BlobImpl : torch::nn::Module {
  explicit BlobImpl(const std::vector<int64_t>& numels) {
    for (size_t i = 0; i < numels.size(); ++i) register_parameter("p" + std::to_string(i), torch::randn({numels[i]}));
  }
  torch::Tensor forward(torch::Tensor x) { return x; }
};
TORCH_MODULE(Blob);

struct Case {
  std::string name;
  std::vector<int64_t> numels;
};

void check(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error(what + ": " + std::strerror(errno));
}

void raw_write(const std::string& path, const std::vector<torch::Tensor>& tensors) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  check(fd >= 0, "open " + path);
  for (const auto& t : tensors) {
    auto* p = static_cast<const char*>(t.data_ptr());
    size_t left = t.nbytes();
    while (left > 0) {
      ssize_t n = ::write(fd, p, left);
      check(n > 0, "write " + path);
      p += n;
      left -= static_cast<size_t>(n);
    }
  }
  check(::fsync(fd) == 0, "fsync " + path);
  ::close(fd);
}

void raw_read(const std::string& path, char* buffer, size_t size) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  check(fd >= 0, "open " + path);
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::read(fd, buffer + done, size - done);
    check(n > 0, "read " + path);
    done += static_cast<size_t>(n);
  }
  ::close(fd);
}

/// raw_read into memory fresh from the kernel, allocated by the function a load
/// allocates its storages of 16 MiB and more with: what filling new memory costs
/// on this machine, apart from the reading.
void raw_read_fresh(const std::string& path, size_t size) {
  void* buffer = torchfit::detail::allocate_for_filling(size);
  raw_read(path, static_cast<char*>(buffer), size);
  std::free(buffer);
}

/// Resets the peak-RSS counter (Linux >= 4.0) and returns the current RSS in bytes.
double reset_peak_rss() {
  std::ofstream("/proc/self/clear_refs") << "5";
  return 0;
}

double status_kib(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1));
  }
  return 0;
}

/// Drives a CheckpointCallback by hand: one save per call.
struct Saver {
  std::shared_ptr<CheckpointCallback> callback;
  int64_t epoch = 0;
  Saver(Trainer& trainer, CheckpointOptions options) : callback(std::make_shared<CheckpointCallback>(options)) {
    callback->set_trainer(&trainer);
    callback->on_train_begin({});
  }
  void save() {
    callback->on_epoch_begin(epoch, {});
    callback->on_epoch_end(epoch++, {{"val_loss", 1.0}});
  }
};

}  // namespace

int main(int argc, char** argv) try {
  std::signal(SIGPIPE, SIG_IGN);  // a Python worker that died is an error to report, not a signal
  bench::Args args(argc, argv);
  int reps = static_cast<int>(args.number("reps", 7));
  auto dir = fs::path(args.get("dir", "bench_out"));
  auto python = args.get("python", "/usr/bin/python3");
  fs::create_directories(dir);

  std::vector<Case> cases;
  std::stringstream sizes(args.get("sizes", "1,8,64,128,512"));
  for (std::string mib; std::getline(sizes, mib, ',');) {
    int64_t numel = static_cast<int64_t>(std::stod(mib) * (1 << 20) / 4 / 4);
    cases.push_back({mib + " MiB", std::vector<int64_t>(4, numel)});
  }
  auto small = static_cast<int64_t>(args.number("small", 2000));
  if (small > 0) cases.push_back({fmt::format("{} x 4 KiB", small), std::vector<int64_t>(small, 1024)});

  torch::manual_seed(0);
  bench::JsonRows json;
  std::vector<std::string> spreads;  // the ratio table, a row per case
  fmt::print("| state | bytes | memcpy ms | raw write+fsync ms | torch::save ms | sync weights ms | sync full ms | async block ms | async durable ms | python torch.save+fsync ms | raw read ms | raw read, 16 B past a page ms | raw read, fresh memory ms | raw read of the file ms | load ms | first load ms | P1 block/memcpy | P1 block/torch::save | P2 raw/sync | P4 raw read of the file/load | raw read of read.bin/load | fresh raw read/first load | P5 peak/bytes | P6 python+fsync/sync |\n");
  fmt::print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& c : cases) {
    Blob model(c.numels);
    auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
    Trainer trainer(model, sgd, [](const torch::Tensor& o, const torch::Tensor&) { return o.sum(); });
    std::vector<torch::Tensor> tensors;
    size_t bytes = 0;
    for (const auto& p : model->parameters()) {
      tensors.push_back(p.detach());
      bytes += p.nbytes();
    }
    auto path = [&](const std::string& name) { return (dir / name).string(); };

    // Page-aligned, as the files' records are: a kernel copy (rep movsb) into a buffer 1 to 31
    // bytes past its source's alignment takes about 10 x as long on this AMD machine, and a
    // std::vector lands there or not by how malloc placed it (16 bytes past a page from mmap).
    bench::AlignedBuffer target(bytes), off_target(bytes + 16);
    Saver weights(trainer, CheckpointOptions(path("weights.pt")).save_weights_only(true));
    Saver full(trainer, CheckpointOptions(path("full.pt")));
    // Always in the background: this measures the machinery, not the rule that may bypass it.
    Saver async(trainer, CheckpointOptions(path("async.pt"))
                             .save_weights_only(true)
                             .async_save(true)
                             .async_policy(AsyncPolicy::Always));
    Saver for_load(trainer, CheckpointOptions(path("load.pt")).save_weights_only(true));
    Blob loaded(c.numels);

    // The first async save allocates the snapshot buffers: measure its peak memory.
    double rss_before = status_kib("VmRSS");
    reset_peak_rss();
    async.save();
    async.callback->wait();
    double peak_extra = (status_kib("VmHWM") - rss_before) * 1024.0;
    for_load.save();                             // files for the load measurements
    raw_write(path("read.bin"), tensors);
    // The loaded file itself, read raw. Its page cache differs from read.bin's: the durable save
    // wrote it past the cache (O_DIRECT), so the load before the rounds cached it through
    // readahead, whose pages took 1.2-1.6 x as long to read as those write() left for read.bin.
    const size_t file_bytes = static_cast<size_t>(fs::file_size(path("load.pt")));
    bench::AlignedBuffer file_target(file_bytes);
    // The first load of a process takes fresh memory, and so does the second (a single load keeps
    // none): timed once here, against the raw read into fresh memory. The rounds time the loads
    // after them, as a job repeats them (a restore of the best weights, checkpoints evaluated in turn),
    // against the raw read into a buffer touched before.
    torchfit::release_load_memory();
    auto time_load = [&] {
      auto start = std::chrono::steady_clock::now();
      load_weights(*loaded, path("load.pt"));
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    };
    const double first_load_s = time_load();
    time_load();

    bench::Interleaved methods;
    methods.add("memcpy", [&] {
      size_t offset = 0;
      for (const auto& t : tensors) {
        std::memcpy(target.data() + offset, t.data_ptr(), t.nbytes());
        offset += t.nbytes();
      }
    });
    methods.add("raw", [&] { raw_write(path("raw.bin"), tensors); });
    methods.add("torch_save", [&] { torch::save(model, path("torch_save.pt")); });
    methods.add("sync_weights", [&] { weights.save(); });
    methods.add("sync_full", [&] { full.save(); });
    // As after an optimizer step: every tensor changed, so the async save copies it all
    // (unchanged tensors would not be copied again).
    auto step = [&] {
      async.callback->wait();
      torch::NoGradGuard no_grad;
      for (auto& p : model->parameters()) p.mul_(1);
    };
    methods.add("async_block", [&] { async.save(); }, step, [&] { async.callback->wait(); });
    methods.add("async_durable", [&] {
      async.save();
      async.callback->wait();
    }, step);
    methods.add("raw_read", [&] { raw_read(path("read.bin"), target.data(), bytes); });
    // Where a std::vector from mmap lands: what the raw read cost before its buffer was aligned.
    methods.add("raw_read_16", [&] { raw_read(path("read.bin"), off_target.data() + 16, bytes); });
    methods.add("raw_read_fresh", [&] { raw_read_fresh(path("read.bin"), bytes); });
    methods.add("raw_read_file", [&] { raw_read(path("load.pt"), file_target.data(), file_bytes); });
    methods.add("load", [&] { load_weights(*loaded, path("load.pt")); });
    std::string numels;
    for (auto n : c.numels) numels += (numels.empty() ? "" : ",") + std::to_string(n);
    bench::PythonWorker python_worker(python, {"--numels", numels, "--path", path("python.pt")});
    if (python_worker.ready()) {
      methods.add_timed("python", [&] { return python_worker.request("save"); });
      methods.add_timed("python_fsync", [&] { return python_worker.request("save_fsync"); });
      methods.add_timed("python_load", [&] { return python_worker.request("load " + path("load.pt")); });
    }
    const auto rounds = methods.run_rounds(reps);
    std::map<std::string, double> t;
    for (const auto& [name, times] : rounds) t[name] = bench::Spread::of(times).median;
    async.callback->wait();
    // Ratios round by round: numerator's time over denominator's, in the same round.
    auto spread = [&](const char* numerator, const char* denominator) {
      if (!rounds.count(numerator) || !rounds.count(denominator)) return std::string("n/a");
      std::vector<double> ratios;
      for (size_t i = 0; i < rounds.at(numerator).size(); ++i) {
        ratios.push_back(rounds.at(numerator)[i] / rounds.at(denominator)[i]);
      }
      return bench::Spread::of(ratios).str("{:.2f}");
    };
    spreads.push_back(fmt::format("| {} | {} | {} | {} | {} | {} | {} |", c.name, spread("raw", "sync_weights"),
                                  spread("raw_read_file", "load"), spread("raw_read", "load"),
                                  fmt::format("{:.2f}", t["raw_read_fresh"] / first_load_s),
                                  spread("python_load", "load"), spread("python_fsync", "sync_weights")));
    double memcpy_s = t["memcpy"], raw_s = t["raw"], torch_save_s = t["torch_save"];
    double sync_weights_s = t["sync_weights"], sync_full_s = t["sync_full"];
    double block_s = t["async_block"], durable_s = t["async_durable"];
    double raw_read_s = t["raw_read"], raw_read_fresh_s = t["raw_read_fresh"], load_s = t["load"];

    double python_s = t["python_fsync"];  // durable, as torchfit's saves (0 without Python)

    auto ms = [](double s) { return fmt::format("{:.2f}", s * 1e3); };
    auto ratio = [](double a, double b) { return b > 0 ? fmt::format("{:.2f}", a / b) : std::string("n/a"); };
    fmt::print("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
               c.name, bytes, ms(memcpy_s), ms(raw_s), ms(torch_save_s), ms(sync_weights_s), ms(sync_full_s),
               ms(block_s), ms(durable_s), python_s > 0 ? ms(python_s) : "n/a", ms(raw_read_s), ms(t["raw_read_16"]),
               ms(raw_read_fresh_s), ms(t["raw_read_file"]), ms(load_s), ms(first_load_s), ratio(block_s, memcpy_s),
               ratio(block_s, torch_save_s), ratio(raw_s, sync_weights_s), ratio(t["raw_read_file"], load_s),
               ratio(raw_read_s, load_s), ratio(raw_read_fresh_s, first_load_s),
               ratio(peak_extra, static_cast<double>(bytes)), ratio(python_s, sync_weights_s));
    std::fflush(stdout);
    json.add({{"bytes", static_cast<double>(bytes)},
              {"memcpy_s", memcpy_s},
              {"raw_write_fsync_s", raw_s},
              {"torch_save_s", torch_save_s},
              {"sync_weights_s", sync_weights_s},
              {"sync_full_s", sync_full_s},
              {"async_block_s", block_s},
              {"async_durable_s", durable_s},
              {"python_torch_save_s", t["python"]},
              {"python_torch_save_fsync_s", python_s},
              {"raw_read_s", raw_read_s},
              {"raw_read_fresh_s", raw_read_fresh_s},
              {"raw_read_16_past_page_s", t["raw_read_16"]},
              {"raw_read_file_s", t["raw_read_file"]},
              {"load_weights_s", load_s},
              {"first_load_weights_s", first_load_s},
              {"python_load_s", t["python_load"]},
              {"async_peak_extra_bytes", peak_extra}},
             {{"state", c.name}});
  }
  fmt::print("\nRatios round by round, median (min to max) of {} rounds:\n\n"
             "| state | P2 raw/sync | P4 raw read of the file/load | raw read of read.bin/load | fresh raw read/first load (one load) | P4 python load/load | P6 python+fsync/sync |\n"
             "|---|---|---|---|---|---|---|\n{}\n",
             reps, fmt::join(spreads, "\n"));
  auto json_path = args.get("json", (dir / "save_bench.json").string());
  std::ofstream(json_path) << json.str();
  fmt::print("\nJSON: {}\n", json_path);
  for (const auto* name : {"raw.bin", "read.bin", "torch_save.pt", "weights.pt", "full.pt", "async.pt", "load.pt"}) {
    fs::remove(dir / name);
  }
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "save_bench: {}\n", e.what());
  return 1;
}
