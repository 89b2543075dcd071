#include "torchfit/callback.h"

#include <optional>

#include <ATen/core/ivalue.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "format/ivalue_lists.h"
#include "format/state_fields.h"
#include "torchfit/error.h"
#include "torchfit/training_context.h"

namespace torchfit {

void Callback::set_trainer(Trainer* trainer) {
  trainer_ = trainer;
  context_ = trainer != nullptr ? context_of(trainer) : nullptr;
}

CallbackList::CallbackList(std::vector<std::shared_ptr<Callback>> callbacks)
    : callbacks_(std::move(callbacks)) {}

void CallbackList::push_back(std::shared_ptr<Callback> callback) {
  callbacks_.push_back(std::move(callback));
}

void CallbackList::set_trainer(Trainer* trainer) {
  for (auto& c : callbacks_) c->set_trainer(trainer);
}

void CallbackList::set_context(TrainingContext* context) {
  for (auto& c : callbacks_) c->set_context(context);
}

#define TORCHFIT_DISPATCH(hook, params, args) \
  void CallbackList::hook params {            \
    for (auto& c : callbacks_) c->hook args;  \
  }

void CallbackList::on_train_setup() {
  for (auto& c : callbacks_) c->on_train_setup();
}

void CallbackList::on_before_update() {
  for (auto& c : callbacks_) c->on_before_update();
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

namespace {

/// A 0.1 text state as data, and back (nothing for states of other shapes).
c10::IValue text_to_ivalue(const CallbackState& state) {
  c10::impl::GenericDict out(c10::StringType::get(), c10::StringType::get());
  for (const auto& [field, value] : state) out.insert(field, value);
  return out;
}

std::optional<CallbackState> ivalue_to_text(const c10::IValue& value) {
  if (!value.isGenericDict()) return std::nullopt;
  CallbackState out;
  for (const auto& entry : value.toGenericDict()) {
    if (!entry.key().isString() || !entry.value().isString()) return std::nullopt;
    out[entry.key().toStringRef()] = entry.value().toStringRef();
  }
  return out;
}

}  // namespace

c10::IValue Callback::state_dict() const { return text_to_ivalue(state()); }

void Callback::load_state_dict(const c10::IValue& value) {
  auto text = ivalue_to_text(value);
  if (!text) throw CheckpointError(fmt::format("{}: a saved state of unknown form ({})", state_key(), value.tagKind()));
  load_state(*text);
}

/// The keys `state_dicts` gives the callbacks, in order.
static std::vector<std::string> unique_keys(const std::vector<std::shared_ptr<Callback>>& callbacks) {
  std::vector<std::string> keys;
  std::map<std::string, int> seen;
  for (const auto& c : callbacks) {
    auto key = c->state_key();
    if (!key.empty() && ++seen[key] > 1) key += fmt::format(" #{}", seen[key]);
    keys.push_back(key);
  }
  return keys;
}

std::map<std::string, c10::IValue> CallbackList::state_dicts() const {
  std::map<std::string, c10::IValue> out;
  auto keys = unique_keys(callbacks_);
  for (size_t i = 0; i < callbacks_.size(); ++i) {
    if (!keys[i].empty()) out[keys[i]] = callbacks_[i]->state_dict();
  }
  return out;
}

void CallbackList::load_state_dicts(std::map<std::string, c10::IValue>& states) {
  auto keys = unique_keys(callbacks_);
  for (size_t i = 0; i < callbacks_.size(); ++i) {
    auto it = keys[i].empty() ? states.end() : states.find(keys[i]);
    if (it == states.end()) continue;
    callbacks_[i]->load_state_dict(it->second);
    states.erase(it);
  }
}

std::map<std::string, CallbackState> CallbackList::states() const {
  std::map<std::string, CallbackState> out;
  for (const auto& [key, value] : state_dicts()) {
    if (auto text = ivalue_to_text(value)) out[key] = *text;
  }
  return out;
}

void CallbackList::load_states(const std::map<std::string, CallbackState>& states) {
  std::map<std::string, c10::IValue> values;
  for (const auto& [key, state] : states) values[key] = text_to_ivalue(state);
  load_state_dicts(values);
}

void History::on_epoch_end(int64_t epoch_index, const Logs& logs) {
  epoch.push_back(epoch_index);
  for (const auto& [key, value] : logs) history[key].push_back(value);
}

c10::IValue History::state_dict() const {
  c10::impl::GenericDict logs(c10::StringType::get(), c10::ListType::create(c10::FloatType::get()));
  for (const auto& [key, values] : history) logs.insert(key, c10::List<double>(values));
  c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
  out.insert("epoch", c10::List<int64_t>(epoch));
  out.insert("history", logs);
  return out;
}

void History::load_state_dict(const c10::IValue& state) {
  const detail::StateFields fields(state, "History", "corrupt saved state");
  auto epoch_list = detail::int_vector(fields.list("epoch"));
  if (!epoch_list) fields.fail("field 'epoch' is not a list of ints");
  std::map<std::string, std::vector<double>> restored;
  for (const auto& entry : fields.dict("history").toGenericDict()) {
    auto values = detail::double_vector(entry.value());
    if (!entry.key().isString() || !values) fields.fail("an entry of 'history'");
    restored[entry.key().toStringRef()] = std::move(*values);
  }
  epoch = std::move(*epoch_list);
  history = std::move(restored);
}

}  // namespace torchfit
