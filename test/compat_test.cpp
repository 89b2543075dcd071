// Files written by torchfit 0.2 and by each LibTorch leg load on every leg, bitwise.
//
// test/data/<source>/ holds weights.pt, trainer.pt, checkpoint.pt and expected.txt, the state they
// hold as text. v0_2 was written by torchfit 0.2 (LibTorch 1.13, tagged pickles), libtorch-1.13 and
// libtorch-2.6 by this version on each leg. Rewrite a leg's files with
//
//   TORCHFIT_WRITE_COMPAT_FILES=test/data/libtorch-X.Y build/test/torchfit_tests \
//     --gtest_also_run_disabled_tests --gtest_filter=CompatFilesTest.DISABLED_WriteFiles

#include <cstdlib>
#include <fstream>
#include <sstream>

#include <torch/optim/lbfgs.h>

#include "format/optimizer_state.h"
#include "support.h"

namespace torchfit::test {
namespace {

/// One optimizer of each kind torchfit saves, all over one model's parameters.
struct Optimizers {
  explicit Optimizers(const Mlp& model) {
    auto params = model->parameters();
    sgd = std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1).momentum(0.9).nesterov(true));
    adam = std::make_shared<torch::optim::Adam>(params, torch::optim::AdamOptions(0.01).amsgrad(true));
    adamw = std::make_shared<torch::optim::AdamW>(params, torch::optim::AdamWOptions(0.02).weight_decay(0.1));
    rmsprop = std::make_shared<torch::optim::RMSprop>(params,
                                                      torch::optim::RMSpropOptions(0.01).momentum(0.5).centered(true));
    adagrad = std::make_shared<torch::optim::Adagrad>(params, torch::optim::AdagradOptions(0.1).lr_decay(0.01));
    // history_size(1): torchfit 0.2, which wrote v0_2, saved LBFGS as LibTorch's archive, which
    // cannot hold a history not yet full ("Cannot access storage of UndefinedTensorImpl").
    lbfgs = std::make_shared<torch::optim::LBFGS>(params, torch::optim::LBFGSOptions(0.5).max_iter(3).history_size(1));
  }
  /// Python's layout for the first five, by name.
  std::vector<std::pair<std::string, std::shared_ptr<torch::optim::Optimizer>>> python_layout() const {
    return {{"sgd", sgd}, {"adam", adam}, {"adamw", adamw}, {"rmsprop", rmsprop}, {"adagrad", adagrad}};
  }
  std::shared_ptr<torch::optim::SGD> sgd;
  std::shared_ptr<torch::optim::Adam> adam;
  std::shared_ptr<torch::optim::AdamW> adamw;
  std::shared_ptr<torch::optim::RMSprop> rmsprop;
  std::shared_ptr<torch::optim::Adagrad> adagrad;
  std::shared_ptr<torch::optim::LBFGS> lbfgs;
};

const at::Tensor& inputs() {
  static const at::Tensor x = torch::linspace(-1, 1, 48).reshape({16, 3});
  return x;
}
const at::Tensor& targets() {
  static const at::Tensor y = torch::arange(16) % 3;
  return y;
}

/// Steps every optimizer twice, so each has state.
void step_all(Mlp model, Optimizers& optimizers) {
  auto closure = [&] {
    for (auto& p : model->parameters()) p.mutable_grad() = at::Tensor();
    auto loss = ce_loss(model->forward(inputs()), targets());
    loss.backward();
    return loss;
  };
  for (int round = 0; round < 2; ++round) {
    for (const auto& [name, optimizer] : optimizers.python_layout()) {
      closure();
      optimizer->step();
    }
    optimizers.lbfgs->step(closure);
  }
}

