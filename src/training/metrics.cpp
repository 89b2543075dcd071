#include "torchfit/metrics.h"

#include <ATen/ATen.h>

namespace torchfit {

namespace metrics {

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

}  // namespace metrics
}  // namespace torchfit
