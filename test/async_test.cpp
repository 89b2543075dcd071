// Async saves: same bytes as sync saves, errors raised on the training thread.
#include <fstream>
#include <thread>

#include "io/save_cost.h"

#include "support.h"

namespace torchfit::test {
namespace {

class AsyncTest : public TorchfitTest {
 protected:
  void SetUp() override {
    TorchfitTest::SetUp();
    data_ = make_data(40, 10);
  }

  /// A trainer over a fresh model with Adam (its moments must travel too).
  std::unique_ptr<Trainer> make_trainer(Mlp& model) {
    torch::manual_seed(3);
    model = Mlp();
    auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 0.01);
    return std::make_unique<Trainer>(model, adam, ce_loss, std::vector<Metric>{metrics::accuracy()});
  }

  Dataset data_;
};

TEST_F(AsyncTest, AsyncSavesHoldTheSameTensorsAsSyncSaves) {
  for (bool weights_only : {true, false}) {
    SCOPED_TRACE(weights_only ? "weights" : "full");
    auto sub = std::string(weights_only ? "w" : "f");
    auto options = [&](const std::string& kind, bool async) {
      return CheckpointOptions(path(sub + kind + "/e{epoch}b{batch}.pt"))
          .save_freq(SaveFreq::batches(3))
          .save_weights_only(weights_only)
          .async_save(async);
    };
    auto sync = std::make_shared<CheckpointCallback>(options("sync", false));
    auto async = std::make_shared<CheckpointCallback>(options("async", true));
    Mlp model;
    auto trainer = make_trainer(model);
    trainer->fit(data_.x_train, data_.y_train, FitOptions().epochs(3).batch_size(4).seed(5).callbacks({async, sync}));
    auto names = files(sub + "sync");
    ASSERT_EQ(names.size(), 10u);  // 30 batches, a save every 3
    ASSERT_EQ(files(sub + "async"), names);
    for (const auto& name : names) {
      auto a = path(sub + "async/" + name), s = path(sub + "sync/" + name);
      ASSERT_TRUE(verify_checkpoint(a).ok) << a;
      auto wa = read_weights(a), ws = read_weights(s);
      ASSERT_EQ(wa.size(), ws.size());
      for (const auto& [key, tensor] : ws) EXPECT_TRUE(torch::equal(tensor, wa.at(key))) << name << " " << key;
    }
    if (!weights_only) {
      // Restored from either file, the optimizer continues identically.
      Mlp from_sync, from_async;
      auto a = make_trainer(from_async), s = make_trainer(from_sync);
      s->load_checkpoint(path(sub + "sync/" + names[4]));
      a->load_checkpoint(path(sub + "async/" + names[4]));
      EXPECT_EQ(a->state().global_step, s->state().global_step);
      EXPECT_EQ(a->state().epoch, s->state().epoch);
      s->fit(data_.x_train, data_.y_train, FitOptions().epochs(3).batch_size(4).seed(5));
      a->fit(data_.x_train, data_.y_train, FitOptions().epochs(3).batch_size(4).seed(5));
      expect_same_weights(*from_sync, *from_async);
    }
  }
}

TEST_F(AsyncTest, FileIsCompleteWhenFitReturns) {
  auto cb = std::make_shared<CheckpointCallback>(CheckpointOptions(path("last.pt")).async_save(true));
  Mlp model;
  auto trainer = make_trainer(model);
  trainer->fit(data_.x_train, data_.y_train, FitOptions().epochs(2).batch_size(8).callbacks({cb}));
  auto result = verify_checkpoint(path("last.pt"));
  EXPECT_TRUE(result.ok) << result.reason;
  Mlp loaded;
  load_weights(*loaded, path("last.pt"));
  expect_same_weights(*model, *loaded);
}

TEST_F(AsyncTest, WriterErrorSurfacesAtTheNextSave) {
  auto target = path("blocker/{epoch}.pt");
  auto cb = std::make_shared<CheckpointCallback>(
      CheckpointOptions(target).monitor("loss").save_best_only(true).save_weights_only(true).async_save(true));
  Mlp model;
  auto trainer = make_trainer(model);
  EXPECT_THROW_MSG(trainer->fit(data_.x_train, data_.y_train,
                                FitOptions().epochs(3).batch_size(8).callbacks(
                                    {cb, block_directory_after_start(path("blocker"))})),
                   CheckpointError, path("blocker"));
  // The failed save's best was rolled back; the run stopped at the second save point.
  EXPECT_FALSE(cb->best().has_value());
  EXPECT_EQ(cb->last_saved_path(), "");
  EXPECT_EQ(trainer->state().epoch, 2);
}

TEST_F(AsyncTest, WriterErrorSurfacesAtTrainEnd) {
  auto cb = std::make_shared<CheckpointCallback>(CheckpointOptions(path("blocker/w.pt")).async_save(true));
  Mlp model;
  auto trainer = make_trainer(model);
  EXPECT_THROW_MSG(trainer->fit(data_.x_train, data_.y_train,
                                FitOptions().epochs(1).callbacks({cb, block_directory_after_start(path("blocker"))})),
                   CheckpointError, path("blocker"));
  EXPECT_EQ(trainer->state().epoch, 1);  // the error came at the end, not before training
}

TEST_F(AsyncTest, DestructorWaitsForTheSaveInFlight) {
  Mlp model;
  auto trainer = make_trainer(model);
  {
    CheckpointCallback cb(CheckpointOptions(path("w.pt")).save_weights_only(true).async_save(true));
    cb.set_trainer(trainer.get());
    cb.on_train_begin({});
    cb.on_epoch_begin(0, {});
    cb.on_epoch_end(0, {{"val_loss", 1.0}});
  }
  EXPECT_TRUE(verify_checkpoint(path("w.pt")).ok);
}

/// An optimizer type the snapshot does not know.
class PlainSgd : public torch::optim::Optimizer {
 public:
  PlainSgd(std::vector<torch::Tensor> params, double lr)
      : Optimizer({torch::optim::OptimizerParamGroup(std::move(params))},
                  std::make_unique<torch::optim::SGDOptions>(lr)),
        lr_(lr) {}
  torch::Tensor step(LossClosure closure = nullptr) override {
    torch::Tensor loss;
    if (closure) loss = closure();
    torch::NoGradGuard no_grad;
    for (auto& p : param_groups()[0].params()) p.add_(p.grad(), -lr_);
    return loss;
  }
  void save(torch::serialize::OutputArchive& archive) const override { archive.write("lr", torch::IValue(lr_)); }
  void load(torch::serialize::InputArchive& archive) override {
    torch::IValue lr;
    archive.read("lr", lr);
    lr_ = lr.toDouble();
  }

