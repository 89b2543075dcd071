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
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include <c10/util/intrusive_ptr.h>
#include <torch/data/example.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "torchfit/arg.h"
#include "torchfit/callback.h"
#include "torchfit/engine/checkpoint.h"
#include "torchfit/fit_options.h"
#include "torchfit/logs.h"
#include "torchfit/training_context.h"
#include "torchfit/metrics.h"
#include "torchfit/step.h"
#include "torchfit/trainer_state.h"

namespace torch::optim {
class Optimizer;
}
namespace c10d {
class ProcessGroup;
}

namespace torchfit {

namespace detail {
class CheckpointFile;
class Collectives;

/// A custom step with the batch type it takes, type-erased.
template <typename Signature>
struct ErasedStep {
  const std::type_info* batch_type = nullptr;
  std::function<Signature> run;
  explicit operator bool() const { return static_cast<bool>(run); }
};
using TrainStep = ErasedStep<Logs(StepContext& step, const void* batch)>;
using PredictStep = ErasedStep<at::Tensor(const void* batch)>;

template <typename T, typename = void>
struct has_tensor_forward : std::false_type {};
template <typename T>
struct has_tensor_forward<T, std::void_t<decltype(std::declval<T&>().forward(std::declval<at::Tensor>()))>>
    : std::is_convertible<decltype(std::declval<T&>().forward(std::declval<at::Tensor>())), at::Tensor> {};

}  // namespace detail

/// Trains a module with an optimizer and a loss, firing callbacks in Keras order.
class Trainer : public TrainingContext {
 public:
  using LossFn = std::function<at::Tensor(const at::Tensor& output, const at::Tensor& target)>;
  using ForwardFn = std::function<at::Tensor(const at::Tensor& input)>;

  /// `M` is any `torch::nn::Module`. The default steps call its `Tensor
  /// forward(Tensor)`; a model with several inputs or outputs needs custom steps
  /// (`train_step`, `test_step`, `predict_step`), and then `loss` may be empty.
  template <typename M, typename = std::enable_if_t<std::is_base_of_v<torch::nn::Module, M>>>
  Trainer(std::shared_ptr<M> model, std::shared_ptr<torch::optim::Optimizer> optimizer, LossFn loss,
          std::vector<Metric> metrics = {})
      : Trainer(model, tensor_forward(model), std::move(optimizer), std::move(loss), std::move(metrics)) {}

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

  /// Replaces the training step for batches of type `Batch`: what the data
  /// yields (`torch::data::Example<>` for tensor inputs and stacked loaders).
  /// `fn(torchfit::StepContext& step, const Batch& batch)` returns nothing or
  /// `Logs` of extra values to log (the same keys every batch); it must record
  /// the loss through `step.minimize` or `step.record_loss`. See step.h.
  template <typename Batch, typename Fn>
  Trainer& train_step(Fn fn) {
    train_step_ = erase_step<Batch>(std::move(fn));
    return *this;
  }
  /// Replaces the evaluation step (validation and `evaluate`) likewise; it runs
  /// in eval mode without grad and records the loss with `step.record_loss`.
  template <typename Batch, typename Fn>
  Trainer& test_step(Fn fn) {
    test_step_ = erase_step<Batch>(std::move(fn));
    return *this;
  }
  /// Replaces what `predict` computes for a batch: `fn(const Batch&)` returns
  /// the batch's outputs, concatenated over batches.
  template <typename Batch, typename Fn>
  Trainer& predict_step(Fn fn) {
    constexpr bool callable = std::is_invocable_v<Fn&, const Batch&>;
    static_assert(callable, "Trainer::predict_step<Batch>(fn): fn must be callable as fn(const Batch& batch)");
    if constexpr (callable) {
      static_assert(std::is_convertible_v<std::invoke_result_t<Fn&, const Batch&>, at::Tensor>,
                    "Trainer::predict_step<Batch>(fn): fn must return the batch's outputs as an at::Tensor");
      predict_step_ = {&typeid(Batch), [fn = std::move(fn)](const void* batch) mutable -> at::Tensor {
                         return fn(*static_cast<const Batch*>(batch));
                       }};
    }
    return *this;
  }

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
  /// shuffling are the loader's: setting `batch_size`, `shuffle` or
  /// `validation_split` is a ValueError. The batches per epoch are learnt in the
  /// first epoch (or given by `steps_per_epoch`).
  template <typename Loader, typename = std::enable_if_t<detail::is_loader<Loader>::value>>
  History fit(Loader&& loader, FitOptions options = FitOptions()) {
    return fit_source(*detail::make_loader_source(loader), std::nullopt, std::move(options), true);
  }

