// Retention state across resumes (the scenarios of retention itself are in save_decision_test.cpp).
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

TEST_F(RetentionTest, ARestoredRecordNeverMakesRetentionDeleteAnotherFile) {
  // A checkpoint's record of kept files is data from a file, which may have been shared or
  // downloaded: only paths this manager's template could have written are kept.
  const std::string victim = path("victim.pt");
  write_file(victim, "not a checkpoint of this run");
  fs::create_directories(path("ckpt"));
  CheckpointManager manager(CheckpointOptions(path("ckpt/s{step}.pt")).max_to_keep(1).fsync(false));
  auto state = manager.state_dict().toGenericDict();
  c10::impl::GenericList recent(c10::StringType::get());
  recent.push_back(victim);                       // another directory
  recent.push_back(path("ckpt/../victim.pt"));    // climbs out of it
  recent.push_back(path("ckpt/x{step}.pt"));      // not a name of the template
  recent.push_back(path("ckpt/s1.pt"));           // ours
  state.insert_or_assign("recent", recent);
  state.insert_or_assign("last_saved_path", victim);
  manager.load_state_dict(state);
  EXPECT_EQ(manager.recent(), (std::vector<std::string>{path("ckpt/s1.pt")}));
  EXPECT_EQ(manager.last_saved_path(), "");

  write_file(path("ckpt/s1.pt"), "an older checkpoint of this run");
  Checkpoint items;
  items.add("model", setup_.model);
  ASSERT_TRUE(manager.save(items, {{"step", 2.0}}));
  manager.wait();
  EXPECT_FALSE(fs::exists(path("ckpt/s1.pt"))) << "max_to_keep(1) rotates this run's own file out";
  manager.remove_saved();
  EXPECT_FALSE(fs::exists(path("ckpt/s2.pt")));
  EXPECT_EQ(read_file(victim), "not a checkpoint of this run");
}

TEST_F(RetentionTest, RetentionNeverRemovesALinkOrADirectory) {
  // What retention deletes is checked again when it deletes: a name of the template that has become
  // a symbolic link (or a directory) since it was saved is left alone, with a warning.
  const std::string victim = path("victim.pt");
  write_file(victim, "not a checkpoint of this run");
  fs::create_directories(path("ckpt"));
  CheckpointManager manager(CheckpointOptions(path("ckpt/s{step}.pt")).max_to_keep(1).fsync(false));
  Checkpoint items;
  items.add("model", setup_.model);
  ASSERT_TRUE(manager.save(items, {{"step", 1.0}}));
  fs::remove(path("ckpt/s1.pt"));
  fs::create_symlink(victim, path("ckpt/s1.pt"));
  LogCapture log;
  ASSERT_TRUE(manager.save(items, {{"step", 2.0}}));
  manager.wait();
  EXPECT_TRUE(fs::is_symlink(path("ckpt/s1.pt")));
  EXPECT_EQ(read_file(victim), "not a checkpoint of this run");
  EXPECT_NE(log.text().find("Not removing " + path("ckpt/s1.pt") + ": it is a symbolic link"), std::string::npos)
      << log.text();
}

}  // namespace
}  // namespace torchfit::test