Checkpoint make_checkpoint(const Mlp& model, const Optimizers& optimizers) {
  Checkpoint checkpoint;
  checkpoint.add("model", model);
  for (const auto& [name, optimizer] : optimizers.python_layout()) checkpoint.add(name, optimizer);
  checkpoint.add("lbfgs", optimizers.lbfgs);
  checkpoint.add_rng();
  checkpoint.set("step", int64_t{42});
  checkpoint.set("loss", 0.1);
  checkpoint.set("done", true);
  checkpoint.set("name", std::string("resume me"));
  checkpoint.set("tensor", torch::arange(5, torch::kInt32));
  return checkpoint;
}

std::string hex_of(const at::Tensor& tensor) {
  auto bytes = tensor.contiguous();
  const auto* p = static_cast<const unsigned char*>(bytes.data_ptr());
  std::string hex;
  for (int64_t i = 0; i < bytes.numel() * static_cast<int64_t>(bytes.element_size()); ++i) {
    hex += fmt::format("{:02x}", p[i]);
  }
  return fmt::format("{} [{}] {}", c10::toString(tensor.scalar_type()), fmt::join(tensor.sizes(), ","), hex);
}

/// One line per leaf, "path: value", dict keys in sorted order: the same text on every leg.
void describe(const std::string& path, const c10::IValue& value, std::vector<std::string>& out) {
  if (value.isGenericDict()) {
    std::map<std::string, c10::IValue> sorted;
    for (const auto& entry : value.toGenericDict()) {
      const auto& key = entry.key();
      sorted[key.isString() ? key.toStringRef() : key.isInt() ? fmt::format("{:06d}", key.toInt()) : "?"] = entry.value();
    }
    for (const auto& [key, item] : sorted) describe(path + "/" + key, item, out);
  } else if (value.isList() || value.isTuple()) {
    auto items = value.isList() ? value.toListRef() : value.toTupleRef().elements().asArrayRef();
    for (size_t i = 0; i < items.size(); ++i) describe(fmt::format("{}[{}]", path, i), items[i], out);
  } else if (value.isTensor()) {
    out.push_back(path + ": " + hex_of(value.toTensor()));
  } else if (value.isDouble()) {
    out.push_back(fmt::format("{}: {:.17g}", path, value.toDouble()));
  } else if (value.isInt()) {
    out.push_back(fmt::format("{}: {}", path, value.toInt()));
  } else if (value.isBool()) {
    out.push_back(fmt::format("{}: {}", path, value.toBool()));
  } else if (value.isString()) {
    out.push_back(fmt::format("{}: '{}'", path, value.toStringRef()));
  } else if (value.isNone()) {
    out.push_back(path + ": None");
  } else {
    out.push_back(path + ": " + value.tagKind());
  }
}

void describe_lbfgs(const torch::optim::LBFGS& lbfgs, std::vector<std::string>& out) {
  ASSERT_EQ(lbfgs.state().size(), 1u);
  const auto& state = static_cast<const torch::optim::LBFGSParamState&>(*lbfgs.state().begin()->second);
  out.push_back(fmt::format("lbfgs/func_evals: {}", state.func_evals()));
  out.push_back(fmt::format("lbfgs/n_iter: {}", state.n_iter()));
  out.push_back(fmt::format("lbfgs/t: {:.17g}", state.t()));
  out.push_back(fmt::format("lbfgs/prev_loss: {:.17g}", state.prev_loss()));
  out.push_back("lbfgs/d: " + hex_of(state.d()));
  out.push_back("lbfgs/prev_flat_grad: " + hex_of(state.prev_flat_grad()));
  out.push_back(fmt::format("lbfgs/old_dirs: {}", state.old_dirs().size()));
  for (const auto& dir : state.old_dirs()) out.push_back("lbfgs/old_dir: " + hex_of(dir));
  out.push_back(fmt::format("lbfgs/lr: {:.17g}", lbfgs.param_groups()[0].options().get_lr()));
}

