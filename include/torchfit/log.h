#pragma once
/// \file
/// torchfit's logger. All library output goes through the spdlog logger named
/// "torchfit"; fetch it with `spdlog::get("torchfit")` or `torchfit::logger()`
/// to change its level or sinks.
///
///     torchfit::logger()->set_level(spdlog::level::warn);   // or add a file sink

#include <cstdio>
#include <memory>
#include <mutex>
#include <string>

#include <spdlog/sinks/base_sink.h>

namespace spdlog {
class logger;
}

namespace torchfit {

/// The "torchfit" logger, created on first use (with a TerminalSink on stdout)
/// and registered with spdlog.
std::shared_ptr<spdlog::logger> logger();

/// Redraws the live progress line (ProgbarLogger's bar) on the "torchfit"
/// logger's TerminalSinks that are terminals; no other sink sees it, so log files
/// and pipes get whole lines only. Does nothing below the info level.
void show_progress(const std::string& line);

/// The default sink of the "torchfit" logger: formatted lines to a stream.
/// `update` draws a progress line that the next line replaces. Messages logged
/// with a leading '\r' are treated as such updates too (torchfit 0.1's way),
/// and dropped when the stream is not a terminal.
class TerminalSink : public spdlog::sinks::base_sink<std::mutex> {
 public:
  explicit TerminalSink(std::FILE* stream = stdout);
  bool is_terminal() const { return terminal_; }
  /// Redraws the current line with `line` when the stream is a terminal; the
  /// next logged line replaces it. Does nothing otherwise.
  void update(const std::string& line);

 protected:
  void sink_it_(const spdlog::details::log_msg& message) override;
  void flush_() override;

 private:
  void draw(const char* text, size_t size);  // with mutex_ held

  std::FILE* stream_;
  bool terminal_;
  bool update_open_ = false;  // a progress line is on screen
};

}  // namespace torchfit
