#pragma once
/// \file
/// Internal: how `Trainer` and `FitOptions` read batches from tensors or from any
/// LibTorch data loader (or a pointer to one) through one interface.

#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/data/example.h>

namespace torchfit {
namespace detail {

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

/// The loader behind `T` (a loader, or a pointer to one).
template <typename T>
using loader_t = std::remove_reference_t<decltype(deref(std::declval<std::remove_reference_t<T>&>()))>;

/// True for what the loader overloads take: anything but tensors that has begin() and end().
template <typename T, typename = void>
struct is_loader : std::false_type {};
template <typename T>
struct is_loader<T, std::void_t<decltype(std::declval<loader_t<T>&>().begin()),
                                decltype(std::declval<loader_t<T>&>().end())>>
    : std::bool_constant<!std::is_convertible_v<T, at::Tensor>> {};

/// Batches the default steps take: `Example<Tensor, Tensor>`, or a vector of
/// them (a loader without `Stack`), stacked.
template <typename Batch>
inline constexpr bool is_example_batch =
    std::is_same_v<Batch, torch::data::Example<at::Tensor, at::Tensor>> ||
    std::is_same_v<Batch, std::vector<torch::data::Example<at::Tensor, at::Tensor>>>;

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

/// One batch as the Trainer sees it.
struct Batch {
  /// Inputs, targets and sample weights, for the default steps (when the data
  /// yields example batches).
  at::Tensor x, y, sample_weight;
  /// The batch the data yielded, for custom steps; valid until the next batch.
  const void* item = nullptr;
};

/// Batches in passes over a dataset: the Trainer pulls them one at a time, so an
/// epoch of `steps_per_epoch` batches can stop mid-pass and the next continue it.
class BatchSource {
 public:
  virtual ~BatchSource();
  /// Starts pass `pass` (a tensor source's shuffle order depends on it).
  virtual void begin_pass(int64_t pass) = 0;
  /// The pass's next batch; false at the end of the pass.
  virtual bool next(Batch& batch) = 0;
  /// Skips up to `count` batches of the current pass; returns how many it skipped.
  virtual int64_t skip(int64_t count);
  /// Batches per pass, when known without running one.
  virtual std::optional<int64_t> batches_per_pass() const { return std::nullopt; }
  /// The type of `Batch::item`, and whether `x` and `y` are filled.
  virtual const std::type_info& batch_type() const = 0;
  virtual bool has_tensors() const = 0;
};

/// A LibTorch data loader (or any range of batches), by reference.
template <typename Loader>
class LoaderSource final : public BatchSource {
 public:
  using Iterator = decltype(std::declval<Loader&>().begin());
  using Item = std::decay_t<decltype(*std::declval<Iterator&>())>;

  explicit LoaderSource(Loader& loader) : loader_(loader) {}
  // The loader's iterator is taken at the first batch, not here, so a pass that
  // is begun but never read starts no prefetching.
  void begin_pass(int64_t) override {
    current_.reset();
    started_ = false;
    advance_ = false;
  }
  bool next(Batch& batch) override {
    if (!started_) {
      current_.emplace(loader_.begin());
      started_ = true;
    } else if (advance_) {  // only now, so the previous batch stayed valid until this call
      ++*current_;
    }
    advance_ = false;
    if (*current_ == loader_.end()) return false;
    const Item& item = **current_;
    advance_ = true;
    batch.item = &item;
    if constexpr (is_example_batch<Item>) std::tie(batch.x, batch.y) = unpack_batch(item);
    return true;
  }
  const std::type_info& batch_type() const override { return typeid(Item); }
  bool has_tensors() const override { return is_example_batch<Item>; }

 private:
  Loader& loader_;
  std::optional<Iterator> current_;
  bool started_ = false;
  bool advance_ = false;
};

/// A source over `loader` (a loader, or a pointer to one) that refers to it.
template <typename T>
std::shared_ptr<BatchSource> make_loader_source(T& loader) {
  return std::make_shared<LoaderSource<loader_t<T>>>(deref(loader));
}
}  // namespace detail
}  // namespace torchfit
