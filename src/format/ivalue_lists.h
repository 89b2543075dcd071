#pragma once
// Lists as they come back from a pickle: typed (List[int]) in files up to torchfit 0.2, whose
// pickles LibTorch tagged, untyped (List[Any]) since, as Python writes them. Both read the same.

#include <optional>
#include <vector>

#include <ATen/core/ivalue.h>

namespace torchfit::detail {

/// The list's items as T; nullopt when `value` is not a list or an item fails `is_t`.
template <typename T>
std::optional<std::vector<T>> vector_of(const c10::IValue& value, bool (c10::IValue::*is_t)() const) {
  if (!value.isList()) return std::nullopt;
  std::vector<T> out;
  for (const auto& item : value.toListRef()) {
    if (!(item.*is_t)()) return std::nullopt;
    out.push_back(item.to<T>());
  }
  return out;
}

inline std::optional<std::vector<int64_t>> int_vector(const c10::IValue& value) {
  return vector_of<int64_t>(value, &c10::IValue::isInt);
}
inline std::optional<std::vector<double>> double_vector(const c10::IValue& value) {
  return vector_of<double>(value, &c10::IValue::isDouble);
}

}  // namespace torchfit::detail
