// Companion callbacks: CSVLogger, TerminateOnNaN, LambdaCallback and the lr callbacks.
#include <cmath>
#include <fstream>

#include "support.h"

namespace torchfit::test {
namespace {

class CompanionTest : public TorchfitTest {
 protected:
  void SetUp() override {
    TorchfitTest::SetUp();
    data_ = make_data();
    setup_ = make_setup();
  }
  History fit(std::vector<std::shared_ptr<Callback>> callbacks, int64_t epochs, FitOptions options = FitOptions()) {
    return setup_.trainer->fit(data_.x_train, data_.y_train,
                               options.epochs(epochs).batch_size(10).callbacks(std::move(callbacks)));
  }
  double lr() const { return setup_.optimizer->param_groups()[0].options().get_lr(); }

  Dataset data_;
  Harness setup_;
};

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

TEST_F(CompanionTest, CsvLoggerWritesEpochAndSortedKeys) {
  auto csv = std::make_shared<CSVLogger>(path("log.csv"));
  auto history = fit({csv}, 2, FitOptions().validation_data(data_.x_test, data_.y_test));
  auto lines = lines_of(read_file(path("log.csv")));
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0], "epoch,accuracy,loss,val_accuracy,val_loss");
  EXPECT_EQ(lines[1], fmt::format("0,{},{},{},{}", history.history["accuracy"][0], history.history["loss"][0],
                                  history.history["val_accuracy"][0], history.history["val_loss"][0]));
}

TEST_F(CompanionTest, CsvLoggerAppendContinuesWithoutAHeader) {
  fit({std::make_shared<CSVLogger>(path("log.csv"), ';', true)}, 2);
  setup_.trainer->save_checkpoint(path("ckpt.pt"));
  auto resumed = make_setup();
  resumed.trainer->load_checkpoint(path("ckpt.pt"));
  resumed.trainer->fit(data_.x_train, data_.y_train,
                       FitOptions().epochs(4).batch_size(10).callbacks({std::make_shared<CSVLogger>(path("log.csv"), ';', true)}));
  auto lines = lines_of(read_file(path("log.csv")));
  ASSERT_EQ(lines.size(), 5u);
  EXPECT_EQ(lines[0], "epoch;accuracy;loss");
  for (int epoch = 0; epoch < 4; ++epoch) EXPECT_EQ(lines[epoch + 1].substr(0, 2), fmt::format("{};", epoch));
  // Without append the file starts over.
  fit({std::make_shared<CSVLogger>(path("log.csv"), ';')}, 1);
  EXPECT_EQ(lines_of(read_file(path("log.csv"))).size(), 2u);
}

TEST_F(CompanionTest, CsvLoggerUnwritablePathFailsBeforeTrainingAndNamesIt) {
  std::ofstream(path("blocker")) << "x";
  EXPECT_THROW_MSG(fit({std::make_shared<CSVLogger>(path("blocker/log.csv"))}, 1), CheckpointError,
                   "CSVLogger: cannot create the directory " + path("blocker") + ": " + path("blocker") +
                       " is not a directory");
  EXPECT_EQ(setup_.trainer->state().global_step, 0);
  // A missing directory is created.
  fit({std::make_shared<CSVLogger>(path("logs/run1/log.csv"))}, 1);
  EXPECT_EQ(lines_of(read_file(path("logs/run1/log.csv"))).size(), 2u);
}

/// Throws at the end of epoch `epoch`, as a crash would end the run there.
class CrashAtEpochEnd : public Callback {
 public:
  explicit CrashAtEpochEnd(int64_t epoch) : epoch_(epoch) {}
  void on_epoch_end(int64_t epoch, const Logs&) override {
    if (epoch == epoch_) throw std::runtime_error("crash");
  }

 private:
  int64_t epoch_;
};

TEST_F(CompanionTest, CsvLoggerContinuesARunResumedByBackupAndRestore) {
  auto options = BackupOptions(path("backup")).delete_checkpoint(false);
  auto run = [&](std::vector<std::shared_ptr<Callback>> extra) {
    std::vector<std::shared_ptr<Callback>> callbacks{std::make_shared<BackupAndRestore>(options),
                                                     std::make_shared<CSVLogger>(path("log.csv"))};
    for (auto& callback : extra) callbacks.push_back(callback);
    return fit(callbacks, 4);
  };
  // The crash comes after epoch 2's row is written, but the backup is epoch 2's start.
  EXPECT_THROW(run({std::make_shared<CrashAtEpochEnd>(2)}), std::runtime_error);
  ASSERT_EQ(lines_of(read_file(path("log.csv"))).size(), 4u);
  auto before = lines_of(read_file(path("log.csv")));
  auto history = run({});
  auto lines = lines_of(read_file(path("log.csv")));
  ASSERT_EQ(lines.size(), 5u) << read_file(path("log.csv"));
  EXPECT_EQ(lines[0], "epoch,accuracy,loss");
  EXPECT_EQ(lines[1], before[1]);
  EXPECT_EQ(lines[2], before[2]);
  for (size_t epoch = 0; epoch < 4; ++epoch) {
    EXPECT_EQ(lines[epoch + 1], fmt::format("{},{},{}", epoch, history.history.at("accuracy")[epoch],
                                            history.history.at("loss")[epoch]));
  }
}

