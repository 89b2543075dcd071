// Crash safety: leftover temporaries, a full disk, and SIGKILL at random points.
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/file.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "io/atomic_file.h"
#include "io/file_release.h"
#include "support.h"

namespace torchfit::test {
namespace {

class DurabilityTest : public TorchfitTest {};

bool is_temporary(const std::string& name) { return name.find(".torchfit-tmp.") != std::string::npos; }

void touch(const std::string& file) { std::ofstream(file) << "partial"; }

TEST_F(DurabilityTest, StaleTemporariesAreRemovedOnTheNextWriteThere) {
  const auto stale = path(".w.pt.torchfit-tmp.999999999.1f");  // nobody holds its lock
  const auto own = path(fmt::format(".w.pt.torchfit-tmp.{}.2a", ::getpid()));  // our pid, but not locked
  const auto live = path(".w.pt.torchfit-tmp.1.3b");  // locked: a writer is at work
  const auto foreign = path(".w.pt.torchfit-tmp.notapid.4c");
  const auto unrelated = path("notes.txt");
  for (const auto& f : {stale, own, live, foreign, unrelated}) touch(f);
  int lock = ::open(live.c_str(), O_RDONLY);
  ASSERT_EQ(::flock(lock, LOCK_EX), 0);
  Mlp model;
  save_weights(*model, path("w.pt"));
  ::close(lock);
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_FALSE(fs::exists(own));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(foreign));
  EXPECT_TRUE(fs::exists(unrelated));
  EXPECT_TRUE(verify_checkpoint(path("w.pt")).ok);
}

/// A tmpfs of `bytes` mounted on a fresh directory; skips the test where mounting is refused.
class SmallDisk {
 public:
  SmallDisk(const fs::path& where, size_t bytes) : where_(where) {
    fs::create_directories(where_);
    auto options = fmt::format("size={}", bytes);
    if (::mount("tmpfs", where_.c_str(), "tmpfs", 0, options.c_str()) != 0) {
      error_ = std::strerror(errno);
    }
  }
  ~SmallDisk() {
    if (error_.empty()) ::umount2(where_.c_str(), MNT_DETACH);
  }
  /// Empty when mounted; otherwise why not.
  const std::string& error() const { return error_; }

