#include "format/python_pickle.h"

#include <algorithm>
#include <cctype>
#include <functional>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <ATen/ATen.h>
#include <fmt/format.h>

namespace torchfit::detail {
namespace {

/// A pickled value. Values live in the reader's arena and point at each other
/// with plain pointers: destroying a deeply nested or cyclic tree is then flat.
struct Value {
  enum class Kind { None, Bool, Int, Float, String, Tuple, List, Set, Dict, Global, Storage, Tensor, Mark } kind;
  bool boolean = false;
  int64_t integer = 0;
  double number = 0;
  std::string text;                              // String, bytes; Global: "module.name"
  std::vector<Value*> items;                     // Tuple, List, Set
  std::vector<std::pair<Value*, Value*>> dict;   // Dict, in order
  at::Storage storage;                           // Storage
  at::ScalarType dtype = at::kByte;              // Storage
  int64_t numel = 0;                             // Storage
  at::Tensor tensor;                             // Tensor
  bool script_object = false;                    // Dict: a TorchScript object, its class in `text`
  std::string type_tag;                          // List, Dict: LibTorch's annotation ("List[Tensor]")
};
using Kind = Value::Kind;

const char* kind_name(Kind kind) {
  static const char* names[] = {"None", "bool", "int",    "float",   "str",    "tuple", "list",
                                "set",  "dict", "object", "storage", "tensor", "mark"};
  return names[static_cast<int>(kind)];
}

class Reader {
 public:
  Reader(const std::string& pickle, const StorageAllocator& allocate, bool script_objects)
      : data_(pickle), allocate_(allocate), script_objects_(script_objects) {}

  c10::IValue run() {
    Value* root = parse();
    std::unordered_map<const Value*, c10::IValue> done;
    std::unordered_set<const Value*> open;
    return to_ivalue(root, 0, done, open);
  }

