// The save decision (Keras's model_checkpoint_test.py scenarios, ported, plus
// retention and our own edge cases) through both of its front ends: the
// CheckpointCallback driven by epoch hooks, and a CheckpointManager driven by a
// hand-written loop. One scenario, two runs.
#include <fstream>
#include <limits>

#include "support.h"

namespace torchfit::test {
namespace {

enum class Frontend { Callback, Manager };

/// Scripted epoch ends fed to one front end; the object lives across scripts
/// (as a callback reused by a second fit, or a manager kept by a loop).
class Driver {
 public:
  Driver(Frontend frontend, const CheckpointOptions& options, Harness& harness) {
    if (frontend == Frontend::Callback) {
      callback_ = std::make_shared<CheckpointCallback>(options);
      callback_->set_trainer(harness.trainer.get());
    } else {
      manager_ = std::make_unique<CheckpointManager>(options);
      state_.add("model", harness.model);
      state_.add("optimizer", harness.optimizer);
    }
  }

  /// One "fit": epochs `first_epoch`, ... with `key` taking `values` (loss is 1).
  void script(const std::vector<double>& values, int64_t first_epoch = 0, const std::string& key = "val_loss") {
    if (callback_) callback_->on_train_begin({});
    for (size_t i = 0; i < values.size(); ++i) {
      const auto epoch = first_epoch + static_cast<int64_t>(i);
      if (callback_) {
        callback_->on_epoch_begin(epoch, {});
        callback_->on_epoch_end(epoch, {{"loss", 1.0}, {key, values[i]}});
      } else {
        manager_->save(state_, {{"epoch", static_cast<double>(epoch + 1)}, {"loss", 1.0}, {key, values[i]}});
      }
    }
    if (callback_) callback_->on_train_end({});
    if (manager_) manager_->wait();
  }

  std::optional<double> best() const { return callback_ ? callback_->best() : manager_->best(); }

 private:
  std::shared_ptr<CheckpointCallback> callback_;
  std::unique_ptr<CheckpointManager> manager_;
  Checkpoint state_;
};

class SaveDecisionTest : public TorchfitTest, public ::testing::WithParamInterface<Frontend> {
 protected:
  void SetUp() override {
    TorchfitTest::SetUp();
    harness_ = make_setup();
  }

  std::unique_ptr<Driver> driver(const CheckpointOptions& options) {
    return std::make_unique<Driver>(GetParam(), options, harness_);
  }

  /// The message constructing the front end with `options` raises, or "no error".
  std::string construction_error(const CheckpointOptions& options) {
    try {
      driver(options);
    } catch (const ValueError& e) {
      return e.what();
    }
    return "no error";
  }

