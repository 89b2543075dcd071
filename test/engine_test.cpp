// The checkpoint engine: Checkpoint, save/load, CheckpointManager over any
// CheckpointIO, and the callbacks as adapters over it.
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <fstream>
#include <random>
#include <thread>
#include <map>
#include <sstream>

#include "compat/libtorch.h"
#include "support.h"

namespace torchfit::test {
namespace {

/// A GAN-like pair: two models and two optimizers with their own options.
struct Pair {
  Mlp generator, discriminator;
  std::shared_ptr<torch::optim::Adam> g_opt;
  std::shared_ptr<torch::optim::SGD> d_opt;
  Pair() {
    g_opt = std::make_shared<torch::optim::Adam>(generator->parameters(), torch::optim::AdamOptions(1e-3));
    d_opt = std::make_shared<torch::optim::SGD>(discriminator->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  }
  void step() {
    auto x = torch::randn({8, 3});
    g_opt->zero_grad();
    generator->forward(x).pow(2).mean().backward();
    g_opt->step();
    d_opt->zero_grad();
    discriminator->forward(x).abs().mean().backward();
    d_opt->step();
  }
  Checkpoint items() {
    Checkpoint c;
    c.add("generator", generator);
    c.add("discriminator", discriminator);
    c.add("g_opt", g_opt);
    c.add("d_opt", d_opt);
    c.add_rng();
    return c;
  }
};

/// One more step on both from the same seed leaves them bitwise equal when their optimizers'
/// states were.
void expect_same_after_a_step(Pair& a, Pair& b) {
  torch::manual_seed(5);
  a.step();
  torch::manual_seed(5);
  b.step();
  expect_same_weights(*a.generator, *b.generator);
  expect_same_weights(*a.discriminator, *b.discriminator);
}

double lr_of(const torch::optim::Optimizer& optimizer) { return optimizer.param_groups()[0].options().get_lr(); }

class EngineTest : public TorchfitTest {};

TEST_F(EngineTest, SaveLoadRoundTripRestoresModulesOptimizerOptionsRngAndValues) {
  Pair a;
  for (int i = 0; i < 3; ++i) a.step();
  a.g_opt->param_groups()[0].options().set_lr(0.0125);
  static_cast<torch::optim::SGDOptions&>(a.d_opt->param_groups()[0].options()).momentum(0.5);
  auto state = a.items();
  state.set("step", int64_t{3});
  state.set("tag", std::string("gan"));
  torchfit::save(state, path("one.pt"));
  auto expected_noise = torch::rand({4});  // what the generator yields after the save

  Pair b;
  auto restored = b.items();
  restored.set("step", int64_t{0});
  restored.set("tag", std::string());
  torchfit::load(restored, path("one.pt"));
  EXPECT_EQ(restored.get<int64_t>("step"), 3);
  EXPECT_EQ(restored.get<std::string>("tag"), "gan");
  expect_same_weights(*a.generator, *b.generator);
  expect_same_weights(*a.discriminator, *b.discriminator);
  EXPECT_DOUBLE_EQ(lr_of(*b.g_opt), 0.0125);
  EXPECT_DOUBLE_EQ(static_cast<torch::optim::SGDOptions&>(b.d_opt->param_groups()[0].options()).momentum(), 0.5);
  EXPECT_TRUE(torch::equal(torch::rand({4}), expected_noise)) << "the RNG was not restored";
  expect_same_after_a_step(a, b);  // the optimizer state came back too
}

TEST_F(EngineTest, LoadNamesMissingAndUnexpectedItemsAndChangesNothing) {
  Pair a;
  torchfit::save(a.items(), path("one.pt"));
  Pair b;
  auto before = state_dict(*b.generator)["fc1.weight"].clone();
  auto fewer = b.items();
  fewer.remove("d_opt");
  fewer.set("step", int64_t{1});
  EXPECT_THROW_MSG(torchfit::load(fewer, path("one.pt")), CheckpointError, path("one.pt"), "missing item(s) 'step'",
                   "unexpected item(s) 'd_opt'");
  EXPECT_TRUE(torch::equal(state_dict(*b.generator)["fc1.weight"], before));
}

TEST_F(EngineTest, MismatchInOneItemLeavesEveryItemUntouched) {
  Pair a;
  a.step();
  torchfit::save(a.items(), path("one.pt"));
  // Same names, but the discriminator has another shape: nothing may be loaded.
  Mlp generator;
  auto other = torch::nn::Linear(3, 7);
  auto g_before = state_dict(*generator)["fc1.weight"].clone();
  Checkpoint c;
  c.add("generator", generator);
  c.add("discriminator", other);
  c.add("g_opt", std::make_shared<torch::optim::Adam>(generator->parameters()));
  c.add("d_opt", std::make_shared<torch::optim::SGD>(other->parameters(), 0.1));
  c.add_rng();
  EXPECT_THROW_MSG(torchfit::load(c, path("one.pt")), CheckpointError, "[discriminator]");
  EXPECT_TRUE(torch::equal(state_dict(*generator)["fc1.weight"], g_before));
}

/// The Adam state of `param`: its exp_avg and exp_avg_sq.
std::pair<at::Tensor, at::Tensor> adam_moments(torch::optim::Adam& adam, const at::Tensor& param) {
  const auto& state =
      static_cast<const torch::optim::AdamParamState&>(*adam.state().at(compat::optimizer_state_key(param)));
  return {state.exp_avg(), state.exp_avg_sq()};
}

TEST_F(EngineTest, ALoadFromAFileGivesTheModelAndOptimizerItsMemoryInsteadOfCopying) {
  Pair a;
  for (int i = 0; i < 3; ++i) a.step();
  torchfit::save(a.items(), path("one.pt"));
  Pair b;
  b.step();  // b's optimizers hold state of their own
  const auto weight = b.generator->fc1->weight;
  const void* weight_memory = weight.data_ptr();
  const auto [exp_avg, exp_avg_sq] = adam_moments(*b.g_opt, weight);
  const void* exp_avg_memory = exp_avg.data_ptr();
  auto items = b.items();
  torchfit::load(items, path("one.pt"));
  // The model's and the optimizer's tensors are the ones they were, holding the file's bytes
  // in the file's memory: nothing was copied.
  expect_same_weights(*a.generator, *b.generator);
  EXPECT_TRUE(b.generator->fc1->weight.is_same(weight));
  EXPECT_NE(weight.data_ptr(), weight_memory);
  const auto [loaded_avg, loaded_avg_sq] = adam_moments(*b.g_opt, weight);
  EXPECT_TRUE(loaded_avg.is_same(exp_avg));
  EXPECT_TRUE(loaded_avg_sq.is_same(exp_avg_sq));
  EXPECT_NE(loaded_avg.data_ptr(), exp_avg_memory);
  const auto [saved_avg, saved_avg_sq] = adam_moments(*a.g_opt, a.generator->fc1->weight);
  EXPECT_TRUE(torch::equal(loaded_avg, saved_avg));
  EXPECT_TRUE(torch::equal(loaded_avg_sq, saved_avg_sq));
  expect_same_after_a_step(a, b);
}

TEST_F(EngineTest, AStateTheCallerHoldsIsCopiedByLoadStateDict) {
  Pair a, b;
  a.step();
  b.step();
  const auto state = a.items().state_dict();  // a's live tensors
  const void* a_memory = a.generator->fc1->weight.data_ptr();
  auto items = b.items();
  items.load_state_dict(state, "a's state");
  expect_same_weights(*a.generator, *b.generator);
  EXPECT_EQ(a.generator->fc1->weight.data_ptr(), a_memory);
  const auto a_weights = state_dict(*a.generator)["fc1.weight"].clone();
  b.step();  // b's training must not reach a
  EXPECT_TRUE(torch::equal(state_dict(*a.generator)["fc1.weight"], a_weights));
  EXPECT_FALSE(torch::equal(state_dict(*b.generator)["fc1.weight"], a_weights));
}

TEST_F(EngineTest, AFileNamingOneTensorTwiceLoadsTwoIndependentStateTensors) {
  Pair a;
  a.step();
  // A hand-made file whose Adam state of parameter 0 has exp_avg and exp_avg_sq as one tensor.
  auto state = a.items().state_dict();
  auto moments = state.toGenericDict().at("g_opt").toGenericDict().at("state").toGenericDict().at(0).toGenericDict();
  moments.insert_or_assign("exp_avg", moments.at("exp_avg_sq"));
  FileCheckpointIO().save(state, path("twice.pt"));
  const auto expected = moments.at("exp_avg_sq").toTensor().clone();
  for (bool with_state : {true, false}) {
    SCOPED_TRACE(with_state ? "into an optimizer with state" : "into a fresh optimizer");
    Pair b;
    if (with_state) b.step();
    auto items = b.items();
    torchfit::load(items, path("twice.pt"));
    auto [exp_avg, exp_avg_sq] = adam_moments(*b.g_opt, b.generator->fc1->weight);
    EXPECT_TRUE(torch::equal(exp_avg, expected));
    EXPECT_TRUE(torch::equal(exp_avg_sq, expected));
    EXPECT_FALSE(exp_avg.is_alias_of(exp_avg_sq));
    exp_avg.add_(1);
    EXPECT_TRUE(torch::equal(exp_avg_sq, expected));
  }
}

TEST_F(EngineTest, AFileNamingOneTensorInTwoItemsLoadsBothFromIt) {
  Pair a;
  a.step();
  // A hand-made file whose generator weight is also the Adam state exp_avg of that weight.
  auto state = a.items().state_dict();
  const auto weight = state.toGenericDict().at("generator").toGenericDict().at("fc1.weight");
  state.toGenericDict().at("g_opt").toGenericDict().at("state").toGenericDict().at(0).toGenericDict().insert_or_assign(
      "exp_avg", weight);
  FileCheckpointIO().save(state, path("shared.pt"));
  const auto expected = weight.toTensor().clone();
  Pair b;
  b.step();
  auto items = b.items();
  torchfit::load(items, path("shared.pt"));
  const auto [exp_avg, exp_avg_sq] = adam_moments(*b.g_opt, b.generator->fc1->weight);
  EXPECT_TRUE(torch::equal(b.generator->fc1->weight, expected));
  EXPECT_TRUE(torch::equal(exp_avg, expected));
  EXPECT_FALSE(exp_avg.is_alias_of(b.generator->fc1->weight));
}

TEST_F(EngineTest, CheckpointFilesAreTorchSaveDictsForPython) {
  Pair a;
  a.step();
  auto state = a.items();
  state.set("step", int64_t{7});
  torchfit::save(state, path("one.pt"));
  auto script = path("check.py");
  std::ofstream(script) << "import sys, torch\n"
                           "d = torch.load(sys.argv[1])\n"
                           "assert d['step'] == 7, d['step']\n"
                           "assert d['g_opt']['param_groups'][0]['lr'] == 1e-3\n"
                           "assert sorted(d['generator']) == ['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight']\n"
                           "m = torch.nn.Sequential()\n"
                           "m.add_module('fc1', torch.nn.Linear(3, 5)); m.add_module('fc2', torch.nn.Linear(5, 3))\n"
                           "m.load_state_dict(d['generator'])\n"
                           "opt = torch.optim.Adam(m.parameters())\n"
                           "opt.load_state_dict(d['g_opt'])\n"
                           "print('ok')\n";
  std::string cmd = "/usr/bin/python3 " + script + " " + path("one.pt") + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  char buffer[256];
  while (fgets(buffer, sizeof buffer, pipe)) out += buffer;
  EXPECT_EQ(pclose(pipe), 0) << out;
  EXPECT_NE(out.find("ok"), std::string::npos) << out;
}

TEST_F(EngineTest, ManagerRunsItsScenariosOnAnotherStorage) {
  auto memory = std::make_shared<MemoryCheckpointIO>();
  Pair a;
  auto state = a.items();
  CheckpointManager manager(CheckpointOptions("ckpt/{step:03d}-{g_loss:.2f}.pt")
                                .monitor("g_loss").mode(Mode::Min).save_top_k(2).io(memory));
  std::vector<double> losses{0.9, 0.5, 0.7, 0.3, 0.8};
  for (size_t i = 0; i < losses.size(); ++i) {
    manager.save(state, {{"step", double(i + 1)}, {"g_loss", losses[i]}});
  }
  EXPECT_EQ(memory->paths(), (std::vector<std::string>{"ckpt/002-0.50.pt", "ckpt/004-0.30.pt"}));
  ASSERT_EQ(manager.top_k().size(), 2u);
  EXPECT_EQ(manager.top_k().front().first, "ckpt/004-0.30.pt");

  // A new manager over the same storage resumes its tables from the newest file.
  CheckpointManager resumed(CheckpointOptions("ckpt/{step:03d}-{g_loss:.2f}.pt")
                                .monitor("g_loss").mode(Mode::Min).save_top_k(2).io(memory));
  Pair b;
  auto restored = b.items();
  auto from = resumed.restore_latest(restored);
  ASSERT_TRUE(from);
  EXPECT_EQ(*from, "ckpt/004-0.30.pt");
  EXPECT_EQ(resumed.top_k(), manager.top_k());
  expect_same_weights(*a.generator, *b.generator);
}

TEST_F(EngineTest, AManagerRestoresFilesWithoutCopyingAndKeptStatesByCopy) {
  Pair a;
  a.step();
  {  // files: the model takes the file's memory
    CheckpointManager manager(CheckpointOptions(path("ckpt/{step}.pt")).monitor("step"));
    auto state = a.items();
    manager.save(state, {{"step", 1.0}});
    Pair b;
    b.step();
    const auto weight = b.generator->fc1->weight;
    const void* memory = weight.data_ptr();
    auto restored = b.items();
    ASSERT_TRUE(manager.restore_latest(restored));
    expect_same_weights(*a.generator, *b.generator);
    EXPECT_TRUE(b.generator->fc1->weight.is_same(weight));
    EXPECT_NE(weight.data_ptr(), memory);
  }
  // A storage that hands out the state it keeps must still have it intact after a restore
  // and more training.
  class KeepingIO : public MemoryCheckpointIO {
   public:
    c10::IValue load(const std::string& path) override {
      if (kept_.isNone()) kept_ = MemoryCheckpointIO::load(path);
      return kept_;
    }

   private:
    c10::IValue kept_;
  };
  CheckpointManager manager(CheckpointOptions("ckpt/{step}.pt").monitor("step").io(std::make_shared<KeepingIO>()));
  auto state = a.items();
  manager.save(state, {{"step", 1.0}});
  for (int restore = 0; restore < 2; ++restore) {
    Pair b;
    auto restored = b.items();
    ASSERT_TRUE(manager.restore_latest(restored));
    expect_same_weights(*a.generator, *b.generator);
    b.step();
  }
}

TEST_F(EngineTest, ManagerSaveFreqCountsCallsAndSaveBestOnlySkipsNaN) {
  Pair a;
  auto state = a.items();
  CheckpointManager manager(CheckpointOptions(path("{step}.pt"))
                                .monitor("loss").save_best_only(true).save_freq(SaveFreq::batches(2)));
  std::vector<double> losses{1.0, 0.9, 0.8, std::nan(""), 0.7, 0.95, 0.6, 0.5};
  std::vector<bool> saved;
  for (size_t i = 0; i < losses.size(); ++i) saved.push_back(manager.save(state, {{"step", double(i + 1)}, {"loss", losses[i]}}));
  // Every 2nd call is a save point: 0.9 (saved), NaN (never best), 0.95 (no better), 0.5 (saved).
  EXPECT_EQ(saved, (std::vector<bool>{false, true, false, false, false, false, false, true}));
  EXPECT_EQ(files(), (std::vector<std::string>{"2.pt", "8.pt"}));
}

TEST_F(EngineTest, ManagerNeverDeletesTheFileItResumedFrom) {
  Pair a;
  auto state = a.items();
  {
    CheckpointManager first(CheckpointOptions(path("{step}.pt")).max_to_keep(1).monitor("loss"));
    first.save(state, {{"step", 1.0}, {"loss", 1.0}});
  }
  CheckpointManager second(CheckpointOptions(path("{step}.pt")).max_to_keep(1).monitor("loss"));
  Pair b;
  auto restored = b.items();
  ASSERT_EQ(second.restore_latest(restored), path("1.pt"));
  // The resumed manager's own table says keep 1; the file it resumed from survives.
  second.save(restored, {{"step", 2.0}, {"loss", 1.0}});
  second.save(restored, {{"step", 3.0}, {"loss", 1.0}});
  EXPECT_EQ(files(), (std::vector<std::string>{"1.pt", "3.pt"}));
}

TEST_F(EngineTest, RestoreLatestSkipsDamagedFilesAndFailsWhenNoneIsUsable) {
  Pair a;
  auto state = a.items();
  CheckpointManager manager(CheckpointOptions(path("{step}.pt")).monitor("loss"));
  manager.save(state, {{"step", 1.0}, {"loss", 1.0}});
  manager.save(state, {{"step", 2.0}, {"loss", 1.0}});
  std::ofstream(path("2.pt"), std::ios::binary | std::ios::trunc) << "torn";
  Pair b;
  auto restored = b.items();
  CheckpointManager again(CheckpointOptions(path("{step}.pt")).monitor("loss"));
  EXPECT_EQ(again.restore_latest(restored), path("1.pt"));
  std::ofstream(path("1.pt"), std::ios::binary | std::ios::trunc) << "torn";
  EXPECT_THROW_MSG(again.restore_latest(restored), CheckpointError, "no checkpoint could be restored");
  CheckpointManager empty(CheckpointOptions(path("none/{step}.pt")).monitor("loss"));
  EXPECT_FALSE(empty.restore_latest(restored));
}

TEST_F(EngineTest, AsyncManagerWritesTheStateOfTheSavePoint) {
  Pair a;
  auto state = a.items();
  CheckpointManager manager(CheckpointOptions(path("{step}.pt")).monitor("loss").async_save(true));
  manager.save(state, {{"step", 1.0}, {"loss", 1.0}});
  auto at_save = state_dict(*a.generator)["fc1.weight"].clone();
  a.step();  // training goes on while the writer works
  manager.wait();
  Pair b;
  auto restored = b.items();
  torchfit::load(restored, path("1.pt"));
  EXPECT_TRUE(torch::equal(state_dict(*b.generator)["fc1.weight"], at_save));
}

TEST_F(EngineTest, TrainerLoadCheckpointRestoresParamGroupOptions) {
  auto data = make_data();
  auto s = make_setup(0.1);
  auto halve = std::make_shared<LearningRateScheduler>([](int64_t epoch, double lr) { return epoch >= 1 ? lr / 2 : lr; });
  s.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(4).batch_size(10).seed(1).callbacks({halve}));
  EXPECT_DOUBLE_EQ(lr_of(*s.optimizer), 0.0125);
  s.trainer->save_checkpoint(path("full.pt"));
  auto fresh = make_setup(0.1);
  fresh.trainer->load_checkpoint(path("full.pt"));
  EXPECT_DOUBLE_EQ(lr_of(*fresh.optimizer), 0.0125);
}

TEST_F(EngineTest, TrainerLoadCheckpointRestoresMomentumAndBetas) {
  auto data = make_data();
  auto sgd = make_setup(0.1);
  auto& sgd_options = static_cast<torch::optim::SGDOptions&>(sgd.optimizer->param_groups()[0].options());
  sgd_options.momentum(0.7).weight_decay(1e-3);
  sgd.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(1).batch_size(10));
  sgd.trainer->save_checkpoint(path("sgd.pt"));
  auto fresh_sgd = make_setup(0.1);
  fresh_sgd.trainer->load_checkpoint(path("sgd.pt"));
  const auto& restored_sgd = static_cast<torch::optim::SGDOptions&>(fresh_sgd.optimizer->param_groups()[0].options());
  EXPECT_DOUBLE_EQ(restored_sgd.momentum(), 0.7);
  EXPECT_DOUBLE_EQ(restored_sgd.weight_decay(), 1e-3);

