// Stateful metrics (exact over the epoch), sample_weight and class_weight.
#include "support.h"

namespace torchfit::test {
namespace {

class MetricsTest : public TorchfitTest {};

/// Per-class recall, precision and F1 computed directly from all predictions at once.
struct Reference {
  std::vector<double> precision, recall, f1;
  torch::Tensor counts;
  double macro(const std::vector<double>& values) const {
    double sum = 0;
    int seen = 0;
    for (size_t c = 0; c < values.size(); ++c) {
      if (counts.sum(0)[c].item<double>() + counts.sum(1)[c].item<double>() > 0) {
        sum += values[c];
        ++seen;
      }
    }
    return sum / seen;
  }
};

Reference reference(const torch::Tensor& predicted, const torch::Tensor& truth, int64_t classes) {
  Reference out;
  out.counts = torch::zeros({classes, classes}, torch::kDouble);
  for (int64_t i = 0; i < truth.size(0); ++i) out.counts[truth[i].item<int64_t>()][predicted[i].item<int64_t>()] += 1;
  for (int64_t c = 0; c < classes; ++c) {
    double hits = out.counts[c][c].item<double>();
    double predicted_c = out.counts.sum(0)[c].item<double>(), actual_c = out.counts.sum(1)[c].item<double>();
    double p = predicted_c > 0 ? hits / predicted_c : 0.0, r = actual_c > 0 ? hits / actual_c : 0.0;
    out.precision.push_back(p);
    out.recall.push_back(r);
    out.f1.push_back(p + r > 0 ? 2 * p * r / (p + r) : 0.0);
  }
  return out;
}

TEST_F(MetricsTest, StatefulMacroRecallIsExactOverTheEpoch) {
  // A barely trained model, so the classes are imbalanced in its predictions.
  auto data = make_data(30, 97);
  auto model = Mlp();
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.05);
  Trainer trainer(model, sgd, ce_loss,
                  {metrics::recall(3), metrics::precision(3, metrics::Average::PerClass), metrics::f1_score(3),
                   metrics::confusion_matrix(3), metrics::top_k_accuracy(2)});
  trainer.fit(data.x_train, data.y_train, FitOptions().epochs(1).batch_size(10));
  auto logs = trainer.evaluate(data.x_test, data.y_test, 8);  // 13 batches, the last of 1
  auto scores = trainer.predict(data.x_test);
  auto expected = reference(scores.argmax(1), data.y_test, 3);
  EXPECT_NEAR(logs.at("recall"), expected.macro(expected.recall), 1e-12);
  EXPECT_NEAR(logs.at("f1_score"), expected.macro(expected.f1), 1e-12);
  for (int c = 0; c < 3; ++c) EXPECT_NEAR(logs.at(fmt::format("precision_{}", c)), expected.precision[c], 1e-12);
  EXPECT_EQ(logs.count("precision"), 0u);
  EXPECT_EQ(logs.count("confusion_matrix"), 0u);  // a matrix is not logged...
  const auto& matrix = *trainer.metrics()[3].stateful;  // ...but read from the metric
  EXPECT_TRUE(torch::equal(matrix.result(), expected.counts));
  auto top2 = std::get<1>(scores.topk(2, 1)).eq(data.y_test.unsqueeze(1)).any(1).to(torch::kDouble).mean();
  EXPECT_NEAR(logs.at("top_2_accuracy"), top2.item<double>(), 1e-12);

