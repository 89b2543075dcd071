#include "torchfit/engine/checkpoint.h"

#include <algorithm>
#include <unordered_set>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/optim/optimizer.h>

#include "format/checkpoint_file.h"
#include "format/optimizer_state.h"
#include "format/state_dict.h"
#include "format/state_fields.h"
#include "torchfit/error.h"
#include "torchfit/io/checkpoint_io.h"

namespace torchfit {

/// One named part of a checkpoint: what it saves, and how a saved state is
/// checked (`prepare`) and then applied (the returned function, which cannot fail).
class Checkpoint::Item {
 public:
  virtual ~Item() = default;
  /// "module", "optimizer", "rng", "value" or "state", as the file's "torchfit" entry lists it.
  virtual const char* kind() const = 0;
  virtual c10::IValue save() const = 0;
  virtual std::function<void()> prepare(const c10::IValue& state, const std::string& where) = 0;
  /// As prepare, for a state just read from a file and held nowhere else: its tensors may give
  /// their memory to the item's instead of being copied into them.
  virtual std::function<void()> prepare_taking(const c10::IValue& state, const std::string& where) {
    return prepare(state, where);
  }
  /// Adds the storages of the tensors only optimizer steps change in place.
  virtual void add_step_storages(std::unordered_set<const void*>& storages) const { (void)storages; }
  bool optional = false;
};

namespace {

using Apply = std::function<void()>;
constexpr const char* kFormatName = "torchfit.checkpoint";
constexpr int64_t kFormatVersion = 2;

class ModuleItem : public Checkpoint::Item {
 public:
  explicit ModuleItem(std::shared_ptr<torch::nn::Module> module) : module_(std::move(module)) {}
  const char* kind() const override { return "module"; }
  c10::IValue save() const override {
    c10::impl::GenericDict dict(c10::StringType::get(), c10::TensorType::get());
    for (const auto& [name, tensor] : state_dict(*module_)) dict.insert(name, tensor);
    return dict;
  }
  Apply prepare(const c10::IValue& state, const std::string& where) override {
    return prepare_with(state, where, detail::copy_weights);
  }
  Apply prepare_taking(const c10::IValue& state, const std::string& where) override {
    return prepare_with(state, where, detail::install_weights);
  }
  // Parameters, not buffers: forward passes write buffers (BatchNorm's running statistics).
  void add_step_storages(std::unordered_set<const void*>& storages) const override {
    for (const auto& parameter : module_->parameters()) storages.insert(parameter.storage().unsafeGetStorageImpl());
  }

 private:
  /// Checks the weights now; `assign` puts them into the module's tensors when applied.
  Apply prepare_with(const c10::IValue& state, const std::string& where,
                     void (*assign)(TensorMap&, const TensorMap&)) {
    auto weights = detail::weights_from_ivalue(state, where);
    auto targets = detail::check_weights(*module_, weights, where);
    return [targets = std::move(targets), weights = std::move(weights), assign]() mutable { assign(targets, weights); };
  }

  std::shared_ptr<torch::nn::Module> module_;
};

class OptimizerItem : public Checkpoint::Item {
 public:
  explicit OptimizerItem(std::shared_ptr<torch::optim::Optimizer> optimizer) : optimizer_(std::move(optimizer)) {}
  const char* kind() const override { return "optimizer"; }
  c10::IValue save() const override { return detail::optimizer_state_dict(*optimizer_); }
  Apply prepare(const c10::IValue& state, const std::string& where) override {
    return detail::prepare_optimizer_load(*optimizer_, state, where);
  }
  Apply prepare_taking(const c10::IValue& state, const std::string& where) override {
    return detail::prepare_optimizer_load(*optimizer_, state, where, /*take=*/true);
  }
  void add_step_storages(std::unordered_set<const void*>& storages) const override {
    detail::for_each_tensor(save(), [&](const at::Tensor& tensor) {
      if (tensor.defined()) storages.insert(tensor.storage().unsafeGetStorageImpl());
    });
  }