  auto make_adam = [] {
    Mlp model;
    auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-3));
    return std::make_pair(adam, std::make_unique<Trainer>(model, adam, ce_loss));
  };
  auto [adam, trainer] = make_adam();
  static_cast<torch::optim::AdamOptions&>(adam->param_groups()[0].options()).betas({0.5, 0.6}).eps(1e-6);
  trainer->fit(data.x_train, data.y_train, FitOptions().epochs(1).batch_size(10));
  trainer->save_checkpoint(path("adam.pt"));
  auto [fresh_adam, fresh_trainer] = make_adam();
  fresh_trainer->load_checkpoint(path("adam.pt"));
  const auto& restored = static_cast<torch::optim::AdamOptions&>(fresh_adam->param_groups()[0].options());
  EXPECT_DOUBLE_EQ(std::get<0>(restored.betas()), 0.5);
  EXPECT_DOUBLE_EQ(std::get<1>(restored.betas()), 0.6);
  EXPECT_DOUBLE_EQ(restored.eps(), 1e-6);
}

TEST_F(EngineTest, FreeCheckpointFunctionsTakeWhatFirstAndKeepThe01Order) {
  auto a = make_setup(0.3);
  TrainerState progress;
  progress.epoch = 2;
  progress.global_step = 17;
  save_checkpoint(*a.model, *a.optimizer, progress, {}, path("new.pt"), SaveOptions().fsync(false));
  save_checkpoint(path("old.pt"), *a.model, *a.optimizer, progress, {});
  for (const char* name : {"new.pt", "old.pt"}) {
    SCOPED_TRACE(name);
    auto b = make_setup(0.1);
    auto contents = std::string(name) == "new.pt" ? load_checkpoint(*b.model, *b.optimizer, path(name))
                                                   : load_checkpoint(path(name), *b.model, *b.optimizer);
    EXPECT_EQ(contents.trainer.epoch, 2);
    EXPECT_EQ(contents.trainer.global_step, 17);
    EXPECT_DOUBLE_EQ(lr_of(*b.optimizer), 0.3);
    expect_same_weights(*a.model, *b.model);
  }
}

