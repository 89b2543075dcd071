#pragma once
/// \file
/// torchfit's logger. All library output goes through the spdlog logger named
/// "torchfit"; fetch it with `spdlog::get("torchfit")` or `torchfit::logger()`
/// to change its level or sinks.

#include <cstdio>
#include <memory>
#include <mutex>

#include <spdlog/sinks/base_sink.h>

namespace spdlog {
class logger;
}

namespace torchfit {

/// The "torchfit" logger, created on first use (with a TerminalSink on stdout)
/// and registered with spdlog.
std::shared_ptr<spdlog::logger> logger();

/// The default sink of the "torchfit" logger: formatted lines to a stream.
/// Messages whose text starts with '\r' are progress updates (ProgbarLogger's
/// live bar): on a terminal each redraws the current line, and the next line
/// replaces it; on anything else (pipes, files) they are dropped, so those see
/// plain lines only.
class TerminalSink : public spdlog::sinks::base_sink<std::mutex> {
 public:
  explicit TerminalSink(std::FILE* stream = stdout);
  bool is_terminal() const { return terminal_; }

 protected:
  void sink_it_(const spdlog::details::log_msg& message) override;
  void flush_() override;

 private:
  std::FILE* stream_;
  bool terminal_;
  bool update_open_ = false;  // a progress line is on screen
};

}  // namespace torchfit
