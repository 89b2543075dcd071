#include "read_everything.h"

#include <fstream>
#include <functional>
#include <iterator>
#include <stdexcept>

#include <fmt/format.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>

#include "format/libtorch_pickle.h"
#include "torchfit/engine/checkpoint.h"
#include "torchfit/error.h"
#include "torchfit/serialize.h"

namespace torchfit::fuzz {
namespace {

/// Model and optimizer values, to tell whether a failed load changed anything.
struct Fingerprint {
  std::vector<at::Tensor> tensors;
  static Fingerprint of(const torch::nn::Module& model, const torch::optim::Optimizer& optimizer) {
    Fingerprint out;
    for (const auto& t : model.parameters()) out.tensors.push_back(t.detach().clone());
    for (const auto& t : model.buffers()) out.tensors.push_back(t.detach().clone());
    for (const auto& [key, state] : optimizer.state()) {
      auto& adam = static_cast<const torch::optim::AdamParamState&>(*state);
      out.tensors.push_back(adam.exp_avg().clone());
      out.tensors.push_back(adam.exp_avg_sq().clone());
    }
    return out;
  }
  bool operator==(const Fingerprint& other) const {
    if (tensors.size() != other.tensors.size()) return false;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (!tensors[i].equal(other.tensors[i])) return false;
    }
    return true;
  }
};

}  // namespace

std::string read_everything(const std::string& path) {
  torch::manual_seed(0);
  torch::nn::Linear model(kInFeatures, kOutFeatures);
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-3));
  auto& optimizer = *adam;
  // One step, so the optimizer has state a bad load could damage.
  model->forward(torch::ones({1, kInFeatures})).sum().backward();
  optimizer.step();

  std::string problems;
  auto run = [&](const char* reader, const std::function<void()>& read) {
    auto before = Fingerprint::of(*model, optimizer);
    try {
      read();
      return;
    } catch (const CheckpointError&) {
    } catch (const std::exception& e) {
      problems += fmt::format("{} threw a non-CheckpointError: {}\n", reader, e.what());
    } catch (...) {
      problems += fmt::format("{} threw something that is not an exception\n", reader);
    }
    if (!(Fingerprint::of(*model, optimizer) == before)) {
      problems += fmt::format("{} failed but changed the model or optimizer\n", reader);
    }
  };
  (void)verify_checkpoint(path);  // noexcept: a throw terminates
  run("read_weights", [&] { (void)read_weights(path); });
  run("read_weights(key)", [&] { (void)read_weights(path, "model"); });
  run("load_weights", [&] { load_weights(*model, path); });
  run("load_weights(key)", [&] { load_weights(*model, path, "model"); });
  run("load", [&] {
    Checkpoint checkpoint;
    checkpoint.add("model", model);
    checkpoint.add("optimizer", adam);
    load(checkpoint, path);
  });
  run("load_checkpoint", [&] { (void)load_checkpoint(*model, optimizer, path); });
  // The reader of LibTorch's pickles only ever sees checksummed files, which
  // mutations rarely make: it reads the raw bytes too (fuzz/corpus/pickles seeds them).
  run("read_libtorch_pickle", [&] {
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
