#pragma once
// Shared test fixtures: a seeded small MLP problem, temp dirs and log capture.

#include <sys/types.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <torch/torch.h>

#include <torchfit/torchfit.h>

/// Expects `statement` to throw `exception` whose message contains each of the substrings
/// that follow (as fmt's EXPECT_THROW_MSG, with parts of the message instead of all of it):
///
///     EXPECT_THROW_MSG(load(state, file), CheckpointError, "missing item(s) 'model'", file);
#define EXPECT_THROW_MSG(statement, exception, ...)                                                    \
  do {                                                                                                \
    try {                                                                                             \
      statement;                                                                                      \
      ADD_FAILURE() << "Expected " #statement " to throw " #exception;                                \
    } catch (const exception& thrown_) {                                                              \
      const std::string message_ = thrown_.what();                                                    \
      for (const std::string& part_ : std::initializer_list<std::string>{__VA_ARGS__}) {                \
        EXPECT_NE(message_.find(part_), std::string::npos)                                            \
            << "the " #exception " does not say \"" << part_ << "\": " << message_;                  \
      }                                                                                               \
    }                                                                                                 \
  } while (false)

namespace torchfit::test {

namespace fs = std::filesystem;

/// 3 -> 5 -> 3 classifier, as in Keras's checkpoint tests.
struct MlpImpl : torch::nn::Module {
  MlpImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(3, 5));
    fc2 = register_module("fc2", torch::nn::Linear(5, 3));
  }
  torch::Tensor forward(torch::Tensor x) { return fc2(torch::relu(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Mlp);

/// Cross-entropy as a Trainer::LossFn (the functional form has a third, defaulted parameter).
inline torch::Tensor ce_loss(const torch::Tensor& output, const torch::Tensor& target) {
  return torch::nn::functional::cross_entropy(output, target);
}

/// Separable 3-class data: class centers plus noise.
struct Dataset {
  torch::Tensor x_train, y_train, x_test, y_test;
};
Dataset make_data(int64_t train = 30, int64_t test = 30, uint64_t seed = 42);

/// x/y pairs as a LibTorch dataset (examples of one sample each).
class XYDataset : public torch::data::datasets::Dataset<XYDataset> {
 public:
  XYDataset(torch::Tensor x, torch::Tensor y) : x_(std::move(x)), y_(std::move(y)) {}
  torch::data::Example<> get(size_t i) override {
    return {x_[static_cast<int64_t>(i)], y_[static_cast<int64_t>(i)]};
  }
  torch::optional<size_t> size() const override { return static_cast<size_t>(x_.size(0)); }

 private:
  torch::Tensor x_, y_;
};

/// A hand-written loop's view for callbacks: no Trainer involved.
class LoopContext : public TrainingContext {
 public:
  LoopContext(Mlp model, std::shared_ptr<torch::optim::Optimizer> optimizer)
      : model_(std::move(model)), optimizer_(std::move(optimizer)) {}
  torch::nn::Module& model() const override { return *model_.ptr(); }
  torch::optim::Optimizer& optimizer() const override { return *optimizer_; }
  const Metric* find_metric(const std::string&) const override { return nullptr; }
  const TrainerState& state() const override { return state_; }
  void stop_training(bool value) override { stop_ = value; }
  bool stop_training() const override { return stop_; }
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  void barrier(const char*) const override {}
  Checkpoint checkpoint(const CheckpointScope&) override {
    Checkpoint out;
    out.add("model", model_);
    out.add("optimizer", optimizer_);
    return out;
  }
  void restore_backup(const std::string& path) override {
    auto state = checkpoint(CheckpointScope());
    load(state, path);
  }
  const std::string& resumed_from() const override { return resumed_from_; }

 private:
  Mlp model_;
  std::shared_ptr<torch::optim::Optimizer> optimizer_;
  TrainerState state_;
  bool stop_ = false;
  std::string resumed_from_;
};

/// A callback that puts a regular file at `path` once the fit has started (after
/// the callbacks before it checked their directories), so writes under it fail
/// later, at a save.
inline std::shared_ptr<Callback> block_directory_after_start(std::string path) {
  auto block = std::make_shared<LambdaCallback>();
  block->train_begin = [path](const Logs&) { std::ofstream(path) << "a file where a directory should be"; };
  return block;
}

/// A trainer over a fresh Mlp with SGD, cross-entropy and accuracy.
struct Harness {
  Mlp model;
  std::shared_ptr<torch::optim::SGD> optimizer;
  std::unique_ptr<Trainer> trainer;
};
Harness make_setup(double lr = 0.1);

/// Checkpoints kept in memory (deep copies), to run the manager and BackupAndRestore
/// on a storage that is not files.
class MemoryCheckpointIO : public CheckpointIO {
 public:
  void save(const c10::IValue& checkpoint, const std::string& path, const OnCommit& on_commit) override {
    files_[path] = {checkpoint.deepcopy(), ++clock_};
    if (on_commit) on_commit();
  }
  c10::IValue load(const std::string& path) override {
    auto it = files_.find(path);
    if (it == files_.end()) throw CheckpointError("no checkpoint " + path + " in memory");
    return it->second.first.deepcopy();
  }
  void remove(const std::string& path) override { files_.erase(path); }
  std::vector<std::string> list(const std::string&) override {
    std::vector<std::pair<int64_t, std::string>> order;
    for (const auto& [path, file] : files_) order.emplace_back(file.second, path);
    std::sort(order.rbegin(), order.rend());
    std::vector<std::string> out;
    for (auto& [clock, path] : order) out.push_back(path);
    return out;
  }
  std::vector<std::string> paths() const {
    std::vector<std::string> out;
    for (const auto& [path, file] : files_) out.push_back(path);
    return out;
  }

 private:
  std::map<std::string, std::pair<c10::IValue, int64_t>> files_;
  int64_t clock_ = 0;
};

/// Seeds torch and provides a fresh temporary directory per test.
class TorchfitTest : public ::testing::Test {
 protected:
  void SetUp() override;
  void TearDown() override;
  /// Path inside this test's temporary directory.
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  const fs::path& dir() const { return dir_; }
  /// Sorted file names in `sub` (relative to the temp dir).
  std::vector<std::string> files(const std::string& sub = "") const;

  fs::path dir_;
};

/// Captures what the "torchfit" logger prints while alive.
class LogCapture {
 public:
  LogCapture();
  ~LogCapture();
  /// The messages, without pattern decoration.
  std::vector<std::string> lines() const;
  /// All messages joined with newlines.
  std::string text() const;

 private:
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink_;
};

/// Starts this test binary again running only `test` (its output to /dev/null),
/// with `env` ("NAME=value") added to the environment, under `wrapper` (a
/// command such as {"/usr/bin/unshare", "--pid", "--fork"}) when given.
pid_t spawn_self(const std::string& test, const std::vector<std::string>& env,
                 std::vector<std::string> wrapper = {});

/// The bytes of a file.
std::string read_file(const std::string& file);
/// Replaces `file` with `bytes`.
void write_file(const std::string& file, const std::string& bytes);
/// Debian's /usr/bin/python3 with its python3-torch, the interop oracle.
bool have_python_torch();

/// Element-wise equal state dicts (same keys, bitwise equal values).
void expect_same_weights(const torch::nn::Module& a, const torch::nn::Module& b);

}  // namespace torchfit::test
