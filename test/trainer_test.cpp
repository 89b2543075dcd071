// Trainer: fit/evaluate/predict, options, data loaders, metrics and bad input.
#include "support.h"

namespace torchfit::test {
namespace {

class TrainerTest : public TorchfitTest {};

TEST_F(TrainerTest, LearnsSeparableData) {
  auto data = make_data(300, 100);
  auto s = make_setup(0.1);
  auto history = s.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(20).batch_size(16));
  EXPECT_LT(history.history["loss"].back(), history.history["loss"].front());
  EXPECT_GT(s.trainer->evaluate(data.x_test, data.y_test)["accuracy"], 0.9);
}

TEST_F(TrainerTest, SameSeedGivesSameWeights) {
  auto data = make_data();
  torch::manual_seed(5);
  auto a = make_setup();
  torch::manual_seed(5);
  auto b = make_setup();
  expect_same_weights(*a.model, *b.model);
  a.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(3).batch_size(4).seed(9));
  b.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(3).batch_size(4).seed(9));
  expect_same_weights(*a.model, *b.model);
}

TEST_F(TrainerTest, BadInputNamesTheValue) {
  auto data = make_data();
  auto s = make_setup();
  auto& t = *s.trainer;
  EXPECT_THROW_MSG(t.fit(data.x_train, data.y_train.narrow(0, 0, 29)), ValueError, "x has 30 samples, y has 29");
  EXPECT_THROW_MSG(t.fit(data.x_train, data.y_train, FitOptions().batch_size(0)), ValueError, "Invalid batch_size: 0");
  EXPECT_THROW_MSG(t.fit(data.x_train, data.y_train, FitOptions().batch_size(-4)), ValueError,
                   "Invalid batch_size: -4");
  EXPECT_THROW_MSG(t.fit(data.x_train.narrow(0, 0, 0), data.y_train.narrow(0, 0, 0)), ValueError, "empty (0 samples)");
  EXPECT_THROW_MSG(t.fit(data.x_train, data.y_train, FitOptions().validation_split(1.0)), ValueError,
                   "Invalid validation_split: 1");
  EXPECT_THROW_MSG(t.fit(data.x_train, data.y_train, FitOptions().validation_split(-0.1)), ValueError,
                   "Invalid validation_split: -0.1");
  EXPECT_THROW_MSG(t.fit(data.x_train, data.y_train, FitOptions().validation_split(0.99)), ValueError,
                   "validation_split 0.99 of 30 samples leaves 0 for training and 30 for validation");
  EXPECT_THROW_MSG(t.fit(data.x_train, data.y_train, FitOptions().epochs(-1)), ValueError, "Invalid epochs: -1");
  EXPECT_THROW_MSG(t.fit(data.x_train, data.y_train, FitOptions().initial_epoch(-2)), ValueError,
                   "Invalid initial_epoch: -2");
  EXPECT_THROW_MSG(
      t.fit(data.x_train, data.y_train, FitOptions().validation_data(data.x_test, data.y_test.narrow(0, 0, 3))),
      ValueError, "validation_data: x and y have different lengths");
  EXPECT_THROW_MSG(t.evaluate(data.x_test, data.y_test, 0), ValueError, "Invalid batch_size: 0");
  EXPECT_THROW_MSG(t.predict(torch::empty({0, 3})), ValueError, "predict: x must be a non-empty tensor");
  EXPECT_THROW_MSG(t.fit(torch::tensor(1.0), torch::tensor(1.0)), ValueError, "need a batch dimension");
}

TEST_F(TrainerTest, BadConstructorArguments) {
  auto model = Mlp();
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  auto loss = [](const torch::Tensor& o, const torch::Tensor& t) { return torch::nn::functional::cross_entropy(o, t); };
  EXPECT_THROW_MSG(Trainer(model, nullptr, loss), ValueError, "optimizer must not be null");
  // No loss is allowed (custom steps compute it), until a default step needs one.
  auto data = make_data();
  Trainer without_loss(model, sgd, nullptr);
  EXPECT_THROW_MSG(without_loss.fit(data.x_train, data.y_train), ValueError,
                   "fit: the Trainer has no loss function; pass one to its constructor, or set Trainer::train_step");
  EXPECT_THROW_MSG(without_loss.evaluate(data.x_train, data.y_train), ValueError, "evaluate: the Trainer has no loss");
  EXPECT_THROW_MSG(Trainer(model, sgd, loss, {metrics::accuracy(), metrics::accuracy()}), ValueError,
                   "metric 'accuracy' is given twice");
  EXPECT_THROW_MSG(Trainer(model, sgd, loss, {Metric{"loss", metrics::mse().fn, Mode::Min}}), ValueError,
                   "invalid metric name 'loss'");
  EXPECT_THROW_MSG(Trainer(model, sgd, loss, {Metric{"f1", metrics::mse().fn, Mode::Auto}}), ValueError,
                   "metric 'f1' needs a direction");
}

