#include "format/optimizer_state.h"

#include <cmath>
#include <sstream>
#include <unordered_set>

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "compat/libtorch.h"
#include "format/module_archive.h"
#include "format/optimizer_archive.h"
#include "format/state_dict.h"
#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

using torch::optim::Optimizer;
using torch::optim::OptimizerOptions;
using torch::optim::OptimizerParamState;
using Dict = c10::impl::GenericDict;
using StateMap = compat::OptimizerStateMap;

Dict new_dict() { return Dict(c10::StringType::get(), c10::AnyType::get()); }

/// The state tensors of a load whose file tensors nothing else holds: each is taken as it is
/// rather than copied, or gives its memory to the optimizer's current tensor of the same
/// name, once the load applies. A storage is taken once: two fields may share one.
class TakenTensors {
 public:
  /// Whether `source` gives its memory to `target` when the load applies.
  bool swap_into(const at::Tensor& target, const at::Tensor& source) {
    if (!can_swap_memory(target, source) || taken(target) || taken(source)) return false;
    take(target);
    take(source);
    swaps_.emplace_back(target, source);
    return true;
  }
  /// Whether `source` can be kept as the optimizer's.
  bool keep(const at::Tensor& source) {
    if (!owns_storage_alone(source) || taken(source)) return false;
    take(source);
    return true;
  }
  void apply() {
    for (auto& [target, source] : swaps_) swap_memory(target, source);
  }

 private:
  bool taken(const at::Tensor& tensor) const { return storages_.count(tensor.storage().unsafeGetStorageImpl()) > 0; }
  void take(const at::Tensor& tensor) { storages_.insert(tensor.storage().unsafeGetStorageImpl()); }
  std::vector<std::pair<at::Tensor, at::Tensor>> swaps_;
  std::unordered_set<const void*> storages_;
};

