#include "format/libtorch_pickle.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <unordered_map>

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/ops/_empty_affine_quantized.h>
#include <ATen/ops/_empty_per_channel_affine_quantized.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/variable.h>

#include "format/python_pickle.h"

namespace torchfit::detail {
namespace {

/// The text from `position` to the next newline (a GLOBAL's module or name), moving past it.
std::optional<std::string_view> line_at(std::string_view data, size_t& position) {
  auto end = data.find('\n', position);
  if (end == std::string_view::npos) return std::nullopt;
  auto text = data.substr(position, end - position);
  position = end + 1;
  return text;
}

/// The `T` at `position` (pickle integers are little-endian, as is x86/ARM), moving past it;
/// false when the data ends first.
template <typename T>
bool read_at(std::string_view data, size_t& position, T& value) {
  if (data.size() - position < sizeof(T)) return false;
  std::memcpy(&value, data.data() + position, sizeof(T));
  position += sizeof(T);
  return true;
}

/// How deep a value's containers nest, and whether it may still be filled (an
/// EMPTY_LIST or EMPTY_DICT not yet shared through the memo or a call).
struct Nesting {
  int depth = 0;
  bool open = false;
};

/// The few globals LibTorch's Pickler writes outside containers.
enum class Callable : uint8_t {
  None, RebuildTensor, RebuildQTensor, OrderedDict, RestoreTypeTag, IntList, TensorList, DoubleList, BoolList,
  Device, Complex
};

/// A stack or memo entry: a value, or a global to call with REDUCE. A storage
/// class ("torch.FloatStorage") is its ScalarType as an int, as in LibTorch.
struct Item {
  c10::IValue value;
  Callable callable = Callable::None;
  Nesting nesting;
};

/// Reads a pickle, keeping for every value on its stack how deep its containers
/// nest and whether it may still be filled. A checksum is easily forged: a crafted
/// file must not make the reader, or what walks its value later, recurse without
/// bound or around a cycle.
class Reader {
 public:
  explicit Reader(std::string_view pickle) : data_(pickle) {}

  LibTorchPickle run() {
    uint8_t protocol = 0;
    if (!byte() || data_[0] != '\x80' || !read(protocol) || protocol != 2) {
      throw fail("the pickle is not of protocol 2, as LibTorch's Pickler writes");
    }
    while (position_ < data_.size()) {
      at_ = position_;
      const char op = data_[position_++];
      if (op == '.') {  // STOP
        if (stack_.size() != 1 || stack_[0].callable != Callable::None || !marks_.empty()) {
          throw fail(fmt::format("the pickle stops with {} values", stack_.size()));
        }
        LibTorchPickle out;
        out.value = std::move(stack_[0].value);
        out.storages = std::move(storages_);
        return out;
      }
      if (!step(op)) {
        throw fail(fmt::format("the pickle is not as LibTorch's Pickler writes it: opcode 0x{:02x}",
                               static_cast<unsigned>(static_cast<unsigned char>(op))));
      }
    }
    throw fail("the pickle ends without STOP");
  }

 private:
  std::invalid_argument fail(const std::string& what) const {
    return std::invalid_argument(fmt::format("{} (data.pkl byte {})", what, at_));
  }
  static constexpr Nesting kScalar{0, false};
  static constexpr Nesting kContainer{1, true};
  /// A tuple around values nested `deepest` deep.
  Nesting tuple_around(int deepest) const { return checked({deepest + 1, false}); }
  /// What a REDUCE makes of arguments nested `deepest` deep: no deeper, as every
  /// global LibTorch reads makes a tensor, a scalar or one of its arguments.
  static Nesting call_result(int deepest) { return {deepest, false}; }
  /// APPENDS or SETITEMS (`name`) put values nested `deepest` deep into `target`.
  void fill(Nesting& target, int deepest, const char* name) const {
    // LibTorch's Pickler shares a value only once it is complete: a change after
    // that could put a value inside itself.
    if (!target.open) throw fail(fmt::format("the pickle changes a list or dict after sharing it ({})", name));
    target.depth = checked({std::max(target.depth, deepest + 1), true}).depth;
  }
  Nesting checked(Nesting nesting) const {
    // One level more for the argument tuple of a call around a value of full depth.
    if (nesting.depth > kMaxPickleDepth + 1) {
      throw fail(fmt::format("containers nest deeper than {} levels", kMaxPickleDepth));
    }
    return nesting;
  }

