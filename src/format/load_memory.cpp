#include "format/load_memory.h"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "sys/posix_file.h"

namespace torchfit::detail {
namespace {

class Pool {
 public:
  static Pool& instance() {
    static auto* pool = new Pool();  // never destroyed: storages may outlive static destruction
    return *pool;
  }

  at::DataPtr take(size_t size) {
    at::DataPtr memory;
    size_t block_size = size;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest free block that fits, unless it would waste more than half of itself.
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first / 2 <= size) {
        memory = std::move(it->second.memory);
        block_size = it->first;
        held_ -= it->first;
        free_.erase(it);
        ++stats_.reused;
      } else {
        ++stats_.allocated;
      }
    }
    if (!memory) {
      void* data = allocate_for_filling(size);
      memory = at::DataPtr(data, data, [](void* p) { std::free(p); }, at::Device(at::kCPU));
    }
    return wrap(std::move(memory), block_size);
  }

  static bool comes_back(const at::DataPtr& memory) { return memory.get_deleter() == &give_back; }
  /// `memory` as a storage's pointer that comes back here when the storage is freed.
  static at::DataPtr wrap(at::DataPtr memory, size_t size) {
    if (comes_back(memory)) return memory;
    auto* block = new Block{std::move(memory), size};
    return at::DataPtr(block->memory.get(), block, &give_back, at::Device(at::kCPU));
  }

  void keep_for(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    // A single load (a resume at startup) keeps nothing: the model's old memory is freed as it
    // always was. From the second load on, loads are a pattern worth keeping memory for.
    if (loads_++ > 0) cap_ = std::max(cap_, bytes);
  }

  void release() {
    std::multimap<size_t, Kept> free;
    std::lock_guard<std::mutex> lock(mutex_);
    free.swap(free_);
    held_ = 0;
    cap_ = 0;
    loads_ = 0;
  }  // `free` is destroyed after the lock: each block goes back the way it came

  LoadMemoryStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    LoadMemoryStats out = stats_;
    out.held_bytes = held_;
    return out;
  }

 private:
  /// A block handed out, and how its memory is freed in the end.
  struct Block {
    at::DataPtr memory;
    size_t size;
  };
  static void give_back(void* context) {
    std::unique_ptr<Block> block(static_cast<Block*>(context));
    instance().put(std::move(block->memory), block->size);
  }
  void put(at::DataPtr memory, size_t size) {
    std::vector<at::DataPtr> evicted;  // freed after the lock
    std::lock_guard<std::mutex> lock(mutex_);
    if (size > cap_) return;  // freed as it came, after the lock
    // The last load's sizes are the next one's: blocks kept longest make room first (a model
    // loaded after another of other sizes must not find the memory full of the old sizes).
    while (held_ + size > cap_) {
      auto oldest = std::min_element(free_.begin(), free_.end(),
                                     [](const auto& a, const auto& b) { return a.second.age < b.second.age; });
      held_ -= oldest->first;
      evicted.push_back(std::move(oldest->second.memory));
      free_.erase(oldest);
    }
    free_.emplace(size, Kept{std::move(memory), ++age_});
    held_ += size;
  }

  std::mutex mutex_;
  struct Kept {
    at::DataPtr memory;
    uint64_t age;  // when it was kept: higher is later
  };
  std::multimap<size_t, Kept> free_;  // blocks by size
  size_t held_ = 0;
  size_t cap_ = 0;
  uint64_t loads_ = 0;  // since the start or the last release
  uint64_t age_ = 0;
  LoadMemoryStats stats_;
};

}  // namespace

at::DataPtr load_memory(size_t size) {
  if (size >= kLoadMemoryFrom) return Pool::instance().take(size);
  void* data = nullptr;
  if (::posix_memalign(&data, 64, std::max<size_t>(size, 1)) != 0) throw std::bad_alloc();  // LibTorch's CPU alignment
  return at::DataPtr(data, data, [](void* p) { std::free(p); }, at::Device(at::kCPU));
}

at::DataPtr recycled_for_loads(at::DataPtr memory, size_t size) {
  if (size < kLoadMemoryFrom || !memory || memory.device() != at::Device(at::kCPU)) return memory;
  // Only memory freed as a whole by a deleter we know: never a user's from_blob memory, pinned
  // memory or a block shared with others, which the next load must not write into.
  static const auto cpu_deleter = c10::GetAllocator(at::kCPU)->allocate(1).get_deleter();
  const bool owned = memory.get_context() == memory.get() && memory.get_deleter() == cpu_deleter;
  if (!owned && !Pool::comes_back(memory)) return memory;
  return Pool::instance().wrap(std::move(memory), size);
}

void keep_load_memory_for(size_t bytes) { Pool::instance().keep_for(bytes); }
void release_load_memory() {
  Pool::instance().release();
  release_thread_spares();
}
LoadMemoryStats load_memory_stats() { return Pool::instance().stats(); }

}  // namespace torchfit::detail
