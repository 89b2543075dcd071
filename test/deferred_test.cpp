// Deferred snapshots: an async save copies parameters and optimizer state while the
// next forward and backward pass run, and the file still holds the save point's
// state bitwise; unchanged tensors are not copied again.
#include <thread>

#include <ATen/core/ivalue.h>

#include "format/checkpoint_file.h"
#include "io/snapshot.h"

#include "support.h"

namespace torchfit::test {
namespace {

class DeferredTest : public TorchfitTest {};

/// Where `a` and `b` differ ("" when bitwise equal): same structure, equal tensors and values.
std::string difference(const c10::IValue& a, const c10::IValue& b, const std::string& where) {
  if (a.tagKind() != b.tagKind()) return fmt::format("{}: a {} and a {}", where, a.tagKind(), b.tagKind());
  if (a.isTensor()) {
    const auto& x = a.toTensor();
    const auto& y = b.toTensor();
    if (x.sizes() != y.sizes() || x.scalar_type() != y.scalar_type()) return where + ": shape or dtype";
    auto bytes = [](const at::Tensor& t) { return t.contiguous().view({-1}).view(torch::kByte); };
    return torch::equal(bytes(x), bytes(y)) ? "" : where + ": values";
  }
  if (a.isGenericDict()) {
    const auto& x = a.toGenericDict();
    const auto& y = b.toGenericDict();
    if (x.size() != y.size()) return where + ": key count";
    for (const auto& entry : x) {
      auto other = y.find(entry.key());
      auto key = entry.key().isString() ? entry.key().toStringRef() : "?";
      if (other == y.end()) return where + "/" + key + ": missing";
      auto diff = difference(entry.value(), other->value(), where + "/" + key);
      if (!diff.empty()) return diff;
    }
    return "";
  }
  if (a.isList() || a.isTuple()) {
    auto x = a.isList() ? a.toListRef().vec() : a.toTupleRef().elements().vec();
    auto y = b.isList() ? b.toListRef().vec() : b.toTupleRef().elements().vec();
    if (x.size() != y.size()) return where + ": length";
    for (size_t i = 0; i < x.size(); ++i) {
      auto diff = difference(x[i], y[i], fmt::format("{}[{}]", where, i));
      if (!diff.empty()) return diff;
    }
    return "";
  }
  return a == b ? "" : where + ": value";
}

c10::IValue read(const std::string& file) { return detail::CheckpointFile(file).read_torchfit(); }

/// A model whose forward writes buffers (BatchNorm) and draws random numbers
/// (Dropout), with a frozen layer and a 16 MiB trainable parameter, so the
/// writer's copy takes long enough to overlap the next step.
struct BusyImpl : torch::nn::Module {
  BusyImpl() {
    frozen = register_module("frozen", torch::nn::Linear(3, 8));
    norm = register_module("norm", torch::nn::BatchNorm1d(8));
    drop = register_module("drop", torch::nn::Dropout(0.5));
    head = register_module("head", torch::nn::Linear(8, 3));
    big = register_parameter("big", torch::randn({4 << 20}));
    for (auto& p : frozen->parameters()) p.set_requires_grad(false);
  }
  torch::Tensor forward(torch::Tensor x) {
    return head(drop(torch::relu(norm(frozen(x))))) + big.mean();
  }
  torch::nn::Linear frozen{nullptr}, head{nullptr};
  torch::nn::BatchNorm1d norm{nullptr};
  torch::nn::Dropout drop{nullptr};
  torch::Tensor big;
};
TORCH_MODULE(Busy);

TEST_F(DeferredTest, AsyncFullCheckpointsEqualSyncOnesBitwiseWithBatchNormDropoutAndFrozenLayers) {
  auto data = make_data(40, 10);
  torch::manual_seed(4);
  Busy model;
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 0.01);
  Trainer trainer(model, adam, ce_loss);
  auto options = [&](const std::string& sub, bool async) {
    return CheckpointOptions(path(sub + "/b{batch}.pt")).save_freq(SaveFreq::batches(2)).async_save(async);
  };
  auto sync = std::make_shared<CheckpointCallback>(options("sync", false));
  auto async = std::make_shared<CheckpointCallback>(options("async", true));
  trainer.fit(data.x_train, data.y_train, FitOptions().epochs(1).batch_size(4).seed(1).callbacks({sync, async}));
  auto names = files("sync");
  ASSERT_EQ(names.size(), 5u);  // 10 batches, a save every 2
  ASSERT_EQ(files("async"), names);
  for (const auto& name : names) {
    auto a = read(path("async/" + name)).toGenericDict();
    auto s = read(path("sync/" + name)).toGenericDict();
    for (const char* item : {"model", "optimizer", "rng", "trainer"}) {
      EXPECT_EQ(difference(a.at(item), s.at(item), item), "") << name;
    }
  }
  // The frozen layer was copied once, then reused.
  auto stats = dynamic_cast<AsyncCheckpointIO&>(async->manager().io()).last_snapshot();
  EXPECT_GE(stats.reused, sizeof(float) * (3 * 8 + 8));
  EXPECT_GE(stats.deferred, (4u << 20) * sizeof(float));
}

/// A hand-written loop over a CheckpointManager.
struct Loop {
  Mlp model;
  std::shared_ptr<torch::optim::SGD> sgd;
  Checkpoint state;
  explicit Loop(uint64_t seed) {
    torch::manual_seed(seed);
    model = Mlp();
    sgd = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    state.add("model", model);
    state.add("sgd", sgd);
  }
  void backward(const Dataset& data) {
    sgd->zero_grad();
    ce_loss(model->forward(data.x_train), data.y_train).backward();
  }
};

TEST_F(DeferredTest, HandWrittenLoopsCopyLateOnlyAfterBeforeUpdateWasCalled) {
  auto data = make_data(20, 10);
  for (bool guarded : {false, true}) {
    SCOPED_TRACE(guarded ? "with before_update" : "without");
    Loop loop(7);
    CheckpointManager manager(CheckpointOptions(path(fmt::format("{}/s{{step}}.pt", guarded))).async_save(true));
    auto& io = dynamic_cast<AsyncCheckpointIO&>(manager.io());
    for (int64_t step = 1; step <= 4; ++step) {
      loop.backward(data);
      if (guarded) manager.before_update();
      loop.sgd->step();
      std::map<std::string, at::Tensor> weights;
      for (const auto& [name, tensor] : state_dict(*loop.model)) weights[name] = tensor.clone();
      manager.save(loop.state, {{"step", static_cast<double>(step)}});
      // Without the guard the copy is made in save; with it, by the writer, later.
      EXPECT_EQ(io.last_snapshot().deferred > 0, guarded) << step;
      loop.backward(data);
      if (guarded) manager.before_update();
      loop.sgd->step();  // changes every parameter and momentum buffer
      manager.wait();
      Mlp saved;
      load_weights(*saved, manager.last_saved_path(), "model");
      for (const auto& [name, tensor] : state_dict(*saved)) EXPECT_TRUE(torch::equal(tensor, weights.at(name))) << name;
    }
  }
}

TEST_F(DeferredTest, SnapshotCopiesBuffersAtOnceAndParametersLater) {
  auto weight = torch::randn({4, 4}, torch::requires_grad());
  auto running = torch::zeros({4});
  c10::impl::GenericDict state(c10::StringType::get(), c10::TensorType::get());
  state.insert("weight", weight);
  state.insert("running_mean", running);
  SaveHints hints;
  hints.updated_by_step = [&](const at::Tensor& t) { return t.storage().is_alias_of(weight.storage()); };
  hints.defer_copy = true;

  detail::Snapshot snapshot;
  auto copy = snapshot.capture(state, hints).toGenericDict();
  EXPECT_EQ(snapshot.stats().copied, running.nbytes());
  EXPECT_EQ(snapshot.stats().deferred, weight.nbytes());
  running.add_(1);  // a forward pass updates running statistics before the writer copies
  snapshot.copy_deferred();
  EXPECT_TRUE(torch::equal(copy.at("running_mean").toTensor(), torch::zeros({4})));
  EXPECT_TRUE(torch::equal(copy.at("weight").toTensor(), weight.detach()));

  // Unchanged: not copied again. Changed in place, replaced, or written past the
  // version counter (through .data()): copied again.
  snapshot.capture(state, hints);
  EXPECT_EQ(snapshot.stats().reused, weight.nbytes());
  EXPECT_EQ(snapshot.stats().deferred, 0u);
  {
    torch::NoGradGuard no_grad;
    weight.mul_(2);
  }
  snapshot.capture(state, hints);
  EXPECT_EQ(snapshot.stats().deferred, weight.nbytes());
  snapshot.copy_deferred();
  weight.data().fill_(3);
  auto again = snapshot.capture(state, hints).toGenericDict();
  EXPECT_EQ(snapshot.stats().reused, 0u);
  snapshot.copy_deferred();
  EXPECT_TRUE(torch::equal(again.at("weight").toTensor(), torch::full({4, 4}, 3.0)));
}

TEST_F(DeferredTest, SnapshotKeepsTheCrcsOfUnchangedBuffersOnly) {
  // The writer fills in CRCs as it writes; a buffer the next capture reuses keeps
  // its CRC (frozen layers are not read again), one it copies into loses it.
  auto frozen = torch::randn({64});
  auto moving = torch::randn({64});
  c10::impl::GenericDict state(c10::StringType::get(), c10::TensorType::get());
  state.insert("frozen", frozen);
  state.insert("moving", moving);
  state.insert("running", torch::zeros({4}));  // not updated by steps: copied every time
  SaveHints hints;
  hints.updated_by_step = [&](const at::Tensor& t) { return t.numel() == 64; };

  detail::Snapshot snapshot;
  auto first = snapshot.capture(state, hints).toGenericDict();
  auto data = [](const c10::impl::GenericDict& d, const char* key) { return d.at(key).toTensor().data_ptr(); };
  for (const char* key : {"frozen", "moving", "running"}) {
    const auto& buffer = first.at(key).toTensor();
    EXPECT_FALSE(snapshot.crcs().find(buffer.data_ptr(), buffer.nbytes())) << key;
    snapshot.crcs().remember(buffer.data_ptr(), buffer.nbytes(), 100);  // as a save writing it would
  }
  EXPECT_EQ(snapshot.crcs().find(data(first, "frozen"), frozen.nbytes()), 100u);
  EXPECT_FALSE(snapshot.crcs().find(data(first, "frozen"), frozen.nbytes() + 1)) << "another size is another record";

  {
    torch::NoGradGuard no_grad;
    moving.add_(1);
  }
  auto second = snapshot.capture(state, hints).toGenericDict();
  EXPECT_EQ(snapshot.stats().reused, frozen.nbytes());
  EXPECT_EQ(snapshot.crcs().find(data(second, "frozen"), frozen.nbytes()), 100u);
  EXPECT_FALSE(snapshot.crcs().find(data(second, "moving"), moving.nbytes()));
  EXPECT_FALSE(snapshot.crcs().find(data(second, "running"), 16));

  snapshot.invalidate();  // a failed save: nothing is trusted any more
  EXPECT_FALSE(snapshot.crcs().find(data(second, "frozen"), frozen.nbytes()));
}

TEST_F(DeferredTest, AThreadWaitingForTheLateCopyHelpsMakeIt) {
  // before_update() takes a share of the deferred copies instead of waiting:
  // each tensor is copied once, by either thread, and the writer's
  // copy_deferred returns only when all are done, whoever made them.
  c10::impl::GenericDict state(c10::StringType::get(), c10::TensorType::get());
  std::vector<torch::Tensor> tensors;
  for (int i = 0; i < 64; ++i) {
    tensors.push_back(torch::randn({1 << 14}));
    state.insert(fmt::format("p{}", i), tensors.back());
  }
  SaveHints hints;
  hints.updated_by_step = [](const at::Tensor&) { return true; };
  hints.defer_copy = true;
  detail::Snapshot snapshot;
  for (int round = 0; round < 20; ++round) {
    {
      torch::NoGradGuard no_grad;
      for (auto& t : tensors) t.add_(1);  // an optimizer step: all copied again
    }
    auto copy = snapshot.capture(state, hints).toGenericDict();
    ASSERT_EQ(snapshot.stats().deferred, 64u * (1 << 14) * 4);
    std::thread writer([&] { snapshot.copy_deferred(); });
    snapshot.help_copy_deferred();
    writer.join();
    for (int i = 0; i < 64; ++i) {
      ASSERT_TRUE(torch::equal(copy.at(fmt::format("p{}", i)).toTensor(), tensors[i])) << round << " p" << i;
    }
  }
  // The helper alone, before the writer starts: the writer finds nothing left.
  {
    torch::NoGradGuard no_grad;
    tensors[0].add_(1);
  }
  auto copy = snapshot.capture(state, hints).toGenericDict();
  EXPECT_EQ(snapshot.stats().deferred, tensors[0].nbytes());
  snapshot.help_copy_deferred();
  EXPECT_TRUE(torch::equal(copy.at("p0").toTensor(), tensors[0]));
  snapshot.copy_deferred();
  snapshot.help_copy_deferred();  // after the copy: nothing to take
  // A tensor changed before the writer's check still fails the save, helped or not.
  {
    torch::NoGradGuard no_grad;
    tensors[1].add_(1);
  }
  snapshot.capture(state, hints);
  snapshot.help_copy_deferred();
  tensors[1].add_(1);
  EXPECT_THROW_MSG(snapshot.copy_deferred(), CheckpointError, "Tensor 'p1' changed in place");
  snapshot.help_copy_deferred();  // after a failed copy: nothing to take
}

TEST_F(DeferredTest, AParameterChangedBeforeTheLateCopyFailsTheSaveNamingIt) {
  auto weight = torch::randn({4});
  c10::impl::GenericDict state(c10::StringType::get(), c10::TensorType::get());
  state.insert("fc.weight", weight);
  SaveHints hints;
  hints.updated_by_step = [](const at::Tensor&) { return true; };
  hints.defer_copy = true;
  detail::Snapshot snapshot;
  snapshot.capture(state, hints);
  weight.add_(1);  // an update without before_update()
  EXPECT_THROW_MSG(snapshot.copy_deferred(), CheckpointError, "'fc.weight'", "before_update()");
  // Nothing is reused from a failed copy.
  snapshot.capture(state, hints);
  EXPECT_EQ(snapshot.stats().reused, 0u);
}

TEST_F(DeferredTest, EarlyStoppingRestoringWeightsAtTrainEndDoesNotTearTheLastAsyncSave) {
  auto data = make_data(40, 10);
  torch::manual_seed(5);
  Busy model;
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.5);
  Trainer trainer(model, sgd, ce_loss);
  // EarlyStopping first: its on_train_end restores weights before the checkpoint's runs.
  auto stop = std::make_shared<EarlyStopping>(EarlyStoppingOptions().monitor("loss").patience(100).restore_best_weights(true));
  auto sync = std::make_shared<CheckpointCallback>(CheckpointOptions(path("sync.pt")));
  auto async = std::make_shared<CheckpointCallback>(CheckpointOptions(path("last.pt")).async_save(true));
  EXPECT_NO_THROW(
      trainer.fit(data.x_train, data.y_train, FitOptions().epochs(3).batch_size(8).callbacks({stop, sync, async})));
  auto a = read(path("last.pt")).toGenericDict();
  auto s = read(path("sync.pt")).toGenericDict();
  EXPECT_EQ(difference(a.at("model"), s.at("model"), "model"), "");
}

