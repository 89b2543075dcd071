// C++ <-> Python with torchfit checkpoints, on Fashion-MNIST.
//
//   interop train <dir>      trains in C++; writes <dir>/from_cpp.pt (weights only) for Python
//   interop evaluate <dir>   evaluates <dir>/from_python.pt, written by interop.py train
//
// See interop.sh for the round trip.
#include <cstdlib>
#include <filesystem>
#include <string>

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <torchfit/torchfit.h>

#include "fashion_common.h"

namespace fs = std::filesystem;
using torchfit::FitOptions;

int main(int argc, char** argv) try {
  if (argc != 3 || (std::string(argv[1]) != "train" && std::string(argv[1]) != "evaluate")) {
    torchfit::logger()->error("usage: interop train|evaluate <dir>");
    return 2;
  }
  std::string mode = argv[1];
  fs::path dir = argv[2];
  auto cache = examples::unpack_fashion_mnist(examples::kDefaultFashionDir, dir / "data");
  torch::data::datasets::MNIST train(cache.string(), torch::data::datasets::MNIST::Mode::kTrain);
  torch::data::datasets::MNIST test(cache.string(), torch::data::datasets::MNIST::Mode::kTest);

  torch::manual_seed(0);
  examples::Net net;
  auto adam = std::make_shared<torch::optim::Adam>(net->parameters(), 1e-3);
  torchfit::Trainer trainer(net, adam, [](const torch::Tensor& out, const torch::Tensor& y) {
    return torch::nn::functional::cross_entropy(out, y);
  }, {torchfit::metrics::accuracy()});

  if (mode == "train") {
    auto checkpoint = std::make_shared<torchfit::CheckpointCallback>(
        torchfit::CheckpointOptions((dir / "from_cpp.pt").string()).monitor("loss").save_weights_only(true));
    trainer.fit(train.images().narrow(0, 0, 10000), train.targets().narrow(0, 0, 10000),
                FitOptions().epochs(2).batch_size(64).seed(0).callbacks({checkpoint}));
  } else {
    trainer.load_weights((dir / "from_python.pt").string());
  }
  auto logs = trainer.evaluate(test.images(), test.targets(), 1000);
  torchfit::logger()->info("C++ {}: test accuracy {:.4f}", mode == "train" ? "trained" : "evaluated Python's model",
               logs.at("accuracy"));
  return logs.at("accuracy") > 0.7 ? 0 : 1;
} catch (const std::exception& e) {
  torchfit::logger()->error("{}", e.what());
  return 1;
}
