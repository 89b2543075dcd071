// Trains two epochs with a checkpoint and reloads it, against an installed torchfit.
#include <cstdio>
#include <filesystem>

#include <torch/torch.h>
#include <torchfit/torchfit.h>

int main(int argc, char** argv) {
  std::string dir = argc > 1 ? argv[1] : "consumer_out";
  auto model = torch::nn::Sequential(torch::nn::Linear(4, 8), torch::nn::ReLU(), torch::nn::Linear(8, 2));
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  torchfit::Trainer trainer(model, sgd, [](const torch::Tensor& out, const torch::Tensor& y) {
    return torch::nn::functional::cross_entropy(out, y);
  }, {torchfit::metrics::accuracy()});
  auto checkpoint = std::make_shared<torchfit::CheckpointCallback>(
      torchfit::CheckpointOptions(dir + "/{epoch:02d}.pt").monitor("loss"));
  auto x = torch::randn({32, 4});
  auto y = (x.sum(1) > 0).to(torch::kLong);
  trainer.fit(x, y, torchfit::FitOptions().epochs(2).batch_size(8).callbacks({checkpoint}));
  trainer.load_weights(checkpoint->last_saved_path());
  bool ok = torchfit::verify_checkpoint(dir + "/02.pt").ok;
  std::printf("consumer: %s\n", ok ? "ok" : "checkpoint did not verify");
  return ok ? 0 : 1;
}
