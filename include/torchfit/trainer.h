#pragma once
/// \file
/// `Trainer`: a Keras-style training loop around a `torch::nn::Module`.
///
///     auto model = std::make_shared<Net>();
///     auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
///     torchfit::Trainer trainer(model, sgd, torch::nn::functional::cross_entropy,
///                               {torchfit::metrics::accuracy()});
///     auto history = trainer.fit(x, y, torchfit::FitOptions().epochs(5).batch_size(32)
///                                           .validation_split(0.1)
///                                           .callbacks({checkpoint}));

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <c10/util/intrusive_ptr.h>
#include <torch/data/example.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "torchfit/callback.h"
#include "torchfit/engine/checkpoint.h"
#include "torchfit/logs.h"
#include "torchfit/training_context.h"
#include "torchfit/metrics.h"
#include "torchfit/trainer_state.h"

namespace torch::optim {
class Optimizer;
}
namespace c10d {
class ProcessGroup;
}

namespace torchfit {

/// Options of `Trainer::fit`, with chainable setters.
class FitOptions {
 public:
  /// Run until this many epochs in total have completed (as Keras's `epochs`).
  FitOptions& epochs(int64_t value) { epochs_ = value; return *this; }
  FitOptions& batch_size(int64_t value) { batch_size_ = value; return *this; }
  /// Shuffle tensor inputs before each epoch (ignored for data loaders).
  FitOptions& shuffle(bool value) { shuffle_ = value; return *this; }
  /// Seed of the per-epoch shuffle; by default drawn from torch's global generator.
  FitOptions& seed(uint64_t value) { seed_ = value; return *this; }
  FitOptions& validation_data(at::Tensor x, at::Tensor y) {
    validation_data_ = std::make_pair(std::move(x), std::move(y));
    return *this;
  }
  /// Fraction of the tensor inputs, taken from the end before shuffling, held out
  /// for validation. Must be in [0, 1).
  FitOptions& validation_split(double value) { validation_split_ = value; return *this; }
  FitOptions& callbacks(std::vector<std::shared_ptr<Callback>> value) {
    callbacks_ = std::move(value);
    return *this;
  }
  /// Epoch to start at. By default 0, or the epoch restored by `Trainer::load_checkpoint`.
  FitOptions& initial_epoch(int64_t value) { initial_epoch_ = value; return *this; }
  /// 0: silent, 1: progress, 2: one line per epoch.
  FitOptions& verbose(int value) { verbose_ = value; return *this; }

  int64_t epochs() const { return epochs_; }
  int64_t batch_size() const { return batch_size_; }
  bool shuffle() const { return shuffle_; }
  const std::optional<uint64_t>& seed() const { return seed_; }
  const std::optional<std::pair<at::Tensor, at::Tensor>>& validation_data() const {
    return validation_data_;
  }
  double validation_split() const { return validation_split_; }
  const std::vector<std::shared_ptr<Callback>>& callbacks() const { return callbacks_; }
  const std::optional<int64_t>& initial_epoch() const { return initial_epoch_; }
  int verbose() const { return verbose_; }

