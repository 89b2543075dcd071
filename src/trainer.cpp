#include "torchfit/trainer.h"

#include <cmath>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/optim/optimizer.h>

#include "torchfit/callbacks/progbar_logger.h"
#include "torchfit/error.h"
#include "torchfit/serialize.h"

namespace torchfit {
namespace {

/// Batch-size-weighted running means of the loss and the metrics, as Keras logs
/// them, accumulated into sums kept outside (so checkpoints can carry them).
class RunningMeans {
 public:
  RunningMeans(const std::vector<Metric>& metrics, Logs& sums, double& weight)
      : metrics_(metrics), sums_(sums), weight_(weight) {}

  void update(const at::Tensor& loss, const at::Tensor& output, const at::Tensor& target) {
    double n = static_cast<double>(output.dim() > 0 ? output.size(0) : 1);
    weight_ += n;
    sums_["loss"] += loss.item<double>() * n;
    for (const auto& metric : metrics_) {
      sums_[metric.name] += metric.fn(output, target).item<double>() * n;
    }
  }

  Logs logs() const {
    Logs out;
    for (const auto& [name, sum] : sums_) out[name] = sum / weight_;
    return out;
  }

 private:
  const std::vector<Metric>& metrics_;
  Logs& sums_;
  double& weight_;
};

/// Sets the module's train/eval mode and restores the previous one on exit.
class ModeGuard {
 public:
  ModeGuard(torch::nn::Module& module, bool training)
      : module_(module), was_training_(module.is_training()) {
    module_.train(training);
  }
  ~ModeGuard() { module_.train(was_training_); }

 private:
  torch::nn::Module& module_;
  bool was_training_;
};

/// Clears a pointer when the scope ends.
template <typename T>
class ScopedPointer {
 public:
  ScopedPointer(T*& slot, T* value) : slot_(slot) { slot_ = value; }
  ~ScopedPointer() { slot_ = nullptr; }

