#include "format/trainer_state.h"

#include <fmt/format.h>

#include "format/ivalue_lists.h"
#include "format/state_fields.h"
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
  const StateFields fields(value, where, "corrupt trainer state");
  TrainerState state;
  state.epoch = fields.integer("epoch");
  state.global_step = fields.integer("global_step");
  state.batch_in_epoch = fields.integer("batch_in_epoch");
  state.seed = static_cast<uint64_t>(fields.integer("seed"));
  for (auto [name, field] : {std::pair{"data_pass", &TrainerState::data_pass},
                             std::pair{"batch_in_pass", &TrainerState::batch_in_pass}}) {
    if (fields.has(name)) {
      state.*field = fields.integer(name);
      if (*(state.*field) < 0) fields.fail(fmt::format("negative '{}': {}", name, *(state.*field)));
    }
  }
  state.epoch_weight = fields.number("epoch_weight");
  for (const auto& entry : fields.dict("epoch_sums").toGenericDict()) {
    if (!entry.key().isString() || !entry.value().isDouble()) fields.fail("an entry of 'epoch_sums'");
    state.epoch_sums[entry.key().toStringRef()] = entry.value().toDouble();
  }
  if (fields.has("metric_states")) {
    for (const auto& entry : fields.dict("metric_states").toGenericDict()) {
      auto values = double_vector(entry.value());
      if (!entry.key().isString() || !values) fields.fail("an entry of 'metric_states'");
      state.metric_states[entry.key().toStringRef()] = std::move(*values);
    }
  }
  if (state.epoch < 0 || state.global_step < 0 || state.batch_in_epoch < 0) {
    fields.fail(fmt::format("negative position (epoch {}, step {}, batch {})", state.epoch, state.global_step,
                            state.batch_in_epoch));
  }
  return state;
}

}  // namespace torchfit::detail