  bool step(char op) {
    switch (op) {
      case '(': marks_.push_back(stack_.size()); return true;                              // MARK
      // EMPTY_DICT and EMPTY_LIST, filled by SETITEMS and APPENDS
      case '}': return push(c10::impl::GenericDict(c10::AnyType::get(), c10::AnyType::get()), kContainer);
      case ']': return push(c10::impl::GenericList(c10::AnyType::get()), kContainer);
      case ')': return empty_tuple();                                                      // EMPTY_TUPLE
      case 't': return tuple_from_mark();                                                  // TUPLE
      case '\x85': return tuple_of_last(1);                                                // TUPLE1
      case '\x86': return tuple_of_last(2);                                                // TUPLE2
      case '\x87': return tuple_of_last(3);                                                // TUPLE3
      case 'u': return set_items();                                                        // SETITEMS
      case 'e': return append_items();                                                     // APPENDS
      case 'N': return push(c10::IValue());                                                // NONE
      case '\x88': return push(true);                                                      // NEWTRUE
      case '\x89': return push(false);                                                     // NEWFALSE
      case 'K': return push_int<uint8_t>();                                                // BININT1
      case 'M': return push_int<uint16_t>();                                               // BININT2
      case 'J': return push_int<int32_t>();                                                // BININT
      case '\x8a': {                                                                       // LONG1, 8 bytes
        uint8_t length = 0;
        return read(length) && length == 8 && push_int<int64_t>();
      }
      case 'G': {  // BINFLOAT, big-endian
        uint64_t bits = 0;
        if (!read(bits)) return false;
        bits = __builtin_bswap64(bits);
        double value = 0;
        std::memcpy(&value, &bits, sizeof value);
        return push(value);
      }
      case 'X': {  // BINUNICODE
        uint32_t length = 0;
        if (!read(length) || data_.size() - position_ < length) return false;
        push(std::string(data_.substr(position_, length)));
        position_ += length;
        return true;
      }
      case 'q': return memo_put<uint8_t>();   // BINPUT
      case 'r': return memo_put<uint32_t>();  // LONG_BINPUT
      case 'h': return memo_get<uint8_t>();   // BINGET
      case 'j': return memo_get<uint32_t>();  // LONG_BINGET
      case 'c': return global();
      case 'Q': {  // BINPERSID
        auto id = pop_value();
        return id && id->isTuple() && persistent_id(id->toTupleRef().elements().asArrayRef());
      }
      case 'R': {  // REDUCE
        const int depth = stack_.empty() ? 0 : stack_.back().nesting.depth;
        auto args = pop_value();
        return args && args->isTuple() &&
               call(args->toTupleRef().elements().asArrayRef(), call_result(std::max(0, depth - 1)));
      }
      default: return false;
    }
  }

  bool byte() { return position_ < data_.size() && (++position_, true); }
  template <typename T>
  bool read(T& value) { return read_at(data_, position_, value); }
  template <typename T>
  bool push_int() {
    T value{};
    return read(value) && push(static_cast<int64_t>(value));
  }
  bool push(c10::IValue value, Nesting nesting = kScalar) {
    stack_.push_back({std::move(value), Callable::None, nesting});
    return true;
  }
  bool push_callable(Callable callable) {
    stack_.push_back({c10::IValue(), callable, kScalar});
    return true;
  }
  /// The top value, popped; nullopt when the stack is empty or holds a callable there.
  std::optional<c10::IValue> pop_value() {
    if (stack_.empty() || stack_.back().callable != Callable::None) return std::nullopt;
    auto value = std::move(stack_.back().value);
    stack_.pop_back();
    return value;
  }
  /// The stack index of the last MARK, popped.
  std::optional<size_t> pop_mark() {
    if (marks_.empty() || marks_.back() > stack_.size()) return std::nullopt;
    size_t mark = marks_.back();
    marks_.pop_back();
    return mark;
  }
  bool values_from(size_t first) const {
    for (size_t i = first; i < stack_.size(); ++i) {
      if (stack_[i].callable != Callable::None) return false;
    }
    return true;
  }
  /// How deep the deepest value from stack index `first` on nests.
  int deepest_from(size_t first) const {
    int depth = 0;
    for (size_t i = first; i < stack_.size(); ++i) depth = std::max(depth, stack_[i].nesting.depth);
    return depth;
  }

