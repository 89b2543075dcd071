// Retention (top-k, newest-n), the latest pointer, and callback state across resumes.
#include <fstream>

#include "support.h"

namespace torchfit::test {
namespace {

class RetentionTest : public TorchfitTest {
 protected:
  void SetUp() override {
    TorchfitTest::SetUp();
    setup_ = make_setup();
  }

  /// Drives epoch ends with scripted values of `key`, starting at `first_epoch`.
  void script(CheckpointCallback& cb, const std::vector<double>& values, int64_t first_epoch = 0,
              const std::string& key = "val_loss") {
    cb.set_trainer(setup_.trainer.get());
    cb.on_train_begin({});
    for (size_t i = 0; i < values.size(); ++i) {
      auto epoch = first_epoch + static_cast<int64_t>(i);
      cb.on_epoch_begin(epoch, {});
      cb.on_epoch_end(epoch, {{"loss", 1.0}, {key, values[i]}});
    }
    cb.on_train_end({});
  }

  Harness setup_;
};

const std::vector<double> kScores = {0.9, 0.5, 0.7, 0.3, 0.8, 0.4, 0.6, 0.2, 0.95, 0.35};

TEST_F(RetentionTest, TopKKeepsExactlyTheKBestWithTemplatedNames) {
  auto cb = std::make_shared<CheckpointCallback>(
      CheckpointOptions(path("e{epoch:02d}-{val_loss:.2f}.pt")).save_top_k(3).save_weights_only(true));
  script(*cb, kScores);
  EXPECT_EQ(files(), (std::vector<std::string>{"e04-0.30.pt", "e08-0.20.pt", "e10-0.35.pt"}));
}

TEST_F(RetentionTest, TopKWithMaxMode) {
  auto cb = std::make_shared<CheckpointCallback>(CheckpointOptions(path("e{epoch:02d}.pt"))
                                                     .monitor("val_accuracy")
                                                     .save_top_k(2)
                                                     .save_weights_only(true));
  script(*cb, kScores, 0, "val_accuracy");
  EXPECT_EQ(files(), (std::vector<std::string>{"e01.pt", "e09.pt"}));
}

TEST_F(RetentionTest, TopKWithSaveBestOnlyKeepsTheLastKImprovements) {
  auto cb = std::make_shared<CheckpointCallback>(
      CheckpointOptions(path("e{epoch:02d}.pt")).save_best_only(true).save_top_k(2).save_weights_only(true));
  script(*cb, kScores);  // improvements at epochs 1, 2, 4, 8
  EXPECT_EQ(files(), (std::vector<std::string>{"e04.pt", "e08.pt"}));
  EXPECT_EQ(cb->best(), 0.2);
}

TEST_F(RetentionTest, DefaultKeepsEveryImprovingFileAsKeras) {
  auto cb = std::make_shared<CheckpointCallback>(
      CheckpointOptions(path("e{epoch:02d}.pt")).save_best_only(true).save_weights_only(true));
  script(*cb, kScores);
  EXPECT_EQ(files(), (std::vector<std::string>{"e01.pt", "e02.pt", "e04.pt", "e08.pt"}));
}

TEST_F(RetentionTest, TopKZeroSavesNothing) {
  auto cb = std::make_shared<CheckpointCallback>(CheckpointOptions(path("e{epoch}.pt")).save_top_k(0).save_weights_only(true));
  script(*cb, kScores);
  EXPECT_TRUE(files().empty());
}

TEST_F(RetentionTest, MaxToKeepKeepsTheNewest) {
  auto cb = std::make_shared<CheckpointCallback>(
      CheckpointOptions(path("e{epoch:02d}.pt")).max_to_keep(2).save_weights_only(true));
  script(*cb, kScores);
  EXPECT_EQ(files(), (std::vector<std::string>{"e09.pt", "e10.pt"}));
}

TEST_F(RetentionTest, OnlyOurOwnFilesAreDeleted) {
  std::ofstream(path("e01.pt")) << "someone else's file with a name we will not write";
  std::ofstream(path("notes.txt")) << "unrelated";
  auto cb = std::make_shared<CheckpointCallback>(
      CheckpointOptions(path("run-e{epoch:02d}.pt")).max_to_keep(1).save_weights_only(true));
  script(*cb, {1, 2, 3});
  EXPECT_EQ(files(), (std::vector<std::string>{"e01.pt", "notes.txt", "run-e03.pt"}));
}

TEST_F(RetentionTest, BadRetentionOptionsAreRejected) {
  auto message = [](const CheckpointOptions& options) {
    try {
      CheckpointCallback cb(options);
    } catch (const ValueError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(message(CheckpointOptions("x.pt").save_top_k(-2)), "Invalid save_top_k: -2 (must be -1 to keep all, or >= 0)");
  EXPECT_EQ(message(CheckpointOptions("x.pt").max_to_keep(0)), "Invalid max_to_keep: 0 (must be >= 1, or -1 to keep all)");
}

TEST_F(RetentionTest, LatestPointerNamesTheNewestFile) {
  EXPECT_FALSE(latest_checkpoint(dir().string()).has_value());
  auto cb = std::make_shared<CheckpointCallback>(
      CheckpointOptions(path("e{epoch:02d}.pt")).save_last(true).max_to_keep(2).save_weights_only(true));
  script(*cb, {3, 2, 1});
  EXPECT_EQ(read_file(path(kLatestPointer)), "e03.pt\n");
  EXPECT_EQ(latest_checkpoint(dir().string()), path("e03.pt"));
  // A damaged newest file is skipped; the pointer's target must verify.
  std::ofstream(path("e03.pt"), std::ios::binary) << "garbage";
  EXPECT_EQ(latest_checkpoint(dir().string()), path("e02.pt"));
  // Temporary files never count.
  std::ofstream(path(".e04.pt.torchfit-tmp.1.ab")) << "partial";
  EXPECT_EQ(latest_checkpoint(dir().string()), path("e02.pt"));
}

TEST_F(RetentionTest, ResumeNeverReplacesABetterBest) {
  auto data = make_data();
  // A metric the test scripts: good for the first run, worse after the resume.
  auto score = std::make_shared<double>(0.5);
  auto make = [&] {
    auto h = make_setup();
    Metric scripted{"score", [score](const torch::Tensor& o, const torch::Tensor&) {
                      return torch::full({}, *score, o.options().dtype(torch::kDouble));
                    }, Mode::Min};
    h.trainer = std::make_unique<Trainer>(h.model, h.optimizer, ce_loss, std::vector<Metric>{scripted});
    return h;
  };
  auto options = CheckpointOptions(path("best.pt")).monitor("score").save_best_only(true);
  auto first = make();
  first.trainer->fit(data.x_train, data.y_train,
                     FitOptions().epochs(3).batch_size(10).callbacks({std::make_shared<CheckpointCallback>(options)}));
  auto best_bytes = read_file(path("best.pt"));

  *score = 0.9;  // every resumed epoch is worse
  auto resumed = make();
  resumed.trainer->load_checkpoint(path("best.pt"));
  auto cb = std::make_shared<CheckpointCallback>(options);
  auto history = resumed.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(6).batch_size(10).callbacks({cb}));
  EXPECT_EQ(history.epoch, (std::vector<int64_t>{1, 2, 3, 4, 5}));  // the best file was written at epoch 1
  EXPECT_EQ(cb->best(), 0.5);
  EXPECT_TRUE(read_file(path("best.pt")) == best_bytes) << "the best checkpoint was replaced";
}

TEST_F(RetentionTest, TopKStateSurvivesAResumeAndSparesTheResumedFile) {
  auto options = CheckpointOptions(path("e{epoch:02d}.pt")).save_top_k(2);
  auto first = std::make_shared<CheckpointCallback>(options);
  script(*first, {0.5, 0.4});  // full checkpoints e01 (0.5), e02 (0.4)
  ASSERT_EQ(files(), (std::vector<std::string>{"e01.pt", "e02.pt"}));

  auto resumed = make_setup();
  resumed.trainer->load_checkpoint(path("e02.pt"));
  setup_ = std::move(resumed);
  auto second = std::make_shared<CheckpointCallback>(options);
  setup_.trainer->fit(torch::randn({4, 3}), torch::randint(0, 3, {4}),
                      FitOptions().epochs(1).callbacks({second}));  // hands over the saved state
  // The restored table ranks e01 and e02: better files evict e01, and would evict
  // e02 too, but that is the file the run resumed from.
  script(*second, {0.3, 0.2}, 2);
  EXPECT_EQ(files(), (std::vector<std::string>{"e02.pt", "e03.pt", "e04.pt"}));
}

}  // namespace
}  // namespace torchfit::test
