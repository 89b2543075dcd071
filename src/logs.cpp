#include "torchfit/logs.h"

#include <algorithm>
#include <numeric>

#include <fmt/format.h>

namespace torchfit {

std::string join_keys(const Logs& logs) {
  std::string out;
  for (const auto& entry : logs) {
    if (!out.empty()) out += ", ";
    out += entry.first;
  }
  return out;
}

namespace {

/// Levenshtein distance.
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  std::iota(row.begin(), row.end(), size_t{0});
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string did_you_mean(const std::string& name, const std::vector<std::string>& keys) {
  const std::string* nearest = nullptr;
  size_t best = std::max<size_t>(1, name.size() / 3) + 1;
  for (const auto& key : keys) {
    size_t distance = edit_distance(name, key);
    if (distance > 0 && distance < best) {
      best = distance;
      nearest = &key;
    }
  }
  return nearest != nullptr ? fmt::format(" Did you mean '{}'?", *nearest) : std::string();
}

std::string did_you_mean(const std::string& name, const Logs& logs) {
  std::vector<std::string> keys;
  for (const auto& entry : logs) keys.push_back(entry.first);
  return did_you_mean(name, keys);
}

}  // namespace torchfit