  bool tuple_of(size_t first) {
    if (!values_from(first)) return false;
    const Nesting nesting = tuple_around(deepest_from(first));
    auto take = [&](size_t i) { return std::move(stack_[first + i].value); };
    c10::intrusive_ptr<c10::ivalue::Tuple> tuple;
    switch (stack_.size() - first) {  // up to 3 elements are stored inline: no vector
      case 1: tuple = c10::ivalue::Tuple::create(take(0)); break;
      case 2: tuple = c10::ivalue::Tuple::create(take(0), take(1)); break;
      case 3: tuple = c10::ivalue::Tuple::create(take(0), take(1), take(2)); break;
      default: break;
    }
    if (tuple) {
      stack_.resize(first);
      return push(std::move(tuple), nesting);
    }
    std::vector<c10::IValue> elements;
    elements.reserve(stack_.size() - first);
    for (size_t i = first; i < stack_.size(); ++i) elements.push_back(std::move(stack_[i].value));
    stack_.resize(first);
    return push(c10::ivalue::Tuple::create(std::move(elements)), nesting);
  }
  bool tuple_from_mark() {
    auto mark = pop_mark();
    if (!mark) return false;
    // The Pickler follows the tuples of a storage id and of a tensor's rebuild
    // arguments with BINPERSID and REDUCE: those take the items off the stack
    // without a tuple in between.
    const char next = position_ < data_.size() ? data_[position_] : '\0';
    if ((next == 'Q' || next == 'R') && values_from(*mark)) {
      ++position_;
      const int deepest = deepest_from(*mark);
      arguments_.clear();
      for (size_t i = *mark; i < stack_.size(); ++i) arguments_.push_back(std::move(stack_[i].value));
      stack_.resize(*mark);
      return next == 'Q' ? persistent_id(arguments_) : call(arguments_, call_result(deepest));
    }
    return tuple_of(*mark);
  }
  bool empty_tuple() {
    // OrderedDict() of every tensor's backward hooks: REDUCE follows, with no arguments.
    if (position_ < data_.size() && data_[position_] == 'R') {
      ++position_;
      return call({}, call_result(0));
    }
    return push(c10::ivalue::Tuple::create({}), tuple_around(0));
  }
  bool tuple_of_last(size_t n) { return stack_.size() >= n && tuple_of(stack_.size() - n); }

  bool set_items() {
    auto mark = pop_mark();
    if (!mark || *mark == 0 || (stack_.size() - *mark) % 2 != 0 || !values_from(*mark)) return false;
    auto& target = stack_[*mark - 1];
    if (target.callable != Callable::None || !target.value.isGenericDict()) return false;
    auto dict = target.value.toGenericDict();
    for (size_t i = *mark; i < stack_.size(); i += 2) {
      if (!dict_key(stack_[i].value)) return false;
    }
    fill(target.nesting, deepest_from(*mark), "SETITEMS");
    for (size_t i = *mark; i < stack_.size(); i += 2) {
      dict.insert_or_assign(std::move(stack_[i].value), std::move(stack_[i + 1].value));
    }
    stack_.resize(*mark);
    return true;
  }
  /// The keys LibTorch's dicts may have.
  static bool dict_key(const c10::IValue& key) {
    return key.isString() || key.isInt() || key.isDouble() || key.isBool() || key.isTensor();
  }
  bool append_items() {
    auto mark = pop_mark();
    if (!mark || *mark == 0 || !values_from(*mark)) return false;
    auto& target = stack_[*mark - 1];
    if (target.callable != Callable::None || !target.value.isList()) return false;
    fill(target.nesting, deepest_from(*mark), "APPENDS");
    auto list = target.value.toList();
    for (size_t i = *mark; i < stack_.size(); ++i) list.push_back(std::move(stack_[i].value));
    stack_.resize(*mark);
    return true;
  }

