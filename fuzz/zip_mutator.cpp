#include "zip_mutator.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "format/byte_sink.h"
#include "format/zip.h"

// libFuzzer's own byte-level mutator, for the bytes inside a record.
extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace torchfit::fuzz {
namespace {

constexpr size_t kTrailer = 23;  // torchfit's end-record comment: "torchfit-crc32:" and 8 hex digits
constexpr size_t kMaxRecord = 1 << 20;

uint32_t get16(const std::string& b, size_t at) {
  return static_cast<unsigned char>(b[at]) | static_cast<uint32_t>(static_cast<unsigned char>(b[at + 1])) << 8;
}
uint32_t get32(const std::string& b, size_t at) { return get16(b, at) | get16(b, at + 2) << 16; }
void put32(std::string& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + i] = static_cast<char>(v >> (8 * i));
}
void put16(std::string& b, size_t at, uint32_t v) {
  b[at] = static_cast<char>(v);
  b[at + 1] = static_cast<char>(v >> 8);
}

struct Record {
  std::string name;  // without the archive's top directory
  std::string data;
};

/// A zip as torch.save lays it out: records under one top directory, stored, with or without
/// torchfit's checksum.
struct Archive {
  std::string top = "archive";
  std::vector<Record> records;
  bool sealed = false;
};

/// Reads `bytes` as a zip, leniently; nullopt when its directory does not hold together.
std::optional<Archive> parse(const std::string& bytes) {
  if (bytes.size() < 22) return std::nullopt;
  size_t end = std::string::npos;
  for (size_t at = bytes.size() - 22 + 1; at-- > 0 && bytes.size() - at <= 22 + 65535;) {
    if (bytes.compare(at, 4, "PK\x05\x06", 4) == 0) {
      end = at;
      break;
    }
  }
  if (end == std::string::npos) return std::nullopt;
  Archive archive;
  archive.sealed = bytes.size() - end == 22 + kTrailer && bytes.compare(end + 22, 15, "torchfit-crc32:") == 0;
  const size_t count = get16(bytes, end + 10), directory = get32(bytes, end + 16);
  size_t at = directory;
  for (size_t i = 0; i < count; ++i) {
    if (at + 46 > end || bytes.compare(at, 4, "PK\x01\x02", 4) != 0) return std::nullopt;
    const size_t size = get32(bytes, at + 20), name_size = get16(bytes, at + 28);
    const size_t skip = 46 + name_size + get16(bytes, at + 30) + get16(bytes, at + 32);
    const size_t local = get32(bytes, at + 42);
    if (at + skip > end || local + 30 > bytes.size()) return std::nullopt;
    const size_t data = local + 30 + get16(bytes, local + 26) + get16(bytes, local + 28);
    if (data > bytes.size() || bytes.size() - data < size || size > kMaxRecord) return std::nullopt;
    std::string name = bytes.substr(at + 46, name_size);
    const size_t slash = name.find('/');
    if (slash != std::string::npos) {
      archive.top = name.substr(0, slash);
      name = name.substr(slash + 1);
    }
    archive.records.push_back({name, bytes.substr(data, size)});
    at += skip;
  }
  return archive;
}

/// Writes `archive` with torchfit's writer: every zip CRC32 and the checksum consistent.
std::string serialize(const Archive& archive) {
  detail::StringSink out;
  detail::ChecksumSink sink(out);
  detail::ZipWriter zip(sink, archive.top);
  for (const auto& record : archive.records) zip.add(record.name, record.data.data(), record.data.size());
  zip.finish();
  if (archive.sealed) return std::move(out.bytes);
  std::string bytes = out.bytes.substr(0, out.bytes.size() - kTrailer);  // a plain end record, as other writers
  put16(bytes, bytes.size() - 2, 0);
  return bytes;
}

uint32_t crc32(const std::string& bytes, size_t n) {
  uint32_t crc = 0xffffffffu;
  for (size_t i = 0; i < n; ++i) {
    crc ^= static_cast<unsigned char>(bytes[i]);
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

/// Recomputes torchfit's checksum of a sealed file, as a forger would after editing it.
void reseal(std::string& bytes) {
  if (bytes.size() < kTrailer || bytes.compare(bytes.size() - kTrailer, 15, "torchfit-crc32:") != 0) return;
  static const char* hex = "0123456789abcdef";
  const uint32_t crc = crc32(bytes, bytes.size() - kTrailer);
  for (int i = 0; i < 8; ++i) bytes[bytes.size() - 8 + i] = hex[(crc >> (28 - 4 * i)) & 0xf];
}

// ---- pickles

/// Length of the opcode at `at` with its argument, or 0 when it cannot be told.
size_t opcode_length(const std::string& p, size_t at) {
  const unsigned char op = static_cast<unsigned char>(p[at]);
  const size_t left = p.size() - at - 1;
  auto counted = [&](size_t width) -> size_t {  // a length of `width` bytes, then that many bytes
    if (left < width) return 0;
    size_t n = width == 1 ? static_cast<unsigned char>(p[at + 1]) : width == 4 ? get32(p, at + 1) : 0;
    if (width == 8) n = get32(p, at + 1);  // high half ignored: longer than the pickle anyway
    return left - width >= n ? 1 + width + n : 0;
  };
  auto line = [&](int lines) -> size_t {
    size_t end = at + 1;
    for (int i = 0; i < lines; ++i) {
      end = p.find('\n', end);
      if (end == std::string::npos) return 0;
      ++end;
    }
    return end - at;
  };
  switch (op) {
    case 'K': case 'q': case 'h': case 0x80: return left >= 1 ? 2 : 0;
    case 'M': return left >= 2 ? 3 : 0;
    case 'J': case 'r': case 'j': return left >= 4 ? 5 : 0;
    case 'G': case 0x95: return left >= 8 ? 9 : 0;
    case 0x8a: case 'C': case 'U': case 0x8c: return counted(1);
    case 0x8b: case 'X': case 'B': case 'T': return counted(4);
    case 0x8d: case 0x8e: case 0x96: return counted(8);
    case 'c': return line(2);
    case 'P': case 'I': case 'L': case 'F': case 'S': case 'V': case 'g': case 'p': return line(1);
    default: return 1;
  }
}

/// The opcodes of `pickle` as (start, length); what follows an opcode that cannot be told is one piece.
std::vector<std::pair<size_t, size_t>> opcodes(const std::string& pickle) {
  std::vector<std::pair<size_t, size_t>> out;
  for (size_t at = 0; at < pickle.size();) {
    size_t n = opcode_length(pickle, at);
    if (n == 0) n = pickle.size() - at;
    out.emplace_back(at, n);
    at += n;
  }
  return out;
}

std::string text_op(const std::string& text) {
  std::string op = "X    " + text;
  std::string size(4, '\0');
  put32(size, 0, static_cast<uint32_t>(text.size()));
  op.replace(1, 4, size);
  return op;
}

/// Opcodes worth inserting: what LibTorch's and Python's picklers write, with arguments that are
/// names, dtypes and type tags the readers look for, and integers at the edges.
std::string interesting_opcode(std::mt19937& rng) {
  static const std::vector<std::string> ops = {
      "(", ")", "]", "}", "t", "u", "e", "a", "s", "b", "R", "Q", "N", "\x88", "\x89", "\x81", "\x85", "\x86",
      "\x87", "0", "2", ".", "l", "d",
      std::string("K\x00", 2), "K\xff", std::string("M\xff\xff"), "J\xff\xff\xff\x7f", "J\xff\xff\xff\xff",
      std::string("J\x00\x00\x00\x80", 5), std::string("\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f", 10),
      std::string("G\x7f\xf8\x00\x00\x00\x00\x00\x00", 9), std::string("G\x7f\xf0\x00\x00\x00\x00\x00\x00", 9),
      std::string("q\x00", 2), std::string("h\x00", 2), "h\x01", "h\xff", std::string("r\xff\xff\xff\xff"),
      std::string("j\x00\x00\x00\x00", 5),
      "ctorch._utils\n_rebuild_tensor_v2\n", "ctorch._utils\n_rebuild_tensor_v3\n",
      "ctorch._utils\n_rebuild_qtensor\n", "ctorch\nFloatStorage\n", "ctorch\nLongStorage\n",
      "ctorch\nQInt8Storage\n", "ctorch\nUntypedStorage\n", "ccollections\nOrderedDict\n",
      "ctorch.jit._pickle\nrestore_type_tag\n", "ctorch.jit._pickle\nbuild_tensorlist\n",
      "ctorch.jit._pickle\nbuild_intlist\n", "ctorch\ndevice\n", "cbuiltins\ncomplex\n", "c__torch__\nModule\n",
      "ctorch\nper_tensor_affine\n", "ctorch\nfloat8_e4m3fn\n"};
  static const std::vector<std::string> texts = {
      "storage", "cpu", "cuda:0", "0", "1", "model", "optimizer", "state", "param_groups", "params", "lr", "step",
      "exp_avg", "momentum_buffer", "old_dirs", "torchfit", "trainer", "rng", "callbacks", "weight", "bias",
      "List[Tensor]", "Dict[str, Tensor]", "Dict[str, List[int]]", "Optional[Tensor]", "Tuple[int, int]",
      "__torch__.Module", "torchfit_optimizer", "torchfit_format", "torchfit.checkpoint.v1", "pytorch_version",
      "1.5.0", "param_groups/size", "param_groups/0", "params/size", "options", "torchfit_archive"};
  if (rng() % 3 == 0) return text_op(texts[rng() % texts.size()]);
  return ops[rng() % ops.size()];
}

/// One opcode-aware edit of a pickle.
std::string mutate_pickle(std::string pickle, std::mt19937& rng) {
  auto ops = opcodes(pickle);
  if (ops.empty()) return interesting_opcode(rng) + ".";
  auto [at, n] = ops[rng() % ops.size()];
  switch (rng() % 6) {
    case 0: pickle.erase(at, n); break;                                       // drop one
    case 1: pickle.insert(at, pickle.substr(at, n)); break;                   // repeat one
    case 2: pickle.insert(at, interesting_opcode(rng)); break;                // insert one
    case 3: pickle.replace(at, n, interesting_opcode(rng)); break;            // replace one
    case 4: {                                                                 // move one
      std::string op = pickle.substr(at, n);
      pickle.erase(at, n);
      auto [to, unused] = ops[rng() % ops.size()];
      (void)unused;
      pickle.insert(std::min(to, pickle.size()), op);
      break;
    }
    default: {  // an argument byte
      if (n > 1) pickle[at + 1 + rng() % (n - 1)] = static_cast<char>(rng());
      break;
    }
  }
  return pickle;
}

// ---- the directory

/// Sets one field of the directory, a local header or the end record to a value at an edge or
/// pointing elsewhere in the file.
void mutate_structure(std::string& bytes, std::mt19937& rng) {
  std::vector<size_t> central, local;
  size_t end = std::string::npos;
  for (size_t at = bytes.find("PK"); at != std::string::npos && at + 4 <= bytes.size(); at = bytes.find("PK", at + 1)) {
    if (bytes.compare(at, 4, "PK\x01\x02", 4) == 0) central.push_back(at);
    if (bytes.compare(at, 4, "PK\x03\x04", 4) == 0) local.push_back(at);
    if (bytes.compare(at, 4, "PK\x05\x06", 4) == 0) end = at;
  }
  const uint32_t size = static_cast<uint32_t>(bytes.size());
  std::vector<uint32_t> values = {0, 1, 0xffffffffu, 0x7fffffffu, size, size - 1, size + 1};
  for (size_t at : local) values.push_back(static_cast<uint32_t>(at));
  for (size_t at : central) values.push_back(static_cast<uint32_t>(at));
  if (end != std::string::npos) values.push_back(static_cast<uint32_t>(end));
  const uint32_t value = values[rng() % values.size()] + static_cast<uint32_t>(rng() % 3) - 1;
  struct Field {
    size_t offset, width;
  };
  // central: method, crc, sizes, name/extra/comment lengths, disk, local offset
  static const Field central_fields[] = {{10, 2}, {16, 4}, {20, 4}, {24, 4}, {28, 2}, {30, 2}, {32, 2}, {34, 2}, {42, 4}};
  // local: flags, method, crc, sizes, name and extra lengths
  static const Field local_fields[] = {{6, 2}, {8, 2}, {14, 4}, {18, 4}, {22, 4}, {26, 2}, {28, 2}};
  // end: disk numbers, entry counts, directory size and offset, comment length
  static const Field end_fields[] = {{4, 2}, {6, 2}, {8, 2}, {10, 2}, {12, 4}, {16, 4}, {20, 2}};
  const unsigned pick = rng() % 3;
  size_t base = 0;
  Field field{};
  if (pick == 0 && !central.empty()) {
    base = central[rng() % central.size()];
    field = central_fields[rng() % std::size(central_fields)];
  } else if (pick == 1 && !local.empty()) {
    base = local[rng() % local.size()];
    field = local_fields[rng() % std::size(local_fields)];
  } else if (end != std::string::npos) {
    base = end;
    field = end_fields[rng() % std::size(end_fields)];
  } else {
    return;
  }
  if (base + field.offset + field.width > bytes.size()) return;
  if (field.width == 2) put16(bytes, base + field.offset, value);
  else put32(bytes, base + field.offset, value);
}

}  // namespace

size_t mutate_checkpoint(uint8_t* data, size_t size, size_t max_size, unsigned seed) {
  std::mt19937 rng(seed);
  std::string bytes(reinterpret_cast<const char*>(data), size);
  auto archive = parse(bytes);
  const unsigned kind = rng() % 10;
  if (!archive || kind == 9) {
    // Bytes, as libFuzzer would; a sealed file keeps a matching checksum.
    size_t n = LLVMFuzzerMutate(data, size, max_size);
    std::string mutated(reinterpret_cast<const char*>(data), n);
    reseal(mutated);
    std::memcpy(data, mutated.data(), n);
    return n;
  }
  if (kind == 8) {
    mutate_structure(bytes, rng);  // then only the checksum is made to match, not the zip CRC32s
    reseal(bytes);
  } else {
    auto& records = archive->records;
    if (records.empty()) records.push_back({"data.pkl", "\x80\x02}."});
    auto pickle = std::find_if(records.begin(), records.end(), [](const Record& r) { return r.name == "data.pkl"; });
    Record& record = (kind < 4 && pickle != records.end()) ? *pickle : records[rng() % records.size()];
    if (kind < 4 && record.name.size() > 4 && record.name.compare(record.name.size() - 4, 4, ".pkl") == 0) {
      record.data = mutate_pickle(record.data, rng);
    } else if (kind < 6) {
      std::string buffer = record.data;
      const size_t room = std::min<size_t>(buffer.size() * 2 + 64, kMaxRecord);
      buffer.resize(room);
      buffer.resize(LLVMFuzzerMutate(reinterpret_cast<uint8_t*>(buffer.data()), record.data.size(), room));
      record.data = std::move(buffer);
    } else {
      static const char* names[] = {"data.pkl", "constants.pkl", "version", "data/0", "data/1", "data/9",
                                    "code/__torch__.py", "byteorder", ".data/version"};
      switch (rng() % 4) {
        case 0: records.erase(records.begin() + static_cast<std::ptrdiff_t>(rng() % records.size())); break;
        case 1: records.push_back(records[rng() % records.size()]); break;
        case 2: record.name = names[rng() % std::size(names)]; break;
        default: std::swap(records[rng() % records.size()], records[rng() % records.size()]); break;
      }
    }
    bytes = serialize(*archive);
  }
  if (bytes.size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
  std::memcpy(data, bytes.data(), bytes.size());
  return bytes.size();
}

}  // namespace torchfit::fuzz
