// A hand-written GAN loop on Fashion-MNIST (after pytorch/examples' cpp/dcgan),
// checkpointed with torchfit's engine: two models, two Adam optimizers with an lr
// decay, the RNG and the step in one Checkpoint; a CheckpointManager saving in the
// background every N steps, keeping the 3 best by generator loss, and resuming
// from the newest file on start. Kill it at any point and run it again.
//
//   dcgan [--steps 600] [--save-every 50] [--out dcgan_checkpoints] [--limit 6000]
#include <cstdlib>
#include <iostream>
#include <string>

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <torchfit/torchfit.h>

#include "fashion_common.h"

namespace {

constexpr int64_t kNoise = 32;

struct GeneratorImpl : torch::nn::Module {
  GeneratorImpl()
      : net(register_module("net", torch::nn::Sequential(torch::nn::Linear(kNoise, 128), torch::nn::ReLU(),
                                                         torch::nn::Linear(128, 784), torch::nn::Tanh()))) {}
  torch::Tensor forward(const torch::Tensor& z) { return net->forward(z); }
  torch::nn::Sequential net;
};
TORCH_MODULE(Generator);

struct DiscriminatorImpl : torch::nn::Module {
  DiscriminatorImpl()
      : net(register_module("net", torch::nn::Sequential(torch::nn::Linear(784, 128), torch::nn::LeakyReLU(
                                                             torch::nn::LeakyReLUOptions().negative_slope(0.2)),
                                                         torch::nn::Linear(128, 1)))) {}
  torch::Tensor forward(const torch::Tensor& x) { return net->forward(x); }
  torch::nn::Sequential net;
};
TORCH_MODULE(Discriminator);

/// The lr decay, applied by hand: it is part of each optimizer's saved options.
void decay(torch::optim::Optimizer& optimizer, double factor) {
  for (auto& group : optimizer.param_groups()) group.options().set_lr(group.options().get_lr() * factor);
}

}  // namespace

int main(int argc, char** argv) {
  int64_t steps = 600, save_every = 50, limit = 6000;
  std::string out = "dcgan_checkpoints", cache = "fashion-mnist-cache";
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--steps") steps = std::stoll(value);
    else if (flag == "--save-every") save_every = std::stoll(value);
    else if (flag == "--limit") limit = std::stoll(value);
    else if (flag == "--out") out = value;
    else if (flag == "--cache") cache = value;
    else {
      std::cerr << "unknown option " << flag << "\n";
      return 2;
    }
  }
  try {
    torch::manual_seed(1);
    auto dir = examples::unpack_fashion_mnist(examples::kDefaultFashionDir, cache);
    auto images = torch::data::datasets::MNIST(dir.string()).images().narrow(0, 0, limit).view({limit, 784}) * 2 - 1;

    Generator generator;
    Discriminator discriminator;
    auto g_opt = std::make_shared<torch::optim::Adam>(generator->parameters(),
                                                      torch::optim::AdamOptions(2e-4).betas({0.5, 0.999}));
    auto d_opt = std::make_shared<torch::optim::Adam>(discriminator->parameters(),
                                                      torch::optim::AdamOptions(2e-4).betas({0.5, 0.999}));

    torchfit::Checkpoint state;
    state.add("generator", generator);
    state.add("discriminator", discriminator);
    state.add("g_opt", g_opt);
    state.add("d_opt", d_opt);
    state.add_rng();
    state.set("step", int64_t{0});

    torchfit::CheckpointManager manager(
        torchfit::CheckpointOptions(out + "/{step:06d}-{g_loss:.3f}.pt")
            .monitor("g_loss").mode(torchfit::Mode::Min).save_top_k(3).save_last(true).async_save(true)
            .save_freq(torchfit::SaveFreq::batches(save_every)));
    if (auto from = manager.restore_latest(state)) {
      torchfit::logger()->info("resumed from {} at step {}", *from, state.get<int64_t>("step"));
    }

    const int64_t batch = 64;
    for (int64_t step = state.get<int64_t>("step"); step < steps;) {
      auto index = torch::randint(images.size(0), {batch}, torch::kLong);
      auto real = images.index_select(0, index);
      auto fake = generator->forward(torch::randn({batch, kNoise}));

      d_opt->zero_grad();
      auto d_loss = torch::binary_cross_entropy_with_logits(discriminator->forward(real), torch::ones({batch, 1})) +
                    torch::binary_cross_entropy_with_logits(discriminator->forward(fake.detach()), torch::zeros({batch, 1}));
      d_loss.backward();
      d_opt->step();

      g_opt->zero_grad();
      auto g_loss = torch::binary_cross_entropy_with_logits(discriminator->forward(fake), torch::ones({batch, 1}));
      g_loss.backward();
      g_opt->step();

      ++step;
      if (step % 200 == 0) {
        decay(*g_opt, 0.5);
        decay(*d_opt, 0.5);
      }
      state.set("step", step);
      manager.save(state, {{"step", double(step)}, {"g_loss", g_loss.item<double>()}, {"d_loss", d_loss.item<double>()}});
      if (step % 100 == 0) {
        torchfit::logger()->info("step {}: g_loss {:.4f} d_loss {:.4f}", step, g_loss.item<double>(), d_loss.item<double>());
      }
    }
    manager.wait();
    torchfit::logger()->info("done; best generator loss {:.4f}; newest {}", manager.best().value_or(NAN),
                             manager.last_saved_path());
  } catch (const std::exception& e) {
    std::cerr << "dcgan: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