  template <typename T>
  bool memo_put() {
    T id{};
    // LibTorch numbers memo entries from 0 up, one at a time.
    if (!read(id) || stack_.empty() || id > memo_.size()) return false;
    if (id >= memo_.size()) memo_.resize(static_cast<size_t>(id) + 1);
    stack_.back().nesting.open = false;  // shared from now on
    memo_[id] = stack_.back();
    return true;
  }
  template <typename T>
  bool memo_get() {
    T id{};
    if (!read(id) || id >= memo_.size()) return false;
    stack_.push_back(memo_[id]);
    return true;
  }

  std::optional<std::string_view> line() { return line_at(data_, position_); }
  bool global() {
    auto module = line();
    auto name = module ? line() : std::nullopt;
    if (!name) return false;
    if (*module == "torch._utils" && *name == "_rebuild_tensor_v2") return push_callable(Callable::RebuildTensor);
    if (*module == "torch._utils" && *name == "_rebuild_qtensor") return push_callable(Callable::RebuildQTensor);
    if (*module == "collections" && *name == "OrderedDict") return push_callable(Callable::OrderedDict);
    if (*module == "builtins" && *name == "complex") return push_callable(Callable::Complex);
    if (*module == "torch" && *name == "device") return push_callable(Callable::Device);
    if (*module == "torch.jit._pickle") {
      static const std::pair<std::string_view, Callable> builders[] = {
          {"restore_type_tag", Callable::RestoreTypeTag}, {"build_intlist", Callable::IntList},
          {"build_tensorlist", Callable::TensorList},     {"build_doublelist", Callable::DoubleList},
          {"build_boollist", Callable::BoolList}};
      for (const auto& [builder, callable] : builders) {
        if (*name == builder) return push_callable(callable);
      }
    }
    if (*module == "torch") {  // a storage class or a quantization scheme, as its enum's int
      if (*name == "per_tensor_affine") return push(static_cast<int64_t>(at::kPerTensorAffine));
      if (*name == "per_channel_affine") return push(static_cast<int64_t>(at::kPerChannelAffine));
      try {
        return push(static_cast<int64_t>(storage_dtype("torch." + std::string(*name))));
      } catch (const std::invalid_argument&) {
      }
    }
    throw fail(fmt::format("the pickle calls {}.{}, which torchfit does not read", *module, *name));
  }

  /// ('storage', dtype, key, location, numel): a 1-d tensor over a storage whose
  /// bytes are bound later. The location is ignored: everything is read to the CPU.
  bool persistent_id(c10::ArrayRef<c10::IValue> items) {
    if (items.size() != 5 || !items[0].isString() || items[0].toStringRef() != "storage" || !items[1].isInt() ||
        !items[2].isString() || !items[3].isString() || !items[4].isInt()) {
      return false;
    }
    const int64_t type = items[1].toInt(), numel = items[4].toInt();
    if (type < 0 || type >= static_cast<int64_t>(at::ScalarType::NumOptions) || numel < 0) return false;
    const auto dtype = static_cast<at::ScalarType>(type);
    int64_t nbytes = 0;
    if (__builtin_mul_overflow(numel, static_cast<int64_t>(c10::elementSize(dtype)), &nbytes)) return false;
    c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<size_t>(nbytes), at::DataPtr(),
                         /*allocator=*/nullptr, /*resizable=*/false);
    storages_.push_back({storage, items[2].toStringRef()});
    auto tensor = make_tensor(std::move(storage), dtype, 0, {numel}, {1});
    return push(std::move(tensor));
  }

