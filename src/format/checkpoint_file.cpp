#include "format/checkpoint_file.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <new>
#include <optional>
#include <set>
#include <stdexcept>
#include <utility>

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>

#include "format/libtorch_pickle.h"
#include "format/load_memory.h"
#include "format/python_pickle.h"
#include "format/state_dict.h"
#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

/// Throws unless every tensor of `value` lies inside the record its storage was read from.
void check_within_records(const c10::IValue& value, const std::map<const void*, RecordSpan>& spans,
                          const std::string& path) {
  for_each_tensor(value, [&](const at::Tensor& tensor) {
    if (tensor.storage().nbytes() == 0) return;
    auto it = spans.find(tensor.storage().data());
    if (it == spans.end() || tensor.storage().nbytes() > it->second.size) {
      throw CheckpointError(fmt::format("Checkpoint {} is damaged: a tensor overruns its record", path));
    }
  });
}

/// One allocation holding a stretch of the file with many small records, shared
/// by their storages and freed with the last of them: thousands of separate
/// allocations and copies cost more than reading their bytes. The local headers
/// between the records come along (about 2 % for 4 KiB records).
class SharedBlock {
 public:
  /// A block of `size` bytes, owned by the returned pointer until storages share it.
  static at::DataPtr create(uint64_t size) {
    auto* block = new SharedBlock(load_memory(size));
    return block->share(0);
  }
  static SharedBlock& of(const at::DataPtr& owner) { return *static_cast<SharedBlock*>(owner.get_context()); }

  /// The bytes from `offset` on, as a storage's pointer holding a reference.
  at::DataPtr share(uint64_t offset) {
    ++users_;
    return at::DataPtr(static_cast<char*>(memory_.get()) + offset, this, &release, at::Device(at::kCPU));
  }

 private:
  explicit SharedBlock(at::DataPtr memory) : memory_(std::move(memory)) {}
  static void release(void* context) {
    auto* block = static_cast<SharedBlock*>(context);
    if (block->users_.fetch_sub(1) == 1) delete block;
  }
  at::DataPtr memory_;
  std::atomic<uint64_t> users_{0};
};

/// The number a storage key spells in decimal without leading zeros, as LibTorch numbers them.
std::optional<size_t> storage_number(std::string_view key) {
  if (key.empty() || key.size() > 9 || (key[0] == '0' && key.size() > 1)) return std::nullopt;
  size_t number = 0;
  for (char c : key) {
    if (c < '0' || c > '9') return std::nullopt;
    number = number * 10 + static_cast<size_t>(c - '0');
  }
  return number;
}

/// Storage records smaller than this are read in stretches, into shared blocks.
constexpr uint64_t kSharedRecord = 64 << 10;

/// Files read whole from their opening: those of kHelpedRead and more (smaller ones are read on
/// the calling thread) up to 64 MiB whose records average under 16 KiB. Most of their storages
/// would share blocks anyway (kSharedRecord), and parsing a directory and pickle of thousands
/// of records took as long as the read (2000 x 4 KiB: 0.8 ms before the first byte was read,
/// in save_bench's rounds).
bool read_from_opening(uint64_t covered, uint64_t records) {
  return covered >= kHelpedRead && covered <= (64u << 20) && records > 0 &&
         covered / records < (16u << 10);
}

/// Refuses a foreign-file method on a file torchfit wrote (a misuse inside torchfit).
void expect_record_by_record(bool whole, const char* method) {
  if (whole) throw Error(fmt::format("CheckpointFile::{} is for files without a checksum; use read_all", method));
}

}  // namespace

void rethrow_as_checkpoint_error(const std::string& path) {
  try {
    throw;
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: {}", path, e.what_without_backtrace()));
  } catch (const std::bad_alloc&) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: out of memory", path));
  } catch (const std::exception& e) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: {}", path, e.what()));
  } catch (...) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: an unknown error", path));
  }
}

