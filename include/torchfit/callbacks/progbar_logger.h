#pragma once
/// \file
/// ProgbarLogger: the progress report of `fit(verbose=...)`. `Trainer::fit` adds one
/// when `FitOptions::verbose` is above 0.

#include <chrono>
#include <cstdint>
#include <string>

#include "torchfit/callback.h"

namespace torchfit {

/// Reports one line per epoch through the "torchfit" logger:
/// `Epoch 2/5 - 6 steps - 0s - 1ms/step - accuracy: 0.8123 - loss: 0.5012`.
class ProgbarLogger : public Callback {
 public:
  /// `epochs` is the total the fit runs to; verbose 0 is silent.
  explicit ProgbarLogger(int verbose = 1, int64_t epochs = 0);

  void on_epoch_begin(int64_t epoch, const Logs& logs) override;
  void on_train_batch_end(int64_t batch, const Logs& logs) override;
  void on_epoch_end(int64_t epoch, const Logs& logs) override;

  /// " - name: value" for each log, values as Keras prints them.
  static std::string format_logs(const Logs& logs);

 private:
  int verbose_;
  int64_t epochs_;
  int64_t steps_ = 0;
  std::chrono::steady_clock::time_point epoch_start_;
};

}  // namespace torchfit