 private:
  Value* parse() {
    for (;;) {
      op_position_ = position_;
      unsigned char op = byte();
      switch (op) {
        case 0x80: {  // PROTO
          unsigned version = byte();
          if (version > 5) throw fail(fmt::format("pickle protocol {} is newer than 5", version));
          break;
        }
        case 0x95: take(8); break;  // FRAME: a hint for buffered readers
        case '.': {                 // STOP
          Value* out = pop();
          if (!stack_.empty() && stack_.back()->kind == Kind::Mark) throw fail("a MARK was left open");
          return out;
        }
        case 'c': {  // GLOBAL
          auto module = line();
          push_global(module + "." + line());
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          Value* name = pop_kind(Kind::String, "STACK_GLOBAL");
          Value* module = pop_kind(Kind::String, "STACK_GLOBAL");
          push_global(module->text + "." + name->text);
          break;
        }
        case 'q': memo_[byte()] = top(); break;             // BINPUT
        case 'r': memo_[u32()] = top(); break;              // LONG_BINPUT
        case 0x94: memo_[memo_.size()] = top(); break;      // MEMOIZE
        case 'h': push(memo(byte())); break;                // BINGET
        case 'j': push(memo(u32())); break;                 // LONG_BINGET
        case '(': push(make(Kind::Mark)); break;            // MARK
        case '0': pop(); break;                             // POP
        case '1': pop_mark(); break;                        // POP_MARK
        case '2': push(top()); break;                       // DUP
        case ')': push(make(Kind::Tuple)); break;           // EMPTY_TUPLE
        case ']': push(make(Kind::List)); break;            // EMPTY_LIST
        case '}': push(make(Kind::Dict)); break;            // EMPTY_DICT
        case 0x8f: push(make(Kind::Set)); break;            // EMPTY_SET
        case 'l': push(container(Kind::List, pop_mark())); break;    // LIST
        case 't': push(container(Kind::Tuple, pop_mark())); break;   // TUPLE
        case 0x91: push(container(Kind::Set, pop_mark())); break;    // FROZENSET
        case 0x85: push(container(Kind::Tuple, pop_n(1))); break;    // TUPLE1
        case 0x86: push(container(Kind::Tuple, pop_n(2))); break;    // TUPLE2
        case 0x87: push(container(Kind::Tuple, pop_n(3))); break;    // TUPLE3
        case 'd': {                                                   // DICT
          Value* dict = make(Kind::Dict);
          add_pairs(dict, pop_mark());
          push(dict);
          break;
        }
        case 'N': push(make(Kind::None)); break;
        case 0x88: case 0x89: {  // NEWTRUE, NEWFALSE
          Value* v = make(Kind::Bool);
          v->boolean = op == 0x88;
          push(v);
          break;
        }
        case 'K': push_int(byte()); break;                          // BININT1
        case 'M': push_int(u16()); break;                           // BININT2
        case 'J': push_int(static_cast<int32_t>(u32())); break;     // BININT
        case 0x8a: push_int(little_endian_int(byte())); break;      // LONG1
        case 0x8b: push_int(little_endian_int(u32())); break;       // LONG4
        case 'G': {                                                 // BINFLOAT (big-endian)
          auto bytes = take(8);
          uint64_t bits = 0;
          for (int i = 0; i < 8; ++i) bits = (bits << 8) | static_cast<unsigned char>(bytes[i]);
          Value* v = make(Kind::Float);
          std::memcpy(&v->number, &bits, 8);
          push(v);
          break;
        }
        case 'X': case 'T': case 'B': push_string(take(u32())); break;   // BINUNICODE, BINSTRING, BINBYTES
        case 0x8c: case 'U': case 'C': push_string(take(byte())); break;  // SHORT_BINUNICODE, ..STRING, ..BYTES
        case 0x8d: case 0x8e: case 0x96: push_string(take(u64())); break;  // BINUNICODE8, BINBYTES8, BYTEARRAY8
        case 'a': {  // APPEND
          Value* item = pop();
          append(top(), {item});
          break;
        }
        case 'e': {  // APPENDS
          auto items = pop_mark();
          append(top(), items);
          break;
        }
        case 0x90: {  // ADDITEMS
          auto items = pop_mark();
          Value* set = top();
          if (set->kind != Kind::Set) throw fail(fmt::format("ADDITEMS on a {}", kind_name(set->kind)));
          set->items.insert(set->items.end(), items.begin(), items.end());
          break;
        }
        case 's': {  // SETITEM
          auto pair = pop_n(2);
          add_pairs(top(), pair);
          break;
        }
        case 'u': {  // SETITEMS
          auto pairs = pop_mark();
          add_pairs(top(), pairs);
          break;
        }
        case 'b': {  // BUILD
          Value* state = pop();
          build(state, top());
          break;
        }
        case 'Q': push(persistent(pop())); break;  // BINPERSID
        case 'R': {                                // REDUCE
          Value* args = pop_kind(Kind::Tuple, "REDUCE");
          Value* callable = pop_kind(Kind::Global, "REDUCE");
          push(reduce(callable->text, args->items));
          break;
        }
        case 0x81: {  // NEWOBJ: cls.__new__(cls, *args)
          pop_kind(Kind::Tuple, "NEWOBJ");
          push(new_object(pop_kind(Kind::Global, "NEWOBJ")->text));
          break;
        }
        case 0x92: {  // NEWOBJ_EX
          pop_kind(Kind::Dict, "NEWOBJ_EX");
          pop_kind(Kind::Tuple, "NEWOBJ_EX");
          push(new_object(pop_kind(Kind::Global, "NEWOBJ_EX")->text));
          break;
        }
        case 0x97: case 0x98:
          throw fail("out-of-band buffers (pickle protocol 5 NEXT_BUFFER) are not supported");
        default:
          throw fail(fmt::format("unsupported pickle opcode 0x{:02x} (pickles of protocol 0 and 1, or of Python "
                                 "objects torch.save does not write)",
                                 op));
      }
    }
  }

  std::invalid_argument fail(const std::string& what) const {
    return std::invalid_argument(fmt::format("{} (data.pkl byte {})", what, op_position_));
  }

