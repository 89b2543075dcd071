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
#include <torch/optim/optimizer.h>

#include "training/collectives.h"
#include "format/checkpoint_file.h"
#include "format/module_archive.h"
#include "format/trainer_state.h"
#include "torchfit/callbacks/progbar_logger.h"
#include "io/atomic_file.h"
#include "torchfit/error.h"
#include "torchfit/log.h"
#include "torchfit/serialize.h"

namespace torchfit {
namespace {

/// Batch-size-weighted running means of the loss and the metrics, as Keras logs
/// them, accumulated into sums kept outside (so checkpoints can carry them).
class RunningMeans {
 public:
  /// With `collectives`, each batch's contribution is summed over the ranks
  /// first, so every rank holds the same sums.
  RunningMeans(const std::vector<Metric>& metrics, Logs& sums, double& weight,
               detail::Collectives* collectives = nullptr)
      : metrics_(metrics), sums_(sums), weight_(weight), collectives_(collectives) {
    // Every key from the start: ranks with no batches reduce the same vector.
    sums_["loss"] += 0.0;
    for (const auto& metric : metrics_) sums_[metric.name] += 0.0;
  }

  void update(const at::Tensor& loss, const at::Tensor& output, const at::Tensor& target) {
    double n = static_cast<double>(output.dim() > 0 ? output.size(0) : 1);
    std::vector<double> batch{n, loss.item<double>() * n};
    for (const auto& metric : metrics_) batch.push_back(metric.fn(output, target).item<double>() * n);
    if (collectives_ != nullptr) batch = reduced(batch, "batch logs allreduce");
    weight_ += batch[0];
    sums_["loss"] += batch[1];
    for (size_t i = 0; i < metrics_.size(); ++i) sums_[metrics_[i].name] += batch[i + 2];
  }

  /// Sums the accumulated values over the ranks once (for evaluation, whose
  /// shards may hold different batch counts).
  void reduce_totals(detail::Collectives& collectives) {
    std::vector<double> totals{weight_};
    for (const auto& [name, sum] : sums_) totals.push_back(sum);
    totals = reduced_with(collectives, totals, "evaluation logs allreduce");
    weight_ = totals[0];
    size_t i = 1;
    for (auto& [name, sum] : sums_) sum = totals[i++];
  }

  Logs logs() const {
    Logs out;
    for (const auto& [name, sum] : sums_) out[name] = sum / weight_;
    return out;
  }

 private:
  std::vector<double> reduced(const std::vector<double>& values, const char* what) {
    return reduced_with(*collectives_, values, what);
  }
  static std::vector<double> reduced_with(detail::Collectives& collectives, const std::vector<double>& values,
                                          const char* what) {
    auto tensor = at::tensor(values, at::kDouble);
    collectives.allreduce_sum(tensor, what);
    return {tensor.data_ptr<double>(), tensor.data_ptr<double>() + tensor.numel()};
  }