 private:
  std::shared_ptr<torch::optim::Optimizer> optimizer_;
};

/// torch's default generators: {"cpu": bytes, "cuda": [bytes per device]}.
class RngItem : public Checkpoint::Item {
 public:
  const char* kind() const override { return "rng"; }
  c10::IValue save() const override {
    c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
    dict.insert("cpu", state_of(at::detail::getDefaultCPUGenerator()));
    c10::impl::GenericList cuda(c10::TensorType::get());
    const auto& hooks = at::detail::getCUDAHooks();
    if (hooks.hasCUDA()) {
      for (int64_t i = 0; i < hooks.getNumGPUs(); ++i) cuda.push_back(state_of(cuda_generator(i)));
    }
    dict.insert("cuda", cuda);
    return dict;
  }
  Apply prepare(const c10::IValue& state, const std::string& where) override {
    const detail::StateFields fields(state, where, "the saved generator state");
    auto cpu_state = fields.tensor("cpu");
    auto expected = state_of(at::detail::getDefaultCPUGenerator());
    if (cpu_state.scalar_type() != at::kByte || cpu_state.numel() != expected.numel()) {
      fields.fail(fmt::format("holds {} bytes of {}, {} bytes expected", cpu_state.numel(),
                              std::string(c10::toString(cpu_state.scalar_type())), expected.numel()));
    }
    try {
      // Applied to a scratch generator first, so bad bytes fail before anything changes.
      auto scratch = at::make_generator<at::CPUGeneratorImpl>();
      set_state_of(scratch, cpu_state);
    } catch (const c10::Error& e) {
      fields.fail(fmt::format("is unusable ({})", e.what_without_backtrace()));
    }
    std::vector<at::Tensor> cuda_states;
    const auto& hooks = at::detail::getCUDAHooks();
    if (fields.has("cuda") && hooks.hasCUDA()) {
      for (const auto& item : fields.list("cuda").toListRef()) {
        if (item.isTensor()) cuda_states.push_back(item.toTensor());
      }
    }
    return [cpu_state, cuda_states] {
      set_state_of(at::detail::getDefaultCPUGenerator(), cpu_state);
      const auto& hooks = at::detail::getCUDAHooks();
      for (size_t i = 0; i < cuda_states.size() && static_cast<int64_t>(i) < hooks.getNumGPUs(); ++i) {
        set_state_of(cuda_generator(static_cast<int64_t>(i)), cuda_states[i]);
      }
    };
  }

 private:
  static at::Generator cuda_generator(int64_t device) {
    return at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device)));
  }
  static at::Tensor state_of(at::Generator generator) {
    std::lock_guard<std::mutex> lock(generator.mutex());
    return generator.get_state();
  }
  static void set_state_of(at::Generator generator, const at::Tensor& state) {
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(state.contiguous());
  }
};

class ValueItem : public Checkpoint::Item {
 public:
  explicit ValueItem(c10::IValue value = c10::IValue()) : value_(std::move(value)) {}
  const char* kind() const override { return "value"; }
  c10::IValue save() const override { return read(); }
  Apply prepare(const c10::IValue& state, const std::string& where) override {
    const c10::IValue value = read();
    bool same = (value.isInt() && state.isInt()) || (value.isDouble() && (state.isDouble() || state.isInt())) ||
                (value.isBool() && state.isBool()) || (value.isString() && state.isString()) ||
                (value.isTensor() && state.isTensor());
    if (!same) {
      throw CheckpointError(
          fmt::format("{}: the saved value is a {}, but this checkpoint holds a {}", where, state.tagKind(), value.tagKind()));
    }
    c10::IValue loaded = value.isDouble() && state.isInt() ? c10::IValue(static_cast<double>(state.toInt())) : state;
    return [this, loaded] { write(loaded); };
  }
  virtual c10::IValue read() const { return value_; }
  virtual void write(const c10::IValue& value) { value_ = value; }

 private:
  c10::IValue value_;
};

/// A caller's variable, read at each save and written back by a load.
class TrackedItem : public ValueItem {
 public:
  TrackedItem(std::function<c10::IValue()> read, std::function<void(const c10::IValue&)> write)
      : read_(std::move(read)), write_(std::move(write)) {}
  c10::IValue read() const override { return read_(); }
  void write(const c10::IValue& value) override { write_(value); }

 private:
  std::function<c10::IValue()> read_;
  std::function<void(const c10::IValue&)> write_;
};

