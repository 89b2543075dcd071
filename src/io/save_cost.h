#pragma once
// Where an AsyncCheckpointIO runs each save: in the background, or on the caller's thread when
// that measured cheaper for the caller. A background save costs the caller its time in `save`
// and in waits, plus how much slower its training steps ran while the save was in flight (the
// writer's CPU, memory bandwidth and cache taken from training); an inline save costs its wall
// time. Both are measured on the saves themselves, never assumed from a size.

#include <cstdint>
#include <vector>

#include "torchfit/io/checkpoint_io.h"

namespace torchfit::detail {

class SaveCostRule {
 public:
  /// Every this many decisions, a save runs where the rule would not put it, so its estimate
  /// follows a machine or a state that changed.
  static constexpr int kProbeEvery = 8;
  /// Clean steps kept for the usual step time (their median).
  static constexpr size_t kSteps = 15;

  explicit SaveCostRule(AsyncPolicy policy) : policy_(policy) {}

  /// At a save: closes the account of the previous background save, then says whether this
  /// save runs inline. Background saves come first (the first one, which also sizes the
  /// buffers, is not counted), then one inline save; then the cheaper place, probing the other.
  /// A save the caller waits for at once (`caller_waits`) runs inline: in the background it
  /// would cost its whole wall time plus the snapshot's copy.
  bool place_inline(bool caller_waits = false);
  /// An inline save took `seconds`.
  void inline_saved(double seconds);
  /// A background save was handed to the writer after `seconds` of capture in `save`.
  void background_started(double seconds);
  /// The caller waited `seconds` for the background save in flight (in `save` or `wait`).
  void caller_waited(double seconds);
  /// A training step took `seconds` (between two `before_update` calls, saves excluded);
  /// `save_in_flight`: a background save ran during it.
  void step(double seconds, bool save_in_flight);

  /// Estimates in seconds (0 before the first measurement).
  double background_cost() const { return background_cost_; }
  double inline_cost() const { return inline_cost_; }
  /// Step time above the usual while background saves were in flight, summed.
  double step_excess() const { return step_excess_; }

 private:
  void finish_background();
  static double blend(double estimate, double sample, bool known) { return known ? 0.5 * estimate + 0.5 * sample : sample; }

  AsyncPolicy policy_;
  bool background_known_ = false;
  bool inline_known_ = false;
  int64_t background_saves_ = 0;
  int decisions_since_probe_ = 0;
  double background_cost_ = 0;
  double inline_cost_ = 0;
  double step_excess_ = 0;
  struct Pending {
    bool open = false;
    bool counted = false;    // not the warm-up
    bool measurable = true;  // every step it overlapped had a usual time to compare with
    double cost = 0;
  } pending_;
  std::vector<double> clean_steps_;  // the last kSteps steps with no save in flight
  size_t next_clean_ = 0;
};

}  // namespace torchfit::detail
