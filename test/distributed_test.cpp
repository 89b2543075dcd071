// Data-parallel fit with 2 processes on loopback (c10d Gloo).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <thread>

#include "support.h"

namespace torchfit::test {
namespace {

class DistributedTest : public TorchfitTest {};

std::string bits(const torch::nn::Module& model) {
  std::string out;
  for (const auto& [name, t] : state_dict(model)) {
    auto b = t.contiguous().view(torch::kInt32);
    out += fmt::format("{}:{}\n", name, fmt::join(b.data_ptr<int32_t>(), b.data_ptr<int32_t>() + b.numel(), ","));
  }
  return out;
}

/// Slows every batch down, so a kill lands mid-run, and publishes how many batches
/// the rank finished in `file`, for the test to wait on.
class SlowBatches : public Callback {
 public:
  explicit SlowBatches(std::string file) : file_(std::move(file)) {}
  void on_train_batch_end(int64_t, const Logs&) override {
    std::this_thread::sleep_for(std::chrono::milliseconds(60));
    std::ofstream(file_ + ".tmp") << ++finished_;
    fs::rename(file_ + ".tmp", file_);  // never seen half written
  }

 private:
  std::string file_;
  int64_t finished_ = 0;
};

// The child side: one rank of a 2-process fit.
TEST(DistChild, Train) {
  const char* dir_env = std::getenv("TORCHFIT_DIST_DIR");
  if (dir_env == nullptr) GTEST_SKIP() << "only run as a child of DistributedTest";
  std::string dir = dir_env;
  bool slow = std::getenv("TORCHFIT_DIST_SLOW") != nullptr;
  bool with_backup = std::getenv("TORCHFIT_DIST_BACKUP") != nullptr;
  int64_t epochs = std::getenv("TORCHFIT_DIST_EPOCHS") ? std::atoll(std::getenv("TORCHFIT_DIST_EPOCHS")) : 3;
  int rank = std::atoi(std::getenv("RANK"));
  try {
    auto group = distributed::init_from_env(std::chrono::seconds(10));
    auto data = make_data(40, 10);
    torch::manual_seed(100 + rank);  // different starts: rank 0's weights must win
    auto h = make_setup();
    h.trainer->set_process_group(group);
    auto every = std::make_shared<CheckpointCallback>(CheckpointOptions(dir + "/e{epoch}.pt").monitor("val_loss"));
    // With TORCHFIT_DIST_FAIL, rank 0's saves of "best" fail (a file made after the start
    // blocks the directory); they are async unless TORCHFIT_DIST_SYNC_BEST is set.
    auto best_path = std::getenv("TORCHFIT_DIST_FAIL") ? dir + "/blocker/best.pt" : dir + "/best.pt";
    auto best = std::make_shared<CheckpointCallback>(CheckpointOptions(best_path).monitor("val_accuracy")
                                                         .save_best_only(true)
                                                         .async_save(!std::getenv("TORCHFIT_DIST_SYNC_BEST")));
    std::vector<std::shared_ptr<Callback>> callbacks{every, best};
    if (std::getenv("TORCHFIT_DIST_FAIL") && rank == 0) {  // after rank 0's check of that directory
      callbacks.push_back(block_directory_after_start(dir + "/blocker"));
    }
    // With TORCHFIT_DIST_FAIL_BACKUP, rank 0's backups fail: a file replaces their directory
    // once it has been checked.
    const bool fail_backup = std::getenv("TORCHFIT_DIST_FAIL_BACKUP") != nullptr;
    const std::string backup_dir = dir + (fail_backup ? "/blocker" : "/backup");
    auto backup = std::make_shared<BackupAndRestore>(BackupOptions(backup_dir).save_freq(SaveFreq::batches(2)));
    if (with_backup || fail_backup) callbacks.insert(callbacks.begin(), backup);
    if (fail_backup && rank == 0) {
      auto replace = std::make_shared<LambdaCallback>();
      replace->train_begin = [backup_dir](const Logs&) {
        fs::remove_all(backup_dir);
        std::ofstream(backup_dir) << "a file where a directory should be";
      };
      callbacks.push_back(replace);
    }
    if (slow) callbacks.push_back(std::make_shared<SlowBatches>(fmt::format("{}/batches{}.txt", dir, rank)));
    History history;
    if (std::getenv("TORCHFIT_DIST_LOADERS") != nullptr) {
      // Each rank's loaders read their shard; validation totals are summed across ranks.
      auto train = torch::data::make_data_loader(
          XYDataset(data.x_train, data.y_train).map(torch::data::transforms::Stack<>()),
          torch::data::samplers::DistributedSequentialSampler(40, 2, static_cast<size_t>(rank)), 5);
      auto val = torch::data::make_data_loader(
          XYDataset(data.x_test, data.y_test).map(torch::data::transforms::Stack<>()),
          torch::data::samplers::DistributedSequentialSampler(10, 2, static_cast<size_t>(rank)), 2);
      history = h.trainer->fit(*train, FitOptions().epochs(epochs).steps_per_epoch(3).validation_data(*val)
                                           .callbacks(callbacks));
      std::ofstream(fmt::format("{}/val{}.txt", dir, rank)) << fmt::format("{}", h.trainer->evaluate(*val).at("loss"));
    } else {
      history = h.trainer->fit(data.x_train, data.y_train,
                               FitOptions().epochs(epochs).batch_size(5).seed(9)
                                   .validation_data(data.x_test, data.y_test).callbacks(callbacks));
    }
    std::ofstream(fmt::format("{}/rank{}.txt", dir, rank)) << bits(*h.model);
    std::ofstream(fmt::format("{}/best{}.txt", dir, rank)) << fmt::format("{}", *best->best());
    std::ofstream(fmt::format("{}/history{}.txt", dir, rank)) << fmt::format("{}", fmt::join(history.history["loss"], ","));
    std::ofstream(fmt::format("{}/restored{}.txt", dir, rank)) << backup->restored();
  } catch (const std::exception& e) {
    std::ofstream(fmt::format("{}/error{}.txt", dir, rank)) << e.what();
    std::exit(3);
  }
}

std::vector<pid_t> spawn_ranks(const std::string& dir, int port, bool slow, std::vector<std::string> extra = {}) {
  std::vector<pid_t> pids;
  for (int rank = 0; rank < 2; ++rank) {
    std::vector<std::string> env = {"TORCHFIT_DIST_DIR=" + dir, fmt::format("RANK={}", rank), "WORLD_SIZE=2",
                                    fmt::format("LOCAL_RANK={}", rank), "MASTER_ADDR=127.0.0.1",
                                    fmt::format("MASTER_PORT={}", port)};
    if (slow) env.push_back("TORCHFIT_DIST_SLOW=1");
    env.insert(env.end(), extra.begin(), extra.end());
    pids.push_back(spawn_self("DistChild.Train", env));
  }
  return pids;
}

/// Polls until `file` exists (up to 30 s); returns whether it does.
bool wait_for(const std::string& file) {
  for (int i = 0; i < 3000 && !fs::exists(file); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  return fs::exists(file);
}

/// The batches rank `rank` of a slow run in `dir` has finished (SlowBatches).
int64_t batches_finished(const std::string& dir, int rank) {
  auto text = read_file(fmt::format("{}/batches{}.txt", dir, rank));
  return text.empty() ? 0 : std::stoll(text);
}

/// Polls until rank `rank` of a slow run in `dir` finished `more` batches beyond
/// those it had (up to 30 s); returns whether it did.
bool wait_for_more_batches(const std::string& dir, int rank, int64_t more) {
  const int64_t target = batches_finished(dir, rank) + more;
  for (int i = 0; i < 3000 && batches_finished(dir, rank) < target; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return batches_finished(dir, rank) >= target;
}

/// A port nothing listens on, chosen by the kernel: ctest runs tests side by side,
/// and ports derived from pids collided.
int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  bool ok = fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0 &&
            ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  if (fd >= 0) ::close(fd);
  if (!ok) throw std::runtime_error(std::string("no free port: ") + std::strerror(errno));
  return ntohs(address.sin_port);
}

TEST_F(DistributedTest, TwoRanksAgreeWithEachOtherAndWithOneProcess) {
  fs::create_directories(dir());
  auto pids = spawn_ranks(dir().string(), free_port(), false);
  for (auto pid : pids) {
    int status = 0;
    waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "status " << status << " " << read_file(path("error0.txt")) << read_file(path("error1.txt"));
  }
  ASSERT_TRUE(fs::exists(path("rank0.txt")));
  EXPECT_EQ(read_file(path("rank0.txt")), read_file(path("rank1.txt")));
  EXPECT_EQ(read_file(path("best0.txt")), read_file(path("best1.txt")));
  EXPECT_EQ(read_file(path("history0.txt")), read_file(path("history1.txt")));
  // One file per save, written once.
  EXPECT_EQ(files(), (std::vector<std::string>{"best.pt", "best0.txt", "best1.txt", "e1.pt", "e2.pt", "e3.pt",
                                                "history0.txt", "history1.txt", "rank0.txt", "rank1.txt",
                                                "restored0.txt", "restored1.txt"}));

  // A single process with the same global batch (2 x 5) and rank 0's start.
  auto data = make_data(40, 10);
  torch::manual_seed(100);
  auto single = make_setup();
  single.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(3).batch_size(10).seed(9));
  Mlp from_rank0;
  load_weights(*from_rank0, path("e3.pt"));
  for (const auto& [name, tensor] : state_dict(*single.model)) {
    EXPECT_TRUE(torch::allclose(tensor, state_dict(*from_rank0).at(name), 1e-4, 1e-5)) << name;
  }
}

TEST_F(DistributedTest, TwoRanksTrainAndValidateOnLoaders) {
  fs::create_directories(dir());
  int status = 0;
  for (auto pid : spawn_ranks(dir().string(), free_port(), false, {"TORCHFIT_DIST_LOADERS=1"})) {
    waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "status " << status << " " << read_file(path("error0.txt")) << read_file(path("error1.txt"));
  }
  ASSERT_TRUE(fs::exists(path("rank0.txt")));
  EXPECT_EQ(read_file(path("rank0.txt")), read_file(path("rank1.txt")));
  EXPECT_EQ(read_file(path("history0.txt")), read_file(path("history1.txt")));
  EXPECT_EQ(read_file(path("val0.txt")), read_file(path("val1.txt")));
  // The two halves evaluated apart and summed are the whole test set evaluated at once.
  auto data = make_data(40, 10);
  auto single = make_setup();
  load_weights(*single.model, path("e3.pt"));
  EXPECT_NEAR(std::stod(read_file(path("val0.txt"))), single.trainer->evaluate(data.x_test, data.y_test).at("loss"),
              1e-6);
}

TEST_F(DistributedTest, AFailedSaveOfRankZeroIsRaisedOnBothRanks) {
  struct Case {
    const char* name;
    std::vector<std::string> env;
    const char* rank1_error;
  };
  const std::vector<Case> cases = {
      {"async, in the background", {"TORCHFIT_DIST_FAIL=1"}, "Rank 0's async checkpoint save failed"},
      // The fit's last save runs inline on rank 0 (the caller waits for it at once).
      {"async, inline", {"TORCHFIT_DIST_FAIL=1", "TORCHFIT_DIST_EPOCHS=1"}, "Rank 0's async checkpoint save failed"},
      {"sync", {"TORCHFIT_DIST_FAIL=1", "TORCHFIT_DIST_SYNC_BEST=1"}, "Rank 0's checkpoint save failed"},
      {"backup", {"TORCHFIT_DIST_FAIL_BACKUP=1"}, "Rank 0's backup failed"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    fs::remove_all(dir());
    fs::create_directories(dir());
    auto pids = spawn_ranks(dir().string(), free_port(), false, c.env);
    for (auto pid : pids) {
      int status = 0;
      waitpid(pid, &status, 0);
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 3) << "status " << status;
    }
    auto rank0 = read_file(path("error0.txt")), rank1 = read_file(path("error1.txt"));
    EXPECT_NE(rank0.find(path("blocker")), std::string::npos) << rank0;
    EXPECT_NE(rank1.find(c.rank1_error), std::string::npos) << rank1;
    EXPECT_NE(rank1.find(path("blocker")), std::string::npos) << rank1;
    EXPECT_FALSE(fs::exists(path("rank0.txt")));  // neither rank finished the fit
    EXPECT_FALSE(fs::exists(path("rank1.txt")));
  }
}

TEST_F(DistributedTest, KillingOneRankFailsTheOtherWithinTheTimeout) {
  fs::create_directories(dir());
  auto pids = spawn_ranks(dir().string(), free_port(), true, {"TORCHFIT_DIST_EPOCHS=1000"});
  EXPECT_TRUE(wait_for(path("e1.pt")));
  EXPECT_TRUE(wait_for_more_batches(dir().string(), 1, 1));  // in the epoch after
  ::kill(pids[1], SIGKILL);
  auto killed_at = std::chrono::steady_clock::now();
  int status = 0;
  waitpid(pids[1], &status, 0);
  waitpid(pids[0], &status, 0);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 3) << "status " << status;
  EXPECT_LT(seconds, 15.0);  // the group's timeout is 10 s
  auto error = read_file(path("error0.txt"));
  EXPECT_NE(error.find("Rank 0 of 2"), std::string::npos) << error;
  EXPECT_NE(error.find("failed; a peer may have died"), std::string::npos) << error;
  // The last committed checkpoint is intact.
  EXPECT_TRUE(verify_checkpoint(path("e1.pt")).ok);
}

void wait_all(const std::vector<pid_t>& pids, std::vector<int>* statuses = nullptr) {
  for (auto pid : pids) {
    int status = 0;
    waitpid(pid, &status, 0);
    if (statuses) statuses->push_back(status);
  }
}

TEST_F(DistributedTest, ResumeAfterAKillContinuesFromTheLastBackupOnBothRanks) {
  const std::vector<std::string> run = {"TORCHFIT_DIST_BACKUP=1", "TORCHFIT_DIST_EPOCHS=6"};
  auto reference = (dir() / "reference").string(), killed = (dir() / "killed").string();
  fs::create_directories(reference);
  fs::create_directories(killed);
  std::vector<int> statuses;
  wait_all(spawn_ranks(reference, free_port(), false, run), &statuses);
  ASSERT_EQ(statuses, (std::vector<int>{0, 0})) << read_file(reference + "/error0.txt");

  auto pids = spawn_ranks(killed, free_port(), true, run);  // about 1.5 s of training
  EXPECT_TRUE(wait_for(killed + "/backup/backup.pt"));
  EXPECT_TRUE(wait_for_more_batches(killed, 1, 3));  // a few more batches, mid-epoch
  ::kill(pids[1], SIGKILL);
  wait_all(pids);
  ASSERT_TRUE(fs::exists(killed + "/backup/backup.pt")) << "the kill came before the first backup: " << read_file(killed + "/error0.txt");
  ASSERT_FALSE(fs::exists(killed + "/rank0.txt")) << "the run finished before the kill";
  fs::remove(killed + "/error0.txt");

  statuses.clear();
  wait_all(spawn_ranks(killed, free_port(), false, run), &statuses);
  ASSERT_EQ(statuses, (std::vector<int>{0, 0})) << read_file(killed + "/error0.txt") << read_file(killed + "/error1.txt");
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_EQ(read_file(fmt::format("{}/restored{}.txt", killed, rank)), "1");
    EXPECT_EQ(read_file(fmt::format("{}/rank{}.txt", killed, rank)), read_file(reference + "/rank0.txt")) << rank;
    EXPECT_EQ(read_file(fmt::format("{}/history{}.txt", killed, rank)), read_file(reference + "/history0.txt"));
  }
}

TEST_F(DistributedTest, InitFromEnvNamesMissingVariables) {
  ::unsetenv("WORLD_SIZE");
  EXPECT_THROW_MSG(distributed::init_from_env(), ValueError, "WORLD_SIZE is not set");
  ::setenv("WORLD_SIZE", "2", 1);
  ::setenv("RANK", "5", 1);
  EXPECT_THROW_MSG(distributed::init_from_env(), ValueError, "invalid RANK=5");
  ::unsetenv("WORLD_SIZE");
  ::unsetenv("RANK");
}

}  // namespace
}  // namespace torchfit::test