  static at::Tensor make_tensor(c10::Storage storage, at::ScalarType dtype, int64_t offset, c10::IntArrayRef sizes,
                                c10::IntArrayRef strides) {
    auto tensor = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                           c10::scalarTypeToTypeMeta(dtype));
    tensor.unsafeGetTensorImpl()->set_storage_offset(offset);
    tensor.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides);
    return tensor;
  }

  static bool int_tuple(const c10::IValue& value, std::vector<int64_t>& out) {
    if (!value.isTuple()) return false;
    const auto items = value.toTupleRef().elements().asArrayRef();
    if (items.size() > kMaxTensorDims) return false;
    out.clear();
    for (const auto& item : items) {
      if (!item.isInt()) return false;
      out.push_back(item.toInt());
    }
    return true;
  }

  /// Calls the callable on the stack with `items`; what it makes nests as `result`.
  bool call(c10::ArrayRef<c10::IValue> items, Nesting result) {
    if (stack_.empty()) return false;
    const Callable callable = stack_.back().callable;
    stack_.pop_back();
    switch (callable) {
      case Callable::OrderedDict:  // only ever the empty backward hooks, which LibTorch reads as None
        return items.empty() && push(c10::IValue());
      case Callable::RestoreTypeTag:
        return items.size() == 2 && items[1].isString() && restore_type(items[0], items[1].toStringRef()) &&
               push(items[0], result);
      case Callable::RebuildTensor:
        return rebuild_tensor(items);
      case Callable::RebuildQTensor:
        return rebuild_qtensor(items);
      case Callable::Device:  // c10::Device refuses a bad name
        return items.size() == 1 && items[0].isString() && push(c10::Device(items[0].toStringRef()));
      case Callable::Complex:
        return items.size() == 2 && items[0].isDouble() && items[1].isDouble() &&
               push(c10::complex<double>(items[0].toDouble(), items[1].toDouble()));
      case Callable::IntList:
        return typed_list(items, c10::IntType::get(), result);
      case Callable::TensorList:
        return typed_list(items, c10::TensorType::get(), result);
      case Callable::DoubleList:
        return typed_list(items, c10::FloatType::get(), result);
      case Callable::BoolList:
        return typed_list(items, c10::BoolType::get(), result);
      case Callable::None:
        return false;
    }
    return false;
  }

  /// build_intlist(list) and the like: the list, with its element type set.
  bool typed_list(c10::ArrayRef<c10::IValue> items, const c10::TypePtr& type, Nesting result) {
    if (items.size() != 1 || !items[0].isList()) return false;
    items[0].toList().unsafeSetElementType(type);
    return push(items[0], result);
  }

  /// (storage tensor, offset, sizes, strides, requires_grad, backward hooks)
  bool rebuild_tensor(c10::ArrayRef<c10::IValue> items) {
    const at::Tensor* base = items.size() == 6 && items[4].isBool() ? storage_and_layout(items, false) : nullptr;
    if (base == nullptr) return false;
    auto tensor = make_tensor(base->storage(), base->scalar_type(), items[1].toInt(), sizes_, strides_);
    return push(torch::autograd::make_variable(std::move(tensor), items[4].toBool()));
  }

  /// The (storage tensor, offset, sizes, strides) both rebuilds start with: the
  /// storage tensor, with sizes_ and strides_ read and checked against it; nullptr
  /// when they are malformed or the storage's dtype is (not) quantized as `quantized`.
  const at::Tensor* storage_and_layout(c10::ArrayRef<c10::IValue> items, bool quantized) {
    if (items.size() < 4 || !items[0].isTensor() || !items[1].isInt() || !int_tuple(items[2], sizes_) ||
        !int_tuple(items[3], strides_)) {
      return nullptr;
    }
    const auto& base = items[0].toTensor();
    if (c10::isQIntType(base.scalar_type()) != quantized) return nullptr;  // qint storages: _rebuild_qtensor only
    check_tensor_extent(items[1].toInt(), sizes_, strides_, base.numel());
    return &base;
  }

  /// (storage tensor, offset, sizes, strides, quantization, requires_grad, backward hooks),
  /// the quantization being (per_tensor_affine, scale, zero point) or
  /// (per_channel_affine, scales, zero points, axis).
  bool rebuild_qtensor(c10::ArrayRef<c10::IValue> items) {
    const bool shaped = items.size() == 7 && items[4].isTuple() && items[5].isBool();
    const at::Tensor* base = shaped ? storage_and_layout(items, true) : nullptr;
    if (base == nullptr) return false;
    const auto quantization = items[4].toTupleRef().elements().asArrayRef();
    if (quantization.empty() || !quantization[0].isInt()) return false;
    const auto options = at::TensorOptions().dtype(base->scalar_type());
    at::Tensor tensor;
    const int64_t scheme = quantization[0].toInt();
    if (scheme == static_cast<int64_t>(at::kPerTensorAffine) && quantization.size() == 3 &&
        quantization[1].isDouble() && quantization[2].isInt()) {
      tensor = at::_empty_affine_quantized({0}, options, quantization[1].toDouble(), quantization[2].toInt());
    } else if (scheme == static_cast<int64_t>(at::kPerChannelAffine) && quantization.size() == 4 &&
               quantization[1].isTensor() && quantization[2].isTensor() && quantization[3].isInt()) {
      const auto& scales = quantization[1].toTensor();
      const auto& zero_points = quantization[2].toTensor();
      const int64_t axis = quantization[3].toInt();
      // As LibTorch's Pickler writes them: one of each per index along the axis, in
      // the types the quantizer keeps, so it keeps them without reading their bytes
      // (which are bound only once the file's checksum matched).
      auto fits = [&](const at::Tensor& t, at::ScalarType type) {
        return t.scalar_type() == type && t.dim() == 1 && t.is_contiguous() && t.numel() == sizes_[axis];
      };
      if (axis < 0 || axis >= static_cast<int64_t>(sizes_.size()) || !fits(scales, at::kDouble) ||
          !fits(zero_points, at::kLong)) {
        return false;
      }
      tensor = at::_empty_per_channel_affine_quantized({0}, scales, zero_points, axis, options);
    } else {
      return false;
    }
    auto* impl = tensor.unsafeGetTensorImpl();
    impl->set_storage_keep_dtype(base->storage());
    impl->set_storage_offset(items[1].toInt());
    impl->set_sizes_and_strides(sizes_, strides_);
    return push(torch::autograd::make_variable(std::move(tensor), items[5].toBool()));
  }

  /// Sets the container's element types, as LibTorch's restore_type_tag does.
  bool restore_type(const c10::IValue& container, const std::string& annotation) {
    auto& type = types_[annotation];
    if (!type) type = parse_type_annotation(annotation);
    if (!type) return false;
    if (type->kind() == c10::DictType::Kind && container.isGenericDict()) {
      auto dict = container.toGenericDict();
      dict.unsafeSetKeyType(type->containedType(0));
      dict.unsafeSetValueType(type->containedType(1));
      return true;
    }
    if (type->kind() == c10::ListType::Kind && container.isList()) {
      container.toList().unsafeSetElementType(type->containedType(0));
      return true;
    }
    return false;
  }

  std::string_view data_;
  size_t position_ = 0;
  size_t at_ = 0;  // where the current opcode starts
  std::vector<Item> stack_;
  std::vector<size_t> marks_;
  std::vector<Item> memo_;
  std::vector<UnboundStorage> storages_;
  std::unordered_map<std::string, c10::TypePtr> types_;
  std::vector<int64_t> sizes_, strides_;
  std::vector<c10::IValue> arguments_;  // of the BINPERSID or REDUCE after a tuple
};

