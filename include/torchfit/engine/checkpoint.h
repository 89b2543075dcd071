#pragma once
/// \file
/// `Checkpoint`: the named, stateful items a training program saves together, as
/// Lightning Fabric's state dict. Any training loop can save and restore them
/// with `save` and `load`, or hand them to a `CheckpointManager`.
///
///     torchfit::Checkpoint state;
///     state.add("generator", generator);   // a module: its parameters and buffers
///     state.add("g_opt", g_opt);           // an optimizer: its state and every param group's options
///     state.add("sampler", sampler);       // a torchfit sampler: the epoch's order and position
///     state.add_rng();                     // torch's default generators
///     state.track("step", step);           // a variable, read at each save, written by a load
///     torchfit::save(state, "ckpt/one.pt");
///     torchfit::load(state, "ckpt/one.pt");  // all or nothing
///
/// The state is captured when `save` is called: whatever runs after it (sampling from
/// the generator, a BatchNorm forward pass) belongs to the next save.
///
/// The file is `torch.save`'s format: in Python, `torch.load(path)` returns a dict
/// whose "generator" is a state dict and "g_opt" an optimizer state dict.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/core/ivalue.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "torchfit/io/checkpoint_io.h"

namespace torch::optim {
class Optimizer;
}

namespace torchfit {

class Sampler;
class Checkpoint;

namespace detail {
template <typename T>
T value_as(const std::string& name, const c10::IValue& value);
/// `Checkpoint::load_state_dict` of a state just read from a file and held nowhere else: its
/// tensors give their memory to the items' (or take their place) instead of being copied.
void load_read_state(Checkpoint& checkpoint, c10::IValue state, const std::string& where);
}  // namespace detail

/// Anything that saves and restores its state as data (a `c10::IValue` of
/// numbers, strings, tensors, lists and dicts): callbacks, a manager's tables,
/// a user's own counters.
class Stateful {
 public:
  virtual ~Stateful() = default;
  virtual c10::IValue state_dict() const = 0;
  /// Checks `state` without changing anything; throws `CheckpointError` starting
  /// with `where`. Called for every item of a checkpoint before any is loaded.
  virtual void check_state_dict(const c10::IValue& state, const std::string& where) const;
  virtual void load_state_dict(const c10::IValue& state) = 0;
};

/// Named items saved and loaded together. Copies share the items (not the values).
class Checkpoint {
 public:
  /// One named part of a checkpoint; see the `add` overloads.
  class Item;

  Checkpoint();
  ~Checkpoint();
  Checkpoint(const Checkpoint&);
  Checkpoint& operator=(const Checkpoint&);

  /// A module (a `shared_ptr` to a `torch::nn::Module` or a module holder): its
  /// parameters and buffers under their dotted names.
  template <typename M, typename = std::enable_if_t<std::is_base_of_v<torch::nn::Module, M>>>
  void add(const std::string& name, std::shared_ptr<M> module) {
    add_module(name, std::static_pointer_cast<torch::nn::Module>(std::move(module)));
  }
  template <typename Impl>
  void add(const std::string& name, const torch::nn::ModuleHolder<Impl>& module) {
    add(name, module.ptr());
  }
  /// An optimizer: its per-parameter state and every param group's options
  /// (lr, momentum, betas, weight_decay, ...), as Python's `state_dict()` has them.
  template <typename O, typename = std::enable_if_t<std::is_base_of_v<torch::optim::Optimizer, O>>, typename = void>
  void add(const std::string& name, std::shared_ptr<O> optimizer) {
    add_optimizer(name, std::static_pointer_cast<torch::optim::Optimizer>(std::move(optimizer)));
  }
  /// A module or an optimizer the caller holds (on the stack, or as a member). The
  /// checkpoint keeps a reference, not a copy: the object must outlive every `save`,
  /// `load` and `CheckpointManager::save` through this checkpoint (an async save has
  /// copied what it needs when `save` returns).
  template <typename M, std::enable_if_t<std::is_base_of_v<torch::nn::Module, M>, int> = 0>
  void add(const std::string& name, M& module) {
    add_module(name, std::shared_ptr<torch::nn::Module>(std::shared_ptr<void>(), &module));
  }
  template <typename O, std::enable_if_t<std::is_base_of_v<torch::optim::Optimizer, O>, int> = 0>
  void add(const std::string& name, O& optimizer) {
    add_optimizer(name, std::shared_ptr<torch::optim::Optimizer>(std::shared_ptr<void>(), &optimizer));
  }
  /// A torchfit sampler's order and position in its epoch (shared by its copies, such
  /// as the one a data loader holds), so a restored run continues the same epoch.
  void add(const std::string& name, const Sampler& sampler);
  /// Any other state.
  void add(const std::string& name, std::shared_ptr<Stateful> item);
  /// The state of torch's default CPU generator, and of each CUDA device's where present.
  void add_rng(const std::string& name = "rng");

  /// A plain value, saved with the rest: `int64_t` (and other integers), `double`,
  /// `bool`, `std::string` or `at::Tensor`. Adds the item or replaces its value.
  template <typename T>
  void set(const std::string& name, T value) {
    set_value(name, to_ivalue(std::move(value)));
  }
  /// A variable saved by reference: `int64_t` (and other integers), `double`, `bool`,
  /// `std::string` or `at::Tensor`. Each save reads it; a load writes the saved value
  /// back into it (a tensor variable is rebound to the loaded tensor). The variable
  /// must outlive the checkpoint's use, as objects added by reference. `set` writes
  /// into it and `get` reads it.
  template <typename T>
  void track(const std::string& name, T& variable) {
    static_assert(!std::is_const_v<T>, "Checkpoint::track needs a variable it can write back into");
    track_value(
        name, [&variable] { return to_ivalue(variable); },
        [&variable, name](const c10::IValue& value) { variable = detail::value_as<T>(name, value); });
  }

