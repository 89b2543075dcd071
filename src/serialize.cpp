#include "torchfit/serialize.h"


#include <cstring>
#include <filesystem>
#include <sstream>

#include <c10/core/CPUAllocator.h>
#include <caffe2/serialize/inline_container.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/csrc/jit/serialization/unpickler.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "detail/atomic_file.h"
#include "detail/checkpoint_format.h"
#include "detail/module_tree.h"
#include "detail/python_pickle.h"
#include "detail/zip.h"
#include "torchfit/error.h"

namespace torchfit {
namespace {

// The model sits at the archive's root, as torch::save(module) writes it, so
// torch::load(module, path) reads a full checkpoint too. Our own entries share a
// prefix that flatten_archive skips.
constexpr const char* kReservedPrefix = "torchfit_";
constexpr const char* kFormatKey = "torchfit_format";
constexpr const char* kOptimizerKey = "torchfit_optimizer";
constexpr const char* kEpochKey = "torchfit_epoch";
constexpr const char* kGlobalStepKey = "torchfit_global_step";
constexpr const char* kBatchInEpochKey = "torchfit_batch_in_epoch";
constexpr const char* kCallbacksKey = "torchfit_callbacks";
constexpr const char* kSeedKey = "torchfit_seed";
constexpr const char* kEpochSumsKey = "torchfit_epoch_sums";
constexpr const char* kEpochWeightKey = "torchfit_epoch_weight";
constexpr const char* kRngKey = "torchfit_rng_state";
constexpr const char* kFullFormat = "torchfit.checkpoint.v1";

std::string describe(const at::Tensor& t) {
  return fmt::format("shape [{}] dtype {}", fmt::join(t.sizes(), ", "),
                     std::string(c10::toString(t.scalar_type())));
}

/// Commits `path` with whatever `write_archive(sink)` streams into the sink.
template <typename WriteFn>
void commit_archive(const std::string& path, bool fsync, WriteFn&& write_archive) {
  detail::check_not_directory(path, "the checkpoint");
  detail::create_parent_directories(path);
  detail::AtomicFile file(path, fsync);
  detail::ChecksumSink sink(file);
  try {
    write_archive(sink);
  } catch (const c10::Error& e) {
    sink.raise_if_failed();  // an I/O error explains a failing writer best
    throw CheckpointError(fmt::format("Failed writing checkpoint {}: {}", path, e.what_without_backtrace()));
  }
  file.commit();
}

/// LibTorch's writers take a std::function; this one feeds the sink.
std::function<size_t(const void*, size_t)> writer_for(detail::ChecksumSink& sink) {
  return [&sink](const void* data, size_t size) { return sink(data, size); };
}

/// Pickles `value` as torch.save does: "data.pkl" plus one record per storage.
void write_pickle(detail::ChecksumSink& sink, const c10::IValue& value) {
  std::vector<char> pickle;
  torch::jit::Pickler pickler(
      [&pickle](const char* data, size_t size) { pickle.insert(pickle.end(), data, data + size); },
      nullptr, nullptr, nullptr);
  pickler.protocol();
  pickler.pushIValue(value);
  pickler.stop();

  std::vector<torch::jit::WriteableTensorData> storages;
  uint64_t payload = pickle.size();
  for (const auto& tensor : pickler.tensorData()) {
    storages.push_back(torch::jit::getWriteableTensorData(tensor));
    payload += storages.back().sizeInBytes();
  }
  if (!detail::ZipWriter::fits(payload, storages.size() + 2)) {
    // zip64 territory: LibTorch's writer handles it (at its slower CRC speed).
    caffe2::serialize::PyTorchStreamWriter zip(writer_for(sink));
    torch::jit::writeArchiveAndTensors("data", pickle.data(), pickle.size(), pickler.tensorData(), zip);
    zip.writeEndOfFile();
    sink.finish();
    return;
  }
  detail::ZipWriter zip(sink, "archive");
  for (size_t i = 0; i < storages.size(); ++i) {
    zip.add("data/" + std::to_string(i), storages[i].data(), storages[i].sizeInBytes());
  }
  zip.add("data.pkl", pickle.data(), pickle.size());
  zip.add("version", "3\n", 2);
  zip.finish();
}

/// Loading verifies files that carry our checksum; files of other tools (no
/// checksum) are left to the zip reader.
void verify_for_load(const std::string& path) {
  auto integrity = detail::check_integrity(path);
  if (integrity.status == detail::Integrity::Status::Corrupt) {
    throw CheckpointError(fmt::format("Checkpoint {} is damaged: {}", path, integrity.reason));
  }
}

void flatten_archive(torch::serialize::InputArchive& archive, const std::string& prefix,
                     TensorMap& out) {
  for (const auto& key : archive.keys()) {
    if (prefix.empty() && key.rfind(kReservedPrefix, 0) == 0) continue;
    c10::IValue value;
    if (archive.try_read(key, value) && value.isTensor()) {
      out[prefix + key] = value.toTensor();
      continue;
    }
    torch::serialize::InputArchive child;
    if (archive.try_read(key, child)) flatten_archive(child, prefix + key + ".", out);
  }
}

void load_archive(torch::serialize::InputArchive& archive, const std::string& path) {
  try {
    archive.load_from(path, at::Device(at::kCPU));
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: not a readable LibTorch archive ({})",
                                      path, e.what_without_backtrace()));
  }
}

