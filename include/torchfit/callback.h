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

namespace torchfit {

class Trainer;

/// State a callback carries across runs inside full checkpoints.
using CallbackState = std::map<std::string, std::string>;

/// Base class of all callbacks: every hook is a no-op.
class Callback {
 public:
  virtual ~Callback() = default;

  /// Called by `Trainer::fit` before `on_train_begin`.
  virtual void set_trainer(Trainer* trainer) { trainer_ = trainer; }
  Trainer* trainer() const { return trainer_; }

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

  /// A key identifying this callback's state in full checkpoints; empty (the
  /// default) means the callback is stateless.
  virtual std::string state_key() const { return {}; }
  virtual CallbackState state() const { return {}; }
  virtual void load_state(const CallbackState& /*state*/) {}

 protected:
  Trainer* trainer_ = nullptr;
};

/// Dispatches each hook to a list of callbacks, in order.
class CallbackList {
 public:
  CallbackList() = default;
  explicit CallbackList(std::vector<std::shared_ptr<Callback>> callbacks);

  void push_back(std::shared_ptr<Callback> callback);
  const std::vector<std::shared_ptr<Callback>>& callbacks() const { return callbacks_; }

  void set_trainer(Trainer* trainer);
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

  /// States of the stateful callbacks, by `state_key()`.
  std::map<std::string, CallbackState> states() const;
  /// Hands each callback the state stored under its key, if any.
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
  CallbackState state() const override;
  void load_state(const CallbackState& state) override;
};

}  // namespace torchfit
