#pragma once
/// \file
/// Training progress, as kept by Trainer and saved in full checkpoints.

#include <cstdint>

namespace torchfit {

struct TrainerState {
  /// Epochs fully completed.
  int64_t epoch = 0;
  /// Optimizer steps taken in total.
  int64_t global_step = 0;
  /// Batches completed within the current, unfinished epoch.
  int64_t batch_in_epoch = 0;
};

}  // namespace torchfit