 private:
  int64_t epochs_ = 1;
  int64_t batch_size_ = 32;
  bool shuffle_ = true;
  std::optional<uint64_t> seed_;
  std::optional<std::pair<at::Tensor, at::Tensor>> validation_data_;
  double validation_split_ = 0.0;
  std::vector<std::shared_ptr<Callback>> callbacks_;
  std::optional<int64_t> initial_epoch_;
  int verbose_ = 0;
};

namespace detail {
class CheckpointFile;
class Collectives;
/// Called once per batch; returns false to stop the pass.
using BatchVisitor = std::function<bool(const at::Tensor& x, const at::Tensor& y)>;
/// Runs one pass over the training data for the given epoch.
using EpochPass = std::function<void(int64_t epoch, const BatchVisitor& visit)>;

template <typename T>
struct is_smart_pointer : std::false_type {};
template <typename T, typename D>
struct is_smart_pointer<std::unique_ptr<T, D>> : std::true_type {};
template <typename T>
struct is_smart_pointer<std::shared_ptr<T>> : std::true_type {};

/// A loader passed by reference, raw pointer or smart pointer.
template <typename T>
decltype(auto) deref(T& value) {
  using Plain = std::remove_cv_t<T>;
  if constexpr (std::is_pointer_v<Plain> || is_smart_pointer<Plain>::value) {
    return *value;
  } else {
    return (value);
  }
}

/// A stacked batch (`Example<Tensor, Tensor>`) or a vector of examples.
template <typename Batch>
std::pair<at::Tensor, at::Tensor> unpack_batch(const Batch& batch);
std::pair<at::Tensor, at::Tensor> stack_examples(
    const std::vector<torch::data::Example<at::Tensor, at::Tensor>>& examples);

template <typename Batch>
std::pair<at::Tensor, at::Tensor> unpack_batch(const Batch& batch) {
  if constexpr (std::is_same_v<Batch, torch::data::Example<at::Tensor, at::Tensor>>) {
    return {batch.data, batch.target};
  } else {
    return stack_examples(batch);
  }
}
}  // namespace detail

/// Trains a module with an optimizer and a loss, firing callbacks in Keras order.
class Trainer : public TrainingContext {
 public:
  using LossFn = std::function<at::Tensor(const at::Tensor& output, const at::Tensor& target)>;
  using ForwardFn = std::function<at::Tensor(const at::Tensor& input)>;

  /// `M` is any `torch::nn::Module` with `Tensor forward(Tensor)`.
  template <typename M, typename = std::enable_if_t<std::is_base_of_v<torch::nn::Module, M>>>
  Trainer(std::shared_ptr<M> model, std::shared_ptr<torch::optim::Optimizer> optimizer, LossFn loss,
          std::vector<Metric> metrics = {})
      : Trainer(model, [raw = model.get()](const at::Tensor& x) { return raw->forward(x); },
                std::move(optimizer), std::move(loss), std::move(metrics)) {}

  /// Accepts module holders such as `torch::nn::Sequential` or `TORCH_MODULE` types.
  template <typename Impl>
  Trainer(const torch::nn::ModuleHolder<Impl>& model,
          std::shared_ptr<torch::optim::Optimizer> optimizer, LossFn loss,
          std::vector<Metric> metrics = {})
      : Trainer(model.ptr(), std::move(optimizer), std::move(loss), std::move(metrics)) {}

  /// The type-erased form the others delegate to.
  Trainer(std::shared_ptr<torch::nn::Module> model, ForwardFn forward,
          std::shared_ptr<torch::optim::Optimizer> optimizer, LossFn loss,
          std::vector<Metric> metrics);

  ~Trainer();
  Trainer(Trainer&&) noexcept;
  Trainer& operator=(Trainer&&) noexcept;

  /// Trains data-parallel with the ranks of `group` (see distributed.h): rank 0's
  /// parameters are broadcast at the start of `fit`, each rank trains on its
  /// shard of tensor inputs (the shuffle seed is shared), gradients are averaged
  /// with bucketed allreduces, logs are averaged across ranks weighted by sample
  /// count (so every callback decides alike), and only rank 0 writes files while
  /// the others wait at a barrier until the write is durable. Data loaders must
  /// shard themselves (e.g. DistributedRandomSampler) and yield equal batch counts.
  void set_process_group(c10::intrusive_ptr<c10d::ProcessGroup> group);
  /// This process's rank and the number of ranks (0 and 1 without a process group).
  int rank() const override;
  int world_size() const override;
  /// Waits for every rank (no-op without a process group); `what` names the point in errors.
  void barrier(const char* what) const override;
  std::string broadcast_from_main(const std::string& message, const char* what) const override;
  /// Wall time this rank spent averaging gradients across ranks (0 alone).
  double allreduce_seconds() const;

  /// Trains on tensors: `x` and `y` share their first dimension.
  History fit(const at::Tensor& x, const at::Tensor& y, FitOptions options = FitOptions());

  /// Trains on a LibTorch data loader (or a pointer to one), e.g. from
  /// `torch::data::make_data_loader(MNIST(...).map(Stack<>()), 64)`. Batching and
  /// shuffling are the loader's; `batch_size`, `shuffle` and `validation_split`
  /// do not apply.
  template <typename Loader>
  History fit(Loader&& loader, FitOptions options = FitOptions()) {
    auto& source = detail::deref(loader);
    detail::EpochPass pass = [&source](int64_t, const detail::BatchVisitor& visit) {
      for (auto& batch : source) {
        auto [x, y] = detail::unpack_batch(batch);
        if (!visit(x, y)) return;
      }
    };
    return fit_passes(pass, std::nullopt, std::move(options));  // loaders do not tell their length
  }