CheckpointFile::CheckpointFile(const std::string& path) : reader_(path) {
  guard_read(path, [&] {
    trailer_ = read_trailer(reader_);
    if (trailer_.integrity.status == Integrity::Status::Corrupt) {
      throw damaged_checkpoint(path, trailer_.integrity.reason);
    }
    checksummed_ = trailer_.integrity.status == Integrity::Status::Intact;
    try {
      const auto location = locate_directory(reader_);
      if (checksummed_ && read_from_opening(trailer_.covered, location.count)) {
        keep_load_memory_for(trailer_.covered);  // as read_all_once does
        whole_ = SharedBlock::create(trailer_.covered);
        reading_ = std::make_unique<BackgroundRead>(reader_, whole_.get(), trailer_.covered);
      } else if (checksummed_) {
        expect_read_once(trailer_.covered);  // every such file is read whole
      }
      // A checksummed file is read whole, local headers included: read_all_once
      // resolves the offsets then.
      auto directory = read_directory(reader_, location, /*read_local_headers=*/!checksummed_);
      // A module archive (0.1 full checkpoints) is read record by record, as another tool's file.
      if (checksummed_ && directory.records.count("constants.pkl") > 0) {
        directory = read_directory(reader_, location, /*read_local_headers=*/true);
      }
      records_ = std::move(directory.records);
      directory_offset_ = directory.directory_offset;
    } catch (const CheckpointError&) {
      verify();  // a checksum mismatch explains a broken structure best
      throw;
    }
    if (!checksummed_ || is_module_archive()) {
      for (const auto& [name, span] : records_) names_[span.offset] = name;
    }
  });
}

void CheckpointFile::verify() const {
  if (!checksummed_ || verified_) return;
  if (reading_) {
    const uint32_t computed = std::exchange(reading_, nullptr)->finish();
    if (computed != trailer_.checksum) {
      throw damaged_checkpoint(path(), checksum_mismatch(trailer_.checksum, computed).reason);
    }
    verified_ = true;
    return;
  }
  auto integrity = check_integrity(reader_);
  if (integrity.status != Integrity::Status::Intact) {
    throw damaged_checkpoint(path(), integrity.reason);
  }
  verified_ = true;
}

void CheckpointFile::read(const std::vector<ReadJob>& jobs) const {
  expect_record_by_record(read_whole(), "read");
  for (const auto& job : jobs) {
    if (job.span.method != 0) {
      throw CheckpointError(fmt::format("Checkpoint {} is damaged: record {} is compressed; torch.save stores "
                                        "pickles and tensors uncompressed",
                                        path(), names_.at(job.span.offset)));
    }
  }
  read_parallel(reader_, jobs);
  for (const auto& job : jobs) check_record_crc(reader_, names_.at(job.span.offset), job.span, job.destination);
}

DeferredPickle CheckpointFile::unpickle(bool script_objects) const {
  auto pickle_record = records_.find("data.pkl");
  if (pickle_record == records_.end()) {
    throw CheckpointError(fmt::format("Checkpoint {} is damaged: it has no data.pkl record", path()));
  }
  expect_record_by_record(read_whole(), "unpickle");
  std::string pickle(pickle_record->second.size, '\0');
  read({{pickle_record->second, pickle.data()}});
  DeferredPickle out;
  auto allocate = [&](const std::string& key, size_t nbytes) {
    auto it = records_.find("data/" + key);
    if (it == records_.end()) throw std::invalid_argument(fmt::format("no record for storage {}", key));
    if (it->second.size != nbytes) {
      throw std::invalid_argument(fmt::format("storage {} claims {} bytes, its record holds {}", key, nbytes,
                                              it->second.size));
    }
    auto data = c10::GetCPUAllocator()->allocate(nbytes);
    if (nbytes > 0) out.spans[data.get()] = it->second;
    return data;
  };
  try {
    out.value = unpickle_python(pickle, allocate, script_objects);
  } catch (const std::invalid_argument& e) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: {}", path(), e.what()));
  }
  return out;
}

