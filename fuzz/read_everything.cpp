#include "read_everything.h"

#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <stdexcept>

#include <fmt/format.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/sgd.h>

#include "format/libtorch_pickle.h"
#include "format/optimizer_state.h"
#include "format/state_dict.h"
#include "torchfit/engine/checkpoint_manager.h"
#include "torchfit/trainer.h"
#include "torchfit/engine/checkpoint.h"
#include "torchfit/error.h"
#include "torchfit/serialize.h"

namespace torchfit::fuzz {
namespace {

/// Everything a failed load must leave as it was: the model's tensors, each optimizer's state
/// and options, the generator's state and the checkpoint's values.
struct Fingerprint {
  std::vector<at::Tensor> tensors;
  std::vector<double> numbers;
  bool operator==(const Fingerprint& other) const {
    if (tensors.size() != other.tensors.size() || numbers.size() != other.numbers.size()) return false;
    for (size_t i = 0; i < numbers.size(); ++i) {
      if (std::memcmp(&numbers[i], &other.numbers[i], sizeof(double)) != 0) return false;
    }
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (!bitwise_equal(tensors[i], other.tensors[i])) return false;
    }
    return true;
  }
  // Bitwise: a file may have put NaNs in by an earlier, successful load, and NaN != NaN.
  static bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
    if (a.defined() != b.defined()) return false;
    if (!a.defined()) return true;
    if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
    auto x = a.contiguous(), y = b.contiguous();
    return std::memcmp(x.data_ptr(), y.data_ptr(), x.numel() * x.element_size()) == 0;
  }
};

/// Model, optimizers and whatever else one entry point reads into.
struct Target {
  std::function<void(Fingerprint&)> fingerprint;
  Fingerprint take() const {
    Fingerprint out;
    fingerprint(out);
    return out;
  }
};

void add_module(Fingerprint& out, const torch::nn::Module& model) {
  for (const auto& t : model.parameters()) out.tensors.push_back(t.detach().clone());
  for (const auto& t : model.buffers()) out.tensors.push_back(t.detach().clone());
}

void add_optimizer(Fingerprint& out, const torch::optim::Optimizer& optimizer) {
  detail::for_each_tensor(detail::optimizer_state_dict(optimizer),
                          [&](const at::Tensor& t) { out.tensors.push_back(t.clone()); });
  out.numbers.push_back(static_cast<double>(optimizer.state().size()));
  for (const auto& group : optimizer.param_groups()) out.numbers.push_back(group.options().get_lr());
}

/// A small model with an optimizer of type `Opt` that has taken a step, so it has state a bad
/// load could damage.
template <typename Opt, typename Options>
std::shared_ptr<Opt> stepped(torch::nn::Linear& model, Options options) {
  auto optimizer = std::make_shared<Opt>(model->parameters(), options);
  auto closure = [&] {
    optimizer->zero_grad();
    auto loss = model->forward(torch::ones({1, kInFeatures})).sum();
    loss.backward();
    return loss;
  };
  optimizer->step(closure);
  return optimizer;
}

/// A storage holding the input as its one checkpoint, under the fixed name kManagedPath: the record
/// a manager keeps in its files is keyed by its template, so a seed's record is read whatever path
/// the input was written to.
class OneFileIO : public CheckpointIO {
 public:
  explicit OneFileIO(std::string file) : file_(std::move(file)) {}
  void save(const c10::IValue&, const std::string& path, const OnCommit&) override {
    throw CheckpointError("the fuzz storage is read-only: " + path);
  }
  c10::IValue load(const std::string&) override { return FileCheckpointIO().load(file_); }
  void remove(const std::string&) override {}
  std::vector<std::string> list(const std::string&) override { return {"fuzz/e1.pt"}; }

 private:
  std::string file_;
};

}  // namespace