  /// Loss and metrics over the data, in eval mode without grad.
  Logs evaluate(const at::Tensor& x, const at::Tensor& y, int64_t batch_size = 32);
  /// Model outputs for `x`, in eval mode without grad, concatenated over batches.
  at::Tensor predict(const at::Tensor& x, int64_t batch_size = 32);

  /// Asks `fit` to stop; checked after each batch and each epoch.
  void stop_training(bool value) override { stop_training_ = value; }
  bool stop_training() const override { return stop_training_; }

  /// Loads weights from a weights-only or a full checkpoint. The model is left
  /// untouched if the file cannot be read or does not match it.
  void load_weights(const std::string& path);
  /// Restores model, optimizer, training progress and (in the next `fit`) the
  /// callbacks' state from a full checkpoint. The next `fit` continues where the
  /// checkpoint was taken, mid-epoch included, with its shuffle order and RNG.
  void load_checkpoint(const std::string& path);
  /// What BackupAndRestore calls in `on_train_begin`: `load_checkpoint` into the
  /// running fit, History included.
  void restore_backup(const std::string& path) override;
  /// Writes a weights-only checkpoint of the model.
  void save_weights(const std::string& path) const;
  /// Writes a full checkpoint: model, optimizer, trainer state and the state of
  /// the callbacks of the running `fit`.
  void save_checkpoint(const std::string& path) const;
  /// Everything a full checkpoint holds, as items: "model", "optimizer" (state and
  /// param-group options), "trainer" (progress), "rng" and "callbacks". Loading it
  /// restores them for the next (or the running) `fit`.
  Checkpoint checkpoint(const CheckpointScope& scope = CheckpointScope()) override;

  torch::nn::Module& model() const override { return *model_; }
  torch::optim::Optimizer& optimizer() const override { return *optimizer_; }
  const std::vector<Metric>& metrics() const { return metrics_; }
  /// The metric registered under `name`, if any.
  const Metric* find_metric(const std::string& name) const override;
  const TrainerState& state() const override { return state_; }
  /// `state()` plus the RNG state, as full checkpoints store it.
  TrainerState checkpoint_state() const;
  /// The file the last `load_checkpoint` restored (retention never deletes it); empty if none.
  const std::string& resumed_from() const override { return resumed_from_; }
  /// State of the callbacks of the running `fit`, plus any restored by
  /// `load_checkpoint` that no callback has claimed yet.
  std::map<std::string, CallbackState> callback_states() const;

 private:
  History fit_passes(const detail::EpochPass& pass,
                     std::optional<std::pair<at::Tensor, at::Tensor>> validation,
                     FitOptions options, std::optional<int64_t> steps_per_epoch = std::nullopt);
  Logs evaluate_with(const at::Tensor& x, const at::Tensor& y, int64_t batch_size,
                     CallbackList& callbacks);
  Logs evaluate_shard(const at::Tensor& x, const at::Tensor& y, int64_t batch_size, CallbackList& callbacks);
  void restore(const std::string& path, bool with_history);
  /// Reads a torchfit 0.1 full checkpoint (a LibTorch module archive).
  void restore_legacy(const detail::CheckpointFile& file);

  std::shared_ptr<torch::nn::Module> model_;
  ForwardFn forward_;
  std::shared_ptr<torch::optim::Optimizer> optimizer_;
  LossFn loss_;
  std::vector<Metric> metrics_;

  TrainerState state_;
  bool stop_training_ = false;
  /// Callbacks of the running fit (for full checkpoints).
  CallbackList* active_callbacks_ = nullptr;
  /// Set by load_checkpoint, consumed by the next fit.
  std::optional<TrainerState> resume_;
  std::map<std::string, c10::IValue> pending_callback_states_;
  struct ProgressItem;
  struct CallbacksItem;
  std::string resumed_from_;
  std::unique_ptr<detail::Collectives> collectives_;
};

}  // namespace torchfit
