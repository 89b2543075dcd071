// Own training loops: samplers in checkpoints, tracked values, objects by reference, saves
// without logs, time triggers, the commit hook, early failure and messages.
#include <thread>

#include "support.h"

namespace torchfit::test {
namespace {

class OwnLoopTest : public TorchfitTest {};

/// A dataset whose examples are their own indices, so batches show the order.
torch::data::datasets::TensorDataset index_dataset(int64_t n) {
  return torch::data::datasets::TensorDataset(torch::arange(n, torch::kLong));
}

template <typename S>
auto loader_over(int64_t n, S sampler, size_t batch = 4) {
  return torch::data::make_data_loader(index_dataset(n).map(torch::data::transforms::Stack<torch::data::TensorExample>()),
                                       std::move(sampler), torch::data::DataLoaderOptions().batch_size(batch));
}

/// One record per batch: its indices, then a draw from torch's generator (the loop's noise).
using Trace = std::vector<std::vector<int64_t>>;

std::vector<int64_t> record(const torch::Tensor& batch) {
  std::vector<int64_t> out(batch.data_ptr<int64_t>(), batch.data_ptr<int64_t>() + batch.numel());
  out.push_back(torch::randint(1 << 30, {1}, torch::kLong).item<int64_t>());
  return out;
}

/// Runs epochs [epoch, epochs) of a loop over `n` indices with `state` (a sampler, the RNG and
/// the epoch tracked), calling `after_batch(epoch, batch)` after each batch; it returns whether
/// to stop at once (a "kill").
template <typename S>
Trace run_loop(S sampler, int64_t n, int64_t& epoch, int64_t epochs,
               const std::function<bool(int64_t, int64_t)>& after_batch = {}) {
  Trace trace;
  auto loader = loader_over(n, sampler);
  for (; epoch < epochs; ++epoch) {
    int64_t batch = 0;
    for (auto& example : *loader) {
      trace.push_back(record(example.data));
      if (after_batch && after_batch(epoch, batch++)) return trace;
    }
  }
  return trace;
}

/// A checkpoint of one item, the sampler (its copies share the state).
Checkpoint holding(const Sampler& sampler) {
  Checkpoint state;
  state.add("sampler", sampler);
  return state;
}

TEST_F(OwnLoopTest, RandomSamplerDrawsWhatLibTorchsDraws) {
  torch::manual_seed(3);
  torch::data::samplers::RandomSampler theirs(10);  // draws at construction
  auto expected = theirs.next(10).value();
  torch::manual_seed(3);
  RandomSampler ours(10);
  EXPECT_EQ(ours.next(10).value(), expected);
  EXPECT_EQ(ours.index(), 10u);
  EXPECT_FALSE(ours.next(4).has_value());
}

TEST_F(OwnLoopTest, SamplerCopiesShareTheirPosition) {
  RandomSampler sampler(12);
  RandomSampler copy = sampler;
  copy.reset();
  auto first = copy.next(5).value();
  EXPECT_EQ(sampler.index(), 5u);
  EXPECT_EQ(sampler.epoch(), 1);
  auto rest = sampler.next(100).value();
  EXPECT_EQ(rest.size(), 7u);
  first.insert(first.end(), rest.begin(), rest.end());
  std::sort(first.begin(), first.end());
  for (size_t i = 0; i < first.size(); ++i) EXPECT_EQ(first[i], i);
}

// Saved at every batch of a 3-epoch loop in turn (mid-epoch, after an epoch's last batch, and
// at epoch ends outside the inner loop), a fresh process restoring the file continues with the
// same order and the same generator stream as a run that never stopped.
TEST_F(OwnLoopTest, ARestoredLoopContinuesTheSameOrderAndStreamAtEveryPoint) {
  const int64_t n = 10, epochs = 3;  // 3 batches an epoch, the last one short
  auto make_state = [](const RandomSampler& sampler, int64_t& epoch) {
    Checkpoint state;
    state.add("sampler", sampler);
    state.add_rng();
    state.track("epoch", epoch);
    return state;
  };
  torch::manual_seed(7);
  int64_t epoch = 0;
  const Trace whole = run_loop(RandomSampler(n), n, epoch, epochs);
  ASSERT_EQ(whole.size(), 9u);

  for (size_t stop = 0; stop < whole.size(); ++stop) {
    for (bool at_epoch_end : {false, true}) {
      torch::manual_seed(7);
      RandomSampler sampler(n);
      int64_t epoch = 0;
      auto state = make_state(sampler, epoch);
      const std::string file = path("s.pt");
      size_t seen = 0;
      bool at_end = false;
      Trace first = run_loop(sampler, n, epoch, epochs, [&](int64_t, int64_t batch) {
        if (++seen <= stop) return false;
        at_end = batch == 2;
        return true;
      });
      if (at_epoch_end) {
        if (!at_end) continue;  // only meaningful after an epoch's last batch
        // The inner loop ran out (the sampler said so) and the epoch counter moved on.
        EXPECT_FALSE(sampler.next(4).has_value());
        ++epoch;
      }
      save(state, file);

      // A new process: other objects, another seed, then the restore.
      torch::manual_seed(99);
      RandomSampler resumed(n);
      int64_t resumed_epoch = -1;
      auto restored = make_state(resumed, resumed_epoch);
      load(restored, file);
      Trace rest = run_loop(resumed, n, resumed_epoch, epochs);
      first.insert(first.end(), rest.begin(), rest.end());
      EXPECT_EQ(first, whole) << "stopped after batch " << stop + 1 << (at_epoch_end ? " and its epoch end" : "");
    }
  }
}

TEST_F(OwnLoopTest, SequentialAndDistributedSamplersResume) {
  SequentialSampler sequential(7);
  EXPECT_EQ(sequential.next(3).value(), (std::vector<size_t>{0, 1, 2}));
  save(holding(sequential), path("seq.pt"));
  SequentialSampler other(7);
  auto restored = holding(other);
  load(restored, path("seq.pt"));
  other.reset();  // the loader's begin(): continues
  EXPECT_EQ(other.next(10).value(), (std::vector<size_t>{3, 4, 5, 6}));
  other.reset();  // the next epoch starts over
  EXPECT_EQ(other.next(2).value(), (std::vector<size_t>{0, 1}));

  // Ranks draw alike; their shares are disjoint (but for the padding) and cover everything.
  std::vector<size_t> all;
  for (size_t rank = 0; rank < 3; ++rank) {
    DistributedRandomSampler shard(10, 3, rank, /*seed=*/5);
    shard.reset();
    auto part = shard.next(100).value();
    EXPECT_EQ(part.size(), 4u);
    all.insert(all.end(), part.begin(), part.end());
  }
  std::set<size_t> distinct(all.begin(), all.end());
  EXPECT_EQ(distinct.size(), 10u);

  DistributedRandomSampler a(10, 3, 1, 5), b(10, 3, 1, 5);
  a.reset();
  a.reset();  // epoch 2
  auto epoch2 = a.next(100).value();
  b.set_epoch(1);
  b.reset();
  EXPECT_EQ(b.next(100).value(), epoch2);
  EXPECT_THROW_MSG(DistributedRandomSampler(10, 2, 2), ValueError, "rank 2 is not below num_replicas 2");
}

TEST_F(OwnLoopTest, ASamplerOverAnotherSizeIsRefusedByName) {
  save(holding(RandomSampler(10)), path("s.pt"));
  auto other_size = holding(RandomSampler(11));
  EXPECT_THROW_MSG(load(other_size, path("s.pt")), CheckpointError,
                   "[sampler]: the saved sampler: it sampled 10 examples, this one samples 11");
  auto wrong_kind = holding(SequentialSampler(10));
  EXPECT_THROW_MSG(load(wrong_kind, path("s.pt")), CheckpointError,
                   "the saved sampler: it is a random sampler, this one is sequential");
}

TEST_F(OwnLoopTest, TrackedVariablesAreReadAtSaveAndWrittenByLoad) {
  int64_t step = 5;
  double loss = 0.25;
  bool warm = true;
  std::string phase = "gan";
  auto noise = torch::arange(3, torch::kFloat);
  int small = 7;
  Checkpoint state;
  state.track("step", step);
  state.track("loss", loss);
  state.track("warm", warm);
  state.track("phase", phase);
  state.track("noise", noise);
  state.track("small", small);
  step = 6;  // read at save, not at track
  save(state, path("t.pt"));
  step = 0, loss = 9, warm = false, phase = "x", noise = torch::zeros(1), small = 0;
  EXPECT_EQ(state.get<int64_t>("step"), 0);
  load(state, path("t.pt"));
  EXPECT_EQ(step, 6);
  EXPECT_EQ(loss, 0.25);
  EXPECT_TRUE(warm);
  EXPECT_EQ(phase, "gan");
  EXPECT_TRUE(torch::equal(noise, torch::arange(3, torch::kFloat)));
  EXPECT_EQ(small, 7);
  state.set("step", int64_t{42});  // set writes into the variable
  EXPECT_EQ(step, 42);
  EXPECT_THROW_MSG(state.set("step", 1.5), ValueError, "item 'step' holds a Double");
  EXPECT_EQ(step, 42);

  // Values set and tracked are the same kind in the file: either reads the other's.
  Checkpoint by_value;
  by_value.set("step", int64_t{0});
  by_value.set("loss", 0.0);
  by_value.set("warm", false);
  by_value.set("phase", std::string());
  by_value.set("noise", torch::zeros(1));
  by_value.set("small", 0);
  load(by_value, path("t.pt"));
  EXPECT_EQ(by_value.get<int64_t>("step"), 6);
  EXPECT_EQ(by_value.get<std::string>("phase"), "gan");
}

struct NetImpl : torch::nn::Module {
  NetImpl() : fc(register_module("fc", torch::nn::Linear(3, 2))) {}
  torch::nn::Linear fc;
};

TEST_F(OwnLoopTest, OptimizersAndModulesAddedByReference) {
  NetImpl net;  // a module held by value
  torch::optim::Adam adam(net.parameters(), torch::optim::AdamOptions(0.1));
  torch::optim::SGD sgd(net.parameters(), torch::optim::SGDOptions(0.5).momentum(0.9));
  auto step = [&] {
    adam.zero_grad();
    sgd.zero_grad();
    net.fc->forward(torch::ones({4, 3})).sum().backward();
    adam.step();
    sgd.step();
  };
  step();
  static_cast<torch::optim::AdamOptions&>(adam.param_groups()[0].options()).lr(0.01);  // changed by hand
  Checkpoint state;
  state.add("net", net);
  state.add("adam", adam);
  state.add("sgd", sgd);
  save(state, path("r.pt"));
  auto weight = net.fc->weight.clone();
  step();
  static_cast<torch::optim::AdamOptions&>(adam.param_groups()[0].options()).lr(0.5);
  load(state, path("r.pt"));
  EXPECT_TRUE(torch::equal(net.fc->weight, weight));
  EXPECT_DOUBLE_EQ(adam.param_groups()[0].options().get_lr(), 0.01);
  ASSERT_EQ(adam.state().size(), 2u);
  for (const auto& [key, param_state] : adam.state()) {
    EXPECT_EQ(static_cast<const torch::optim::AdamParamState&>(*param_state).step(), 1);
  }
}

TEST_F(OwnLoopTest, ManagerSavesWithoutLogsFromTrackedValues) {
  int64_t step = 0;
  double g_loss = 1.0;
  Checkpoint state;
  state.track("step", step);
  state.track("g_loss", g_loss);
  CheckpointManager manager(CheckpointOptions(path("ck/{step:06d}-{g_loss:.2f}.pt"))
                                .monitor("g_loss").mode(Mode::Min).save_best_only(true));
  for (double loss : {0.5, 0.7, 0.25}) {
    ++step;
    g_loss = loss;
    manager.save(state);
  }
  EXPECT_EQ(files("ck"), (std::vector<std::string>{"000001-0.50.pt", "000003-0.25.pt"}));
  EXPECT_EQ(manager.best(), 0.25);
  // Logs override values, and feed the monitor.
  ++step;
  EXPECT_TRUE(manager.save(state, {{"step", 99}, {"g_loss", 0.125}}));
  EXPECT_EQ(manager.last_saved_path(), path("ck/000099-0.12.pt"));
  EXPECT_EQ(manager.best(), 0.125);
}

TEST_F(OwnLoopTest, StateKeyNamesTheMonitorOnlyWhenOneDecides) {
  EXPECT_EQ(CheckpointManager(CheckpointOptions("a/{step}.pt")).state_key(), "a/{step}.pt");
  EXPECT_EQ(CheckpointManager(CheckpointOptions("a/{step}.pt").monitor("g_loss").save_top_k(2)).state_key(),
            "a/{step}.pt|monitor=g_loss");
  EXPECT_EQ(CheckpointManager(CheckpointOptions("a/{step}.pt").save_best_only(true)).state_key(),
            "a/{step}.pt|monitor=val_loss");

  // A 0.2 file keyed the manager's state with its monitor: restoring it still restores the tables.
  int64_t step = 3;
  Checkpoint state;
  state.track("step", step);
  const std::string pattern = path("ck/{step}.pt");
  CheckpointManager writer(CheckpointOptions(pattern).max_to_keep(2));
  for (int i = 0; i < 2; ++i, ++step) writer.save(state);
  Checkpoint legacy = state;
  struct Fixed : Stateful {
    explicit Fixed(c10::IValue value) : value(std::move(value)) {}
    c10::IValue state_dict() const override { return value; }
    void load_state_dict(const c10::IValue&) override {}
    c10::IValue value;
  };
  legacy.add("torchfit_manager:" + pattern + "|monitor=val_loss", std::make_shared<Fixed>(writer.state_dict()));
  save(legacy, path("ck/9.pt"));
  CheckpointManager reader(CheckpointOptions(pattern).max_to_keep(2));
  reader.restore(state, path("ck/9.pt"));
  EXPECT_EQ(reader.recent(), writer.recent());
}

TEST_F(OwnLoopTest, EveryCallIsTheEpochFrequencyByItsOwnLoopName) {
  EXPECT_TRUE(SaveFreq::every_call().is_epoch());
  EXPECT_EQ(SaveFreq::every_call().to_string(), "epoch");
  int64_t step = 0;
  Checkpoint state;
  state.track("step", step);
  CheckpointManager manager(CheckpointOptions(path("{step}.pt")).save_freq(SaveFreq::every_call()));
  for (step = 1; step <= 3; ++step) EXPECT_TRUE(manager.save(state));
  EXPECT_EQ(files(), (std::vector<std::string>{"1.pt", "2.pt", "3.pt"}));
}

TEST_F(OwnLoopTest, TimeTriggerSavesAtTheFirstCallAfterTheInterval) {
  double now = 100;
  auto clock = [&now] { return now; };
  int64_t step = 0;
  Checkpoint state;
  state.track("step", step);
  CheckpointManager manager(
      CheckpointOptions(path("t/{step}.pt")).save_freq(SaveFreq::seconds(25).clock(clock)));
  std::vector<int64_t> saved;
  auto run = [&](CheckpointManager& m, int64_t steps) {
    for (int64_t i = 0; i < steps; ++i) {
      now += 10;  // a step takes 10 s
      ++step;
      if (m.save(state)) saved.push_back(step);
    }
  };
  run(manager, 8);  // the clock starts at the first call (t=110): saves at 140 and 170
  EXPECT_EQ(saved, (std::vector<int64_t>{4, 7}));

  // A restart: the time the run was down does not count, nor the part cut off.
  now += 1000;
  CheckpointManager restarted(
      CheckpointOptions(path("t/{step}.pt")).save_freq(SaveFreq::seconds(25).clock(clock)));
  ASSERT_TRUE(restarted.restore_latest(state));
  EXPECT_EQ(step, 7);
  saved.clear();
  run(restarted, 5);
  EXPECT_EQ(saved, (std::vector<int64_t>{11}));

  // Batches or time, whichever comes first; both restart at each save.
  EXPECT_THROW_MSG(SaveFreq::seconds(0), ValueError, "seconds(0)");
  EXPECT_THROW_MSG(SaveFreq::batches(2) | SaveFreq::batches(3), ValueError, "batches(2) | batches(3)");
  EXPECT_THROW_MSG(SaveFreq::epoch() | SaveFreq::seconds(3), ValueError, "epoch | seconds(3)");
  const SaveFreq both = SaveFreq::batches(3) | SaveFreq::seconds(25).clock(clock);
  EXPECT_EQ(both.to_string(), "batches(3) | seconds(25)");
  CheckpointManager combined(CheckpointOptions(path("c/{step}.pt")).save_freq(both));
  saved.clear();
  step = 0;
  run(combined, 3);  // by batches at step 3
  now += 30;         // a slow step
  ++step;
  if (combined.save(state)) saved.push_back(step);
  EXPECT_EQ(saved, (std::vector<int64_t>{3, 4}));
}

TEST_F(OwnLoopTest, BackupAndRestoreAndTheCallbackTakeTheTimeTrigger) {
  double now = 0;
  auto clock = [&now] { return now; };
  auto setup = make_setup();
  auto tick = std::make_shared<LambdaCallback>();
  tick->train_batch_end = [&](int64_t, const Logs&) { now += 10; };
  auto checkpoint = std::make_shared<CheckpointCallback>(
      CheckpointOptions(path("cb/e{epoch}b{batch}.pt")).save_freq(SaveFreq::seconds(35).clock(clock)));
  auto backup =
      std::make_shared<BackupAndRestore>(BackupOptions(path("bk")).save_freq(SaveFreq::seconds(35).clock(clock)));
  auto backups = std::make_shared<int>(0);
  auto count = std::make_shared<LambdaCallback>();
  count->train_batch_begin = [&](int64_t, const Logs&) {
    if (fs::exists(path("bk/backup.pt"))) ++*backups, fs::remove(path("bk/backup.pt"));
  };
  auto data = make_data(30);
  // 3 batches an epoch, 10 s each. The callback's clock starts at the first batch end (10 s) and
  // saves at the batch ends 40 s after it: batches 5 and 9.
  setup.trainer->fit(data.x_train, data.y_train,
                     FitOptions().epochs(3).batch_size(10).callbacks({tick, checkpoint, backup, count}));
  EXPECT_EQ(files("cb"), (std::vector<std::string>{"e2b2.pt", "e3b3.pt"}));
  EXPECT_EQ(*backups, 2);  // the backup's clock starts at the first batch start: batches 5 and 9
  EXPECT_NE(checkpoint->state_key().find("save_seconds=35"), std::string::npos);
}

TEST_F(OwnLoopTest, CommitHookRunsOnceTheFileIsDurable) {
  for (bool async : {false, true}) {
    SCOPED_TRACE(async ? "async" : "sync");
    const std::string sub = async ? "a" : "s";
    std::vector<std::string> committed;
    std::vector<bool> existed;
    std::thread::id hook_thread;
    double loss = 1;
    Checkpoint state;
    auto model = Mlp();
    state.add("model", model);
    state.track("loss", loss);
    CheckpointManager manager(CheckpointOptions(path(sub + "/{loss:.1f}.pt"))
                                  .monitor("loss").save_best_only(true).async_save(async)
                                  .on_commit([&](const std::string& file) {
                                    committed.push_back(file);
                                    existed.push_back(verify_checkpoint(file).ok);
                                    hook_thread = std::this_thread::get_id();
                                  }));
    for (double value : {0.5, 0.7, 0.3}) {
      loss = value;
      manager.save(state);
    }
    manager.wait();
    EXPECT_EQ(committed, (std::vector<std::string>{path(sub + "/0.5.pt"), path(sub + "/0.3.pt")}));
    EXPECT_EQ(existed, (std::vector<bool>{true, true}));
    EXPECT_EQ(hook_thread == std::this_thread::get_id(), !async);
  }
}

TEST_F(OwnLoopTest, AnAsyncManagersLastSaveOfARunIsStoredOnTheLoopsThread) {
  int64_t step = 0;
  Checkpoint state;
  auto model = Mlp();
  state.add("model", model);
  state.track("step", step);
  const auto loop_thread = std::this_thread::get_id();
  std::vector<std::thread::id> hook_threads;
  CheckpointManager recorded(CheckpointOptions(path("rk/{step}.pt")).async_save(true).on_commit([&](const std::string&) {
    hook_threads.push_back(std::this_thread::get_id());
  }));
  // Unmarked, the rule would put both in the background (the first sizes the buffers, the
  // second measures a background save).
  for (step = 1; step <= 2; ++step) recorded.save(state, {}, /*last_of_run=*/step == 2);
  EXPECT_TRUE(verify_checkpoint(path("rk/2.pt")).ok);  // durable when save returns, before any wait
  recorded.wait();
  EXPECT_EQ(hook_threads, (std::vector<std::thread::id>{hook_threads.at(0), loop_thread}));
  EXPECT_NE(hook_threads[0], loop_thread);
}

TEST_F(OwnLoopTest, AFailingHookIsRaisedAfterRetentionAndTheFileStays) {
  for (bool async : {false, true}) {
    SCOPED_TRACE(async ? "async" : "sync");
    const std::string sub = async ? "a" : "s";
    int64_t step = 0;
    Checkpoint state;
    state.track("step", step);
    int calls = 0;
    CheckpointManager manager(CheckpointOptions(path(sub + "/{step}.pt")).max_to_keep(1).async_save(async)
                                  .on_commit([&](const std::string&) {
                                    if (++calls == 2) throw std::runtime_error("upload refused");
                                  }));
    step = 1;
    manager.save(state);
    step = 2;
    auto second = [&] {
      manager.save(state);
      manager.wait();
    };
    EXPECT_THROW_MSG(second(), CheckpointError, sub + "/2.pt is saved, but its on_commit hook failed: upload refused");
    EXPECT_EQ(files(sub), (std::vector<std::string>{"2.pt"}));  // retention finished
    EXPECT_EQ(manager.recent(), (std::vector<std::string>{path(sub + "/2.pt")}));
    step = 3;
    EXPECT_TRUE(manager.save(state));  // raised once
    manager.wait();
    EXPECT_EQ(files(sub), (std::vector<std::string>{"3.pt"}));
  }
}

TEST_F(OwnLoopTest, NoHookForAFailedSave) {
  std::ofstream(path("blocked")) << "a file where a directory should be";
  int calls = 0;
  Checkpoint state;
  state.set("step", 1);
  CheckpointManager manager(
      CheckpointOptions(path("blocked/{step}.pt")).on_commit([&](const std::string&) { ++calls; }));
  EXPECT_THROW(manager.save(state), CheckpointError);
  EXPECT_EQ(calls, 0);
  // restore_latest fails early on the same path, naming it.
  EXPECT_THROW_MSG(manager.restore_latest(state), Error, path("blocked"));
}

TEST_F(OwnLoopTest, AMismatchNamesEveryItemOnce) {
  auto make = [](int64_t hidden, torch::nn::Sequential& g, torch::nn::Sequential& d,
                 std::unique_ptr<torch::optim::Adam>& opt) {
    g = torch::nn::Sequential(torch::nn::Linear(4, hidden), torch::nn::Linear(hidden, 4));
    d = torch::nn::Sequential(torch::nn::Linear(4, 1));
    opt = std::make_unique<torch::optim::Adam>(g->parameters());
    g->forward(torch::ones({1, 4})).sum().backward();
    opt->step();
    Checkpoint state;
    state.add("generator", g);
    state.add("discriminator", d);
    state.add("g_opt", *opt);
    return state;
  };
  torch::nn::Sequential g1{nullptr}, d1{nullptr}, g2{nullptr}, d2{nullptr};
  std::unique_ptr<torch::optim::Adam> o1, o2;
  save(make(8, g1, d1, o1), path("gan.pt"));
  auto other = make(16, g2, d2, o2);
  try {
    load(other, path("gan.pt"));
    FAIL() << "a generator of another width loaded";
  } catch (const CheckpointError& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.find("Checkpoint Checkpoint"), std::string::npos) << what;
    EXPECT_EQ(what.find(path("gan.pt")), what.rfind(path("gan.pt"))) << "the path is named once: " << what;
    EXPECT_NE(what.find("2 items do not load"), std::string::npos) << what;
    EXPECT_NE(what.find("[generator] does not match the model: 3 mismatching key(s): '0.bias'"), std::string::npos)
        << what;
    EXPECT_NE(what.find("[g_opt]"), std::string::npos) << what;
    EXPECT_EQ(what.find("[discriminator]"), std::string::npos) << what;
  }
}

}  // namespace
}  // namespace torchfit::test