enum class ArchiveKind { Pickle, Module };

void check_file(const std::string& path) {
  if (!std::filesystem::exists(path)) {
    throw CheckpointError(fmt::format("Checkpoint file {} does not exist", path));
  }
  if (std::filesystem::is_directory(path)) {
    throw CheckpointError(fmt::format("Checkpoint path {} is a directory, not a file", path));
  }
}

/// Tells a pickled object from a module archive.
ArchiveKind archive_kind(const std::string& path) {
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    return reader.hasRecord("constants.pkl") ? ArchiveKind::Module : ArchiveKind::Pickle;
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: not a PyTorch zip archive ({})",
                                      path, e.what_without_backtrace()));
  }
}

TensorMap weights_from_ivalue(const c10::IValue& value, const std::string& path) {
  if (!value.isGenericDict()) {
    throw CheckpointError(fmt::format(
        "Failed reading checkpoint {}: expected a dict of tensors, found {}", path,
        value.tagKind()));
  }
  TensorMap out;
  for (const auto& entry : value.toGenericDict()) {
    if (!entry.key().isString() || !entry.value().isTensor()) {
      throw CheckpointError(fmt::format(
          "Failed reading checkpoint {}: expected a dict from names to tensors, found an "
          "entry of {} -> {}",
          path, entry.key().tagKind(), entry.value().tagKind()));
    }
    out[entry.key().toStringRef()] = entry.value().toTensor();
  }
  return out;
}

/// The tensors of a weights file we wrote, unpickled with their storages
/// allocated but not yet read; `spans` says where each storage's bytes lie.
struct PendingWeights {
  TensorMap tensors;
  std::map<const void*, detail::RecordSpan> spans;

  /// The read that fills `tensor`'s storage.
  detail::ReadJob fill(const at::Tensor& tensor) const {
    auto* data = tensor.storage().data();
    return {spans.at(data), const_cast<void*>(data)};
  }
};

/// Unpickles the "data.pkl" of a weights file we wrote (the pickle is small;
/// the storages are only allocated).
PendingWeights unpickle_weights(const detail::FileReader& file,
                                const std::map<std::string, detail::RecordSpan>& records) {
  const auto& path = file.path();
  const auto pickle_span = records.at("data.pkl");
  const std::string pickle = file.read_at(pickle_span.offset, pickle_span.size);
  size_t position = 0;
  auto reader = [&](char* buffer, size_t n) -> size_t {
    n = std::min(n, pickle.size() - position);
    std::memcpy(buffer, pickle.data() + position, n);
    position += n;
    return n;
  };
  PendingWeights pending;
  auto read_record = [&](const std::string& key) -> at::DataPtr {
    auto it = records.find("data/" + key);
    if (it == records.end()) {
      throw CheckpointError(fmt::format("Checkpoint {} is damaged: no record for storage {}", path, key));
    }
    auto data = c10::GetCPUAllocator()->allocate(it->second.size);
    pending.spans[data.get()] = it->second;
    return data;
  };
  torch::jit::Unpickler unpickler(reader, nullptr, nullptr, read_record, at::Device(at::kCPU));
  pending.tensors = weights_from_ivalue(unpickler.parse_ivalue(), path);
  for (const auto& [name, tensor] : pending.tensors) {
    auto it = pending.spans.find(tensor.storage().data());
    if (it == pending.spans.end() || tensor.storage().nbytes() > it->second.size) {
      throw CheckpointError(fmt::format("Checkpoint {} is damaged: tensor '{}' overruns its record", path, name));
    }
  }
  return pending;
}