/// Reads typed fields of one saved dict; errors name `where` and the field.
class Fields {
 public:
  Fields(const c10::IValue& value, std::string where) : where_(std::move(where)) {
    if (!value.isGenericDict()) throw error(fmt::format("is a {}, not a dict", value.tagKind()));
    dict_ = value.toGenericDict();
  }
  /// A parameter's saved state whose tensors `taken` takes where it can, `current` holding
  /// the optimizer's state of that parameter by the same names.
  Fields(const c10::IValue& value, std::string where, TakenTensors* taken, Dict current)
      : Fields(value, std::move(where)) {
    taken_ = taken;
    current_ = std::move(current);
  }
  bool has(const char* name) const {
    auto it = dict_.find(name);
    return it != dict_.end() && !it->value().isNone();
  }
  c10::IValue get(const char* name) const {
    auto it = dict_.find(name);
    if (it == dict_.end()) throw error(fmt::format("has no '{}'", name));
    return it->value();
  }
  double real(const char* name) const {
    auto v = get(name);
    if (v.isDouble()) return v.toDouble();
    if (v.isInt()) return static_cast<double>(v.toInt());
    throw error(fmt::format("'{}' is a {}, not a number", name, v.tagKind()));
  }
  bool flag(const char* name) const {
    auto v = get(name);
    if (!v.isBool()) throw error(fmt::format("'{}' is a {}, not a bool", name, v.tagKind()));
    return v.toBool();
  }
  int64_t step(const char* name) const {
    auto v = get(name);
    if (v.isInt() && v.toInt() >= 0) return v.toInt();
    if (v.isTensor() && v.toTensor().numel() == 1) {
      // Python keeps the count as a float tensor; only a whole number in int64's range is one.
      const double count = v.toTensor().item<double>();
      if (std::isfinite(count) && count >= 0 && count < 0x1p63 && count == std::floor(count)) {
        return static_cast<int64_t>(count);
      }
      throw error(fmt::format("'{}' is {}, not a step count", name, count));
    }
    if (v.isInt()) throw error(fmt::format("'{}' is {}, not a step count", name, v.toInt()));
    throw error(fmt::format("'{}' is a {}, not a step count", name, v.tagKind()));
  }
  /// A number, or a one-element tensor holding it (Python's LBFGS keeps `t` either way).
  double number(const char* name) const {
    auto v = get(name);
    if (v.isTensor() && v.toTensor().numel() == 1) return v.toTensor().item<double>();
    return real(name);
  }
  int64_t integer(const char* name) const {
    auto v = get(name);
    if (!v.isInt()) throw error(fmt::format("'{}' is a {}, not an integer", name, v.tagKind()));
    return v.toInt();
  }
  /// A tensor of any shape, on `param`'s device; undefined when absent or None. A number becomes
  /// a 0-dim tensor of `param`'s dtype (Python's LBFGS starts H_diag as the int 1).
  at::Tensor any_tensor(const c10::IValue& v, const std::string& what, const at::Tensor& param) const {
    if (v.isNone()) return {};
    if (v.isInt()) return at::scalar_tensor(static_cast<double>(v.toInt()), param.options());
    if (v.isDouble()) return at::scalar_tensor(v.toDouble(), param.options());
    if (!v.isTensor()) throw error(fmt::format("'{}' is a {}, not a tensor", what, v.tagKind()));
    return v.toTensor().to(param.device(), /*non_blocking=*/false, /*copy=*/true);
  }
  at::Tensor any_tensor(const char* name, const at::Tensor& param) const {
    return has(name) ? any_tensor(get(name), name, param) : at::Tensor();
  }
  /// A list of tensors (None items undefined).
  std::vector<at::Tensor> tensors(const char* name, const at::Tensor& param) const {
    std::vector<at::Tensor> out;
    if (!has(name)) return out;
    auto v = get(name);
    if (!v.isList()) throw error(fmt::format("'{}' is a {}, not a list", name, v.tagKind()));
    for (const auto& item : v.toListRef()) out.push_back(any_tensor(item, name, param));
    return out;
  }
  std::tuple<double, double> pair(const char* name) const {
    auto v = get(name);
    if (v.isTuple() && v.toTupleRef().elements().size() == 2) {
      const auto& e = v.toTupleRef().elements();
      if ((e[0].isDouble() || e[0].isInt()) && (e[1].isDouble() || e[1].isInt())) {
        auto as_double = [](const c10::IValue& x) { return x.isDouble() ? x.toDouble() : static_cast<double>(x.toInt()); };
        return {as_double(e[0]), as_double(e[1])};
      }
    }
    throw error(fmt::format("'{}' is a {}, not a pair of numbers", name, v.tagKind()));
  }
  /// A state tensor shaped like `param`, moved to its device; undefined when absent or None.
  /// A copy, unless the tensor is taken (see TakenTensors).
  at::Tensor tensor_like(const char* name, const at::Tensor& param) const {
    if (!has(name)) return {};
    auto v = get(name);
    if (!v.isTensor()) throw error(fmt::format("'{}' is a {}, not a tensor", name, v.tagKind()));
    auto t = v.toTensor();
    if (t.sizes() != param.sizes()) {
      throw error(fmt::format("'{}' has shape [{}] but its parameter has shape [{}]", name,
                              fmt::join(t.sizes(), ", "), fmt::join(param.sizes(), ", ")));
    }
    if (taken_ && t.scalar_type() == param.scalar_type() && t.device() == param.device()) {
      auto current = current_.find(name);
      if (current != current_.end() && current->value().isTensor() &&
          taken_->swap_into(current->value().toTensor(), t)) {
        return current->value().toTensor();
      }
      if (taken_->keep(t)) return t;
    }
    return t.to(param.options(), /*non_blocking=*/false, /*copy=*/true);
  }
  CheckpointError error(const std::string& what) const { return CheckpointError(where_ + " " + what); }
  const std::string& where() const { return where_; }

 private:
  Dict dict_ = new_dict();
  std::string where_;
  TakenTensors* taken_ = nullptr;
  Dict current_ = new_dict();
};

