#pragma once
// Reading and setting the learning rate of any LibTorch optimizer.

namespace torch::optim {
class Optimizer;
}

namespace torchfit::detail {

/// The lr of the first param group.
double learning_rate(const torch::optim::Optimizer& optimizer);
/// Sets the lr of every param group.
void set_learning_rate(torch::optim::Optimizer& optimizer, double lr);

}  // namespace torchfit::detail
