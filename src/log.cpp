#include "torchfit/log.h"

#include <unistd.h>

#include <spdlog/pattern_formatter.h>
#include <spdlog/spdlog.h>

namespace torchfit {

std::shared_ptr<spdlog::logger> logger() {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto existing = spdlog::get("torchfit")) return existing;
  auto created = std::make_shared<spdlog::logger>("torchfit", std::make_shared<TerminalSink>(stdout));
  spdlog::register_logger(created);
  return created;
}

void show_progress(const std::string& line) {
  auto log = logger();
  if (!log->should_log(spdlog::level::info)) return;
  for (const auto& sink : log->sinks()) {
    if (auto* terminal = dynamic_cast<TerminalSink*>(sink.get())) terminal->update(line);
  }
}

TerminalSink::TerminalSink(std::FILE* stream) : stream_(stream), terminal_(::isatty(::fileno(stream)) == 1) {
  formatter_ = std::make_unique<spdlog::pattern_formatter>("[%n] [%l] %v");
}

void TerminalSink::update(const std::string& line) {
  std::lock_guard<std::mutex> lock(mutex_);
  draw(line.data(), line.size());
}

void TerminalSink::draw(const char* text, size_t size) {
  if (!terminal_) return;
  std::fputc('\r', stream_);
  std::fwrite(text, 1, size, stream_);
  std::fputs("\x1b[K", stream_);  // clear what a longer previous update left
  update_open_ = true;
  std::fflush(stream_);
}

void TerminalSink::sink_it_(const spdlog::details::log_msg& message) {
  const auto& text = message.payload;
  if (text.size() > 0 && text[0] == '\r') {
    draw(text.data() + 1, text.size() - 1);
    return;
  }
  if (update_open_) std::fputs("\r\x1b[K", stream_);  // the line replaces the bar
  update_open_ = false;
  spdlog::memory_buf_t formatted;
  formatter_->format(message, formatted);
  std::fwrite(formatted.data(), 1, formatted.size(), stream_);
  std::fflush(stream_);
}

void TerminalSink::flush_() { std::fflush(stream_); }

}  // namespace torchfit
