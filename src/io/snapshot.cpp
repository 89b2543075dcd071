#include "io/snapshot.h"

#include <ATen/ATen.h>

namespace torchfit::detail {
void copy_into(at::Tensor& buffer, const at::Tensor& value) {
  if (!value.defined()) {
    buffer = at::Tensor();
    return;
  }
  at::NoGradGuard no_grad;
  bool reusable = buffer.defined() && buffer.sizes() == value.sizes() &&
                  buffer.scalar_type() == value.scalar_type() && buffer.is_contiguous();
  if (!reusable) {
    // Pinned host memory for device tensors, so the device-to-host copy runs at full speed.
    auto options = value.options().device(at::kCPU).pinned_memory(value.is_cuda());
    buffer = at::empty(value.sizes(), options);
  }
  buffer.copy_(value);
}

c10::IValue Snapshot::capture(const c10::IValue& value) {
  next_ = 0;
  auto out = copy(value);
  buffers_.resize(next_);  // a smaller state frees what it no longer uses
  return out;
}

size_t Snapshot::nbytes() const {
  size_t total = 0;
  for (const auto& buffer : buffers_) total += buffer.defined() ? buffer.nbytes() : 0;
  return total;
}

c10::IValue Snapshot::copy(const c10::IValue& value) {
  if (value.isTensor()) {
    if (next_ == buffers_.size()) buffers_.emplace_back();
    auto& buffer = buffers_[next_++];
    copy_into(buffer, value.toTensor());
    return buffer;
  }
  if (value.isGenericDict()) {
    const auto& dict = value.toGenericDict();
    c10::impl::GenericDict out(dict.keyType(), dict.valueType());
    for (const auto& entry : dict) out.insert(entry.key(), copy(entry.value()));
    return out;
  }
  if (value.isList()) {
    const auto& list = value.toList();
    c10::impl::GenericList out(list.elementType());
    for (size_t i = 0; i < list.size(); ++i) out.push_back(copy(list.get(i)));
    return out;
  }
  if (value.isTuple()) {
    std::vector<c10::IValue> items;
    const auto& elements = value.toTupleRef().elements();
    for (size_t i = 0; i < elements.size(); ++i) items.push_back(copy(elements[i]));
    return c10::ivalue::Tuple::create(std::move(items));
  }
  return value;
}

}  // namespace torchfit::detail