at::Tensor step_tensor(int64_t step) { return at::scalar_tensor(static_cast<double>(step), at::kFloat); }
c10::IValue maybe(const at::Tensor& t) { return t.defined() ? c10::IValue(t) : c10::IValue(); }

// ---- each optimizer type: its options and per-parameter state, by Python's names

struct SGDCodec {
  using Opt = torch::optim::SGD;
  using Options = torch::optim::SGDOptions;
  using State = torch::optim::SGDParamState;
  static void save_options(const Options& o, Dict& d) {
    d.insert("lr", o.lr());
    d.insert("momentum", o.momentum());
    d.insert("dampening", o.dampening());
    d.insert("weight_decay", o.weight_decay());
    d.insert("nesterov", o.nesterov());
  }
  static void load_options(Options& o, const Fields& f) {
    o.lr(f.real("lr")).momentum(f.real("momentum")).dampening(f.real("dampening"));
    o.weight_decay(f.real("weight_decay")).nesterov(f.flag("nesterov"));
  }
  static void save_state(const State& s, Dict& d) { d.insert("momentum_buffer", maybe(s.momentum_buffer())); }
  static void load_state(State& s, const Fields& f, const at::Tensor& p, const Options&) {
    s.momentum_buffer(f.tensor_like("momentum_buffer", p));
  }
};

template <typename OptT, typename OptionsT, typename StateT>
struct AdamLikeCodec {
  using Opt = OptT;
  using Options = OptionsT;
  using State = StateT;
  static void save_options(const Options& o, Dict& d) {
    d.insert("lr", o.lr());
    d.insert("betas", c10::ivalue::Tuple::create({std::get<0>(o.betas()), std::get<1>(o.betas())}));
    d.insert("eps", o.eps());
    d.insert("weight_decay", o.weight_decay());
    d.insert("amsgrad", o.amsgrad());
  }
  static void load_options(Options& o, const Fields& f) {
    o.lr(f.real("lr")).betas(f.pair("betas")).eps(f.real("eps")).weight_decay(f.real("weight_decay"));
    o.amsgrad(f.flag("amsgrad"));
  }
  static void save_state(const State& s, Dict& d) {
    d.insert("step", step_tensor(s.step()));
    d.insert("exp_avg", maybe(s.exp_avg()));
    d.insert("exp_avg_sq", maybe(s.exp_avg_sq()));
    if (s.max_exp_avg_sq().defined()) d.insert("max_exp_avg_sq", s.max_exp_avg_sq());
  }
  static void load_state(State& s, const Fields& f, const at::Tensor& p, const Options&) {
    s.step(f.step("step"));
    s.exp_avg(f.tensor_like("exp_avg", p));
    s.exp_avg_sq(f.tensor_like("exp_avg_sq", p));
    s.max_exp_avg_sq(f.tensor_like("max_exp_avg_sq", p));
  }
};
using AdamCodec = AdamLikeCodec<torch::optim::Adam, torch::optim::AdamOptions, torch::optim::AdamParamState>;
using AdamWCodec = AdamLikeCodec<torch::optim::AdamW, torch::optim::AdamWOptions, torch::optim::AdamWParamState>;

struct RMSpropCodec {
  using Opt = torch::optim::RMSprop;
  using Options = torch::optim::RMSpropOptions;
  using State = torch::optim::RMSpropParamState;
  static void save_options(const Options& o, Dict& d) {
    d.insert("lr", o.lr());
    d.insert("alpha", o.alpha());
    d.insert("eps", o.eps());
    d.insert("weight_decay", o.weight_decay());
    d.insert("momentum", o.momentum());
    d.insert("centered", o.centered());
  }
  static void load_options(Options& o, const Fields& f) {
    o.lr(f.real("lr")).alpha(f.real("alpha")).eps(f.real("eps")).weight_decay(f.real("weight_decay"));
    o.momentum(f.real("momentum")).centered(f.flag("centered"));
  }
  static void save_state(const State& s, Dict& d) {
    d.insert("step", step_tensor(s.step()));
    d.insert("square_avg", maybe(s.square_avg()));
    if (s.momentum_buffer().defined()) d.insert("momentum_buffer", s.momentum_buffer());
    if (s.grad_avg().defined()) d.insert("grad_avg", s.grad_avg());
  }
  static void load_state(State& s, const Fields& f, const at::Tensor& p, const Options&) {
    s.step(f.step("step"));
    s.square_avg(f.tensor_like("square_avg", p));
    s.momentum_buffer(f.tensor_like("momentum_buffer", p));
    s.grad_avg(f.tensor_like("grad_avg", p));
  }
};