/// For a weights file we wrote and that verifies, its unpickled tensors with
/// storages not yet read; nothing for other files (after checking they are not
/// damaged).
std::optional<PendingWeights> open_weights(const detail::FileReader& file) {
  auto integrity = detail::check_integrity(file);
  if (integrity.status == detail::Integrity::Status::Corrupt) {
    throw CheckpointError(fmt::format("Checkpoint {} is damaged: {}", file.path(), integrity.reason));
  }
  if (integrity.status != detail::Integrity::Status::Intact) return std::nullopt;
  auto records = detail::list_records(file);
  if (!records || !records->count("data.pkl") || records->count("constants.pkl")) return std::nullopt;
  try {
    return unpickle_weights(file, *records);
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: {}", file.path(), e.what_without_backtrace()));
  }
}

bool is_full_checkpoint(torch::serialize::InputArchive& archive) {
  c10::IValue format;
  return archive.try_read(kFormatKey, format) && format.isString() &&
         format.toStringRef() == kFullFormat;
}

/// Checks that `weights` fit the module exactly; returns the module's tensors by name.
TensorMap check_weights(const torch::nn::Module& module, const TensorMap& weights,
                        const std::string& path) {
  TensorMap expected = state_dict(module);
  for (const auto& [name, target] : expected) {
    auto it = weights.find(name);
    if (it == weights.end()) {
      throw CheckpointError(fmt::format(
          "Checkpoint {} does not match the model: missing key '{}' ({})", path, name,
          describe(target)));
    }
    const auto& source = it->second;
    if (source.sizes() != target.sizes() || source.scalar_type() != target.scalar_type()) {
      throw CheckpointError(fmt::format(
          "Checkpoint {} does not match the model: key '{}' has {} in the checkpoint but {} "
          "in the model",
          path, name, describe(source), describe(target)));
    }
  }
  for (const auto& [name, source] : weights) {
    if (!expected.count(name)) {
      throw CheckpointError(fmt::format(
          "Checkpoint {} does not match the model: unexpected key '{}' ({})", path, name,
          describe(source)));
    }
  }
  return expected;
}

void copy_weights(TensorMap& targets, const TensorMap& weights) {
  at::NoGradGuard no_grad;
  for (auto& [name, target] : targets) target.copy_(weights.at(name));
}

}  // namespace

namespace detail {

void commit_weights(const std::string& path, const ModuleTree& tree, bool fsync) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& [name, tensor] : tree.flatten()) dict.insert(name, tensor);
  commit_archive(path, fsync, [&](ChecksumSink& sink) { write_pickle(sink, c10::IValue(dict)); });
}

void commit_full(const std::string& path, const ModuleTree& tree, const torch::optim::Optimizer& optimizer,
                 const TrainerState& trainer, const std::map<std::string, CallbackState>& callbacks,
                 bool fsync) {
  torch::serialize::OutputArchive archive;
  tree.write(archive);
  archive.write(kFormatKey, c10::IValue(std::string(kFullFormat)));
  torch::serialize::OutputArchive optimizer_archive(archive.compilation_unit());
  optimizer.save(optimizer_archive);
  archive.write(kOptimizerKey, optimizer_archive);
  archive.write(kEpochKey, c10::IValue(trainer.epoch));
  archive.write(kGlobalStepKey, c10::IValue(trainer.global_step));
  archive.write(kBatchInEpochKey, c10::IValue(trainer.batch_in_epoch));
  archive.write(kSeedKey, c10::IValue(static_cast<int64_t>(trainer.seed)));
  c10::Dict<std::string, double> sums;
  for (const auto& [key, sum] : trainer.epoch_sums) sums.insert(key, sum);
  archive.write(kEpochSumsKey, c10::IValue(sums));
  archive.write(kEpochWeightKey, c10::IValue(trainer.epoch_weight));
  if (!trainer.rng_state.empty()) {
    auto rng = at::empty({static_cast<int64_t>(trainer.rng_state.size())}, at::kByte);
    std::memcpy(rng.data_ptr(), trainer.rng_state.data(), trainer.rng_state.size());
    archive.write(kRngKey, rng, /*is_buffer=*/true);
  }
  c10::Dict<std::string, c10::Dict<std::string, std::string>> states;
  for (const auto& [key, state] : callbacks) {
    c10::Dict<std::string, std::string> fields;
    for (const auto& [field, value] : state) fields.insert(field, value);
    states.insert(key, fields);
  }
  archive.write(kCallbacksKey, c10::IValue(states));
  commit_archive(path, fsync, [&](ChecksumSink& sink) {
    archive.save_to(writer_for(sink));
    sink.finish();
  });
}

}  // namespace detail

