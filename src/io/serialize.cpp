#include "torchfit/serialize.h"

#include <cstring>
#include <filesystem>

#include <ATen/ATen.h>
#include <caffe2/serialize/inline_container.h>
#include <fmt/format.h>
#include <torch/nn/module.h>
#include <torch/serialize/input-archive.h>

#include "format/module_archive.h"
#include "format/pickle_file.h"
#include "format/python_pickle.h"
#include "format/state_dict.h"
#include "format/zip.h"
#include "io/atomic_file.h"
#include "torchfit/error.h"
#include "torchfit/io/checkpoint_io.h"

namespace torchfit {
namespace {

using detail::archive_kind;
using detail::ArchiveKind;

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
  auto pickle = detail::unpickle_deferred(file, records);
  PendingWeights pending;
  pending.tensors = detail::select_weights(pickle.value, path);
  // Only the storages of the selected tensors stay allocated (a full checkpoint
  // also holds optimizer state): keep just their spans.
  for (const auto& [name, tensor] : pending.tensors) {
    auto it = pickle.spans.find(tensor.storage().data());
    if (it == pickle.spans.end() || tensor.storage().nbytes() > it->second.size) {
      throw CheckpointError(fmt::format("Checkpoint {} is damaged: tensor '{}' overruns its record", path, name));
    }
    pending.spans.insert(*it);
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

}  // namespace

void save_weights(const torch::nn::Module& module, const std::string& path, const SaveOptions& options) {
  c10::impl::GenericDict dict(c10::StringType::get(), c10::TensorType::get());
  for (const auto& [name, tensor] : state_dict(module)) dict.insert(name, tensor);
  FileCheckpointIO(options).save(dict, path);
}

void save_weights(const torch::nn::Module& module, const std::string& path, bool fsync) {
  save_weights(module, path, SaveOptions().fsync(fsync));
}

VerifyResult verify_checkpoint(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return {false, fmt::format("{} does not exist or is not a regular file", path)};
  }
  try {
    auto integrity = detail::check_integrity(path);
    if (integrity.status != detail::Integrity::Status::Intact) return {false, integrity.reason};
    caffe2::serialize::PyTorchStreamReader reader(path);
    if (!reader.hasRecord("data.pkl")) return {false, "the archive has no data.pkl record"};
  } catch (const std::exception& e) {
    return {false, e.what()};
  } catch (...) {
    return {false, "unknown error while reading"};
  }
  return {true, ""};
}

namespace {

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
  detail::load_archive(archive, path);
  TensorMap out;
  detail::flatten_archive(archive, "", out);  // full checkpoints and plain torch::save(module) archives
  return out;
}

}  // namespace

TensorMap read_weights(const std::string& path) {
  detail::check_readable_file(path);
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
  TensorMap targets = detail::check_weights(module, weights, path);
  detail::copy_weights(targets, weights);
}

void load_weights(torch::nn::Module& module, const std::string& path) {
  detail::check_readable_file(path);
  detail::FileReader file(path);
  auto pending = open_weights(file);
  if (!pending) return assign_weights(module, read_other_weights(path), path);
  // Verified and matched before anything is written: then each tensor's bytes go
  // straight from the file into the parameter, where layouts allow.
  TensorMap targets = detail::check_weights(module, pending->tensors, path);
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

}  // namespace torchfit
