#include "torchfit/serialize.h"

#include <map>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <torch/nn/module.h>

#include "format/checkpoint_file.h"
#include "format/load_memory.h"
#include "format/module_archive.h"
#include "format/state_dict.h"
#include "torchfit/error.h"
#include "torchfit/io/checkpoint_io.h"

namespace torchfit {
namespace {

/// The weights of an open file with their storages allocated but not yet read:
/// checks against a model happen before any byte of a tensor is read.
struct PendingWeights {
  TensorMap tensors;
  std::vector<detail::ReadJob> reads;
};

PendingWeights pending_weights(const detail::CheckpointFile& file, const std::string& key) {
  const auto& path = file.path();
  auto pickle = file.unpickle();
  PendingWeights pending;
  pending.tensors = detail::select_weights(pickle.value, path, key);
  // Only the storages of the selected tensors are read (a full checkpoint also
  // holds optimizer state).
  std::map<const void*, detail::RecordSpan> spans;
  for (const auto& [name, tensor] : pending.tensors) {
    if (tensor.storage().nbytes() == 0) continue;
    auto it = pickle.spans.find(tensor.storage().data());
    if (it == pickle.spans.end() || tensor.storage().nbytes() > it->second.size) {
      throw CheckpointError(fmt::format("Checkpoint {} is damaged: tensor '{}' overruns its record", path, name));
    }
    spans.insert(*it);
  }
  for (const auto& [data, span] : spans) pending.reads.push_back({span, const_cast<void*>(data)});
  return pending;
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

VerifyResult verify_checkpoint(const std::string& path) noexcept {
  try {
    detail::CheckpointFile file(path);
    if (!file.checksummed()) {
      return {false, fmt::format("{} carries no torchfit checksum (written by another tool)", path)};
    }
    file.verify();
    if (!file.records().count("data.pkl")) return {false, fmt::format("{} has no data.pkl record", path)};
  } catch (const std::exception& e) {
    return {false, e.what()};
  } catch (...) {
    return {false, fmt::format("{}: an unknown error while reading", path)};
  }
  return {true, ""};
}

TensorMap read_weights(const std::string& path, const std::string& key) {
  return detail::read_checkpoint_file(
      path,
      [&](const detail::CheckpointFile& file) {
        if (file.checksummed()) return detail::select_weights(file.read_all(), path, key);  // one pass
        auto pending = pending_weights(file, key);
        file.read(pending.reads);
        return std::move(pending.tensors);
      },
      [](const detail::CheckpointFile& file) { return detail::read_archive_weights(file); });
}

TensorMap read_weights(const std::string& path) { return read_weights(path, ""); }

void assign_weights(torch::nn::Module& module, const TensorMap& weights, const std::string& path) {
  detail::guard_read(path, [&] {
    TensorMap targets = detail::check_weights(module, weights, path);
    detail::copy_weights(targets, weights);
  });
}

void load_weights(torch::nn::Module& module, const std::string& path, const std::string& key) {
  // Installed only after every byte was read and checked: a failing read changes nothing.
  const std::string where = key.empty() ? path : path + " [" + key + "]";
  detail::read_checkpoint_file(
      path,
      [&](const detail::CheckpointFile& file) {
        if (file.checksummed()) {  // one pass over the file, matched against the model while it is read
          // A plain weights file that fits the model has its bytes bound straight to the model's tensors.
          std::optional<detail::DirectLoad> direct;
          detail::CheckpointFile::Shortcut shortcut;
          if (key.empty()) {
            shortcut.recognise = [&](std::string_view pickle) {
              direct = detail::DirectLoad::plan(module, pickle);
              return direct.has_value();
            };
            shortcut.bind = [&](const detail::TakeStorage& take) { direct->bind(take); };
          }
          TensorMap weights, targets;
          auto inspect = [&](const c10::IValue& value) {
            weights = detail::select_weights(value, path, key);
            targets = detail::check_weights(module, weights, where);
          };
          file.read_all(inspect, shortcut);
          if (!direct) detail::install_weights(targets, weights);
          return;
        }
        // Another tool's file: matched against the model before a byte of a tensor is read.
        auto pending = pending_weights(file, key);
        auto targets = detail::check_weights(module, pending.tensors, where);
        file.read(pending.reads);
        detail::install_weights(targets, pending.tensors);
      },
      [&](const detail::CheckpointFile& file) {
        auto weights = detail::read_archive_weights(file);
        auto targets = detail::check_weights(module, weights, path);
        detail::install_weights(targets, weights);
      });
}

void load_weights(torch::nn::Module& module, const std::string& path) { load_weights(module, path, ""); }

void release_load_memory() { detail::release_load_memory(); }

}  // namespace torchfit
