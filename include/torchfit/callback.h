#pragma once
/// \file
/// The callback API. Hooks fire in Keras order; epochs and batches are 0-based.
///
///     class PrintLoss : public torchfit::Callback {
///       void on_epoch_end(int64_t epoch, const torchfit::Logs& logs) override {
///         spdlog::info("epoch {} loss {}", epoch + 1, logs.at("loss"));
///       }
///     };

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "torchfit/logs.h"
#include "torchfit/trainer_state.h"

namespace c10 {
struct IValue;
}

namespace torchfit {

class Trainer;
class TrainingContext;

/// Base class of all callbacks: every hook is a no-op.
class Callback {
 public:
  virtual ~Callback() = default;

  /// Called by `Trainer::fit` before any hook; sets `trainer()` and `context()`.
  virtual void set_trainer(Trainer* trainer);
  /// The Trainer running this callback; null when another loop drives it.
  Trainer* trainer() const { return trainer_; }
  /// For loops other than `Trainer::fit`: what the callback sees of the run.
  void set_context(TrainingContext* context) { context_ = context; }
  /// What the callback sees of the run (torchfit's own callbacks use only this).
  TrainingContext* context() const { return context_; }
  /// Called once per `fit`, before any callback's `on_train_begin`: the place to
  /// restore state (BackupAndRestore does), so the order of callbacks does not matter.
  virtual void on_train_setup() {}
  virtual void on_train_begin(const Logs& /*logs*/) {}
  virtual void on_train_end(const Logs& /*logs*/) {}
  virtual void on_epoch_begin(int64_t /*epoch*/, const Logs& /*logs*/) {}
  virtual void on_epoch_end(int64_t /*epoch*/, const Logs& /*logs*/) {}
  virtual void on_train_batch_begin(int64_t /*batch*/, const Logs& /*logs*/) {}
  virtual void on_train_batch_end(int64_t /*batch*/, const Logs& /*logs*/) {}
  virtual void on_test_begin(const Logs& /*logs*/) {}
  virtual void on_test_end(const Logs& /*logs*/) {}
  virtual void on_test_batch_begin(int64_t /*batch*/, const Logs& /*logs*/) {}
  virtual void on_test_batch_end(int64_t /*batch*/, const Logs& /*logs*/) {}
  /// Called when parameters and optimizer state are about to change in place:
  /// after each backward pass, before the optimizer step, and before
  /// `on_train_end` (where callbacks may restore weights). Async checkpoint
  /// saves finish copying the state of their save point here.
  virtual void on_before_update() {}

  /// A key identifying this callback's state in full checkpoints, built from its
  /// whole configuration so two instances of one type do not collide; empty (the
  /// default) means the callback is stateless.
  virtual std::string state_key() const { return {}; }
  /// The callback's state as data (numbers, strings, tensors, lists, dicts). The
  /// default wraps the 0.1 text form, `state()`.
  virtual c10::IValue state_dict() const;
  virtual void load_state_dict(const c10::IValue& state);

  /// torchfit 0.1's text state; override `state_dict` instead.
  virtual CallbackState state() const { return {}; }
  virtual void load_state(const CallbackState& /*state*/) {}

 protected:
  Trainer* trainer_ = nullptr;
  TrainingContext* context_ = nullptr;
};

/// Dispatches each hook to a list of callbacks, in order.
class CallbackList {
 public:
  CallbackList() = default;
  explicit CallbackList(std::vector<std::shared_ptr<Callback>> callbacks);

  void push_back(std::shared_ptr<Callback> callback);
  const std::vector<std::shared_ptr<Callback>>& callbacks() const { return callbacks_; }

  void set_trainer(Trainer* trainer);
  void set_context(TrainingContext* context);
  void on_train_setup();
  void on_train_begin(const Logs& logs);
  void on_train_end(const Logs& logs);
  void on_epoch_begin(int64_t epoch, const Logs& logs);
  void on_epoch_end(int64_t epoch, const Logs& logs);
  void on_train_batch_begin(int64_t batch, const Logs& logs);
  void on_train_batch_end(int64_t batch, const Logs& logs);
  void on_test_begin(const Logs& logs);
  void on_test_end(const Logs& logs);
  void on_test_batch_begin(int64_t batch, const Logs& logs);
  void on_test_batch_end(int64_t batch, const Logs& logs);
  void on_before_update();

  /// States of the stateful callbacks, by `state_key()`; a key repeated by
  /// identical callbacks gets " #2", " #3", ... in order.
  std::map<std::string, c10::IValue> state_dicts() const;
  /// Hands each callback the state stored under its key and removes it from
  /// `states`; states no callback claims stay there.
  void load_state_dicts(std::map<std::string, c10::IValue>& states);

  /// 0.1's text form of `state_dicts` (states that are not text are left out).
  std::map<std::string, CallbackState> states() const;
  /// 0.1's text form of `load_state_dicts`.
  void load_states(const std::map<std::string, CallbackState>& states);

 private:
  std::vector<std::shared_ptr<Callback>> callbacks_;
};

/// Records the epoch logs of one `fit`, as Keras's `History` callback does.
class History : public Callback {
 public:
  /// The 0-based index of each epoch run.
  std::vector<int64_t> epoch;
  /// Each log key's value at the end of each epoch.
  std::map<std::string, std::vector<double>> history;

  void on_epoch_end(int64_t epoch_index, const Logs& logs) override;

  /// History travels in backups, so a restored fit returns the whole run.
  static constexpr const char* kStateKey = "History";
  std::string state_key() const override { return kStateKey; }
  c10::IValue state_dict() const override;
  void load_state_dict(const c10::IValue& state) override;
};

}  // namespace torchfit
