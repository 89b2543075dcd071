// BackupAndRestore: a fit killed with SIGKILL and restarted ends bitwise equal
// to an uninterrupted one, at epoch and at batch level.
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <fstream>
#include <random>
#include <thread>

#include "format/checkpoint_file.h"
#include "support.h"

namespace torchfit::test {
namespace {

class BackupTest : public TorchfitTest {};

/// Slows training down so a kill lands in the middle of it.
class Sleep : public Callback {
  void on_train_batch_end(int64_t, const Logs&) override { std::this_thread::sleep_for(std::chrono::milliseconds(15)); }
};

std::string history_text(const History& history) {
  std::string out = fmt::format("epochs {}\n", fmt::join(history.epoch, ","));
  for (const auto& [key, values] : history.history) out += fmt::format("{} {}\n", key, fmt::join(values, ","));
  return out;
}

// The child side: trains with a backup; writes the final weights and history.
TEST(BackupChild, Train) {
  const char* dir_env = std::getenv("TORCHFIT_BACKUP_CHILD_DIR");
  if (dir_env == nullptr) GTEST_SKIP() << "only run as the child of BackupTest";
  std::string dir = dir_env;
  bool batch_level = std::string(std::getenv("TORCHFIT_BACKUP_FREQ")) == "batch";
  const std::string schedule = std::getenv("TORCHFIT_BACKUP_SCHEDULE");
  auto data = make_data(40, 10);
  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(3, 32), torch::nn::ReLU(), torch::nn::Dropout(0.3),
                                     torch::nn::Linear(32, 3));
  std::shared_ptr<torch::optim::Optimizer> optimizer;
  if (schedule == "none") {
    optimizer = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-2);
  } else {
    optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  }
  Trainer trainer(model, optimizer, ce_loss, {metrics::accuracy()});
  auto backup = std::make_shared<BackupAndRestore>(
      BackupOptions(dir + "/backup").save_freq(batch_level ? SaveFreq::batches(3) : SaveFreq::epoch()));
  auto best = std::make_shared<CheckpointCallback>(CheckpointOptions(dir + "/best.pt").save_best_only(true));
  std::vector<std::shared_ptr<Callback>> callbacks{backup, best, std::make_shared<Sleep>()};
  if (schedule == "step") {
    callbacks.push_back(std::make_shared<LearningRateScheduler>(
        [](int64_t epoch, double lr) { return epoch >= 2 ? lr * 0.5 : lr; }));
  } else if (schedule == "plateau") {
    // A min_delta no epoch meets: every second epoch without "improvement" halves the lr,
    // so a resume that lost the counter or the lr would train differently.
    callbacks.push_back(std::make_shared<ReduceLROnPlateau>(
        ReduceLROnPlateauOptions().monitor("val_loss").factor(0.5).patience(2).min_delta(10.0)));
  }
  auto history = trainer.fit(data.x_train, data.y_train,
                             FitOptions().epochs(6).batch_size(5).seed(7).validation_data(data.x_test, data.y_test)
                                 .gradient_accumulation_steps(schedule == "accumulate" ? 4 : 1)
                                 .callbacks(callbacks));
  save_weights(*model, dir + "/final.pt");
  std::ofstream(dir + "/history.txt") << history_text(history);
  std::ofstream(dir + "/restored.txt") << backup->restored();
  std::ofstream(dir + "/lr.txt") << fmt::format("{}", optimizer->param_groups()[0].options().get_lr());
}

pid_t spawn_child(const std::string& dir, const std::string& freq, const std::string& schedule) {
  return spawn_self("BackupChild.Train", {"TORCHFIT_BACKUP_CHILD_DIR=" + dir, "TORCHFIT_BACKUP_FREQ=" + freq,
                                          "TORCHFIT_BACKUP_SCHEDULE=" + schedule});
}

int run_child(const std::string& dir, const std::string& freq, const std::string& schedule) {
  pid_t pid = spawn_child(dir, freq, schedule);
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}

/// The batches of the unfinished accumulation window a full checkpoint holds.
int64_t accumulated_batches(const std::string& path) {
  auto items = detail::CheckpointFile(path).read_torchfit().toGenericDict();
  return items.at("gradients").toGenericDict().at("batches").toInt();
}