  /// Loss and metrics over the data, in eval mode without grad; `sample_weight`
  /// [N] weighs the loss and the stateful metrics.
  Logs evaluate(const at::Tensor& x, const at::Tensor& y, int64_t batch_size = 32,
                const at::Tensor& sample_weight = {});
  /// Loss and metrics over one pass of a data loader (or a pointer to one).
  template <typename Loader, typename = std::enable_if_t<detail::is_loader<Loader>::value>>
  Logs evaluate(Loader&& loader) {
    CallbackList none;
    return evaluate_source(*detail::make_loader_source(loader), none);
  }
  /// Model outputs for `x`, in eval mode without grad, concatenated over batches.
  at::Tensor predict(const at::Tensor& x, int64_t batch_size = 32);
  /// Model outputs for one pass of a data loader's inputs (targets are ignored).
  template <typename Loader, typename = std::enable_if_t<detail::is_loader<Loader>::value>>
  at::Tensor predict(Loader&& loader) {
    return predict_source(*detail::make_loader_source(loader));
  }

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
  void restore_backup(const c10::IValue& state, const std::string& path) override;
  /// Writes a weights-only checkpoint of the model.
  void save_weights(const std::string& path) const;
  /// Writes a full checkpoint: model, optimizer, trainer state and the state of
  /// the callbacks of the running `fit`.
  void save_checkpoint(const std::string& path) const;
  /// Everything a full checkpoint holds, as items: "model", "optimizer" (state and
  /// param-group options), "trainer" (progress), "gradients" (of an unfinished
  /// accumulation window), "rng" and "callbacks". Loading it
  /// restores them for the next (or the running) `fit`.
  Checkpoint checkpoint(const CheckpointScope& scope = CheckpointScope()) override;

  torch::nn::Module& model() const override { return *model_; }
  torch::optim::Optimizer& optimizer() const override { return *optimizer_; }
  const std::vector<Metric>& metrics() const { return metrics_; }
  /// The metric registered under `name`, if any.
  const Metric* find_metric(const std::string& name) const override;
  /// "loss", each metric, and their "val_" forms.
  std::vector<std::string> log_keys() const override;
  const TrainerState& state() const override { return state_; }
  /// The epochs, steps and verbosity of the running (or the last) `fit`.
  FitParams params() const override { return params_; }
  /// `state()` plus the RNG state, as full checkpoints store it.
  TrainerState checkpoint_state() const;
  /// The file the last `load_checkpoint` restored (retention never deletes it); empty if none.
  const std::string& resumed_from() const override { return resumed_from_; }
  /// State of the callbacks of the running `fit`, plus any restored by
  /// `load_checkpoint` that no callback has claimed yet.
  std::map<std::string, CallbackState> callback_states() const;

 private:
  History fit_source(detail::BatchSource& train,
                     std::optional<std::pair<at::Tensor, at::Tensor>> validation, FitOptions options,
                     bool from_loader);
  /// Tensor evaluation data, sharded across the ranks.
  std::unique_ptr<detail::BatchSource> evaluation_source(const at::Tensor& x, const at::Tensor& y,
                                                         int64_t batch_size, const at::Tensor& weights = {}) const;
  Logs evaluate_source(detail::BatchSource& source, CallbackList& callbacks);
  at::Tensor predict_source(detail::BatchSource& source);
  void restore(const std::string& path, bool with_history);
  /// Reads a torchfit 0.1 full checkpoint (a LibTorch module archive).
  void restore_legacy(const detail::CheckpointFile& file);

  template <typename M>
  static ForwardFn tensor_forward(const std::shared_ptr<M>& model) {
    if constexpr (detail::has_tensor_forward<M>::value) {
      return [raw = model.get()](const at::Tensor& x) -> at::Tensor { return raw->forward(x); };
    } else {
      return {};  // several inputs or outputs: custom steps run it
    }
  }