  // ---- bytes
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
  uint64_t u64() {
    auto b = take(8);
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[i]);
    return v;
  }
  std::string take(uint64_t n) {
    if (n > data_.size() - position_) {
      throw fail(fmt::format("the pickle ends early: {} bytes claimed, {} left", n, data_.size() - position_));
    }
    auto out = data_.substr(position_, n);
    position_ += n;
    return out;
  }
  std::string line() {
    auto end = data_.find('\n', position_);
    if (end == std::string::npos) throw fail("the pickle ends early inside a GLOBAL");
    auto out = data_.substr(position_, end - position_);
    position_ = end + 1;
    return out;
  }
  /// Two's-complement little-endian integer of `n` bytes (LONG1, LONG4).
  int64_t little_endian_int(uint64_t n) {
    auto bytes = take(n);
    if (n > 8) throw fail(fmt::format("an integer of {} bytes does not fit in 64 bits", n));
    uint64_t value = 0;
    for (size_t i = 0; i < n; ++i) value |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
    if (n > 0 && n < 8 && (static_cast<unsigned char>(bytes[n - 1]) & 0x80)) value |= ~uint64_t(0) << (8 * n);
    return static_cast<int64_t>(value);
  }

  // ---- values and the stack
  Value* make(Kind kind) {
    arena_.emplace_back();
    arena_.back().kind = kind;
    return &arena_.back();
  }
  void push(Value* v) { stack_.push_back(v); }
  void push_int(int64_t value) {
    Value* v = make(Kind::Int);
    v->integer = value;
    push(v);
  }
  void push_string(std::string text) {
    Value* v = make(Kind::String);
    v->text = std::move(text);
    push(v);
  }
  void push_global(std::string name) {
    Value* v = make(Kind::Global);
    v->text = std::move(name);
    push(v);
  }
  Value* top() {
    if (stack_.empty() || stack_.back()->kind == Kind::Mark) throw fail("the pickle's stack is empty");
    return stack_.back();
  }
  Value* pop() {
    Value* v = top();
    stack_.pop_back();
    return v;
  }
  Value* pop_kind(Kind kind, const char* op) {
    Value* v = pop();
    if (v->kind != kind) throw fail(fmt::format("{} expects a {}, found a {}", op, kind_name(kind), kind_name(v->kind)));
    return v;
  }
  std::vector<Value*> pop_n(size_t n) {
    std::vector<Value*> out(n);
    for (size_t i = n; i-- > 0;) out[i] = pop();
    return out;
  }
  std::vector<Value*> pop_mark() {
    for (size_t i = stack_.size(); i-- > 0;) {
      if (stack_[i]->kind == Kind::Mark) {
        std::vector<Value*> out(stack_.begin() + static_cast<std::ptrdiff_t>(i) + 1, stack_.end());
        stack_.resize(i);
        return out;
      }
    }
    throw fail("a pickle MARK is missing");
  }
  Value* memo(uint32_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) throw fail(fmt::format("pickle memo {} is missing", index));
    return it->second;
  }
  Value* container(Kind kind, std::vector<Value*> items) {
    Value* v = make(kind);
    v->items = std::move(items);
    return v;
  }
  void append(Value* list, const std::vector<Value*>& items) {
    if (list->kind != Kind::List) throw fail(fmt::format("APPEND to a {}", kind_name(list->kind)));
    list->items.insert(list->items.end(), items.begin(), items.end());
  }
  void add_pairs(Value* dict, const std::vector<Value*>& items) {
    if (dict->kind != Kind::Dict) throw fail(fmt::format("SETITEM on a {}", kind_name(dict->kind)));
    if (items.size() % 2 != 0) throw fail("SETITEMS with an odd number of items");
    for (size_t i = 0; i < items.size(); i += 2) dict->dict.emplace_back(items[i], items[i + 1]);
  }

  // ---- torch objects
  /// ('storage', torch.XStorage, key, location, numel)
  Value* persistent(Value* id) {
    if (id->kind != Kind::Tuple || id->items.size() != 5 || id->items[0]->kind != Kind::String ||
        id->items[0]->text != "storage" || id->items[1]->kind != Kind::Global || id->items[2]->kind != Kind::String ||
        id->items[4]->kind != Kind::Int) {
      throw fail("unsupported persistent id (torch.save writes ('storage', type, key, location, numel))");
    }
    const auto& key = id->items[2]->text;
    auto it = storages_.find(key);
    if (it != storages_.end()) return it->second;
    auto dtype = storage_dtype(id->items[1]->text);
    const int64_t numel = id->items[4]->integer;
    const auto element = static_cast<int64_t>(c10::elementSize(dtype));
    int64_t nbytes = 0;
    if (numel < 0 || __builtin_mul_overflow(numel, element, &nbytes)) {
      throw fail(fmt::format("storage {} claims {} elements", key, numel));
    }
    Value* v = make(Kind::Storage);
    v->dtype = dtype;
    v->numel = numel;
    v->storage = c10::Storage(c10::Storage::use_byte_size_t(), static_cast<size_t>(nbytes),
                              allocate_(key, static_cast<size_t>(nbytes)), /*allocator=*/nullptr, /*resizable=*/false);
    storages_[key] = v;
    return v;
  }