TEST_F(TrainerTest, NonScalarLossIsRejected) {
  auto data = make_data();
  auto model = Mlp();
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  Trainer trainer(model, sgd, [](const torch::Tensor& o, const torch::Tensor&) { return o; });
  EXPECT_THROW_MSG(trainer.fit(data.x_train, data.y_train), ValueError, "must return a scalar; got shape [30, 3]");
}

/// Records the mode and grad state seen in forward.
struct ProbeImpl : torch::nn::Module {
  ProbeImpl() { fc = register_module("fc", torch::nn::Linear(3, 3)); }
  torch::Tensor forward(torch::Tensor x) {
    seen.emplace_back(is_training(), torch::GradMode::is_enabled());
    return fc(x);
  }
  torch::nn::Linear fc{nullptr};
  std::vector<std::pair<bool, bool>> seen;
};
TORCH_MODULE(Probe);

TEST_F(TrainerTest, TrainAndEvalModes) {
  auto data = make_data(10, 5);
  Probe probe;
  auto sgd = std::make_shared<torch::optim::SGD>(probe->parameters(), 0.1);
  Trainer trainer(probe, sgd, ce_loss);
  probe->eval();
  trainer.fit(data.x_train, data.y_train, FitOptions().batch_size(10).validation_data(data.x_test, data.y_test));
  ASSERT_EQ(probe->seen.size(), 2u);
  EXPECT_EQ(probe->seen[0], std::make_pair(true, true));    // training step
  EXPECT_EQ(probe->seen[1], std::make_pair(false, false));  // validation
  EXPECT_FALSE(probe->is_training());                      // the caller's mode is restored
  probe->seen.clear();
  probe->train();
  trainer.evaluate(data.x_test, data.y_test);
  auto out = trainer.predict(data.x_test, 2);
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{5, 3}));
  EXPECT_FALSE(out.requires_grad());
  for (const auto& seen : probe->seen) EXPECT_EQ(seen, std::make_pair(false, false));
  EXPECT_TRUE(probe->is_training());
}

TEST_F(TrainerTest, ValidationSplitHoldsOutTheLastSamples) {
  auto data = make_data(20, 1);
  auto s = make_setup();
  auto history = s.trainer->fit(data.x_train, data.y_train, FitOptions().batch_size(4).validation_split(0.25));
  auto held_out = s.trainer->evaluate(data.x_train.narrow(0, 15, 5), data.y_train.narrow(0, 15, 5), 4);
  EXPECT_DOUBLE_EQ(history.history.at("val_loss").at(0), held_out.at("loss"));
  EXPECT_EQ(s.trainer->state().global_step, 4);  // 15 training samples in batches of 4
}

TEST_F(TrainerTest, InitialEpochAndStateCounters) {
  auto data = make_data();
  auto s = make_setup();
  auto history = s.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(4).initial_epoch(2).batch_size(10));
  EXPECT_EQ(history.epoch, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(s.trainer->state().epoch, 4);
  EXPECT_EQ(s.trainer->state().global_step, 6);
  EXPECT_EQ(s.trainer->state().batch_in_epoch, 0);
  // As in Keras, a plain second fit starts again at epoch 0.
  EXPECT_EQ(s.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(1)).epoch, (std::vector<int64_t>{0}));
}

TEST_F(TrainerTest, FitsDataLoaders) {
  auto data = make_data(300, 100);
  auto stacked = torch::data::make_data_loader(
      XYDataset(data.x_train, data.y_train).map(torch::data::transforms::Stack<>()),
      torch::data::DataLoaderOptions().batch_size(16));
  auto s = make_setup();
  auto recorder_batches = std::make_shared<int64_t>(0);
  auto history = s.trainer->fit(stacked, FitOptions().epochs(10).validation_data(data.x_test, data.y_test));
  EXPECT_EQ(history.epoch.size(), 10u);
  EXPECT_EQ(s.trainer->state().global_step, 10 * 19);  // ceil(300 / 16) batches an epoch
  EXPECT_GT(history.history.at("val_accuracy").back(), 0.9);

  // Unstacked loaders yield vectors of examples; a raw reference works too.
  auto unstacked = torch::data::make_data_loader(XYDataset(data.x_train, data.y_train),
                                                 torch::data::DataLoaderOptions().batch_size(50));
  auto more = s.trainer->fit(*unstacked, FitOptions().epochs(1));
  EXPECT_EQ(s.trainer->state().global_step, 10 * 19 + 6);
  EXPECT_EQ(more.history.at("loss").size(), 1u);
}

