#include "format/python_pickle.h"

#include <cstring>
#include <memory>
#include <unordered_map>
#include <variant>
#include <vector>

#include <ATen/ATen.h>
#include <fmt/format.h>

#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

struct Value;
using ValuePtr = std::shared_ptr<Value>;

/// The values a state-dict pickle holds.
struct Value {
  enum class Kind { None, Bool, Int, Float, String, Tuple, List, Dict, Global, Storage, Tensor, Mark } kind = Kind::None;
  bool boolean = false;
  int64_t integer = 0;
  double number = 0;
  std::string text;                                // String; Global: "module.name"
  std::vector<ValuePtr> items;                     // Tuple, List
  std::vector<std::pair<ValuePtr, ValuePtr>> dict;  // Dict, in order
  at::Tensor tensor;                               // Storage (1-D, flat), Tensor
};

ValuePtr make(Value::Kind kind) {
  auto v = std::make_shared<Value>();
  v->kind = kind;
  return v;
}

at::ScalarType storage_dtype(const std::string& name) {
  static const std::unordered_map<std::string, at::ScalarType> types = {
      {"torch.FloatStorage", at::kFloat},   {"torch.DoubleStorage", at::kDouble}, {"torch.HalfStorage", at::kHalf},
      {"torch.BFloat16Storage", at::kBFloat16}, {"torch.LongStorage", at::kLong}, {"torch.IntStorage", at::kInt},
      {"torch.ShortStorage", at::kShort},   {"torch.CharStorage", at::kChar},     {"torch.ByteStorage", at::kByte},
      {"torch.BoolStorage", at::kBool},
  };
  auto it = types.find(name);
  if (it == types.end()) throw std::invalid_argument("unsupported storage type " + name);
  return it->second;
}

std::vector<int64_t> int_list(const Value& tuple) {
  std::vector<int64_t> out;
  for (const auto& item : tuple.items) out.push_back(item->integer);
  return out;
}

class Reader {
 public:
  Reader(const std::string& pickle, const StorageReader& storage) : data_(pickle), storage_(storage) {}