  std::vector<int64_t> int_tuple(const Value* v, const char* what) {
    if (v->kind != Kind::Tuple) throw fail(fmt::format("a tensor's {} is a {}, not a tuple", what, kind_name(v->kind)));
    if (v->items.size() > kMaxTensorDims) throw fail(fmt::format("a tensor has {} dimensions", v->items.size()));
    std::vector<int64_t> out;
    for (const Value* item : v->items) {
      if (item->kind != Kind::Int || item->integer < 0) throw fail(fmt::format("a tensor's {} are not sizes", what));
      out.push_back(item->integer);
    }
    return out;
  }

  /// _rebuild_tensor_v2(storage, storage_offset, size, stride, ...), the tensor of the storage's
  /// dtype. _rebuild_tensor_v3(..., dtype) names the dtype itself, over an untyped storage: Python
  /// 2.x writes it for the dtypes without a storage class (float8, uint16 to uint64).
  Value* rebuild_tensor(const std::vector<Value*>& args, bool named_dtype) {
    if (args.size() < (named_dtype ? 7u : 4u) || args[0]->kind != Kind::Storage || args[1]->kind != Kind::Int) {
      throw fail("a tensor is not rebuilt from (storage, offset, size, stride)");
    }
    const Value& storage = *args[0];
    at::ScalarType dtype = storage.dtype;
    int64_t numel = storage.numel;
    if (named_dtype) {
      if (args[6]->kind != Kind::Global) throw fail("_rebuild_tensor_v3's dtype is not a torch dtype");
      dtype = python_dtype(args[6]->text);
      const auto element = static_cast<int64_t>(c10::elementSize(dtype));
      if (storage.dtype != at::kByte || numel % element != 0) {
        throw fail(fmt::format("a {} tensor over a storage of {} {} elements", args[6]->text, numel,
                               c10::toString(storage.dtype)));
      }
      numel /= element;
    }
    const int64_t offset = args[1]->integer;
    auto sizes = int_tuple(args[2], "sizes");
    auto strides = int_tuple(args[3], "strides");
    try {
      check_tensor_extent(offset, sizes, strides, numel);
    } catch (const std::invalid_argument& e) {
      throw fail(e.what());
    }
    Value* v = make(Kind::Tensor);
    v->tensor = at::empty({0}, at::TensorOptions().dtype(dtype)).set_(storage.storage, offset, sizes, strides);
    return v;
  }

  /// "torch.float8_e4m3fn" and the like: Python's dtype names are c10's in lower case.
  at::ScalarType python_dtype(const std::string& name) {
    for (int i = 0; i < static_cast<int>(at::ScalarType::NumOptions); ++i) {
      const auto type = static_cast<at::ScalarType>(i);
      std::string c10_name = c10::toString(type);
      std::transform(c10_name.begin(), c10_name.end(), c10_name.begin(), [](unsigned char c) { return std::tolower(c); });
      if (name == "torch." + c10_name) return type;
    }
    throw fail(fmt::format("unsupported dtype {} (this LibTorch has no such type)", name));
  }

