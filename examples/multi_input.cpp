// A two-input model trained with a custom step: each Fashion-MNIST image is cut
// into its left and right halves, which two towers read before a shared head.
// The step adds a weight penalty to the loss and logs it, the default step's
// gradient clipping applies, and a stateful macro-F1 (exact over each epoch)
// picks the checkpoint to keep.
//
//   multi_input [--epochs N] [--limit N] [--data DIR] [--cache DIR] [--out DIR]
//               [--min-f1 F] [--verbose 0|1|2]
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <torchfit/torchfit.h>

#include "fashion_common.h"

namespace fs = std::filesystem;

namespace {

/// The two halves of an image and its label.
struct HalvesExample {
  torch::Tensor left, right, label;
};
/// A loader of these without Stack<> yields vectors of them.
using HalvesBatch = std::vector<HalvesExample>;

class Halves : public torch::data::datasets::Dataset<Halves, HalvesExample> {
 public:
  Halves(torch::Tensor images, torch::Tensor labels) : images_(std::move(images)), labels_(std::move(labels)) {}
  HalvesExample get(size_t i) override {
    auto image = images_[static_cast<int64_t>(i)][0];  // [28, 28]
    return {image.narrow(1, 0, 14).flatten(), image.narrow(1, 14, 14).flatten(), labels_[static_cast<int64_t>(i)]};
  }
  torch::optional<size_t> size() const override { return static_cast<size_t>(images_.size(0)); }

 private:
  torch::Tensor images_, labels_;
};

/// Two inputs, two outputs: class scores, and the features the head saw.
struct TwoTowersImpl : torch::nn::Module {
  TwoTowersImpl()
      : left(register_module("left", torch::nn::Linear(392, 128))),
        right(register_module("right", torch::nn::Linear(392, 128))),
        head(register_module("head", torch::nn::Linear(256, 10))) {}
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& a, const torch::Tensor& b) {
    auto features = torch::relu(torch::cat({left(a), right(b)}, 1));
    return {head(features), features};
  }
  torch::Tensor penalty() {
    torch::Tensor sum = torch::zeros({});
    for (const auto& p : parameters()) sum = sum + p.pow(2).sum();
    return sum;
  }
  torch::nn::Linear left, right, head;
};
TORCH_MODULE(TwoTowers);

torch::Tensor stacked(const HalvesBatch& batch, torch::Tensor HalvesExample::*part) {
  std::vector<torch::Tensor> parts;
  parts.reserve(batch.size());
  for (const auto& example : batch) parts.push_back(example.*part);
  return torch::stack(parts);
}

}  // namespace

int main(int argc, char** argv) try {
  auto args = examples::parse_args(argc, argv);
  const char* home = std::getenv("HOME");
  auto cache = examples::unpack_fashion_mnist(
      examples::arg(args, "data", examples::kDefaultFashionDir),
      examples::arg(args, "cache", (fs::path(home ? home : "/tmp") / ".cache" / "torchfit" / "fashion-mnist").string()));
  const int64_t limit = std::stoll(examples::arg(args, "limit", "0"));
  const int64_t epochs = std::stoll(examples::arg(args, "epochs", "3"));
  const double min_f1 = std::stod(examples::arg(args, "min-f1", "0.8"));
  const int verbose = std::stoi(examples::arg(args, "verbose", "1"));
  const fs::path out = examples::arg(args, "out", "multi_input_checkpoints");

  torch::manual_seed(0);
  torch::data::datasets::MNIST train(cache.string(), torch::data::datasets::MNIST::Mode::kTrain);
  torch::data::datasets::MNIST test(cache.string(), torch::data::datasets::MNIST::Mode::kTest);
  auto images = limit > 0 ? train.images().narrow(0, 0, limit) : train.images();
  auto labels = limit > 0 ? train.targets().narrow(0, 0, limit) : train.targets();
  auto train_loader = torch::data::make_data_loader(Halves(images, labels),
                                                    torch::data::DataLoaderOptions().batch_size(128));
  auto test_loader = torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(
      Halves(test.images(), test.targets()), torch::data::DataLoaderOptions().batch_size(1000));

  TwoTowers model;
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-3));
  // No loss function: the steps compute it.
  torchfit::Trainer trainer(model, adam, nullptr, {torchfit::metrics::accuracy(), torchfit::metrics::f1_score(10)});
  auto scores_of = [&model](const HalvesBatch& batch) {
    return std::get<0>(model->forward(stacked(batch, &HalvesExample::left), stacked(batch, &HalvesExample::right)));
  };
  trainer.train_step<HalvesBatch>([&](torchfit::StepContext& step, const HalvesBatch& batch) {
    auto labels = stacked(batch, &HalvesExample::label);
    auto [scores, features] =
        model->forward(stacked(batch, &HalvesExample::left), stacked(batch, &HalvesExample::right));
    auto penalty = 1e-5 * model->penalty();
    step.minimize(torch::nn::functional::cross_entropy(scores, labels) + penalty);
    step.update_metrics(scores, labels);
    return torchfit::Logs{{"penalty", penalty.item<double>()},
                          {"active", (features > 0).to(torch::kFloat).mean().item<double>()}};
  });
  trainer.test_step<HalvesBatch>([&](torchfit::StepContext& step, const HalvesBatch& batch) {
    auto labels = stacked(batch, &HalvesExample::label);
    auto scores = scores_of(batch);
    step.record_loss(torch::nn::functional::cross_entropy(scores, labels));
    step.update_metrics(scores, labels);
  });
  trainer.predict_step<HalvesBatch>(scores_of);

  auto best = std::make_shared<torchfit::CheckpointCallback>(
      torchfit::CheckpointOptions((out / "best.pt").string()).monitor("val_f1_score").save_best_only(true).verbose(1));
  trainer.fit(*train_loader, torchfit::FitOptions()
                                 .epochs(epochs)
                                 .validation_data(*test_loader)
                                 .clip_grad_norm(1.0)
                                 .verbose(verbose)
                                 .callbacks({best}));

  trainer.load_weights(best->last_saved_path());
  auto logs = trainer.evaluate(*test_loader);
  auto predicted = trainer.predict(*test_loader).argmax(1);
  torchfit::logger()->info("Best checkpoint {}: test macro-F1 {:.4f}, accuracy {:.4f} ({} test images)",
                           best->last_saved_path(), logs.at("f1_score"), logs.at("accuracy"), predicted.size(0));
  if (logs.at("f1_score") < min_f1) {
    torchfit::logger()->error("Test macro-F1 {:.4f} is below {:.2f}", logs.at("f1_score"), min_f1);
    return 1;
  }
  return 0;
} catch (const std::exception& e) {
  torchfit::logger()->error("{}", e.what());
  return 1;
}
