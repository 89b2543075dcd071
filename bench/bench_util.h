#pragma once
// Small helpers shared by the benchmark executables: timing, arguments, JSON.

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>

namespace torchfit::bench {

/// Times several methods in `reps` interleaved rounds, each in a new order, so
/// that slow phases of the machine (disk stalls, writeback) and what one method
/// leaves behind hit every method alike; reports medians.
/// Before each run, untimed: the method's setup, then sync(2).
class Interleaved {
 public:
  struct Method {
    std::string name;
    std::function<double()> run;  // seconds
    std::function<void()> setup;
  };
  void add(std::string name, std::function<void()> run, std::function<void()> setup = [] {}) {
    add_timed(
        std::move(name),
        [run = std::move(run)] {
          auto start = std::chrono::steady_clock::now();
          run();
          return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        },
        std::move(setup));
  }
  /// A method that times itself (another process's work, say), returning seconds.
  void add_timed(std::string name, std::function<double()> run, std::function<void()> setup = [] {}) {
    methods_.push_back({std::move(name), std::move(run), std::move(setup)});
  }
  /// Median seconds by method name.
  std::map<std::string, double> run(int reps) const {
    std::map<std::string, std::vector<double>> times;
    std::vector<size_t> order(methods_.size());
    for (size_t k = 0; k < order.size(); ++k) order[k] = k;
    std::mt19937 shuffle_rounds(42);
    for (int rep = 0; rep < reps; ++rep) {
      // Each round runs the methods in a new order. What one method leaves to the
      // next (dirty pages, blocks the disk must discard or allocate again, freed
      // memory) would otherwise always fall on the same successor: in a fixed
      // cycle, the durable save after torch::save took 2.5-3 x as long at 512 MiB.
      std::shuffle(order.begin(), order.end(), shuffle_rounds);
      for (size_t k : order) {
        const auto& m = methods_[k];
        m.setup();
        ::sync();
        times[m.name].push_back(m.run());
      }
    }
    std::map<std::string, double> medians;
    for (auto& [name, t] : times) {
      std::sort(t.begin(), t.end());
      medians[name] = t[t.size() / 2];
    }
    return medians;
  }

 private:
  std::vector<Method> methods_;
};

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
