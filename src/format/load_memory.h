#pragma once
// Memory for the storages a load reads a file into, kept once they are freed so the next load of
// the same sizes reads into pages already faulted in. A load into an existing model (a resume,
// EarlyStopping's best weights, evaluating checkpoints one after another) frees its storages as
// soon as their bytes are installed, and the next one asks for the same sizes again. Fresh memory
// costs more than the read itself on a VM that hands freed memory back to its host (about 1 GB/s
// here, against 2-5 GB/s for a read from the page cache).

#include <cstddef>
#include <cstdint>

#include <c10/core/Allocator.h>

namespace torchfit::detail {

/// What the load memory holds and how often it served.
struct LoadMemoryStats {
  size_t held_bytes = 0;    ///< kept for the next load
  uint64_t reused = 0;      ///< blocks handed out again
  uint64_t allocated = 0;   ///< blocks taken fresh
};

/// `size` bytes for a storage read from a file (64-byte aligned; huge pages from 2 MiB), from
/// memory an earlier load freed when a block fits, fresh otherwise. Blocks under
/// kLoadMemoryFrom bytes come from the process allocator, which keeps its own.
at::DataPtr load_memory(size_t size);
/// `memory` (`size` bytes on the CPU, a storage's until now) as a pointer that returns it to the
/// load memory when freed: a load that swaps the file's memory into a model passes the model's
/// old memory on to the next load this way.
at::DataPtr recycled_for_loads(at::DataPtr memory, size_t size);
/// A load of a `bytes` file begins: from the second load on (since the start or the last
/// release), the memory keeps up to the largest such file's bytes; a single load keeps nothing.
void keep_load_memory_for(size_t bytes);
/// Frees what the load memory holds; later loads start keeping again.
void release_load_memory();
LoadMemoryStats load_memory_stats();

inline constexpr size_t kLoadMemoryFrom = 256 << 10;

}  // namespace torchfit::detail
