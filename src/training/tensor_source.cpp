#include "training/tensor_source.h"

#include <limits>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

/// Each sample's weight from its target class: class indices [N], one-hot [N, C] or 0/1 values.
at::Tensor class_weights_of(const at::Tensor& y, const std::map<int64_t, double>& weights) {
  auto classes = (y.dim() >= 2 && y.size(-1) > 1 ? y.argmax(-1) : y).reshape({-1}).to(at::kCPU, at::kLong);
  auto table = at::full({weights.rbegin()->first + 1}, std::numeric_limits<double>::quiet_NaN(), at::kDouble);
  for (const auto& [label, weight] : weights) table[label] = weight;
  auto bad = (classes < 0) | (classes >= table.size(0));
  if (!bad.any().item<bool>()) bad = table.index_select(0, classes).isnan();
  if (bad.any().item<bool>()) {
    std::vector<int64_t> known;
    for (const auto& entry : weights) known.push_back(entry.first);
    throw ValueError(fmt::format("class_weight has no weight for class {} (it has classes {})",
                                 classes.masked_select(bad)[0].item<int64_t>(), fmt::join(known, ", ")));
  }
  return table.index_select(0, classes);
}

}  // namespace

void check_pair(const at::Tensor& x, const at::Tensor& y, const char* what) {
  if (!x.defined() || !y.defined()) throw ValueError(fmt::format("{}: x and y must be defined tensors", what));
  if (x.dim() == 0 || y.dim() == 0) {
    throw ValueError(fmt::format("{}: x and y need a batch dimension; got x of shape [{}] and y of shape [{}]",
                                 what, fmt::join(x.sizes(), ", "), fmt::join(y.sizes(), ", ")));
  }
  if (x.size(0) != y.size(0)) {
    throw ValueError(fmt::format("{}: x and y have different lengths: x has {} samples, y has {}",
                                 what, x.size(0), y.size(0)));
  }
  if (x.size(0) == 0) throw ValueError(fmt::format("{}: the dataset is empty (0 samples)", what));
}

void check_positive(const char* option, int64_t value) {
  if (value <= 0) throw ValueError(fmt::format("Invalid {}: {} (must be > 0)", option, value));
}

at::Tensor weights_of(const Batch& batch, const std::map<int64_t, double>& class_weight) {
  if (class_weight.empty()) return batch.sample_weight;
  auto weights = class_weights_of(batch.y, class_weight);
  return batch.sample_weight.defined() ? batch.sample_weight.reshape({-1}).to(at::kCPU, at::kDouble) * weights
                                       : weights;
}

BatchSource::~BatchSource() = default;

int64_t BatchSource::skip(int64_t count) {
  Batch batch;
  int64_t skipped = 0;
  while (skipped < count && next(batch)) ++skipped;
  return skipped;
}

std::pair<at::Tensor, at::Tensor> stack_examples(
    const std::vector<torch::data::Example<at::Tensor, at::Tensor>>& examples) {
  std::vector<at::Tensor> xs, ys;
  xs.reserve(examples.size());
  ys.reserve(examples.size());
  for (const auto& example : examples) {
    xs.push_back(example.data);
    ys.push_back(example.target);
  }
  return {at::stack(xs), at::stack(ys)};
}

}  // namespace torchfit::detail
