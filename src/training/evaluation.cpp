// Trainer::evaluate and Trainer::predict.
#include "torchfit/trainer.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include "training/collectives.h"
#include "training/mode_guard.h"
#include "training/running_means.h"
#include "training/tensor_source.h"
#include "torchfit/error.h"

namespace torchfit {

std::unique_ptr<detail::BatchSource> Trainer::evaluation_source(const at::Tensor& x, const at::Tensor& y,
                                                                int64_t batch_size, const at::Tensor& weights) const {
  using detail::TensorSource;
  if (!collectives_) return std::make_unique<TensorSource>(x, y, batch_size, TensorSource::Order(), std::nullopt, weights);
  // Each rank evaluates a contiguous shard; evaluate_source sums the totals.
  int64_t chunk = (x.size(0) + world_size() - 1) / world_size();
  int64_t start = std::min(x.size(0), chunk * rank());
  int64_t length = std::min(chunk, x.size(0) - start);
  return std::make_unique<TensorSource>(x.narrow(0, start, length), y.narrow(0, start, length), batch_size,
                                        TensorSource::Order(), std::nullopt,
                                        weights.defined() ? weights.narrow(0, start, length) : weights);
}

Logs Trainer::evaluate(const at::Tensor& x, const at::Tensor& y, int64_t batch_size, const at::Tensor& sample_weight) {
  detail::check_pair(x, y, "evaluate");
  detail::check_positive("batch_size", batch_size);
  if (sample_weight.defined() && (sample_weight.dim() != 1 || sample_weight.size(0) != x.size(0))) {
    throw ValueError(fmt::format("evaluate: sample_weight must have one value per sample ([{}]); got shape [{}]",
                                 x.size(0), fmt::join(sample_weight.sizes(), ", ")));
  }
  CallbackList none;
  return evaluate_source(*evaluation_source(x, y, batch_size, sample_weight), none);
}

Logs Trainer::evaluate_source(detail::BatchSource& source, CallbackList& callbacks) {
  check_steps(source, /*training=*/false, "evaluate");
  detail::ModeGuard eval_mode(*model_, false);
  at::NoGradGuard no_grad;
  const at::Device device = detail::model_device(*model_);
  Logs sums;
  double weight = 0;
  std::map<std::string, std::vector<double>> states;
  detail::RunningMeans means(metrics_, sums, weight, states);
  callbacks.on_test_begin({});
  source.begin_pass(0);
  int64_t batch = 0;
  detail::Batch data;
  while (source.next(data)) {
    callbacks.on_test_batch_begin(batch, {});
    StepContext step(*this, /*training=*/false, data.sample_weight);
    const Logs extra = run_step(step, /*training=*/false, data, device);
    means.add(static_cast<double>(std::max<int64_t>(step.samples_, 1)), step.loss_.item<double>(), step.metric_values_,
              step.metric_states_, extra);
    callbacks.on_test_batch_end(batch, means.logs());
    ++batch;
  }
  if (collectives_) means.reduce_totals(*collectives_);  // shards may hold different batch counts
  if (weight == 0) throw ValueError("evaluate: the data yielded no batches");
  Logs logs = means.logs();
  means.store_in_metrics();
  callbacks.on_test_end(logs);
  return logs;
}

at::Tensor Trainer::predict(const at::Tensor& x, int64_t batch_size) {
  if (!x.defined() || x.dim() == 0 || x.size(0) == 0) {
    throw ValueError("predict: x must be a non-empty tensor with a batch dimension");
  }
  detail::check_positive("batch_size", batch_size);
  detail::TensorSource source(x, x, batch_size);  // no targets; the second is not read
  return predict_source(source);
}

at::Tensor Trainer::predict_source(detail::BatchSource& source) {
  if (predict_step_) {
    if (*predict_step_.batch_type != source.batch_type()) {
      throw ValueError(fmt::format("predict: predict_step was set for batches of type {}, but the data yields {}",
                                   c10::demangle(predict_step_.batch_type->name()),
                                   c10::demangle(source.batch_type().name())));
    }
  } else if (!source.has_tensors()) {
    throw ValueError(fmt::format("predict: the data yields batches of type {}, which the default step cannot read; "
                                 "set Trainer::predict_step<{}>(...)",
                                 c10::demangle(source.batch_type().name()), c10::demangle(source.batch_type().name())));
  }
  detail::ModeGuard eval_mode(*model_, false);
  at::NoGradGuard no_grad;
  const at::Device device = detail::model_device(*model_);
  std::vector<at::Tensor> outputs;
  source.begin_pass(0);
  detail::Batch data;
  while (source.next(data)) {
    outputs.push_back(predict_step_ ? predict_step_.run(data.item) : forward_checked(data.x.to(device)));
  }
  if (outputs.empty()) throw ValueError("predict: the data yielded no batches");
  return at::cat(outputs);
}

}  // namespace torchfit
