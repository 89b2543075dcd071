#include "format/trainer_state.h"

#include <fmt/format.h>

#include "format/ivalue_lists.h"
#include "torchfit/error.h"

namespace torchfit::detail {

c10::IValue trainer_state_to_ivalue(const TrainerState& state) {
  c10::impl::GenericDict sums(c10::StringType::get(), c10::FloatType::get());
  for (const auto& [key, sum] : state.epoch_sums) sums.insert(key, sum);
  c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
  out.insert("epoch", state.epoch);
  out.insert("global_step", state.global_step);
  out.insert("batch_in_epoch", state.batch_in_epoch);
  if (state.data_pass) out.insert("data_pass", *state.data_pass);
  if (state.batch_in_pass) out.insert("batch_in_pass", *state.batch_in_pass);
  out.insert("seed", static_cast<int64_t>(state.seed));
  out.insert("epoch_sums", sums);
  out.insert("epoch_weight", state.epoch_weight);
  if (!state.metric_states.empty()) {
    c10::impl::GenericDict metrics(c10::StringType::get(), c10::ListType::create(c10::FloatType::get()));
    for (const auto& [name, values] : state.metric_states) metrics.insert(name, c10::List<double>(values));
    out.insert("metric_states", metrics);
  }
  return out;
}

TrainerState trainer_state_from_ivalue(const c10::IValue& value, const std::string& where) {
  auto fail = [&](const std::string& what) {
    return CheckpointError(fmt::format("{}: corrupt trainer state: {}", where, what));
  };
  if (!value.isGenericDict()) throw fail(fmt::format("a {}, not a dict", value.tagKind()));
  const auto& dict = value.toGenericDict();
  auto get = [&](const char* name) {
    auto it = dict.find(name);
    if (it == dict.end()) throw fail(fmt::format("no field '{}'", name));
    return it->value();
  };
  auto integer = [&](const char* name) {
    auto v = get(name);
    if (!v.isInt()) throw fail(fmt::format("field '{}' is a {}, not an integer", name, v.tagKind()));
    return v.toInt();
  };
  TrainerState state;
  state.epoch = integer("epoch");
  state.global_step = integer("global_step");
  state.batch_in_epoch = integer("batch_in_epoch");
  state.seed = static_cast<uint64_t>(integer("seed"));
  for (auto [name, field] : {std::pair{"data_pass", &TrainerState::data_pass},
                             std::pair{"batch_in_pass", &TrainerState::batch_in_pass}}) {
    if (dict.contains(name)) {
      state.*field = integer(name);
      if (*(state.*field) < 0) throw fail(fmt::format("negative '{}': {}", name, *(state.*field)));
    }
  }
  auto weight = get("epoch_weight");
  if (!weight.isDouble()) throw fail("field 'epoch_weight' is not a number");
  state.epoch_weight = weight.toDouble();
  auto sums = get("epoch_sums");
  if (!sums.isGenericDict()) throw fail("field 'epoch_sums' is not a dict");
  for (const auto& entry : sums.toGenericDict()) {
    if (!entry.key().isString() || !entry.value().isDouble()) throw fail("an entry of 'epoch_sums'");
    state.epoch_sums[entry.key().toStringRef()] = entry.value().toDouble();
  }
  if (dict.contains("metric_states")) {
    auto metrics = get("metric_states");
    if (!metrics.isGenericDict()) throw fail("field 'metric_states' is not a dict");
    for (const auto& entry : metrics.toGenericDict()) {
      auto values = double_vector(entry.value());
      if (!entry.key().isString() || !values) throw fail("an entry of 'metric_states'");
      state.metric_states[entry.key().toStringRef()] = std::move(*values);
    }
  }
  if (state.epoch < 0 || state.global_step < 0 || state.batch_in_epoch < 0) {
    throw fail(fmt::format("negative position (epoch {}, step {}, batch {})", state.epoch, state.global_step,
                           state.batch_in_epoch));
  }
  return state;
}

}  // namespace torchfit::detail