struct AdagradCodec {
  using Opt = torch::optim::Adagrad;
  using Options = torch::optim::AdagradOptions;
  using State = torch::optim::AdagradParamState;
  static void save_options(const Options& o, Dict& d) {
    d.insert("lr", o.lr());
    d.insert("lr_decay", o.lr_decay());
    d.insert("weight_decay", o.weight_decay());
    d.insert("initial_accumulator_value", o.initial_accumulator_value());
    d.insert("eps", o.eps());
  }
  static void load_options(Options& o, const Fields& f) {
    o.lr(f.real("lr")).lr_decay(f.real("lr_decay")).weight_decay(f.real("weight_decay"));
    o.initial_accumulator_value(f.real("initial_accumulator_value")).eps(f.real("eps"));
  }
  static void save_state(const State& s, Dict& d) {
    d.insert("step", step_tensor(s.step()));
    d.insert("sum", maybe(s.sum()));
  }
  static void load_state(State& s, const Fields& f, const at::Tensor& p, const Options&) {
    s.step(f.step("step"));
    s.sum(f.tensor_like("sum", p));
  }
};

/// Python's LBFGS layout: one state, of the first parameter, whose tensors span all parameters.
struct LBFGSCodec {
  using Opt = torch::optim::LBFGS;
  using Options = torch::optim::LBFGSOptions;
  using State = torch::optim::LBFGSParamState;
  static void save_options(const Options& o, Dict& d) {
    d.insert("lr", o.lr());
    d.insert("max_iter", o.max_iter());
    d.insert("max_eval", o.max_eval() ? c10::IValue(*o.max_eval()) : c10::IValue());
    d.insert("tolerance_grad", o.tolerance_grad());
    d.insert("tolerance_change", o.tolerance_change());
    d.insert("history_size", o.history_size());
    d.insert("line_search_fn", o.line_search_fn() ? c10::IValue(*o.line_search_fn()) : c10::IValue());
  }
  static void load_options(Options& o, const Fields& f) {
    o.lr(f.real("lr")).max_iter(f.integer("max_iter")).tolerance_grad(f.real("tolerance_grad"));
    o.tolerance_change(f.real("tolerance_change")).history_size(f.integer("history_size"));
    if (f.has("max_eval")) {
      o.max_eval(f.integer("max_eval"));
    } else {
      o.max_eval(std::decay_t<decltype(o.max_eval())>());
    }
    if (f.has("line_search_fn")) {
      auto fn = f.get("line_search_fn");
      if (!fn.isString() || fn.toStringRef() != "strong_wolfe") {
        throw f.error("'line_search_fn' is neither None nor 'strong_wolfe'");
      }
      o.line_search_fn(fn.toStringRef());
    } else {
      o.line_search_fn(std::decay_t<decltype(o.line_search_fn())>());
    }
    if (o.max_iter() < 1 || o.history_size() < 1) throw f.error("has a max_iter or history_size below 1");
  }
  static c10::IValue tensor_list(const std::vector<at::Tensor>& tensors) {
    c10::impl::GenericList list(c10::AnyType::get());
    for (const auto& t : tensors) list.push_back(maybe(t));
    return list;
  }
  static void save_state(const State& s, Dict& d) {
    d.insert("func_evals", s.func_evals());
    d.insert("n_iter", s.n_iter());
    d.insert("t", s.t());
    d.insert("prev_loss", s.prev_loss());
    d.insert("d", maybe(s.d()));
    d.insert("H_diag", maybe(s.H_diag()));
    d.insert("prev_flat_grad", maybe(s.prev_flat_grad()));
    d.insert("old_dirs", tensor_list(std::vector<at::Tensor>(s.old_dirs().begin(), s.old_dirs().end())));
    d.insert("old_stps", tensor_list(std::vector<at::Tensor>(s.old_stps().begin(), s.old_stps().end())));
    d.insert("ro", tensor_list(std::vector<at::Tensor>(s.ro().begin(), s.ro().end())));
    if (s.al()) d.insert("al", tensor_list(*s.al()));
  }
  static void load_state(State& s, const Fields& f, const at::Tensor& p, const Options& group) {
    s.func_evals(f.integer("func_evals"));
    s.n_iter(f.integer("n_iter"));
    s.t(f.has("t") ? f.number("t") : 0.0);
    s.prev_loss(f.has("prev_loss") ? f.number("prev_loss") : 0.0);
    s.d(f.any_tensor("d", p));
    s.H_diag(f.any_tensor("H_diag", p));
    s.prev_flat_grad(f.any_tensor("prev_flat_grad", p));
    auto dirs = f.tensors("old_dirs", p), steps = f.tensors("old_stps", p), ro = f.tensors("ro", p);
    s.old_dirs(std::deque<at::Tensor>(dirs.begin(), dirs.end()));
    s.old_stps(std::deque<at::Tensor>(steps.begin(), steps.end()));
    s.ro(std::deque<at::Tensor>(ro.begin(), ro.end()));
    check_lbfgs_state(group, s, f.where());
  }
};

