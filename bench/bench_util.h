#pragma once
// Small helpers shared by the benchmark executables: timing, arguments, JSON.

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>

namespace torchfit::bench {

/// Median wall time in seconds of `reps` runs of `fn`. Before each run, untimed:
/// `setup`, then sync(2), so no earlier run's dirty pages compete for the disk.
inline double median_seconds(int reps, const std::function<void()>& fn,
                             const std::function<void()>& setup = [] {}) {
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    setup();
    ::sync();
    auto start = std::chrono::steady_clock::now();
    fn();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

/// `--name value` pairs.
class Args {
 public:
  Args(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      std::string key = argv[i];
      if (key.rfind("--", 0) != 0 || i + 1 >= argc) {
        throw std::invalid_argument(fmt::format("Bad argument '{}': expected --name value", key));
      }
      values_[key.substr(2)] = argv[++i];
    }
  }
  std::string get(const std::string& key, const std::string& fallback) const {
    auto it = values_.find(key);
    return it == values_.end() ? fallback : it->second;
  }
  double number(const std::string& key, double fallback) const {
    auto it = values_.find(key);
    return it == values_.end() ? fallback : std::stod(it->second);
  }

 private:
  std::map<std::string, std::string> values_;
};

/// One JSON object per row: {"key": value, ...} with numbers or strings.
class JsonRows {
 public:
  void add(std::map<std::string, double> numbers, std::map<std::string, std::string> strings = {}) {
    std::string row = "{";
    for (const auto& [k, v] : strings) row += fmt::format("\"{}\": \"{}\", ", k, v);
    for (const auto& [k, v] : numbers) row += fmt::format("\"{}\": {}, ", k, v);
    if (row.size() > 1) row.resize(row.size() - 2);
    rows_.push_back(row + "}");
  }
  std::string str() const {
    std::string out = "[\n";
    for (size_t i = 0; i < rows_.size(); ++i) out += "  " + rows_[i] + (i + 1 < rows_.size() ? ",\n" : "\n");
    return out + "]\n";
  }

 private:
  std::vector<std::string> rows_;
};

}  // namespace torchfit::bench
