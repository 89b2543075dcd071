#pragma once
// A Trainer's progress as data inside checkpoints.

#include <string>

#include <ATen/core/ivalue.h>

#include "torchfit/trainer_state.h"

namespace torchfit::detail {

/// {"epoch", "global_step", "batch_in_epoch", "seed", "epoch_sums", "epoch_weight"}, plus
/// "data_pass", "batch_in_pass" and "metric_states" when set; the RNG is an item of its own.
c10::IValue trainer_state_to_ivalue(const TrainerState& state);
/// Throws CheckpointError starting with `where` and naming the bad field.
TrainerState trainer_state_from_ivalue(const c10::IValue& value, const std::string& where);

}  // namespace torchfit::detail
