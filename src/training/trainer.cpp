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

/// The epoch's logs so far: batch-size-weighted means of the loss, the mean
/// metrics and a step's extra logs, as Keras logs them, and each stateful
/// metric's sums. All are kept outside (so checkpoints can carry them).
class RunningMeans {
 public:
  /// With `collectives`, each batch's contribution is summed over the ranks
  /// first, so every rank holds the same sums.
  RunningMeans(const std::vector<Metric>& metrics, Logs& sums, double& weight,
               std::map<std::string, std::vector<double>>& states, detail::Collectives* collectives = nullptr)
      : metrics_(metrics), sums_(sums), weight_(weight), states_(states), collectives_(collectives) {
    // Every key from the start: ranks with no batches reduce the same vector.
    sums_["loss"] += 0.0;
    for (const auto& metric : metrics_) {
      if (!metric.stateful) {
        sums_[metric.name] += 0.0;
        continue;
      }
      auto& state = states_[metric.name];
      auto size = static_cast<size_t>(metric.stateful->state().numel());
      if (state.size() != size) state.assign(size, 0.0);
    }
  }

  /// Adds one step: `n` samples, its loss, each metric's value (mean metrics) or
  /// state (stateful ones; undefined if not updated), and extra logs.
  void add(double n, double loss, const std::vector<double>& values, const std::vector<at::Tensor>& states,
           const Logs& extra) {
    std::vector<double> batch{n, loss * n};
    for (size_t i = 0; i < metrics_.size(); ++i) {
      if (!metrics_[i].stateful) batch.push_back(values[i] * n);
    }
    for (const auto& entry : extra) batch.push_back(entry.second * n);
    for (size_t i = 0; i < metrics_.size(); ++i) {
      if (!metrics_[i].stateful) continue;
      const size_t size = states_[metrics_[i].name].size();
      if (!states[i].defined()) {
        batch.insert(batch.end(), size, 0.0);
        continue;
      }
      auto flat = states[i].reshape({-1}).to(at::kCPU, at::kDouble).contiguous();
      batch.insert(batch.end(), flat.data_ptr<double>(), flat.data_ptr<double>() + flat.numel());
    }
    if (collectives_ != nullptr) batch = reduced_with(*collectives_, batch, "batch logs allreduce");
    size_t at = 0;
    weight_ += batch[at++];
    sums_["loss"] += batch[at++];
    for (const auto& metric : metrics_) {
      if (!metric.stateful) sums_[metric.name] += batch[at++];
    }
    for (const auto& entry : extra) sums_[entry.first] += batch[at++];
    for (const auto& metric : metrics_) {
      if (!metric.stateful) continue;
      for (auto& value : states_[metric.name]) value += batch[at++];
    }
  }

  /// Sums the accumulated values over the ranks once (for evaluation, whose
  /// shards may hold different batch counts).
  void reduce_totals(detail::Collectives& collectives) {
    std::vector<double> totals{weight_};
    for (const auto& [name, sum] : sums_) totals.push_back(sum);
    for (const auto& [name, state] : states_) totals.insert(totals.end(), state.begin(), state.end());
    totals = reduced_with(collectives, totals, "evaluation logs allreduce");
    weight_ = totals[0];
    size_t i = 1;
    for (auto& [name, sum] : sums_) sum = totals[i++];
    for (auto& [name, state] : states_) {
      for (auto& value : state) value = totals[i++];
    }
  }

  Logs logs() const {
    Logs out;
    for (const auto& [name, sum] : sums_) out[name] = sum / weight_;
    for (const auto& metric : metrics_) {
      if (!metric.stateful) continue;
      auto result = metric.stateful->result_of(state_of(metric));
      if (result.dim() == 0) {
        out[metric.name] = result.item<double>();
      } else if (result.dim() == 1) {  // per class
        for (int64_t i = 0; i < result.size(0); ++i) out[fmt::format("{}_{}", metric.name, i)] = result[i].item<double>();
      }
    }
    return out;
  }

  /// Hands each stateful metric its sums, so the last pass's can be read from it (a confusion matrix).
  void store_in_metrics() const {
    for (const auto& metric : metrics_) {
      if (metric.stateful) metric.stateful->set_state(state_of(metric));
    }
  }