/// Param groups with "params" numbered across groups, as Python numbers them.
template <typename GroupFn>
c10::impl::GenericList param_groups(const Optimizer& optimizer, GroupFn&& options_of) {
  c10::impl::GenericList groups(c10::AnyType::get());
  int64_t index = 0;
  for (const auto& group : optimizer.param_groups()) {
    Dict d = new_dict();
    options_of(group.options(), d);
    c10::List<int64_t> params;
    for (size_t i = 0; i < group.params().size(); ++i) params.push_back(index++);
    d.insert("params", params);
    groups.push_back(d);
  }
  return groups;
}

/// The saved groups' dicts, checked against the optimizer's groups and sizes.
std::vector<c10::IValue> saved_groups(const Optimizer& optimizer, const Fields& top, const std::string& where) {
  auto list = top.get("param_groups");
  if (!list.isList()) throw top.error("'param_groups' is not a list");
  auto groups = list.toListRef();
  const auto& live = optimizer.param_groups();
  if (groups.size() != live.size()) {
    throw CheckpointError(fmt::format("{}: {} param groups in the checkpoint but {} in the optimizer", where,
                                      groups.size(), live.size()));
  }
  std::vector<c10::IValue> out;
  for (size_t i = 0; i < groups.size(); ++i) {
    Fields group(groups[i], fmt::format("{}: param group {}", where, i));
    auto params = group.get("params");
    size_t count = params.isList() ? params.toListRef().size() : 0;
    if (count != live[i].params().size()) {
      throw CheckpointError(fmt::format("{}: param group {} holds {} parameters in the checkpoint but {} in the optimizer",
                                        where, i, count, live[i].params().size()));
    }
    out.push_back(groups[i]);
  }
  return out;
}

template <typename Codec>
c10::IValue save_as(const Optimizer& optimizer) {
  Dict state(c10::IntType::get(), c10::AnyType::get());
  int64_t index = 0;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& param : group.params()) {
      auto it = optimizer.state().find(compat::optimizer_state_key(param));
      if (it != optimizer.state().end()) {
        Dict d = new_dict();
        Codec::save_state(static_cast<const typename Codec::State&>(*it->second), d);
        state.insert(index, d);
      }
      ++index;
    }
  }
  Dict out = new_dict();
  out.insert("state", state);
  out.insert("param_groups", param_groups(optimizer, [](const OptimizerOptions& o, Dict& d) {
               Codec::save_options(static_cast<const typename Codec::Options&>(o), d);
             }));
  return out;
}