TEST_F(EngineTest, CallbacksRunInAHandWrittenLoopThroughTrainingContext) {
  Mlp model;
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  LoopContext context(model, sgd);
  auto stopper = std::make_shared<EarlyStopping>(
      EarlyStoppingOptions().monitor("loss").patience(2).restore_best_weights(true));
  auto reduce = std::make_shared<ReduceLROnPlateau>(ReduceLROnPlateauOptions().monitor("loss").patience(1).factor(0.5));
  auto checkpoint = std::make_shared<CheckpointCallback>(CheckpointOptions(path("e{epoch}.pt")).save_best_only(true).monitor("loss"));
  CallbackList callbacks({stopper, reduce, checkpoint});
  callbacks.set_context(&context);
  callbacks.on_train_begin({});
  const std::vector<double> losses = {1.0, 0.5, 0.6, 0.7, 0.8};
  TensorMap best_weights;
  int64_t epoch = 0;
  for (; epoch < static_cast<int64_t>(losses.size()) && !context.stop_training(); ++epoch) {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.add_(0.01);  // "training"
    if (epoch == 1) {
      for (const auto& [name, tensor] : state_dict(*model)) best_weights[name] = tensor.clone();
    }
    callbacks.on_epoch_begin(epoch, {});
    callbacks.on_epoch_end(epoch, {{"loss", losses[epoch]}});
  }
  callbacks.on_train_end({});
  EXPECT_EQ(epoch, 4) << "patience 2 after the best at epoch 2 stops after epoch 4";
  EXPECT_TRUE(context.stop_training());
  for (const auto& [name, tensor] : state_dict(*model)) EXPECT_TRUE(torch::equal(tensor, best_weights.at(name))) << name;
  EXPECT_DOUBLE_EQ(lr_of(*sgd), 0.025) << "reduced after epochs 3 and 4";
  EXPECT_EQ(files(), (std::vector<std::string>{"e1.pt", "e2.pt"}));
  Mlp loaded;
  auto loaded_sgd = std::make_shared<torch::optim::SGD>(loaded->parameters(), 0.1);
  LoopContext(loaded, loaded_sgd).restore_backup(path("e2.pt"));
  for (const auto& [name, tensor] : state_dict(*loaded)) EXPECT_TRUE(torch::equal(tensor, best_weights.at(name))) << name;
}

