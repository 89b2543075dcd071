#include "torchfit/metrics.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "torchfit/error.h"

namespace torchfit {

StatefulMetric::StatefulMetric(std::string name, Mode direction, std::vector<int64_t> state_shape)
    : name_(std::move(name)), direction_(direction), state_(at::zeros(state_shape, at::kDouble)) {}

StatefulMetric::~StatefulMetric() = default;

void StatefulMetric::reset() { state_.zero_(); }

void StatefulMetric::update(const at::Tensor& output, const at::Tensor& target, const at::Tensor& sample_weight) {
  state_.add_(batch_state(output, target, sample_weight));
}

void StatefulMetric::set_state(const at::Tensor& state) {
  if (!state.defined() || state.sizes() != state_.sizes()) {
    throw ValueError(fmt::format("metric '{}': a state of shape [{}] does not fit its shape [{}]", name_,
                                 state.defined() ? fmt::format("{}", fmt::join(state.sizes(), ", ")) : "undefined",
                                 fmt::join(state_.sizes(), ", ")));
  }
  state_.copy_(state);
}

Metric::Metric(std::shared_ptr<StatefulMetric> metric)
    : name(metric ? metric->name() : std::string()),
      direction(metric ? metric->direction() : Mode::Max),
      stateful(std::move(metric)) {}

namespace metrics {
namespace {

/// Per-sample weights as a double CPU vector of `n` (ones when undefined).
at::Tensor weights_of(const at::Tensor& sample_weight, int64_t n, const std::string& metric) {
  if (!sample_weight.defined()) return at::ones({n}, at::kDouble);
  auto weights = sample_weight.reshape({-1}).to(at::kCPU, at::kDouble);
  if (weights.size(0) != n) {
    throw ValueError(fmt::format("metric '{}': {} sample weights for a batch of {}", metric, weights.size(0), n));
  }
  return weights;
}

/// The class index of each target: indices [N], one-hot [N, C], or 0/1 values for a single score.
at::Tensor target_classes(const at::Tensor& output, const at::Tensor& target) {
  const bool scores = output.dim() >= 2 && output.size(-1) > 1;
  if (scores) return (target.sizes() == output.sizes() ? target.argmax(-1) : target).reshape({-1}).to(at::kLong);
  return (target.reshape({-1}) > 0.5).to(at::kLong);
}

/// Counts [C, C]: rows the true class, columns the predicted one.
class ConfusionCounts : public StatefulMetric {
 public:
  ConfusionCounts(std::string name, int64_t classes)
      : StatefulMetric(std::move(name), Mode::Max, {check_classes(classes), classes}), classes_(classes) {}

  at::Tensor batch_state(const at::Tensor& output, const at::Tensor& target,
                         const at::Tensor& sample_weight) const override {
    const bool scores = output.dim() >= 2 && output.size(-1) > 1;
    if (scores && output.size(-1) != classes_) {
      throw ValueError(fmt::format("metric '{}' counts {} classes, but the model output has {} class scores",
                                   name(), classes_, output.size(-1)));
    }
    if (!scores && classes_ != 2) {
      throw ValueError(fmt::format("metric '{}' counts {} classes, but the model output has one score per sample "
                                   "(binary: make the metric with 2 classes)",
                                   name(), classes_));
    }
    auto predicted = (scores ? output.argmax(-1) : (output > 0.5)).reshape({-1}).to(at::kCPU, at::kLong);
    auto truth = target_classes(output, target).to(at::kCPU);
    if (truth.size(0) != predicted.size(0)) {
      throw ValueError(fmt::format("metric '{}': {} targets for {} predictions", name(), truth.size(0),
                                   predicted.size(0)));
    }
    if (truth.numel() > 0 && (truth.min().item<int64_t>() < 0 || truth.max().item<int64_t>() >= classes_)) {
      auto bad = truth.min().item<int64_t>() < 0 ? truth.min().item<int64_t>() : truth.max().item<int64_t>();
      throw ValueError(fmt::format("metric '{}': target class {} is outside [0, {})", name(), bad, classes_));
    }
    auto counts = at::zeros({classes_ * classes_}, at::kDouble);
    counts.index_add_(0, truth * classes_ + predicted, weights_of(sample_weight, truth.size(0), name()));
    return counts.view({classes_, classes_});
  }

 protected:
  /// Per-class precision (by column) or recall (by row); 0 where nothing was counted.
  static at::Tensor ratio(const at::Tensor& counts, int64_t dim) {
    auto hits = counts.diagonal();
    auto total = counts.sum(dim);
    return at::where(total > 0, hits / total.clamp_min(1e-300), at::zeros_like(hits));
  }
  /// Classes that occur among targets or predictions: a macro average is over these (as scikit-learn's).
  static at::Tensor seen(const at::Tensor& counts) { return (counts.sum(0) + counts.sum(1)) > 0; }

