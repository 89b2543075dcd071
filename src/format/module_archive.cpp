#include "format/module_archive.h"

#include <sstream>

#include <ATen/ATen.h>
#include <caffe2/serialize/inline_container.h>
#include <fmt/format.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "format/state_dict.h"
#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

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

bool is_full_checkpoint(torch::serialize::InputArchive& archive) {
  c10::IValue format;
  return archive.try_read(kFormatKey, format) && format.isString() &&
         format.toStringRef() == kFullFormat;
}

}  // namespace

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


void load_archive(torch::serialize::InputArchive& archive, const std::string& path) {
  try {
    archive.load_from(path, at::Device(at::kCPU));
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("Failed reading checkpoint {}: not a readable LibTorch archive ({})",
                                      path, e.what_without_backtrace()));
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


CheckpointContents read_legacy_checkpoint(const std::string& path, torch::nn::Module& module,
                                          torch::optim::Optimizer& optimizer) {
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

}  // namespace torchfit::detail
