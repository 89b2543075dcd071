#include "torchfit/log.h"

#include <mutex>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace torchfit {

std::shared_ptr<spdlog::logger> logger() {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto existing = spdlog::get("torchfit")) return existing;
  auto created = spdlog::stdout_color_mt("torchfit");
  created->set_pattern("[%n] [%^%l%$] %v");
  return created;
}

}  // namespace torchfit
