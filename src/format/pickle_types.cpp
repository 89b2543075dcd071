// What the picklers' values may be: type annotations, storage dtypes by class name, and
// the extent of a tensor view over its storage.
#include <cctype>
#include <functional>
#include <string>
#include <unordered_map>

#include <ATen/ATen.h>
#include <fmt/format.h>

#include "format/python_pickle.h"

namespace torchfit::detail {

c10::TypePtr parse_type_annotation(std::string_view annotation) {
  // type := name | name "[" type (", " type)* "]"
  std::function<c10::TypePtr(size_t&, int)> parse = [&](size_t& at, int depth) -> c10::TypePtr {
    if (depth > kMaxPickleDepth) return nullptr;
    const size_t start = at;
    while (at < annotation.size() && (std::isalnum(static_cast<unsigned char>(annotation[at])) != 0 || annotation[at] == '_')) {
      ++at;
    }
    const auto name = annotation.substr(start, at - start);
    static const std::unordered_map<std::string_view, c10::TypePtr> leaves{
        {"int", c10::IntType::get()},         {"float", c10::FloatType::get()},   {"bool", c10::BoolType::get()},
        {"str", c10::StringType::get()},      {"Tensor", c10::TensorType::get()}, {"NoneType", c10::NoneType::get()},
        {"Any", c10::AnyType::get()},         {"Device", c10::DeviceObjType::get()},
        {"complex", c10::ComplexType::get()}, {"number", c10::NumberType::get()}};
    if (at == annotation.size() || annotation[at] != '[') {
      auto leaf = leaves.find(name);
      return leaf == leaves.end() ? nullptr : leaf->second;
    }
    ++at;  // '['
    std::vector<c10::TypePtr> inner;
    while (true) {
      auto type = parse(at, depth + 1);
      if (!type) return nullptr;
      inner.push_back(std::move(type));
      if (at < annotation.size() && annotation[at] == ']') break;
      if (annotation.compare(at, 2, ", ") != 0) return nullptr;
      at += 2;
    }
    ++at;  // ']'
    if (name == "List" && inner.size() == 1) return c10::ListType::create(inner[0]);
    if (name == "Optional" && inner.size() == 1) return c10::OptionalType::create(inner[0]);
    if (name == "Tuple") return c10::TupleType::create(std::move(inner));
    if (name == "Dict" && inner.size() == 2) {
      switch (inner[0]->kind()) {  // the key types DictType::create accepts
        case c10::TypeKind::AnyType: case c10::TypeKind::IntType: case c10::TypeKind::BoolType:
        case c10::TypeKind::FloatType: case c10::TypeKind::ComplexType: case c10::TypeKind::StringType:
        case c10::TypeKind::TensorType: case c10::TypeKind::DeviceObjType:
          return c10::DictType::create(inner[0], inner[1]);
        default: return nullptr;
      }
    }
    return nullptr;
  };
  size_t at = 0;
  auto type = parse(at, 0);
  return at == annotation.size() ? type : nullptr;
}

at::ScalarType storage_dtype(const std::string& name) {
  static const std::unordered_map<std::string, at::ScalarType> types = {
      {"torch.FloatStorage", at::kFloat},     {"torch.DoubleStorage", at::kDouble},
      {"torch.HalfStorage", at::kHalf},       {"torch.BFloat16Storage", at::kBFloat16},
      {"torch.LongStorage", at::kLong},       {"torch.IntStorage", at::kInt},
      {"torch.ShortStorage", at::kShort},     {"torch.CharStorage", at::kChar},
      {"torch.ByteStorage", at::kByte},       {"torch.BoolStorage", at::kBool},
      {"torch.ComplexFloatStorage", at::kComplexFloat}, {"torch.ComplexDoubleStorage", at::kComplexDouble},
      {"torch.UntypedStorage", at::kByte},    {"torch.storage.UntypedStorage", at::kByte},
      {"torch.QInt8Storage", at::kQInt8},     {"torch.QUInt8Storage", at::kQUInt8},
      {"torch.QInt32Storage", at::kQInt32},   {"torch.QUInt4x2Storage", at::kQUInt4x2},
      {"torch.QUInt2x4Storage", at::kQUInt2x4},
  };
  auto it = types.find(name);
  if (it == types.end()) throw std::invalid_argument("unsupported storage type " + name);
  return it->second;
}

void check_tensor_extent(int64_t offset, c10::IntArrayRef sizes, c10::IntArrayRef strides, int64_t numel) {
  if (sizes.size() != strides.size()) {
    throw std::invalid_argument(fmt::format("a tensor has {} sizes but {} strides", sizes.size(), strides.size()));
  }
  if (offset < 0 || offset > numel) {
    throw std::invalid_argument(fmt::format("a tensor starts at element {} of a storage of {}", offset, numel));
  }
  // The last element's index must lie inside the storage (checked without overflow).
  bool empty = false;
  int64_t last = offset;
  for (size_t i = 0; i < sizes.size(); ++i) {
    int64_t step = 0;
    if (sizes[i] < 0 || strides[i] < 0) throw std::invalid_argument("a tensor has negative sizes or strides");
    empty = empty || sizes[i] == 0;
    if (sizes[i] > 0 && (__builtin_mul_overflow(sizes[i] - 1, strides[i], &step) ||
                         __builtin_add_overflow(last, step, &last))) {
      throw std::invalid_argument("a tensor's extent overflows");
    }
  }
  if (!empty && last >= numel) {
    throw std::invalid_argument(fmt::format("a tensor reaches element {} of a storage of {}", last, numel));
  }
}

}  // namespace torchfit::detail
