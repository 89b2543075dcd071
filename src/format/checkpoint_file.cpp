#include "format/checkpoint_file.h"

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <new>
#include <stdexcept>

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <torch/serialize/input-archive.h>

#include "format/libtorch_pickle.h"
#include "format/python_pickle.h"
#include "format/state_dict.h"
#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

FileReader open_regular_file(const std::string& path) {
  std::error_code ec;
  auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(status)) throw CheckpointError(fmt::format("Checkpoint file {} does not exist", path));
  if (std::filesystem::is_directory(status)) {
    throw CheckpointError(fmt::format("Checkpoint path {} is a directory, not a file", path));
  }
  return FileReader(path);
}

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

/// Memory for storages read from the file: huge pages where it is large (see
/// allocate_for_filling), released by the storage like any other.
at::DataPtr storage_memory(size_t size) {
  void* data = allocate_for_filling(size);
  return at::DataPtr(data, data, [](void* p) { std::free(p); }, at::Device(at::kCPU));
}

/// One allocation shared by the storages of many small records, freed with the
/// last of them: thousands of separate allocations cost more than reading their
/// bytes. Each storage holds a reference.
class SharedBlock {
 public:
  /// Room for records of these sizes, each 64-byte aligned.
  static SharedBlock* create(const std::vector<uint64_t>& sizes) {
    uint64_t total = 0;
    for (auto size : sizes) total += slot_size(size);
    return new SharedBlock(storage_memory(total));
  }
  static uint64_t slot_size(uint64_t size) { return (std::max<uint64_t>(size, 1) + 63) / 64 * 64; }

  /// The next slot, sized for `size` bytes (slots are taken in create()'s order).
  at::DataPtr take(uint64_t size) {
    ++users_;
    void* data = static_cast<char*>(memory_.get()) + used_;
    used_ += slot_size(size);
    return at::DataPtr(data, this, &release, at::Device(at::kCPU));
  }
  /// The creator's own reference, released when the returned pointer dies.
  at::DataPtr owner() {
    ++users_;
    return at::DataPtr(nullptr, this, &release, at::Device(at::kCPU));
  }

 private:
  explicit SharedBlock(at::DataPtr memory) : memory_(std::move(memory)) {}
  static void release(void* context) {
    auto* block = static_cast<SharedBlock*>(context);
    if (block->users_.fetch_sub(1) == 1) delete block;
  }
  at::DataPtr memory_;
  uint64_t used_ = 0;
  std::atomic<uint64_t> users_{0};
};

/// Records smaller than this share one allocation.
constexpr uint64_t kSharedRecord = 64 << 10;

/// Refuses a foreign-file method on a file torchfit wrote (a misuse inside torchfit).
void expect_foreign(bool checksummed, const char* method) {
  if (checksummed) throw Error(fmt::format("CheckpointFile::{} is for files without a checksum; use read_all", method));
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

CheckpointFile::CheckpointFile(const std::string& path) : reader_(open_regular_file(path)) {
  guard_read(path, [&] {
    trailer_ = read_trailer(reader_);
    if (trailer_.integrity.status == Integrity::Status::Corrupt) {
      throw CheckpointError(fmt::format("Checkpoint {} is damaged: {}", path, trailer_.integrity.reason));
    }
    checksummed_ = trailer_.integrity.status == Integrity::Status::Intact;
    try {
      records_ = list_records(reader_);
    } catch (const CheckpointError&) {
      verify();  // a checksum mismatch explains a broken structure best
      throw;
    }
    for (const auto& [name, span] : records_) names_[span.offset] = name;
  });
}

void CheckpointFile::verify() const {
  if (!checksummed_ || verified_) return;
  auto integrity = check_integrity(reader_);
  if (integrity.status != Integrity::Status::Intact) {
    throw CheckpointError(fmt::format("Checkpoint {} is damaged: {}", path(), integrity.reason));
  }
  verified_ = true;
}

void CheckpointFile::read(const std::vector<ReadJob>& jobs) const {
  expect_foreign(checksummed_, "read");
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

DeferredPickle CheckpointFile::unpickle() const {
  auto pickle_record = records_.find("data.pkl");
  if (pickle_record == records_.end()) {
    throw CheckpointError(fmt::format("Checkpoint {} is damaged: it has no data.pkl record", path()));
  }
  expect_foreign(checksummed_, "unpickle");
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
    out.value = unpickle_python(pickle, allocate);
  } catch (const std::invalid_argument& e) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: {}", path(), e.what()));
  }
  return out;
}

