// A hand-written GAN loop on Fashion-MNIST (after pytorch/examples' cpp/dcgan) over a
// LibTorch data loader, checkpointed with torchfit's engine: two models, two Adam
// optimizers (held by value, with an lr decay by hand), the sampler's epoch order and
// position, the RNG, and the step, epoch and loss tracked by reference, in one
// Checkpoint; a CheckpointManager saving in the background every N steps, keeping the 3
// newest, and resuming from the newest file on start. Kill it at any
// point and run it again: it ends bitwise where an uninterrupted run ends
// (examples/dcgan_resume.sh checks that).
//
//   dcgan [--steps 600] [--save-every 50] [--out dcgan_checkpoints] [--limit 6000]
//         [--final FILE (the end state, for comparing runs)] [--print-steps 1]
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
  int64_t steps = 600, save_every = 50, limit = 6000, print_steps = 0;
  std::string out = "dcgan_checkpoints", cache = "fashion-mnist-cache", final_file;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--steps") steps = std::stoll(value);
    else if (flag == "--save-every") save_every = std::stoll(value);
    else if (flag == "--limit") limit = std::stoll(value);
    else if (flag == "--out") out = value;
    else if (flag == "--cache") cache = value;
    else if (flag == "--final") final_file = value;
    else if (flag == "--print-steps") print_steps = std::stoll(value);
    else {
      std::cerr << "unknown option " << flag << "\n";
      return 2;
    }
  }
  try {
    torch::manual_seed(1);
    auto dir = examples::unpack_fashion_mnist(examples::kDefaultFashionDir, cache);
    auto images = torch::data::datasets::MNIST(dir.string()).images().narrow(0, 0, limit).view({limit, 784}) * 2 - 1;
    const int64_t batch = 64;
    torchfit::RandomSampler sampler(static_cast<size_t>(limit));
    auto loader = torch::data::make_data_loader(
        torch::data::datasets::TensorDataset(images).map(torch::data::transforms::Stack<torch::data::TensorExample>()),
        sampler, torch::data::DataLoaderOptions().batch_size(batch).drop_last(true));

    Generator generator;
    Discriminator discriminator;
    torch::optim::Adam g_opt(generator->parameters(), torch::optim::AdamOptions(2e-4).betas({0.5, 0.999}));
    torch::optim::Adam d_opt(discriminator->parameters(), torch::optim::AdamOptions(2e-4).betas({0.5, 0.999}));
    int64_t step = 0, epoch = 0;
    double g_loss_value = 0;

    // Everything a step changes; captured at each save.
    torchfit::Checkpoint state;
    state.add("generator", generator);
    state.add("discriminator", discriminator);
    state.add("g_opt", g_opt);  // by reference: the optimizers outlive the checkpoint
    state.add("d_opt", d_opt);
    state.add("sampler", sampler);
    state.add_rng();
    state.track("step", step);
    state.track("epoch", epoch);
    state.track("g_loss", g_loss_value);

    torchfit::CheckpointManager manager(
        torchfit::CheckpointOptions(out + "/{step:06d}-{g_loss:.3f}.pt")
            .max_to_keep(3).save_last(true).async_save(true)  // resume from the newest
            .save_freq(torchfit::SaveFreq::batches(save_every))
            .on_commit([](const std::string& path) { torchfit::logger()->info("committed {}", path); }));
    if (auto from = manager.restore_latest(state)) {
      torchfit::logger()->info("resumed from {} at step {} (epoch {})", *from, step, epoch + 1);
    }

    while (step < steps) {
      for (auto& example : *loader) {  // after a restore, the restored epoch continues
        auto real = example.data;
        auto fake = generator->forward(torch::randn({batch, kNoise}));

        d_opt.zero_grad();
        auto d_loss = torch::binary_cross_entropy_with_logits(discriminator->forward(real), torch::ones({batch, 1})) +
                      torch::binary_cross_entropy_with_logits(discriminator->forward(fake.detach()), torch::zeros({batch, 1}));
        d_loss.backward();
        manager.before_update();  // the last save's copy of the state is done
        d_opt.step();

        g_opt.zero_grad();
        auto g_loss = torch::binary_cross_entropy_with_logits(discriminator->forward(fake), torch::ones({batch, 1}));
        g_loss.backward();
        g_opt.step();

        ++step;
        if (step % 200 == 0) {
          decay(g_opt, 0.5);
          decay(d_opt, 0.5);
        }
        g_loss_value = g_loss.item<double>();
        manager.save(state);  // {step} and g_loss from the tracked values
        if (print_steps > 0 && step % print_steps == 0) std::cout << "step " << step << std::endl;
        if (step % 100 == 0) {
          torchfit::logger()->info("step {}: g_loss {:.4f} d_loss {:.4f}", step, g_loss_value, d_loss.item<double>());
        }
        if (step == steps) break;
      }
      if (step < steps) ++epoch;
    }
    manager.wait();
    torchfit::logger()->info("done at step {} (epoch {}); newest {}", step, epoch + 1, manager.last_saved_path());
    if (!final_file.empty()) torchfit::save(state, final_file);
  } catch (const std::exception& e) {
    std::cerr << "dcgan: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
