#pragma once
/// \file
/// Metrics computed per batch and averaged over an epoch, weighted by batch size.
///
///     std::vector<torchfit::Metric> metrics{torchfit::metrics::accuracy()};
///     torchfit::Metric custom{"top_error", my_fn, torchfit::Mode::Min};

#include <functional>
#include <string>

#include <ATen/core/Tensor.h>

#include "torchfit/mode.h"

namespace torchfit {

/// A named metric: `fn(output, target)` returns the batch mean as a scalar tensor,
/// and `direction` (Min or Max) says whether lower or higher is better. Monitor
/// callbacks in `Mode::Auto` read the direction from here.
struct Metric {
  using Fn = std::function<at::Tensor(const at::Tensor& output, const at::Tensor& target)>;
  std::string name;
  Fn fn;
  Mode direction = Mode::Max;
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

}  // namespace metrics
}  // namespace torchfit
