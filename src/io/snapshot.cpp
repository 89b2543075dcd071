#include "io/snapshot.h"

#include <cstdlib>
#include <cstring>
#include <limits>

#include <ATen/ATen.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <fmt/format.h>

#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

constexpr int kSamples = 8;

/// A few elements of a contiguous CPU tensor equal those of its copy: catches most
/// writes that bypass the version counter (through `.data()` or raw pointers).
bool samples_match(const at::Tensor& tensor, const at::Tensor& buffer) {
  if (!tensor.device().is_cpu() || !tensor.is_contiguous()) return true;
  const int64_t n = tensor.numel();
  const size_t item = tensor.element_size();
  auto* a = static_cast<const char*>(tensor.data_ptr());
  auto* b = static_cast<const char*>(buffer.data_ptr());
  for (int i = 0; i < kSamples && n > 0; ++i) {
    int64_t at = (n - 1) * i / (kSamples - 1);
    if (std::memcmp(a + at * item, b + at * item, item) != 0) return false;
  }
  return true;
}

std::string describe_name(const c10::IValue& name) {
  return name.isString() ? fmt::format("'{}'", name.toStringRef()) : std::string("of the checkpoint");
}

}  // namespace

at::Tensor empty_buffer(const at::Tensor& like) {
  auto options = like.options().device(at::kCPU);
  const size_t nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (!like.device().is_cpu() || nbytes < kPageAlignedRecord) {
    return at::empty(like.sizes(), options.pinned_memory(!like.device().is_cpu()));
  }
  void* data = allocate_for_filling(nbytes);
  return at::from_blob(data, like.sizes(), [](void* p) { std::free(p); }, options);
}

namespace {

/// Makes `buffer` a contiguous CPU tensor of `like`'s shape and dtype: kept if it
/// is one, otherwise allocated with `empty_buffer`.
void fit_buffer(at::Tensor& buffer, const at::Tensor& like) {
  bool reusable = buffer.defined() && buffer.sizes() == like.sizes() &&
                  buffer.scalar_type() == like.scalar_type() && buffer.is_contiguous();
  if (!reusable) buffer = empty_buffer(like);
}

}  // namespace

void copy_into(at::Tensor& buffer, const at::Tensor& value) {
  if (!value.defined()) {
    buffer = at::Tensor();
    return;
  }
  at::NoGradGuard no_grad;
  fit_buffer(buffer, value);
  buffer.copy_(value);
}

c10::IValue Snapshot::capture(const c10::IValue& value, const SaveHints& hints) {
  next_ = 0;
  deferred_.clear();
  cpu_copies_.items.clear();
  cpu_copies_.claimed = 0;
  cpu_copies_.done = 0;
  cpu_copies_.error = nullptr;
  ready_.clear();
  stats_ = SnapshotStats();
  previous_crcs_ = std::move(crcs_);
  crcs_.clear();
  auto out = copy(value, c10::IValue(), hints);
  previous_crcs_.clear();
  slots_.resize(next_);  // a smaller state frees what it no longer uses
  return out;
}

size_t Snapshot::nbytes() const {
  size_t total = 0;
  for (const auto& slot : slots_) total += slot.buffer.defined() ? slot.buffer.nbytes() : 0;
  return total;
}

void Snapshot::invalidate() {
  for (auto& slot : slots_) slot.version = -1;
  crcs_.clear();
  cpu_copies_.claimed = std::numeric_limits<size_t>::max() / 2;  // a later helper takes nothing
  deferred_.clear();
  ready_.clear();
}

bool Snapshot::holds(const Slot& slot, const at::Tensor& tensor) const {
  if (slot.version < 0 || tensor.is_inference() || !slot.buffer.defined()) return false;
  return slot.storage && slot.storage->_unsafe_get_target() == tensor.storage().unsafeGetStorageImpl() &&
         slot.data == tensor.data_ptr() && slot.version == tensor._version() &&
         slot.buffer.sizes() == tensor.sizes() && slot.buffer.scalar_type() == tensor.scalar_type() &&
         tensor.is_contiguous() && samples_match(tensor, slot.buffer);
}