TEST_F(DeferredTest, ALoadFromACallbackInsideFitDoesNotTearTheAsyncSaveBeforeIt) {
  auto data = make_data(40, 10);
  torch::manual_seed(5);
  Busy model;
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.5).momentum(0.9));
  Trainer trainer(model, sgd, ce_loss);
  trainer.fit(data.x_train, data.y_train, FitOptions().epochs(1).batch_size(8));
  trainer.save_checkpoint(path("other.pt"));
  trainer.save_weights(path("other_weights.pt"));
  // Each epoch's end: a sync and an async save of the same state, then a load, which changes
  // the tensors the async save is still to copy.
  auto sync = std::make_shared<CheckpointCallback>(CheckpointOptions(path("sync_{epoch}.pt")));
  auto async = std::make_shared<CheckpointCallback>(CheckpointOptions(path("async_{epoch}.pt")).async_save(true));
  // Whether each load first had the late copies finished, as before an optimizer step.
  struct Updates : Callback {
    int count = 0;
    void on_before_update() override { ++count; }
  };
  auto updates = std::make_shared<Updates>();
  auto load = std::make_shared<LambdaCallback>();
  std::vector<int> finished_first;
  load->epoch_end = [&](int64_t epoch, const Logs&) {
    const int before = updates->count;
    if (epoch == 0) trainer.load_checkpoint(path("other.pt"));
    if (epoch == 1) trainer.load_weights(path("other_weights.pt"));
    finished_first.push_back(updates->count - before);
  };
  ASSERT_NO_THROW(trainer.fit(data.x_train, data.y_train,
                              FitOptions().epochs(2).batch_size(8).callbacks({sync, async, updates, load})));
  EXPECT_EQ(finished_first, (std::vector<int>{1, 1}));
  for (int epoch : {1, 2}) {
    SCOPED_TRACE(epoch);
    auto a = read(path(fmt::format("async_{}.pt", epoch))).toGenericDict();
    auto s = read(path(fmt::format("sync_{}.pt", epoch))).toGenericDict();
    EXPECT_EQ(difference(a.at("model"), s.at("model"), "model"), "");
    EXPECT_EQ(difference(a.at("optimizer"), s.at("optimizer"), "optimizer"), "");
  }
}

}  // namespace
}  // namespace torchfit::test
