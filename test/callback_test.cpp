// Hook order, logs and the Callback/CallbackList API.
#include "support.h"

namespace torchfit::test {
namespace {

class CallbackTest : public TorchfitTest {};

/// Records every hook as text.
class Recorder : public Callback {
 public:
  std::vector<std::string> events;
  std::vector<Logs> batch_logs;
  std::vector<Logs> epoch_logs;
  Trainer* seen_trainer = nullptr;

  void set_trainer(Trainer* trainer) override {
    Callback::set_trainer(trainer);
    seen_trainer = trainer;
  }
  void on_train_begin(const Logs&) override { events.push_back("train_begin"); }
  void on_train_end(const Logs& logs) override { events.push_back("train_end:" + join_keys(logs)); }
  void on_epoch_begin(int64_t e, const Logs&) override { events.push_back(fmt::format("epoch_begin {}", e)); }
  void on_epoch_end(int64_t e, const Logs& logs) override {
    events.push_back(fmt::format("epoch_end {}", e));
    epoch_logs.push_back(logs);
  }
  void on_train_batch_begin(int64_t b, const Logs&) override { events.push_back(fmt::format("batch_begin {}", b)); }
  void on_train_batch_end(int64_t b, const Logs& logs) override {
    events.push_back(fmt::format("batch_end {}", b));
    batch_logs.push_back(logs);
  }
  void on_test_begin(const Logs&) override { events.push_back("test_begin"); }
  void on_test_end(const Logs& logs) override { events.push_back("test_end:" + join_keys(logs)); }
  void on_test_batch_begin(int64_t b, const Logs&) override { events.push_back(fmt::format("test_batch_begin {}", b)); }
  void on_test_batch_end(int64_t b, const Logs&) override { events.push_back(fmt::format("test_batch_end {}", b)); }
};

TEST_F(CallbackTest, HooksFireInKerasOrder) {
  auto data = make_data(10, 4);
  auto s = make_setup();
  auto recorder = std::make_shared<Recorder>();
  s.trainer->fit(data.x_train, data.y_train,
                 FitOptions().epochs(2).batch_size(5).validation_data(data.x_test, data.y_test).callbacks({recorder}));
  std::vector<std::string> expected;
  expected.push_back("train_begin");
  for (int e = 0; e < 2; ++e) {
    expected.push_back(fmt::format("epoch_begin {}", e));
    for (int b = 0; b < 2; ++b) {
      expected.push_back(fmt::format("batch_begin {}", b));
      expected.push_back(fmt::format("batch_end {}", b));
    }
    expected.push_back("test_begin");
    expected.push_back("test_batch_begin 0");
    expected.push_back("test_batch_end 0");
    expected.push_back("test_end:accuracy, loss");
    expected.push_back(fmt::format("epoch_end {}", e));
  }
  expected.push_back("train_end:accuracy, loss, val_accuracy, val_loss");
  EXPECT_EQ(recorder->events, expected);
  EXPECT_EQ(recorder->seen_trainer, s.trainer.get());
}

TEST_F(CallbackTest, BatchLogsAreRunningMeansWeightedByBatchSize) {
  auto data = make_data(12, 4);
  auto model = Mlp();
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  std::vector<double> losses;
  Trainer trainer(model, sgd, [&](const torch::Tensor& out, const torch::Tensor& y) {
    auto loss = torch::nn::functional::cross_entropy(out, y);
    losses.push_back(loss.item<double>());
    return loss;
  });
  auto recorder = std::make_shared<Recorder>();
  // 12 samples in batches of 5: sizes 5, 5, 2.
  trainer.fit(data.x_train, data.y_train, FitOptions().batch_size(5).shuffle(false).callbacks({recorder}));
  ASSERT_EQ(losses.size(), 3u);
  ASSERT_EQ(recorder->batch_logs.size(), 3u);
  EXPECT_DOUBLE_EQ(recorder->batch_logs[0].at("loss"), losses[0]);
  EXPECT_DOUBLE_EQ(recorder->batch_logs[1].at("loss"), (5 * losses[0] + 5 * losses[1]) / 10);
  double epoch_mean = (5 * losses[0] + 5 * losses[1] + 2 * losses[2]) / 12;
  EXPECT_DOUBLE_EQ(recorder->batch_logs[2].at("loss"), epoch_mean);
  EXPECT_DOUBLE_EQ(recorder->epoch_logs[0].at("loss"), epoch_mean);
}

TEST_F(CallbackTest, HistoryRecordsEpochLogs) {
  auto data = make_data();
  auto s = make_setup();
  auto history = s.trainer->fit(data.x_train, data.y_train,
                                FitOptions().epochs(3).batch_size(5).validation_data(data.x_test, data.y_test));
  EXPECT_EQ(history.epoch, (std::vector<int64_t>{0, 1, 2}));
  std::vector<std::string> keys;
  for (const auto& [key, values] : history.history) {
    keys.push_back(key);
    EXPECT_EQ(values.size(), 3u) << key;
  }
  EXPECT_EQ(keys, (std::vector<std::string>{"accuracy", "loss", "val_accuracy", "val_loss"}));
  // Validation logs come from the end-of-epoch weights.
  auto evaluated = s.trainer->evaluate(data.x_test, data.y_test, 5);
  EXPECT_DOUBLE_EQ(history.history["val_loss"].back(), evaluated["loss"]);
  EXPECT_DOUBLE_EQ(history.history["val_accuracy"].back(), evaluated["accuracy"]);
}

class StopAt : public Callback {
 public:
  StopAt(int64_t epoch, int64_t batch) : epoch_(epoch), batch_(batch) {}
  void on_epoch_begin(int64_t e, const Logs&) override { current_ = e; }
  void on_train_batch_end(int64_t b, const Logs&) override {
    ++batches;
    if (current_ == epoch_ && b == batch_) trainer()->stop_training(true);
  }
  int64_t batches = 0;

