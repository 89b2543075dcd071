#include "torchfit/callback.h"

#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "torchfit/error.h"

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

void History::on_epoch_end(int64_t epoch_index, const Logs& logs) {
  epoch.push_back(epoch_index);
  for (const auto& [key, value] : logs) history[key].push_back(value);
}

CallbackState History::state() const {
  // Shortest round-trip decimal: a restored history is bitwise the saved one.
  CallbackState out{{"epoch", fmt::format("{}", fmt::join(epoch, ","))}};
  for (const auto& [key, values] : history) out["log:" + key] = fmt::format("{}", fmt::join(values, ","));
  return out;
}

void History::load_state(const CallbackState& state) {
  auto split = [](const std::string& text, auto parse) {
    std::vector<decltype(parse(std::string()))> out;
    std::istringstream in(text);
    for (std::string item; std::getline(in, item, ',');) out.push_back(parse(item));
    return out;
  };
  try {
    epoch.clear();
    history.clear();
    for (const auto& [field, text] : state) {
      if (field == "epoch") epoch = split(text, [](const std::string& v) { return static_cast<int64_t>(std::stoll(v)); });
      if (field.rfind("log:", 0) == 0) history[field.substr(4)] = split(text, [](const std::string& v) { return std::stod(v); });
    }
  } catch (const std::exception&) {
    throw CheckpointError("History: corrupt saved state");
  }
}

}  // namespace torchfit
