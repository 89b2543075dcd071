// Custom steps (train_step, test_step, predict_step) and the default step's
// gradient options: clipping and accumulation.
#include "support.h"

namespace torchfit::test {
namespace {

class StepTest : public TorchfitTest {};

using Example = torch::data::Example<>;

TEST_F(StepTest, AccumulatedSmallBatchesMatchTheLargerBatch) {
  auto data = make_data(40, 10);
  auto run = [&](int64_t batch_size, int64_t accumulate, bool custom) {
    torch::manual_seed(11);
    Mlp model;
    auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 0.01);
    Trainer trainer(model, adam, ce_loss);
    if (custom) {
      trainer.train_step<Example>([](StepContext& step, const Example& batch) {
        auto output = step.forward(batch.data);
        step.minimize(step.compute_loss(output, batch.target));
        step.update_metrics(output, batch.target);
      });
    }
    trainer.fit(data.x_train, data.y_train,
                FitOptions().epochs(3).batch_size(batch_size).shuffle(false).gradient_accumulation_steps(accumulate));
    return model;
  };
  auto whole = run(20, 1, false);
  auto default_step = run(5, 4, false);
  auto custom_step = run(5, 4, true);
  for (const auto& item : whole->named_parameters()) {
    const auto& name = item.key();
    EXPECT_TRUE(torch::allclose(default_step->named_parameters()[name], item.value(), 1e-4, 1e-6)) << name;
    EXPECT_TRUE(torch::allclose(custom_step->named_parameters()[name], item.value(), 1e-4, 1e-6)) << name;
  }
  // Without accumulation the small batches take other steps.
  auto plain = run(5, 1, false);
  EXPECT_FALSE(torch::allclose(plain->fc1->weight, whole->fc1->weight, 1e-4, 1e-6));
}

TEST_F(StepTest, LeftoverBatchesStepAtTheEpochEnd) {
  auto data = make_data(30, 10);
  torch::manual_seed(4);
  Mlp model;
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  Trainer trainer(model, sgd, ce_loss);
  auto before = model->fc1->weight.clone();
  // 3 batches, windows of 4: the only optimizer step comes from the epoch's end.
  trainer.fit(data.x_train, data.y_train, FitOptions().epochs(1).batch_size(10).gradient_accumulation_steps(4));
  EXPECT_FALSE(torch::equal(before, model->fc1->weight));
}

TEST_F(StepTest, ClippingBoundsTheUpdate) {
  auto data = make_data(30, 10);
  auto update = [&](FitOptions options) {
    torch::manual_seed(8);
    Mlp model;
    auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 1.0);
    Trainer trainer(model, sgd, ce_loss);
    std::vector<torch::Tensor> before;
    for (const auto& p : model->parameters()) before.push_back(p.detach().clone());
    trainer.fit(data.x_train, data.y_train, options.epochs(1).batch_size(30));  // one step
    std::vector<torch::Tensor> deltas;
    auto params = model->parameters();
    for (size_t i = 0; i < params.size(); ++i) deltas.push_back((params[i].detach() - before[i]).flatten());
    return torch::cat(deltas);
  };
  auto free = update(FitOptions());
  ASSERT_GT(free.norm().item<double>(), 0.05);
  auto by_norm = update(FitOptions().clip_grad_norm(0.01));
  EXPECT_NEAR(by_norm.norm().item<double>(), 0.01, 1e-5);  // lr 1: the update is the clipped gradient
  EXPECT_TRUE(torch::allclose(by_norm / by_norm.norm(), free / free.norm(), 1e-3, 1e-5))  // same direction
      << (by_norm / by_norm.norm() - free / free.norm()).abs().max().item<double>();
  auto by_value = update(FitOptions().clip_grad_value(0.001));
  EXPECT_LE(by_value.abs().max().item<double>(), 0.001 + 1e-7);
  EXPECT_GT(by_value.abs().max().item<double>(), 0.0009);
  auto s = make_setup();
  EXPECT_THROW_MSG(s.trainer->fit(data.x_train, data.y_train, FitOptions().clip_grad_norm(0.0)), ValueError,
                   "Invalid clip_grad_norm: 0");
  EXPECT_THROW_MSG(s.trainer->fit(data.x_train, data.y_train, FitOptions().gradient_accumulation_steps(0)), ValueError,
                   "Invalid gradient_accumulation_steps: 0 (must be > 0)");
}

/// Two inputs, two outputs: class scores and the features they came from.
struct TwoTowerImpl : torch::nn::Module {
  TwoTowerImpl()
      : left(register_module("left", torch::nn::Linear(2, 8))),
        right(register_module("right", torch::nn::Linear(1, 8))),
        head(register_module("head", torch::nn::Linear(16, 3))) {}
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& a, const torch::Tensor& b) {
    auto features = torch::relu(torch::cat({left(a), right(b)}, 1));
    return {head(features), features};
  }
  torch::nn::Linear left, right, head;
};
TORCH_MODULE(TwoTower);

/// A user's own example type.
struct PairExample {
  torch::Tensor left, right, label;
};

class PairDataset : public torch::data::datasets::Dataset<PairDataset, PairExample> {
 public:
  PairDataset(torch::Tensor x, torch::Tensor y) : x_(std::move(x)), y_(std::move(y)) {}
  PairExample get(size_t i) override {
    auto row = x_[static_cast<int64_t>(i)];
    return {row.narrow(0, 0, 2), row.narrow(0, 2, 1), y_[static_cast<int64_t>(i)]};
  }
  torch::optional<size_t> size() const override { return static_cast<size_t>(x_.size(0)); }

