// torchfit 0.1's free functions for full checkpoints, on top of Checkpoint.
#include <ATen/core/ivalue.h>
#include <fmt/format.h>
#include <torch/optim/optimizer.h>

#include "format/module_archive.h"
#include "format/state_dict.h"
#include "format/trainer_state.h"
#include "format/checkpoint_file.h"
#include "engine/trainer_state_item.h"
#include "torchfit/engine/checkpoint.h"
#include "torchfit/error.h"
#include "torchfit/io/checkpoint_io.h"
#include "torchfit/serialize.h"

namespace torchfit {
namespace {

/// A shared_ptr that does not own: the 0.1 functions take references.
template <typename T>
std::shared_ptr<T> borrowed(const T& object) {
  return std::shared_ptr<T>(const_cast<T*>(&object), [](T*) {});
}

/// Callback states in 0.1's text form; states of other shapes are skipped on load.
class TextStatesItem : public Stateful {
 public:
  explicit TextStatesItem(std::map<std::string, CallbackState>& states) : states_(states) {}
  c10::IValue state_dict() const override {
    c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
    for (const auto& [key, state] : states_) {
      c10::impl::GenericDict fields(c10::StringType::get(), c10::StringType::get());
      for (const auto& [field, value] : state) fields.insert(field, value);
      out.insert(key, fields);
    }
    return out;
  }
  void load_state_dict(const c10::IValue& state) override {
    if (!state.isGenericDict()) return;
    for (const auto& entry : state.toGenericDict()) {
      if (!entry.value().isGenericDict()) continue;
      CallbackState text;
      bool is_text = true;
      for (const auto& field : entry.value().toGenericDict()) {
        is_text = is_text && field.key().isString() && field.value().isString();
        if (is_text) text[field.key().toStringRef()] = field.value().toStringRef();
      }
      if (is_text) states_[entry.key().toStringRef()] = std::move(text);
    }
  }

 private:
  std::map<std::string, CallbackState>& states_;
};

/// The CPU generator state as bytes, without applying it (0.1 returned it).
class RngBytesItem : public Stateful {
 public:
  explicit RngBytesItem(std::vector<uint8_t>& bytes) : bytes_(bytes) {}
  c10::IValue state_dict() const override { return c10::IValue(); }
  void load_state_dict(const c10::IValue& state) override {
    if (!state.isGenericDict()) return;
    auto cpu = state.toGenericDict().find("cpu");
    if (cpu == state.toGenericDict().end() || !cpu->value().isTensor()) return;
    auto tensor = cpu->value().toTensor().contiguous();
    bytes_.assign(tensor.data_ptr<uint8_t>(), tensor.data_ptr<uint8_t>() + tensor.numel());
  }

 private:
  std::vector<uint8_t>& bytes_;
};

}  // namespace

void save_checkpoint(const torch::nn::Module& module, const torch::optim::Optimizer& optimizer,
                     const TrainerState& trainer, const std::map<std::string, CallbackState>& callbacks,
                     const std::string& path, const SaveOptions& options) {
  TrainerState state = trainer;
  auto states = callbacks;
  Checkpoint checkpoint;
  checkpoint.add("model", borrowed(module));
  checkpoint.add("optimizer", borrowed(optimizer));
  checkpoint.add("trainer", std::make_shared<detail::TrainerStateItem>(state));
  checkpoint.add("callbacks", std::make_shared<TextStatesItem>(states));
  FileCheckpointIO(options).save(checkpoint.state_dict(), path);
}

void save_checkpoint(const std::string& path, const torch::nn::Module& module,
                     const torch::optim::Optimizer& optimizer, const TrainerState& trainer,
                     const std::map<std::string, CallbackState>& callbacks, bool fsync) {
  save_checkpoint(module, optimizer, trainer, callbacks, path, SaveOptions().fsync(fsync));
}

namespace {

CheckpointContents load_full_checkpoint(const c10::IValue& data, torch::nn::Module& module,
                                        torch::optim::Optimizer& optimizer, const std::string& path) {
  if (!data.isGenericDict() || !data.toGenericDict().contains(detail::kMetadataKey)) {
    throw CheckpointError(fmt::format(
        "Checkpoint {} is not a full torchfit checkpoint: it holds weights only (use load_weights)", path));
  }
  CheckpointContents contents;
  Checkpoint checkpoint;
  checkpoint.add("model", borrowed(module));
  checkpoint.add("optimizer", borrowed(optimizer));
  checkpoint.add("trainer", std::make_shared<detail::TrainerStateItem>(contents.trainer));
  checkpoint.add_optional("rng", std::make_shared<RngBytesItem>(contents.trainer.rng_state));
  checkpoint.add_optional("callbacks", std::make_shared<TextStatesItem>(contents.callbacks));
  checkpoint.load_state_dict(data, path);
  contents.weights = state_dict(module);
  return contents;
}

}  // namespace

CheckpointContents load_checkpoint(const std::string& path, torch::nn::Module& module,
                                   torch::optim::Optimizer& optimizer) {
  return load_checkpoint(module, optimizer, path);
}

CheckpointContents load_checkpoint(torch::nn::Module& module, torch::optim::Optimizer& optimizer,
                                   const std::string& path) {
  return detail::read_checkpoint_file(
      path,
      [&](const detail::CheckpointFile& file) {
        return load_full_checkpoint(file.read_torchfit(), module, optimizer, path);
      },
      [&](const detail::CheckpointFile& file) { return detail::read_legacy_checkpoint(file, module, optimizer); });
}

}  // namespace torchfit
