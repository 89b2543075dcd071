#pragma once
// Tensor inputs as a batch source, and the checks and weights of tensor inputs.

#include <cstdint>
#include <functional>
#include <map>
#include <optional>

#include <ATen/ATen.h>

#include "torchfit/detail/batch_source.h"

namespace torchfit::detail {

/// Throws `ValueError` unless x and y are defined, batched, non-empty and of one length.
void check_pair(const at::Tensor& x, const at::Tensor& y, const char* what);
/// Throws `ValueError`: "Invalid <option>: <value> (must be > 0)".
void check_positive(const char* option, int64_t value);
/// A batch's per-sample weights: its own (sample_weight) times its classes' (class_weight).
at::Tensor weights_of(const Batch& batch, const std::map<int64_t, double>& class_weight);

/// Tensor inputs in batches: in order, or in an order made per pass (shuffled, sharded).
class TensorSource final : public BatchSource {
 public:
  /// The sample indices of a pass; empty means all samples in order.
  using Order = std::function<at::Tensor(int64_t pass)>;
  /// `samples` is the length of each pass (a shard's, padded); `weights` are per-sample weights, if any.
  TensorSource(at::Tensor x, at::Tensor y, int64_t batch_size, Order order = {}, std::optional<int64_t> samples = {},
               at::Tensor weights = {})
      : x_(std::move(x)),
        y_(std::move(y)),
        weights_(std::move(weights)),
        batch_size_(batch_size),
        order_of_(std::move(order)),
        samples_(samples.value_or(x_.size(0))) {}

  void begin_pass(int64_t pass) override {
    order_ = order_of_ ? order_of_(pass) : at::Tensor();
    position_ = 0;
  }
  bool next(Batch& batch) override {
    const int64_t n = length();
    if (position_ >= n) return false;
    const int64_t count = std::min(batch_size_, n - position_);
    auto take = [&](const at::Tensor& all) {
      if (!all.defined()) return at::Tensor();
      if (!order_.defined()) return all.narrow(0, position_, count);
      return all.index_select(0, order_.narrow(0, position_, count).to(all.device()));
    };
    batch.x = take(x_);
    batch.y = take(y_);
    batch.sample_weight = take(weights_);
    example_ = torch::data::Example<at::Tensor, at::Tensor>(batch.x, batch.y);
    batch.item = &example_;
    position_ += count;
    return true;
  }
  int64_t skip(int64_t count) override {
    const int64_t left = (length() - position_ + batch_size_ - 1) / batch_size_;
    const int64_t skipped = std::min(count, std::max<int64_t>(left, 0));
    position_ = std::min(length(), position_ + skipped * batch_size_);
    return skipped;
  }
  std::optional<int64_t> batches_per_pass() const override { return (samples_ + batch_size_ - 1) / batch_size_; }
  const std::type_info& batch_type() const override { return typeid(torch::data::Example<at::Tensor, at::Tensor>); }
  bool has_tensors() const override { return true; }

 private:
  int64_t length() const { return order_.defined() ? order_.size(0) : x_.size(0); }

  at::Tensor x_, y_, weights_;
  int64_t batch_size_;
  Order order_of_;
  int64_t samples_;
  at::Tensor order_;
  int64_t position_ = 0;
  torch::data::Example<at::Tensor, at::Tensor> example_;
};

}  // namespace torchfit::detail