template <typename Codec>
std::function<void()> prepare_as(Optimizer& optimizer, const c10::IValue& value, const std::string& where,
                                 bool take) {
  Fields top(value, where + ":");
  if (top.has("torchfit_archive")) {
    throw CheckpointError(fmt::format("{}: the checkpoint holds the state of another optimizer type", where));
  }
  auto groups = saved_groups(optimizer, top, where);
  std::vector<std::unique_ptr<OptimizerOptions>> options;
  for (size_t i = 0; i < groups.size(); ++i) {
    auto copy = optimizer.param_groups()[i].options().clone();
    Codec::load_options(static_cast<typename Codec::Options&>(*copy), Fields(groups[i], fmt::format("{}: param group {}", where, i)));
    options.push_back(std::move(copy));
  }
  std::vector<at::Tensor> params;
  std::vector<size_t> group_of;  // each parameter's group
  for (size_t i = 0; i < optimizer.param_groups().size(); ++i) {
    const auto& group = optimizer.param_groups()[i].params();
    params.insert(params.end(), group.begin(), group.end());
    group_of.resize(params.size(), i);
  }
  auto saved = top.get("state");
  if (!saved.isGenericDict()) throw top.error("'state' is not a dict");
  auto states = std::make_shared<StateMap>();
  auto taken = take ? std::make_shared<TakenTensors>() : nullptr;
  for (const auto& entry : saved.toGenericDict()) {
    if (!entry.key().isInt() || entry.key().toInt() < 0 || entry.key().toInt() >= static_cast<int64_t>(params.size())) {
      throw CheckpointError(fmt::format("{}: state for parameter {} but the optimizer has {} parameters", where,
                                        entry.key().isInt() ? std::to_string(entry.key().toInt()) : "?", params.size()));
    }
    const auto index = static_cast<size_t>(entry.key().toInt());
    const auto& param = params[index];
    auto state = std::make_unique<typename Codec::State>();
    Dict current = new_dict();
    auto it = optimizer.state().find(compat::optimizer_state_key(param));
    if (taken && it != optimizer.state().end() && dynamic_cast<const typename Codec::State*>(it->second.get())) {
      Codec::save_state(static_cast<const typename Codec::State&>(*it->second), current);
    }
    Codec::load_state(*state,
                      Fields(entry.value(), fmt::format("{}: state of parameter {}", where, index), taken.get(),
                             std::move(current)),
                      param, static_cast<const typename Codec::Options&>(*options[group_of[index]]));
    (*states)[compat::optimizer_state_key(param)] = std::move(state);
  }
  auto shared_options = std::make_shared<std::vector<std::unique_ptr<OptimizerOptions>>>(std::move(options));
  return [&optimizer, states, shared_options, taken] {
    if (taken) taken->apply();
    for (size_t i = 0; i < shared_options->size(); ++i) {
      optimizer.param_groups()[i].set_options(std::move((*shared_options)[i]));
    }
    optimizer.state() = std::move(*states);
  };
}

// ---- other optimizer types: LibTorch's own archive, plus each group's lr

c10::IValue save_archive(const Optimizer& optimizer) {
  std::ostringstream bytes;
  torch::serialize::OutputArchive archive;
  optimizer.save(archive);
  archive.save_to(bytes);
  auto text = bytes.str();
  auto blob = at::empty({static_cast<int64_t>(text.size())}, at::kByte);
  std::memcpy(blob.data_ptr(), text.data(), text.size());
  Dict out = new_dict();
  out.insert("torchfit_archive", blob);
  out.insert("param_groups", param_groups(optimizer, [](const OptimizerOptions& o, Dict& d) { d.insert("lr", o.get_lr()); }));
  return out;
}