 private:
  int64_t epoch_, batch_, current_ = 0;
};

TEST_F(CallbackTest, StopTrainingEndsAfterTheCurrentBatch) {
  auto data = make_data();
  auto s = make_setup();
  auto stop = std::make_shared<StopAt>(1, 2);
  auto recorder = std::make_shared<Recorder>();
  auto history = s.trainer->fit(data.x_train, data.y_train,
                                FitOptions().epochs(5).batch_size(5).callbacks({stop, recorder}));
  EXPECT_EQ(stop->batches, 6 + 3);
  EXPECT_EQ(history.epoch, (std::vector<int64_t>{0, 1}));  // the stopped epoch still ends
  EXPECT_EQ(recorder->events.back(), "train_end:accuracy, loss");
  EXPECT_EQ(s.trainer->state().global_step, 9);
  // The flag is reset by the next fit.
  auto more = s.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(1).batch_size(5));
  EXPECT_EQ(more.epoch.size(), 1u);
}

class StopAtEpochEnd : public Callback {
  void on_epoch_end(int64_t e, const Logs&) override {
    if (e == 0) trainer()->stop_training(true);
  }
};

TEST_F(CallbackTest, StopTrainingAtEpochEnd) {
  auto data = make_data();
  auto s = make_setup();
  auto history = s.trainer->fit(data.x_train, data.y_train,
                                FitOptions().epochs(5).batch_size(5).callbacks({std::make_shared<StopAtEpochEnd>()}));
  EXPECT_EQ(history.epoch, (std::vector<int64_t>{0}));
}

TEST_F(CallbackTest, NullCallbackIsRejected) {
  auto data = make_data();
  auto s = make_setup();
  EXPECT_THROW_MSG(
      s.trainer->fit(data.x_train, data.y_train, FitOptions().callbacks({std::make_shared<Recorder>(), nullptr})),
      ValueError, "callbacks[1] is null");
}

}  // namespace
}  // namespace torchfit::test
