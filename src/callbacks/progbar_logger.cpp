#include "torchfit/callbacks/progbar_logger.h"

#include <cmath>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "torchfit/log.h"

namespace torchfit {

ProgbarLogger::ProgbarLogger(int verbose, int64_t epochs) : verbose_(verbose), epochs_(epochs) {}

void ProgbarLogger::on_epoch_begin(int64_t, const Logs&) {
  steps_ = 0;
  epoch_start_ = std::chrono::steady_clock::now();
}

void ProgbarLogger::on_train_batch_end(int64_t, const Logs&) { ++steps_; }

std::string ProgbarLogger::format_logs(const Logs& logs) {
  std::string out;
  for (const auto& [key, value] : logs) {
    // Keras switches to scientific notation for small magnitudes.
    out += std::abs(value) > 1e-3 ? fmt::format(" - {}: {:.4f}", key, value)
                                  : fmt::format(" - {}: {:.4e}", key, value);
  }
  return out;
}

void ProgbarLogger::on_epoch_end(int64_t epoch, const Logs& logs) {
  if (verbose_ <= 0) return;
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - epoch_start_).count();
  double per_step_ms = steps_ > 0 ? 1000.0 * seconds / static_cast<double>(steps_) : 0.0;
  logger()->info("Epoch {}/{} - {} steps - {:.0f}s - {:.0f}ms/step{}", epoch + 1, epochs_, steps_,
                 seconds, per_step_ms, format_logs(logs));
}

}  // namespace torchfit
