#pragma once
// The epoch's running logs, kept outside the fit loop so checkpoints can carry them.

#include <map>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <fmt/format.h>

#include "torchfit/error.h"
#include "torchfit/logs.h"
#include "torchfit/metrics.h"
#include "torchfit/trainer_state.h"
#include "training/collectives.h"

namespace torchfit::detail {

/// The epoch's logs so far: batch-size-weighted means of the loss, the mean
/// metrics and a step's extra logs, as Keras logs them, and each stateful
/// metric's sums. All are kept outside (so checkpoints can carry them).
class RunningMeans {
 public:
  /// With `collectives`, each batch's contribution is summed over the ranks
  /// first, so every rank holds the same sums.
  RunningMeans(const std::vector<Metric>& metrics, Logs& sums, double& weight,
               std::map<std::string, std::vector<double>>& states, detail::Collectives* collectives = nullptr)
      : metrics_(metrics), sums_(sums), weight_(weight), states_(states), collectives_(collectives) {
    // Every key from the start: ranks with no batches reduce the same vector.
    sums_["loss"] += 0.0;
    for (const auto& metric : metrics_) {
      if (!metric.stateful) {
        sums_[metric.name] += 0.0;
        continue;
      }
      auto& state = states_[metric.name];
      auto size = static_cast<size_t>(metric.stateful->state().numel());
      if (state.size() != size) state.assign(size, 0.0);
    }
  }

  /// Adds one step: `n` samples, its loss, each metric's value (mean metrics) or
  /// state (stateful ones; undefined if not updated), and extra logs.
  void add(double n, double loss, const std::vector<double>& values, const std::vector<at::Tensor>& states,
           const Logs& extra) {
    std::vector<double> batch{n, loss * n};
    for (size_t i = 0; i < metrics_.size(); ++i) {
      if (!metrics_[i].stateful) batch.push_back(values[i] * n);
    }
    for (const auto& entry : extra) batch.push_back(entry.second * n);
    for (size_t i = 0; i < metrics_.size(); ++i) {
      if (!metrics_[i].stateful) continue;
      const size_t size = states_[metrics_[i].name].size();
      if (!states[i].defined()) {
        batch.insert(batch.end(), size, 0.0);
        continue;
      }
      auto flat = states[i].reshape({-1}).to(at::kCPU, at::kDouble).contiguous();
      batch.insert(batch.end(), flat.data_ptr<double>(), flat.data_ptr<double>() + flat.numel());
    }
    if (collectives_ != nullptr) batch = reduced_with(*collectives_, batch, "batch logs allreduce");
    size_t at = 0;
    weight_ += batch[at++];
    sums_["loss"] += batch[at++];
    for (const auto& metric : metrics_) {
      if (!metric.stateful) sums_[metric.name] += batch[at++];
    }
    for (const auto& entry : extra) sums_[entry.first] += batch[at++];
    for (const auto& metric : metrics_) {
      if (!metric.stateful) continue;
      for (auto& value : states_[metric.name]) value += batch[at++];
    }
  }

  /// Sums the accumulated values over the ranks once (for evaluation, whose
  /// shards may hold different batch counts).
  void reduce_totals(detail::Collectives& collectives) {
    std::vector<double> totals{weight_};
    for (const auto& [name, sum] : sums_) totals.push_back(sum);
    for (const auto& [name, state] : states_) totals.insert(totals.end(), state.begin(), state.end());
    totals = reduced_with(collectives, totals, "evaluation logs allreduce");
    weight_ = totals[0];
    size_t i = 1;
    for (auto& [name, sum] : sums_) sum = totals[i++];
    for (auto& [name, state] : states_) {
      for (auto& value : state) value = totals[i++];
    }
  }

  Logs logs() const {
    Logs out;
    for (const auto& [name, sum] : sums_) out[name] = sum / weight_;
    for (const auto& metric : metrics_) {
      if (!metric.stateful) continue;
      auto result = metric.stateful->result_of(state_of(metric));
      if (result.dim() == 0) {
        out[metric.name] = result.item<double>();
      } else if (result.dim() == 1) {  // per class
        for (int64_t i = 0; i < result.size(0); ++i) out[fmt::format("{}_{}", metric.name, i)] = result[i].item<double>();
      }
    }
    return out;
  }

  /// Hands each stateful metric its sums, so the last pass's can be read from it (a confusion matrix).
  void store_in_metrics() const {
    for (const auto& metric : metrics_) {
      if (metric.stateful) metric.stateful->set_state(state_of(metric));
    }
  }

 private:
  at::Tensor state_of(const Metric& metric) const {
    auto& values = states_.at(metric.name);
    return at::tensor(values, at::kDouble).view(metric.stateful->state().sizes());
  }
  static std::vector<double> reduced_with(detail::Collectives& collectives, const std::vector<double>& values,
                                          const char* what) {
    auto tensor = at::tensor(values, at::kDouble);
    collectives.allreduce_sum(tensor, what);
    return {tensor.data_ptr<double>(), tensor.data_ptr<double>() + tensor.numel()};
  }

  const std::vector<Metric>& metrics_;
  Logs& sums_;
  double& weight_;
  std::map<std::string, std::vector<double>>& states_;
  detail::Collectives* collectives_;
};

}  // namespace torchfit::detail
