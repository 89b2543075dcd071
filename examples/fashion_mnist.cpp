// Trains a small classifier on Fashion-MNIST with a save-best checkpoint, then
// reloads the best file and reports its test accuracy.
//
//   fashion_mnist [--epochs N] [--limit N] [--data DIR] [--cache DIR] [--out DIR] [--min-accuracy A]
//                 [--verbose 0|1|2]   (1, the default: a live bar on a terminal; 2: a line per epoch)
//
// Data-parallel: examples/launch.sh 2 build/examples/fashion_mnist (each process
// sees WORLD_SIZE and joins the group; rank 0 writes the checkpoint and reports).
//
// The data are Debian's dataset-fashion-mnist gzipped IDX files, unpacked once to
// the cache directory for torch::data::datasets::MNIST.
#include <cstdio>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <torchfit/torchfit.h>

#include "fashion_common.h"

namespace fs = std::filesystem;

namespace {

using examples::Net;

torchfit::Trainer make_trainer(const Net& net) {
  auto adam = std::make_shared<torch::optim::Adam>(net->parameters(), torch::optim::AdamOptions(1e-3));
  auto loss = [](const torch::Tensor& output, const torch::Tensor& target) {
    return torch::nn::functional::cross_entropy(output, target);
  };
  return torchfit::Trainer(net, adam, loss, {torchfit::metrics::accuracy()});
}

}  // namespace

int main(int argc, char** argv) try {
  auto args = examples::parse_args(argc, argv);
  const char* home = std::getenv("HOME");
  auto default_cache = fs::path(home ? home : "/tmp") / ".cache" / "torchfit" / "fashion-mnist";
  auto data_dir = examples::arg(args, "data", "/usr/share/datasets/fashion-mnist");
  auto cache_dir = examples::unpack_fashion_mnist(data_dir, examples::arg(args, "cache", default_cache.string()));
  int64_t limit = std::stoll(examples::arg(args, "limit", "0"));  // train on the first `limit` images (0: all)
  auto out_dir = fs::path(examples::arg(args, "out", "fashion_mnist_checkpoints"));
  int64_t epochs = std::stoll(examples::arg(args, "epochs", "5"));
  double min_accuracy = std::stod(examples::arg(args, "min-accuracy", "0.85"));
  int verbose = std::stoi(examples::arg(args, "verbose", "1"));

  torch::manual_seed(0);
  torch::data::datasets::MNIST train(cache_dir.string(), torch::data::datasets::MNIST::Mode::kTrain);
  torch::data::datasets::MNIST test(cache_dir.string(), torch::data::datasets::MNIST::Mode::kTest);
  torchfit::logger()->info("Fashion-MNIST: {} training and {} test images from {}", train.images().size(0),
               test.images().size(0), cache_dir.string());

  Net net;
  auto trainer = make_trainer(net);
  if (std::getenv("WORLD_SIZE") != nullptr) {
    trainer.set_process_group(torchfit::distributed::init_from_env());
    torchfit::logger()->info("rank {} of {}", trainer.rank(), trainer.world_size());
  }
  auto checkpoint = std::make_shared<torchfit::CheckpointCallback>(
      torchfit::CheckpointOptions((out_dir / "best.pt").string())
          .monitor("val_accuracy")
          .save_best_only(true)
          .verbose(1));
  auto images = limit > 0 ? train.images().narrow(0, 0, limit) : train.images();
  auto targets = limit > 0 ? train.targets().narrow(0, 0, limit) : train.targets();
  auto fit_start = std::chrono::steady_clock::now();
  trainer.fit(images, targets,
              torchfit::FitOptions()
                  .epochs(epochs)
                  .batch_size(128)
                  .validation_split(0.1)
                  .seed(0)
                  .verbose(trainer.is_main_process() ? verbose : 0)
                  .callbacks({checkpoint}));

  double fit_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - fit_start).count();
  torchfit::logger()->info("fit: {:.0f} samples/s over {} process(es)",
               static_cast<double>(images.size(0) * epochs) * 0.9 / fit_seconds, trainer.world_size());
  if (!trainer.is_main_process()) return 0;  // rank 0 reports
  // A fresh model restored from the best checkpoint.
  Net restored;
  auto evaluator = make_trainer(restored);
  evaluator.load_weights(checkpoint->last_saved_path());
  auto logs = evaluator.evaluate(test.images(), test.targets(), 1000);
  torchfit::logger()->info("Best checkpoint {} (val_accuracy {:.4f}): test accuracy {:.4f}, test loss {:.4f}",
               checkpoint->last_saved_path(), checkpoint->best().value_or(0.0), logs.at("accuracy"),
               logs.at("loss"));
  if (logs.at("accuracy") < min_accuracy) {
    torchfit::logger()->error("Test accuracy {:.4f} is below {:.2f}", logs.at("accuracy"), min_accuracy);
    return 1;
  }
  return 0;
} catch (const std::exception& e) {
  torchfit::logger()->error("{}", e.what());
  return 1;
}
