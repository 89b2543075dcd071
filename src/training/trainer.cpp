#include "torchfit/trainer.h"

#include <cmath>
#include <cstring>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <c10/util/Type.h>
#include <torch/optim/optimizer.h>

#include "training/collectives.h"
#include "training/mode_guard.h"
#include "training/running_means.h"
#include "training/tensor_source.h"
#include "format/checkpoint_file.h"
#include "format/module_archive.h"
#include "format/trainer_state.h"
#include "torchfit/callbacks/progbar_logger.h"
#include "io/atomic_file.h"
#include "torchfit/error.h"
#include "torchfit/log.h"
#include "torchfit/serialize.h"

namespace torchfit {

using detail::check_pair;
using detail::check_positive;
using detail::model_device;
using detail::ModeGuard;
using detail::RunningMeans;
using detail::ScopedPointer;
using detail::TensorSource;
using detail::weights_of;


Trainer::Trainer(std::shared_ptr<torch::nn::Module> model, ForwardFn forward,
                 std::shared_ptr<torch::optim::Optimizer> optimizer, LossFn loss,
                 std::vector<Metric> metrics)
    : model_(std::move(model)),
      forward_(std::move(forward)),
      optimizer_(std::move(optimizer)),
      loss_(std::move(loss)),
      metrics_(std::move(metrics)) {
  if (!model_) throw ValueError("Trainer: model must not be null");
  if (!optimizer_) throw ValueError("Trainer: optimizer must not be null");
  for (size_t i = 0; i < metrics_.size(); ++i) {
    const auto& metric = metrics_[i];
    if (metric.name.empty() || metric.name == "loss" || metric.name.rfind("val_", 0) == 0) {
      throw ValueError(fmt::format(
          "Trainer: invalid metric name '{}' (must be non-empty, not 'loss', not start with 'val_')",
          metric.name));
    }
    if (!metric.fn && !metric.stateful) {
      throw ValueError(fmt::format("Trainer: metric '{}' has neither a function nor a stateful metric", metric.name));
    }
    if (metric.direction == Mode::Auto) {
      throw ValueError(fmt::format("Trainer: metric '{}' needs a direction, Mode::Min or Mode::Max",
                                   metric.name));
    }
    for (size_t j = 0; j < i; ++j) {
      if (metrics_[j].name == metric.name) {
        throw ValueError(fmt::format("Trainer: metric '{}' is given twice", metric.name));
      }
    }
  }
}

Trainer::~Trainer() = default;
Trainer::Trainer(Trainer&&) noexcept = default;
Trainer& Trainer::operator=(Trainer&&) noexcept = default;

void Trainer::set_process_group(c10::intrusive_ptr<c10d::ProcessGroup> group) {
  collectives_ = group ? std::make_unique<detail::Collectives>(std::move(group)) : nullptr;
}

int Trainer::rank() const { return collectives_ ? collectives_->rank() : 0; }

int Trainer::world_size() const { return collectives_ ? collectives_->size() : 1; }

double Trainer::allreduce_seconds() const { return collectives_ ? collectives_->gradient_seconds() : 0.0; }

void Trainer::barrier(const char* what) const {
  if (collectives_) collectives_->barrier(what);
}

std::string Trainer::broadcast_from_main(const std::string& message, const char* what) const {
  if (!collectives_) return message;
  auto length = at::tensor({static_cast<int64_t>(message.size())}, at::kLong);
  collectives_->broadcast_from_root({length}, what);
  auto bytes = at::zeros({length.item<int64_t>()}, at::kByte);
  if (rank() == 0 && !message.empty()) std::memcpy(bytes.data_ptr(), message.data(), message.size());
  if (bytes.numel() == 0) return {};
  collectives_->broadcast_from_root({bytes}, what);
  return std::string(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(bytes.numel()));
}

const Metric* Trainer::find_metric(const std::string& name) const {
  for (const auto& metric : metrics_) {
    if (metric.name == name) return &metric;
  }
  for (const auto& metric : metrics_) {  // a per-class value, "<name>_<class>"
    const auto& prefix = metric.name;
    if (metric.stateful && name.size() > prefix.size() + 1 && name.compare(0, prefix.size(), prefix) == 0 &&
        name[prefix.size()] == '_' && name.find_first_not_of("0123456789", prefix.size() + 1) == std::string::npos) {
      return &metric;
    }
  }
  return nullptr;
}

std::vector<std::string> Trainer::log_keys() const {
  std::vector<std::string> keys{"loss"};
  for (const auto& metric : metrics_) {
    if (!metric.stateful) {
      keys.push_back(metric.name);
      continue;
    }
    auto result = metric.stateful->result_of(at::zeros_like(metric.stateful->state()));
    if (result.dim() == 0) keys.push_back(metric.name);
    for (int64_t i = 0; result.dim() == 1 && i < result.size(0); ++i) keys.push_back(fmt::format("{}_{}", metric.name, i));
  }
  for (size_t i = 0, n = keys.size(); i < n; ++i) keys.push_back("val_" + keys[i]);
  return keys;
}

History Trainer::fit(const at::Tensor& x, const at::Tensor& y, FitOptions options) {
  check_pair(x, y, "fit");
  check_positive("batch_size", options.batch_size());
  double split = options.validation_split();
  if (!(split >= 0.0 && split < 1.0)) {
    throw ValueError(fmt::format("Invalid validation_split: {} (must be in [0, 1))", split));
  }
  const at::Tensor& weights = options.sample_weight();
  if (weights.defined() && (weights.dim() != 1 || weights.size(0) != x.size(0))) {
    throw ValueError(fmt::format("fit: sample_weight must have one value per sample ([{}]); got shape [{}]",
                                 x.size(0), fmt::join(weights.sizes(), ", ")));
  }
  at::Tensor train_x = x, train_y = y, train_weights = weights;
  std::optional<std::pair<at::Tensor, at::Tensor>> validation;
  if (split > 0.0 && !options.validation_data() && !options.validation_loader()) {  // validation_data wins
    // As Keras: the last fraction of the samples, taken before any shuffling.
    int64_t n = x.size(0);
    auto split_at = static_cast<int64_t>(std::floor(static_cast<double>(n) * (1.0 - split)));
    if (split_at <= 0 || split_at >= n) {
      throw ValueError(fmt::format(
          "validation_split {} of {} samples leaves {} for training and {} for validation; both "
          "must be non-empty",
          split, n, split_at, n - split_at));
    }
    train_x = x.narrow(0, 0, split_at);
    train_y = y.narrow(0, 0, split_at);
    if (weights.defined()) train_weights = weights.narrow(0, 0, split_at);
    validation = std::make_pair(x.narrow(0, split_at, n - split_at), y.narrow(0, split_at, n - split_at));
  }

  // A resumed run keeps the seed it was started with.
  if (!resume_) {
    state_.seed = options.seed() ? *options.seed() : [] {
      auto generator = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(generator.mutex());
      return generator.get<at::CPUGeneratorImpl>()->random64();
    }();
  }
  if (collectives_) {  // every rank shuffles with rank 0's seed
    auto seed = at::tensor({static_cast<int64_t>(state_.seed)}, at::kLong);
    collectives_->broadcast_from_root({seed}, "seed broadcast");
    state_.seed = static_cast<uint64_t>(seed.item<int64_t>());
  }
  const bool shuffle = options.shuffle();
  const int world = world_size(), rank = this->rank();
  TensorSource::Order order;
  if (shuffle || world > 1) {
    order = [this, shuffle, world, rank, n = train_x.size(0)](int64_t pass) {
      // The order depends only on (seed, pass), so a resumed run sees the same batches.
      // The seed is read here, as BackupAndRestore may restore it in on_train_begin.
      auto order = at::arange(n, at::TensorOptions().dtype(at::kLong));
      if (shuffle) {
        auto generator = at::make_generator<at::CPUGeneratorImpl>(state_.seed + static_cast<uint64_t>(pass));
        order = at::randperm(n, generator, at::TensorOptions().dtype(at::kLong));
      }
      if (world > 1) {
        // Rank r takes positions r, r + world, ...; wrapping around pads the order to
        // a multiple of world, so every rank runs the same number of batches.
        int64_t padded = (n + world - 1) / world * world;
        order = order.index_select(0, at::arange(padded, at::kLong).remainder(n))
                    .narrow(0, rank, padded - rank)
                    .slice(0, 0, padded - rank, world);
      }
      return order;
    };
  }
  TensorSource source(train_x, train_y, options.batch_size(), std::move(order), (train_x.size(0) + world - 1) / world,
                      train_weights);
  return fit_source(source, std::move(validation), std::move(options), /*from_loader=*/false);
}

History Trainer::fit_source(detail::BatchSource& train, std::optional<std::pair<at::Tensor, at::Tensor>> validation,
                            FitOptions options, bool from_loader) {
  options.validate(from_loader);
  if (!options.class_weight().empty() && !train.has_tensors()) {
    throw ValueError("fit: class_weight needs batches with targets (torch::data::Example<>); a custom step can "
                     "weigh its own samples");
  }
  check_steps(train, /*training=*/true, "fit");
  if (!validation && options.validation_data()) validation = options.validation_data();
  std::unique_ptr<detail::BatchSource> tensor_validation;
  detail::BatchSource* validation_source = options.validation_loader().get();
  if (validation) {
    check_pair(validation->first, validation->second, "validation_data");
    check_positive("validation_batch_size", options.validation_batch_size());
    tensor_validation = evaluation_source(validation->first, validation->second, options.validation_batch_size());
    validation_source = tensor_validation.get();
  }
  if (validation_source != nullptr) check_steps(*validation_source, /*training=*/false, "fit's validation");

  CallbackList callbacks;
  for (const auto& callback : options.callbacks()) callbacks.push_back(callback);
  auto history = std::make_shared<History>();
  callbacks.push_back(history);
  params_ = {options.epochs(), options.steps_per_epoch() ? options.steps_per_epoch() : train.batches_per_pass(),
             options.verbose()};
  if (options.verbose() > 0 && is_main_process()) {
    callbacks.push_back(std::make_shared<ProgbarLogger>(options.verbose(), options.epochs(), params_.steps));
  }

  callbacks.load_state_dicts(pending_callback_states_);
  ScopedPointer<CallbackList> active(active_callbacks_, &callbacks);
  callbacks.set_trainer(this);

  const at::Device device = model_device(*model_);
  if (collectives_) {  // every rank starts from rank 0's weights
    std::vector<at::Tensor> tensors;
    for (const auto& [name, tensor] : state_dict(*model_)) tensors.push_back(tensor);
    collectives_->broadcast_from_root(tensors, "parameter broadcast");
  }
  ModeGuard train_mode(*model_, true);
  stop_training_ = false;
  gradients_ = {options.clip_grad_norm(), options.clip_grad_value(), options.gradient_accumulation_steps()};
  accumulated_ = 0;
  auto start_epoch = [this](int64_t epoch) {
    state_.epoch = epoch;
    state_.batch_in_epoch = 0;
    state_.epoch_sums.clear();
    state_.epoch_weight = 0;
    state_.metric_states.clear();
  };
  auto start_run = [&](int64_t epoch) {
    start_epoch(epoch);
    state_.data_pass.reset();  // the data starts with the epoch
    state_.batch_in_pass.reset();
  };
  if (!resume_) start_run(options.initial_epoch().value_or(0));

  callbacks.on_train_setup();  // BackupAndRestore may set resume_ here
  callbacks.on_train_begin({});
  // Where to start: an explicit initial_epoch, else a restored position (mid-epoch
  // included: the batches already trained on are skipped), else epoch 0.
  int64_t skip = 0;
  if (options.initial_epoch()) {
    start_run(*options.initial_epoch());
  } else if (resume_) {
    skip = state_.batch_in_epoch;
  }
  resume_.reset();
  restore_window(skip > 0);
  // The data's position: its pass and the batches read of it. Kept in the state
  // only while it differs from the epoch's (steps_per_epoch), so files stay as before.
  int64_t pass = state_.data_pass.value_or(state_.epoch);
  int64_t in_pass = state_.batch_in_pass.value_or(state_.batch_in_epoch);
  auto record_position = [&] {
    const bool aligned = pass == state_.epoch && in_pass == state_.batch_in_epoch;
    state_.data_pass = aligned ? std::nullopt : std::optional<int64_t>(pass);
    state_.batch_in_pass = aligned ? std::nullopt : std::optional<int64_t>(in_pass);
  };
  train.begin_pass(pass);
  if (in_pass > 0) train.skip(in_pass);  // read before the interruption; a shorter pass just ends sooner
  const int64_t steps_per_epoch = options.steps_per_epoch().value_or(std::numeric_limits<int64_t>::max());
  bool warned_short = false;
  const int64_t initial_epoch = state_.epoch;
  Logs epoch_logs;
  for (int64_t epoch = initial_epoch; epoch < options.epochs(); ++epoch) {
    const int64_t first_batch = epoch == initial_epoch ? skip : 0;
    if (first_batch == 0) start_epoch(epoch);
    RunningMeans means(metrics_, state_.epoch_sums, state_.epoch_weight, state_.metric_states, collectives_.get());
    callbacks.on_epoch_begin(epoch, {});
    int64_t batch = first_batch;
    bool restarted = false;
    detail::Batch data;
    while (batch < steps_per_epoch) {
      if (!train.next(data)) {
        if (in_pass == 0) {
          throw ValueError(fmt::format("fit: the training data yielded no batches in epoch {}", epoch));
        }
        train.begin_pass(++pass);
        in_pass = 0;
        if (batch == 0 && !restarted) {  // the previous epoch ended where the pass did
          restarted = true;
          continue;
        }
        if (options.steps_per_epoch() && !warned_short) {
          warned_short = true;
          logger()->warn(
              "fit: the training data ran out after {} of steps_per_epoch={} batches in epoch {}; the epoch ends "
              "early and the next starts a new pass. Make each pass yield at least steps_per_epoch batches",
              batch, steps_per_epoch, epoch + 1);
        }
        break;
      }
      ++in_pass;
      callbacks.on_train_batch_begin(batch, {});
      StepContext step(*this, /*training=*/true, weights_of(data, options.class_weight()));
      const Logs extra = run_step(step, /*training=*/true, data, device);
      means.add(static_cast<double>(std::max<int64_t>(step.samples_, 1)), step.loss_.item<double>(), step.metric_values_,
                step.metric_states_, extra);
      ++state_.global_step;
      ++state_.batch_in_epoch;
      record_position();
      callbacks.on_train_batch_end(batch, means.logs());
      ++batch;
      if (stop_training_) break;
    }
    if (accumulated_ > 0) apply_gradients();  // the epoch's leftover batches
    epoch_logs = means.logs();
    means.store_in_metrics();
    if (validation_source != nullptr && (epoch + 1) % options.validation_freq() == 0) {
      for (const auto& [key, value] : evaluate_source(*validation_source, callbacks)) {
        epoch_logs["val_" + key] = value;
      }
    }
    state_.epoch = epoch + 1;
    state_.batch_in_epoch = 0;
    record_position();
    callbacks.on_epoch_end(epoch, epoch_logs);
    if (stop_training_) break;
  }
  callbacks.on_before_update();  // on_train_end may restore weights
  callbacks.on_train_end(epoch_logs);
  return *history;
}

}  // namespace torchfit
