// Keras's model_checkpoint_test.py scenarios that need a real fit, ported, plus our
// own edge cases. Scripted scenarios run through the callback and the manager alike
// in save_decision_test.cpp.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>

#include "support.h"

namespace torchfit::test {
namespace {

class CheckpointTest : public TorchfitTest {
 protected:
  void SetUp() override {
    TorchfitTest::SetUp();
    data_ = make_data();
    setup_ = make_setup();
  }

  History fit(std::shared_ptr<Callback> callback, int64_t epochs = 1, int64_t batch_size = 5) {
    return setup_.trainer->fit(data_.x_train, data_.y_train,
                               FitOptions()
                                   .epochs(epochs)
                                   .batch_size(batch_size)
                                   .seed(1)
                                   .validation_data(data_.x_test, data_.y_test)
                                   .callbacks({std::move(callback)}));
  }

  std::shared_ptr<CheckpointCallback> checkpoint(const CheckpointOptions& options) {
    return std::make_shared<CheckpointCallback>(options);
  }

  Dataset data_;
  Harness setup_;
};

TEST_F(CheckpointTest, CreatesMissingSubdirectory) {
  auto file = path("subdir/checkpoint.pt");
  fit(checkpoint(CheckpointOptions(file).monitor("val_loss")));
  EXPECT_TRUE(fs::exists(file));
}

TEST_F(CheckpointTest, DoesNotCreateDirectoryWithoutSaving) {
  fit(checkpoint(CheckpointOptions(path("never/checkpoint.pt"))
                     .save_best_only(true)
                     .initial_value_threshold(0.0)
                     .mode(Mode::Min)));
  EXPECT_FALSE(fs::exists(path("never")));
}

TEST_F(CheckpointTest, ModeMinOnValLoss) {
  auto file = path("checkpoint.pt");
  fit(checkpoint(CheckpointOptions(file).monitor("val_loss").mode(Mode::Min)));
  EXPECT_TRUE(fs::exists(file));
}

TEST_F(CheckpointTest, ModeMaxOnValAccuracy) {
  auto file = path("checkpoint.pt");
  fit(checkpoint(CheckpointOptions(file).monitor("val_accuracy").mode(Mode::Max)));
  EXPECT_TRUE(fs::exists(file));
}

TEST_F(CheckpointTest, SaveBestOnlySavesOnFirstEpoch) {
  auto file = path("checkpoint.pt");
  auto cb = checkpoint(CheckpointOptions(file).monitor("val_accuracy").mode(Mode::Max).save_best_only(true));
  auto history = fit(cb);
  EXPECT_TRUE(fs::exists(file));
  ASSERT_TRUE(cb->best().has_value());
  EXPECT_EQ(*cb->best(), history.history.at("val_accuracy").at(0));
  EXPECT_EQ(cb->last_saved_path(), file);
}

TEST_F(CheckpointTest, UnknownMonitorWarnsAndSaves) {
  auto file = path("checkpoint.pt");
  LogCapture capture;
  fit(checkpoint(CheckpointOptions(file).monitor("unknown").mode(Mode::Min).save_best_only(true)));
  EXPECT_TRUE(fs::exists(file));
  EXPECT_NE(capture.text().find("Can save best model only with unknown available"), std::string::npos)
      << capture.text();
}

TEST_F(CheckpointTest, AutoModeWithUnknownDirectionFailsAtTrainBegin) {
  auto cb = checkpoint(CheckpointOptions(path("c.pt")).monitor("unknown").save_best_only(true));
  EXPECT_THROW_MSG(fit(cb), ValueError, "monitor=unknown", "Mode::Max", "Mode::Min");
  EXPECT_TRUE(files().empty());
}

TEST_F(CheckpointTest, MisspeltMonitorNamesTheNearestKey) {
  auto cb = checkpoint(CheckpointOptions(path("c.pt")).monitor("val_acuracy").save_best_only(true));
  try {
    fit(cb);
    FAIL() << "expected ValueError";
  } catch (const ValueError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("monitor=val_acuracy, which is not a metric of this run. Did you mean 'val_accuracy'?"),
              std::string::npos)
        << msg;
    EXPECT_EQ(msg.find("Mode::Max"), std::string::npos) << msg;  // the advice is about the name, not the mode
  }
  // With an explicit mode the name is only checked at the save point: the warning names it too.
  LogCapture capture;
  fit(checkpoint(CheckpointOptions(path("d.pt")).monitor("val_los").mode(Mode::Min).save_best_only(true)));
  EXPECT_NE(capture.text().find("Can save best model only with val_los available, saving anyway. Available metrics "
                                "are: accuracy, epoch, loss, val_accuracy, val_loss. Did you mean 'val_loss'?"),
            std::string::npos)
      << capture.text();
  EXPECT_EQ(did_you_mean("lr", std::vector<std::string>{"loss", "accuracy"}), "");
  EXPECT_EQ(did_you_mean("acc", std::vector<std::string>{"loss", "accuracy"}), "");
  EXPECT_EQ(did_you_mean("acuracy", std::vector<std::string>{"loss", "accuracy"}), " Did you mean 'accuracy'?");
}

TEST_F(CheckpointTest, UnwritableDirectoriesFailBeforeTheFirstBatch) {
  std::ofstream(path("blocker")) << "x";
  auto expect_failure = [&](std::shared_ptr<Callback> callback, const std::string& fragment) {
    EXPECT_THROW_MSG(fit(std::move(callback)), CheckpointError, fragment);
    EXPECT_EQ(setup_.trainer->state().global_step, 0);
  };
  expect_failure(checkpoint(CheckpointOptions(path("blocker/ckpt/{epoch}.pt"))),
                 "CheckpointCallback: cannot create the directory " + path("blocker/ckpt") + ": " + path("blocker") +
                     " is not a directory");
  expect_failure(std::make_shared<BackupAndRestore>(BackupOptions(path("blocker/backup"))),
                 "BackupAndRestore: cannot create the directory " + path("blocker/backup"));
  // A directory that does not exist yet is fine, and is not created until a save.
  fit(checkpoint(CheckpointOptions(path("later/{epoch}/c.pt")).save_best_only(true).monitor("val_loss")
                     .initial_value_threshold(-1.0)));
  EXPECT_FALSE(fs::exists(path("later")));
  EXPECT_EQ(files(), (std::vector<std::string>{"blocker"}));  // no probe left behind
}

TEST_F(CheckpointTest, AutoModeResolvesAtTrainBegin) {
  auto loss = checkpoint(CheckpointOptions(path("a.pt")).monitor("val_loss"));
  auto accuracy = checkpoint(CheckpointOptions(path("b.pt")).monitor("accuracy").save_freq(SaveFreq::batches(2)));
  for (auto& cb : {loss, accuracy}) {
    cb->set_trainer(setup_.trainer.get());
    EXPECT_EQ(cb->mode(), Mode::Auto);
    cb->on_train_begin({});
  }
  EXPECT_EQ(loss->mode(), Mode::Min);
  EXPECT_EQ(accuracy->mode(), Mode::Max);
}

void expect_every_third_epoch(const fs::path& dir, const std::string& suffix) {
  for (int epoch = 1; epoch <= 10; ++epoch) {
    auto name = fmt::format("checkpoint.epoch{:02d}{}", epoch, suffix);
    EXPECT_EQ(fs::exists(dir / name), epoch % 3 == 0) << name;
  }
}

TEST_F(CheckpointTest, IntegerSaveFreqFullSaves) {
  // batch size 6 gives 5 batches an epoch, so 15 batches save every third epoch.
  fit(checkpoint(CheckpointOptions(path("checkpoint.epoch{epoch:02d}.pt")).save_freq(SaveFreq::batches(15))),
      10, 6);
  expect_every_third_epoch(dir(), ".pt");
  EXPECT_EQ(files().size(), 3u);
}

TEST_F(CheckpointTest, IntegerSaveFreqWeightsOnly) {
  fit(checkpoint(CheckpointOptions(path("checkpoint.epoch{epoch:02d}.weights.pt"))
                     .save_freq(SaveFreq::batches(15))
                     .save_weights_only(true)),
      10, 6);
  expect_every_third_epoch(dir(), ".weights.pt");
  EXPECT_EQ(files().size(), 3u);
}

TEST_F(CheckpointTest, BatchInFilename) {
  for (bool weights_only : {false, true}) {
    auto sub = weights_only ? std::string("weights") : std::string("full");
    fit(checkpoint(CheckpointOptions(path(sub + "/checkpoint.epoch{epoch:02d}batch{batch:02d}.pt"))
                       .save_freq(SaveFreq::batches(1))
                       .save_weights_only(weights_only)),
        5, 15);
    std::vector<std::string> expected;
    for (int epoch = 1; epoch <= 5; ++epoch) {
      for (int batch = 1; batch <= 2; ++batch) {
        expected.push_back(fmt::format("checkpoint.epoch{:02d}batch{:02d}.pt", epoch, batch));
      }
    }
    EXPECT_EQ(files(sub), expected) << sub;
  }
}

TEST_F(CheckpointTest, BatchCountCarriesAcrossEpochs) {
  // 2 batches an epoch, a save every 3 batches: epoch 2 batch 1, epoch 3 batch 2, ...
  fit(checkpoint(CheckpointOptions(path("e{epoch}b{batch}.pt")).save_freq(SaveFreq::batches(3))), 6, 15);
  EXPECT_EQ(files(), (std::vector<std::string>{"e2b1.pt", "e3b2.pt", "e5b1.pt", "e6b2.pt"}));
}

TEST_F(CheckpointTest, InvalidSaveFreqIsRejected) {
  for (int64_t n : {0, -3}) {
    EXPECT_THROW_MSG(SaveFreq::batches(n), ValueError, fmt::format("Unrecognized save_freq: batches({})", n));
  }
  EXPECT_NO_THROW(SaveFreq::batches(3));
  EXPECT_NO_THROW(CheckpointCallback(CheckpointOptions("x.pt").save_freq(SaveFreq::epoch())));
}

TEST_F(CheckpointTest, EmptyFilepathIsRejected) {
  EXPECT_THROW_MSG(CheckpointCallback(CheckpointOptions("")), ValueError,
                   "CheckpointCallback: filepath must not be empty");
}

TEST_F(CheckpointTest, InitialValueThresholdZeroBlocksMinSave) {
  auto file = path("checkpoint.pt");
  for (auto mode : {Mode::Min, Mode::Auto}) {
    auto cb = checkpoint(CheckpointOptions(file).monitor("val_loss").mode(mode).save_best_only(true).initial_value_threshold(0));
    fit(cb);
    EXPECT_FALSE(fs::exists(file));
    EXPECT_EQ(cb->best(), 0.0);
  }
}

TEST_F(CheckpointTest, InitialValueThresholdBelowAccuracySaves) {
  auto file = path("checkpoint.pt");
  fit(checkpoint(CheckpointOptions(file)
                     .monitor("val_accuracy")
                     .mode(Mode::Max)
                     .save_best_only(true)
                     .initial_value_threshold(-0.01)));
  EXPECT_TRUE(fs::exists(file));
}

TEST_F(CheckpointTest, SaveBestOnlyAutoValLossSavesFirstEpoch) {
  auto file = path("checkpoint.pt");
  fit(checkpoint(CheckpointOptions(file).save_best_only(true)));
  EXPECT_TRUE(fs::exists(file));
}

TEST_F(CheckpointTest, FormatsPythonStyleSpecs) {
  Logs logs{{"val_loss", 0.123456}, {"accuracy", 0.5}};
  EXPECT_EQ(CheckpointCallback::format_filepath("ckpt/{epoch:02d}-{val_loss:.2f}.pt", 2, std::nullopt, logs),
            "ckpt/03-0.12.pt");
  EXPECT_EQ(CheckpointCallback::format_filepath("{epoch:03d}b{batch}-{accuracy:.1%}", 0, 4, logs), "001b5-50.0%");
  EXPECT_EQ(CheckpointCallback::format_filepath("{{literal}}-{epoch}", 0, std::nullopt, logs), "{literal}-1");
  EXPECT_EQ(CheckpointCallback::format_filepath("{accuracy:%}|{val_loss:e}|{epoch:>3}", 4, std::nullopt, logs),
            "50.000000%|1.234560e-01|  5");
  // {batch} exists only for batch-level saves.
  EXPECT_THROW_MSG(CheckpointCallback::format_filepath("{batch}", 0, std::nullopt, logs), ValueError,
                   "Reason: missing key 'batch'");
  EXPECT_THROW_MSG(CheckpointCallback::format_filepath("{epoch:.2q}", 0, std::nullopt, logs), ValueError,
                   "Failed to format this callback filepath: \"{epoch:.2q}\"");
}

TEST_F(CheckpointTest, ExistingDirectoryFilepathFails) {
  fs::create_directories(path("taken"));
  EXPECT_THROW_MSG(fit(checkpoint(CheckpointOptions(path("taken")))), CheckpointError,
                   "existing directory: " + path("taken"));
}

TEST_F(CheckpointTest, LoadingReproducesTrainedWeights) {
  for (bool weights_only : {false, true}) {
    auto file = path(weights_only ? "weights.pt" : "full.pt");
    setup_ = make_setup();
    fit(checkpoint(CheckpointOptions(file).save_weights_only(weights_only)), 3);
    auto fresh = make_setup();
    fresh.trainer->load_weights(file);
    expect_same_weights(*setup_.model, *fresh.model);
    EXPECT_TRUE(torch::equal(setup_.trainer->predict(data_.x_test), fresh.trainer->predict(data_.x_test)));
  }
}

TEST_F(CheckpointTest, LoadCheckpointRestoresBestAndEpoch) {
  auto file = path("best.pt");
  auto options = CheckpointOptions(file).monitor("val_loss").save_best_only(true);
  auto first = checkpoint(options);
  auto history = fit(first, 3);
  const auto& losses = history.history.at("val_loss");
  auto best_epoch = std::min_element(losses.begin(), losses.end()) - losses.begin() + 1;
  ASSERT_EQ(first->best(), losses[best_epoch - 1]);

  auto resumed = make_setup();
  resumed.trainer->load_checkpoint(file);
  EXPECT_EQ(resumed.trainer->state().epoch, best_epoch);
  EXPECT_EQ(resumed.trainer->state().global_step, best_epoch * 6);

  // A fit with no epochs left still hands the callback its saved state.
  auto second = checkpoint(options);
  EXPECT_FALSE(second->best().has_value());
  resumed.trainer->fit(data_.x_train, data_.y_train,
                       FitOptions().epochs(best_epoch).batch_size(5).callbacks({second}));
  EXPECT_EQ(second->best(), first->best());
  EXPECT_EQ(second->last_saved_path(), file);

  // The next fit continues from the restored epoch.
  auto again = make_setup();
  again.trainer->load_checkpoint(file);
  auto more = again.trainer->fit(data_.x_train, data_.y_train,
                                 FitOptions().epochs(5).batch_size(5).validation_data(data_.x_test, data_.y_test));
  std::vector<int64_t> expected_epochs;
  for (int64_t e = best_epoch; e < 5; ++e) expected_epochs.push_back(e);
  EXPECT_EQ(more.epoch, expected_epochs);
}

}  // namespace
}  // namespace torchfit::test
