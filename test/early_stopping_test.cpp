// Keras's early_stopping_test.py scenarios, ported.
#include "support.h"

namespace torchfit::test {
namespace {

class EarlyStoppingTest : public TorchfitTest {
 protected:
  void SetUp() override {
    TorchfitTest::SetUp();
    setup_ = make_setup();
  }

  /// Runs epoch ends with scripted `key` values until the stopper stops training;
  /// returns the number of epochs run. `before_epoch_end` may change the model.
  int64_t run(EarlyStopping& stopper, const std::vector<double>& values, const std::string& key = "val_loss",
              const std::function<void(int64_t)>& before_epoch_end = nullptr, int64_t stop_at = -1) {
    auto& trainer = *setup_.trainer;
    trainer.stop_training(false);
    stopper.set_trainer(&trainer);
    stopper.on_train_begin({});
    int64_t epochs = 0;
    for (size_t i = 0; i < values.size(); ++i) {
      auto epoch = static_cast<int64_t>(i);
      ++epochs;
      if (before_epoch_end) before_epoch_end(epoch);
      stopper.on_epoch_end(epoch, {{key, values[i]}});
      if (epoch == stop_at) trainer.stop_training(true);
      if (trainer.stop_training()) break;
    }
    stopper.on_train_end({});
    return epochs;
  }

  /// Sets every weight to `value`, marking the model with an epoch.
  void mark(double value) {
    torch::NoGradGuard no_grad;
    for (auto& p : setup_.model->parameters()) p.fill_(value);
  }
  double marked() const { return setup_.model->fc1->weight[0][0].item<double>(); }

  Harness setup_;
};

TEST_F(EarlyStoppingTest, PatienceZeroAndOneStopAtTheSameEpoch) {
  const std::vector<double> losses = {10, 9, 8, 9, 8.9, 8.7, 8.6, 8.5, 8.4, 8.3};
  std::vector<int64_t> stopped;
  for (int64_t patience : {0, 1, 2, 3}) {
    EarlyStopping stopper(EarlyStoppingOptions().monitor("loss").patience(patience));
    run(stopper, losses, "loss");
    stopped.push_back(stopper.stopped_epoch());
  }
  // As Keras: max(patience, 1) + 2.
  EXPECT_EQ(stopped, (std::vector<int64_t>{3, 3, 4, 5}));
}

TEST_F(EarlyStoppingTest, AutoModeFollowsTheMetricDirection) {
  EarlyStopping on_loss(EarlyStoppingOptions().monitor("val_loss"));
  EarlyStopping on_accuracy(EarlyStoppingOptions().monitor("val_accuracy"));
  for (auto* s : {&on_loss, &on_accuracy}) {
    s->set_trainer(setup_.trainer.get());
    s->on_train_begin({});
  }
  EXPECT_EQ(on_loss.mode(), Mode::Min);
  EXPECT_EQ(on_accuracy.mode(), Mode::Max);
  EarlyStopping unknown(EarlyStoppingOptions().monitor("unknown"));
  unknown.set_trainer(setup_.trainer.get());
  EXPECT_THROW_MSG(unknown.on_train_begin({}), ValueError, "EarlyStopping callback received monitor=unknown");
}

TEST_F(EarlyStoppingTest, BaselineNeverBeatenStopsAfterPatience) {
  EarlyStopping stopper(EarlyStoppingOptions().patience(5).baseline(0.5).restore_best_weights(true));
  auto epochs = run(stopper, {0.9, 0.8, 0.7, 0.71, 0.72, 0.73}, "val_loss", [&](int64_t e) { mark(e); });
  EXPECT_EQ(epochs, 5);
  EXPECT_EQ(stopper.stopped_epoch(), 4);
  EXPECT_EQ(marked(), 2.0);  // the best epoch's weights
}

TEST_F(EarlyStoppingTest, RestoreBestWeights) {
  EarlyStopping stopper(EarlyStoppingOptions().patience(2).restore_best_weights(true).verbose(1));
  LogCapture capture;
  run(stopper, {0.2, 0.15, 0.1, 0.11, 0.12}, "val_loss", [&](int64_t e) { mark(e); });
  EXPECT_EQ(marked(), 2.0);
  EXPECT_EQ(stopper.best_epoch(), 2);
  EXPECT_EQ(capture.lines(), (std::vector<std::string>{"Epoch 5: early stopping\n",
                                                        "Restoring model weights from the end of the best epoch: 3.\n"}));
}

TEST_F(EarlyStoppingTest, RestoresBestWeightsWhenAnotherCallbackStops) {
  EarlyStopping stopper(EarlyStoppingOptions().patience(5).baseline(0.5).restore_best_weights(true));
  auto epochs = run(stopper, {0.9, 0.8, 0.7, 0.71, 0.72, 0.73}, "val_loss", [&](int64_t e) { mark(e); }, 3);
  EXPECT_EQ(epochs, 4);
  EXPECT_EQ(stopper.stopped_epoch(), 0);
  EXPECT_EQ(marked(), 2.0);
}

TEST_F(EarlyStoppingTest, StartFromEpochDelaysMonitoring) {
  // Worse every epoch: patience 0 would stop at epoch 1 without the warm-up.
  const std::vector<double> losses = {1, 2, 3, 4, 5, 6, 7, 8};
  EarlyStopping eager(EarlyStoppingOptions().monitor("loss").patience(0));
  EXPECT_EQ(run(eager, losses, "loss"), 2);
  EarlyStopping delayed(EarlyStoppingOptions().monitor("loss").patience(0).start_from_epoch(3));
  EXPECT_EQ(run(delayed, losses, "loss"), 5);
  EXPECT_EQ(delayed.stopped_epoch(), 4);
  EarlyStopping patient(EarlyStoppingOptions().monitor("loss").patience(2).start_from_epoch(3));
  EXPECT_EQ(run(patient, losses, "loss"), 6);
}

TEST_F(EarlyStoppingTest, MinDeltaAndReuse) {
  EarlyStopping stopper(EarlyStoppingOptions().monitor("loss").patience(1).min_delta(0.5));
  // 9.8 is not 0.5 better than 10: no improvement.
  EXPECT_EQ(run(stopper, {10, 9.8, 9.7, 9.6}, "loss"), 2);
  // A reused instance starts afresh.
  EXPECT_EQ(run(stopper, {10, 9, 8, 7}, "loss"), 4);
  EXPECT_EQ(stopper.stopped_epoch(), 0);
}

TEST_F(EarlyStoppingTest, StopsARealFit) {
  auto data = make_data();
  auto stopper = std::make_shared<EarlyStopping>(EarlyStoppingOptions().monitor("loss").mode(Mode::Max).patience(1));
  // Loss falls while training, so in Max mode it never improves after epoch 0:
  // with patience 1, epoch 1 is the first without improvement and stops.
  auto history = setup_.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(20).batch_size(5).callbacks({stopper}));
  EXPECT_EQ(history.epoch.size(), 2u);
  EXPECT_EQ(stopper->stopped_epoch(), 1);
}

TEST_F(EarlyStoppingTest, BadOptionsAreRejected) {
  EXPECT_THROW_MSG(EarlyStopping(EarlyStoppingOptions().patience(-1)), ValueError,
                   "EarlyStopping: invalid patience -1");
  EXPECT_THROW_MSG(EarlyStopping(EarlyStoppingOptions().start_from_epoch(-1)), ValueError,
                   "EarlyStopping: invalid start_from_epoch -1");
}

}  // namespace
}  // namespace torchfit::test
