#pragma once
// Scope guards of the fit loop and evaluation, and the device a module lives on.

#include <torch/nn/module.h>

namespace torchfit::detail {

/// Sets the module's train/eval mode and restores the previous one on exit.
class ModeGuard {
 public:
  ModeGuard(torch::nn::Module& module, bool training)
      : module_(module), was_training_(module.is_training()) {
    module_.train(training);
  }
  ~ModeGuard() { module_.train(was_training_); }

 private:
  torch::nn::Module& module_;
  bool was_training_;
};

/// Clears a pointer when the scope ends.
template <typename T>
class ScopedPointer {
 public:
  ScopedPointer(T*& slot, T* value) : slot_(slot) { slot_ = value; }
  ~ScopedPointer() { slot_ = nullptr; }

 private:
  T*& slot_;
};

inline at::Device model_device(const torch::nn::Module& module) {
  auto params = module.parameters();
  return params.empty() ? at::Device(at::kCPU) : params.front().device();
}

}  // namespace torchfit::detail
