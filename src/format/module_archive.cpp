#include "format/module_archive.h"

#include <sstream>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "format/checkpoint_file.h"
#include "format/optimizer_archive.h"
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

void flatten_archive(torch::serialize::InputArchive& archive, const std::string& prefix, TensorMap& out) {
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


}  // namespace

TensorMap read_archive_weights(const CheckpointFile& file) {
  torch::serialize::InputArchive archive;
  file.load_archive(archive);
  TensorMap out;
  guard_read(file.path(), [&] { flatten_archive(archive, "", out); });
  return out;
}

CheckpointContents read_legacy_checkpoint(const CheckpointFile& file, torch::nn::Module& module,
                                          torch::optim::Optimizer& optimizer) {
  const std::string& path = file.path();
  if (!file.is_module_archive()) {
    throw CheckpointError(fmt::format(
        "Checkpoint {} is not a full torchfit checkpoint: it holds weights only (use load_weights)",
        path));
  }
  torch::serialize::InputArchive archive;
  file.load_archive(archive);
  if (!guard_read(path, [&] { return is_full_checkpoint(archive); })) {
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
  } catch (...) {
    rethrow_as_checkpoint_error(path);
  }
  if (!contents.trainer.rng_state.empty()) {
    // Checked on a scratch generator, so a bad record fails before anything changes.
    auto scratch = at::make_generator<at::CPUGeneratorImpl>();
    auto bytes = at::from_blob(contents.trainer.rng_state.data(),
                               {static_cast<int64_t>(contents.trainer.rng_state.size())}, at::kByte);
    try {
      scratch.set_state(bytes.clone());
    } catch (const c10::Error& e) {
      throw CheckpointError(fmt::format("Checkpoint {}: the saved generator state is unusable ({})", path,
                                        e.what_without_backtrace()));
    }
  }
  TensorMap targets = check_weights(module, contents.weights, path);

  torch::serialize::InputArchive optimizer_archive;
  std::function<void()> load_optimizer;
  try {
    archive.read(kOptimizerKey, optimizer_archive);
    load_optimizer = prepare_optimizer_archive_load(optimizer, optimizer_archive,
                                                    fmt::format("Checkpoint {} does not match the optimizer", path));
  } catch (...) {
    rethrow_as_checkpoint_error(path);
  }
  load_optimizer();
  copy_weights(targets, contents.weights);
  return contents;
}

}  // namespace torchfit::detail