  Harness harness_;
};

const std::vector<double> kScores = {0.9, 0.5, 0.7, 0.3, 0.8, 0.4, 0.6, 0.2, 0.95, 0.35};

// ---- Keras's ModelCheckpoint scenarios

TEST_P(SaveDecisionTest, TiesAndNaNDoNotSave) {
  auto d = driver(CheckpointOptions(path("{epoch:02d}.pt")).save_best_only(true).save_weights_only(true));
  LogCapture capture;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  d->script({0.5, 0.5, 0.4, nan, 0.45, 0.39999});
  EXPECT_EQ(files(), (std::vector<std::string>{"01.pt", "03.pt", "06.pt"}));
  EXPECT_EQ(d->best(), 0.39999);
  EXPECT_NE(capture.text().find("Epoch 4: val_loss is NaN, not saving; best stays 0.40000"), std::string::npos)
      << capture.text();
}

TEST_P(SaveDecisionTest, NaNFirstValueNeverBecomesBest) {
  auto d = driver(CheckpointOptions(path("{epoch:02d}.pt")).save_best_only(true).save_weights_only(true));
  d->script({std::numeric_limits<double>::quiet_NaN(), 3.0});
  EXPECT_EQ(files(), (std::vector<std::string>{"02.pt"}));
  EXPECT_EQ(d->best(), 3.0);
}

TEST_P(SaveDecisionTest, MaxModeKeepsHighest) {
  auto d = driver(CheckpointOptions(path("{epoch}.pt"))
                      .monitor("val_accuracy")
                      .mode(Mode::Max)
                      .save_best_only(true)
                      .save_weights_only(true));
  d->script({0.2, 0.1, 0.3, 0.3}, 0, "val_accuracy");
  EXPECT_EQ(files(), (std::vector<std::string>{"1.pt", "3.pt"}));
  EXPECT_EQ(d->best(), 0.3);
}

TEST_P(SaveDecisionTest, InitialValueThresholdBlocksWhatDoesNotBeatIt) {
  auto d = driver(CheckpointOptions(path("{epoch}.pt")).save_best_only(true).initial_value_threshold(0.4).save_weights_only(true));
  d->script({0.5, 0.45, 0.3, 0.35});
  EXPECT_EQ(files(), (std::vector<std::string>{"3.pt"}));
  EXPECT_EQ(d->best(), 0.3);
}

TEST_P(SaveDecisionTest, BestPersistsAcrossFitCalls) {
  auto d = driver(CheckpointOptions(path("{epoch}-{val_loss:.1f}.pt")).save_best_only(true).save_weights_only(true));
  d->script({0.5, 0.3});
  d->script({0.4, 0.35});  // a second fit with worse values saves nothing
  EXPECT_EQ(files(), (std::vector<std::string>{"1-0.5.pt", "2-0.3.pt"}));
  EXPECT_EQ(d->best(), 0.3);
}

TEST_P(SaveDecisionTest, VerboseMessagesMatchKeras) {
  auto d = driver(CheckpointOptions(path("{epoch:02d}.pt")).save_best_only(true).verbose(1).save_weights_only(true));
  LogCapture capture;
  d->script({0.51234, 0.6, 0.49876});
  std::vector<std::string> expected = {
      fmt::format("Epoch 1: val_loss improved from inf to 0.51234, saving model to {}\n", path("01.pt")),
      fmt::format("Epoch 1: finished saving model to {}\n", path("01.pt")),
      "Epoch 2: val_loss did not improve from 0.51234\n",
      fmt::format("Epoch 3: val_loss improved from 0.51234 to 0.49876, saving model to {}\n", path("03.pt")),
      fmt::format("Epoch 3: finished saving model to {}\n", path("03.pt")),
  };
  EXPECT_EQ(capture.lines(), expected);
}

TEST_P(SaveDecisionTest, VerboseWithoutSaveBestOnly) {
  auto d = driver(CheckpointOptions(path("{epoch}.pt")).verbose(1).save_weights_only(true));
  LogCapture capture;
  d->script({1.0});
  ASSERT_FALSE(capture.lines().empty());
  EXPECT_EQ(capture.lines()[0], fmt::format("Epoch 1: saving model to {}\n", path("1.pt")));
}

TEST_P(SaveDecisionTest, MissingTemplateKeyFailsBeforeDeciding) {
  // Even with a threshold that would block the save, the template is checked first.
  const std::string pattern = path("ckpt_{val_acc:.2f}.pt");
  auto d = driver(CheckpointOptions(pattern).save_best_only(true).mode(Mode::Min).initial_value_threshold(-1));
  EXPECT_THROW_MSG(d->script({0.5}), ValueError,
                   fmt::format("Failed to format this callback filepath: \"{}\"", pattern), "missing key 'val_acc'",
                   "available keys: epoch, loss, val_loss");
  EXPECT_TRUE(files().empty());
}

// ---- retention: top-k by score, newest n, and the latest pointer

TEST_P(SaveDecisionTest, TopKKeepsExactlyTheKBestWithTemplatedNames) {
  driver(CheckpointOptions(path("e{epoch:02d}-{val_loss:.2f}.pt")).save_top_k(3).save_weights_only(true))->script(kScores);
  EXPECT_EQ(files(), (std::vector<std::string>{"e04-0.30.pt", "e08-0.20.pt", "e10-0.35.pt"}));
}

TEST_P(SaveDecisionTest, TopKWithMaxMode) {
  driver(CheckpointOptions(path("e{epoch:02d}.pt")).monitor("val_accuracy").mode(Mode::Max).save_top_k(2).save_weights_only(true))
      ->script(kScores, 0, "val_accuracy");
  EXPECT_EQ(files(), (std::vector<std::string>{"e01.pt", "e09.pt"}));
}

TEST_P(SaveDecisionTest, TopKWithSaveBestOnlyKeepsTheLastKImprovements) {
  auto d = driver(CheckpointOptions(path("e{epoch:02d}.pt")).save_best_only(true).save_top_k(2).save_weights_only(true));
  d->script(kScores);  // improvements at epochs 1, 2, 4, 8
  EXPECT_EQ(files(), (std::vector<std::string>{"e04.pt", "e08.pt"}));
  EXPECT_EQ(d->best(), 0.2);
}

TEST_P(SaveDecisionTest, DefaultKeepsEveryImprovingFileAsKeras) {
  driver(CheckpointOptions(path("e{epoch:02d}.pt")).save_best_only(true).save_weights_only(true))->script(kScores);
  EXPECT_EQ(files(), (std::vector<std::string>{"e01.pt", "e02.pt", "e04.pt", "e08.pt"}));
}

TEST_P(SaveDecisionTest, TopKZeroSavesNothing) {
  driver(CheckpointOptions(path("e{epoch}.pt")).save_top_k(0).save_weights_only(true))->script(kScores);
  EXPECT_TRUE(files().empty());
}

TEST_P(SaveDecisionTest, MaxToKeepKeepsTheNewest) {
  driver(CheckpointOptions(path("e{epoch:02d}.pt")).max_to_keep(2).save_weights_only(true))->script(kScores);
  EXPECT_EQ(files(), (std::vector<std::string>{"e09.pt", "e10.pt"}));
}

TEST_P(SaveDecisionTest, OnlyOurOwnFilesAreDeleted) {
  std::ofstream(path("e01.pt")) << "someone else's file with a name we will not write";
  std::ofstream(path("notes.txt")) << "unrelated";
  driver(CheckpointOptions(path("run-e{epoch:02d}.pt")).max_to_keep(1).save_weights_only(true))->script({1, 2, 3});
  EXPECT_EQ(files(), (std::vector<std::string>{"e01.pt", "notes.txt", "run-e03.pt"}));
}

TEST_P(SaveDecisionTest, BadRetentionOptionsAreRejected) {
  EXPECT_EQ(construction_error(CheckpointOptions("x.pt").save_top_k(-2)),
            "Invalid save_top_k: -2 (must be -1 to keep all, or >= 0)");
  EXPECT_EQ(construction_error(CheckpointOptions("x.pt").max_to_keep(0)),
            "Invalid max_to_keep: 0 (must be >= 1, or -1 to keep all)");
}

TEST_P(SaveDecisionTest, LatestPointerNamesTheNewestFile) {
  EXPECT_FALSE(latest_checkpoint(dir().string()).has_value());
  driver(CheckpointOptions(path("e{epoch:02d}.pt")).save_last(true).max_to_keep(2).save_weights_only(true))
      ->script({3, 2, 1});
  EXPECT_EQ(read_file(path(kLatestPointer)), "e03.pt\n");
  EXPECT_EQ(latest_checkpoint(dir().string()), path("e03.pt"));
  // A damaged newest file is skipped; the pointer's target must verify.
  std::ofstream(path("e03.pt"), std::ios::binary) << "garbage";
  EXPECT_EQ(latest_checkpoint(dir().string()), path("e02.pt"));
  // Temporary files never count.
  std::ofstream(path(".e04.pt.torchfit-tmp.1.ab")) << "partial";
  EXPECT_EQ(latest_checkpoint(dir().string()), path("e02.pt"));
}

INSTANTIATE_TEST_SUITE_P(Frontends, SaveDecisionTest, ::testing::Values(Frontend::Callback, Frontend::Manager),
                         [](const ::testing::TestParamInfo<Frontend>& info) {
                           return info.param == Frontend::Callback ? "Callback" : "Manager";
                         });

}  // namespace
}  // namespace torchfit::test
