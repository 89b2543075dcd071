#include "torchfit/fit_options.h"

#include <cmath>
#include <utility>

#include <fmt/format.h>

#include "training/tensor_source.h"
#include "torchfit/error.h"

namespace torchfit {

void FitOptions::validate(bool for_loader) const {
  if (for_loader) {
    // As Keras: options that only mean something for tensors are errors, not ignored.
    if (batch_size_set()) {
      throw ValueError(fmt::format(
          "fit: batch_size({}) does not apply to a data loader, which makes its own batches; remove it (for "
          "tensor validation data, set validation_batch_size)",
          batch_size()));
    }
    if (shuffle_set()) {
      throw ValueError(fmt::format(
          "fit: shuffle({}) does not apply to a data loader, which orders its own samples (give it a "
          "RandomSampler or SequentialSampler); remove it",
          shuffle()));
    }
    if (validation_split() != 0.0) {
      throw ValueError(fmt::format(
          "fit: validation_split({}) needs tensor inputs; with a data loader, pass validation_data(loader)",
          validation_split()));
    }
  }
  if (epochs() < 0) throw ValueError(fmt::format("Invalid epochs: {} (must be >= 0)", epochs()));
  if (steps_per_epoch()) detail::check_positive("steps_per_epoch", *steps_per_epoch());
  detail::check_positive("validation_freq", validation_freq());
  if (initial_epoch() && *initial_epoch() < 0) {
    throw ValueError(fmt::format("Invalid initial_epoch: {} (must be >= 0)", *initial_epoch()));
  }
  if (gradient_accumulation_steps() <= 0) {
    throw ValueError(fmt::format("Invalid gradient_accumulation_steps: {} (must be > 0)",
                                 gradient_accumulation_steps()));
  }
  for (auto [name, value] : {std::pair{"clip_grad_norm", clip_grad_norm()},
                             std::pair{"clip_grad_value", clip_grad_value()}}) {
    if (value && !(*value > 0.0)) throw ValueError(fmt::format("Invalid {}: {} (must be > 0)", name, *value));
  }
  for (const auto& [label, weight] : class_weight()) {
    if (label < 0) throw ValueError(fmt::format("class_weight: class {} is negative", label));
    if (!std::isfinite(weight) || weight < 0) {
      throw ValueError(fmt::format("class_weight: the weight of class {} is {} (must be finite and >= 0)", label, weight));
    }
  }
  for (size_t i = 0; i < callbacks().size(); ++i) {
    if (!callbacks()[i]) throw ValueError(fmt::format("fit: callbacks[{}] is null", i));
  }
}

}  // namespace torchfit