/// Walks a pickle of LibTorch's Pickler that is a flat dict of names to tensors, opcode by
/// opcode in the order the Pickler writes them. Only what such a pickle needs is kept: the
/// memo's strings and globals. Any other opcode, order or value ends the walk.
class TensorDictIndexer {
 public:
  explicit TensorDictIndexer(std::string_view pickle) : data_(pickle) {}

  std::optional<TensorDictIndex> run() {
    if (data_.size() > UINT32_MAX || !next('\x80') || !next('\x02') || !next('}')) return std::nullopt;
    memo_.reserve(data_.size() / 16);  // a BINPUT follows a value of at least 14 bytes, on average
    TensorDictIndex out;
    // A tensor takes 40 bytes and more of the pickle (LibTorch's Pickler memoizes the globals
    // and strings each repeats): the vectors do not grow (for 2000 tensors, eleven reallocations).
    out.tensors.reserve(data_.size() / 40);
    out.sizes.reserve(data_.size() / 40);
    if (next('(')) {  // an empty dict has no MARK and no SETITEMS
      while (!next('u')) {
        auto name = string();
        if (!name || !tensor(out)) return std::nullopt;
        out.tensors.back().name = *name;
      }
    }
    // The dict is memoized once complete.
    if (!put() || !next('.') || position_ != data_.size()) return std::nullopt;
    return out;
  }

