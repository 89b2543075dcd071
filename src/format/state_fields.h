#pragma once
// Reading a saved state dict field by field in `check_state_dict`, with one error text for a
// state that is not a dict or a field that is missing or of another type.

#include <functional>
#include <optional>
#include <string>
#include <utility>

#include <ATen/core/ivalue.h>
#include <fmt/format.h>

#include "torchfit/error.h"

namespace torchfit::detail {

/// The fields of a saved state. Errors read "<where>: <what>: <problem>", as
/// "ckpt/a.pt [sampler]: the saved sampler: field 'index' is missing or not an int".
class StateFields {
 public:
  /// Throws `CheckpointError` unless `state` is a dict.
  StateFields(const c10::IValue& state, std::string where, std::string what)
      : where_(std::move(where)), what_(std::move(what)) {
    if (!state.isGenericDict()) fail(fmt::format("is a {}, not a dict", state.tagKind()));
    dict_ = state.toGenericDict();
  }

  [[noreturn]] void fail(const std::string& problem) const {
    throw CheckpointError(fmt::format("{}: {}: {}", where_, what_, problem));
  }
  bool has(const char* key) const { return dict_.contains(key); }
  const c10::impl::GenericDict& dict() const { return dict_; }

  int64_t integer(const char* key) const { return field(key, &c10::IValue::isInt, "an int").toInt(); }
  bool boolean(const char* key) const { return field(key, &c10::IValue::isBool, "a bool").toBool(); }
  std::string string(const char* key) const { return field(key, &c10::IValue::isString, "a string").toStringRef(); }
  at::Tensor tensor(const char* key) const { return field(key, &c10::IValue::isTensor, "a tensor").toTensor(); }
  c10::IValue list(const char* key) const { return field(key, &c10::IValue::isList, "a list"); }
  c10::IValue dict(const char* key) const { return field(key, &c10::IValue::isGenericDict, "a dict"); }
  double number(const char* key) const { return field(key, &c10::IValue::isDouble, "a float").toDouble(); }
  /// A float or None.
  std::optional<double> optional_number(const char* key) const {
    auto value = field(key, [](const c10::IValue& v) { return v.isNone() || v.isDouble(); }, "a float or None");
    return value.isNone() ? std::nullopt : std::optional<double>(value.toDouble());
  }

 private:
  template <typename Is>
  c10::IValue field(const char* key, Is is, const char* type) const {
    auto it = dict_.find(key);
    if (it == dict_.end() || !std::invoke(is, it->value())) fail(fmt::format("field '{}' is missing or not {}", key, type));
    return it->value();
  }

  std::string where_, what_;
  c10::impl::GenericDict dict_{c10::StringType::get(), c10::AnyType::get()};
};

}  // namespace torchfit::detail