  template <typename Batch, typename Fn>
  static detail::TrainStep erase_step(Fn fn) {
    constexpr bool callable = std::is_invocable_v<Fn&, StepContext&, const Batch&>;
    static_assert(callable,
                  "Trainer::train_step<Batch>(fn) and test_step<Batch>(fn): fn must be callable as "
                  "fn(torchfit::StepContext& step, const Batch& batch), where Batch is what the data yields "
                  "(torch::data::Example<> for tensor inputs and stacked loaders)");
    if constexpr (callable) {
      using Result = std::invoke_result_t<Fn&, StepContext&, const Batch&>;
      constexpr bool returns = std::is_void_v<Result> || std::is_convertible_v<Result, Logs>;
      static_assert(returns,
                    "Trainer::train_step<Batch>(fn) and test_step<Batch>(fn): fn must return void or "
                    "torchfit::Logs (extra values to log)");
      if constexpr (returns) {
        return {&typeid(Batch), [fn = std::move(fn)](StepContext& step, const void* batch) mutable -> Logs {
                  if constexpr (std::is_void_v<Result>) {
                    fn(step, *static_cast<const Batch*>(batch));
                    return {};
                  } else {
                    return fn(step, *static_cast<const Batch*>(batch));
                  }
                }};
      }
    }
    return {};
  }

  friend class StepContext;
  /// What the running fit's steps do with gradients.
  struct GradientOptions {
    std::optional<double> clip_norm, clip_value;
    int64_t accumulation = 1;
  };
  /// Default steps.
  void default_train_step(StepContext& step, const at::Tensor& x, const at::Tensor& y);
  void default_test_step(StepContext& step, const at::Tensor& x, const at::Tensor& y);
  /// One batch through the custom step or the default one (training or evaluation); returns the
  /// step's extra logs. Throws `ValueError` when the step recorded no loss.
  Logs run_step(StepContext& step, bool training, const detail::Batch& data, const at::Device& device);
  /// What StepContext does.
  at::Tensor forward_checked(const at::Tensor& x) const;
  at::Tensor compute_loss(const at::Tensor& output, const at::Tensor& target, const at::Tensor& sample_weight) const;
  void minimize(StepContext& step, const at::Tensor& loss);
  void minimize(StepContext& step, const std::function<at::Tensor()>& closure);
  void update_metrics(StepContext& step, const at::Tensor& output, const at::Tensor& target,
                      const at::Tensor& sample_weight) const;
  /// Averages across ranks, clips, lets callbacks finish with the parameters.
  void finish_gradients();
  /// The optimizer step for the gradients accumulated so far.
  void apply_gradients();
  /// Puts back the gradients of the accumulation window a restored checkpoint
  /// was saved in, when the fit resumes mid-epoch with the same accumulation.
  void restore_window(bool mid_epoch);
  /// Checks that the steps this run needs exist and take what `source` yields.
  void check_steps(const detail::BatchSource& source, bool training, const char* what) const;

  std::shared_ptr<torch::nn::Module> model_;
  ForwardFn forward_;
  std::shared_ptr<torch::optim::Optimizer> optimizer_;
  LossFn loss_;
  std::vector<Metric> metrics_;

  TrainerState state_;
  FitParams params_;
  bool stop_training_ = false;
  /// Callbacks of the running fit (for full checkpoints).
  CallbackList* active_callbacks_ = nullptr;
  /// Set by load_checkpoint, consumed by the next fit.
  std::optional<TrainerState> resume_;
  std::map<std::string, c10::IValue> pending_callback_states_;
  struct CallbacksItem;
  struct GradientsItem;
  /// Set by loading a checkpoint saved inside an accumulation window.
  c10::IValue restored_window_;
  std::string resumed_from_;
  std::unique_ptr<detail::Collectives> collectives_;
  detail::TrainStep train_step_, test_step_;
  detail::PredictStep predict_step_;
  GradientOptions gradients_;
  int64_t accumulated_ = 0;  // backward passes since the last optimizer step
};

}  // namespace torchfit
