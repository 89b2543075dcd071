#include "format/optimizer_archive.h"

#include <map>
#include <memory>
#include <sstream>
#include <type_traits>
#include <vector>

#include <fmt/format.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "compat/libtorch.h"
#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

using torch::optim::Optimizer;
using torch::optim::OptimizerOptions;
using torch::serialize::InputArchive;

int64_t count_of(InputArchive& archive, const std::string& key, const std::string& where) {
  at::Tensor count;
  archive.read(key, count);
  if (count.numel() != 1) throw CheckpointError(fmt::format("{}: '{}' is not a count", where, key));
  return count.item<int64_t>();
}

/// The layout of torch/optim/serialize.h (unchanged since LibTorch 1.5): "state" maps each
/// parameter's key to its state, "param_groups" lists each group's keys and options.
template <typename State, typename Options>
std::function<void()> prepare_as(Optimizer& optimizer, InputArchive& archive, const std::string& where) {
  c10::IValue version;
  if (!archive.try_read("pytorch_version", version) || !version.isString() || version.toStringRef() != "1.5.0") {
    throw CheckpointError(fmt::format("{}: not an optimizer archive of LibTorch 1.5 or later", where));
  }
  InputArchive states_archive;
  archive.read("state", states_archive);
  std::map<std::string, std::unique_ptr<State>> saved;
  for (const auto& key : states_archive.keys()) {
    InputArchive one;
    if (!states_archive.try_read(key, one)) continue;  // not a state (a module's own attribute)
    auto state = std::make_unique<State>();
    state->serialize(one);
    saved[key] = std::move(state);
  }

  InputArchive groups_archive;
  archive.read("param_groups", groups_archive);
  const auto& live = optimizer.param_groups();
  const int64_t group_count = count_of(groups_archive, "param_groups/size", where);
  if (group_count != static_cast<int64_t>(live.size())) {
    throw CheckpointError(fmt::format("{}: {} param groups in the checkpoint but {} in the optimizer", where,
                                      group_count, live.size()));
  }
  auto states = std::make_shared<compat::OptimizerStateMap>();
  auto options = std::make_shared<std::vector<std::unique_ptr<OptimizerOptions>>>();
  for (int64_t i = 0; i < group_count; ++i) {
    InputArchive group;
    groups_archive.read("param_groups/" + std::to_string(i), group);
    const auto& params = live[i].params();
    const int64_t param_count = count_of(group, "params/size", where);
    if (param_count != static_cast<int64_t>(params.size())) {
      throw CheckpointError(fmt::format("{}: param group {} holds {} parameters in the checkpoint but {} in the optimizer",
                                        where, i, param_count, params.size()));
    }
    InputArchive options_archive;
    group.read("options", options_archive);
    auto group_options = std::make_unique<Options>(0);
    group_options->serialize(options_archive);
    for (int64_t j = 0; j < param_count; ++j) {
      c10::IValue key;
      group.read("params/" + std::to_string(j), key);
      if (!key.isString()) throw CheckpointError(fmt::format("{}: param group {} key {} is not text", where, i, j));
      auto saved_state = saved.find(key.toStringRef());
      if (saved_state == saved.end()) continue;  // a parameter without state yet
      auto state = std::make_unique<State>(*saved_state->second);
      if constexpr (std::is_same_v<State, torch::optim::LBFGSParamState>) check_lbfgs_state(*group_options, *state, where);
      (*states)[compat::optimizer_state_key(params[j])] = std::move(state);
    }
    options->push_back(std::move(group_options));
  }
  return [&optimizer, states, options] {
    for (size_t i = 0; i < options->size(); ++i) optimizer.param_groups()[i].set_options(std::move((*options)[i]));
    optimizer.state() = std::move(*states);
  };
}

template <typename Opt>
bool is(const Optimizer& optimizer) {
  return dynamic_cast<const Opt*>(&optimizer) != nullptr;
}

}  // namespace

void check_lbfgs_state(const torch::optim::LBFGSOptions& options, torch::optim::LBFGSParamState& state,
                       const std::string& where) {
  const size_t history = state.old_dirs().size();
  if (state.old_stps().size() != history || state.ro().size() != history) {
    throw CheckpointError(fmt::format("{}: the LBFGS state holds {} old_dirs, {} old_stps and {} ro", where, history,
                                      state.old_stps().size(), state.ro().size()));
  }
  if (options.history_size() < 1 || history > static_cast<size_t>(options.history_size())) {
    throw CheckpointError(fmt::format("{}: the LBFGS state holds {} directions but its history_size is {}", where,
                                      history, options.history_size()));
  }
  state.al(std::decay_t<decltype(state.al())>());
}

std::function<void()> prepare_optimizer_archive_load(Optimizer& optimizer, InputArchive& archive,
                                                     const std::string& where) {
  namespace optim = torch::optim;
  try {
    if (is<optim::SGD>(optimizer)) return prepare_as<optim::SGDParamState, optim::SGDOptions>(optimizer, archive, where);
    if (is<optim::Adam>(optimizer)) return prepare_as<optim::AdamParamState, optim::AdamOptions>(optimizer, archive, where);
    if (is<optim::AdamW>(optimizer)) {
      return prepare_as<optim::AdamWParamState, optim::AdamWOptions>(optimizer, archive, where);
    }
    if (is<optim::RMSprop>(optimizer)) {
      return prepare_as<optim::RMSpropParamState, optim::RMSpropOptions>(optimizer, archive, where);
    }
    if (is<optim::Adagrad>(optimizer)) {
      return prepare_as<optim::AdagradParamState, optim::AdagradOptions>(optimizer, archive, where);
    }
    if (is<optim::LBFGS>(optimizer)) {
      return prepare_as<optim::LBFGSParamState, optim::LBFGSOptions>(optimizer, archive, where);
    }
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("{}: {}", where, e.what_without_backtrace()));
  }
  // A type of the user's: only its own load knows its state. It may fail, so the current state is
  // kept to put back.
  return [&optimizer, &archive, where] {
    std::ostringstream backup;
    {
      torch::serialize::OutputArchive saved;
      optimizer.save(saved);
      saved.save_to(backup);
    }
    try {
      optimizer.load(archive);
    } catch (const std::exception& e) {
      std::istringstream in(backup.str());
      InputArchive saved;
      saved.load_from(in);
      optimizer.load(saved);
      const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
      throw CheckpointError(fmt::format("{}: {}", where, c10_error ? c10_error->what_without_backtrace() : e.what()));
    }
  };
}

}  // namespace torchfit::detail
