#pragma once
/// \file
/// Training progress, as kept by Trainer and saved in full checkpoints.
///
///     const torchfit::TrainerState& progress = trainer.state();  // epoch, global_step, batch_in_epoch, ...

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace torchfit {

/// A callback's state in torchfit 0.1's text form (see `Callback::state`).
using CallbackState = std::map<std::string, std::string>;

struct TrainerState {
  /// Epochs fully completed.
  int64_t epoch = 0;
  /// Batches trained on in total (optimizer steps, unless gradients are accumulated).
  int64_t global_step = 0;
  /// Batches completed within the current, unfinished epoch.
  int64_t batch_in_epoch = 0;
  /// Where the training data stands when `steps_per_epoch` cuts epochs out of
  /// passes over it: the pass, and the batches of it read. Unset (files of
  /// torchfit 0.1 and 0.2) means epoch-aligned: `epoch` and `batch_in_epoch`.
  std::optional<int64_t> data_pass;
  std::optional<int64_t> batch_in_pass;
  /// Seed of the running fit's per-epoch shuffle order.
  uint64_t seed = 0;
  /// Batch-size-weighted sums of the current epoch's logs so far, and their weight.
  std::map<std::string, double> epoch_sums;
  double epoch_weight = 0;
  /// The current epoch's sums of each stateful metric (`StatefulMetric::state`, flattened).
  std::map<std::string, std::vector<double>> metric_states;
  /// State of torch's default CPU generator (dropout and other random ops);
  /// filled by `Trainer::checkpoint_state`.
  std::vector<uint8_t> rng_state;
};

}  // namespace torchfit