 private:
  enum class Kind : uint8_t { Other, String, RebuildTensor, OrderedDict, Storage };
  struct Memo {  // 12 bytes: a weights file memoizes three values per tensor
    Kind kind = Kind::Other;
    at::ScalarType dtype = at::kFloat;  // a Storage class's
    uint32_t offset = 0, length = 0;    // a String's text in the pickle
  };

  bool next(char op) {
    if (position_ >= data_.size() || data_[position_] != op) return false;
    ++position_;
    return true;
  }
  template <typename T>
  bool read(T& value) { return read_at(data_, position_, value); }
  /// The BINPUT the Pickler may write after a value, keeping a Memo of these fields under the next
  /// id. (Fields, not a Memo: one built on the stack and reloaded whole stalled store forwarding.)
  bool put(Kind kind = Kind::Other, at::ScalarType dtype = at::kFloat, uint32_t offset = 0, uint32_t length = 0) {
    uint32_t id = 0;
    if (next('q')) {
      uint8_t small = 0;
      if (!read(small)) return false;
      id = small;
    } else if (!next('r')) {
      return true;
    } else if (!read(id)) {
      return false;
    }
    if (id != memo_.size()) return false;  // numbered from 0 up, one at a time
    memo_.push_back({kind, dtype, offset, length});
    return true;
  }
  /// A BINGET's memo entry; nullptr when there is none.
  const Memo* get() {
    uint32_t id = 0;
    if (next('h')) {
      uint8_t small = 0;
      if (!read(small)) return nullptr;
      id = small;
    } else if (!next('j') || !read(id)) {
      return nullptr;
    }
    return id < memo_.size() ? &memo_[id] : nullptr;
  }
  std::optional<std::string_view> string() {
    if (next('X')) {
      uint32_t length = 0;
      if (!read(length) || data_.size() - position_ < length) return std::nullopt;
      const auto text = data_.substr(position_, length);
      position_ += length;
      if (!put(Kind::String, at::kFloat, static_cast<uint32_t>(position_ - length), length)) return std::nullopt;
      return text;
    }
    const Memo* memo = get();
    if (memo == nullptr || memo->kind != Kind::String) return std::nullopt;
    return data_.substr(memo->offset, memo->length);
  }
  std::optional<std::string_view> line() { return line_at(data_, position_); }
  /// A GLOBAL, or a BINGET of one, that is of `kind`; a Storage's dtype goes to `dtype`. (Not an
  /// optional Memo: its byte stores and wide reload stalled forwarding, a sixth of the walk.)
  bool global(Kind kind, at::ScalarType* dtype = nullptr) {
    Memo memo;
    if (next('c')) {
      auto module = line();
      auto name = module ? line() : std::nullopt;
      if (!name) return false;
      if (*module == "torch._utils" && *name == "_rebuild_tensor_v2") {
        memo.kind = Kind::RebuildTensor;
      } else if (*module == "collections" && *name == "OrderedDict") {
        memo.kind = Kind::OrderedDict;
      } else if (*module == "torch") {
        try {
          memo.dtype = storage_dtype("torch." + std::string(*name));
          if (!c10::isQIntType(memo.dtype)) memo.kind = Kind::Storage;
        } catch (const std::invalid_argument&) {
        }
      }
      if (!put(memo.kind, memo.dtype)) return false;
    } else if (const Memo* got = get()) {
      memo = *got;
    } else {
      return false;
    }
    if (dtype != nullptr) *dtype = memo.dtype;
    return memo.kind == kind;
  }
  bool integer(int64_t& value) {
    if (next('K')) return read_as<uint8_t>(value);
    if (next('M')) return read_as<uint16_t>(value);
    if (next('J')) return read_as<int32_t>(value);
    uint8_t length = 0;
    return next('\x8a') && read(length) && length == 8 && read_as<int64_t>(value);
  }
  template <typename T>
  bool read_as(int64_t& value) {
    T raw{};
    if (!read(raw)) return false;
    value = static_cast<int64_t>(raw);
    return true;
  }
  /// A tuple of ints, appended to `out`.
  bool int_tuple(std::vector<int64_t>& out) {
    if (next(')')) return put();
    if (!next('(')) return false;
    for (size_t count = 0; !next('t'); ++count) {
      int64_t value = 0;
      if (count == kMaxTensorDims || !integer(value)) return false;
      out.push_back(value);
    }
    return put();
  }