std::string read_everything(const std::string& path) {
  torch::manual_seed(0);
  torch::nn::Linear model(kInFeatures, kOutFeatures);
  auto adam = stepped<torch::optim::Adam>(model, torch::optim::AdamOptions(1e-3));
  auto& optimizer = *adam;
  auto sgd = stepped<torch::optim::SGD>(model, torch::optim::SGDOptions(0.1).momentum(0.9));
  auto lbfgs = stepped<torch::optim::LBFGS>(model, torch::optim::LBFGSOptions(0.5).max_iter(3));
  const Target model_and_adam{[&](Fingerprint& out) {
    add_module(out, *model);
    add_optimizer(out, optimizer);
  }};

  std::string problems;
  auto run = [&](const char* reader, const Target& target, const std::function<void()>& read) {
    auto before = target.take();
    try {
      read();
      return;
    } catch (const CheckpointError&) {
    } catch (const std::exception& e) {
      problems += fmt::format("{} threw a non-CheckpointError: {}\n", reader, e.what());
    } catch (...) {
      problems += fmt::format("{} threw something that is not an exception\n", reader);
    }
    if (!(target.take() == before)) problems += fmt::format("{} failed but changed what it loads into\n", reader);
  };
  (void)verify_checkpoint(path);  // noexcept: a throw terminates
  run("read_weights", model_and_adam, [&] { (void)read_weights(path); });
  run("read_weights(key)", model_and_adam, [&] { (void)read_weights(path, "model"); });
  run("load_weights", model_and_adam, [&] { load_weights(*model, path); });
  run("load_weights(key)", model_and_adam, [&] { load_weights(*model, path, "model"); });
  run("load_checkpoint", model_and_adam, [&] { (void)load_checkpoint(*model, optimizer, path); });

  // torchfit::load into checkpoints of every item kind.
  Checkpoint with_rng;
  with_rng.add("model", model);
  with_rng.add("optimizer", adam);
  with_rng.add_rng();
  with_rng.set("epoch", int64_t{3});
  const Target with_rng_target{[&](Fingerprint& out) {
    model_and_adam.fingerprint(out);
    out.tensors.push_back(at::detail::getDefaultCPUGenerator().get_state());
    out.numbers.push_back(static_cast<double>(with_rng.get<int64_t>("epoch")));
  }};
  run("load(model, Adam, rng, values)", with_rng_target, [&] { load(with_rng, path); });
  auto load_with = [&](const char* reader, const auto& optimizer) {
    Checkpoint checkpoint;
    checkpoint.add("model", model);
    checkpoint.add("optimizer", optimizer);
    run(reader, Target{[&](Fingerprint& out) {
          add_module(out, *model);
          add_optimizer(out, *optimizer);
        }},
        [&] { load(checkpoint, path); });
  };
  load_with("load(model, SGD)", sgd);
  load_with("load(model, LBFGS)", lbfgs);

  Trainer trainer(model.ptr(), adam, [](const at::Tensor& out, const at::Tensor& y) { return (out - y).pow(2).mean(); });
  run("Trainer::load_checkpoint", Target{[&](Fingerprint& out) {
        model_and_adam.fingerprint(out);
        out.numbers.push_back(static_cast<double>(trainer.state().global_step));
        out.numbers.push_back(static_cast<double>(trainer.state().epoch));
      }},
      [&] { trainer.load_checkpoint(path); });

  // restore_latest, with the manager's record the file may hold.
  run("CheckpointManager::restore_latest", with_rng_target, [&] {
    CheckpointManager manager(CheckpointOptions(kManagedTemplate).io(std::make_shared<OneFileIO>(path)));
    (void)manager.restore_latest(with_rng);
  });

  // The reader of LibTorch's pickles only ever sees checksummed files, which
  // mutations rarely make: it reads the raw bytes too (fuzz/corpus/pickles seeds them).
  run("read_libtorch_pickle", model_and_adam, [&] {
    std::ifstream in(path, std::ios::binary);
    std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    try {
      (void)detail::read_libtorch_pickle(bytes);
    } catch (const std::invalid_argument&) {  // refused, saying why, as it should be
    }
  });
  return problems;
}

}  // namespace torchfit::fuzz