 private:
  T*& slot_;
};

void check_batch_size(int64_t batch_size) {
  if (batch_size <= 0) throw ValueError(fmt::format("Invalid batch_size: {} (must be > 0)", batch_size));
}

void check_pair(const at::Tensor& x, const at::Tensor& y, const char* what) {
  if (!x.defined() || !y.defined()) throw ValueError(fmt::format("{}: x and y must be defined tensors", what));
  if (x.dim() == 0 || y.dim() == 0) {
    throw ValueError(fmt::format("{}: x and y need a batch dimension; got x of shape [{}] and y of shape [{}]",
                                 what, fmt::join(x.sizes(), ", "), fmt::join(y.sizes(), ", ")));
  }
  if (x.size(0) != y.size(0)) {
    throw ValueError(fmt::format("{}: x and y have different lengths: x has {} samples, y has {}",
                                 what, x.size(0), y.size(0)));
  }
  if (x.size(0) == 0) throw ValueError(fmt::format("{}: the dataset is empty (0 samples)", what));
}

at::Device model_device(const torch::nn::Module& module) {
  auto params = module.parameters();
  return params.empty() ? at::Device(at::kCPU) : params.front().device();
}

/// Calls `visit` with consecutive slices of `x` and `y`; stops when it returns false.
void for_each_slice(const at::Tensor& x, const at::Tensor& y, int64_t batch_size,
                    const detail::BatchVisitor& visit) {
  int64_t n = x.size(0);
  for (int64_t start = 0; start < n; start += batch_size) {
    int64_t length = std::min(batch_size, n - start);
    if (!visit(x.narrow(0, start, length), y.narrow(0, start, length))) return;
  }
}

}  // namespace

namespace detail {
std::pair<at::Tensor, at::Tensor> stack_examples(
    const std::vector<torch::data::Example<at::Tensor, at::Tensor>>& examples) {
  std::vector<at::Tensor> xs, ys;
  xs.reserve(examples.size());
  ys.reserve(examples.size());
  for (const auto& example : examples) {
    xs.push_back(example.data);
    ys.push_back(example.target);
  }
  return {at::stack(xs), at::stack(ys)};
}
}  // namespace detail

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
  if (!loss_) throw ValueError("Trainer: loss function must not be empty");
  for (size_t i = 0; i < metrics_.size(); ++i) {
    const auto& metric = metrics_[i];
    if (metric.name.empty() || metric.name == "loss" || metric.name.rfind("val_", 0) == 0) {
      throw ValueError(fmt::format(
          "Trainer: invalid metric name '{}' (must be non-empty, not 'loss', not start with 'val_')",
          metric.name));
    }
    if (!metric.fn) throw ValueError(fmt::format("Trainer: metric '{}' has no function", metric.name));
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

const Metric* Trainer::find_metric(const std::string& name) const {
  for (const auto& metric : metrics_) {
    if (metric.name == name) return &metric;
  }
  return nullptr;
}

std::map<std::string, CallbackState> Trainer::callback_states() const {
  auto states = pending_callback_states_;
  if (active_callbacks_ != nullptr) {
    for (auto& [key, state] : active_callbacks_->states()) states[key] = std::move(state);
  }
  return states;
}

History Trainer::fit(const at::Tensor& x, const at::Tensor& y, FitOptions options) {
  check_pair(x, y, "fit");
  check_batch_size(options.batch_size());
  double split = options.validation_split();
  if (!(split >= 0.0 && split < 1.0)) {
    throw ValueError(fmt::format("Invalid validation_split: {} (must be in [0, 1))", split));
  }
  at::Tensor train_x = x, train_y = y;
  std::optional<std::pair<at::Tensor, at::Tensor>> validation;
  if (split > 0.0 && !options.validation_data()) {
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
  int64_t batch_size = options.batch_size();
  bool shuffle = options.shuffle();
  detail::EpochPass pass = [&, batch_size, shuffle](int64_t epoch, const detail::BatchVisitor& visit) {
    if (!shuffle) return for_each_slice(train_x, train_y, batch_size, visit);
    // The order depends only on (seed, epoch), so a resumed run sees the same batches.
    // The seed is read here, as BackupAndRestore may restore it in on_train_begin.
    auto generator = at::make_generator<at::CPUGeneratorImpl>(state_.seed + static_cast<uint64_t>(epoch));
    auto order = at::randperm(train_x.size(0), generator, at::TensorOptions().dtype(at::kLong));
    int64_t n = train_x.size(0);
    for (int64_t start = 0; start < n; start += batch_size) {
      auto index = order.narrow(0, start, std::min(batch_size, n - start));
      auto bx = train_x.index_select(0, index.to(train_x.device()));
      auto by = train_y.index_select(0, index.to(train_y.device()));
      if (!visit(bx, by)) return;
    }
  };
  int64_t steps = (train_x.size(0) + batch_size - 1) / batch_size;
  return fit_passes(pass, std::move(validation), std::move(options), steps);
}

History Trainer::fit_passes(const detail::EpochPass& pass,
                            std::optional<std::pair<at::Tensor, at::Tensor>> validation,
                            FitOptions options, std::optional<int64_t> steps_per_epoch) {
  check_batch_size(options.batch_size());
  if (options.epochs() < 0) throw ValueError(fmt::format("Invalid epochs: {} (must be >= 0)", options.epochs()));
  if (!validation && options.validation_data()) validation = options.validation_data();
  if (validation) check_pair(validation->first, validation->second, "validation_data");
  if (options.initial_epoch() && *options.initial_epoch() < 0) {
    throw ValueError(fmt::format("Invalid initial_epoch: {} (must be >= 0)", *options.initial_epoch()));
  }

  CallbackList callbacks;
  for (size_t i = 0; i < options.callbacks().size(); ++i) {
    if (!options.callbacks()[i]) throw ValueError(fmt::format("fit: callbacks[{}] is null", i));
    callbacks.push_back(options.callbacks()[i]);
  }
  auto history = std::make_shared<History>();
  callbacks.push_back(history);
  if (options.verbose() > 0) {
    callbacks.push_back(std::make_shared<ProgbarLogger>(options.verbose(), options.epochs(), steps_per_epoch));
  }

  callbacks.load_states(pending_callback_states_);
  pending_callback_states_.clear();
  ScopedPointer<CallbackList> active(active_callbacks_, &callbacks);
  callbacks.set_trainer(this);

  const at::Device device = model_device(*model_);
  ModeGuard train_mode(*model_, true);
  stop_training_ = false;
  auto start_fresh = [this](int64_t epoch) {
    state_.epoch = epoch;
    state_.batch_in_epoch = 0;
    state_.epoch_sums.clear();
    state_.epoch_weight = 0;
  };
  if (!resume_) start_fresh(options.initial_epoch().value_or(0));

  callbacks.on_train_begin({});  // BackupAndRestore may set resume_ here
  // Where to start: an explicit initial_epoch, else a restored position (mid-epoch
  // included: the batches already trained on are skipped), else epoch 0.
  int64_t skip = 0;
  if (options.initial_epoch()) {
    start_fresh(*options.initial_epoch());
  } else if (resume_) {
    skip = state_.batch_in_epoch;
  }
  resume_.reset();
  const int64_t initial_epoch = state_.epoch;
  Logs epoch_logs;
  for (int64_t epoch = initial_epoch; epoch < options.epochs(); ++epoch) {
    const int64_t first_batch = epoch == initial_epoch ? skip : 0;
    if (first_batch == 0) start_fresh(epoch);
    RunningMeans means(metrics_, state_.epoch_sums, state_.epoch_weight);
    callbacks.on_epoch_begin(epoch, {});
    int64_t batch = 0;
    pass(epoch, [&](const at::Tensor& x_cpu, const at::Tensor& y_cpu) {
      if (batch < first_batch) {  // trained on before the interruption
        ++batch;
        return true;
      }
      auto x = x_cpu.to(device), y = y_cpu.to(device);
      callbacks.on_train_batch_begin(batch, {});
      at::Tensor output, loss;
      optimizer_->step([&]() -> at::Tensor {
        optimizer_->zero_grad();
        auto out = forward_(x);
        auto value = loss_(out, y);
        if (value.numel() != 1) {
          throw ValueError(fmt::format("The loss function must return a scalar; got shape [{}]",
                                       fmt::join(value.sizes(), ", ")));
        }
        value.backward();
        if (!output.defined()) {  // LBFGS may evaluate more than once; log the first
          output = out.detach();
          loss = value.detach();
        }
        return value;
      });
      {
        at::NoGradGuard no_grad;
        means.update(loss, output, y);
      }
      ++state_.global_step;
      ++state_.batch_in_epoch;
      callbacks.on_train_batch_end(batch, means.logs());
      ++batch;
      return !stop_training_;
    });
    if (batch == 0) throw ValueError(fmt::format("fit: the training data yielded no batches in epoch {}", epoch));
    epoch_logs = means.logs();
    if (validation) {
      for (const auto& [key, value] :
           evaluate_with(validation->first, validation->second, options.batch_size(), callbacks)) {
        epoch_logs["val_" + key] = value;
      }
    }
    state_.epoch = epoch + 1;
    state_.batch_in_epoch = 0;
    callbacks.on_epoch_end(epoch, epoch_logs);
    if (stop_training_) break;
  }
  callbacks.on_train_end(epoch_logs);
  return *history;
}

Logs Trainer::evaluate(const at::Tensor& x, const at::Tensor& y, int64_t batch_size) {
  CallbackList none;
  return evaluate_with(x, y, batch_size, none);
}

Logs Trainer::evaluate_with(const at::Tensor& x, const at::Tensor& y, int64_t batch_size,
                            CallbackList& callbacks) {
  check_pair(x, y, "evaluate");
  check_batch_size(batch_size);
  ModeGuard eval_mode(*model_, false);
  at::NoGradGuard no_grad;
  const at::Device device = model_device(*model_);
  Logs sums;
  double weight = 0;
  RunningMeans means(metrics_, sums, weight);
  callbacks.on_test_begin({});
  int64_t batch = 0;
  for_each_slice(x, y, batch_size, [&](const at::Tensor& bx, const at::Tensor& by) {
    callbacks.on_test_batch_begin(batch, {});
    auto target = by.to(device);
    auto output = forward_(bx.to(device));
    means.update(loss_(output, target), output, target);
    callbacks.on_test_batch_end(batch, means.logs());
    ++batch;
    return true;
  });
  Logs logs = means.logs();
  callbacks.on_test_end(logs);
  return logs;
}

at::Tensor Trainer::predict(const at::Tensor& x, int64_t batch_size) {
  if (!x.defined() || x.dim() == 0 || x.size(0) == 0) {
    throw ValueError("predict: x must be a non-empty tensor with a batch dimension");
  }
  check_batch_size(batch_size);
  ModeGuard eval_mode(*model_, false);
  at::NoGradGuard no_grad;
  const at::Device device = model_device(*model_);
  std::vector<at::Tensor> outputs;
  for (int64_t start = 0; start < x.size(0); start += batch_size) {
    outputs.push_back(forward_(x.narrow(0, start, std::min(batch_size, x.size(0) - start)).to(device)));
  }
  return at::cat(outputs);
}

void Trainer::load_weights(const std::string& path) { torchfit::load_weights(*model_, path); }

void Trainer::load_checkpoint(const std::string& path) { restore(path, /*with_history=*/false); }

void Trainer::restore_backup(const std::string& path) { restore(path, /*with_history=*/true); }

void Trainer::restore(const std::string& path, bool with_history) {
  auto contents = torchfit::load_checkpoint(path, *model_, *optimizer_);
  state_ = contents.trainer;
  if (!state_.rng_state.empty()) {
    auto generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(at::from_blob(state_.rng_state.data(), {static_cast<int64_t>(state_.rng_state.size())},
                                      at::kByte).clone());
  }
  state_.rng_state.clear();
  resume_ = state_;
  resumed_from_ = path;
  // A fit returns the epochs it ran, as Keras's; only a backup restores the
  // interrupted fit itself, history included.
  if (!with_history) contents.callbacks.erase(History::kStateKey);
  if (active_callbacks_ != nullptr) {
    active_callbacks_->load_states(contents.callbacks);
  } else {
    pending_callback_states_ = std::move(contents.callbacks);
  }
}

TrainerState Trainer::checkpoint_state() const {
  TrainerState out = state_;
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  auto bytes = generator.get_state();
  out.rng_state.assign(bytes.data_ptr<uint8_t>(), bytes.data_ptr<uint8_t>() + bytes.numel());
  return out;
}

void Trainer::save_weights(const std::string& path) const { torchfit::save_weights(*model_, path); }

void Trainer::save_checkpoint(const std::string& path) const {
  torchfit::save_checkpoint(path, *model_, *optimizer_, checkpoint_state(), callback_states());
}

}  // namespace torchfit