void expect_bitwise_resume(TorchfitTest& test, const fs::path& root, const std::string& freq, std::mt19937& rng,
                           int rounds, const std::string& schedule = "none") {
  auto reference = (root / (freq + "-reference")).string();
  ASSERT_EQ(run_child(reference, freq, schedule), 0);
  int resumed = 0, mid_window = 0;
  for (int round = 0; round < rounds; ++round) {
    auto dir = (root / fmt::format("{}-killed-{}", freq, round)).string();
    pid_t pid = spawn_child(dir, freq, schedule);
    // Once the first backup exists (start-up takes a varying time), kill at a random later point.
    for (int i = 0; i < 3000 && !fs::exists(dir + "/backup/backup.pt"); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 300));
    ::kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the run finished before the kill; slow it down";
    bool had_backup = fs::exists(dir + "/backup/backup.pt");
    if (had_backup) mid_window += accumulated_batches(dir + "/backup/backup.pt") > 0;
    ASSERT_EQ(run_child(dir, freq, schedule), 0);
    EXPECT_EQ(read_file(dir + "/restored.txt"), had_backup ? "1" : "0");
    resumed += had_backup;
    EXPECT_EQ(read_file(dir + "/history.txt"), read_file(reference + "/history.txt")) << dir;
    auto expected = read_weights(reference + "/final.pt"), actual = read_weights(dir + "/final.pt");
    for (const auto& [name, tensor] : expected) EXPECT_TRUE(torch::equal(tensor, actual.at(name))) << dir << " " << name;
    EXPECT_EQ(read_file(dir + "/lr.txt"), read_file(reference + "/lr.txt")) << dir;
    EXPECT_TRUE(read_file(dir + "/best.pt").size() > 0);
    EXPECT_FALSE(fs::exists(dir + "/backup")) << "delete_checkpoint leaves no backup behind";
  }
  EXPECT_GT(resumed, 0) << "no kill landed after a backup";
  if (schedule == "accumulate") EXPECT_GT(mid_window, 0) << "no kill landed after a backup inside a window";
}

TEST_F(BackupTest, KilledAndRestartedRunIsBitwiseEqualAtEpochLevel) {
  std::mt19937 rng(11);
  expect_bitwise_resume(*this, dir(), "epoch", rng, 3);
}

TEST_F(BackupTest, KilledAndRestartedRunIsBitwiseEqualAtBatchLevel) {
  std::mt19937 rng(12);
  expect_bitwise_resume(*this, dir(), "batch", rng, 3);
}

TEST_F(BackupTest, KilledAndRestartedRunUnderAScheduleIsBitwiseEqual) {
  std::mt19937 rng(13);
  expect_bitwise_resume(*this, dir(), "epoch", rng, 3, "step");
  EXPECT_EQ(read_file(path("epoch-reference/lr.txt")), "0.003125") << "halved at the start of epochs 3 to 6";
}

TEST_F(BackupTest, KilledAndRestartedRunUnderReduceLROnPlateauIsBitwiseEqual) {
  std::mt19937 rng(14);
  expect_bitwise_resume(*this, dir(), "epoch", rng, 3, "plateau");
  EXPECT_EQ(read_file(path("epoch-reference/lr.txt")), "0.0125") << "reduced at the end of epochs 3 and 5";
}

TEST_F(BackupTest, KilledAndRestartedRunInsideAnAccumulationWindowIsBitwiseEqual) {
  // Backups every 3 batches with windows of 4: three in four fall inside a window,
  // whose gradients so far the resumed run must continue from.
  std::mt19937 rng(15);
  expect_bitwise_resume(*this, dir(), "batch", rng, 4, "accumulate");
}

TEST_F(BackupTest, AWindowsGradientsAreCheckedAndNeedTheSameAccumulation) {
  auto data = make_data();  // 30 samples: 3 batches of 10, one window of 3
  Mlp model;
  Trainer trainer(model, std::make_shared<torch::optim::SGD>(model->parameters(), 0.1), ce_loss);
  auto save_mid_window = std::make_shared<LambdaCallback>();
  save_mid_window->train_batch_end = [&](int64_t batch, const Logs&) {
    if (batch == 1) trainer.save_checkpoint(path("mid.pt"));  // two of the window's three batches done
  };
  trainer.fit(data.x_train, data.y_train,
              FitOptions().epochs(1).batch_size(10).gradient_accumulation_steps(3).callbacks({save_mid_window}));
  ASSERT_EQ(accumulated_batches(path("mid.pt")), 2);
  auto items = detail::CheckpointFile(path("mid.pt")).read_torchfit().toGenericDict();
  EXPECT_EQ(items.at("gradients").toGenericDict().at("grads").toGenericDict().size(), 4u);

  {  // Another accumulation cannot continue that window: its gradients are dropped, with a warning.
    Mlp other;
    Trainer resumed(other, std::make_shared<torch::optim::SGD>(other->parameters(), 0.1), ce_loss);
    resumed.load_checkpoint(path("mid.pt"));
    LogCapture logs;
    resumed.fit(data.x_train, data.y_train, FitOptions().epochs(1).batch_size(10).gradient_accumulation_steps(2));
    EXPECT_NE(logs.text().find("saved 2 batches into a window of 3 accumulated batches; this fit accumulates 2"),
              std::string::npos)
        << logs.text();
  }

  // A window that cannot be is refused with the file's path, before anything is loaded.
  auto gradients = items.at("gradients").toGenericDict();
  gradients.insert_or_assign("batches", int64_t(5));
  FileCheckpointIO().save(items, path("bad.pt"), {});
  Mlp third;
  Trainer refusing(third, std::make_shared<torch::optim::SGD>(third->parameters(), 0.1), ce_loss);
  auto before = third->fc1->weight.clone();
  EXPECT_THROW_MSG(refusing.load_checkpoint(path("bad.pt")), CheckpointError, path("bad.pt"),
                   "accumulated gradients: 5 batches in a window of 3");
  EXPECT_TRUE(torch::equal(third->fc1->weight, before)) << "a refused checkpoint changed the model";
}