at::Tensor Snapshot::copy_tensor(const at::Tensor& tensor, const c10::IValue& name, const SaveHints& hints) {
  if (next_ == slots_.size()) slots_.emplace_back();
  const size_t index = next_++;
  Slot& slot = slots_[index];
  if (!tensor.defined()) {
    slot = Slot();
    return at::Tensor();
  }
  const bool by_step = hints.updated_by_step && hints.updated_by_step(tensor);
  if (by_step && holds(slot, tensor)) {
    stats_.reused += slot.buffer.nbytes();
    crcs_.track(slot.buffer.data_ptr(), slot.buffer.nbytes(), &previous_crcs_);
    return slot.buffer;
  }
  const bool trackable = by_step && !tensor.is_inference() && tensor.is_contiguous();
  slot.version = -1;
  if (trackable) {
    slot.storage = tensor.storage().getWeakStorageImpl();
    slot.data = tensor.data_ptr();
  }
  if (by_step && hints.defer_copy) {
    // Sized now, filled by the writer: the result refers to this very buffer.
    fit_buffer(slot.buffer, tensor);
    crcs_.track(slot.buffer.data_ptr(), slot.buffer.nbytes());
    if (!tensor.device().is_cpu()) {
      bool recorded = false;
      for (const auto& event : ready_) recorded |= event.device() == tensor.device();
      if (!recorded) {
        // What was queued on the device before the save point comes first.
        c10::impl::VirtualGuardImpl device(tensor.device().type());
        ready_.emplace_back(tensor.device().type());
        ready_.back().record(device.getStream(tensor.device()));
      }
    }
    if (tensor.device().is_cpu()) cpu_copies_.items.push_back(deferred_.size());
    deferred_.push_back({index, tensor, trackable ? tensor._version() : -1, name});
    stats_.deferred += tensor.nbytes();
    return slot.buffer;
  }
  copy_into(slot.buffer, tensor);
  crcs_.track(slot.buffer.data_ptr(), slot.buffer.nbytes());
  if (trackable) slot.version = tensor._version();
  stats_.copied += tensor.nbytes();
  return slot.buffer;
}

void Snapshot::help_copy_deferred() {
  at::NoGradGuard no_grad;
  const auto& items = cpu_copies_.items;
  for (size_t i; (i = cpu_copies_.claimed.fetch_add(1)) < items.size();) {
    const auto& item = deferred_[items[i]];
    std::exception_ptr error;
    try {
      slots_[item.slot].buffer.copy_(item.source);
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(cpu_copies_.mutex);
    if (error && !cpu_copies_.error) cpu_copies_.error = error;
    if (++cpu_copies_.done == items.size()) cpu_copies_.all_done.notify_all();
  }
}

void Snapshot::copy_deferred() {
  at::NoGradGuard no_grad;
  // Device tensors go through a side stream that first waits for the save point.
  std::vector<c10::Stream> streams;
  for (auto& event : ready_) {
    c10::impl::VirtualGuardImpl device(event.device_type());
    streams.push_back(device.getStreamFromGlobalPool(event.device()));
    event.block(streams.back());
  }
  for (const auto& item : deferred_) {
    if (item.source.device().is_cpu()) continue;
    auto& buffer = slots_[item.slot].buffer;
    for (const auto& stream : streams) {
      if (stream.device() != item.source.device()) continue;
      c10::StreamGuard guard(stream);
      buffer.copy_(item.source, /*non_blocking=*/true);
    }
  }
  help_copy_deferred();  // the writer claims its share like any helper
  std::exception_ptr error;
  {
    // Copies a helper claimed may still be running.
    std::unique_lock<std::mutex> lock(cpu_copies_.mutex);
    cpu_copies_.all_done.wait(lock, [&] { return cpu_copies_.done == cpu_copies_.items.size(); });
    error = cpu_copies_.error;
  }
  // Also before raising a failed copy: no device copy may still be writing into
  // buffers the next capture reuses.
  for (const auto& stream : streams) stream.synchronize();
  if (error) {
    invalidate();
    std::rethrow_exception(error);
  }
  for (const auto& item : deferred_) {
    if (item.version < 0) continue;
    if (item.source._version() != item.version) {
      invalidate();
      throw CheckpointError(fmt::format(
          "Tensor {} changed in place while a background save was still copying it, so the file would not hold "
          "the state of its save point; call before_update() before changing parameters or optimizer state",
          describe_name(item.name)));
    }
    slots_[item.slot].version = item.version;
  }
  deferred_.clear();  // every claim from here on fails: no helper reads it
  ready_.clear();
}

c10::IValue Snapshot::copy(const c10::IValue& value, const c10::IValue& name, const SaveHints& hints) {
  if (value.isTensor()) return copy_tensor(value.toTensor(), name, hints);
  if (value.isGenericDict()) {
    const auto& dict = value.toGenericDict();
    c10::impl::GenericDict out(dict.keyType(), dict.valueType());
    for (const auto& entry : dict) out.insert(entry.key(), copy(entry.value(), entry.key(), hints));
    return out;
  }
  if (value.isList()) {
    const auto& list = value.toList();
    c10::impl::GenericList out(list.elementType());
    for (size_t i = 0; i < list.size(); ++i) out.push_back(copy(list.get(i), name, hints));
    return out;
  }
  if (value.isTuple()) {
    std::vector<c10::IValue> items;
    const auto& elements = value.toTupleRef().elements();
    for (size_t i = 0; i < elements.size(); ++i) items.push_back(copy(elements[i], name, hints));
    return c10::ivalue::Tuple::create(std::move(items));
  }
  return value;
}

}  // namespace torchfit::detail
