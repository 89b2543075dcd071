#pragma once
// A TrainerState as a checkpoint item ("trainer"), for the Trainer and 0.1's free functions.

#include <functional>
#include <string>
#include <utility>

#include "format/trainer_state.h"
#include "torchfit/engine/checkpoint.h"
#include "torchfit/trainer_state.h"

namespace torchfit::detail {

/// Saves `state` (without its RNG bytes, which the "rng" item holds) and loads into it, then
/// runs `loaded`.
class TrainerStateItem : public Stateful {
 public:
  explicit TrainerStateItem(TrainerState& state, std::function<void()> loaded = {})
      : state_(state), loaded_(std::move(loaded)) {}
  c10::IValue state_dict() const override { return trainer_state_to_ivalue(state_); }
  void check_state_dict(const c10::IValue& state, const std::string& where) const override {
    trainer_state_from_ivalue(state, where);
  }
  void load_state_dict(const c10::IValue& state) override {
    auto rng = std::move(state_.rng_state);
    state_ = trainer_state_from_ivalue(state, "trainer");
    state_.rng_state = std::move(rng);
    if (loaded_) loaded_();
  }

 private:
  TrainerState& state_;
  std::function<void()> loaded_;
};

}  // namespace torchfit::detail