 private:
  at::Tensor state_of(const Metric& metric) const {
    auto& values = states_.at(metric.name);
    return at::tensor(values, at::kDouble).view(metric.stateful->state().sizes());
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
  std::map<std::string, std::vector<double>>& states_;
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

/// Tensor inputs in batches: in order, or in an order made per pass (shuffled, sharded).
class TensorSource final : public detail::BatchSource {
 public:
  /// The sample indices of a pass; empty means all samples in order.
  using Order = std::function<at::Tensor(int64_t pass)>;
  /// `samples` is the length of each pass (a shard's, padded); `weights` are per-sample weights, if any.
  TensorSource(at::Tensor x, at::Tensor y, int64_t batch_size, Order order = {}, std::optional<int64_t> samples = {},
               at::Tensor weights = {})
      : x_(std::move(x)),
        y_(std::move(y)),
        weights_(std::move(weights)),
        batch_size_(batch_size),
        order_of_(std::move(order)),
        samples_(samples.value_or(x_.size(0))) {}

  void begin_pass(int64_t pass) override {
    order_ = order_of_ ? order_of_(pass) : at::Tensor();
    position_ = 0;
  }
  bool next(detail::Batch& batch) override {
    const int64_t n = length();
    if (position_ >= n) return false;
    const int64_t count = std::min(batch_size_, n - position_);
    auto take = [&](const at::Tensor& all) {
      if (!all.defined()) return at::Tensor();
      if (!order_.defined()) return all.narrow(0, position_, count);
      return all.index_select(0, order_.narrow(0, position_, count).to(all.device()));
    };
    batch.x = take(x_);
    batch.y = take(y_);
    batch.sample_weight = take(weights_);
    example_ = torch::data::Example<at::Tensor, at::Tensor>(batch.x, batch.y);
    batch.item = &example_;
    position_ += count;
    return true;
  }
  int64_t skip(int64_t count) override {
    const int64_t left = (length() - position_ + batch_size_ - 1) / batch_size_;
    const int64_t skipped = std::min(count, std::max<int64_t>(left, 0));
    position_ = std::min(length(), position_ + skipped * batch_size_);
    return skipped;
  }
  std::optional<int64_t> batches_per_pass() const override { return (samples_ + batch_size_ - 1) / batch_size_; }
  const std::type_info& batch_type() const override { return typeid(torch::data::Example<at::Tensor, at::Tensor>); }
  bool has_tensors() const override { return true; }

 private:
  int64_t length() const { return order_.defined() ? order_.size(0) : x_.size(0); }

  at::Tensor x_, y_, weights_;
  int64_t batch_size_;
  Order order_of_;
  int64_t samples_;
  at::Tensor order_;
  int64_t position_ = 0;
  torch::data::Example<at::Tensor, at::Tensor> example_;
};

/// Each sample's weight from its target class: class indices [N], one-hot [N, C] or 0/1 values.
at::Tensor class_weights_of(const at::Tensor& y, const std::map<int64_t, double>& weights) {
  auto classes = (y.dim() >= 2 && y.size(-1) > 1 ? y.argmax(-1) : y).reshape({-1}).to(at::kCPU, at::kLong);
  auto table = at::full({weights.rbegin()->first + 1}, std::numeric_limits<double>::quiet_NaN(), at::kDouble);
  for (const auto& [label, weight] : weights) table[label] = weight;
  auto bad = (classes < 0) | (classes >= table.size(0));
  if (!bad.any().item<bool>()) bad = table.index_select(0, classes).isnan();
  if (bad.any().item<bool>()) {
    std::vector<int64_t> known;
    for (const auto& entry : weights) known.push_back(entry.first);
    throw ValueError(fmt::format("class_weight has no weight for class {} (it has classes {})",
                                 classes.masked_select(bad)[0].item<int64_t>(), fmt::join(known, ", ")));
  }
  return table.index_select(0, classes);
}

/// A batch's per-sample weights: its own (sample_weight) times its classes' (class_weight).
at::Tensor weights_of(const detail::Batch& batch, const std::map<int64_t, double>& class_weight) {
  if (class_weight.empty()) return batch.sample_weight;
  auto weights = class_weights_of(batch.y, class_weight);
  return batch.sample_weight.defined() ? batch.sample_weight.reshape({-1}).to(at::kCPU, at::kDouble) * weights
                                       : weights;
}

void check_positive(const char* option, int64_t value) {
  if (value <= 0) throw ValueError(fmt::format("Invalid {}: {} (must be > 0)", option, value));
}

}  // namespace

namespace detail {
BatchSource::~BatchSource() = default;

int64_t BatchSource::skip(int64_t count) {
  Batch batch;
  int64_t skipped = 0;
  while (skipped < count && next(batch)) ++skipped;
  return skipped;
}

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
    for (const auto& entry : state.toGenericDict()) {  // checked with the other items, before any is applied
      if (!entry.key().isString()) {
        throw CheckpointError(fmt::format("{}: a callback state is keyed by a {}, not a string", where,
                                          entry.key().tagKind()));
      }
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

/// The gradients of an unfinished accumulation window, so a resumed fit continues
/// the window instead of restarting it (Keras 3 keeps its accumulators as
/// optimizer variables). Holds none between windows, and none under data
/// parallelism, where each rank's partial sums are its own until the step.
struct Trainer::GradientsItem : Stateful {
  explicit GradientsItem(Trainer& trainer) : trainer(trainer) {}
  c10::IValue state_dict() const override {
    const int64_t batches = trainer.collectives_ ? 0 : trainer.accumulated_;
    c10::impl::GenericDict grads(c10::StringType::get(), c10::TensorType::get());
    for (const auto& param : trainer.model_->named_parameters()) {
      if (batches > 0 && param.value().grad().defined()) grads.insert(param.key(), param.value().grad());
    }
    c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
    out.insert("batches", batches);
    out.insert("steps", trainer.gradients_.accumulation);
    out.insert("grads", grads);
    return out;
  }
  void check_state_dict(const c10::IValue& state, const std::string& where) const override {
    auto fail = [&](const std::string& what) { throw CheckpointError(fmt::format("{}: {}", where, what)); };
    if (!state.isGenericDict()) fail(fmt::format("accumulated gradients are a {}, not a dict", state.tagKind()));
    auto dict = state.toGenericDict();
    auto integer = [&](const char* key) {
      auto it = dict.find(key);
      if (it == dict.end() || !it->value().isInt()) fail(fmt::format("accumulated gradients lack an integer '{}'", key));
      return it->value().toInt();
    };
    const int64_t batches = integer("batches"), steps = integer("steps");
    if (steps < 1 || batches < 0 || batches >= steps) {
      fail(fmt::format("accumulated gradients of {} batches in a window of {}", batches, steps));
    }
    auto grads = dict.find("grads");
    if (grads == dict.end() || !grads->value().isGenericDict()) fail("accumulated gradients lack their 'grads' dict");
    auto params = trainer.model_->named_parameters();
    for (const auto& entry : grads->value().toGenericDict()) {
      if (!entry.key().isString() || !entry.value().isTensor()) fail("accumulated gradients hold a non-tensor entry");
      const auto& name = entry.key().toStringRef();
      const auto* param = params.find(name);
      if (param == nullptr) fail(fmt::format("accumulated gradient '{}' names no parameter of the model", name));
      if (entry.value().toTensor().sizes() != param->sizes()) {
        fail(fmt::format("accumulated gradient '{}' has shape {}, the parameter {}", name,
                         entry.value().toTensor().sizes(), param->sizes()));
      }
    }
  }
  void load_state_dict(const c10::IValue& state) override { trainer.restored_window_ = state; }
  Trainer& trainer;
};

void Trainer::restore_window(bool mid_epoch) {
  auto window = std::exchange(restored_window_, c10::IValue());
  if (!mid_epoch || !window.isGenericDict()) return;
  auto dict = window.toGenericDict();
  const int64_t batches = dict.at("batches").toInt(), steps = dict.at("steps").toInt();
  if (batches == 0) return;
  if (steps != gradients_.accumulation) {
    logger()->warn("The checkpoint was saved {} batches into a window of {} accumulated batches; this fit "
                   "accumulates {}, so those batches' gradients are dropped",
                   batches, steps, gradients_.accumulation);
    return;
  }
  auto grads = dict.at("grads").toGenericDict();
  at::NoGradGuard no_grad;
  for (auto& param : model_->named_parameters()) {
    auto it = grads.find(param.key());
    param.value().mutable_grad() = it == grads.end() ? at::Tensor()
                                                     : it->value().toTensor().to(param.value().options(), false, true);
  }
  accumulated_ = batches;
}

Checkpoint Trainer::checkpoint(const CheckpointScope& scope) {
  Checkpoint out;
  out.add("model", model_);
  out.add("optimizer", optimizer_);
  out.add("trainer", std::make_shared<ProgressItem>(*this));
  out.add_optional("gradients", std::make_shared<GradientsItem>(*this));
  out.add_rng();
  out.add("callbacks", std::make_shared<CallbacksItem>(*this, scope.with_history(), scope.caller()));
  return out;
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

std::unique_ptr<detail::BatchSource> Trainer::evaluation_source(const at::Tensor& x, const at::Tensor& y,
                                                                int64_t batch_size, const at::Tensor& weights) const {
  if (!collectives_) return std::make_unique<TensorSource>(x, y, batch_size, TensorSource::Order(), std::nullopt, weights);
  // Each rank evaluates a contiguous shard; evaluate_source sums the totals.
  int64_t chunk = (x.size(0) + world_size() - 1) / world_size();
  int64_t start = std::min(x.size(0), chunk * rank());
  int64_t length = std::min(chunk, x.size(0) - start);
  return std::make_unique<TensorSource>(x.narrow(0, start, length), y.narrow(0, start, length), batch_size,
                                        TensorSource::Order(), std::nullopt,
                                        weights.defined() ? weights.narrow(0, start, length) : weights);
}

History Trainer::fit_source(detail::BatchSource& train, std::optional<std::pair<at::Tensor, at::Tensor>> validation,
                            FitOptions options, bool from_loader) {
  if (from_loader) {
    // As Keras: options that only mean something for tensors are errors, not ignored.
    if (options.batch_size_set()) {
      throw ValueError(fmt::format(
          "fit: batch_size({}) does not apply to a data loader, which makes its own batches; remove it (for "
          "tensor validation data, set validation_batch_size)",
          options.batch_size()));
    }
    if (options.shuffle_set()) {
      throw ValueError(fmt::format(
          "fit: shuffle({}) does not apply to a data loader, which orders its own samples (give it a "
          "RandomSampler or SequentialSampler); remove it",
          options.shuffle()));
    }
    if (options.validation_split() != 0.0) {
      throw ValueError(fmt::format(
          "fit: validation_split({}) needs tensor inputs; with a data loader, pass validation_data(loader)",
          options.validation_split()));
    }
  }
  if (options.epochs() < 0) throw ValueError(fmt::format("Invalid epochs: {} (must be >= 0)", options.epochs()));
  if (options.steps_per_epoch()) check_positive("steps_per_epoch", *options.steps_per_epoch());
  check_positive("validation_freq", options.validation_freq());
  if (options.initial_epoch() && *options.initial_epoch() < 0) {
    throw ValueError(fmt::format("Invalid initial_epoch: {} (must be >= 0)", *options.initial_epoch()));
  }
  if (options.gradient_accumulation_steps() <= 0) {
    throw ValueError(fmt::format("Invalid gradient_accumulation_steps: {} (must be > 0)",
                                 options.gradient_accumulation_steps()));
  }
  for (auto [name, value] : {std::pair{"clip_grad_norm", options.clip_grad_norm()},
                             std::pair{"clip_grad_value", options.clip_grad_value()}}) {
    if (value && !(*value > 0.0)) throw ValueError(fmt::format("Invalid {}: {} (must be > 0)", name, *value));
  }
  for (const auto& [label, weight] : options.class_weight()) {
    if (label < 0) throw ValueError(fmt::format("class_weight: class {} is negative", label));
    if (!std::isfinite(weight) || weight < 0) {
      throw ValueError(fmt::format("class_weight: the weight of class {} is {} (must be finite and >= 0)", label, weight));
    }
  }
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
  for (size_t i = 0; i < options.callbacks().size(); ++i) {
    if (!options.callbacks()[i]) throw ValueError(fmt::format("fit: callbacks[{}] is null", i));
    callbacks.push_back(options.callbacks()[i]);
  }
  auto history = std::make_shared<History>();
  callbacks.push_back(history);
  if (options.verbose() > 0 && is_main_process()) {
    auto steps = options.steps_per_epoch() ? options.steps_per_epoch() : train.batches_per_pass();
    callbacks.push_back(std::make_shared<ProgbarLogger>(options.verbose(), options.epochs(), steps));
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
      Logs extra;
      if (train_step_) {
        extra = train_step_.run(step, data.item);
      } else {
        default_train_step(step, data.x.to(device), data.y.to(device));
      }
      if (!step.loss_.defined()) {
        throw ValueError("train_step recorded no loss: call step.minimize(loss) or step.record_loss(loss)");
      }
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

Logs Trainer::evaluate(const at::Tensor& x, const at::Tensor& y, int64_t batch_size, const at::Tensor& sample_weight) {
  check_pair(x, y, "evaluate");
  check_positive("batch_size", batch_size);
  if (sample_weight.defined() && (sample_weight.dim() != 1 || sample_weight.size(0) != x.size(0))) {
    throw ValueError(fmt::format("evaluate: sample_weight must have one value per sample ([{}]); got shape [{}]",
                                 x.size(0), fmt::join(sample_weight.sizes(), ", ")));
  }
  CallbackList none;
  return evaluate_source(*evaluation_source(x, y, batch_size, sample_weight), none);
}

Logs Trainer::evaluate_source(detail::BatchSource& source, CallbackList& callbacks) {
  check_steps(source, /*training=*/false, "evaluate");
  ModeGuard eval_mode(*model_, false);
  at::NoGradGuard no_grad;
  const at::Device device = model_device(*model_);
  Logs sums;
  double weight = 0;
  std::map<std::string, std::vector<double>> states;
  RunningMeans means(metrics_, sums, weight, states);
  callbacks.on_test_begin({});
  source.begin_pass(0);
  int64_t batch = 0;
  detail::Batch data;
  while (source.next(data)) {
    callbacks.on_test_batch_begin(batch, {});
    StepContext step(*this, /*training=*/false, data.sample_weight);
    Logs extra;
    if (test_step_) {
      extra = test_step_.run(step, data.item);
    } else {
      default_test_step(step, data.x.to(device), data.y.to(device));
    }
    if (!step.loss_.defined()) throw ValueError("test_step recorded no loss: call step.record_loss(loss)");
    means.add(static_cast<double>(std::max<int64_t>(step.samples_, 1)), step.loss_.item<double>(), step.metric_values_,
              step.metric_states_, extra);
    callbacks.on_test_batch_end(batch, means.logs());
    ++batch;
  }
  if (collectives_) means.reduce_totals(*collectives_);  // shards may hold different batch counts
  if (weight == 0) throw ValueError("evaluate: the data yielded no batches");
  Logs logs = means.logs();
  means.store_in_metrics();
  callbacks.on_test_end(logs);
  return logs;
}

at::Tensor Trainer::predict(const at::Tensor& x, int64_t batch_size) {
  if (!x.defined() || x.dim() == 0 || x.size(0) == 0) {
    throw ValueError("predict: x must be a non-empty tensor with a batch dimension");
  }
  check_positive("batch_size", batch_size);
  TensorSource source(x, x, batch_size);  // no targets; the second is not read
  return predict_source(source);
}

at::Tensor Trainer::predict_source(detail::BatchSource& source) {
  if (predict_step_) {
    if (*predict_step_.batch_type != source.batch_type()) {
      throw ValueError(fmt::format("predict: predict_step was set for batches of type {}, but the data yields {}",
                                   c10::demangle(predict_step_.batch_type->name()),
                                   c10::demangle(source.batch_type().name())));
    }
  } else if (!source.has_tensors()) {
    throw ValueError(fmt::format("predict: the data yields batches of type {}, which the default step cannot read; "
                                 "set Trainer::predict_step<{}>(...)",
                                 c10::demangle(source.batch_type().name()), c10::demangle(source.batch_type().name())));
  }
  ModeGuard eval_mode(*model_, false);
  at::NoGradGuard no_grad;
  const at::Device device = model_device(*model_);
  std::vector<at::Tensor> outputs;
  source.begin_pass(0);
  detail::Batch data;
  while (source.next(data)) {
    outputs.push_back(predict_step_ ? predict_step_.run(data.item) : forward_checked(data.x.to(device)));
  }
  if (outputs.empty()) throw ValueError("predict: the data yielded no batches");
  return at::cat(outputs);
}

void Trainer::load_weights(const std::string& path) { torchfit::load_weights(*model_, path); }

void Trainer::load_checkpoint(const std::string& path) { restore(path, /*with_history=*/false); }

void Trainer::restore_backup(const std::string& path) { restore(path, /*with_history=*/true); }

void Trainer::restore(const std::string& path, bool with_history) {
  restored_window_ = c10::IValue();
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