 private:
  fs::path where_;
  std::string error_;
};

TEST_F(DurabilityTest, DiskFullKeepsThePreviousCheckpoint) {
  SmallDisk disk(dir() / "small", 256 * 1024);
  if (!disk.error().empty()) GTEST_SKIP() << "cannot mount a tmpfs here (" << disk.error() << "); needs root";
  auto target = path("small/ckpt.pt");
  auto small = torch::nn::Linear(4, 4);
  save_weights(*small, target);
  auto before = read_file(target);
  auto big = torch::nn::Linear(512, 512);  // 1 MiB of weights
  EXPECT_THROW_MSG(save_weights(*big, target), CheckpointError, target, "No space left on device");
  EXPECT_TRUE(read_file(target) == before) << "the previous checkpoint changed";
  EXPECT_EQ(files("small"), (std::vector<std::string>{"ckpt.pt"}));
  EXPECT_TRUE(verify_checkpoint(target).ok);

  // Through the callback, the error reaches fit and the old file survives.
  auto data = make_data();
  auto model = torch::nn::Sequential(torch::nn::Linear(3, 512), torch::nn::Linear(512, 512), torch::nn::Linear(512, 3));
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  Trainer trainer(model, sgd, ce_loss);
  auto cb = std::make_shared<CheckpointCallback>(CheckpointOptions(target));
  EXPECT_THROW_MSG(trainer.fit(data.x_train, data.y_train, FitOptions().callbacks({cb})), CheckpointError, target,
                   "No space left on device");
  EXPECT_TRUE(read_file(target) == before) << "the previous checkpoint changed";
  EXPECT_EQ(files("small"), (std::vector<std::string>{"ckpt.pt"}));
}

/// Descriptors of this process open on deleted files under `dir`.
int deleted_files_held(const std::string& dir) {
  int held = 0;
  for (const auto& entry : fs::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    auto target = fs::read_symlink(entry.path(), ec).string();
    if (!ec && target.rfind(dir, 0) == 0 && target.find(" (deleted)") != std::string::npos) ++held;
  }
  return held;
}

/// A durable file of `bytes` bytes of `fill` through AtomicFile.
void write_atomic(const std::string& target, size_t bytes, char fill) {
  detail::AtomicFile file(target, /*fsync=*/true);
  std::string data(bytes, fill);
  file.write(data.data(), data.size());
  file.commit();
}

TEST_F(DurabilityTest, AReplacedOrRemovedFileIsFreedInTheBackground) {
  // Freeing a replaced file's blocks costs about 0.19 ms per MiB here, so the
  // last close of a large one is left to a background thread.
  torch::nn::Linear big(1024, 1024);  // 4 MiB
  const auto target = path("w.pt");
  save_weights(*big, target);  // nothing replaced
  detail::wait_for_released_files();
  const auto first = detail::files_released_in_background();
  for (int i = 0; i < 3; ++i) {
    {
      torch::NoGradGuard no_grad;
      big->weight.add_(1);
    }
    save_weights(*big, target);
  }
  detail::wait_for_released_files();
  EXPECT_EQ(detail::files_released_in_background(), first + 3);
  EXPECT_EQ(deleted_files_held(dir().string()), 0);
  torch::nn::Linear loaded(1024, 1024);
  load_weights(*loaded, target);
  EXPECT_TRUE(torch::equal(loaded->weight, big->weight));
  EXPECT_EQ(files(), (std::vector<std::string>{"w.pt"}));

  // Small files are freed at once; a file with another link is not freed at all.
  Mlp small;
  save_weights(*small, path("small.pt"));
  save_weights(*small, path("small.pt"));
  fs::create_hard_link(target, path("other_link.pt"));
  const auto linked = read_file(target);
  save_weights(*big, target);
  detail::wait_for_released_files();
  EXPECT_EQ(detail::files_released_in_background(), first + 3);
  EXPECT_EQ(read_file(path("other_link.pt")), linked);

  // Removal: the name goes at once, the blocks in the background.
  FileCheckpointIO().remove(target);
  EXPECT_FALSE(fs::exists(target));
  detail::wait_for_released_files();
  EXPECT_EQ(detail::files_released_in_background(), first + 4);
  EXPECT_EQ(deleted_files_held(dir().string()), 0);
}

TEST_F(DurabilityTest, AForkedChildFreesReplacedFilesItself) {
  // The background thread does not survive fork(), and its lock may have been
  // copied held: a child closes at once.
  const auto target = path("raw.bin");
  write_atomic(target, 2 << 20, 'a');
  write_atomic(target, 2 << 20, 'b');  // the parent's thread exists from here on
  detail::wait_for_released_files();    // so the child inherits no held file
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const auto before = detail::files_released_in_background();
    write_atomic(target, 2 << 20, 'c');
    bool ok = deleted_files_held(dir().string()) == 0 && detail::files_released_in_background() == before &&
              read_file(target) == std::string(2 << 20, 'c');
    ::_exit(ok ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child held a replaced file or lost its write";
}

TEST_F(DurabilityTest, AFullDiskWaitsForTheSpaceOfReplacedFiles) {
  // Space a replaced file frees in the background counts: a write that finds
  // the disk full waits for it before it gives up.
  SmallDisk disk(dir() / "small", 7 << 20);
  if (!disk.error().empty()) GTEST_SKIP() << "cannot mount a tmpfs here (" << disk.error() << "); needs root";
  write_atomic(path("small/a.bin"), 2 << 20, 'a');
  detail::ReleasesPaused paused;  // the background thread has not got to it yet
  write_atomic(path("small/a.bin"), 2 << 20, 'b');
  EXPECT_EQ(deleted_files_held(dir().string()), 1);
  write_atomic(path("small/b.bin"), 4 << 20, 'c');  // 2 + 4 MiB fit 7 MiB; with the old 2 MiB they do not
  EXPECT_EQ(deleted_files_held(dir().string()), 0);
  EXPECT_EQ(read_file(path("small/a.bin")), std::string(2 << 20, 'b'));
  EXPECT_EQ(read_file(path("small/b.bin")), std::string(4 << 20, 'c'));

  // Where nothing is being freed, a full disk fails the write as before.
  EXPECT_THROW_MSG(write_atomic(path("small/c.bin"), 2 << 20, 'd'), CheckpointError, "No space left on device");
  EXPECT_FALSE(fs::exists(path("small/c.bin")));
}

/// Saves a 64 MiB model durably over an older save, with every writeback wait
/// of the streamed write from the 1st to the last failing in turn (EIO, from
/// the LD_PRELOAD shim). Writes "<cases> <problems>" to TORCHFIT_WRITEBACK_OUT.
TEST(FaultChild, SaveUnderWritebackEio) {
  const char* out = std::getenv("TORCHFIT_WRITEBACK_OUT");
  if (out == nullptr) GTEST_SKIP() << "run by AWritebackErrorFailsTheSaveAndKeepsThePreviousFile";
  auto arm = reinterpret_cast<void (*)(long)>(::dlsym(RTLD_DEFAULT, "torchfit_fail_writeback_after"));
  ASSERT_NE(arm, nullptr) << "the fault shim is not preloaded";
  const std::string dir = std::getenv("TORCHFIT_WRITEBACK_DIR");
  const std::string target = dir + "/w.pt";
  torch::nn::Linear model(4096, 4096);
  save_weights(*model, target);
  const auto before = read_file(target);
  {
    torch::NoGradGuard no_grad;
    model->weight.add_(1);
  }
  int cases = 0, problems = 0;
  for (long n = 1; n < 100; ++n) {
    arm(n);
    bool failed = false;
    try {
      save_weights(*model, target);
    } catch (const CheckpointError& e) {
      failed = true;
      std::string msg = e.what();
      if (msg.find("Failed writing file " + target + ": Input/output error") == std::string::npos) ++problems;
    }
    arm(0);
    if (!failed) break;  // the n-th wait never came: every wait has failed once
    ++cases;
    if (read_file(target) != before) ++problems;
    for (const auto& entry : fs::directory_iterator(dir)) {
      if (entry.path().filename() != "w.pt") ++problems;  // a temporary left behind
    }
  }
  std::ofstream(out) << cases << " " << problems;
}

TEST_F(DurabilityTest, AWritebackErrorFailsTheSaveAndKeepsThePreviousFile) {
  // A durable save waits for its written chunks as it streams; an error seen
  // there is reported there (fsync would not see it again).
  fs::create_directories(path("saves"));
  pid_t child = spawn_self("FaultChild.SaveUnderWritebackEio",
                           {std::string("LD_PRELOAD=") + TORCHFIT_FAIL_READ_LIB, "TORCHFIT_WRITEBACK_DIR=" + path("saves"),
                            "TORCHFIT_WRITEBACK_OUT=" + path("out.txt")});
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  std::istringstream result(read_file(path("out.txt")));
  int cases = -1, problems = -1;
  result >> cases >> problems;
  EXPECT_GE(cases, 2);  // 64 MiB stream in 8 MiB chunks, three in flight
  EXPECT_EQ(problems, 0);
}

// The child side of KillTest: saves until killed. Runs only when the parent
// sets TORCHFIT_KILL_CHILD_DIR.
TEST(KillChild, SaveForever) {
  const char* dir = std::getenv("TORCHFIT_KILL_CHILD_DIR");
  if (dir == nullptr) GTEST_SKIP() << "only run as the child of KillTest";
  auto data = make_data(40, 10);
  auto model = torch::nn::Sequential(torch::nn::Linear(3, 256), torch::nn::ReLU(), torch::nn::Linear(256, 3));
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-3);
  Trainer trainer(model, adam, ce_loss);
  std::string base = dir;
  auto best = std::make_shared<CheckpointCallback>(
      CheckpointOptions(base + "/best.pt").monitor("loss").save_best_only(true).save_freq(SaveFreq::batches(1)));
  auto every = std::make_shared<CheckpointCallback>(
      CheckpointOptions(base + "/e{epoch:03d}b{batch}.pt").save_freq(SaveFreq::batches(3)).save_weights_only(true).save_last(true));
  auto full = std::make_shared<CheckpointCallback>(CheckpointOptions(base + "/last.pt").save_freq(SaveFreq::batches(2)));
  // Tells the parent that saving has begun (after the first batch's save).
  auto started = std::make_shared<LambdaCallback>();
  started->train_batch_end = [mark = std::string(std::getenv("TORCHFIT_KILL_CHILD_MARK"))](int64_t, const Logs&) {
    if (!fs::exists(mark)) std::ofstream(mark) << "saving";
  };
  trainer.fit(data.x_train, data.y_train,
              FitOptions().epochs(1000000).batch_size(4).callbacks({best, every, full, started}));
}

TEST_F(DurabilityTest, SigkillAtRandomPointsNeverLeavesABadCheckpoint) {
  std::mt19937 rng(1234);
  const int rounds = 30;
  int checked = 0, temporaries = 0;
  auto round_dir = path("run");
  for (int round = 0; round < rounds; ++round) {
    auto mark = path(fmt::format("saving-{}", round));
    pid_t pid = spawn_self("KillChild.SaveForever",
                           {"TORCHFIT_KILL_CHILD_DIR=" + round_dir, "TORCHFIT_KILL_CHILD_MARK=" + mark});
    // Once the child saves (start-up time varies with the machine's load), kill at a random later point.
    for (int i = 0; i < 12000 && !fs::exists(mark); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    ASSERT_TRUE(fs::exists(mark)) << "the child did not start saving within a minute";
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 400));
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the child ended on its own, status " << status;
    auto latest = latest_checkpoint(round_dir);
    if (fs::exists(round_dir + "/" + kLatestPointer)) {
      // The pointer is never torn: it names a file that exists and verifies.
      auto named = read_file(round_dir + "/" + kLatestPointer);
      ASSERT_FALSE(named.empty());
      ASSERT_EQ(latest, round_dir + "/" + named.substr(0, named.size() - 1)) << "round " << round;
    }
    for (const auto& name : files("run")) {
      if (is_temporary(name)) {
        ++temporaries;
        continue;
      }
      if (name == kLatestPointer) continue;
      auto file = round_dir + "/" + name;
      auto result = verify_checkpoint(file);
      ASSERT_TRUE(result.ok) << "round " << round << ": " << file << ": " << result.reason;
      auto model = torch::nn::Sequential(torch::nn::Linear(3, 256), torch::nn::ReLU(), torch::nn::Linear(256, 3));
      ASSERT_NO_THROW(load_weights(*model, file)) << file;
      ++checked;
    }
  }
  EXPECT_GT(checked, rounds);  // the child really saved
  RecordProperty("checked_files", checked);
  RecordProperty("temporaries_seen", temporaries);
  // The next start in the directory clears what the killed writers left.
  Mlp model;
  save_weights(*model, round_dir + "/probe.pt");
  for (const auto& name : files("run")) EXPECT_FALSE(is_temporary(name)) << name;
}

}  // namespace
}  // namespace torchfit::test
