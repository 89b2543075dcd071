#include "torchfit/callback.h"

namespace torchfit {

CallbackList::CallbackList(std::vector<std::shared_ptr<Callback>> callbacks)
    : callbacks_(std::move(callbacks)) {}

void CallbackList::push_back(std::shared_ptr<Callback> callback) {
  callbacks_.push_back(std::move(callback));
}

void CallbackList::set_trainer(Trainer* trainer) {
  for (auto& c : callbacks_) c->set_trainer(trainer);
}

#define TORCHFIT_DISPATCH(hook, params, args) \
  void CallbackList::hook params {            \
    for (auto& c : callbacks_) c->hook args;  \
  }

TORCHFIT_DISPATCH(on_train_begin, (const Logs& logs), (logs))
TORCHFIT_DISPATCH(on_train_end, (const Logs& logs), (logs))
TORCHFIT_DISPATCH(on_epoch_begin, (int64_t epoch, const Logs& logs), (epoch, logs))
TORCHFIT_DISPATCH(on_epoch_end, (int64_t epoch, const Logs& logs), (epoch, logs))
TORCHFIT_DISPATCH(on_train_batch_begin, (int64_t batch, const Logs& logs), (batch, logs))
TORCHFIT_DISPATCH(on_train_batch_end, (int64_t batch, const Logs& logs), (batch, logs))
TORCHFIT_DISPATCH(on_test_begin, (const Logs& logs), (logs))
TORCHFIT_DISPATCH(on_test_end, (const Logs& logs), (logs))
TORCHFIT_DISPATCH(on_test_batch_begin, (int64_t batch, const Logs& logs), (batch, logs))
TORCHFIT_DISPATCH(on_test_batch_end, (int64_t batch, const Logs& logs), (batch, logs))

#undef TORCHFIT_DISPATCH

std::map<std::string, CallbackState> CallbackList::states() const {
  std::map<std::string, CallbackState> out;
  for (const auto& c : callbacks_) {
    auto key = c->state_key();
    if (!key.empty()) out[key] = c->state();
  }
  return out;
}

void CallbackList::load_states(const std::map<std::string, CallbackState>& states) {
  for (auto& c : callbacks_) {
    auto key = c->state_key();
    if (key.empty()) continue;
    auto it = states.find(key);
    if (it != states.end()) c->load_state(it->second);
  }
}

void History::on_train_begin(const Logs&) {
  epoch.clear();
  history.clear();
}

void History::on_epoch_end(int64_t epoch_index, const Logs& logs) {
  epoch.push_back(epoch_index);
  for (const auto& [key, value] : logs) history[key].push_back(value);
}

}  // namespace torchfit