/// Reads test/data/v0_1/expected.txt: name -> values.
std::map<std::string, std::vector<double>> expected_v0_1() {
  std::ifstream in(std::string(TORCHFIT_TEST_DATA) + "/v0_1/expected.txt");
  std::map<std::string, std::vector<double>> out;
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    std::string name;
    fields >> name;
    for (double v; fields >> v;) out[name].push_back(v);
  }
  return out;
}

void expect_values(const at::Tensor& tensor, const std::vector<double>& values, const std::string& name) {
  auto flat = tensor.flatten().to(at::kDouble);
  ASSERT_EQ(flat.numel(), static_cast<int64_t>(values.size())) << name;
  for (size_t i = 0; i < values.size(); ++i) {
    EXPECT_FLOAT_EQ(static_cast<float>(flat[i].item<double>()), static_cast<float>(values[i])) << name << "[" << i << "]";
  }
}

TEST_F(EngineTest, Version01FilesStillLoad) {
  const std::string dir = std::string(TORCHFIT_TEST_DATA) + "/v0_1";
  auto expected = expected_v0_1();
  ASSERT_FALSE(expected.empty());
  Mlp weights_model;
  load_weights(*weights_model, dir + "/weights.pt");
  for (const auto& [name, tensor] : state_dict(*weights_model)) expect_values(tensor, expected.at(name), name);

  auto s = make_setup(0.5);
  auto sgd = std::make_shared<torch::optim::SGD>(s.model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  Trainer trainer(s.model, sgd, ce_loss);
  trainer.load_checkpoint(dir + "/full.pt");
  for (const auto& [name, tensor] : state_dict(*s.model)) expect_values(tensor, expected.at(name), name);
  EXPECT_EQ(trainer.state().epoch, static_cast<int64_t>(expected.at("epoch")[0]));
  EXPECT_EQ(trainer.state().global_step, static_cast<int64_t>(expected.at("global_step")[0]));
  int index = 0;
  for (const auto& p : sgd->param_groups()[0].params()) {
    const auto& st = static_cast<torch::optim::SGDParamState&>(*sgd->state().at(compat::optimizer_state_key(p)));
    auto name = "momentum_buffer." + std::to_string(index++);
    expect_values(st.momentum_buffer(), expected.at(name), name);
  }
}

TEST_F(EngineTest, AManagerWhoseDirectoryCannotBeMadeFailsBeforeAnyTraining) {
  write_file(path("blocker"), "a file where a directory should be");
  const std::string filepath = path("blocker/ckpt/s{step}.pt");
  CheckpointManager manager{CheckpointOptions(filepath)};
  Mlp model;
  Checkpoint state;
  state.add("model", model);
  const std::string expected = fmt::format("CheckpointManager {}: cannot create the directory {}: {} is not a directory",
                                           filepath, path("blocker/ckpt"), path("blocker"));
  try {
    manager.restore_latest(state);  // as a loop that resumes on start calls it, before training
    FAIL() << "expected CheckpointError";
  } catch (const CheckpointError& e) {
    EXPECT_EQ(std::string(e.what()), expected);
  }
}

TEST_F(EngineTest, AMismatchNamesEveryItemThatDoesNotLoad) {
  Mlp generator;
  auto g_opt = std::make_shared<torch::optim::Adam>(generator->parameters(), torch::optim::AdamOptions(0.01));
  g_opt->zero_grad();
  ce_loss(generator->forward(torch::randn({4, 3})), torch::tensor({0, 1, 2, 0})).backward();
  g_opt->step();
  Checkpoint saved;
  saved.add("generator", generator);
  saved.add("g_opt", g_opt);
  torchfit::save(saved, path("gan.pt"));

  auto other = torch::nn::Linear(3, 4);  // another architecture: both items mismatch
  auto other_opt = std::make_shared<torch::optim::Adam>(other->parameters(), torch::optim::AdamOptions(0.01));
  Checkpoint into;
  into.add("generator", other);
  into.add("g_opt", other_opt);
  try {
    torchfit::load(into, path("gan.pt"));
    FAIL() << "expected CheckpointError";
  } catch (const CheckpointError& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.find("Checkpoint Checkpoint"), std::string::npos) << what;
    EXPECT_NE(what.find("Checkpoint " + path("gan.pt") + ": 2 items do not load"), std::string::npos) << what;
    // The path once, then each item by name.
    EXPECT_EQ(what.find(path("gan.pt")), what.rfind(path("gan.pt"))) << what;
    EXPECT_NE(what.find(": [generator] does not match the model"), std::string::npos) << what;
    EXPECT_NE(what.find("; [g_opt] (into a torch::optim::Adam)"), std::string::npos) << what;
  }
  EXPECT_TRUE(other_opt->state().empty());
}

