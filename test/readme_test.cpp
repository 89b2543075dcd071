// Every C++ block of README.md, compiled here from readme/<name>.inc (see test/CMakeLists.txt),
// in a function whose parameters are the names the block takes as given. Most also run.
#include <unistd.h>

#include "support.h"

#include "readme/blocks.inc"

namespace torchfit::test {
namespace readme {

#include "readme/tour_model.inc"

void tour(const torch::Tensor& x, const torch::Tensor& y) {
#include "readme/tour.inc"
}

template <typename Loader>
void loaders(Trainer& trainer, Loader& train_loader, Loader& val_loader, Loader& test_loader) {
#include "readme/loaders.inc"
  EXPECT_EQ(out.size(0), 40);
  EXPECT_EQ(logs.count("loss"), 1u);
}

/// Two inputs, two outputs, and a penalty: what the custom-steps block expects of `model`.
struct TwoInputsImpl : torch::nn::Module {
  TwoInputsImpl() : left(register_module("left", torch::nn::Linear(2, 10))),
                    right(register_module("right", torch::nn::Linear(2, 10))) {}
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& a, const torch::Tensor& b) {
    auto features = left(a) + right(b);
    return {features, features.relu()};
  }
  torch::Tensor penalty() { return left->weight.pow(2).sum() + right->weight.pow(2).sum(); }
  torch::nn::Linear left, right;
};
TORCH_MODULE(TwoInputs);

void custom_steps(TwoInputs model, std::shared_ptr<torch::optim::Adam> adam) {
  auto stack_of = [](const auto& batch, auto field) {
    std::vector<torch::Tensor> parts;
    for (const auto& example : batch) parts.push_back(example.*field);
    return torch::stack(parts);
  };
  auto left_of = [&](const auto& batch) { return stack_of(batch, &std::decay_t<decltype(batch[0])>::left); };
  auto right_of = [&](const auto& batch) { return stack_of(batch, &std::decay_t<decltype(batch[0])>::right); };
  auto labels_of = [&](const auto& batch) { return stack_of(batch, &std::decay_t<decltype(batch[0])>::label); };
#include "readme/custom_steps.inc"
}

/// Returns how many steps it trained.
int64_t own_loop(int64_t steps) {
  torch::nn::Linear generator(4, 4), discriminator(4, 1);
  torch::optim::Adam g_opt(generator->parameters(), 1e-3);
  torch::optim::Adam d_opt(discriminator->parameters(), 1e-3);
  auto dataset = torch::data::datasets::TensorDataset(torch::randn({640, 4}))
                     .map(torch::data::transforms::Stack<torch::data::TensorExample>());
  int64_t trained = 0;
  auto forward_and_backward = [&](const torch::data::TensorExample& batch) {
    ++trained;
    g_opt.zero_grad();
    d_opt.zero_grad();
    auto loss = discriminator(generator(batch.data)).mean();
    loss.backward();
    return loss.item<double>();
  };
#include "readme/own_loop.inc"
  return trained;
}

/// The hand-written loop of the callbacks block.
using MyLoop = LoopContext;

int64_t callbacks_own_loop(Mlp model, std::shared_ptr<torch::optim::Optimizer> optimizer,
                           std::shared_ptr<EarlyStopping> early_stopping,
                           std::shared_ptr<ReduceLROnPlateau> reduce_lr, int64_t epochs) {
  int64_t trained = 0;
  auto train_one_epoch = [&] { return ++trained > 2 ? 1.0 : 1.0 / static_cast<double>(trained); };
#include "readme/callbacks_own_loop.inc"
  return trained;
}

void backup(Trainer& trainer, const torch::Tensor& x, const torch::Tensor& y,
            std::shared_ptr<CheckpointCallback> checkpoint) {
#include "readme/backup.inc"
}

// Compiled only: it joins a process group from the environment.
[[maybe_unused]] void data_parallel(Trainer& trainer, const torch::Tensor& x, const torch::Tensor& y,
                                    const FitOptions& options) {
#include "readme/data_parallel.inc"
}

}  // namespace readme

namespace {

/// Runs a block in the test's temporary directory, as its relative paths expect.
class ReadmeTest : public TorchfitTest {
 protected:
  void SetUp() override {
    TorchfitTest::SetUp();
    ASSERT_NE(::getcwd(previous_, sizeof previous_), nullptr);
    ASSERT_EQ(::chdir(dir().c_str()), 0);
  }
  void TearDown() override {
    EXPECT_EQ(::chdir(previous_), 0);
    TorchfitTest::TearDown();
  }
  char previous_[4096] = {};
};

TEST_F(ReadmeTest, EveryCppBlockIsMarkedAndCompiled) { EXPECT_EQ(kReadmeMarkedBlocks, kReadmeCppBlocks); }

TEST_F(ReadmeTest, TourRunsAsWritten) {
  auto x = torch::rand({256, 28, 28});
  auto y = torch::randint(0, 10, {256});
  readme::tour(x, y);
  EXPECT_TRUE(fs::exists("ckpt/full.pt"));
  EXPECT_FALSE(files("ckpt").empty());
}

TEST_F(ReadmeTest, LoadersBlockRuns) {
  auto data = make_data(200, 40);
  auto loader = [](const torch::Tensor& x, const torch::Tensor& y) {
    return torch::data::make_data_loader(XYDataset(x, y).map(torch::data::transforms::Stack<>()),
                                         torch::data::DataLoaderOptions().batch_size(4));
  };
  auto train = loader(data.x_train, data.y_train);
  auto val = loader(data.x_test, data.y_test), test = loader(data.x_test, data.y_test);
  auto s = make_setup();
  readme::loaders(*s.trainer, train, val, test);
  EXPECT_EQ(s.trainer->state().global_step, 150);  // 3 epochs of 50 steps
}

TEST_F(ReadmeTest, OwnLoopBlockRunsAndResumes) {
  EXPECT_EQ(readme::own_loop(250), 250);  // saves at steps 100 and 200 (every 100th call)
  EXPECT_EQ(readme::own_loop(300), 100);  // resumes at step 200
  auto names = files("ckpt");
  EXPECT_TRUE(std::any_of(names.begin(), names.end(), [](const std::string& n) { return n.rfind("000300-", 0) == 0; }))
      << fmt::format("{}", fmt::join(names, ", "));
}

TEST_F(ReadmeTest, CallbacksInYourOwnLoopBlockRuns) {
  Mlp model;
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  auto early_stopping = std::make_shared<EarlyStopping>(EarlyStoppingOptions().monitor("loss").patience(1));
  auto reduce_lr = std::make_shared<ReduceLROnPlateau>(ReduceLROnPlateauOptions().monitor("loss").patience(5));
  // The loss improves twice, then stalls: patience 1 stops after the first epoch without improvement.
  EXPECT_EQ(readme::callbacks_own_loop(model, sgd, early_stopping, reduce_lr, 10), 3);
}

TEST_F(ReadmeTest, BackupBlockRuns) {
  auto data = make_data(64, 10);
  auto s = make_setup();
  auto checkpoint = std::make_shared<CheckpointCallback>(CheckpointOptions("run1/best.pt"));
  readme::backup(*s.trainer, data.x_train, data.y_train, checkpoint);
  EXPECT_EQ(s.trainer->state().epoch, 50);
  EXPECT_TRUE(fs::exists("run1/best.pt"));
}

TEST_F(ReadmeTest, CustomStepsBlockSetsAllThreeSteps) {
  readme::TwoInputs model;
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 0.01);
  readme::custom_steps(model, adam);  // builds its own Trainer; compiling it is the point
}

}  // namespace
}  // namespace torchfit::test