TEST_F(BackupTest, DoubleCheckpointFallsBackToThePreviousBackup) {
  auto data = make_data();
  auto s = make_setup();
  auto options = BackupOptions(path("backup")).double_checkpoint(true).delete_checkpoint(false);
  auto first = std::make_shared<BackupAndRestore>(options);
  s.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(3).batch_size(10).seed(1).callbacks({first}));
  ASSERT_TRUE(fs::exists(first->backup_path()));
  ASSERT_TRUE(fs::exists(first->previous_backup_path()));
  std::ofstream(first->backup_path(), std::ios::binary) << "torn";  // the newest is damaged

  auto again = make_setup();
  auto second = std::make_shared<BackupAndRestore>(options);
  LogCapture capture;
  auto history = again.trainer->fit(data.x_train, data.y_train,
                                    FitOptions().epochs(3).batch_size(10).seed(1).callbacks({second}));
  EXPECT_TRUE(second->restored());
  // Backups are taken at epoch starts: the previous one is from the start of epoch 2.
  EXPECT_EQ(history.epoch, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_NE(capture.text().find("skipping backup " + first->backup_path()), std::string::npos) << capture.text();
}

TEST_F(BackupTest, DamagedOnlyBackupIsAnError) {
  fs::create_directories(path("backup"));
  std::ofstream(path("backup/backup.pt"), std::ios::binary) << "torn";
  auto data = make_data();
  auto s = make_setup();
  auto backup = std::make_shared<BackupAndRestore>(BackupOptions(path("backup")));
  EXPECT_THROW_MSG(s.trainer->fit(data.x_train, data.y_train, FitOptions().callbacks({backup})), CheckpointError,
                   "no usable backup in " + path("backup"), "double_checkpoint");
}

TEST_F(BackupTest, BackupIsKeptWhenTrainingFails) {
  auto data = make_data();
  auto s = make_setup();
  class Fail : public Callback {
    void on_epoch_end(int64_t epoch, const Logs&) override {
      if (epoch == 1) throw std::runtime_error("boom");
    }
  };
  auto backup = std::make_shared<BackupAndRestore>(BackupOptions(path("backup")));
  EXPECT_THROW(s.trainer->fit(data.x_train, data.y_train,
                              FitOptions().epochs(4).batch_size(10).callbacks({backup, std::make_shared<Fail>()})),
               std::runtime_error);
  EXPECT_TRUE(verify_checkpoint(backup->backup_path()).ok);
}

// Backups through a storage that is not files: every read, write, rename and removal goes
// through the CheckpointIO, and an interrupted fit resumes from it bitwise.
TEST_F(BackupTest, BackupAndRestoreRunsOnAnInMemoryStorage) {
  auto data = make_data();
  struct Run {
    Harness setup;
    std::shared_ptr<BackupAndRestore> backup;
  };
  // `init_seed` sets the initial weights: the resumed run's differ, so only a restore makes it match.
  auto run = [&](std::shared_ptr<MemoryCheckpointIO> storage, bool interrupt, uint64_t init_seed) {
    torch::manual_seed(init_seed);
    Run r{make_setup(), std::make_shared<BackupAndRestore>(BackupOptions(path("mem/backup"))
                                                               .save_freq(SaveFreq::batches(2))
                                                               .double_checkpoint(true)
                                                               .io(storage))};
    class Interrupt : public Callback {
      void on_train_batch_end(int64_t, const Logs&) override {
        if (++batches == 7) throw std::runtime_error("killed");
      }
      int batches = 0;
    };
    std::vector<std::shared_ptr<Callback>> callbacks{r.backup};
    if (interrupt) callbacks.push_back(std::make_shared<Interrupt>());
    try {
      r.setup.trainer->fit(data.x_train, data.y_train,
                           FitOptions().epochs(3).batch_size(10).seed(1).callbacks(callbacks));
    } catch (const std::runtime_error&) {
      EXPECT_TRUE(interrupt);
    }
    return r;
  };
  auto storage = std::make_shared<MemoryCheckpointIO>();
  run(storage, /*interrupt=*/true, 0);
  EXPECT_EQ(storage->paths(),
            (std::vector<std::string>{path("mem/backup/backup.prev.pt"), path("mem/backup/backup.pt")}));
  EXPECT_FALSE(fs::exists(path("mem"))) << "nothing may reach the file system";
  auto resumed = run(storage, /*interrupt=*/false, 5);
  EXPECT_TRUE(resumed.backup->restored());
  EXPECT_TRUE(storage->paths().empty()) << "the backups are removed at the end";
  auto whole = run(std::make_shared<MemoryCheckpointIO>(), /*interrupt=*/false, 0);
  EXPECT_FALSE(whole.backup->restored());
  for (const auto& [name, tensor] : state_dict(*whole.setup.model)) {
    EXPECT_TRUE(torch::equal(tensor, state_dict(*resumed.setup.model).at(name))) << name;
  }
}

}  // namespace
}  // namespace torchfit::test
