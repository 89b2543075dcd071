#include "torchfit/engine/checkpoint_options.h"

#include <chrono>
#include <cmath>

#include <fmt/format.h>

#include "torchfit/error.h"

namespace torchfit {

SaveFreq SaveFreq::batches(int64_t n) {
  if (n <= 0) {
    throw ValueError(fmt::format(
        "Unrecognized save_freq: batches({}). Expected SaveFreq::epoch() or SaveFreq::batches(n) "
        "with n > 0",
        n));
  }
  SaveFreq freq;
  freq.every_n_batches_ = n;
  return freq;
}

SaveFreq SaveFreq::seconds(double s) {
  if (!(s > 0) || !std::isfinite(s)) {
    throw ValueError(fmt::format("Unrecognized save_freq: seconds({}). Expected a finite number of seconds > 0", s));
  }
  SaveFreq freq;
  freq.every_seconds_ = s;
  return freq;
}

SaveFreq operator|(const SaveFreq& a, const SaveFreq& b) {
  const bool batches_then_seconds = a.every_n_batches_ > 0 && a.every_seconds_ == 0 && b.every_n_batches_ == 0 &&
                                    b.every_seconds_ > 0;
  const bool seconds_then_batches = b.every_n_batches_ > 0 && b.every_seconds_ == 0 && a.every_n_batches_ == 0 &&
                                    a.every_seconds_ > 0;
  if (!batches_then_seconds && !seconds_then_batches) {
    throw ValueError(fmt::format("Unrecognized save_freq: {} | {}. Combine one SaveFreq::batches(n) with one "
                                 "SaveFreq::seconds(s)",
                                 a.to_string(), b.to_string()));
  }
  SaveFreq freq;
  freq.every_n_batches_ = a.every_n_batches_ + b.every_n_batches_;
  freq.every_seconds_ = a.every_seconds_ + b.every_seconds_;
  freq.clock_ = a.clock_ ? a.clock_ : b.clock_;
  return freq;
}

SaveFreq& SaveFreq::clock(Clock clock) {
  clock_ = std::move(clock);
  return *this;
}

bool SaveFreq::due(int64_t calls, double seconds) const {
  if (is_epoch()) return true;
  return (every_n_batches_ > 0 && calls >= every_n_batches_) || (every_seconds_ > 0 && seconds >= every_seconds_);
}

double SaveFreq::now() const {
  if (clock_) return clock_();
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

namespace detail {

bool SaveTrigger::fires(const SaveFreq& freq, int64_t calls) {
  double now = 0;
  if (freq.every_seconds() > 0) {
    now = freq.now();
    if (!interval_start_) interval_start_ = now;
  }
  if (!freq.due(calls, now - interval_start_.value_or(now))) return false;
  if (interval_start_) interval_start_ = now;
  return true;
}

}  // namespace detail

std::string SaveFreq::to_string() const {
  if (is_epoch()) return "epoch";
  std::string out;
  if (every_n_batches_ > 0) out = fmt::format("batches({})", every_n_batches_);
  if (every_seconds_ > 0) out += fmt::format("{}seconds({})", out.empty() ? "" : " | ", every_seconds_);
  return out;
}

}  // namespace torchfit