c10::IValue CheckpointFile::read_all_once(const Inspect& inspect, const Shortcut& shortcut) const {
  auto damaged = [&](const std::string& what) { return damaged_checkpoint(path(), what); };
  if (!records_.count("data.pkl")) throw damaged("it has no data.pkl record");
  const bool whole = static_cast<bool>(whole_);
  if (!whole) keep_load_memory_for(trailer_.covered);  // the next load of this file reads into this one's memory
  struct Record {
    const std::string* name;
    RecordSpan span;
    uint64_t bound = 0;
    bool storage = false;
    at::DataPtr data;  // a storage's bytes until a tensor takes them
    const void* address = nullptr;
  };
  // By name, as records_ (storages are looked up by name), and in file order:
  // each must end before the next one's local header, or before the directory
  // for the last.
  std::vector<Record> records;
  records.reserve(records_.size());
  for (const auto& [name, span] : records_) records.push_back({&name, span, 0, name.rfind("data/", 0) == 0, {}, nullptr});
  std::vector<Record*> order;
  order.reserve(records.size());
  for (auto& record : records) order.push_back(&record);
  auto in_file_order = [](const Record* a, const Record* b) { return a->span.local < b->span.local; };
  if (!std::is_sorted(order.begin(), order.end(), in_file_order)) std::sort(order.begin(), order.end(), in_file_order);
  for (size_t i = 0; i < order.size(); ++i) {
    auto& record = *order[i];
    record.bound = i + 1 < order.size() ? order[i + 1]->span.local : directory_offset_;
    if (record.bound > trailer_.covered) throw damaged(fmt::format("record {} runs into the checksum", *record.name));
    if (record.storage && record.span.method != 0) throw damaged(fmt::format("record {} is compressed", *record.name));
  }
  auto check_within_bound = [&](const Record& record) {
    if (record.span.offset + record.span.size > record.bound) {
      throw damaged(fmt::format("record {} overlaps the next one", *record.name));
    }
  };
  auto keep = [](Record& record, at::DataPtr data) {
    record.address = data.get();
    record.data = std::move(data);
  };

  // Consecutive small storage records are read as one stretch of the file each,
  // straight into a shared block; every other record on its own.
  struct Stretch {
    size_t first, last;  // into order
    at::DataPtr block;
    uint64_t lead = 0;  // bytes before the stretch's first, so that block and file agree mod 64
  };
  std::vector<Stretch> stretches;
  ScratchBytes pickle_memory;
  std::string& pickle = pickle_memory.get();
  uint64_t pickle_offset = 0;
  std::vector<ReadJob> jobs;
  for (size_t i = 0; i < order.size(); ++i) {
    auto& record = *order[i];
    if (whole && *record.name != "data.pkl") continue;  // each resolved from the block once read
    if (record.storage && record.span.size < kSharedRecord) {
      if (stretches.empty() || stretches.back().last + 1 != i) stretches.push_back({i, i, {}});
      stretches.back().last = i;
      continue;
    }
    resolve_offset(reader_, *record.name, record.span);
    check_within_bound(record);
    if (*record.name == "data.pkl") {
      pickle_offset = record.span.offset;
      pickle.resize(record.span.size);
      reader_.read_at(record.span.offset, pickle.data(), pickle.size());
      jobs.push_back({record.span, pickle.data(), /*filled=*/true});
    } else if (record.storage) {
      auto data = load_memory(record.span.size);
      jobs.push_back({record.span, data.get()});
      keep(record, std::move(data));
    }
  }
  for (auto& stretch : stretches) {
    const uint64_t begin = order[stretch.first]->span.local, end = order[stretch.last]->bound;
    // The kernel's copy (rep movsb) runs about 10 x slower on AMD CPUs when the destination lies
    // 1 to 31 bytes past the source modulo the page: start the block where the file is mod 64.
    stretch.lead = begin % 64;
    stretch.block = SharedBlock::create(stretch.lead + end - begin);
    jobs.push_back({RecordSpan{begin, end - begin}, static_cast<char*>(stretch.block.get()) + stretch.lead});
  }
  // The pickle is parsed while the rest of the file is read and checksummed: for
  // many small tensors the two take about as long. Its result counts only once
  // the checksum matched, and its storages are bound only then.
  uint32_t computed = 0;
  LibTorchPickle parsed;
  bool shortcut_taken = false;
  std::exception_ptr parse_error;
  // The parse stays on the calling thread, whose modes (inference mode) the tensors take.
  auto parse = [&] {
    try {
      shortcut_taken = shortcut.recognise && shortcut.recognise(pickle);
      if (shortcut_taken) return;
      parsed = guard_read(path(), [&] { return read_libtorch_pickle(pickle); });
      if (inspect) inspect(parsed.value);
    } catch (...) {
      parse_error = std::current_exception();
    }
  };
  if (whole) {
    parse();  // while the helper reads
    computed = reading_ ? std::exchange(reading_, nullptr)->finish() : trailer_.checksum;  // or verify() did
  } else {
    computed = read_once(reader_, jobs, trailer_.covered, parse);
  }
  if (computed != trailer_.checksum) throw damaged(checksum_mismatch(trailer_.checksum, computed).reason);
  if (whole) {
    // The pickle parsed was read on its own: it counts only as the checksummed copy's twin.
    if (std::memcmp(pickle.data(), static_cast<const char*>(whole_.get()) + pickle_offset, pickle.size()) != 0) {
      throw damaged("its pickle changed while it was read");
    }
  }
  if (parse_error) std::rethrow_exception(parse_error);
  verified_ = true;
  if (whole) {
    const auto* bytes = static_cast<const unsigned char*>(whole_.get());
    for (auto* record : order) {
      if (record->bound - record->span.local < kLocalHeaderSize) {
        throw damaged(fmt::format("record {} overlaps the next one", *record->name));
      }
      resolve_offset(reader_, *record->name, record->span, bytes + record->span.local);
      check_within_bound(*record);
      if (record->storage) keep(*record, SharedBlock::of(whole_).share(record->span.offset));
    }
  }
  for (auto& stretch : stretches) {
    const uint64_t begin = order[stretch.first]->span.local;
    auto* bytes = static_cast<const unsigned char*>(stretch.block.get()) + stretch.lead;
    for (size_t i = stretch.first; i <= stretch.last; ++i) {
      auto& record = *order[i];
      if (record.bound - record.span.local < kLocalHeaderSize) {
        throw damaged(fmt::format("record {} overlaps the next one", *record.name));
      }
      resolve_offset(reader_, *record.name, record.span, bytes + (record.span.local - begin));
      check_within_bound(record);
      keep(record, SharedBlock::of(stretch.block).share(stretch.lead + record.span.offset - begin));
    }
  }

  // The bytes of record "data/<key>": moved out the first time, copied after that. Keys are
  // numbers from 0 up in files torchfit and LibTorch write: those are found without a search.
  std::vector<Record*> by_number(records.size());
  for (auto& record : records) {
    if (!record.storage) continue;
    const auto number = storage_number(std::string_view(*record.name).substr(5));
    if (number && *number < by_number.size()) by_number[*number] = &record;
  }
  std::string name;
  const TakeStorage take = [&](std::string_view key, size_t nbytes) {
    const auto number = storage_number(key);
    Record* found = number && *number < by_number.size() ? by_number[*number] : nullptr;
    if (found == nullptr) {  // `records` lists records_ in its order
      name.assign("data/").append(key);
      const auto it = records_.find(name);
      if (it == records_.end()) throw damaged(fmt::format("no record for storage {}", key));
      found = &records[static_cast<size_t>(it - records_.begin())];
    }
    auto& storage = *found;
    if (nbytes > storage.span.size) throw damaged("a tensor overruns its record");
    if (storage.data) return std::move(storage.data);
    auto copy = load_memory(storage.span.size);
    if (storage.span.size > 0) std::memcpy(copy.get(), storage.address, storage.span.size);
    return copy;
  };
  if (shortcut_taken) {
    shortcut.bind(take);
    return c10::IValue();
  }
  for (auto& unbound : parsed.storages) {
    if (unbound.storage.nbytes() == 0) continue;  // no bytes to read, as in LibTorch
    unbound.storage.set_data_ptr_noswap(take(unbound.key, unbound.storage.nbytes()));
  }
  return std::move(parsed.value);
}