  Value* reduce(const std::string& name, const std::vector<Value*>& args) {
    auto first = [&](Kind kind) {
      if (args.empty() || args[0]->kind != kind) {
        throw fail(fmt::format("{} expects a {} first", name, kind_name(kind)));
      }
      return args[0];
    };
    if (name == "collections.OrderedDict") {
      Value* dict = make(Kind::Dict);
      if (!args.empty()) throw fail("OrderedDict built from arguments is not supported");
      return dict;
    }
    if (name == "torch._utils._rebuild_tensor_v2" || name == "torch._utils._rebuild_tensor") {
      return rebuild_tensor(args, false);
    }
    if (name == "torch._utils._rebuild_tensor_v3") return rebuild_tensor(args, true);
    if (name == "torch._utils._rebuild_parameter" || name == "torch._utils._rebuild_parameter_with_state") {
      return first(Kind::Tensor);
    }
    if (name == "torch._tensor._rebuild_from_type_v2" && args.size() >= 3 && args[0]->kind == Kind::Global &&
        args[2]->kind == Kind::Tuple) {
      return reduce(args[0]->text, args[2]->items);  // a Tensor subclass: keep the plain tensor
    }
    if (name == "builtins.set" || name == "builtins.frozenset" || name == "__builtin__.set" ||
        name == "__builtin__.frozenset") {
      if (args.empty()) return make(Kind::Set);
      Value* items = args[0];
      if (items->kind != Kind::List && items->kind != Kind::Tuple) throw fail(name + " of a non-list");
      return container(Kind::Set, items->items);
    }
    if (name == "torch.jit._pickle.restore_type_tag" || name.rfind("torch.jit._pickle.build_", 0) == 0) {
      if (args.empty()) throw fail(name + " without arguments");
      static const std::unordered_map<std::string, std::string> built{
          {"torch.jit._pickle.build_intlist", "List[int]"},   {"torch.jit._pickle.build_doublelist", "List[float]"},
          {"torch.jit._pickle.build_boollist", "List[bool]"}, {"torch.jit._pickle.build_tensorlist", "List[Tensor]"}};
      Value* container = args[0];
      if (args.size() == 2 && args[1]->kind == Kind::String) container->type_tag = args[1]->text;
      if (auto tag = built.find(name); tag != built.end()) container->type_tag = tag->second;
      return container;
    }
    throw fail(fmt::format("unsupported Python object {}", name));
  }

  /// BUILD: a TorchScript object takes its attributes from a dict, once; any other
  /// object's state (OrderedDict's _metadata) is ignored, as loading does.
  void build(Value* state, Value* target) {
    if (!target->script_object) return;
    if (state->kind != Kind::Dict || state->script_object) {
      throw fail(fmt::format("the attributes of {} are a {}", target->text, kind_name(state->kind)));
    }
    if (!target->dict.empty()) throw fail(fmt::format("{} is built twice", target->text));
    for (const auto& [key, value] : state->dict) {
      if (key->kind != Kind::String || key->text == kScriptClassKey) {
        throw fail(fmt::format("an attribute of {} is not named by a string", target->text));
      }
    }
    target->dict = state->dict;
  }

  Value* new_object(const std::string& name) {
    if (name == "collections.OrderedDict") return make(Kind::Dict);
    if (script_objects_ && name.rfind("__torch__.", 0) == 0) {
      Value* object = make(Kind::Dict);
      object->script_object = true;
      object->text = name;
      return object;
    }
    throw fail(fmt::format("unsupported Python object {}", name));
  }

  // ---- to IValue
  c10::IValue to_ivalue(const Value* v, int depth, std::unordered_map<const Value*, c10::IValue>& done,
                        std::unordered_set<const Value*>& open) {
    if (depth > kMaxPickleDepth) throw fail(fmt::format("containers nest deeper than {} levels", kMaxPickleDepth));
    switch (v->kind) {
      case Kind::None: return c10::IValue();
      case Kind::Bool: return v->boolean;
      case Kind::Int: return v->integer;
      case Kind::Float: return v->number;
      case Kind::String: return v->text;
      case Kind::Tensor: return v->tensor;
      case Kind::Global: throw fail(fmt::format("unsupported Python object {}", v->text));
      case Kind::Storage: throw fail("a bare storage (not inside a tensor) is not supported");
      case Kind::Mark: throw fail("a MARK where a value belongs");
      default: break;
    }
    if (auto it = done.find(v); it != done.end()) return it->second;
    if (!open.insert(v).second) throw fail("the pickle holds a container that contains itself");
    c10::IValue out;
    if (v->kind == Kind::Dict) {
      bool string_keys = std::all_of(v->dict.begin(), v->dict.end(), [](const auto& kv) {
        return kv.first->kind == Kind::String;
      });
      c10::TypePtr key_type = string_keys ? c10::TypePtr(c10::StringType::get()) : c10::TypePtr(c10::AnyType::get());
      c10::impl::GenericDict dict(key_type, c10::AnyType::get());
      if (v->script_object) dict.insert(kScriptClassKey, v->text);
      for (const auto& [key, value] : v->dict) {
        if (key->kind != Kind::String && key->kind != Kind::Int && key->kind != Kind::Bool &&
            key->kind != Kind::Float) {
          throw fail(fmt::format("a dict key is a {}", kind_name(key->kind)));
        }
        dict.insert_or_assign(to_ivalue(key, depth + 1, done, open), to_ivalue(value, depth + 1, done, open));
      }
      out = dict;
    } else {
      std::vector<c10::IValue> items;
      for (const Value* item : v->items) items.push_back(to_ivalue(item, depth + 1, done, open));
      if (v->kind == Kind::Tuple) {
        out = c10::ivalue::Tuple::create(std::move(items));
      } else {
        c10::impl::GenericList list(c10::AnyType::get());
        for (auto& item : items) list.push_back(std::move(item));
        out = list;
      }
    }
    if (!v->type_tag.empty()) restore_type_tag(out, v->type_tag);
    open.erase(v);
    done.emplace(v, out);
    return out;
  }