TEST_F(EngineTest, TwoEarlyStoppingsOnOneMonitorKeepSeparateState) {
  EarlyStopping short_patience(EarlyStoppingOptions().monitor("loss").patience(1));
  EarlyStopping long_patience(EarlyStoppingOptions().monitor("loss").patience(5));
  EXPECT_NE(short_patience.state_key(), long_patience.state_key());
  auto a = std::make_shared<EarlyStopping>(EarlyStoppingOptions().monitor("loss"));
  auto b = std::make_shared<EarlyStopping>(EarlyStoppingOptions().monitor("loss"));
  CallbackList list({a, b});
  auto states = list.state_dicts();
  EXPECT_EQ(states.size(), 2u) << "identical callbacks must get distinct keys";
}

/// Trains with EarlyStopping and a backup, killed (by an exception) in epoch 3,
/// then resumed with the callbacks in `order`; returns the final weights.
TensorMap resume_with_order(const std::string& dir, bool backup_first) {
  auto data = make_data();
  auto run = [&](int64_t epochs, bool fail) {
    torch::manual_seed(3);
    auto s = make_setup(0.1);
    auto stopper = std::make_shared<EarlyStopping>(EarlyStoppingOptions().monitor("loss").patience(2));
    auto backup = std::make_shared<BackupAndRestore>(BackupOptions(dir));
    std::vector<std::shared_ptr<Callback>> callbacks{stopper, backup};
    if (backup_first) std::swap(callbacks[0], callbacks[1]);
    if (fail) {
      auto interrupt = std::make_shared<LambdaCallback>();
      interrupt->epoch_begin = [](int64_t epoch, const Logs&) {
        if (epoch == 3) throw std::runtime_error("interrupted");
      };
      callbacks.push_back(interrupt);
    }
    try {
      s.trainer->fit(data.x_train, data.y_train, FitOptions().epochs(epochs).batch_size(10).seed(1).callbacks(callbacks));
    } catch (const std::runtime_error&) {
    }
    return state_dict(*s.model);
  };
  run(6, true);
  return run(6, false);
}