class StatefulItem : public Checkpoint::Item {
 public:
  explicit StatefulItem(std::shared_ptr<Stateful> item) : item_(std::move(item)) {}
  const char* kind() const override { return "state"; }
  c10::IValue save() const override { return item_->state_dict(); }
  Apply prepare(const c10::IValue& state, const std::string& where) override {
    item_->check_state_dict(state, where);
    return [item = item_, state] { item->load_state_dict(state); };
  }

 private:
  std::shared_ptr<Stateful> item_;
};

void check_name(const std::string& name) {
  if (name.empty()) throw ValueError("Checkpoint: an item name must not be empty");
  // "torchfit" describes the file; "torchfit_*" items (a manager's state) are
  // optional to every reader.
  if (name == detail::kMetadataKey) {
    throw ValueError(fmt::format("Checkpoint: item name '{}' is reserved", name));
  }
}

/// The "torchfit" entry's item kinds, if the state has one.
std::optional<c10::impl::GenericDict> item_kinds(const c10::impl::GenericDict& state) {
  auto meta = state.find(detail::kMetadataKey);
  if (meta == state.end() || !meta->value().isGenericDict()) return std::nullopt;
  auto items = meta->value().toGenericDict().find("items");
  if (items == meta->value().toGenericDict().end() || !items->value().isGenericDict()) return std::nullopt;
  return items->value().toGenericDict();
}

}  // namespace

void Stateful::check_state_dict(const c10::IValue&, const std::string&) const {}

namespace detail {
void throw_wrong_type(const std::string& name, const c10::IValue& value) {
  throw ValueError(fmt::format("Checkpoint: item '{}' holds a {}", name, value.tagKind()));
}
}  // namespace detail

Checkpoint::Checkpoint() = default;
Checkpoint::~Checkpoint() = default;
Checkpoint::Checkpoint(const Checkpoint&) = default;
Checkpoint& Checkpoint::operator=(const Checkpoint&) = default;

void Checkpoint::add_item(const std::string& name, std::shared_ptr<Item> item) {
  check_name(name);
  if (contains(name)) throw ValueError(fmt::format("Checkpoint: an item named '{}' was already added", name));
  items_.emplace_back(name, std::move(item));
}

void Checkpoint::add_module(const std::string& name, std::shared_ptr<torch::nn::Module> module) {
  if (!module) throw ValueError(fmt::format("Checkpoint: module '{}' is null", name));
  add_item(name, std::make_shared<ModuleItem>(std::move(module)));
}

void Checkpoint::add_optimizer(const std::string& name, std::shared_ptr<torch::optim::Optimizer> optimizer) {
  if (!optimizer) throw ValueError(fmt::format("Checkpoint: optimizer '{}' is null", name));
  add_item(name, std::make_shared<OptimizerItem>(std::move(optimizer)));
}

void Checkpoint::add(const std::string& name, std::shared_ptr<Stateful> item) {
  if (!item) throw ValueError(fmt::format("Checkpoint: item '{}' is null", name));
  add_item(name, std::make_shared<StatefulItem>(std::move(item)));
}

void Checkpoint::add_optional(const std::string& name, std::shared_ptr<Stateful> item) {
  add(name, std::move(item));
  items_.back().second->optional = true;
}

void Checkpoint::add_rng(const std::string& name) { add_item(name, std::make_shared<RngItem>()); }

void Checkpoint::set_value(const std::string& name, c10::IValue value) {
  for (auto& [existing, item] : items_) {
    if (existing != name) continue;
    auto* holder = dynamic_cast<ValueItem*>(item.get());
    if (holder == nullptr) {
      throw ValueError(fmt::format("Checkpoint: item '{}' is a {}, not a value", name, item->kind()));
    }
    holder->write(value);
    return;
  }
  add_item(name, std::make_shared<ValueItem>(std::move(value)));
}

void Checkpoint::track_value(const std::string& name, std::function<c10::IValue()> read,
                             std::function<void(const c10::IValue&)> write) {
  add_item(name, std::make_shared<TrackedItem>(std::move(read), std::move(write)));
}

c10::IValue Checkpoint::value(const std::string& name) const {
  for (const auto& [existing, item] : items_) {
    if (existing != name) continue;
    if (auto* holder = dynamic_cast<const ValueItem*>(item.get())) return holder->read();
    throw ValueError(fmt::format("Checkpoint: item '{}' is a {}, not a value", name, item->kind()));
  }
  throw ValueError(fmt::format("Checkpoint: no item named '{}' (items: {})", name, fmt::join(names(), ", ")));
}