TEST_F(TrainerTest, ParamsTellCallbacksWhatTheFitWasAskedFor) {
  struct Recorder : Callback {
    void on_train_begin(const Logs&) override { seen.push_back(context()->params()); }
    std::vector<FitParams> seen;
  };
  auto data = make_data(300, 100);
  auto s = make_setup();
  auto recorder = std::make_shared<Recorder>();
  s.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(2).batch_size(16).callbacks({recorder}));
  s.trainer->fit(data.x_train, data.y_train,
                 FitOptions().epochs(3).batch_size(16).validation_split(0.5).callbacks({recorder}));
  s.trainer->fit(data.x_train, data.y_train, FitOptions().steps_per_epoch(4).verbose(2).callbacks({recorder}));
  auto loader = torch::data::make_data_loader(
      XYDataset(data.x_train, data.y_train).map(torch::data::transforms::Stack<>()),
      torch::data::DataLoaderOptions().batch_size(16));
  s.trainer->fit(loader, FitOptions().callbacks({recorder}));
  ASSERT_EQ(recorder->seen.size(), 4u);
  EXPECT_EQ(recorder->seen[0].epochs, 2);
  EXPECT_EQ(recorder->seen[0].steps, 19);  // ceil(300 / 16)
  EXPECT_EQ(recorder->seen[0].verbose, 0);
  EXPECT_EQ(recorder->seen[1].epochs, 3);
  EXPECT_EQ(recorder->seen[1].steps, 10);  // 150 held out
  EXPECT_EQ(recorder->seen[2].epochs, 1);
  EXPECT_EQ(recorder->seen[2].steps, 4);
  EXPECT_EQ(recorder->seen[2].verbose, 2);
  EXPECT_EQ(recorder->seen[3].steps, std::nullopt);  // a loader tells its size only by running out
  EXPECT_EQ(s.trainer->params().epochs, 1);  // the last fit's, after it
}

TEST_F(TrainerTest, AcceptsModuleHolders) {
  auto data = make_data();
  torch::nn::Sequential seq(torch::nn::Linear(3, 8), torch::nn::ReLU(), torch::nn::Linear(8, 3));
  auto adam = std::make_shared<torch::optim::Adam>(seq->parameters(), 0.01);
  Trainer trainer(seq, adam, ce_loss, {metrics::accuracy()});
  auto history = trainer.fit(data.x_train, data.y_train, FitOptions().epochs(2).batch_size(10));
  EXPECT_EQ(history.epoch.size(), 2u);
}

TEST_F(TrainerTest, LbfgsRunsThroughTheClosure) {
  auto data = make_data();
  auto model = Mlp();
  auto lbfgs = std::make_shared<torch::optim::LBFGS>(model->parameters(), torch::optim::LBFGSOptions(0.5));
  Trainer trainer(model, lbfgs, ce_loss);
  auto history = trainer.fit(data.x_train, data.y_train, FitOptions().epochs(3).batch_size(30));
  EXPECT_LT(history.history["loss"].back(), history.history["loss"].front());
}

TEST_F(TrainerTest, Metrics) {
  auto scores = torch::tensor({{0.1, 0.9}, {0.8, 0.2}, {0.3, 0.7}, {0.6, 0.4}});
  auto labels = torch::tensor({1, 0, 0, 0});
  auto accuracy = metrics::accuracy();
  EXPECT_EQ(accuracy.name, "accuracy");
  EXPECT_EQ(accuracy.direction, Mode::Max);
  EXPECT_DOUBLE_EQ(accuracy.fn(scores, labels).item<double>(), 0.75);
  auto one_hot = torch::nn::functional::one_hot(labels, 2);
  EXPECT_DOUBLE_EQ(accuracy.fn(scores, one_hot).item<double>(), 0.75);
  auto probabilities = torch::tensor({{0.2}, {0.7}, {0.9}, {0.4}});
  auto binary = torch::tensor({0.0, 1.0, 0.0, 0.0});
  EXPECT_DOUBLE_EQ(accuracy.fn(probabilities, binary).item<double>(), 0.75);

  auto out = torch::tensor({1.0, 2.0, 4.0});
  auto target = torch::tensor({1.0, 0.0, 1.0});
  EXPECT_EQ(metrics::mse().name, "mse");
  EXPECT_EQ(metrics::mse().direction, Mode::Min);
  EXPECT_DOUBLE_EQ(metrics::mse().fn(out, target).item<double>(), 13.0 / 3);
  EXPECT_EQ(metrics::mae().direction, Mode::Min);
  EXPECT_DOUBLE_EQ(metrics::mae().fn(out, target).item<double>(), 5.0 / 3);
}

TEST_F(TrainerTest, CustomMetricDirectionDrivesAutoMode) {
  auto data = make_data();
  auto model = Mlp();
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  Metric error{"error", [](const torch::Tensor& o, const torch::Tensor& t) {
                 return 1.0 - metrics::accuracy().fn(o, t);
               }, Mode::Min};
  Trainer trainer(model, sgd, ce_loss, {error});
  auto cb = std::make_shared<CheckpointCallback>(CheckpointOptions(path("c.pt")).monitor("val_error"));
  trainer.fit(data.x_train, data.y_train, FitOptions().batch_size(5).validation_split(0.2).callbacks({cb}));
  EXPECT_EQ(cb->mode(), Mode::Min);
}

}  // namespace
}  // namespace torchfit::test
