#include "torchfit/data/sampler.h"

#include <algorithm>
#include <string>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <torch/serialize/archive.h>

#include "format/state_fields.h"
#include "torchfit/engine/checkpoint.h"
#include "torchfit/error.h"

namespace torchfit {

/// What every copy of a sampler shares: the epoch's order and the position in it.
class Sampler::State : public Stateful {
 public:
  enum class Kind { Sequential, Random, Distributed };

  State(Kind kind, size_t size, size_t replicas = 1, size_t rank = 0, uint64_t seed = 0)
      : kind_(kind), size_(size), replicas_(replicas), rank_(rank), seed_(seed) {}

  void reset(c10::optional<size_t> new_size) {
    if (new_size && *new_size != size_) {
      size_ = *new_size;
      resume_ = false;  // a restored order over another size means nothing
    }
    const bool continues = resume_ && !finished_;
    resume_ = false;
    if (!continues) start_epoch();
  }

  c10::optional<std::vector<size_t>> next(size_t batch_size) {
    if (!started_) start_epoch();
    resume_ = false;
    if (index_ >= order_.size()) {
      finished_ = true;
      return c10::nullopt;
    }
    const size_t end = std::min(order_.size(), index_ + batch_size);
    std::vector<size_t> batch(order_.begin() + static_cast<std::ptrdiff_t>(index_),
                              order_.begin() + static_cast<std::ptrdiff_t>(end));
    index_ = end;
    return batch;
  }

  void set_epoch(int64_t epoch) {
    epochs_ = epoch;
    resume_ = false;
    started_ = false;  // the next reset or next() draws epoch `epoch`
  }

  c10::IValue state_dict() const override {
    c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
    out.insert("kind", kind_name(kind_));
    out.insert("size", static_cast<int64_t>(size_));
    out.insert("epoch", epochs_);
    out.insert("index", static_cast<int64_t>(index_));
    out.insert("finished", finished_);
    // A sequential order is implied by its size; the others are saved as drawn.
    std::vector<int64_t> order;
    if (kind_ != Kind::Sequential) order.assign(order_.begin(), order_.end());
    out.insert("order", at::tensor(order, at::kLong));
    return out;
  }

  void check_state_dict(const c10::IValue& state, const std::string& where) const override {
    const detail::StateFields fields(state, where, "the saved sampler");
    const auto kind = fields.string("kind");
    if (kind != kind_name(kind_)) fields.fail(fmt::format("it is a {} sampler, this one is {}", kind, kind_name(kind_)));
    const int64_t size = fields.integer("size");
    if (size != static_cast<int64_t>(size_)) {
      fields.fail(fmt::format("it sampled {} examples, this one samples {}", size, size_));
    }
    if (fields.integer("epoch") < 0) fields.fail("its epoch is negative");
    fields.boolean("finished");
    const auto order = fields.tensor("order");
    if (order.dim() != 1 || order.scalar_type() != at::kLong || order.device().type() != at::kCPU) {
      fields.fail("its order is not a 1-D int64 CPU tensor");
    }
    const int64_t length = kind_ == Kind::Sequential ? size : order.numel();
    if (kind_ != Kind::Sequential && order.numel() > 0 &&
        (order.min().item<int64_t>() < 0 || order.max().item<int64_t>() >= size)) {
      fields.fail(fmt::format("its order holds indices outside [0, {})", size));
    }
    const int64_t index = fields.integer("index");
    if (index < 0 || index > length) fields.fail(fmt::format("its position {} is outside [0, {}]", index, length));
  }

  void load_state_dict(const c10::IValue& state) override {
    const auto& dict = state.toGenericDict();
    epochs_ = dict.at("epoch").toInt();
    index_ = static_cast<size_t>(dict.at("index").toInt());
    finished_ = dict.at("finished").toBool();
    if (kind_ == Kind::Sequential) {
      fill_sequential();
    } else {
      const auto order = dict.at("order").toTensor().contiguous();
      const int64_t* data = order.data_ptr<int64_t>();
      order_.assign(data, data + order.numel());
    }
    started_ = true;
    resume_ = true;
  }

  size_t index() const { return index_; }
  int64_t epoch() const { return epochs_; }
  size_t size() const { return size_; }

 private:
  static const char* kind_name(Kind kind) {
    switch (kind) {
      case Kind::Sequential: return "sequential";
      case Kind::Random: return "random";
      case Kind::Distributed: return "distributed";
    }
    return "?";
  }

  void fill_sequential() {
    order_.resize(size_);
    for (size_t i = 0; i < size_; ++i) order_[i] = i;
  }