std::map<std::string, double> Checkpoint::numeric_values(std::set<std::string>* integers) const {
  std::map<std::string, double> out;
  for (const auto& [name, item] : items_) {
    auto* holder = dynamic_cast<const ValueItem*>(item.get());
    if (holder == nullptr) continue;
    const c10::IValue value = holder->read();
    if (value.isInt()) {
      out[name] = static_cast<double>(value.toInt());
      if (integers != nullptr) integers->insert(name);
    } else if (value.isDouble()) {
      out[name] = value.toDouble();
    }
  }
  return out;
}

bool Checkpoint::contains(const std::string& name) const {
  return std::any_of(items_.begin(), items_.end(), [&](const auto& item) { return item.first == name; });
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, item] : items_) out.push_back(name);
  return out;
}

bool Checkpoint::remove(const std::string& name) {
  auto it = std::find_if(items_.begin(), items_.end(), [&](const auto& item) { return item.first == name; });
  if (it == items_.end()) return false;
  items_.erase(it);
  return true;
}

c10::IValue Checkpoint::state_dict() const {
  c10::impl::GenericDict kinds(c10::StringType::get(), c10::StringType::get());
  for (const auto& [name, item] : items_) kinds.insert(name, std::string(item->kind()));
  c10::impl::GenericDict meta(c10::StringType::get(), c10::AnyType::get());
  meta.insert("format", std::string(kFormatName));
  meta.insert("version", kFormatVersion);
  meta.insert("items", kinds);
  c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
  out.insert(detail::kMetadataKey, meta);
  for (const auto& [name, item] : items_) out.insert(name, item->save());
  return out;
}

std::function<bool(const at::Tensor&)> Checkpoint::updated_by_step() const {
  auto storages = std::make_shared<std::unordered_set<const void*>>();
  for (const auto& [name, item] : items_) item->add_step_storages(*storages);
  return [storages](const at::Tensor& tensor) {
    return tensor.defined() && tensor.has_storage() && storages->count(tensor.storage().unsafeGetStorageImpl()) > 0;
  };
}

c10::IValue Checkpoint::weights_state_dict() const {
  std::vector<std::pair<std::string, c10::IValue>> modules;
  for (const auto& [name, item] : items_) {
    if (std::string(item->kind()) == "module") modules.emplace_back(name, item->save());
  }
  if (modules.empty()) throw ValueError("Checkpoint: a weights-only save needs a module, and this checkpoint has none");
  if (modules.size() == 1) return modules.front().second;
  c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
  for (auto& [name, weights] : modules) out.insert(name, std::move(weights));
  return out;
}

void Checkpoint::load_state_dict(const c10::IValue& state, const std::string& where) {
  load_state_dict(state, where, /*take=*/false);
}

namespace {

/// Whether two of `state`'s tensors share a storage (a file may name one tensor in two items,
/// a weight and an optimizer's state): one item taking its memory would change the other's.
bool shares_storages(const c10::IValue& state) {
  std::unordered_set<const void*> storages;
  bool shared = false;
  detail::for_each_tensor(state, [&](const at::Tensor& tensor) {
    if (!tensor.defined() || !tensor.has_storage()) return;
    shared |= !storages.insert(tensor.storage().unsafeGetStorageImpl()).second;
  });
  return shared;
}

}  // namespace

