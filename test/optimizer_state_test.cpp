// Optimizer items of a Checkpoint: state and every param group's options come
// back exactly, so training continues bitwise, for each optimizer LibTorch has.
#include "format/optimizer_state.h"
#include "format/pickle_file.h"
#include "support.h"

namespace torchfit::test {
namespace {

using OptimizerFactory = std::function<std::shared_ptr<torch::optim::Optimizer>(std::vector<at::Tensor>)>;

struct OptimizerCase {
  std::string name;
  OptimizerFactory make;
  /// The same type with other options: loading must replace them.
  OptimizerFactory make_other;
};

void PrintTo(const OptimizerCase& c, std::ostream* os) { *os << c.name; }

std::vector<OptimizerCase> cases() {
  using namespace torch::optim;
  return {
      {"SGD",
       [](auto p) { return std::make_shared<SGD>(p, SGDOptions(0.05).momentum(0.9).nesterov(true).weight_decay(1e-3)); },
       [](auto p) { return std::make_shared<SGD>(p, SGDOptions(0.5)); }},
      {"Adam",
       [](auto p) { return std::make_shared<Adam>(p, AdamOptions(1e-2).betas({0.8, 0.95}).amsgrad(true)); },
       [](auto p) { return std::make_shared<Adam>(p, AdamOptions(1e-4)); }},
      {"AdamW",
       [](auto p) { return std::make_shared<AdamW>(p, AdamWOptions(1e-2).weight_decay(0.05).eps(1e-6)); },
       [](auto p) { return std::make_shared<AdamW>(p, AdamWOptions(1e-4)); }},
      {"RMSprop",
       [](auto p) { return std::make_shared<RMSprop>(p, RMSpropOptions(1e-2).momentum(0.5).centered(true)); },
       [](auto p) { return std::make_shared<RMSprop>(p, RMSpropOptions(1e-4)); }},
      {"Adagrad",
       [](auto p) { return std::make_shared<Adagrad>(p, AdagradOptions(0.1).lr_decay(0.01)); },
       [](auto p) { return std::make_shared<Adagrad>(p, AdagradOptions(1e-3)); }},
  };
}

class OptimizerStateTest : public TorchfitTest, public ::testing::WithParamInterface<OptimizerCase> {
 protected:
  void SetUp() override {
    TorchfitTest::SetUp();
    data_ = make_data();
  }

  void steps(Mlp& model, torch::optim::Optimizer& optimizer, int n) {
    for (int i = 0; i < n; ++i) {
      optimizer.zero_grad();
      ce_loss(model->forward(data_.x_train), data_.y_train).backward();
      optimizer.step();
    }
  }

  Dataset data_;
};

TEST_P(OptimizerStateTest, RestoredOptimizerContinuesBitwise) {
  const auto& c = GetParam();
  Mlp model;
  auto optimizer = c.make(model->parameters());
  steps(model, *optimizer, 3);
  Checkpoint state;
  state.add("model", model);
  state.add("optimizer", optimizer);
  save(state, path("opt.pt"));

  Mlp restored;
  auto other = c.make_other(restored->parameters());
  Checkpoint into;
  into.add("model", restored);
  into.add("optimizer", other);
  load(into, path("opt.pt"));
  EXPECT_DOUBLE_EQ(other->param_groups()[0].options().get_lr(), optimizer->param_groups()[0].options().get_lr());

  steps(model, *optimizer, 4);
  steps(restored, *other, 4);
  expect_same_weights(*model, *restored);
}

TEST_P(OptimizerStateTest, AnotherOptimizerTypeIsRefusedAndChangesNothing) {
  const auto& c = GetParam();
  Mlp model;
  auto optimizer = c.make(model->parameters());
  steps(model, *optimizer, 1);
  Checkpoint state;
  state.add("model", model);
  state.add("optimizer", optimizer);
  save(state, path("opt.pt"));

  // An optimizer of another type (SGD for all but SGD, which gets Adagrad).
  Mlp restored;
  std::shared_ptr<torch::optim::Optimizer> wrong =
      c.name == "SGD" ? cases()[4].make(restored->parameters()) : cases()[0].make(restored->parameters());
  auto before = state_dict(*restored);
  for (auto& [name, tensor] : before) tensor = tensor.clone();
  const double lr = wrong->param_groups()[0].options().get_lr();
  Checkpoint into;
  into.add("model", restored);
  into.add("optimizer", wrong);
  try {
    load(into, path("opt.pt"));
    FAIL() << "expected CheckpointError";
  } catch (const CheckpointError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("[optimizer] (into a torch::optim::"), std::string::npos) << msg;
  }
  for (const auto& [name, tensor] : state_dict(*restored)) EXPECT_TRUE(torch::equal(tensor, before.at(name))) << name;
  EXPECT_DOUBLE_EQ(wrong->param_groups()[0].options().get_lr(), lr);
}

TEST_P(OptimizerStateTest, FewerParametersIsRefused) {
  const auto& c = GetParam();
  Mlp model;
  auto optimizer = c.make(model->parameters());
  steps(model, *optimizer, 1);
  Checkpoint state;
  state.add("optimizer", optimizer);
  save(state, path("opt.pt"));
  Mlp small;
  auto partial = c.make({small->fc1->weight});
  auto before = detail::pickle_to_bytes(detail::optimizer_state_dict(*partial));
  Checkpoint into;
  into.add("optimizer", partial);
  try {
    load(into, path("opt.pt"));
    FAIL() << "expected CheckpointError";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(path("opt.pt")), std::string::npos) << e.what();
  }
  EXPECT_EQ(detail::pickle_to_bytes(detail::optimizer_state_dict(*partial)), before) << "the optimizer changed";
}

INSTANTIATE_TEST_SUITE_P(Optimizers, OptimizerStateTest, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<OptimizerCase>& info) { return info.param.name; });

}  // namespace
}  // namespace torchfit::test