 private:
  double lr_;
};

TEST_F(AsyncTest, UnknownOptimizerSavesAsyncFullCheckpoints) {
  auto model = Mlp();
  auto plain = std::make_shared<PlainSgd>(model->parameters(), 0.1);
  Trainer trainer(model, plain, ce_loss);
  auto cb = std::make_shared<CheckpointCallback>(CheckpointOptions(path("{epoch}.pt")).async_save(true));
  LogCapture capture;
  trainer.fit(data_.x_train, data_.y_train, FitOptions().epochs(2).batch_size(40).callbacks({cb}));
  EXPECT_EQ(files(), (std::vector<std::string>{"1.pt", "2.pt"}));
  EXPECT_TRUE(verify_checkpoint(path("2.pt")).ok);
  EXPECT_EQ(capture.text().find("warn"), std::string::npos) << capture.text();
  // Its state (LibTorch's own archive inside ours) and lr come back.
  auto other = std::make_shared<PlainSgd>(model->parameters(), 0.7);
  Trainer restored(model, other, ce_loss);
  restored.load_checkpoint(path("2.pt"));
  EXPECT_DOUBLE_EQ(other->param_groups()[0].options().get_lr(), 0.1);
}

// ---- where a save runs (AsyncPolicy)

using detail::SaveCostRule;

/// Runs `steps` steps of `seconds` each, with a save in flight or not.
void steps(SaveCostRule& rule, int n, double seconds, bool in_flight) {
  for (int i = 0; i < n; ++i) rule.step(seconds, in_flight);
}

TEST(SaveCostRuleTest, MeasuresTwoBackgroundSavesAndOneInlineBeforeChoosing) {
  SaveCostRule rule(AsyncPolicy::Measured);
  steps(rule, 5, 0.100, false);
  EXPECT_FALSE(rule.place_inline());  // the warm-up: sizes the buffers, not counted
  rule.background_started(0.050);
  steps(rule, 2, 0.300, true);
  EXPECT_FALSE(rule.place_inline());  // nothing counted yet: measure a background save
  EXPECT_EQ(rule.background_cost(), 0);
  rule.background_started(0.001);
  steps(rule, 2, 0.120, true);   // 2 x 20 ms over the usual 100 ms
  rule.caller_waited(0.004);
  EXPECT_TRUE(rule.place_inline());  // now an inline one
  EXPECT_NEAR(rule.background_cost(), 0.001 + 0.040 + 0.004, 1e-9);
  rule.inline_saved(0.010);
  EXPECT_DOUBLE_EQ(rule.inline_cost(), 0.010);
  EXPECT_NEAR(rule.step_excess(), 0.400 + 0.040, 1e-9);
  // Inline is cheaper (10 ms against 45): inline, but every 8th decision probes the background.
  std::vector<bool> places;
  for (int i = 0; i < 2 * SaveCostRule::kProbeEvery; ++i) {
    const bool inline_save = rule.place_inline();
    places.push_back(inline_save);
    if (inline_save) {
      rule.inline_saved(0.010);
    } else {
      rule.background_started(0.001);
      steps(rule, 2, 0.120, true);
    }
    steps(rule, 3, 0.100, false);
  }
  EXPECT_EQ(std::count(places.begin(), places.end(), false), 2);
  EXPECT_FALSE(places[SaveCostRule::kProbeEvery - 1]);
  EXPECT_FALSE(places[2 * SaveCostRule::kProbeEvery - 1]);
}

TEST(SaveCostRuleTest, KeepsTheBackgroundWhenItCostsTheCallerLess) {
  SaveCostRule rule(AsyncPolicy::Measured);
  steps(rule, 5, 0.100, false);
  for (int save = 0; save < 2; ++save) {
    EXPECT_FALSE(rule.place_inline());
    rule.background_started(0.002);
    steps(rule, 3, 0.101, true);  // the writer hardly slows the steps
  }
  EXPECT_TRUE(rule.place_inline());
  rule.inline_saved(0.500);  // a large state: half a second on the caller
  int inline_saves = 0;
  for (int i = 0; i < 16; ++i) {
    if (rule.place_inline()) {
      ++inline_saves;
      rule.inline_saved(0.500);
    } else {
      rule.background_started(0.002);
      steps(rule, 3, 0.101, true);
    }
  }
  EXPECT_EQ(inline_saves, 2);  // the probes
  EXPECT_NEAR(rule.background_cost(), 0.005, 1e-9);
}

TEST(SaveCostRuleTest, AlwaysStaysInTheBackground) {
  SaveCostRule rule(AsyncPolicy::Always);
  for (int i = 0; i < 20; ++i) {
    EXPECT_FALSE(rule.place_inline());
    rule.background_started(1.0);
  }
}

TEST(SaveCostRuleTest, ASaveTheCallerWaitsForAtOnceRunsInlineUnlessAlways) {
  SaveCostRule measured(AsyncPolicy::Measured);
  EXPECT_TRUE(measured.place_inline(/*caller_waits=*/true));  // before any measurement too
  measured.inline_saved(0.010);
  EXPECT_FALSE(measured.place_inline());  // the others are still measured: background first
  SaveCostRule always(AsyncPolicy::Always);
  EXPECT_FALSE(always.place_inline(/*caller_waits=*/true));
}

TEST(SaveCostRuleTest, StepsWithNoUsualTimeLeaveASaveUncounted) {
  SaveCostRule rule(AsyncPolicy::Measured);
  for (int save = 0; save < 3; ++save) {
    EXPECT_FALSE(rule.place_inline());  // steps began in flight: no usual step time to compare
    rule.background_started(0.001);
    steps(rule, 2, 0.100, true);
  }
  EXPECT_EQ(rule.background_cost(), 0);
}

/// Records on which thread each save ran.
class ThreadRecordingIO : public MemoryCheckpointIO {
 public:
  void save(const c10::IValue& checkpoint, const std::string& path, const OnCommit& on_commit) override {
    threads.push_back(std::this_thread::get_id());
    MemoryCheckpointIO::save(checkpoint, path, on_commit);
  }
  std::vector<std::thread::id> threads;
};

TEST_F(AsyncTest, MeasuredPolicyRunsSomeSavesInlineAndEverySaveHoldsItsState) {
  for (auto policy : {AsyncPolicy::Measured, AsyncPolicy::Always}) {
    SCOPED_TRACE(policy == AsyncPolicy::Measured ? "measured" : "always");
    auto storage = std::make_shared<ThreadRecordingIO>();
    AsyncCheckpointIO io(storage, policy);
    auto weights = torch::arange(1000, torch::kFloat);
    const int saves = 12;
    for (int i = 0; i < saves; ++i) {
      for (int step = 0; step < 3; ++step) {
        io.before_update();
        torch::NoGradGuard no_grad;
        weights.add_(1);
      }
      c10::impl::GenericDict state(c10::StringType::get(), c10::AnyType::get());
      state.insert("w", weights);
      io.save(state, fmt::format("s{}", i));
    }
    io.wait();
    ASSERT_EQ(storage->threads.size(), static_cast<size_t>(saves));
    const auto caller = std::this_thread::get_id();
    const auto on_caller = std::count(storage->threads.begin(), storage->threads.end(), caller);
    const AsyncSaveProfile profile = io.profile();
    EXPECT_EQ(profile.background_saves + profile.inline_saves, saves);
    EXPECT_EQ(profile.inline_saves, on_caller);
    EXPECT_NE(storage->threads[0], caller);  // measured: two background saves first
    EXPECT_NE(storage->threads[1], caller);
    if (policy == AsyncPolicy::Always) {
      EXPECT_EQ(on_caller, 0);
    } else {
      EXPECT_EQ(storage->threads[2], caller);  // then one inline save
      EXPECT_GT(profile.inline_cost, 0);
      EXPECT_GT(profile.background_cost, 0);
    }
    EXPECT_GT(profile.writer_store, 0);
    for (int i = 0; i < saves; ++i) {
      auto saved = storage->load(fmt::format("s{}", i)).toGenericDict().at("w").toTensor();
      EXPECT_TRUE(torch::equal(saved, torch::arange(1000, torch::kFloat) + 3 * (i + 1))) << i;
    }
  }
}

/// Asks the run to stop at the end of epoch `epoch` (0-based).
struct StopAtEpoch : Callback {
  explicit StopAtEpoch(int64_t epoch) : epoch(epoch) {}
  void on_epoch_end(int64_t e, const Logs&) override {
    if (e == epoch) context()->stop_training(true);
  }
  int64_t epoch;
};

TEST_F(AsyncTest, TheSaveAfterWhichAFitEndsRunsOnTheTrainingThread) {
  // Two saves: the rule alone puts both in the background (the first sizes the buffers, the
  // second measures the background), so an inline one is the last save's own.
  struct Case {
    const char* name;
    SaveFreq freq;
    AsyncPolicy policy;
    int64_t epochs;
    int64_t stop_at;            // -1: no early stop
    std::vector<bool> inline_;  // where each save ran
  };
  const std::vector<Case> cases = {
      {"every epoch", SaveFreq::epoch(), AsyncPolicy::Measured, 2, -1, {false, true}},
      {"stopped after the second of 3 epochs", SaveFreq::epoch(), AsyncPolicy::Measured, 3, 1, {false, true}},
      {"always in the background", SaveFreq::epoch(), AsyncPolicy::Always, 2, -1, {false, false}},
      // A batch save may be followed by validation, which it overlaps: never inline for this.
      {"every 10 batches", SaveFreq::batches(10), AsyncPolicy::Measured, 2, -1, {false, false}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto storage = std::make_shared<ThreadRecordingIO>();
    auto checkpoint = std::make_shared<CheckpointCallback>(
        CheckpointOptions(c.freq.is_epoch() ? "e{epoch}.pt" : "e{epoch}b{batch}.pt")
            .save_freq(c.freq)
            .async_save(true)
            .async_policy(c.policy)
            .io(storage));
    std::vector<std::shared_ptr<Callback>> callbacks{checkpoint};
    if (c.stop_at >= 0) callbacks.insert(callbacks.begin(), std::make_shared<StopAtEpoch>(c.stop_at));
    Mlp model;
    auto trainer = make_trainer(model);
    // 30 samples in batches of 3: 10 batches an epoch, the last one a save point of "every 10 batches".
    trainer->fit(data_.x_train.slice(0, 0, 30), data_.y_train.slice(0, 0, 30),
                 FitOptions().epochs(c.epochs).batch_size(3).callbacks(callbacks));
    std::vector<bool> on_caller;
    for (const auto& id : storage->threads) on_caller.push_back(id == std::this_thread::get_id());
    EXPECT_EQ(on_caller, c.inline_);
  }
}

TEST_F(AsyncTest, ALoopThatDoesNotSayHowLongItRunsGetsNoInlineLastSave) {
  auto storage = std::make_shared<ThreadRecordingIO>();
  CheckpointCallback checkpoint(CheckpointOptions("e{epoch}.pt").async_save(true).io(storage));
  Mlp model;
  LoopContext loop(model, std::make_shared<torch::optim::SGD>(model->parameters(), 0.1));
  checkpoint.set_context(&loop);
  ASSERT_FALSE(loop.params().epochs);
  checkpoint.on_train_begin({});
  for (int64_t epoch = 0; epoch < 2; ++epoch) checkpoint.on_epoch_end(epoch, {{"val_loss", 1.0}});
  checkpoint.on_train_end({});
  ASSERT_EQ(storage->threads.size(), 2u);
  EXPECT_NE(storage->threads[1], std::this_thread::get_id());
}

}  // namespace
}  // namespace torchfit::test
