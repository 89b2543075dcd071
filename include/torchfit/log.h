#pragma once
/// \file
/// torchfit's logger. All library output goes through the spdlog logger named
/// "torchfit"; fetch it with `spdlog::get("torchfit")` or `torchfit::logger()`
/// to change its level or sinks.

#include <memory>

namespace spdlog {
class logger;
}

namespace torchfit {

/// The "torchfit" logger, created on first use and registered with spdlog.
std::shared_ptr<spdlog::logger> logger();

}  // namespace torchfit
