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
  EXPECT_THROW_MSG(load(into, path("opt.pt")), CheckpointError, "[optimizer] (into a torch::optim::");
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
  EXPECT_THROW_MSG(load(into, path("opt.pt")), CheckpointError, path("opt.pt"));
  EXPECT_EQ(detail::pickle_to_bytes(detail::optimizer_state_dict(*partial)), before) << "the optimizer changed";
}

INSTANTIATE_TEST_SUITE_P(Optimizers, OptimizerStateTest, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<OptimizerCase>& info) { return info.param.name; });

class OptimizerFileTest : public TorchfitTest {};

TEST_F(OptimizerFileTest, AStepThatIsNotAWholeCountIsRefused) {
  // Python keeps Adam's step as a float tensor; casting NaN or 1e30 to int64 would be undefined.
  Mlp model;
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.01));
  adam->zero_grad();
  ce_loss(model->forward(torch::randn({4, 3})), torch::tensor({0, 1, 2, 0})).backward();
  adam->step();
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (double step : {nan, inf, -inf, 1e30, -1.0, 2.5}) {
    SCOPED_TRACE(step);
    auto state = detail::optimizer_state_dict(*adam);
    auto per_param = state.toGenericDict().at("state").toGenericDict().at(0).toGenericDict();
    c10::impl::GenericDict changed(per_param.keyType(), per_param.valueType());
    for (const auto& entry : per_param) changed.insert(entry.key(), entry.value());
    changed.insert_or_assign("step", at::scalar_tensor(step, at::kFloat));
    state.toGenericDict().at("state").toGenericDict().insert_or_assign(0, changed);
    EXPECT_THROW_MSG(detail::prepare_optimizer_load(*adam, state, "here"), CheckpointError, "'step' is",
                     "not a step count");
  }
}

TEST_F(OptimizerFileTest, ADamagedLibTorchArchiveIsRefusedBeforeAnyItemChanges) {
  // torchfit 0.2 saved LBFGS as LibTorch's own archive, now parsed while checking, before any item
  // is applied.
  const std::string file = std::string(TORCHFIT_TEST_DATA) + "/v0_2/checkpoint.pt";
  const auto good = FileCheckpointIO().load(file).toGenericDict();
  Mlp other;
  auto other_lbfgs = std::make_shared<torch::optim::LBFGS>(other->parameters(), torch::optim::LBFGSOptions(0.5));
  Checkpoint into;
  into.add("model", other);
  into.add("lbfgs", other_lbfgs);
  auto before = state_dict(*other);
  for (auto& [name, tensor] : before) tensor = tensor.clone();
  const auto archive = good.at("lbfgs").toGenericDict().at("torchfit_archive").toTensor();
  for (const auto& blob : {torch::randint(0, 255, {300}, at::kByte), archive.narrow(0, 0, archive.numel() / 2),
                           torch::empty({0}, at::kByte)}) {
    c10::impl::GenericDict damaged(c10::StringType::get(), c10::AnyType::get());
    damaged.insert("model", good.at("model"));
    c10::impl::GenericDict optimizer(c10::StringType::get(), c10::AnyType::get());
    for (const auto& entry : good.at("lbfgs").toGenericDict()) optimizer.insert(entry.key(), entry.value());
    optimizer.insert_or_assign("torchfit_archive", blob);
    damaged.insert("lbfgs", optimizer);
    EXPECT_THROW_MSG(into.load_state_dict(damaged, "damaged.pt"), CheckpointError, "damaged.pt [lbfgs]",
                     "'torchfit_archive' is not a LibTorch optimizer archive");
    for (const auto& [name, tensor] : state_dict(*other)) EXPECT_TRUE(torch::equal(tensor, before.at(name))) << name;
    EXPECT_TRUE(other_lbfgs->state().empty());
  }
}

