#pragma once
/// \file
/// Metrics: batch means averaged over an epoch (a function per batch), and
/// stateful metrics computed exactly over the epoch (Keras's `Metric` with
/// `reset_state`/`update_state`/`result`).
///
///     std::vector<torchfit::Metric> metrics{torchfit::metrics::accuracy(),
///                                           torchfit::metrics::f1_score(10),
///                                           torchfit::metrics::recall(10, torchfit::metrics::Average::PerClass)};
///     torchfit::Metric custom{"top_error", my_fn, torchfit::Mode::Min};

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "torchfit/mode.h"

namespace torchfit {

/// A metric whose value over an epoch is a function of sums over its batches:
/// `update` adds a batch's contribution to `state()`, `result()` turns the sums
/// into the value. So it is exact over the epoch (not a mean of batch values),
/// and ranks and checkpoints combine it by adding and storing the sums.
class StatefulMetric {
 public:
  virtual ~StatefulMetric();

  const std::string& name() const { return name_; }
  /// Whether higher (Max) or lower (Min) is better.
  Mode direction() const { return direction_; }

  /// Forgets every batch.
  void reset();
  /// Adds a batch: model `output` and `target` (and optional per-sample weights).
  void update(const at::Tensor& output, const at::Tensor& target, const at::Tensor& sample_weight = {});
  /// The value over the batches since `reset`: a scalar, one value per class, or a matrix.
  at::Tensor result() const { return result_of(state_); }

  /// The sums (double, on the CPU) and the value a state gives; what the Trainer
  /// uses to keep one state per pass, add states across ranks and checkpoint them.
  const at::Tensor& state() const { return state_; }
  void set_state(const at::Tensor& state);
  /// One batch's contribution to the state (same shape), before any adding.
  virtual at::Tensor batch_state(const at::Tensor& output, const at::Tensor& target,
                                 const at::Tensor& sample_weight) const = 0;
  virtual at::Tensor result_of(const at::Tensor& state) const = 0;

 protected:
  /// `state_shape` is the shape of the sums.
  StatefulMetric(std::string name, Mode direction, std::vector<int64_t> state_shape);

 private:
  std::string name_;
  Mode direction_;
  at::Tensor state_;
};

/// A named metric for `Trainer`. Either `fn(output, target)` returns the batch
/// mean as a scalar tensor (averaged over the epoch, weighted by batch size,
/// and not by sample weights, as Keras's `metrics`), or `stateful` computes it
/// exactly over the epoch (it receives the sample weights). `direction` (Min or
/// Max) says whether lower or higher is better; monitor callbacks in
/// `Mode::Auto` read it from here.
///
/// A stateful metric's result is logged under `name` when it is a scalar, as
/// `name_0`, `name_1`, ... when it has one value per class, and not at all when
/// it is a matrix (a confusion matrix: read it from the metric after `evaluate`).
/// Assign `name` to log a metric under another name (say, both a macro and a
/// per-class recall).
struct Metric {
  using Fn = std::function<at::Tensor(const at::Tensor& output, const at::Tensor& target)>;

  Metric() = default;
  Metric(std::string name, Fn fn, Mode direction = Mode::Max)
      : name(std::move(name)), fn(std::move(fn)), direction(direction) {}
  /// Takes its name and direction from `stateful`.
  Metric(std::shared_ptr<StatefulMetric> stateful);  // NOLINT: implicit, so a list can mix both kinds

  std::string name;
  Fn fn;
  Mode direction = Mode::Max;
  std::shared_ptr<StatefulMetric> stateful;
};

namespace metrics {

/// "accuracy" (maximised). Class scores [N, C] against class indices [N] or one-hot
/// targets [N, C]; a single score per sample [N] or [N, 1] is a binary
/// probability thresholded at 0.5, against 0/1 targets.
Metric accuracy();
/// "mse": mean squared error (minimised).
Metric mse();
/// "mae": mean absolute error (minimised).
Metric mae();

/// How a per-class metric is summarised.
enum class Average {
  Macro,     ///< the unweighted mean over the classes
  PerClass,  ///< one value per class
};

/// Predictions are the arg-max of class scores [N, C] (or a single score per
/// sample thresholded at 0.5, as two classes); targets are class indices [N]
/// or one-hot [N, C]. A class never predicted (precision) or never present
/// (recall) scores 0, as scikit-learn's zero_division=0. Sample weights weigh
/// each sample's count.

/// "precision" (maximised): true positives over predicted positives, per class.
Metric precision(int64_t num_classes, Average average = Average::Macro);
/// "recall" (maximised): true positives over actual positives, per class.
Metric recall(int64_t num_classes, Average average = Average::Macro);
/// "f1_score" (maximised): the harmonic mean of precision and recall, per class.
Metric f1_score(int64_t num_classes, Average average = Average::Macro);
/// "confusion_matrix": counts [num_classes, num_classes], rows the true class,
/// columns the predicted one. Not logged; read `result()` after `evaluate`.
Metric confusion_matrix(int64_t num_classes);
/// "top_5_accuracy" for k = 5 (maximised): the share of samples whose target is
/// among the k highest scores.
Metric top_k_accuracy(int64_t k);

}  // namespace metrics
}  // namespace torchfit
