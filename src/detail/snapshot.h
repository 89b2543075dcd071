#pragma once
// Reusable CPU copies of what a checkpoint holds, taken on the training thread so
// a background writer can serialize them while training goes on.

#include <memory>

#include "detail/module_tree.h"

namespace torch::optim {
class Optimizer;
}

namespace torchfit::detail {

class Snapshot {
 public:
  Snapshot();
  ~Snapshot();

  /// Copies the module's parameters and buffers into the reusable buffers.
  void capture_model(const torch::nn::Module& module);
  /// Copies the optimizer's param groups and state into a shadow optimizer of the
  /// same type whose tensors are reusable buffers. Returns false, capturing
  /// nothing, for types whose state it does not know (it knows SGD, Adam, AdamW,
  /// RMSprop and Adagrad).
  bool capture_optimizer(const torch::optim::Optimizer& optimizer);

  const ModuleTree& model() const { return model_; }
  const torch::optim::Optimizer& optimizer() const { return *optimizer_; }

 private:
  ModuleTree model_;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
};

}  // namespace torchfit::detail
