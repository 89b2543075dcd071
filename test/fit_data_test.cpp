// Where fit's data comes from: data loaders for fit, validation, evaluate and
// predict; steps_per_epoch and validation_freq with Keras's semantics.
#include "support.h"

namespace torchfit::test {
namespace {

class FitDataTest : public TorchfitTest {};

/// A loader that yields the samples in order, `batch` at a time, as the tensor overloads do without shuffle.
auto in_order(const torch::Tensor& x, const torch::Tensor& y, int64_t batch) {
  return torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(
      XYDataset(x, y).map(torch::data::transforms::Stack<>()),
      torch::data::DataLoaderOptions().batch_size(static_cast<size_t>(batch)));
}

/// The Mlp, recording the first feature of the first sample of each training batch.
struct RecordingImpl : torch::nn::Module {
  RecordingImpl() : mlp(register_module("mlp", Mlp())) {}
  torch::Tensor forward(torch::Tensor x) {
    if (is_training()) seen.push_back(x[0][0].item<float>());
    return mlp->forward(x);
  }
  Mlp mlp;
  std::vector<float> seen;
};
TORCH_MODULE(Recording);

/// Counts the training batches of each epoch and the validation runs.
class Counter : public Callback {
 public:
  void on_epoch_begin(int64_t, const Logs&) override { batches.push_back(0); }
  void on_train_batch_end(int64_t, const Logs&) override { ++batches.back(); }
  void on_test_begin(const Logs&) override { ++validations; }
  std::vector<int64_t> batches;
  int validations = 0;
};

/// 40 samples whose first feature is their index, so a batch tells where it starts.
Dataset indexed_data() {
  auto data = make_data(40, 20);
  data.x_train.select(1, 0).copy_(torch::arange(40, torch::kFloat));
  return data;
}

TEST_F(FitDataTest, LoaderOverloadsMatchTheTensorOverloads) {
  auto data = make_data(60, 30);
  torch::manual_seed(3);
  auto tensors = make_setup();
  torch::manual_seed(3);
  auto loaders = make_setup();
  auto by_tensors = tensors.trainer->fit(
      data.x_train, data.y_train,
      FitOptions().epochs(3).batch_size(10).shuffle(false).validation_data(data.x_test, data.y_test));
  auto train_loader = in_order(data.x_train, data.y_train, 10);
  auto val_loader = in_order(data.x_test, data.y_test, 10);
  auto by_loaders = loaders.trainer->fit(*train_loader, FitOptions().epochs(3).validation_data(*val_loader));
  ASSERT_EQ(by_loaders.history.size(), 4u);  // loss, accuracy and their val_ forms
  for (const auto& [key, values] : by_tensors.history) {
    ASSERT_EQ(by_loaders.history.at(key).size(), values.size()) << key;
    for (size_t i = 0; i < values.size(); ++i) EXPECT_NEAR(by_loaders.history.at(key)[i], values[i], 1e-6) << key;
  }
  expect_same_weights(*tensors.model, *loaders.model);

  auto test_loader = in_order(data.x_test, data.y_test, 7);
  auto from_loader = loaders.trainer->evaluate(*test_loader);
  auto from_tensors = loaders.trainer->evaluate(data.x_test, data.y_test, 7);
  for (const auto& [key, value] : from_tensors) EXPECT_NEAR(from_loader.at(key), value, 1e-6) << key;
  at::Tensor predicted = loaders.trainer->predict(*test_loader);
  EXPECT_TRUE(torch::allclose(predicted, loaders.trainer->predict(data.x_test, 7)));
  EXPECT_EQ(predicted.size(0), 30);
  // A smart pointer works as well as a reference.
  EXPECT_NEAR(loaders.trainer->evaluate(test_loader).at("loss"), from_tensors.at("loss"), 1e-6);
}

TEST_F(FitDataTest, LoadersRejectTheOptionsOfTensorInputs) {
  auto data = make_data();
  auto s = make_setup();
  auto loader = in_order(data.x_train, data.y_train, 10);
  EXPECT_THROW_MSG(s.trainer->fit(*loader, FitOptions().batch_size(64)), ValueError,
                   "batch_size(64) does not apply to a data loader");
  EXPECT_THROW_MSG(s.trainer->fit(*loader, FitOptions().shuffle(true)), ValueError,
                   "shuffle(true) does not apply to a data loader");
  EXPECT_THROW_MSG(s.trainer->fit(*loader, FitOptions().validation_split(0.2)), ValueError,
                   "validation_split(0.2) needs tensor inputs");
  EXPECT_THROW_MSG(s.trainer->fit(*loader, FitOptions().steps_per_epoch(0)), ValueError, "Invalid steps_per_epoch: 0");
  EXPECT_THROW_MSG(s.trainer->fit(*loader, FitOptions().validation_freq(-1)), ValueError,
                   "Invalid validation_freq: -1");
  EXPECT_EQ(s.trainer->state().global_step, 0);
  // Tensor validation data with a loader takes its own batch size.
  auto history = s.trainer->fit(
      *loader, FitOptions().epochs(1).validation_data(data.x_test, data.y_test).validation_batch_size(4));
  EXPECT_EQ(history.history.count("val_loss"), 1u);
}

TEST_F(FitDataTest, StepsPerEpochContinuesThePassAsKerasDoes) {
  auto data = indexed_data();
  Recording model;
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.01);
  Trainer trainer(model, sgd, ce_loss);
  auto counter = std::make_shared<Counter>();
  LogCapture capture;
  // 4 batches a pass, 3 an epoch: epoch 1 ends early with the pass, epoch 2 starts a new one.
  trainer.fit(data.x_train, data.y_train,
              FitOptions().epochs(4).batch_size(10).shuffle(false).steps_per_epoch(3).callbacks({counter}));
  EXPECT_EQ(counter->batches, (std::vector<int64_t>{3, 1, 3, 1}));
  EXPECT_EQ(model->seen, (std::vector<float>{0, 10, 20, 30, 0, 10, 20, 30}));
  EXPECT_NE(capture.text().find("the training data ran out after 1 of steps_per_epoch=3 batches in epoch 2"),
            std::string::npos)
      << capture.text();