  // The mean of batch recalls, what 0.1 logged, is not the epoch's recall.
  double batch_mean = 0;
  for (int64_t start = 0; start < 97; start += 8) {
    int64_t n = std::min<int64_t>(8, 97 - start);
    auto part = reference(scores.narrow(0, start, n).argmax(1), data.y_test.narrow(0, start, n), 3);
    batch_mean += part.macro(part.recall) * static_cast<double>(n) / 97.0;
  }
  EXPECT_GT(std::abs(batch_mean - logs.at("recall")), 1e-6);
}

TEST_F(MetricsTest, StatefulMetricByHand) {
  auto recall = metrics::recall(2);
  auto& metric = *recall.stateful;
  EXPECT_EQ(recall.name, "recall");
  EXPECT_EQ(recall.direction, Mode::Max);
  // Single scores are binary probabilities; targets 0/1.
  metric.update(torch::tensor({0.9, 0.2, 0.7}), torch::tensor({1.0, 1.0, 0.0}));
  metric.update(torch::tensor({0.1}), torch::tensor({0.0}));
  // Class 0: 1 of 2 found; class 1: 1 of 2 found.
  EXPECT_DOUBLE_EQ(metric.result().item<double>(), 0.5);
  metric.reset();
  metric.update(torch::tensor({0.9, 0.2}), torch::tensor({1.0, 1.0}), torch::tensor({3.0, 1.0}));
  // Class 0 is predicted but never occurs: its recall is 0 (scikit-learn's zero_division=0);
  // class 1's is 3 of 4 by weight.
  EXPECT_DOUBLE_EQ(metric.result().item<double>(), 0.375);
  metric.reset();
  metric.update(torch::tensor({0.9, 0.8}), torch::tensor({1.0, 1.0}));
  EXPECT_DOUBLE_EQ(metric.result().item<double>(), 1.0);  // class 0 neither occurs nor is predicted: left out
  // Never predicted: precision 0, not NaN.
  auto precision = metrics::precision(3, metrics::Average::PerClass).stateful;
  precision->update(torch::tensor({{2.0, 1.0, 0.0}, {2.0, 0.0, 1.0}}), torch::tensor({0, 2}));
  EXPECT_TRUE(torch::equal(precision->result(), torch::tensor({0.5, 0.0, 0.0}, torch::kDouble)));
  EXPECT_THROW_MSG(precision->update(torch::rand({2, 4}), torch::tensor({0, 1})), ValueError,
                   "metric 'precision' counts 3 classes, but the model output has 4 class scores");
  EXPECT_THROW_MSG(precision->update(torch::rand({2, 3}), torch::tensor({0, 5})), ValueError,
                   "metric 'precision': target class 5 is outside [0, 3)");
  EXPECT_THROW_MSG(metrics::recall(1), ValueError, "Invalid num_classes: 1 (must be >= 2)");
  EXPECT_THROW_MSG(metrics::top_k_accuracy(0), ValueError, "Invalid k: 0 (must be >= 1)");
}

torch::Tensor per_sample_ce(const torch::Tensor& output, const torch::Tensor& target) {
  return torch::nn::functional::cross_entropy(
      output, target, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
}

TEST_F(MetricsTest, SampleWeightAndClassWeightWeighTheLoss) {
  auto data = make_data(30, 30);
  auto model = Mlp();
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  Trainer trainer(model, sgd, per_sample_ce, {metrics::accuracy()});
  auto weights = torch::rand({30}) * 2;
  auto losses = per_sample_ce(model->forward(data.x_train), data.y_train).detach();
  // As Keras: each batch's weighted sum over its size, averaged over batches by size.
  EXPECT_NEAR(trainer.evaluate(data.x_train, data.y_train, 7, weights).at("loss"),
              (losses * weights).sum().item<double>() / 30, 1e-5);
  EXPECT_NEAR(trainer.evaluate(data.x_train, data.y_train, 7).at("loss"), losses.mean().item<double>(), 1e-5);

  // One batch: the logged loss is the one the step minimised, before the update.
  auto history = trainer.fit(data.x_train, data.y_train,
                             FitOptions().epochs(1).batch_size(30).shuffle(false).sample_weight(weights));
  EXPECT_NEAR(history.history.at("loss")[0], (losses * weights).sum().item<double>() / 30, 1e-5);

  losses = per_sample_ce(model->forward(data.x_train), data.y_train).detach();
  std::map<int64_t, double> by_class{{0, 1.0}, {1, 5.0}, {2, 0.5}};
  auto class_weights = torch::tensor({1.0, 5.0, 0.5}).index_select(0, data.y_train);
  history = trainer.fit(data.x_train, data.y_train,
                        FitOptions().epochs(1).batch_size(30).class_weight(by_class).sample_weight(weights));
  EXPECT_NEAR(history.history.at("loss")[0], (losses * weights * class_weights).sum().item<double>() / 30, 1e-5);

  auto expect_error = [&](FitOptions options, const std::string& fragment) {
    EXPECT_THROW_MSG(trainer.fit(data.x_train, data.y_train, options.batch_size(30)), ValueError, fragment);
  };
  expect_error(FitOptions().class_weight({{0, 1.0}, {1, 2.0}}), "class_weight has no weight for class 2 (it has classes 0, 1)");
  expect_error(FitOptions().class_weight({{-1, 1.0}}), "class_weight: class -1 is negative");
  expect_error(FitOptions().sample_weight(torch::ones({29})), "sample_weight must have one value per sample ([30])");
  Trainer scalar_loss(model, sgd, ce_loss);
  EXPECT_THROW_MSG(scalar_loss.fit(data.x_train, data.y_train, FitOptions().sample_weight(weights)), ValueError,
                   "need a loss that returns one value per sample");
}

TEST_F(MetricsTest, StatefulMetricsResumeMidEpochExactly) {
  auto data = make_data(40, 10);
  auto run = [&](Trainer& trainer, std::vector<std::shared_ptr<Callback>> callbacks) {
    return trainer.fit(data.x_train, data.y_train,
                       FitOptions().epochs(2).batch_size(10).seed(3).callbacks(std::move(callbacks)));
  };
  auto make = [](Mlp model) {
    auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
    return Trainer(model, sgd, ce_loss, {metrics::f1_score(3)});
  };
  torch::manual_seed(6);
  Mlp whole_model;
  auto whole = make(whole_model);
  auto saves = std::make_shared<CheckpointCallback>(
      CheckpointOptions(path("ckpt/{epoch}-{batch}.pt")).save_freq(SaveFreq::batches(1)));
  auto expected = run(whole, {saves});
  Mlp resumed_model;
  auto resumed = make(resumed_model);
  resumed.load_checkpoint(path("ckpt/2-2.pt"));  // halfway through the second epoch
  EXPECT_EQ(resumed.state().metric_states.at("f1_score").size(), 9u);
  auto history = run(resumed, {});
  EXPECT_DOUBLE_EQ(history.history.at("f1_score").back(), expected.history.at("f1_score").back());
}

}  // namespace
}  // namespace torchfit::test