std::function<void()> prepare_archive(Optimizer& optimizer, const c10::IValue& value, const std::string& where) {
  Fields top(value, where + ":");
  if (!top.has("torchfit_archive")) {
    throw CheckpointError(fmt::format("{}: the checkpoint holds the state of another optimizer type", where));
  }
  auto groups = saved_groups(optimizer, top, where);
  std::vector<double> lrs;
  for (size_t i = 0; i < groups.size(); ++i) lrs.push_back(Fields(groups[i], fmt::format("{}: param group {}", where, i)).real("lr"));
  auto blob = top.get("torchfit_archive");
  if (!blob.isTensor()) throw top.error("'torchfit_archive' is not a tensor");
  auto bytes = blob.toTensor().contiguous();
  std::string text(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(bytes.numel()));
  auto archive = std::make_shared<torch::serialize::InputArchive>();
  std::function<void()> load;
  try {  // read and checked here, so a damaged blob fails before any item is applied
    to_input_archive(read_module_archive_bytes(text, where + ": 'torchfit_archive'"), *archive);
    load = prepare_optimizer_archive_load(optimizer, *archive, where);
  } catch (const CheckpointError&) {
    throw;
  } catch (const c10::Error& e) {
    throw top.error(fmt::format("'torchfit_archive' is not a LibTorch optimizer archive: {}", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    throw top.error(fmt::format("'torchfit_archive' is not a LibTorch optimizer archive: {}", e.what()));
  }
  return [&optimizer, archive, load, lrs] {
    load();
    for (size_t i = 0; i < lrs.size(); ++i) optimizer.param_groups()[i].options().set_lr(lrs[i]);
  };
}

template <typename Codec>
bool is(const Optimizer& optimizer) {
  return dynamic_cast<const typename Codec::Opt*>(&optimizer) != nullptr;
}

}  // namespace

c10::IValue optimizer_state_dict(const Optimizer& optimizer) {
  if (is<AdamWCodec>(optimizer)) return save_as<AdamWCodec>(optimizer);
  if (is<AdamCodec>(optimizer)) return save_as<AdamCodec>(optimizer);
  if (is<SGDCodec>(optimizer)) return save_as<SGDCodec>(optimizer);
  if (is<RMSpropCodec>(optimizer)) return save_as<RMSpropCodec>(optimizer);
  if (is<AdagradCodec>(optimizer)) return save_as<AdagradCodec>(optimizer);
  if (is<LBFGSCodec>(optimizer)) return save_as<LBFGSCodec>(optimizer);
  return save_archive(optimizer);
}

std::function<void()> prepare_optimizer_load(Optimizer& optimizer, const c10::IValue& state, const std::string& where,
                                             bool take) {
  // Errors name the type loaded into: a missing field usually means the file holds another optimizer.
  auto into = [&](auto codec, const char* type) {
    return prepare_as<decltype(codec)>(optimizer, state, fmt::format("{} (into a torch::optim::{})", where, type),
                                       take);
  };
  try {
    if (is<AdamWCodec>(optimizer)) return into(AdamWCodec{}, "AdamW");
    if (is<AdamCodec>(optimizer)) return into(AdamCodec{}, "Adam");
    if (is<SGDCodec>(optimizer)) return into(SGDCodec{}, "SGD");
    if (is<RMSpropCodec>(optimizer)) return into(RMSpropCodec{}, "RMSprop");
    if (is<AdagradCodec>(optimizer)) return into(AdagradCodec{}, "Adagrad");
    if (is<LBFGSCodec>(optimizer)) {
      // Files of torchfit 0.2 hold LBFGS as LibTorch's archive.
      if (state.isGenericDict() && state.toGenericDict().contains("torchfit_archive")) {
        return prepare_archive(optimizer, state, where);
      }
      return into(LBFGSCodec{}, "LBFGS");
    }
    return prepare_archive(optimizer, state, where);
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("{}: {}", where, e.what_without_backtrace()));
  }
}

}  // namespace torchfit::detail