c10::IValue CheckpointFile::read_all_once() const {
  auto damaged = [&](const std::string& what) {
    return CheckpointError(fmt::format("Checkpoint {} is damaged: {}", path(), what));
  };
  auto pickle_record = records_.find("data.pkl");
  if (pickle_record == records_.end()) throw damaged("it has no data.pkl record");
  std::string pickle(pickle_record->second.size, '\0');
  std::vector<ReadJob> jobs{{pickle_record->second, pickle.data()}};
  struct Storage {
    at::DataPtr data;
    const void* address;
    RecordSpan span;
  };
  std::map<std::string, Storage> storages;
  std::vector<uint64_t> small_sizes;
  for (const auto& [name, span] : records_) {
    if (name.rfind("data/", 0) != 0) continue;
    if (span.method != 0) throw damaged(fmt::format("record {} is compressed", name));
    // Records lie inside the checksummed bytes without overlapping (checked
    // below), so the allocations add up to less than the file's size.
    if (span.offset + span.size > trailer_.covered) throw damaged(fmt::format("record {} runs into the checksum", name));
    if (span.size < kSharedRecord) small_sizes.push_back(span.size);
  }
  SharedBlock* block = small_sizes.empty() ? nullptr : SharedBlock::create(small_sizes);
  at::DataPtr block_owner = block ? block->owner() : at::DataPtr();
  for (const auto& [name, span] : records_) {  // in the order small_sizes was built
    if (name.rfind("data/", 0) != 0) continue;
    auto data = span.size < kSharedRecord ? block->take(span.size) : storage_memory(span.size);
    const void* address = data.get();
    jobs.push_back({span, const_cast<void*>(address)});
    storages[name.substr(5)] = {std::move(data), address, span};
  }
  std::vector<const RecordSpan*> spans;
  for (const auto& job : jobs) spans.push_back(&job.span);
  std::sort(spans.begin(), spans.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i - 1]->offset + spans[i - 1]->size > spans[i]->offset) throw damaged("two records overlap");
  }
  uint32_t computed = read_once(reader_, jobs, trailer_.covered);
  if (computed != trailer_.checksum) throw damaged(checksum_mismatch(trailer_.checksum, computed).reason);
  verified_ = true;

  // The bytes of record "data/<key>": moved out the first time, copied after that.
  auto take = [&](const std::string& key) -> std::pair<at::DataPtr, RecordSpan> {
    auto it = storages.find(key);
    if (it == storages.end()) throw damaged(fmt::format("no record for storage {}", key));
    auto& storage = it->second;
    if (storage.data) return {std::move(storage.data), storage.span};
    auto copy = storage_memory(storage.span.size);
    if (storage.span.size > 0) std::memcpy(copy.get(), storage.address, storage.span.size);
    return {std::move(copy), storage.span};
  };
  if (auto fast = guard_read(path(), [&] { return read_libtorch_pickle(pickle); })) {
    for (auto& unbound : fast->storages) {
      if (unbound.storage.nbytes() == 0) continue;  // no bytes to read, as in LibTorch
      auto [data, span] = take(unbound.key);
      if (unbound.storage.nbytes() > span.size) throw damaged("a tensor overruns its record");
      unbound.storage.set_data_ptr_noswap(std::move(data));
    }
    return std::move(fast->value);
  }
  // Anything else LibTorch's Pickler may write goes to LibTorch's Unpickler.
  std::map<const void*, RecordSpan> taken;  // storage address to its record
  auto value = unpickle_trusted(
      pickle,
      [&](const std::string& key) {
        auto [data, span] = take(key);
        taken[data.get()] = span;
        return std::move(data);
      },
      path());
  check_within_records(value, taken, path());
  return value;
}

c10::IValue CheckpointFile::read_all() const {
  if (checksummed_) return read_all_once();
  auto pickle = unpickle();
  check_within_records(pickle.value, pickle.spans, path());
  std::vector<ReadJob> jobs;
  for (const auto& [data, span] : pickle.spans) jobs.push_back({span, const_cast<void*>(data)});
  read(jobs);
  return std::move(pickle.value);
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

void CheckpointFile::check_all_records() const {
  for (const auto& [name, span] : records_) check_record(reader_, name, span);
}

void CheckpointFile::load_archive(torch::serialize::InputArchive& archive) const {
  // LibTorch's importer trusts what it reads: only intact files reach it.
  if (checksummed_) {
    verify();
  } else {
    check_all_records();
  }
  auto read = [this](uint64_t position, void* buffer, size_t n) -> size_t {
    if (position >= reader_.size()) return 0;
    n = static_cast<size_t>(std::min<uint64_t>(n, reader_.size() - position));
    reader_.read_at(position, buffer, n);
    return n;
  };
  auto size = [this]() -> size_t { return static_cast<size_t>(reader_.size()); };
  try {
    archive.load_from(read, size, at::Device(at::kCPU));
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: not a readable LibTorch archive ({})", path(),
                                      e.what_without_backtrace()));
  } catch (...) {
    rethrow_as_checkpoint_error(path());
  }
}

}  // namespace torchfit::detail