/// The state of everything the three files restore, as text.
std::string describe_state(const Mlp& weights_model, const Mlp& model, const Optimizers& optimizers,
                           const Checkpoint& values, const at::Tensor& rng, const Harness& trained) {
  std::vector<std::string> out;
  for (const auto& [name, tensor] : state_dict(*weights_model)) out.push_back("weights/" + name + ": " + hex_of(tensor));
  for (const auto& [name, tensor] : state_dict(*model)) out.push_back("model/" + name + ": " + hex_of(tensor));
  for (const auto& [name, optimizer] : optimizers.python_layout()) {
    describe(name, detail::optimizer_state_dict(*optimizer), out);
  }
  describe_lbfgs(*optimizers.lbfgs, out);
  out.push_back("rng/cpu: " + hex_of(rng));
  out.push_back(fmt::format("values: {} {:.17g} {} '{}' {}", values.get<int64_t>("step"), values.get<double>("loss"),
                            values.get<bool>("done"), values.get<std::string>("name"),
                            hex_of(values.get<at::Tensor>("tensor"))));
  for (const auto& [name, tensor] : state_dict(*trained.model)) out.push_back("trainer/model/" + name + ": " + hex_of(tensor));
  describe("trainer/optimizer", detail::optimizer_state_dict(*trained.optimizer), out);
  out.push_back(fmt::format("trainer/position: epoch {} step {}", trained.trainer->state().epoch,
                            trained.trainer->state().global_step));
  return fmt::format("{}\n", fmt::join(out, "\n"));
}

Harness make_trainer() {
  auto trained = make_setup(0.1);
  trained.optimizer->param_groups()[0].options().set_lr(0.05);
  static_cast<torch::optim::SGDOptions&>(trained.optimizer->param_groups()[0].options()).momentum(0.9);
  return trained;
}

class CompatFilesTest : public TorchfitTest {};

TEST_F(CompatFilesTest, DISABLED_WriteFiles) {
  const char* target = std::getenv("TORCHFIT_WRITE_COMPAT_FILES");
  if (target == nullptr) GTEST_SKIP() << "set TORCHFIT_WRITE_COMPAT_FILES to the directory to write";
  const std::string dir = target;
  fs::create_directories(dir);
  torch::manual_seed(7);
  Mlp model;
  Optimizers optimizers(model);
  step_all(model, optimizers);
  save_weights(*model, dir + "/weights.pt");
  auto checkpoint = make_checkpoint(model, optimizers);
  torch::manual_seed(11);
  const auto rng = at::detail::getDefaultCPUGenerator().get_state();  // what the checkpoint holds
  torchfit::save(checkpoint, dir + "/checkpoint.pt");
  auto trained = make_trainer();
  trained.trainer->fit(inputs(), targets(), FitOptions().epochs(2).batch_size(4).verbose(0));
  trained.trainer->save_checkpoint(dir + "/trainer.pt");
  std::ofstream(dir + "/expected.txt") << describe_state(model, model, optimizers, checkpoint, rng, trained);
}

TEST_F(CompatFilesTest, FilesOfEveryLegAndOfVersion02LoadBitwise) {
  for (const char* source : {"v0_2", "libtorch-1.13", "libtorch-2.6"}) {
    SCOPED_TRACE(source);
    const std::string dir = std::string(TORCHFIT_TEST_DATA) + "/" + source;
    ASSERT_TRUE(fs::exists(dir + "/expected.txt")) << dir;
    torch::manual_seed(99);  // other values than the files hold
    Mlp weights_model, model;
    Optimizers optimizers(model);
    auto checkpoint = make_checkpoint(model, optimizers);
    auto trained = make_trainer();
    load_weights(*weights_model, dir + "/weights.pt");
    torchfit::load(checkpoint, dir + "/checkpoint.pt");
    const auto rng = at::detail::getDefaultCPUGenerator().get_state();
    trained.trainer->load_checkpoint(dir + "/trainer.pt");
    EXPECT_EQ(describe_state(weights_model, model, optimizers, checkpoint, rng, trained),
              read_file(dir + "/expected.txt"));
    // Every optimizer steps on from the loaded state.
    step_all(model, optimizers);
  }
}

}  // namespace
}  // namespace torchfit::test