TensorMap state_dict(const torch::nn::Module& module) {
  TensorMap out;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    out[item.key()] = item.value().detach();
  }
  for (const auto& item : module.named_buffers(/*recurse=*/true)) {
    out[item.key()] = item.value().detach();
  }
  return out;
}

void save_weights(const torch::nn::Module& module, const std::string& path, bool fsync) {
  detail::commit_weights(path, detail::ModuleTree::of(module), fsync);
}

void save_checkpoint(const std::string& path, const torch::nn::Module& module,
                     const torch::optim::Optimizer& optimizer, const TrainerState& trainer,
                     const std::map<std::string, CallbackState>& callbacks, bool fsync) {
  detail::commit_full(path, detail::ModuleTree::of(module), optimizer, trainer, callbacks, fsync);
}

VerifyResult verify_checkpoint(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) {
    return {false, fmt::format("{} does not exist or is not a regular file", path)};
  }
  try {
    auto integrity = detail::check_integrity(path);
    if (integrity.status != detail::Integrity::Status::Intact) return {false, integrity.reason};
    caffe2::serialize::PyTorchStreamReader reader(path);
    if (!reader.hasRecord("data.pkl")) return {false, "the archive has no data.pkl record"};
  } catch (const std::exception& e) {
    return {false, e.what()};
  }
  return {true, ""};
}

/// Weights of files `open_weights` leaves to others (already checked): module
/// archives, zip64 files and files of other tools.
TensorMap read_other_weights(const std::string& path) {
  // Module archives, zip64 files and files of other tools go through LibTorch's
  // zip reader; pickles (Python's torch.save of a state_dict included) through ours.
  if (archive_kind(path) == ArchiveKind::Pickle) {
    try {
      caffe2::serialize::PyTorchStreamReader reader(path);
      auto [pickle, size] = reader.getRecord("data.pkl");
      auto read_storage = [&](const std::string& key, at::ScalarType dtype, int64_t numel) {
        auto [data, bytes] = reader.getRecord("data/" + key);
        auto needed = static_cast<size_t>(numel) * c10::elementSize(dtype);
        if (bytes < needed) {
          throw std::invalid_argument(fmt::format("storage {} holds {} bytes, {} needed", key, bytes, needed));
        }
        auto tensor = at::empty({numel}, at::TensorOptions().dtype(dtype));
        std::memcpy(tensor.data_ptr(), data.get(), needed);
        return tensor;
      };
      return detail::unpickle_state_dict(std::string(static_cast<const char*>(pickle.get()), size), read_storage,
                                         path);
    } catch (const c10::Error& e) {
      throw CheckpointError(fmt::format("Failed reading checkpoint {}: {}", path,
                                        e.what_without_backtrace()));
    }
  }
  torch::serialize::InputArchive archive;
  load_archive(archive, path);
  TensorMap out;
  flatten_archive(archive, "", out);  // full checkpoints and plain torch::save(module) archives
  return out;
}

TensorMap read_weights(const std::string& path) {
  check_file(path);
  {
    detail::FileReader file(path);
    if (auto pending = open_weights(file)) {
      std::vector<detail::ReadJob> jobs;
      for (const auto& [data, span] : pending->spans) jobs.push_back({span, const_cast<void*>(data)});
      detail::read_parallel(file, jobs);
      return std::move(pending->tensors);
    }
  }
  return read_other_weights(path);
}

void assign_weights(torch::nn::Module& module, const TensorMap& weights, const std::string& path) {
  TensorMap targets = check_weights(module, weights, path);
  copy_weights(targets, weights);
}