TEST_F(CompanionTest, CsvLoggerContinuesARunResumedByLoadCheckpoint) {
  auto checkpoints = std::make_shared<CheckpointCallback>(CheckpointOptions(path("ckpt/{epoch}.pt")));
  fit({std::make_shared<CSVLogger>(path("log.csv")), checkpoints}, 3);
  auto resumed = make_setup();
  resumed.trainer->load_checkpoint(path("ckpt/2.pt"));  // after epoch index 1
  resumed.trainer->fit(data_.x_train, data_.y_train,
                       FitOptions().epochs(3).batch_size(10).callbacks({std::make_shared<CSVLogger>(path("log.csv"))}));
  auto lines = lines_of(read_file(path("log.csv")));
  ASSERT_EQ(lines.size(), 4u) << read_file(path("log.csv"));
  for (int epoch = 0; epoch < 3; ++epoch) EXPECT_EQ(lines[epoch + 1].substr(0, 2), fmt::format("{},", epoch));
}

TEST_F(CompanionTest, TerminateOnNaNStopsAtTheBadBatch) {
  auto model = Mlp();
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  int calls = 0;
  Trainer trainer(model, sgd, [&](const torch::Tensor& o, const torch::Tensor& t) {
    auto loss = ce_loss(o, t);
    return ++calls == 4 ? loss * std::nan("") : loss;
  });
  LogCapture capture;
  auto history = trainer.fit(data_.x_train, data_.y_train,
                             FitOptions().epochs(5).batch_size(10).callbacks({std::make_shared<TerminateOnNaN>()}));
  EXPECT_EQ(calls, 4);
  EXPECT_EQ(history.epoch, (std::vector<int64_t>{0, 1}));  // 3 batches an epoch: the 4th is in epoch 1
  EXPECT_NE(capture.text().find("Batch 0: Invalid loss, terminating training"), std::string::npos) << capture.text();
}

TEST_F(CompanionTest, LambdaCallbackCallsWhatIsSet) {
  auto lambda = std::make_shared<LambdaCallback>();
  std::vector<std::string> seen;
  lambda->train_begin = [&](const Logs&) { seen.push_back("begin"); };
  lambda->epoch_end = [&](int64_t epoch, const Logs& logs) { seen.push_back(fmt::format("epoch {} {}", epoch, logs.count("loss"))); };
  lambda->train_end = [&](const Logs&) { seen.push_back("end"); };
  fit({lambda}, 2);
  EXPECT_EQ(seen, (std::vector<std::string>{"begin", "epoch 0 1", "epoch 1 1", "end"}));
}

TEST_F(CompanionTest, LearningRateSchedulerSetsEveryGroup) {
  setup_.optimizer->add_param_group(torch::optim::OptimizerParamGroup({torch::zeros({1}, torch::requires_grad())},
                                                                      std::make_unique<torch::optim::SGDOptions>(0.5)));
  std::vector<double> seen;
  auto schedule = std::make_shared<LearningRateScheduler>([&](int64_t epoch, double lr) {
    seen.push_back(lr);
    return epoch < 1 ? lr : lr * 0.5;
  });
  fit({schedule}, 3);
  EXPECT_EQ(seen, (std::vector<double>{0.1, 0.1, 0.05}));
  for (const auto& group : setup_.optimizer->param_groups()) EXPECT_DOUBLE_EQ(group.options().get_lr(), 0.025);
  auto bad = std::make_shared<LearningRateScheduler>([](int64_t, double) { return std::nan(""); });
  EXPECT_THROW_MSG(fit({bad}, 1), ValueError, "returned lr=nan at epoch 0");
}

TEST_F(CompanionTest, ReduceLROnPlateauReducesAfterPatience) {
  ReduceLROnPlateau reduce(ReduceLROnPlateauOptions().monitor("val_loss").patience(2).factor(0.5).cooldown(1).min_lr(0.02).verbose(1));
  reduce.set_trainer(setup_.trainer.get());
  reduce.on_train_begin({});
  LogCapture capture;
  std::vector<double> lrs;
  const std::vector<double> losses = {1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0, 1.1, 1.2};
  for (size_t e = 0; e < losses.size(); ++e) {
    reduce.on_epoch_end(static_cast<int64_t>(e), {{"val_loss", losses[e]}});
    lrs.push_back(lr());
  }
  // Plateau from epoch 2: reduce at 3; as in Keras the cooldown epoch also counts
  // once its counter runs out, so reduce again at 5 and 7, where min_lr holds.
  EXPECT_EQ(lrs, (std::vector<double>{0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.02, 0.02, 0.02}));
  EXPECT_NE(capture.text().find("Epoch 4: ReduceLROnPlateau reducing learning rate to 0.05."), std::string::npos)
      << capture.text();
  EXPECT_THROW_MSG(ReduceLROnPlateau(ReduceLROnPlateauOptions().factor(1.0)), ValueError,
                   "ReduceLROnPlateau does not support a factor >= 1.0");
}

TEST_F(CompanionTest, ReduceLROnPlateauMinDeltaAndMaxMode) {
  ReduceLROnPlateau reduce(ReduceLROnPlateauOptions().monitor("val_accuracy").patience(1).min_delta(0.1));
  reduce.set_trainer(setup_.trainer.get());
  reduce.on_train_begin({});
  EXPECT_EQ(reduce.mode(), Mode::Max);
  reduce.on_epoch_end(0, {{"val_accuracy", 0.5}});
  reduce.on_epoch_end(1, {{"val_accuracy", 0.55}});  // not 0.1 better
  EXPECT_DOUBLE_EQ(lr(), 0.01);
}

}  // namespace
}  // namespace torchfit::test
