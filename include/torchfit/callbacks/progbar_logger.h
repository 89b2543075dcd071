#pragma once
/// \file
/// ProgbarLogger: the progress report of `fit(verbose=...)`, as Keras's. `Trainer::fit`
/// adds one when `FitOptions::verbose` is above 0.
///
///     trainer.fit(x, y, torchfit::FitOptions().epochs(5).verbose(1));  // adds a ProgbarLogger

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "torchfit/callback.h"

namespace torchfit {

/// verbose 1: a live "Epoch n/N" line with a progress bar (steps, ETA, time per
/// step, running metrics) on a terminal, and one line per epoch; verbose 2: one
/// line per epoch only; 0: silent. Epoch lines go through the "torchfit" logger;
/// the live line only to its terminal sinks (`show_progress`), so log files and
/// pipes get whole lines. Without a known step count, the first whole epoch's
/// is used from the second epoch on.
class ProgbarLogger : public Callback {
 public:
  /// `epochs` is the total the fit runs to; `steps` the batches per epoch, if known.
  explicit ProgbarLogger(int verbose = 1, int64_t epochs = 0, std::optional<int64_t> steps = std::nullopt);

  void on_epoch_begin(int64_t epoch, const Logs& logs) override;
  void on_train_batch_end(int64_t batch, const Logs& logs) override;
  void on_epoch_end(int64_t epoch, const Logs& logs) override;

  /// " - name: value" for each log, values as Keras prints them.
  static std::string format_logs(const Logs& logs);
  /// The bar for `step` of `steps` (30 characters between brackets, as Keras's).
  static std::string bar(int64_t step, int64_t steps);

 private:
  double elapsed() const;

  int verbose_;
  int64_t epochs_;
  std::optional<int64_t> steps_;
  int64_t seen_ = 0;
  bool whole_epoch_ = true;
  std::string header_;  // "Epoch n/N"
  std::chrono::steady_clock::time_point epoch_start_;
  double last_update_ = -1.0;
};

}  // namespace torchfit
