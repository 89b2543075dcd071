#include "training/learning_rate.h"

#include <torch/optim/optimizer.h>

#include "torchfit/error.h"

namespace torchfit::detail {

double learning_rate(const torch::optim::Optimizer& optimizer) {
  const auto& groups = optimizer.param_groups();
  if (groups.empty()) throw ValueError("The optimizer has no param groups, so no learning rate");
  return groups.front().options().get_lr();
}

void set_learning_rate(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
}

}  // namespace torchfit::detail
