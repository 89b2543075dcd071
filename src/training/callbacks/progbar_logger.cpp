#include "torchfit/callbacks/progbar_logger.h"

#include <cmath>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "torchfit/log.h"

namespace torchfit {
namespace {
constexpr double kUpdateInterval = 0.05;  // seconds between redraws of the bar
constexpr int64_t kBarWidth = 30;
}  // namespace

ProgbarLogger::ProgbarLogger(int verbose, int64_t epochs, std::optional<int64_t> steps)
    : verbose_(verbose), epochs_(epochs), steps_(steps) {}

double ProgbarLogger::elapsed() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - epoch_start_).count();
}

void ProgbarLogger::on_epoch_begin(int64_t epoch, const Logs&) {
  seen_ = 0;
  whole_epoch_ = true;
  last_update_ = -1.0;
  epoch_start_ = std::chrono::steady_clock::now();
  header_ = fmt::format("Epoch {}/{}", epoch + 1, epochs_);
  if (verbose_ == 1) show_progress(header_);  // until the first step ends
}

std::string ProgbarLogger::bar(int64_t step, int64_t steps) {
  int64_t done = steps > 0 ? std::min(kBarWidth, kBarWidth * step / steps) : 0;
  std::string out(static_cast<size_t>(done), '=');
  if (done < kBarWidth) {
    if (done > 0) out.back() = '>';
    out.append(static_cast<size_t>(kBarWidth - done), '.');
  }
  return "[" + out + "]";
}

void ProgbarLogger::on_train_batch_end(int64_t batch, const Logs& logs) {
  if (seen_ == 0 && batch > 0) whole_epoch_ = false;  // resumed mid-epoch
  ++seen_;
  if (verbose_ != 1) return;
  double now = elapsed();
  bool last = steps_ && seen_ >= *steps_;
  if (!last && now - last_update_ < kUpdateInterval) return;
  last_update_ = now;
  double per_step = now / static_cast<double>(seen_);
  std::string position = steps_ ? fmt::format("{}/{} {}", seen_, *steps_, bar(seen_, *steps_))
                                : fmt::format("{}/Unknown", seen_);
  std::string timing = steps_ && !last ? fmt::format("ETA: {:.0f}s", per_step * static_cast<double>(*steps_ - seen_))
                                       : fmt::format("{:.0f}s {:.0f}ms/step", now, 1000.0 * per_step);
  show_progress(fmt::format("{} - {} - {}{}", header_, position, timing, format_logs(logs)));
}

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
  double seconds = elapsed();
  double per_step_ms = seen_ > 0 ? 1000.0 * seconds / static_cast<double>(seen_) : 0.0;
  logger()->info("Epoch {}/{} - {} steps - {:.0f}s - {:.0f}ms/step{}", epoch + 1, epochs_, seen_, seconds,
                 per_step_ms, format_logs(logs));
  // As Keras's Progbar: a loader's length is learnt from its first whole epoch, for the ETA.
  if (!steps_ && whole_epoch_ && seen_ > 0) steps_ = seen_;
}

}  // namespace torchfit
