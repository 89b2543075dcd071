#pragma once
// Lists as they come back from a pickle: typed (List[int]) in files up to torchfit 0.2, whose
// pickles LibTorch tagged, untyped (List[Any]) since, as Python writes them. Both read the same.

#include <optional>
#include <vector>

#include <ATen/core/ivalue.h>

namespace torchfit::detail {

/// The list's ints; nullopt when `value` is not a list of ints.
inline std::optional<std::vector<int64_t>> int_vector(const c10::IValue& value) {
  if (!value.isList()) return std::nullopt;
  std::vector<int64_t> out;
  for (const auto& item : value.toListRef()) {
    if (!item.isInt()) return std::nullopt;
    out.push_back(item.toInt());
  }
  return out;
}

/// The list's numbers as doubles; nullopt when `value` is not a list of floats.
inline std::optional<std::vector<double>> double_vector(const c10::IValue& value) {
  if (!value.isList()) return std::nullopt;
  std::vector<double> out;
  for (const auto& item : value.toListRef()) {
    if (!item.isDouble()) return std::nullopt;
    out.push_back(item.toDouble());
  }
  return out;
}

}  // namespace torchfit::detail