TEST_F(EngineTest, CallbackOrderDoesNotChangeAResumedRun) {
  auto a = resume_with_order(path("a"), false);
  auto b = resume_with_order(path("b"), true);
  for (const auto& [name, tensor] : a) EXPECT_TRUE(torch::equal(tensor, b.at(name))) << name;
}

// The child side of the kill test: a hand-written two-model loop with a manager.
TEST(GanChild, Train) {
  const char* dir_env = std::getenv("TORCHFIT_GAN_CHILD_DIR");
  if (dir_env == nullptr) GTEST_SKIP() << "only run as the child of EngineTest.KilledHandWrittenLoopResumesBitwise";
  const std::string dir = dir_env;
  torch::manual_seed(11);
  Pair pair;
  auto state = pair.items();
  state.set("step", int64_t{0});
  CheckpointManager manager(CheckpointOptions(dir + "/ckpt/{step:04d}.pt")
                                .monitor("g_loss").mode(Mode::Min).save_top_k(2).save_last(true).async_save(true)
                                .save_freq(SaveFreq::batches(7)));
  manager.restore_latest(state);
  for (int64_t step = state.get<int64_t>("step"); step < 120;) {
    pair.step();
    ++step;
    if (step == 40) pair.g_opt->param_groups()[0].options().set_lr(5e-4);  // changed by hand mid-run
    state.set("step", step);
    manager.save(state, {{"step", double(step)}, {"g_loss", torch::rand({1}).item<double>()}});
    std::this_thread::sleep_for(std::chrono::milliseconds(8));  // so a kill lands mid-run
  }
  manager.wait();
  torchfit::save(state, dir + "/final.pt");
}