  /// Gives a list or dict the element types of LibTorch's tag, as its unpickler does, once
  /// every element was checked to be of them; a tag that does not fit its container is refused.
  void restore_type_tag(const c10::IValue& container, const std::string& annotation) const {
    auto type = parse_type_annotation(annotation);
    if (!type) return;  // a type torchfit does not read (a Union, a class): the container stays untyped
    if (type->kind() == c10::ListType::Kind && container.isList() &&
        matches_type(container, *type, 0)) {
      container.toList().unsafeSetElementType(type->containedType(0));
      return;
    }
    if (type->kind() == c10::DictType::Kind && container.isGenericDict() &&
        matches_type(container, *type, 0)) {
      auto dict = container.toGenericDict();
      dict.unsafeSetKeyType(type->containedType(0));
      dict.unsafeSetValueType(type->containedType(1));
      return;
    }
    throw fail(fmt::format("a container tagged {} is not one", annotation));
  }

  bool matches_type(const c10::IValue& value, const c10::Type& type, int depth) const {
    if (depth > kMaxPickleDepth) return false;
    switch (type.kind()) {
      case c10::TypeKind::AnyType: return true;
      case c10::TypeKind::IntType: return value.isInt();
      case c10::TypeKind::FloatType: return value.isDouble();
      case c10::TypeKind::BoolType: return value.isBool();
      case c10::TypeKind::StringType: return value.isString();
      case c10::TypeKind::ComplexType: return value.isComplexDouble();
      case c10::TypeKind::NumberType: return value.isInt() || value.isDouble() || value.isComplexDouble();
      case c10::TypeKind::TensorType: return value.isTensor();
      case c10::TypeKind::DeviceObjType: return value.isDevice();
      case c10::TypeKind::NoneType: return value.isNone();
      case c10::TypeKind::OptionalType:
        return value.isNone() || matches_type(value, *type.containedType(0), depth + 1);
      case c10::TypeKind::ListType:
        if (!value.isList()) return false;
        for (const auto& item : value.toListRef()) {
          if (!matches_type(item, *type.containedType(0), depth + 1)) return false;
        }
        return true;
      case c10::TypeKind::DictType:
        if (!value.isGenericDict()) return false;
        for (const auto& entry : value.toGenericDict()) {
          if (!matches_type(entry.key(), *type.containedType(0), depth + 1) ||
              !matches_type(entry.value(), *type.containedType(1), depth + 1)) {
            return false;
          }
        }
        return true;
      case c10::TypeKind::TupleType: {
        if (!value.isTuple()) return false;
        const auto items = value.toTupleRef().elements().asArrayRef();
        if (items.size() != type.containedTypeSize()) return false;
        for (size_t i = 0; i < items.size(); ++i) {
          if (!matches_type(items[i], *type.containedType(i), depth + 1)) return false;
        }
        return true;
      }
      default: return false;
    }
  }

  const std::string& data_;
  const StorageAllocator& allocate_;
  const bool script_objects_;
  size_t position_ = 0;
  size_t op_position_ = 0;
  std::deque<Value> arena_;
  std::vector<Value*> stack_;
  std::unordered_map<uint32_t, Value*> memo_;
  std::unordered_map<std::string, Value*> storages_;
};

}  // namespace

c10::IValue unpickle_python(const std::string& pickle, const StorageAllocator& allocate, bool script_objects) {
  return Reader(pickle, allocate, script_objects).run();
}

}  // namespace torchfit::detail