  ValuePtr run() {
    for (;;) {
      unsigned char op = byte();
      switch (op) {
        case 0x80: byte(); break;                          // PROTO
        case 0x95: take(8); break;                         // FRAME
        case '.': return pop();                            // STOP
        case 'c': {                                        // GLOBAL
          auto module = line();
          auto v = make(Value::Kind::Global);
          v->text = module + "." + line();
          push(v);
          break;
        }
        case 'q': memo_[byte()] = top(); break;            // BINPUT
        case 'r': memo_[u32()] = top(); break;             // LONG_BINPUT
        case 0x94: memo_[memo_.size()] = top(); break;     // MEMOIZE
        case 'h': push(memo(byte())); break;               // BINGET
        case 'j': push(memo(u32())); break;                // LONG_BINGET
        case '(': push(make(Value::Kind::Mark)); break;    // MARK
        case ')': push(make(Value::Kind::Tuple)); break;   // EMPTY_TUPLE
        case ']': push(make(Value::Kind::List)); break;    // EMPTY_LIST
        case '}': push(make(Value::Kind::Dict)); break;    // EMPTY_DICT
        case 'N': push(make(Value::Kind::None)); break;
        case 0x88: case 0x89: {                            // NEWTRUE, NEWFALSE
          auto v = make(Value::Kind::Bool);
          v->boolean = op == 0x88;
          push(v);
          break;
        }
        case 'K': push_int(byte()); break;                 // BININT1
        case 'M': push_int(u16()); break;                  // BININT2
        case 'J': push_int(static_cast<int32_t>(u32())); break;  // BININT
        case 0x8a: {                                       // LONG1
          size_t n = byte();
          int64_t value = 0;
          auto bytes = take(n);
          for (size_t i = 0; i < n && i < 8; ++i) value |= static_cast<int64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
          if (n > 0 && n < 8 && (static_cast<unsigned char>(bytes[n - 1]) & 0x80)) value -= int64_t(1) << (8 * n);
          push_int(value);
          break;
        }
        case 'G': {                                        // BINFLOAT (big-endian)
          auto bytes = take(8);
          uint64_t bits = 0;
          for (int i = 0; i < 8; ++i) bits = (bits << 8) | static_cast<unsigned char>(bytes[i]);
          auto v = make(Value::Kind::Float);
          std::memcpy(&v->number, &bits, 8);
          push(v);
          break;
        }
        case 'X': push_string(take(u32())); break;         // BINUNICODE
        case 0x8c: push_string(take(byte())); break;       // SHORT_BINUNICODE
        case 'T': push_string(take(u32())); break;         // BINSTRING
        case 'U': push_string(take(byte())); break;        // SHORT_BINSTRING
        case 't': push(tuple_of(pop_mark())); break;       // TUPLE
        case 0x85: push(tuple_of(pop_n(1))); break;        // TUPLE1
        case 0x86: push(tuple_of(pop_n(2))); break;        // TUPLE2
        case 0x87: push(tuple_of(pop_n(3))); break;        // TUPLE3
        case 'a': {                                        // APPEND
          auto item = pop();
          top()->items.push_back(item);
          break;
        }
        case 'e': {                                        // APPENDS
          auto items = pop_mark();
          auto& list = top()->items;
          list.insert(list.end(), items.begin(), items.end());
          break;
        }
        case 's': {                                        // SETITEM
          auto value = pop();
          auto key = pop();
          top()->dict.emplace_back(key, value);
          break;
        }
        case 'u': {                                        // SETITEMS
          auto items = pop_mark();
          for (size_t i = 0; i + 1 < items.size(); i += 2) top()->dict.emplace_back(items[i], items[i + 1]);
          break;
        }
        case 'b': pop(); break;  // BUILD: only OrderedDict's `_metadata`, which loading ignores
        case 'Q': push(persistent(pop())); break;          // BINPERSID
        case 'R': {                                        // REDUCE
          auto args = pop();
          auto callable = pop();
          push(reduce(*callable, *args));
          break;
        }
        default:
          throw std::invalid_argument(fmt::format("unsupported pickle opcode 0x{:02x}", op));
      }
    }
  }