TEST_F(EngineTest, KilledHandWrittenLoopResumesBitwise) {
  auto run = [](const std::string& dir) {
    pid_t pid = spawn_self("GanChild.Train", {"TORCHFIT_GAN_CHILD_DIR=" + dir});
    int status = 0;
    waitpid(pid, &status, 0);
    return status;
  };
  auto load_final = [](const std::string& dir) {
    Pair pair;
    auto state = pair.items();
    state.set("step", int64_t{0});
    torchfit::load(state, dir + "/final.pt");
    return std::make_pair(state_dict(*pair.generator), state_dict(*pair.discriminator));
  };
  ASSERT_EQ(run(path("reference")), 0);
  auto reference = load_final(path("reference"));
  std::mt19937 rng(42);
  for (int round = 0; round < 3; ++round) {
    auto dir = path(fmt::format("killed-{}", round));
    pid_t pid = spawn_self("GanChild.Train", {"TORCHFIT_GAN_CHILD_DIR=" + dir});
    // Wait for the first committed save (an observable event), then kill at a random later point.
    while (!fs::exists(dir + "/ckpt/" + kLatestPointer)) {
      int status = 0;
      ASSERT_EQ(waitpid(pid, &status, WNOHANG), 0) << "the child ended before its first save";
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 400));
    ::kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    ASSERT_EQ(run(dir), 0) << dir;
    auto resumed = load_final(dir);
    for (const auto& [name, tensor] : reference.first) EXPECT_TRUE(torch::equal(tensor, resumed.first.at(name))) << dir << " " << name;
    for (const auto& [name, tensor] : reference.second) EXPECT_TRUE(torch::equal(tensor, resumed.second.at(name))) << dir << " " << name;
  }
}

}  // namespace
}  // namespace torchfit::test
