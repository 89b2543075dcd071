#pragma once
// Reusable CPU copies of a checkpoint's tensors, taken so a background writer can
// serialize them while training goes on.
//
// Tensors that only optimizer steps write (parameters, optimizer state) can be
// left out of the capture and copied later by the writer (`copy_deferred`), while
// the next forward and backward pass run, as DataStates-LLM and CheckFreq do; the
// caller must not change them before that copy is done. Such a tensor whose
// storage, place, shape and version counter are those of the copy a buffer
// already holds is not copied again (frozen layers cost nothing). Other tensors,
// such as BatchNorm's running statistics (LibTorch's kernels update them without
// bumping their version counter), are copied at capture, every time.

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <vector>

#include <ATen/core/ivalue.h>
#include <c10/core/Event.h>
#include <c10/util/intrusive_ptr.h>

#include "format/zip.h"
#include "torchfit/io/checkpoint_io.h"

namespace torchfit::detail {

class Snapshot {
 public:
  /// `value` with every tensor replaced by a CPU buffer (the containers are
  /// rebuilt, other values shared). With `hints.defer_copy`, the tensors
  /// `hints.updated_by_step` accepts are copied by `copy_deferred()`, not here.
  /// A capture invalidates the previous result.
  c10::IValue capture(const c10::IValue& value, const SaveHints& hints = SaveHints());
  /// Copies what the last capture deferred. Throws CheckpointError naming the
  /// tensor if one changed in place after the capture: the copy would not be the
  /// state at the save point.
  void copy_deferred();
  /// Takes a share of the CPU copies `copy_deferred` is making, or is about to
  /// make, on another thread: a thread that would otherwise wait for them
  /// (before an optimizer step) helps instead. Returns when no copy is left to
  /// take; `copy_deferred` still returns only when every copy is done.
  void help_copy_deferred();
  /// Forgets what the buffers hold (after a failed save), so nothing is reused.
  void invalidate();

  const SnapshotStats& stats() const { return stats_; }
  /// The CRC32s of the buffers of the last capture: kept for buffers it reused,
  /// filled by the save that writes them (passed as `SaveHints::known_crcs`).
  KnownCrcs& crcs() { return crcs_; }
  /// Bytes held in buffers.
  size_t nbytes() const;

 private:
  /// One buffer per tensor, in traversal order, and the tensor it last copied.
  struct Slot {
    at::Tensor buffer;
    std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;  // weak: keeps the address from being reused
    const void* data = nullptr;
    int64_t version = -1;  // -1: the buffer holds nothing reusable
  };
  struct Deferred {
    size_t slot;
    at::Tensor source;
    int64_t version;
    c10::IValue name;
  };
  c10::IValue copy(const c10::IValue& value, const c10::IValue& name, const SaveHints& hints);
  at::Tensor copy_tensor(const at::Tensor& tensor, const c10::IValue& name, const SaveHints& hints);
  bool holds(const Slot& slot, const at::Tensor& tensor) const;

  std::vector<Slot> slots_;
  size_t next_ = 0;
  /// The CPU copies of `deferred_` (device copies go through streams), claimed
  /// one tensor at a time by `copy_deferred` and `help_copy_deferred`.
  struct CpuCopies {
    std::vector<size_t> items;  // indices into deferred_, fixed from capture until the next
    std::atomic<size_t> claimed{0};
    std::mutex mutex;
    std::condition_variable all_done;
    size_t done = 0;
    std::exception_ptr error;
  };
  std::vector<Deferred> deferred_;
  CpuCopies cpu_copies_;
  /// Per device of deferred device tensors: recorded on its current stream at capture.
  std::vector<c10::Event> ready_;
  SnapshotStats stats_;
  KnownCrcs crcs_;
  KnownCrcs previous_crcs_;  // during a capture: the last capture's
};

/// Copies `value` into `buffer`, reusing the buffer when its shape and dtype
/// match and allocating a CPU tensor otherwise (pinned for device tensors, page
/// aligned for large ones, see `empty_buffer`); an undefined value clears it.
void copy_into(at::Tensor& buffer, const at::Tensor& value);

/// A contiguous CPU tensor shaped as `like`, to hold its copy: pinned for device
/// tensors, so the device-to-host copy runs at full speed; page aligned from
/// kPageAlignedRecord bytes, so a durable save writes it without the page cache.
at::Tensor empty_buffer(const at::Tensor& like);

}  // namespace torchfit::detail