c10::IValue CheckpointFile::read_all(const Inspect& inspect, const Shortcut& shortcut) const {
  if (read_whole()) return read_all_once(inspect, shortcut);
  verify();  // a module archive of ours: its checksum first
  return read_records(unpickle(), inspect);
}

c10::IValue CheckpointFile::read_records(DeferredPickle pickle, const Inspect& inspect) const {
  check_within_records(pickle.value, pickle.spans, path());
  if (inspect) inspect(pickle.value);
  // Only storages the value still holds are read: one the pickle made and dropped is freed already.
  std::set<const void*> held;
  for_each_tensor(pickle.value, [&](const at::Tensor& tensor) { held.insert(tensor.storage().data()); });
  std::vector<ReadJob> jobs;
  for (const auto& [data, span] : pickle.spans) {
    if (held.count(data) > 0) jobs.push_back({span, const_cast<void*>(data)});
  }
  read(jobs);
  return std::move(pickle.value);
}

c10::IValue CheckpointFile::read_module_archive() const {
  if (!is_module_archive()) {
    throw CheckpointError(fmt::format("Checkpoint {} is not a LibTorch module archive (it has no constants.pkl)", path()));
  }
  verify();
  return read_records(unpickle(/*script_objects=*/true), {});
}

c10::IValue CheckpointFile::read_torchfit() const {
  if (!checksummed_) {
    throw CheckpointError(fmt::format(
        "Checkpoint {} carries no torchfit checksum (written by another tool); torchfit::load reads files "
        "torchfit wrote. For state dicts of other tools use load_weights",
        path()));
  }
  if (is_module_archive()) {
    throw CheckpointError(fmt::format(
        "Checkpoint {} is a torchfit 0.1 full checkpoint (a LibTorch module archive); read it with "
        "Trainer::load_checkpoint or load_checkpoint(module, optimizer, path)",
        path()));
  }
  return read_all();
}


}  // namespace torchfit::detail