 private:
  torch::Tensor x_, y_;
};

using PairBatch = std::vector<PairExample>;

torch::Tensor stack(const PairBatch& batch, torch::Tensor PairExample::*field) {
  std::vector<torch::Tensor> parts;
  for (const auto& example : batch) parts.push_back(example.*field);
  return torch::stack(parts);
}

TEST_F(StepTest, CustomStepsTrainATwoInputModelOnItsOwnBatches) {
  auto data = make_data(300, 90);
  TwoTower model;
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 0.01);
  Trainer trainer(model, adam, nullptr, {metrics::accuracy(), metrics::f1_score(3)});
  auto penalty_of = [model] {
    torch::Tensor sum = torch::zeros({});
    for (const auto& p : model->parameters()) sum = sum + p.pow(2).sum();
    return 1e-4 * sum;
  };
  trainer.train_step<PairBatch>([&](StepContext& step, const PairBatch& batch) {
    auto label = stack(batch, &PairExample::label);
    auto [scores, features] = model->forward(stack(batch, &PairExample::left), stack(batch, &PairExample::right));
    auto penalty = penalty_of();  // a second loss term
    step.minimize(torch::nn::functional::cross_entropy(scores, label) + penalty);
    step.update_metrics(scores, label);
    return Logs{{"penalty", penalty.item<double>()}, {"active", (features > 0).to(torch::kFloat).mean().item<double>()}};
  });
  trainer.test_step<PairBatch>([&](StepContext& step, const PairBatch& batch) {
    auto label = stack(batch, &PairExample::label);
    auto scores = std::get<0>(model->forward(stack(batch, &PairExample::left), stack(batch, &PairExample::right)));
    step.record_loss(torch::nn::functional::cross_entropy(scores, label));
    step.update_metrics(scores, label);
  });
  trainer.predict_step<PairBatch>([&](const PairBatch& batch) {
    return std::get<0>(model->forward(stack(batch, &PairExample::left), stack(batch, &PairExample::right)));
  });
  auto train = torch::data::make_data_loader(PairDataset(data.x_train, data.y_train),
                                             torch::data::DataLoaderOptions().batch_size(16));
  auto test = torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(
      PairDataset(data.x_test, data.y_test), torch::data::DataLoaderOptions().batch_size(30));
  auto history = trainer.fit(*train, FitOptions().epochs(8).validation_data(*test));
  EXPECT_GT(history.history.at("val_accuracy").back(), 0.9);
  EXPECT_GT(history.history.at("val_f1_score").back(), 0.9);
  ASSERT_EQ(history.history.at("penalty").size(), 8u);
  EXPECT_GT(history.history.at("penalty").back(), 0.0);
  EXPECT_EQ(history.history.count("val_penalty"), 0u);  // the test step logs none
  EXPECT_LT(history.history.at("loss").back(), history.history.at("loss").front());
  auto scores = trainer.predict(*test);
  ASSERT_EQ(scores.sizes(), (std::vector<int64_t>{90, 3}));
  auto accuracy = scores.argmax(1).eq(data.y_test).to(torch::kDouble).mean().item<double>();
  EXPECT_NEAR(trainer.evaluate(*test).at("accuracy"), accuracy, 1e-9);
}

TEST_F(StepTest, StepsThatDoNotFitTheDataAreNamed) {
  auto data = make_data();
  TwoTower two_inputs;
  auto adam = std::make_shared<torch::optim::Adam>(two_inputs->parameters(), 0.01);
  Trainer trainer(two_inputs, adam, ce_loss);
  // The default step needs Tensor forward(Tensor).
  EXPECT_THROW_MSG(trainer.fit(data.x_train, data.y_train), ValueError,
                   "the model's forward does not take and return one tensor");
  auto pairs = torch::data::make_data_loader(PairDataset(data.x_train, data.y_train),
                                             torch::data::DataLoaderOptions().batch_size(10));
  EXPECT_THROW_MSG(trainer.fit(*pairs), ValueError, "set Trainer::train_step<std::vector<torchfit::test::");
  trainer.train_step<Example>([](StepContext& step, const Example&) { step.record_loss(torch::zeros({})); });
  EXPECT_THROW_MSG(trainer.fit(*pairs), ValueError, "train_step was set for batches of type torch::data::Example<");
  EXPECT_THROW_MSG(trainer.predict(*pairs), ValueError, "set Trainer::predict_step<");

  // A step that records no loss, and minimize where it cannot work.
  auto s = make_setup();
  s.trainer->train_step<Example>([](StepContext&, const Example&) {});
  EXPECT_THROW_MSG(s.trainer->fit(data.x_train, data.y_train), ValueError, "train_step recorded no loss");
  // A custom train step with the default test step validating.
  s.trainer->train_step<Example>([](StepContext& step, const Example& batch) {
    step.minimize(ce_loss(step.forward(batch.data), batch.target));
  });
  auto history = s.trainer->fit(data.x_train, data.y_train,
                                FitOptions().epochs(2).validation_data(data.x_test, data.y_test));
  EXPECT_EQ(history.history.at("val_accuracy").size(), 2u);
  EXPECT_LT(history.history.at("loss").back(), history.history.at("loss").front());
  auto model = Mlp();
  auto lbfgs = std::make_shared<torch::optim::LBFGS>(model->parameters());
  Trainer with_lbfgs(model, lbfgs, ce_loss);
  EXPECT_THROW_MSG(with_lbfgs.fit(data.x_train, data.y_train, FitOptions().gradient_accumulation_steps(2)), ValueError,
                   "LBFGS evaluates the loss several times per step");
}

}  // namespace
}  // namespace torchfit::test
