#pragma once
/// \file
/// LambdaCallback: a callback made of functions (Keras semantics).
///
///     auto print = std::make_shared<torchfit::LambdaCallback>();
///     print->epoch_end = [](int64_t epoch, const torchfit::Logs& logs) { ... };

#include <functional>

#include "torchfit/callback.h"

namespace torchfit {

/// Calls the function set for a hook, if any.
class LambdaCallback : public Callback {
 public:
  using Hook = std::function<void(const Logs&)>;
  using IndexedHook = std::function<void(int64_t, const Logs&)>;

  Hook train_begin, train_end, test_begin, test_end;
  IndexedHook epoch_begin, epoch_end, train_batch_begin, train_batch_end, test_batch_begin, test_batch_end;

  void on_train_begin(const Logs& logs) override { call(train_begin, logs); }
  void on_train_end(const Logs& logs) override { call(train_end, logs); }
  void on_test_begin(const Logs& logs) override { call(test_begin, logs); }
  void on_test_end(const Logs& logs) override { call(test_end, logs); }
  void on_epoch_begin(int64_t i, const Logs& logs) override { call(epoch_begin, i, logs); }
  void on_epoch_end(int64_t i, const Logs& logs) override { call(epoch_end, i, logs); }
  void on_train_batch_begin(int64_t i, const Logs& logs) override { call(train_batch_begin, i, logs); }
  void on_train_batch_end(int64_t i, const Logs& logs) override { call(train_batch_end, i, logs); }
  void on_test_batch_begin(int64_t i, const Logs& logs) override { call(test_batch_begin, i, logs); }
  void on_test_batch_end(int64_t i, const Logs& logs) override { call(test_batch_end, i, logs); }

 private:
  template <typename Fn, typename... Args>
  static void call(const Fn& fn, const Args&... args) {
    if (fn) fn(args...);
  }
};

}  // namespace torchfit