 private:
  unsigned char byte() { return static_cast<unsigned char>(take(1)[0]); }
  uint32_t u16() {
    auto b = take(2);
    return static_cast<unsigned char>(b[0]) | (static_cast<unsigned char>(b[1]) << 8);
  }
  uint32_t u32() {
    auto b = take(4);
    uint32_t v = 0;
    for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[i]);
    return v;
  }
  std::string take(size_t n) {
    if (position_ + n > data_.size()) throw std::invalid_argument("the pickle ends early");
    auto out = data_.substr(position_, n);
    position_ += n;
    return out;
  }
  std::string line() {
    auto end = data_.find('\n', position_);
    if (end == std::string::npos) throw std::invalid_argument("the pickle ends early");
    auto out = data_.substr(position_, end - position_);
    position_ = end + 1;
    return out;
  }
  void push(ValuePtr v) { stack_.push_back(std::move(v)); }
  void push_int(int64_t value) {
    auto v = make(Value::Kind::Int);
    v->integer = value;
    push(v);
  }
  void push_string(std::string text) {
    auto v = make(Value::Kind::String);
    v->text = std::move(text);
    push(v);
  }
  ValuePtr top() {
    if (stack_.empty()) throw std::invalid_argument("the pickle's stack is empty");
    return stack_.back();
  }
  ValuePtr pop() {
    auto v = top();
    stack_.pop_back();
    return v;
  }
  std::vector<ValuePtr> pop_n(size_t n) {
    if (stack_.size() < n) throw std::invalid_argument("the pickle's stack is too short");
    std::vector<ValuePtr> out(stack_.end() - static_cast<std::ptrdiff_t>(n), stack_.end());
    stack_.resize(stack_.size() - n);
    return out;
  }
  std::vector<ValuePtr> pop_mark() {
    for (size_t i = stack_.size(); i-- > 0;) {
      if (stack_[i]->kind == Value::Kind::Mark) {
        std::vector<ValuePtr> out(stack_.begin() + static_cast<std::ptrdiff_t>(i) + 1, stack_.end());
        stack_.resize(i);
        return out;
      }
    }
    throw std::invalid_argument("a pickle MARK is missing");
  }
  ValuePtr memo(uint32_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) throw std::invalid_argument(fmt::format("pickle memo {} is missing", index));
    return it->second;
  }
  static ValuePtr tuple_of(std::vector<ValuePtr> items) {
    auto v = make(Value::Kind::Tuple);
    v->items = std::move(items);
    return v;
  }

  /// ('storage', torch.XStorage, key, location, numel)
  ValuePtr persistent(const ValuePtr& id) {
    if (id->kind != Value::Kind::Tuple || id->items.size() < 5 || id->items[0]->text != "storage") {
      throw std::invalid_argument("unsupported persistent id");
    }
    const auto& key = id->items[2]->text;
    auto it = storages_.find(key);
    if (it != storages_.end()) return it->second;
    auto v = make(Value::Kind::Storage);
    v->tensor = storage_(key, storage_dtype(id->items[1]->text), id->items[4]->integer);
    storages_[key] = v;
    return v;
  }

  ValuePtr reduce(const Value& callable, const Value& args) {
    const auto& name = callable.text;
    if (name == "collections.OrderedDict") return make(Value::Kind::Dict);
    if (name == "torch._utils._rebuild_tensor_v2" && args.items.size() >= 4) {
      const auto& storage = *args.items[0];
      auto v = make(Value::Kind::Tensor);
      auto sizes = int_list(*args.items[2]), strides = int_list(*args.items[3]);
      int64_t offset = args.items[1]->integer, extent = offset + 1;
      for (size_t i = 0; i < sizes.size(); ++i) extent += sizes[i] == 0 ? -extent + offset : (sizes[i] - 1) * strides[i];
      if (offset < 0 || extent > storage.tensor.numel()) throw std::invalid_argument("a tensor overruns its storage");
      v->tensor = storage.tensor.as_strided(sizes, strides, offset);
      return v;
    }
    if (name == "torch._utils._rebuild_parameter" && !args.items.empty()) return args.items[0];
    if (name == "torch.jit._pickle.restore_type_tag" && !args.items.empty()) return args.items[0];
    throw std::invalid_argument("unsupported object " + name);
  }

  const std::string& data_;
  const StorageReader& storage_;
  size_t position_ = 0;
  std::vector<ValuePtr> stack_;
  std::unordered_map<uint32_t, ValuePtr> memo_;
  std::unordered_map<std::string, ValuePtr> storages_;
};

}  // namespace

std::map<std::string, at::Tensor> unpickle_state_dict(const std::string& pickle, const StorageReader& storage,
                                                      const std::string& path) {
  ValuePtr root;
  try {
    root = Reader(pickle, storage).run();
  } catch (const std::invalid_argument& e) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: {}", path, e.what()));
  }
  if (root->kind != Value::Kind::Dict) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: expected a dict of tensors", path));
  }
  std::map<std::string, at::Tensor> out;
  for (const auto& [key, value] : root->dict) {
    if (key->kind != Value::Kind::String || value->kind != Value::Kind::Tensor) {
      throw CheckpointError(fmt::format(
          "Failed reading checkpoint {}: expected a dict from names to tensors (a state_dict)", path));
    }
    out[key->text] = value->tensor;
  }
  return out;
}

}  // namespace torchfit::detail