  // Two epochs of 2 steps make exactly one pass; the third starts the next.
  counter->batches.clear();
  model->seen.clear();
  trainer.fit(data.x_train, data.y_train,
              FitOptions().epochs(3).batch_size(10).shuffle(false).steps_per_epoch(2).callbacks({counter}));
  EXPECT_EQ(counter->batches, (std::vector<int64_t>{2, 2, 2}));
  EXPECT_EQ(model->seen, (std::vector<float>{0, 10, 20, 30, 0, 10}));

  // The same over a loader, whose length is not known in advance.
  counter->batches.clear();
  model->seen.clear();
  auto loader = in_order(data.x_train, data.y_train, 10);
  trainer.fit(*loader, FitOptions().epochs(4).steps_per_epoch(3).callbacks({counter}));
  EXPECT_EQ(counter->batches, (std::vector<int64_t>{3, 1, 3, 1}));
  EXPECT_EQ(model->seen, (std::vector<float>{0, 10, 20, 30, 0, 10, 20, 30}));
}

TEST_F(FitDataTest, StepsPerEpochResumesMidPassBitwise) {
  auto data = indexed_data();
  auto options = [](std::vector<std::shared_ptr<Callback>> callbacks) {
    return FitOptions().epochs(4).batch_size(10).steps_per_epoch(3).seed(7).callbacks(std::move(callbacks));
  };
  torch::manual_seed(1);
  auto whole = make_setup();
  auto every_batch = std::make_shared<CheckpointCallback>(
      CheckpointOptions(path("ckpt/{epoch}-{batch}.pt")).save_freq(SaveFreq::batches(1)));
  whole.trainer->fit(data.x_train, data.y_train, options({every_batch}));
  // Epoch 3 (1-based) is batches 0-2 of the second pass; its first batch is saved as 3-1.
  torch::manual_seed(2);
  auto resumed = make_setup();
  resumed.trainer->load_checkpoint(path("ckpt/3-1.pt"));
  EXPECT_EQ(resumed.trainer->state().data_pass, std::optional<int64_t>(1));
  EXPECT_EQ(resumed.trainer->state().batch_in_pass, std::optional<int64_t>(1));
  resumed.trainer->fit(data.x_train, data.y_train, options({}));
  expect_same_weights(*whole.model, *resumed.model);
  EXPECT_EQ(resumed.trainer->state().global_step, whole.trainer->state().global_step);
}

TEST_F(FitDataTest, ValidationFreqValidatesEveryNthEpoch) {
  auto data = make_data();
  auto s = make_setup();
  auto counter = std::make_shared<Counter>();
  auto val_loader = in_order(data.x_test, data.y_test, 10);
  auto history = s.trainer->fit(data.x_train, data.y_train,
                                FitOptions().epochs(4).batch_size(10).validation_data(*val_loader).validation_freq(2)
                                    .callbacks({counter}));
  EXPECT_EQ(counter->validations, 2);  // after epochs 2 and 4
  EXPECT_EQ(history.history.at("loss").size(), 4u);
  ASSERT_EQ(history.history.at("val_loss").size(), 2u);
  // The last epoch validated with the final weights.
  EXPECT_NEAR(history.history.at("val_loss")[1], s.trainer->evaluate(data.x_test, data.y_test, 10).at("loss"), 1e-6);
}

}  // namespace
}  // namespace torchfit::test
