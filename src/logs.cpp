#include "torchfit/logs.h"

namespace torchfit {

std::string join_keys(const Logs& logs) {
  std::string out;
  for (const auto& entry : logs) {
    if (!out.empty()) out += ", ";
    out += entry.first;
  }
  return out;
}

}  // namespace torchfit
