#pragma once
// The synthetic training workload fit_bench and ddp_bench share.

#include <cstdint>
#include <utility>

#include <torch/torch.h>

namespace torchfit::bench {

/// MLP 784-hidden-hidden-10.
inline torch::nn::Sequential make_mlp(int64_t hidden) {
  return torch::nn::Sequential(torch::nn::Linear(784, hidden), torch::nn::ReLU(), torch::nn::Linear(hidden, hidden),
                               torch::nn::ReLU(), torch::nn::Linear(hidden, 10));
}

/// `samples` random 784-feature inputs with 10-class labels (seeded).
inline std::pair<torch::Tensor, torch::Tensor> make_samples(int64_t samples) {
  torch::manual_seed(0);
  return {torch::randn({samples, 784}), torch::randint(0, 10, {samples})};
}

inline torch::Tensor cross_entropy(const torch::Tensor& output, const torch::Tensor& target) {
  return torch::nn::functional::cross_entropy(output, target);
}

}  // namespace torchfit::bench