  /// _rebuild_tensor_v2(storage, 0, sizes, contiguous strides, requires_grad, OrderedDict()),
  /// its storage a new persistent id of as many elements as the tensor.
  bool tensor(TensorDictIndex& index) {
    if (!global(Kind::RebuildTensor) || !next('(') || !next('(')) return false;
    auto tag = string();
    at::ScalarType dtype = at::kFloat;
    auto key = tag && *tag == "storage" && global(Kind::Storage, &dtype) ? string() : std::nullopt;
    auto location = key ? string() : std::nullopt;
    int64_t storage_numel = 0, offset = 0;
    if (!location || !integer(storage_numel) || !next('t') || !next('Q') || !put()) return false;
    auto& out = index.tensors.emplace_back();
    out.first_size = index.sizes.size();
    strides_.clear();
    if (!integer(offset) || offset != 0 || !int_tuple(index.sizes) || !int_tuple(strides_)) return false;
    out.dims = static_cast<uint8_t>(index.sizes.size() - out.first_size);
    const auto sizes = index.sizes_of(out);
    if ((!next('\x88') && !next('\x89')) || !global(Kind::OrderedDict) || !next(')') || !next('R') || !put()) {
      return false;
    }
    if (!next('t') || !next('R') || !put()) return false;
    // Whole and contiguous: strides as the sizes make them (any for a dimension of size 1).
    if (strides_.size() != sizes.size()) return false;
    int64_t numel = 1;
    for (size_t i = sizes.size(); i-- > 0;) {
      if (sizes[i] < 0 || (sizes[i] != 1 && strides_[i] != numel)) return false;
      if (__builtin_mul_overflow(numel, sizes[i], &numel)) return false;
    }
    int64_t nbytes = 0;
    if (numel != storage_numel ||
        __builtin_mul_overflow(numel, static_cast<int64_t>(c10::elementSize(dtype)), &nbytes)) {
      return false;
    }
    out.key = *key;
    out.dtype = dtype;
    out.numel = numel;
    return true;
  }

  std::string_view data_;
  size_t position_ = 0;
  std::vector<Memo> memo_;
  std::vector<int64_t> strides_;
};

}  // namespace

std::optional<TensorDictIndex> index_tensor_dict(std::string_view pickle) {
  return TensorDictIndexer(pickle).run();
}

LibTorchPickle read_libtorch_pickle(std::string_view pickle) {
  try {
    return Reader(pickle).run();
  } catch (const c10::Error& e) {  // what LibTorch refuses to make (a device of a bad name)
    throw std::invalid_argument(e.what_without_backtrace());
  }
}

}  // namespace torchfit::detail
