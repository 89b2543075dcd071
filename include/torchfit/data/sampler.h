#pragma once
/// \file
/// Samplers whose epoch order and position go into a checkpoint: drop-in for LibTorch's
/// `torch::data::samplers::{Sequential,Random,DistributedRandom}Sampler` in
/// `torch::data::make_data_loader(dataset, sampler, options)`.
///
///     torchfit::RandomSampler sampler(dataset.size().value());
///     auto loader = torch::data::make_data_loader(std::move(dataset), sampler, options);  // a copy: they share
///     state.add("sampler", sampler);
///     state.add_rng();
///     manager.restore_latest(state);      // mid-epoch: the same order, from the next batch
///     for (; epoch < epochs; ++epoch) {
///       for (auto& batch : *loader) { ... manager.save(state); }
///     }
///
/// LibTorch's loader calls `reset()` at each `begin()`, which starts a new epoch. After a
/// restore the first `reset()` continues the restored epoch instead, so the loop needs no
/// code for it; if the restored epoch had run out (the loader had asked past its end, so the
/// loop had left it), it starts the next. With `drop_last(true)` the loader leaves an epoch at
/// a short last batch without asking past it: save inside the batch loop, not after it.
/// `RandomSampler` draws each epoch's order from torch's default generator as LibTorch's does;
/// with the generator in the checkpoint too (`add_rng`), a restored run draws what an
/// uninterrupted one draws.
///
/// The position counts the indices handed to the loader. With `workers(0)` that is what the
/// loop has consumed. A loader with workers requests up to `max_jobs` batches ahead, which a
/// restore would skip: checkpoint such loops at epoch ends, or use workers(0).

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include <torch/data/samplers/base.h>

namespace torchfit {

class Stateful;

/// The common part of torchfit's samplers. Copies share the order and position.
class Sampler : public torch::data::samplers::Sampler<std::vector<size_t>> {
 public:
  ~Sampler() override;
  /// Starts a new epoch (a new order, position 0), resizing first if `new_size` is given;
  /// the first call after a restore continues the restored epoch instead.
  void reset(c10::optional<size_t> new_size = c10::nullopt) override;
  /// The next up to `batch_size` indices of the epoch; nothing once the epoch has run out.
  c10::optional<std::vector<size_t>> next(size_t batch_size) override;
  /// LibTorch's archive format, for `torch::save(sampler, ...)`.
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  /// Indices handed out in the current epoch.
  size_t index() const;
  /// Epochs begun so far (orders drawn).
  int64_t epoch() const;
  /// The number of examples sampled from (before sharding).
  size_t size() const;
  /// The shared state that `Checkpoint::add(name, sampler)` saves.
  std::shared_ptr<Stateful> state() const;

  class State;

 protected:
  explicit Sampler(std::shared_ptr<State> state);

 private:
  std::shared_ptr<State> state_;
};

/// 0, 1, ..., size - 1 in every epoch.
class SequentialSampler : public Sampler {
 public:
  explicit SequentialSampler(size_t size);
};

/// A new permutation of 0 .. size - 1 each epoch, drawn with `torch::randperm` from torch's
/// default generator when the epoch starts.
class RandomSampler : public Sampler {
 public:
  explicit RandomSampler(size_t size);
};

/// This rank's share of a permutation every rank draws alike: from a generator seeded with
/// `seed + epoch`, padded by repeating its head to a multiple of `num_replicas`, then every
/// `num_replicas`-th index from `rank` (as PyTorch's DistributedSampler). The epoch counts up
/// by itself at each `reset()`; `set_epoch` sets the one the next reset starts.
class DistributedRandomSampler : public Sampler {
 public:
  /// Throws `ValueError` unless rank < num_replicas.
  DistributedRandomSampler(size_t size, size_t num_replicas, size_t rank, uint64_t seed = 0);
  void set_epoch(int64_t epoch);
};

}  // namespace torchfit
