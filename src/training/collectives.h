#pragma once
// The few collectives data-parallel fit needs, with errors that name the rank
// and the operation (a dead peer surfaces here).

#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>

namespace c10d {
class ProcessGroup;
}

namespace torchfit::detail {

class Collectives {
 public:
  explicit Collectives(c10::intrusive_ptr<c10d::ProcessGroup> group);
  ~Collectives();

  int rank() const { return rank_; }
  int size() const { return size_; }

  /// Sums a dense CPU tensor across ranks, in place.
  void allreduce_sum(at::Tensor& tensor, const char* what);
  /// Averages the gradients of `parameters` across ranks, in buckets of up to
  /// `bucket_elements` elements so small tensors share collectives.
  void average_gradients(const std::vector<at::Tensor>& parameters, int64_t bucket_elements = 1 << 22);
  /// Copies rank 0's values into every rank's tensors, in place.
  void broadcast_from_root(const std::vector<at::Tensor>& tensors, const char* what);
  void barrier(const char* what);
  /// Wall time spent averaging gradients so far.
  double gradient_seconds() const { return gradient_seconds_; }

 private:
  template <typename Fn>
  void run(const char* what, Fn&& fn);

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  int rank_;
  int size_;
  double gradient_seconds_ = 0;
};

}  // namespace torchfit::detail
