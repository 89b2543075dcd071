#include "io/save_cost.h"

#include <algorithm>

namespace torchfit::detail {

bool SaveCostRule::place_inline(bool caller_waits) {
  finish_background();
  if (policy_ == AsyncPolicy::Always) return false;
  if (caller_waits) return true;
  if (!background_known_) return false;
  if (!inline_known_) return true;
  const bool cheaper_inline = inline_cost_ <= background_cost_;
  if (++decisions_since_probe_ >= kProbeEvery) {
    decisions_since_probe_ = 0;
    return !cheaper_inline;
  }
  return cheaper_inline;
}

void SaveCostRule::inline_saved(double seconds) {
  inline_cost_ = blend(inline_cost_, seconds, inline_known_);
  inline_known_ = true;
}

void SaveCostRule::background_started(double seconds) {
  pending_ = Pending();
  pending_.open = true;
  pending_.counted = background_saves_++ > 0;  // the first one sizes the snapshot's buffers
  pending_.cost = seconds;
}

void SaveCostRule::caller_waited(double seconds) {
  if (pending_.open) pending_.cost += seconds;
}

void SaveCostRule::step(double seconds, bool save_in_flight) {
  if (!save_in_flight) {
    if (clean_steps_.size() < kSteps) {
      clean_steps_.push_back(seconds);
    } else {
      clean_steps_[next_clean_] = seconds;
      next_clean_ = (next_clean_ + 1) % kSteps;
    }
    return;
  }
  if (!pending_.open) return;
  if (clean_steps_.empty()) {
    pending_.measurable = false;
    return;
  }
  std::vector<double> sorted = clean_steps_;
  std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
  const double excess = std::max(0.0, seconds - sorted[sorted.size() / 2]);
  pending_.cost += excess;
  step_excess_ += excess;
}

void SaveCostRule::finish_background() {
  if (!pending_.open) return;
  if (pending_.counted && pending_.measurable) {
    background_cost_ = blend(background_cost_, pending_.cost, background_known_);
    background_known_ = true;
  }
  pending_ = Pending();
}

}  // namespace torchfit::detail
