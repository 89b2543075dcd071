#pragma once
/// \file
/// `FitOptions`: the arguments of `Trainer::fit` (Keras's `fit(...)`), with chainable setters.
///
///     trainer.fit(x, y, torchfit::FitOptions().epochs(10).batch_size(128).validation_split(0.1)
///                           .callbacks({checkpoint}));

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "torchfit/arg.h"
#include "torchfit/detail/batch_source.h"

namespace torchfit {

class Callback;

/// Options of `Trainer::fit`, with chainable setters.
class FitOptions {
 public:
  /// Weights by class index.
  using ClassWeights = std::map<int64_t, double>;

  /// Run until this many epochs in total have completed (as Keras's `epochs`).
  TORCHFIT_ARG(int64_t, epochs) = 1;
  /// Seed of the per-epoch shuffle; by default drawn from torch's global generator.
  TORCHFIT_ARG(std::optional<uint64_t>, seed);
  /// Fraction of the tensor inputs, taken from the end before shuffling, held out
  /// for validation. Must be in [0, 1); not for data loaders.
  TORCHFIT_ARG(double, validation_split) = 0.0;
  /// As Keras: batches per epoch. The data is not restarted at each epoch: the
  /// next epoch continues where this one stopped, and a pass that runs out ends
  /// its epoch early (with a warning) and starts again in the next. By default
  /// an epoch is one pass.
  TORCHFIT_ARG(std::optional<int64_t>, steps_per_epoch);
  /// As Keras: validate after every `value`-th epoch (epochs value, 2 * value, ...).
  TORCHFIT_ARG(int64_t, validation_freq) = 1;
  /// Per-sample weights of tensor inputs [N], as Keras's `sample_weight`: they
  /// weigh each sample's loss (the loss must return one value per sample) and
  /// are passed to stateful metrics.
  TORCHFIT_ARG(at::Tensor, sample_weight);
  /// Weights by target class, as Keras's `class_weight`: each training sample's
  /// weight is multiplied by its class's (every class met must be listed).
  TORCHFIT_ARG(ClassWeights, class_weight);
  /// Default step (and `StepContext::minimize`): rescale the gradients so that
  /// their global L2 norm is at most `max_norm` (`torch::nn::utils::clip_grad_norm_`).
  TORCHFIT_ARG(std::optional<double>, clip_grad_norm);
  /// Clamp each gradient element into [-value, value] (`clip_grad_value_`).
  TORCHFIT_ARG(std::optional<double>, clip_grad_value);
  /// Sum the gradients of `n` batches (each loss divided by n) before each
  /// optimizer step, as Keras 3's optimizer option. An epoch's leftover batches
  /// step at its end.
  TORCHFIT_ARG(int64_t, gradient_accumulation_steps) = 1;
  TORCHFIT_ARG(std::vector<std::shared_ptr<Callback>>, callbacks);
  /// Epoch to start at. By default 0, or the epoch restored by `Trainer::load_checkpoint`.
  TORCHFIT_ARG(std::optional<int64_t>, initial_epoch);
  /// 0: silent, 1: progress, 2: one line per epoch.
  TORCHFIT_ARG(int, verbose) = 0;

  // Options whose setters do more than store a value.
 public:
  /// Samples per batch of tensor inputs (a data loader batches itself: setting it
  /// for one is a ValueError). Also the validation batch size, unless set below.
  FitOptions& batch_size(int64_t value) {
    batch_size_ = value;
    batch_size_set_ = true;
    return *this;
  }
  /// Shuffle tensor inputs before each epoch (a ValueError for data loaders).
  FitOptions& shuffle(bool value) {
    shuffle_ = value;
    shuffle_set_ = true;
    return *this;
  }
  FitOptions& validation_data(at::Tensor x, at::Tensor y) {
    validation_data_ = std::make_pair(std::move(x), std::move(y));
    validation_loader_.reset();
    return *this;
  }
  /// Validates on a LibTorch data loader (or a pointer to one), which must outlive the fit.
  template <typename Loader, typename = std::enable_if_t<detail::is_loader<Loader>::value>>
  FitOptions& validation_data(Loader& loader) {
    validation_loader_ = detail::make_loader_source(loader);
    validation_data_.reset();
    return *this;
  }
  /// Batch size of tensor validation data; by default `batch_size`.
  FitOptions& validation_batch_size(int64_t value) { validation_batch_size_ = value; return *this; }

  int64_t batch_size() const { return batch_size_; }
  bool shuffle() const { return shuffle_; }
  const std::optional<std::pair<at::Tensor, at::Tensor>>& validation_data() const {
    return validation_data_;
  }
  /// The validation loader, if one was given.
  const std::shared_ptr<detail::BatchSource>& validation_loader() const { return validation_loader_; }
  int64_t validation_batch_size() const { return validation_batch_size_.value_or(batch_size_); }
  /// Whether `batch_size` / `shuffle` were set (they are errors for data loaders).
  bool batch_size_set() const { return batch_size_set_; }
  bool shuffle_set() const { return shuffle_set_; }

  /// Throws `ValueError` naming the first bad option: out of range, or (`for_loader`) one that
  /// only means something for tensor inputs. `Trainer::fit` calls it before anything runs.
  void validate(bool for_loader) const;

 private:
  int64_t batch_size_ = 32;
  bool batch_size_set_ = false;
  bool shuffle_ = true;
  bool shuffle_set_ = false;
  std::optional<std::pair<at::Tensor, at::Tensor>> validation_data_;
  std::shared_ptr<detail::BatchSource> validation_loader_;
  std::optional<int64_t> validation_batch_size_;
};

}  // namespace torchfit