  /// A value set with `set` or restored by `load`. Throws `ValueError` naming the
  /// item when it is missing or holds another type.
  template <typename T>
  T get(const std::string& name) const;

  /// The values (set or tracked) that are numbers, by name, for a filepath template or
  /// a monitor; the names of the integral ones are added to `integers`.
  std::map<std::string, double> numeric_values(std::set<std::string>* integers = nullptr) const;

  /// Whether an item of this name was added or set.
  bool contains(const std::string& name) const;
  /// The item names, in the order they were added.
  std::vector<std::string> names() const;
  /// Removes an item; returns whether there was one.
  bool remove(const std::string& name);

  /// The whole state as data: a dict from item names to their state (tensors are
  /// the live ones, not copies), plus a "torchfit" entry describing the format.
  c10::IValue state_dict() const;
  /// Whether a tensor is one only optimizer steps change in place: a parameter of
  /// a module item, or part of an optimizer item's state. Async saves copy these
  /// late, or not at all when unchanged (see `SaveHints`).
  std::function<bool(const at::Tensor&)> updated_by_step() const;
  /// The modules' state dicts only: one module's flat state dict, or a dict from
  /// module names to state dicts when there are several (weights-only files).
  c10::IValue weights_state_dict() const;
  /// Loads every item from `state`, all or nothing: everything is checked first
  /// (names, shapes, dtypes, types), and nothing changes when anything is wrong.
  /// Throws `CheckpointError` starting with `where` (a path) and naming the
  /// missing, unexpected or mismatching items. A weights-only state dict loads
  /// into a checkpoint whose only item is one module.
  void load_state_dict(const c10::IValue& state, const std::string& where);

  /// Adds an item that `load_state_dict` restores only when the state has it.
  void add_optional(const std::string& name, std::shared_ptr<Stateful> item);

 private:
  friend void detail::load_read_state(Checkpoint&, c10::IValue, const std::string&);
  void load_state_dict(const c10::IValue& state, const std::string& where, bool take);
  void add_module(const std::string& name, std::shared_ptr<torch::nn::Module> module);
  void add_optimizer(const std::string& name, std::shared_ptr<torch::optim::Optimizer> optimizer);
  void add_item(const std::string& name, std::shared_ptr<Item> item);
  void set_value(const std::string& name, c10::IValue value);
  void track_value(const std::string& name, std::function<c10::IValue()> read,
                   std::function<void(const c10::IValue&)> write);
  c10::IValue value(const std::string& name) const;

  template <typename T>
  static c10::IValue to_ivalue(T value) {
    if constexpr (std::is_same_v<T, bool>) {
      return c10::IValue(value);
    } else if constexpr (std::is_integral_v<T>) {
      return c10::IValue(static_cast<int64_t>(value));
    } else if constexpr (std::is_floating_point_v<T>) {
      return c10::IValue(static_cast<double>(value));
    } else if constexpr (std::is_same_v<T, at::Tensor>) {
      return c10::IValue(std::move(value));
    } else {
      static_assert(std::is_convertible_v<T, std::string>,
                    "Checkpoint::set takes an integer, a floating-point number, a bool, a string or an at::Tensor");
      return c10::IValue(std::string(std::move(value)));
    }
  }

  std::vector<std::pair<std::string, std::shared_ptr<Item>>> items_;
};

namespace detail {
/// Throws `ValueError`: item `name` holds a value of another type.
[[noreturn]] void throw_wrong_type(const std::string& name, const c10::IValue& value);

/// `value` as a T (as `Checkpoint::get` returns it); throws `ValueError` naming `name`.
template <typename T>
T value_as(const std::string& name, const c10::IValue& v) {
  if constexpr (std::is_same_v<T, bool>) {
    if (v.isBool()) return v.toBool();
  } else if constexpr (std::is_integral_v<T>) {
    if (v.isInt()) return static_cast<T>(v.toInt());
  } else if constexpr (std::is_floating_point_v<T>) {
    if (v.isDouble() || v.isInt()) return static_cast<T>(v.isDouble() ? v.toDouble() : v.toInt());
  } else if constexpr (std::is_same_v<T, at::Tensor>) {
    if (v.isTensor()) return v.toTensor();
  } else {
    static_assert(std::is_same_v<T, std::string>,
                  "Checkpoint values are integers, floating-point numbers, bool, std::string or at::Tensor");
    if (v.isString()) return v.toStringRef();
  }
  throw_wrong_type(name, v);
}
}  // namespace detail

template <typename T>
T Checkpoint::get(const std::string& name) const {
  return detail::value_as<T>(name, value(name));
}

/// Writes `checkpoint` to `path` durably (temporary file, fsync, rename, directory
/// fsync) with a CRC32 of the whole file. Throws `CheckpointError`.
void save(const Checkpoint& checkpoint, const std::string& path, const SaveOptions& options = SaveOptions());
/// Reads `path` (verifying its checksum) into `checkpoint`, all or nothing.
/// Throws `CheckpointError` naming the path and the missing, extra or mismatching item.
/// Modules' and optimizers' tensors stay the objects they were; where each owns its
/// storage whole, it takes the memory the file was read into instead of a copy
/// (`load_state_dict` copies).
void load(Checkpoint& checkpoint, const std::string& path);

}  // namespace torchfit