  int64_t classes_;

 private:
  static int64_t check_classes(int64_t classes) {
    if (classes < 2) throw ValueError(fmt::format("Invalid num_classes: {} (must be >= 2)", classes));
    return classes;
  }
};

class ConfusionMatrix final : public ConfusionCounts {
 public:
  using ConfusionCounts::ConfusionCounts;
  at::Tensor result_of(const at::Tensor& state) const override { return state.clone(); }
};

/// Precision, recall or F1 from the counts, per class or macro-averaged.
class ClassScore final : public ConfusionCounts {
 public:
  enum class Kind { Precision, Recall, F1 };
  ClassScore(std::string name, int64_t classes, Kind kind, Average average)
      : ConfusionCounts(std::move(name), classes), kind_(kind), average_(average) {}

  at::Tensor result_of(const at::Tensor& state) const override {
    auto precision = ratio(state, 0), recall = ratio(state, 1);
    at::Tensor per_class = kind_ == Kind::Precision ? precision : kind_ == Kind::Recall ? recall : [&] {
      auto sum = precision + recall;
      return at::where(sum > 0, 2 * precision * recall / sum.clamp_min(1e-300), at::zeros_like(sum));
    }();
    if (average_ == Average::PerClass) return per_class;
    auto mask = seen(state);
    auto count = mask.sum().item<int64_t>();
    return count == 0 ? at::zeros({}, at::kDouble) : per_class.masked_select(mask).mean();
  }

 private:
  Kind kind_;
  Average average_;
};

class TopKAccuracy final : public StatefulMetric {
 public:
  explicit TopKAccuracy(int64_t k)
      : StatefulMetric(fmt::format("top_{}_accuracy", k), Mode::Max, {2}), k_(k) {
    if (k < 1) throw ValueError(fmt::format("Invalid k: {} (must be >= 1)", k));
  }

  at::Tensor batch_state(const at::Tensor& output, const at::Tensor& target,
                         const at::Tensor& sample_weight) const override {
    if (output.dim() < 2 || output.size(-1) < k_) {
      throw ValueError(fmt::format("metric '{}' needs class scores [N, C] with C >= {}; got shape [{}]", name(), k_,
                                   fmt::join(output.sizes(), ", ")));
    }
    auto top = std::get<1>(output.topk(k_, -1)).reshape({-1, k_}).to(at::kCPU);
    auto truth = target_classes(output, target).to(at::kCPU);
    auto hit = top.eq(truth.unsqueeze(1)).any(1).to(at::kDouble);
    auto weights = weights_of(sample_weight, hit.size(0), name());
    return at::stack({(hit * weights).sum(), weights.sum()});
  }
  at::Tensor result_of(const at::Tensor& state) const override {
    return state[1].item<double>() > 0 ? state[0] / state[1] : at::zeros({}, at::kDouble);
  }

 private:
  int64_t k_;
};

}  // namespace

Metric accuracy() {
  auto fn = [](const at::Tensor& output, const at::Tensor& target) {
    at::Tensor predicted, expected;
    if (output.dim() >= 2 && output.size(-1) > 1) {
      predicted = output.argmax(-1);
      expected = target.sizes() == output.sizes() ? target.argmax(-1) : target.reshape(predicted.sizes());
    } else {
      predicted = output.reshape({-1}) > 0.5;
      expected = target.reshape({-1}) > 0.5;
    }
    return predicted.eq(expected).to(at::kDouble).mean();
  };
  return {"accuracy", fn, Mode::Max};
}

Metric mse() {
  auto fn = [](const at::Tensor& output, const at::Tensor& target) {
    return (output - target.reshape(output.sizes())).pow(2).to(at::kDouble).mean();
  };
  return {"mse", fn, Mode::Min};
}

Metric mae() {
  auto fn = [](const at::Tensor& output, const at::Tensor& target) {
    return (output - target.reshape(output.sizes())).abs().to(at::kDouble).mean();
  };
  return {"mae", fn, Mode::Min};
}

Metric precision(int64_t num_classes, Average average) {
  return Metric(std::make_shared<ClassScore>("precision", num_classes, ClassScore::Kind::Precision, average));
}

Metric recall(int64_t num_classes, Average average) {
  return Metric(std::make_shared<ClassScore>("recall", num_classes, ClassScore::Kind::Recall, average));
}

Metric f1_score(int64_t num_classes, Average average) {
  return Metric(std::make_shared<ClassScore>("f1_score", num_classes, ClassScore::Kind::F1, average));
}

Metric confusion_matrix(int64_t num_classes) {
  return Metric(std::make_shared<ConfusionMatrix>("confusion_matrix", num_classes));
}

Metric top_k_accuracy(int64_t k) { return Metric(std::make_shared<TopKAccuracy>(k)); }

}  // namespace metrics
}  // namespace torchfit