void Checkpoint::load_state_dict(const c10::IValue& state, const std::string& where, bool take) {
  if (!state.isGenericDict()) {
    throw CheckpointError(fmt::format("Checkpoint {} holds a {}, not a dict of items", where, state.tagKind()));
  }
  take = take && !shares_storages(state);
  const auto& dict = state.toGenericDict();
  auto kinds = item_kinds(dict);
  std::vector<std::pair<std::shared_ptr<Item>, c10::IValue>> found;
  // Without a "torchfit" entry, a dict whose keys are all item names is a dict of items, as Python
  // writes {"model": ..., "optimizer": ..., "epoch": ...} (or several modules' weights by name).
  const bool items_by_name = !dict.empty() && std::all_of(dict.begin(), dict.end(), [&](const auto& entry) {
    return entry.key().isString() && contains(entry.key().toStringRef());
  });
  if (!kinds && !items_by_name) {
    // A weights-only file: one module's state dict.
    bool only_modules = !items_.empty() && std::all_of(items_.begin(), items_.end(), [](const auto& item) {
      return std::string(item.second->kind()) == "module" || item.second->optional;
    });
    size_t modules = std::count_if(items_.begin(), items_.end(), [](const auto& item) { return !item.second->optional; });
    if (only_modules && modules == 1) {
      found.emplace_back(items_.front().second, state);
    } else if (!only_modules) {
      throw CheckpointError(fmt::format(
          "Checkpoint {} is not a full torchfit checkpoint: it holds weights only (a state dict); this checkpoint has "
          "items that are not modules ({}). Load it with load_weights, or save full checkpoints",
          where, fmt::join(names(), ", ")));
    }
  }
  if (found.empty()) {
    std::vector<std::string> missing, unexpected;
    for (const auto& [name, item] : items_) {
      auto it = dict.find(name);
      if (it == dict.end()) {
        if (!item->optional) missing.push_back(name);
        continue;
      }
      if (kinds) {
        auto kind = kinds->find(name);
        bool reads_anything = std::string(item->kind()) == "state";
        if (!reads_anything && kind != kinds->end() && kind->value().isString() &&
            kind->value().toStringRef() != item->kind()) {
          throw CheckpointError(fmt::format("Checkpoint {}: item '{}' is a {} in the file but a {} here", where,
                                            name, kind->value().toStringRef(), item->kind()));
        }
      }
      found.emplace_back(item, it->value());
    }
    for (const auto& entry : dict) {
      const auto& name = entry.key().isString() ? entry.key().toStringRef() : std::string("?");
      if (name.rfind(detail::kMetadataKey, 0) == 0 || contains(name)) continue;
      unexpected.push_back(name);
    }
    if (!missing.empty() || !unexpected.empty()) {
      std::string problems;
      if (!missing.empty()) problems += fmt::format("missing item(s) '{}'", fmt::join(missing, "', '"));
      if (!unexpected.empty()) {
        problems += fmt::format("{}unexpected item(s) '{}'", problems.empty() ? "" : "; ",
                                fmt::join(unexpected, "', '"));
      }
      throw CheckpointError(fmt::format("Checkpoint {} does not match this checkpoint's items: {}", where, problems));
    }
  }
  // Everything is checked before anything changes, and every item that does not fit is named.
  std::vector<Apply> apply;
  std::vector<std::string> problems;
  for (const auto& [item, value] : found) {
    std::string name;
    for (const auto& [n, i] : items_) {
      if (i == item) name = n;
    }
    try {
      const auto item_where = fmt::format("{} [{}]", where, name);
      apply.push_back(take ? item->prepare_taking(value, item_where) : item->prepare(value, item_where));
    } catch (const CheckpointError& e) {
      // Item errors start with "<where> [name]", "Checkpoint <where> [name]" or "Failed reading
      // checkpoint <where> [name]": the message names the file once.
      std::string what = e.what();
      for (const std::string& prefix : {std::string("Checkpoint "), std::string("Failed reading checkpoint "), where + " "}) {
        if (what.rfind(prefix, 0) == 0) what.erase(0, prefix.size());
      }
      problems.push_back(std::move(what));
    }
  }
  if (problems.size() == 1) throw CheckpointError(fmt::format("Checkpoint {} {}", where, problems.front()));
  if (!problems.empty()) {
    throw CheckpointError(fmt::format("Checkpoint {}: {} items do not load: {}", where, problems.size(),
                                      fmt::join(problems, "; ")));
  }
  for (auto& step : apply) step();
}

void save(const Checkpoint& checkpoint, const std::string& path, const SaveOptions& options) {
  FileCheckpointIO(options).save(checkpoint.state_dict(), path);
}

void load(Checkpoint& checkpoint, const std::string& path) {
  // Files of other tools too (verified by their zip CRCs): Python's {"model": ..., "optimizer": ...}.
  auto state = detail::guard_read(path, [&] { return detail::CheckpointFile(path).read_all(); });
  detail::load_read_state(checkpoint, std::move(state), path);
}

namespace detail {

void load_read_state(Checkpoint& checkpoint, c10::IValue state, const std::string& where) {
  checkpoint.load_state_dict(state, where, /*take=*/true);
}

}  // namespace detail

}  // namespace torchfit
