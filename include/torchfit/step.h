#pragma once
/// \file
/// Custom steps, as Keras 3's `train_step`/`test_step` overrides: a function the
/// Trainer calls with each batch the data yields. It runs the model, and hands
/// the loss and outputs to its `StepContext`, which does the rest as the
/// default step would (backward, gradient averaging across ranks, clipping,
/// accumulation, the optimizer step, metrics and logs).
///
///     trainer.train_step<PairBatch>([&](torchfit::StepContext& step, const PairBatch& batch) {
///       auto scores = model->forward(batch.left, batch.right);
///       auto penalty = 1e-4 * model->l2();
///       step.minimize(torch::nn::functional::cross_entropy(scores, batch.label) + penalty);
///       step.update_metrics(scores, batch.label);
///       return torchfit::Logs{{"penalty", penalty.item<double>()}};   // optional extra logs
///     });

#include <cstdint>
#include <functional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "torchfit/logs.h"

namespace torch::nn {
class Module;
}
namespace torch::optim {
class Optimizer;
}

namespace torchfit {

class Trainer;

/// What a step sees of the Trainer for one batch.
class StepContext {
 public:
  torch::nn::Module& model() const;
  torch::optim::Optimizer& optimizer() const;
  /// True in training steps, false in test steps (evaluation).
  bool training() const { return training_; }
  /// The batch's sample weights (from `FitOptions::sample_weight` and
  /// `class_weight`, or `evaluate`'s); undefined when there are none.
  const at::Tensor& sample_weight() const { return sample_weight_; }

  /// The model's `Tensor forward(Tensor)`; a ValueError for other models.
  at::Tensor forward(const at::Tensor& input) const;
  /// The Trainer's loss function on a batch. A loss that returns one value per
  /// sample is reduced as Keras does: weighted by `sample_weight` when given,
  /// then summed and divided by the batch size.
  at::Tensor compute_loss(const at::Tensor& output, const at::Tensor& target,
                          const at::Tensor& sample_weight = {}) const;

  /// Training steps: backpropagates `loss` and, once every
  /// `gradient_accumulation_steps` batches, averages the gradients across ranks,
  /// clips them (`clip_grad_norm`, `clip_grad_value`) and steps the optimizer.
  /// Records `loss` as the batch's "loss". For optimizers that evaluate the
  /// loss more than once per step (LBFGS), use the closure form.
  void minimize(const at::Tensor& loss);
  /// The same with a closure that computes the loss from scratch, forward
  /// included; the optimizer calls it as often as it needs (at least once).
  /// Records the first loss. Cannot accumulate gradients.
  void minimize(const std::function<at::Tensor()>& closure);
  /// Records the batch's "loss" without training: test steps, and training
  /// steps that update the model themselves.
  void record_loss(const at::Tensor& loss);
  /// Updates the Trainer's metrics with the batch; its size (`output.size(0)`)
  /// weighs the batch in the epoch's means. Call it once per step.
  void update_metrics(const at::Tensor& output, const at::Tensor& target, const at::Tensor& sample_weight = {});

 private:
  friend class Trainer;
  StepContext(Trainer& trainer, bool training, at::Tensor sample_weight);

  Trainer& trainer_;
  bool training_;
  at::Tensor sample_weight_;
  // What the step recorded, for the epoch's logs.
  at::Tensor loss_;  // detached; read once the step is done (no device sync inside it)
  int64_t samples_ = 0;
  std::vector<double> metric_values_;      // each mean metric's batch value (0 for stateful ones)
  std::vector<at::Tensor> metric_states_;  // each stateful metric's batch contribution
};

}  // namespace torchfit
