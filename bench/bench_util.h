#pragma once
// Small helpers shared by the benchmark executables: timing, arguments, JSON.

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>

namespace torchfit::bench {

/// The median, least and greatest of `values`.
struct Spread {
  double median = 0, min = 0, max = 0;
  static Spread of(std::vector<double> values) {
    if (values.empty()) return {};
    std::sort(values.begin(), values.end());
    return {values[values.size() / 2], values.front(), values.back()};
  }
  std::string str(const char* format = "{:.3f}") const {
    return fmt::format(fmt::runtime(std::string(format) + " ({} to {})"), median,
                       fmt::format(fmt::runtime(format), min), fmt::format(fmt::runtime(format), max));
  }
};

/// `size` bytes, page-aligned and faulted in: the buffer a careful raw read or copy uses.
class AlignedBuffer {
 public:
  explicit AlignedBuffer(size_t size) : data_(allocate(size)), size_(size) { std::memset(data_.get(), 1, size); }
  char* data() const { return data_.get(); }
  size_t size() const { return size_; }

 private:
  static char* allocate(size_t size) {
    void* p = nullptr;
    if (::posix_memalign(&p, 4096, std::max<size_t>(size, 1)) != 0) throw std::bad_alloc();
    return static_cast<char*>(p);
  }
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> data_;
  size_t size_;
};

/// Times several methods in `reps` interleaved rounds, each in a new order, so
/// that slow phases of the machine (disk stalls, writeback) and what one method
/// leaves behind hit every method alike.
/// Before each run, untimed: the method's setup, then sync(2); after it, untimed, its finish
/// (waiting for work it left running, such as an async save, which would land on the next
/// method).
class Interleaved {
 public:
  struct Method {
    std::string name;
    std::function<double()> run;  // seconds
    std::function<void()> setup;
    std::function<void()> finish;
  };
  void add(std::string name, std::function<void()> run, std::function<void()> setup = [] {},
           std::function<void()> finish = [] {}) {
    add_timed(
        std::move(name),
        [run = std::move(run)] {
          auto start = std::chrono::steady_clock::now();
          run();
          return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        },
        std::move(setup), std::move(finish));
  }
  /// A method that times itself (another process's work, say), returning seconds.
  void add_timed(std::string name, std::function<double()> run, std::function<void()> setup = [] {},
                 std::function<void()> finish = [] {}) {
    methods_.push_back({std::move(name), std::move(run), std::move(setup), std::move(finish)});
  }
  /// Median seconds by method name.
  std::map<std::string, double> run(int reps) const {
    std::map<std::string, double> medians;
    for (const auto& [name, times] : run_rounds(reps)) medians[name] = Spread::of(times).median;
    return medians;
  }
  /// Seconds by method name, one per round in round order (ratios of two methods are taken
  /// round by round, for their spread).
  std::map<std::string, std::vector<double>> run_rounds(int reps) const {
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
        m.finish();
      }
    }
    return times;
  }

 private:
  std::vector<Method> methods_;
};

/// Debian's Python running bench/python_worker.py: one timed request per call, so Python's saves
/// and loads run in the same rounds as torchfit's. Not ready() when the interpreter or torch is
/// missing.
class PythonWorker {
 public:
  PythonWorker(const std::string& python, const std::vector<std::string>& arguments) {
    const auto script = (std::filesystem::path(__FILE__).parent_path() / "python_worker.py").string();
    std::vector<std::string> argv_strings{python, script};
    argv_strings.insert(argv_strings.end(), arguments.begin(), arguments.end());
    int to_child[2], from_child[2];
    if (::pipe2(to_child, O_CLOEXEC) != 0) return;
    if (::pipe2(from_child, O_CLOEXEC) != 0) {
      ::close(to_child[0]);
      ::close(to_child[1]);
      return;
    }
    std::vector<char*> argv;
    for (auto& a : argv_strings) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(to_child[0], STDIN_FILENO);
      ::dup2(from_child[1], STDOUT_FILENO);
      ::execv(python.c_str(), argv.data());
      ::_exit(127);
    }
    ::close(to_child[0]);
    ::close(from_child[1]);
    requests_ = ::fdopen(to_child[1], "w");
    answers_ = ::fdopen(from_child[0], "r");
    ready_ = pid_ > 0 && requests_ != nullptr && answers_ != nullptr && answer() == "ready";
  }
  ~PythonWorker() {
    if (requests_ != nullptr) std::fclose(requests_);  // the worker ends at end of input
    if (answers_ != nullptr) std::fclose(answers_);
    if (pid_ > 0) ::waitpid(pid_, nullptr, 0);
  }
  PythonWorker(const PythonWorker&) = delete;
  PythonWorker& operator=(const PythonWorker&) = delete;

  bool ready() const { return ready_; }
  /// Seconds the request took, as Python timed it (see python_worker.py).
  double request(const std::string& line) {
    std::fprintf(requests_, "%s\n", line.c_str());
    std::fflush(requests_);
    auto seconds = answer();
    if (seconds.empty()) throw std::runtime_error("the Python worker stopped answering: " + line);
    return std::stod(seconds);
  }

 private:
  std::string answer() {
    char line[128];
    if (std::fgets(line, sizeof line, answers_) == nullptr) return "";
    std::string text = line;
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
    return text;
  }
  pid_t pid_ = -1;
  FILE* requests_ = nullptr;
  FILE* answers_ = nullptr;
  bool ready_ = false;
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