  const std::vector<Metric>& metrics_;
  Logs& sums_;
  double& weight_;
  detail::Collectives* collectives_;
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
  return nullptr;
}

std::map<std::string, CallbackState> Trainer::callback_states() const {
  std::map<std::string, CallbackState> states;
  if (active_callbacks_ != nullptr) states = active_callbacks_->states();
  return states;
}

/// The trainer's progress; loading it makes the next fit resume there.
struct Trainer::ProgressItem : Stateful {
  explicit ProgressItem(Trainer& trainer) : trainer(trainer) {}
  c10::IValue state_dict() const override { return detail::trainer_state_to_ivalue(trainer.state_); }
  void check_state_dict(const c10::IValue& state, const std::string& where) const override {
    detail::trainer_state_from_ivalue(state, where);
  }
  void load_state_dict(const c10::IValue& state) override {
    trainer.state_ = detail::trainer_state_from_ivalue(state, "trainer");
    trainer.resume_ = trainer.state_;
  }
  Trainer& trainer;
};

/// The callbacks' states: those of the running fit, plus restored ones no callback claimed yet.
struct Trainer::CallbacksItem : Stateful {
  CallbacksItem(Trainer& trainer, bool with_history, const Callback* caller)
      : trainer(trainer), with_history(with_history), caller(caller) {}
  c10::IValue state_dict() const override {
    auto states = trainer.pending_callback_states_;
    if (caller != nullptr && !caller->state_key().empty()) states[caller->state_key()] = caller->state_dict();
    if (trainer.active_callbacks_ != nullptr) {
      for (auto& [key, state] : trainer.active_callbacks_->state_dicts()) states[key] = std::move(state);
    }
    c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
    for (const auto& [key, state] : states) out.insert(key, state);
    return out;
  }
  void check_state_dict(const c10::IValue& state, const std::string& where) const override {
    if (!state.isGenericDict()) {
      throw CheckpointError(fmt::format("{}: callback states are a {}, not a dict", where, state.tagKind()));
    }
  }
  void load_state_dict(const c10::IValue& state) override {
    std::map<std::string, c10::IValue> states;
    for (const auto& entry : state.toGenericDict()) states[entry.key().toStringRef()] = entry.value();
    // A fit returns the epochs it ran, as Keras's; only a backup restores the
    // interrupted fit itself, history included.
    if (!with_history) states.erase(History::kStateKey);
    if (trainer.active_callbacks_ != nullptr) trainer.active_callbacks_->load_state_dicts(states);
    trainer.pending_callback_states_ = std::move(states);
  }
  Trainer& trainer;
  bool with_history;
  const Callback* caller;
};

Checkpoint Trainer::checkpoint(const CheckpointScope& scope) {
  Checkpoint out;
  out.add("model", model_);
  out.add("optimizer", optimizer_);
  out.add("trainer", std::make_shared<ProgressItem>(*this));
  out.add_rng();
  out.add("callbacks", std::make_shared<CallbacksItem>(*this, scope.with_history(), scope.caller()));
  return out;
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
  if (collectives_) {  // every rank shuffles with rank 0's seed
    auto seed = at::tensor({static_cast<int64_t>(state_.seed)}, at::kLong);
    collectives_->broadcast_from_root({seed}, "seed broadcast");
    state_.seed = static_cast<uint64_t>(seed.item<int64_t>());
  }
  int64_t batch_size = options.batch_size();
  bool shuffle = options.shuffle();
  const int world = world_size(), rank = this->rank();
  detail::EpochPass pass = [&, batch_size, shuffle, world, rank](int64_t epoch, const detail::BatchVisitor& visit) {
    if (!shuffle && world == 1) return for_each_slice(train_x, train_y, batch_size, visit);
    // The order depends only on (seed, epoch), so a resumed run sees the same batches.
    // The seed is read here, as BackupAndRestore may restore it in on_train_begin.
    auto order = at::arange(train_x.size(0), at::TensorOptions().dtype(at::kLong));
    if (shuffle) {
      auto generator = at::make_generator<at::CPUGeneratorImpl>(state_.seed + static_cast<uint64_t>(epoch));
      order = at::randperm(train_x.size(0), generator, at::TensorOptions().dtype(at::kLong));
    }
    if (world > 1) {
      // Rank r takes positions r, r + world, ...; wrapping around pads the order to
      // a multiple of world, so every rank runs the same number of batches.
      int64_t padded = (order.size(0) + world - 1) / world * world;
      order = order.index_select(0, at::arange(padded, at::kLong).remainder(order.size(0)))
                  .narrow(0, rank, padded - rank)
                  .slice(0, 0, padded - rank, world);
    }
    int64_t n = order.size(0);
    for (int64_t start = 0; start < n; start += batch_size) {
      auto index = order.narrow(0, start, std::min(batch_size, n - start));
      auto bx = train_x.index_select(0, index.to(train_x.device()));
      auto by = train_y.index_select(0, index.to(train_y.device()));
      if (!visit(bx, by)) return;
    }
  };
  int64_t per_rank = (train_x.size(0) + world - 1) / world;
  int64_t steps = (per_rank + batch_size - 1) / batch_size;
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
  if (options.verbose() > 0 && is_main_process()) {
    callbacks.push_back(std::make_shared<ProgbarLogger>(options.verbose(), options.epochs(), steps_per_epoch));
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
  auto start_fresh = [this](int64_t epoch) {
    state_.epoch = epoch;
    state_.batch_in_epoch = 0;
    state_.epoch_sums.clear();
    state_.epoch_weight = 0;
  };
  if (!resume_) start_fresh(options.initial_epoch().value_or(0));

  callbacks.on_train_setup();  // BackupAndRestore may set resume_ here
  callbacks.on_train_begin({});
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
    RunningMeans means(metrics_, state_.epoch_sums, state_.epoch_weight, collectives_.get());
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
        if (collectives_) collectives_->average_gradients(model_->parameters());
        callbacks.on_before_update();  // a background save's copy of the state is done
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
  callbacks.on_before_update();  // on_train_end may restore weights
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
  if (collectives_) {  // each rank evaluates a contiguous shard; the totals are summed below
    int64_t chunk = (x.size(0) + world_size() - 1) / world_size();
    int64_t start = std::min(x.size(0), chunk * rank());
    int64_t length = std::min(chunk, x.size(0) - start);
    return evaluate_shard(x.narrow(0, start, length), y.narrow(0, start, length), batch_size, callbacks);
  }
  return evaluate_shard(x, y, batch_size, callbacks);
}

Logs Trainer::evaluate_shard(const at::Tensor& x, const at::Tensor& y, int64_t batch_size,
                             CallbackList& callbacks) {
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
  if (collectives_) means.reduce_totals(*collectives_);
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
  detail::guard_read(path, [&] {
    detail::CheckpointFile file(path);
    if (file.is_module_archive()) {
      restore_legacy(file);
    } else {
      Checkpoint items = checkpoint(CheckpointScope().with_history(with_history));
      items.load_state_dict(file.read_torchfit(), path);
    }
  });
  resumed_from_ = path;
}

void Trainer::restore_legacy(const detail::CheckpointFile& file) {
  const std::string& path = file.path();
  auto contents = detail::read_legacy_checkpoint(file, *model_, *optimizer_);
  state_ = contents.trainer;
  if (!state_.rng_state.empty()) {
    auto generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(at::from_blob(state_.rng_state.data(), {static_cast<int64_t>(state_.rng_state.size())},
                                      at::kByte).clone());
  }
  state_.rng_state.clear();
  resume_ = state_;
  if (!contents.callbacks.empty()) {
    logger()->info("Checkpoint {} is a torchfit 0.1 file: model, optimizer and progress restored; its callback "
                   "states (0.1 text form) are not",
                   path);
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
  torchfit::save(const_cast<Trainer*>(this)->checkpoint(), path);
}

}  // namespace torchfit