void load_weights(torch::nn::Module& module, const std::string& path) {
  check_file(path);
  detail::FileReader file(path);
  auto pending = open_weights(file);
  if (!pending) return assign_weights(module, read_other_weights(path), path);
  // Verified and matched before anything is written: then each tensor's bytes go
  // straight from the file into the parameter, where layouts allow.
  TensorMap targets = check_weights(module, pending->tensors, path);
  std::vector<detail::ReadJob> direct, staged;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  for (auto& [name, target] : targets) {
    const auto& source = pending->tensors.at(name);
    auto job = pending->fill(source);
    bool in_place = target.device().is_cpu() && target.is_contiguous() && source.is_contiguous() &&
                    source.storage_offset() == 0 && source.nbytes() == job.span.size;
    if (in_place) {
      direct.push_back({job.span, target.data_ptr()});
    } else {
      staged.push_back(job);
      copies.emplace_back(target, source);
    }
  }
  direct.insert(direct.end(), staged.begin(), staged.end());
  detail::read_parallel(file, direct);
  at::NoGradGuard no_grad;
  for (auto& [target, source] : copies) target.copy_(source);
  for (auto& [name, target] : targets) target.unsafeGetTensorImpl()->bump_version();
}

CheckpointContents load_checkpoint(const std::string& path, torch::nn::Module& module,
                                   torch::optim::Optimizer& optimizer) {
  check_file(path);
  verify_for_load(path);
  if (archive_kind(path) == ArchiveKind::Pickle) {
    throw CheckpointError(fmt::format(
        "Checkpoint {} is not a full torchfit checkpoint: it holds weights only (use load_weights)",
        path));
  }
  torch::serialize::InputArchive archive;
  load_archive(archive, path);
  if (!is_full_checkpoint(archive)) {
    throw CheckpointError(fmt::format(
        "Checkpoint {} is not a full torchfit checkpoint (a weights-only file? use "
        "load_weights)",
        path));
  }
  CheckpointContents contents;
  try {
    flatten_archive(archive, "", contents.weights);
    c10::IValue value;
    archive.read(kEpochKey, value);
    contents.trainer.epoch = value.toInt();
    archive.read(kGlobalStepKey, value);
    contents.trainer.global_step = value.toInt();
    archive.read(kBatchInEpochKey, value);
    contents.trainer.batch_in_epoch = value.toInt();
    if (archive.try_read(kSeedKey, value)) contents.trainer.seed = static_cast<uint64_t>(value.toInt());
    if (archive.try_read(kEpochSumsKey, value)) {
      for (const auto& entry : value.toGenericDict()) {
        contents.trainer.epoch_sums[entry.key().toStringRef()] = entry.value().toDouble();
      }
    }
    if (archive.try_read(kEpochWeightKey, value)) contents.trainer.epoch_weight = value.toDouble();
    at::Tensor rng;
    if (archive.try_read(kRngKey, rng, /*is_buffer=*/true)) {
      rng = rng.contiguous();
      contents.trainer.rng_state.assign(rng.data_ptr<uint8_t>(), rng.data_ptr<uint8_t>() + rng.numel());
    }
    archive.read(kCallbacksKey, value);
    for (const auto& entry : value.toGenericDict()) {
      CallbackState& state = contents.callbacks[entry.key().toStringRef()];
      for (const auto& field : entry.value().toGenericDict()) {
        state[field.key().toStringRef()] = field.value().toStringRef();
      }
    }
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: {}", path,
                                      e.what_without_backtrace()));
  }
  TensorMap targets = check_weights(module, contents.weights, path);

  // Keep the optimizer's current state so a failed load changes nothing.
  std::ostringstream backup;
  {
    torch::serialize::OutputArchive saved;
    optimizer.save(saved);
    saved.save_to(backup);
  }
  try {
    torch::serialize::InputArchive optimizer_archive;
    archive.read(kOptimizerKey, optimizer_archive);
    optimizer.load(optimizer_archive);
  } catch (const c10::Error& e) {
    std::istringstream in(backup.str());
    torch::serialize::InputArchive saved;
    saved.load_from(in);
    optimizer.load(saved);
    throw CheckpointError(fmt::format(
        "Checkpoint {} does not match the optimizer: {}", path, e.what_without_backtrace()));
  }
  copy_weights(targets, contents.weights);
  return contents;
}

}  // namespace torchfit