  void start_epoch() {
    const int64_t size = static_cast<int64_t>(size_);
    switch (kind_) {
      case Kind::Sequential:
        fill_sequential();
        break;
      case Kind::Random: {
        const auto permutation = at::randperm(size, at::kLong);  // torch's default generator, as LibTorch's
        const int64_t* data = permutation.data_ptr<int64_t>();
        order_.assign(data, data + size);
        break;
      }
      case Kind::Distributed: {
        auto generator = at::make_generator<at::CPUGeneratorImpl>(seed_ + static_cast<uint64_t>(epochs_));
        const auto permutation = at::randperm(size, generator, at::kLong);
        const int64_t* data = permutation.data_ptr<int64_t>();
        const size_t per_rank = (size_ + replicas_ - 1) / replicas_;
        order_.clear();
        for (size_t i = rank_; i < per_rank * replicas_ && size_ > 0; i += replicas_) {
          order_.push_back(static_cast<size_t>(data[i % size_]));  // the padding repeats the head
        }
        break;
      }
    }
    ++epochs_;
    index_ = 0;
    finished_ = false;
    started_ = true;
  }

  Kind kind_;
  size_t size_;
  size_t replicas_;
  size_t rank_;
  uint64_t seed_;
  std::vector<size_t> order_;
  size_t index_ = 0;
  int64_t epochs_ = 0;
  bool started_ = false;   // an order was drawn (or restored)
  bool finished_ = false;  // next() found the epoch run out
  bool resume_ = false;    // restored: the next reset continues
};

Sampler::Sampler(std::shared_ptr<State> state) : state_(std::move(state)) {}
Sampler::~Sampler() = default;

void Sampler::reset(c10::optional<size_t> new_size) { state_->reset(new_size); }
c10::optional<std::vector<size_t>> Sampler::next(size_t batch_size) { return state_->next(batch_size); }
size_t Sampler::index() const { return state_->index(); }
int64_t Sampler::epoch() const { return state_->epoch(); }
size_t Sampler::size() const { return state_->size(); }
std::shared_ptr<Stateful> Sampler::state() const { return state_; }

void Sampler::save(torch::serialize::OutputArchive& archive) const {
  const auto dict = state_->state_dict().toGenericDict();
  for (const char* name : {"epoch", "index"}) {
    archive.write(name, at::tensor(dict.at(name).toInt(), at::kLong), /*is_buffer=*/true);
  }
  archive.write("finished", at::tensor(static_cast<int64_t>(dict.at("finished").toBool()), at::kLong), true);
  archive.write("size", at::tensor(dict.at("size").toInt(), at::kLong), true);
  archive.write("order", dict.at("order").toTensor(), true);
}

void Sampler::load(torch::serialize::InputArchive& archive) {
  c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
  at::Tensor tensor;
  for (const char* name : {"epoch", "index", "size"}) {
    archive.read(name, tensor, /*is_buffer=*/true);
    dict.insert(name, tensor.item<int64_t>());
  }
  archive.read("finished", tensor, true);
  dict.insert("finished", tensor.item<int64_t>() != 0);
  archive.read("order", tensor, true);
  dict.insert("order", tensor);
  const auto current = state_->state_dict().toGenericDict();
  dict.insert("kind", current.at("kind"));
  state_->check_state_dict(dict, "Sampler archive");
  state_->load_state_dict(dict);
}

SequentialSampler::SequentialSampler(size_t size) : Sampler(std::make_shared<State>(State::Kind::Sequential, size)) {}

RandomSampler::RandomSampler(size_t size) : Sampler(std::make_shared<State>(State::Kind::Random, size)) {}

namespace {
size_t checked_rank(size_t num_replicas, size_t rank) {
  if (num_replicas == 0 || rank >= num_replicas) {
    throw ValueError(fmt::format("DistributedRandomSampler: rank {} is not below num_replicas {}", rank, num_replicas));
  }
  return rank;
}
}  // namespace

DistributedRandomSampler::DistributedRandomSampler(size_t size, size_t num_replicas, size_t rank, uint64_t seed)
    : Sampler(std::make_shared<State>(State::Kind::Distributed, size, num_replicas, checked_rank(num_replicas, rank),
                                      seed)) {}

void DistributedRandomSampler::set_epoch(int64_t epoch) {
  std::static_pointer_cast<State>(state())->set_epoch(epoch);
}

void Checkpoint::add(const std::string& name, const Sampler& sampler) { add(name, sampler.state()); }

}  // namespace torchfit
