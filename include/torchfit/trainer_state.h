#pragma once
/// \file
/// Training progress, as kept by Trainer and saved in full checkpoints.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace torchfit {

/// A callback's state in torchfit 0.1's text form (see `Callback::state`).
using CallbackState = std::map<std::string, std::string>;

struct TrainerState {
  /// Epochs fully completed.
  int64_t epoch = 0;
  /// Optimizer steps taken in total.
  int64_t global_step = 0;
  /// Batches completed within the current, unfinished epoch.
  int64_t batch_in_epoch = 0;
  /// Seed of the running fit's per-epoch shuffle order.
  uint64_t seed = 0;
  /// Batch-size-weighted sums of the current epoch's logs so far, and their weight.
  std::map<std::string, double> epoch_sums;
  double epoch_weight = 0;
  /// State of torch's default CPU generator (dropout and other random ops);
  /// filled by `Trainer::checkpoint_state`.
  std::vector<uint8_t> rng_state;
};

}  // namespace torchfit