TEST_F(OptimizerFileTest, AnLBFGSHistoryLibTorchWouldIndexPastIsRefused) {
  // LibTorch's step indexes its scratch buffer (history_size long) with every stored direction.
  Mlp model;
  auto lbfgs = std::make_shared<torch::optim::LBFGS>(model->parameters(),
                                                     torch::optim::LBFGSOptions(0.5).max_iter(5).history_size(10));
  lbfgs->step([&] {
    lbfgs->zero_grad();
    auto loss = ce_loss(model->forward(torch::randn({8, 3})), torch::tensor({0, 1, 2, 0, 1, 2, 0, 1}));
    loss.backward();
    return loss;
  });
  const auto directions = static_cast<const torch::optim::LBFGSParamState&>(*lbfgs->state().begin()->second).old_dirs().size();
  ASSERT_GE(directions, 2u);
  auto changed = [&](const char* group_key, c10::IValue group_value, const char* state_key, c10::IValue state_value) {
    auto saved = detail::optimizer_state_dict(*lbfgs).toGenericDict();
    auto group = saved.at("param_groups").toListRef()[0].toGenericDict();
    if (group_key != nullptr) group.insert_or_assign(group_key, group_value);
    auto state = saved.at("state").toGenericDict().at(0).toGenericDict();
    if (state_key != nullptr) state.insert_or_assign(state_key, state_value);
    return c10::IValue(saved);
  };
  auto refusal = [&](const c10::IValue& state) {
    Mlp other;
    torch::optim::LBFGS fresh(other->parameters(), torch::optim::LBFGSOptions(0.5));
    try {
      detail::prepare_optimizer_load(fresh, state, "here");
    } catch (const CheckpointError& e) {
      return std::string(e.what());
    }
    return std::string("(loaded)");
  };
  EXPECT_NE(refusal(changed("history_size", int64_t{1}, nullptr, {})).find(
                fmt::format("holds {} directions but its history_size is 1", directions)),
            std::string::npos);
  c10::impl::GenericList short_ro(c10::AnyType::get());
  short_ro.push_back(torch::ones({}));
  EXPECT_NE(refusal(changed(nullptr, {}, "ro", short_ro)).find(fmt::format("holds {} old_dirs, {} old_stps and 1 ro",
                                                                              directions, directions)),
            std::string::npos);
  EXPECT_EQ(refusal(changed(nullptr, {}, "al", short_ro)), "(loaded)");  // scratch: dropped, never indexed
}

TEST_F(OptimizerFileTest, LBFGSWithAHistoryNotYetFullSavesAndContinuesBitwise) {
  // Python's layout: LibTorch's own archive cannot hold this state (its `al` holds undefined
  // tensors until the history is full), so torchfit 0.2 failed to save it.
  auto make = [](Mlp& model) {
    return std::make_shared<torch::optim::LBFGS>(model->parameters(),
                                                 torch::optim::LBFGSOptions(0.5).max_iter(4).history_size(10));
  };
  const auto x = torch::randn({8, 3});
  const auto y = torch::tensor({0, 1, 2, 0, 1, 2, 0, 1});
  auto step = [&](Mlp& model, torch::optim::LBFGS& lbfgs) {
    lbfgs.step([&] {
      lbfgs.zero_grad();
      auto loss = ce_loss(model->forward(x), y);
      loss.backward();
      return loss;
    });
  };
  Mlp model;
  auto lbfgs = make(model);
  step(model, *lbfgs);
  Checkpoint state;
  state.add("model", model);
  state.add("lbfgs", lbfgs);
  save(state, path("lbfgs.pt"));
  Mlp restored;
  auto restored_lbfgs = make(restored);
  Checkpoint into;
  into.add("model", restored);
  into.add("lbfgs", restored_lbfgs);
  load(into, path("lbfgs.pt"));
  step(model, *lbfgs);
  step(restored, *restored_lbfgs);
  expect_same_weights(*model, *restored);
}

}  // namespace
}  // namespace torchfit::test
