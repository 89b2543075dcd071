#include "support.h"

#include <fcntl.h>
#include <spawn.h>
#include <unistd.h>

#include <cstring>

#include <algorithm>
#include <fstream>
#include <iterator>

#include <spdlog/spdlog.h>

extern char** environ;

namespace torchfit::test {

Dataset make_data(int64_t train, int64_t test, uint64_t seed) {
  torch::manual_seed(seed);
  auto centers = torch::randn({3, 3}) * 2;
  auto make = [&](int64_t n) {
    auto y = torch::randint(0, 3, {n}, torch::kLong);
    auto x = centers.index_select(0, y) + torch::randn({n, 3}) * 0.5;
    return std::make_pair(x, y);
  };
  auto [xt, yt] = make(train);
  auto [xv, yv] = make(test);
  return {xt, yt, xv, yv};
}

Harness make_setup(double lr) {
  Harness s;
  s.model = Mlp();
  s.optimizer = std::make_shared<torch::optim::SGD>(s.model->parameters(), torch::optim::SGDOptions(lr));
  s.trainer = std::make_unique<Trainer>(
      s.model, s.optimizer,
      [](const torch::Tensor& out, const torch::Tensor& target) {
        return torch::nn::functional::cross_entropy(out, target);
      },
      std::vector<Metric>{metrics::accuracy()});
  return s;
}

void TorchfitTest::SetUp() {
  torch::manual_seed(0);
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  dir_ = fs::temp_directory_path() /
         (std::string("torchfit-") + info->test_suite_name() + "-" + info->name() + "-" +
          std::to_string(::getpid()));
  fs::remove_all(dir_);
  fs::create_directories(dir_);
}

void TorchfitTest::TearDown() {
  std::error_code ec;
  if (!HasFailure()) fs::remove_all(dir_, ec);
}

std::vector<std::string> TorchfitTest::files(const std::string& sub) const {
  std::vector<std::string> names;
  auto root = sub.empty() ? dir_ : dir_ / sub;
  if (!fs::exists(root)) return names;
  for (const auto& entry : fs::directory_iterator(root)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

LogCapture::LogCapture() : sink_(std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(1000)) {
  sink_->set_pattern("%v");
  logger()->sinks().push_back(sink_);
}

LogCapture::~LogCapture() {
  auto& sinks = logger()->sinks();
  sinks.erase(std::remove(sinks.begin(), sinks.end(), sink_), sinks.end());
}

std::vector<std::string> LogCapture::lines() const { return sink_->last_formatted(); }

std::string LogCapture::text() const {
  std::string out;
  for (const auto& line : lines()) out += line;  // formatted lines end with '\n'
  return out;
}

pid_t spawn_self(const std::string& test, const std::vector<std::string>& env, std::vector<std::string> wrapper) {
  std::string self = fs::read_symlink("/proc/self/exe").string();
  std::string filter = "--gtest_filter=" + test;
  wrapper.push_back(self);
  wrapper.push_back(filter);
  std::vector<char*> argv;
  for (auto& arg : wrapper) argv.push_back(arg.data());
  argv.push_back(nullptr);
  std::vector<std::string> variables(env);
  for (char** e = environ; *e != nullptr; ++e) variables.emplace_back(*e);
  std::vector<char*> envp;
  for (auto& v : variables) envp.push_back(v.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error(std::string("posix_spawn: ") + std::strerror(rc));
  return pid;
}

std::string read_file(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& file, const std::string& bytes) {
  std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
}

bool have_python_torch() {
  return fs::exists("/usr/bin/python3") && std::system("/usr/bin/python3 -c 'import torch' 2>/dev/null") == 0;
}

void expect_same_weights(const torch::nn::Module& a, const torch::nn::Module& b) {
  auto sa = state_dict(a), sb = state_dict(b);
  ASSERT_EQ(sa.size(), sb.size());
  for (const auto& [name, tensor] : sa) {
    ASSERT_TRUE(sb.count(name)) << name;
    EXPECT_TRUE(torch::equal(tensor, sb.at(name))) << name;
  }
}

}  // namespace torchfit::test
