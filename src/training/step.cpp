// StepContext, and what the Trainer does for a step: the default steps, the
// loss with sample weights, backward/accumulate/clip/step, metric updates.
#include "torchfit/step.h"

#include <c10/util/Type.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/types.h>  // clip_grad.h needs it first
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/optimizer.h>

#include "torchfit/error.h"
#include "torchfit/trainer.h"
#include "training/collectives.h"

namespace torchfit {

StepContext::StepContext(Trainer& trainer, bool training, at::Tensor sample_weight)
    : trainer_(trainer),
      training_(training),
      sample_weight_(std::move(sample_weight)),
      metric_values_(trainer.metrics().size(), 0.0),
      metric_states_(trainer.metrics().size()) {}

torch::nn::Module& StepContext::model() const { return trainer_.model(); }

torch::optim::Optimizer& StepContext::optimizer() const { return trainer_.optimizer(); }

at::Tensor StepContext::forward(const at::Tensor& input) const { return trainer_.forward_checked(input); }

at::Tensor StepContext::compute_loss(const at::Tensor& output, const at::Tensor& target,
                                     const at::Tensor& sample_weight) const {
  return trainer_.compute_loss(output, target, sample_weight);
}

void StepContext::minimize(const at::Tensor& loss) {
  if (!training_) throw ValueError("StepContext::minimize in a test step; record the loss with record_loss");
  trainer_.minimize(*this, loss);
}

void StepContext::minimize(const std::function<at::Tensor()>& closure) {
  if (!training_) throw ValueError("StepContext::minimize in a test step; record the loss with record_loss");
  if (!closure) throw ValueError("StepContext::minimize: the closure is empty");
  trainer_.minimize(*this, closure);
}

void StepContext::record_loss(const at::Tensor& loss) {
  if (!loss.defined() || loss.numel() != 1) {
    throw ValueError(fmt::format("The step's loss must be a scalar; got {}",
                                 loss.defined() ? fmt::format("shape [{}]", fmt::join(loss.sizes(), ", "))
                                                : std::string("an undefined tensor")));
  }
  loss_ = loss.detach();
}

void StepContext::update_metrics(const at::Tensor& output, const at::Tensor& target, const at::Tensor& sample_weight) {
  trainer_.update_metrics(*this, output, target, sample_weight);
}

void Trainer::check_steps(const detail::BatchSource& source, bool training, const char* what) const {
  const auto& custom = training ? train_step_ : test_step_;
  const char* step_name = training ? "train_step" : "test_step";
  const std::string yields = c10::demangle(source.batch_type().name());
  if (custom) {
    if (*custom.batch_type != source.batch_type()) {
      throw ValueError(fmt::format("{}: {} was set for batches of type {}, but the data yields {}", what, step_name,
                                   c10::demangle(custom.batch_type->name()), yields));
    }
    return;
  }
  if (!source.has_tensors()) {
    throw ValueError(fmt::format("{}: the data yields batches of type {}, which the default step cannot read (it "
                                 "takes torch::data::Example<> or vectors of them); set Trainer::{}<{}>(...)",
                                 what, yields, step_name, yields));
  }
  if (!forward_) {
    throw ValueError(fmt::format("{}: the model's forward does not take and return one tensor, so the default step "
                                 "cannot run it; set Trainer::{}<Batch>(...)",
                                 what, step_name));
  }
  if (!loss_) {
    throw ValueError(fmt::format("{}: the Trainer has no loss function; pass one to its constructor, or set "
                                 "Trainer::{}<Batch>(...)",
                                 what, step_name));
  }
}

at::Tensor Trainer::forward_checked(const at::Tensor& x) const {
  if (!forward_) {
    throw ValueError("The model's forward does not take and return one tensor; run it in a custom step");
  }
  return forward_(x);
}

at::Tensor Trainer::compute_loss(const at::Tensor& output, const at::Tensor& target,
                                 const at::Tensor& sample_weight) const {
  if (!loss_) throw ValueError("compute_loss: the Trainer has no loss function; pass one to its constructor");
  auto value = loss_(output, target);
  const int64_t n = output.dim() > 0 ? output.size(0) : 1;
  if (value.dim() == 1 && value.size(0) == n) {  // one value per sample
    if (!sample_weight.defined()) return value.mean();
    auto weights = sample_weight.reshape({-1}).to(value.device(), value.scalar_type());
    if (weights.size(0) != n) {
      throw ValueError(fmt::format("sample_weight has {} values for a batch of {}", weights.size(0), n));
    }
    return (value * weights).sum() / static_cast<double>(n);  // Keras's sum_over_batch_size
  }
  if (value.numel() != 1) {
    throw ValueError(fmt::format(
        "The loss function must return a scalar; got shape [{}] (one value per sample, [{}], works too and can be "
        "weighted)",
        fmt::join(value.sizes(), ", "), n));
  }
  if (sample_weight.defined()) {
    throw ValueError(
        "sample_weight and class_weight need a loss that returns one value per sample, but this one returned a "
        "scalar; build it with reduction none, e.g. cross_entropy(output, target, "
        "torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone))");
  }
  return value.reshape({});
}

void Trainer::default_train_step(StepContext& step, const at::Tensor& x, const at::Tensor& y) {
  at::Tensor output;
  auto loss_of = [&]() -> at::Tensor {
    auto out = forward_checked(x);
    auto loss = compute_loss(out, y, step.sample_weight());
    if (!output.defined()) output = out.detach();  // LBFGS may evaluate more than once; log the first
    return loss;
  };
  if (gradients_.accumulation > 1) {
    minimize(step, loss_of());
  } else {
    minimize(step, std::function<at::Tensor()>(loss_of));
  }
  update_metrics(step, output, y, step.sample_weight());
}

void Trainer::default_test_step(StepContext& step, const at::Tensor& x, const at::Tensor& y) {
  auto output = forward_checked(x);
  step.record_loss(compute_loss(output, y, step.sample_weight()));
  update_metrics(step, output, y, step.sample_weight());
}

Logs Trainer::run_step(StepContext& step, bool training, const detail::Batch& data, const at::Device& device) {
  const auto& custom = training ? train_step_ : test_step_;
  Logs extra;
  if (custom) {
    extra = custom.run(step, data.item);
  } else if (training) {
    default_train_step(step, data.x.to(device), data.y.to(device));
  } else {
    default_test_step(step, data.x.to(device), data.y.to(device));
  }
  if (!step.loss_.defined()) {
    throw ValueError(training ? "train_step recorded no loss: call step.minimize(loss) or step.record_loss(loss)"
                              : "test_step recorded no loss: call step.record_loss(loss)");
  }
  return extra;
}

void Trainer::minimize(StepContext& step, const at::Tensor& loss) {
  step.record_loss(loss);  // checks it is a scalar
  if (dynamic_cast<torch::optim::LBFGS*>(optimizer_.get()) != nullptr) {
    throw ValueError("minimize(loss): LBFGS evaluates the loss several times per step; pass a closure that "
                     "computes it, step.minimize([&] { ...; return loss; })");
  }
  const int64_t n = gradients_.accumulation;
  if (accumulated_ == 0) optimizer_->zero_grad();  // a new window; the last one's stay readable until now
  (n > 1 ? loss / static_cast<double>(n) : loss).backward();
  if (++accumulated_ >= n) apply_gradients();
}

void Trainer::minimize(StepContext& step, const std::function<at::Tensor()>& closure) {
  if (gradients_.accumulation > 1) {
    throw ValueError(fmt::format("minimize(closure) cannot accumulate gradients (gradient_accumulation_steps({})); "
                                 "compute the loss and call minimize(loss)",
                                 gradients_.accumulation));
  }
  optimizer_->step([&]() -> at::Tensor {
    optimizer_->zero_grad();
    auto loss = closure();
    auto first = step.loss_;  // LBFGS may evaluate more than once; log the first
    step.record_loss(loss);   // checks it is a scalar
    if (first.defined()) step.loss_ = first;
    loss.backward();
    finish_gradients();
    return loss;
  });
}

void Trainer::apply_gradients() {
  finish_gradients();
  optimizer_->step();
  accumulated_ = 0;
}

void Trainer::finish_gradients() {
  if (collectives_) collectives_->average_gradients(model_->parameters());
  if (gradients_.clip_norm) torch::nn::utils::clip_grad_norm_(model_->parameters(), *gradients_.clip_norm);
  if (gradients_.clip_value) torch::nn::utils::clip_grad_value_(model_->parameters(), *gradients_.clip_value);
  if (active_callbacks_ != nullptr) active_callbacks_->on_before_update();  // a background save's copy is done
}

void Trainer::update_metrics(StepContext& step, const at::Tensor& output, const at::Tensor& target,
                             const at::Tensor& sample_weight) const {
  at::NoGradGuard no_grad;
  auto out = output.detach();
  step.samples_ = out.dim() > 0 ? out.size(0) : 1;
  for (size_t i = 0; i < metrics_.size(); ++i) {
    const auto& metric = metrics_[i];
    if (metric.stateful) {
      step.metric_states_[i] = metric.stateful->batch_state(out, target, sample_weight);
    } else {
      step.metric_values_[i] = metric.fn(out, target).item<double>();
    }
  }
}

}  // namespace torchfit
