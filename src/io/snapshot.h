#pragma once
// Reusable CPU copies of a checkpoint's tensors, taken on the training thread so a
// background writer can serialize them while training goes on.

#include <vector>

#include <ATen/core/ivalue.h>

namespace torchfit::detail {

class Snapshot {
 public:
  /// `value` with every tensor replaced by a CPU copy (the containers are rebuilt,
  /// other values shared). The copies live in buffers reused by the next capture
  /// when shapes and dtypes match, so a capture invalidates the previous result.
  c10::IValue capture(const c10::IValue& value);
  /// Bytes held in buffers.
  size_t nbytes() const;

 private:
  c10::IValue copy(const c10::IValue& value);
  /// One buffer per tensor, in traversal order: the same state reuses them all.
  std::vector<at::Tensor> buffers_;
  size_t next_ = 0;
};

/// Copies `value` into `buffer`, reusing the buffer when its shape and dtype
/// match and allocating a CPU tensor otherwise; an undefined value clears it.
void copy_into(at::Tensor& buffer, const at::Tensor& value);

}  // namespace torchfit::detail
