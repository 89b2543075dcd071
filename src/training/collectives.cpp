#include "training/collectives.h"

#include <chrono>

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "torchfit/error.h"

namespace torchfit::detail {

Collectives::Collectives(c10::intrusive_ptr<c10d::ProcessGroup> group)
    : group_(std::move(group)), rank_(group_->getRank()), size_(group_->getSize()) {}

Collectives::~Collectives() = default;

template <typename Fn>
void Collectives::run(const char* what, Fn&& fn) {
  try {
    fn()->wait();
  } catch (const std::exception& e) {
    throw Error(fmt::format("Rank {} of {}: {} failed; a peer may have died or timed out: {}", rank_, size_, what,
                            e.what()));
  }
}

void Collectives::allreduce_sum(at::Tensor& tensor, const char* what) {
  // Gloo reads a list as one tensor's replicas: one tensor per call.
  std::vector<at::Tensor> one{tensor};
  run(what, [&] { return group_->allreduce(one); });
}

void Collectives::average_gradients(const std::vector<at::Tensor>& parameters, int64_t bucket_elements) {
  auto start = std::chrono::steady_clock::now();
  struct Timer {
    std::chrono::steady_clock::time_point start;
    double& total;
    ~Timer() { total += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); }
  } timer{start, gradient_seconds_};
  std::vector<at::Tensor> bucket;
  int64_t elements = 0;
  auto flush = [&] {
    if (bucket.empty()) return;
    auto flat = at::cat(bucket);
    allreduce_sum(flat, "gradient allreduce");
    flat.div_(size_);
    int64_t offset = 0;
    for (auto& view : bucket) {
      // `bucket` holds flattened views of the gradients: write the averages back.
      view.copy_(flat.narrow(0, offset, view.numel()));
      offset += view.numel();
    }
    bucket.clear();
    elements = 0;
  };
  at::ScalarType dtype = at::kFloat;
  for (const auto& p : parameters) {
    auto grad = p.grad();
    if (!grad.defined()) continue;
    if (!grad.is_contiguous()) {  // rare: reduce it on its own
      auto dense = grad.contiguous();
      allreduce_sum(dense, "gradient allreduce");
      grad.copy_(dense.div_(size_));
      continue;
    }
    if (!bucket.empty() && (grad.scalar_type() != dtype || elements + grad.numel() > bucket_elements)) flush();
    dtype = grad.scalar_type();
    bucket.push_back(grad.view({-1}));
    elements += grad.numel();
  }
  flush();
}

void Collectives::broadcast_from_root(const std::vector<at::Tensor>& tensors, const char* what) {
  for (const auto& tensor : tensors) {
    std::vector<at::Tensor> one{tensor};
    run(what, [&] { return group_->broadcast(one); });
  }
}

void Collectives::barrier(const char* what) {
  run(what, [&] { return group_->barrier(); });
}

}  // namespace torchfit::detail
