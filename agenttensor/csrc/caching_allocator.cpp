// A caching CPU allocator for torch (installed by agenttensor/_cpu_cache.py; opt-in).
//
// City-scale steps allocate and free the same few large sizes ([B, N] tensors of 1, 2, 4 and 8 bytes)
// many times per step. glibc serves blocks above its mmap threshold (at most 32 MB) as fresh mappings,
// whose pages the kernel faults in and zeroes on first write: at full NYC (8.7M agents, 35 MB per float32
// tensor) the gradient step spent over half its time there. This allocator keeps freed blocks of at least
// `min_bytes` in exact-size free lists, up to `max_cached` bytes in all, and hands them out again. When a
// freed block does not fit under the cap, blocks of the least recently used other sizes are released to
// make room (a run at another population size does not inherit a cache full of useless sizes). A miss, which
// takes new memory, first hands back least recently used other sizes while in-use + cached bytes would pass
// the highest in-use total seen (+ `slack`): the cache can hold what a backward pass frees for the next forward
// pass without raising the run's peak. Smaller blocks go straight to c10's alloc_cpu / free_cpu.
//
// Blocks of 2 MB and more are 2 MB-aligned and marked for transparent huge pages (madvise MADV_HUGEPAGE; Linux), as
// torch does with THP_MEM_ALLOC_ENABLE=1: where the kernel's THP mode is `madvise` (not `always`), a fresh block was
// otherwise faulted in 4 KB at a time. A full-NYC calibration epoch takes ~2,800 fresh blocks (tens of GB zeroed and
// faulted in): on an AMD EPYC VM with THP `madvise`, 55 s of its 98 s were system time.

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kHugePage = size_t(2) << 20;
bool huge_pages = true;  // set at installation (agenttensor_cache_install)

// A block of at least min_bytes: 2 MB-aligned and madvised for huge pages where it spans one (else c10's). Freed with
// c10::free_cpu (free) either way.
void* alloc_block(size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge_pages && nbytes >= kHugePage) {
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHugePage, nbytes) == 0 && ptr != nullptr) {
      madvise(ptr, (nbytes + 4095) & ~size_t(4095), MADV_HUGEPAGE);  // (advice: a failure leaves 4 KB pages)
      return ptr;
    }
  }
#endif
  return c10::alloc_cpu(nbytes);
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  CachingCPUAllocator(size_t min_bytes, size_t max_cached, size_t slack)
      : min_bytes_(min_bytes), max_cached_(max_cached), slack_(slack) {}

  c10::DataPtr allocate(size_t nbytes) override {
    void* ptr = nullptr;
    std::vector<void*> evicted;
    if (nbytes >= min_bytes_) {
      std::lock_guard<std::mutex> guard(mutex_);
      SizeClass& size_class = free_[nbytes];
      size_class.last_use = ++clock_;
      if (!size_class.blocks.empty()) {
        ptr = size_class.blocks.back();
        size_class.blocks.pop_back();
        cached_ -= nbytes;
        ++hits_;
      } else {
        ++misses_;
        // Footprint bound: a miss takes new memory, so while in-use + cached + new would pass the highest in-use
        // total seen (+ slack), blocks of the least recently used other sizes are handed back first. Cached
        // blocks then never add to a run's peak beyond the slack, whatever the cap.
        const size_t before = evicted.size();
        while (live_ + cached_ + nbytes > peak_live_ + slack_ && evict_least_recent(nbytes, evicted)) {
        }
        evictions_ += evicted.size() - before;
      }
      live_ += nbytes;
      peak_live_ = std::max(peak_live_, live_);
    }
    for (void* block : evicted) c10::free_cpu(block);
    if (ptr == nullptr) {
      ptr = nbytes >= min_bytes_ ? alloc_block(nbytes) : c10::alloc_cpu(nbytes);
    }
    if (nbytes >= min_bytes_) {
      std::lock_guard<std::mutex> guard(mutex_);
      sizes_[ptr] = nbytes;
    }
    return {ptr, ptr, &Release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &Release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void Release(void* ptr) { instance->release(ptr); }

  void release(void* ptr) {
    if (ptr == nullptr) return;
    std::vector<void*> evicted;
    bool cached = false;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto it = sizes_.find(ptr);
      if (it != sizes_.end()) {
        size_t nbytes = it->second;
        sizes_.erase(it);
        live_ -= nbytes;
        const size_t before = evicted.size();
        while (cached_ + nbytes > max_cached_ && evict_least_recent(nbytes, evicted)) {
        }
        evictions_ += evicted.size() - before;
        if (cached_ + nbytes <= max_cached_) {
          SizeClass& size_class = free_[nbytes];
          size_class.blocks.push_back(ptr);
          size_class.last_use = ++clock_;
          cached_ += nbytes;
          cached = true;
        }
      }
    }
    for (void* block : evicted) c10::free_cpu(block);
    if (!cached) c10::free_cpu(ptr);
  }

  void empty() {
    std::vector<void*> blocks;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      for (auto& entry : free_) blocks.insert(blocks.end(), entry.second.blocks.begin(), entry.second.blocks.end());
      free_.clear();
      cached_ = 0;
      peak_live_ = live_;  // a new high-water mark from here on
    }
    for (void* ptr : blocks) c10::free_cpu(ptr);
  }

  void stats(size_t* out) {
    std::lock_guard<std::mutex> guard(mutex_);
    out[0] = hits_;
    out[1] = misses_;
    out[2] = cached_;
    out[3] = max_cached_;
    out[4] = min_bytes_;
    out[5] = evictions_;
    out[6] = live_;
    out[7] = peak_live_;
  }

  void set_limit(size_t max_cached) {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      max_cached_ = max_cached;
    }
    empty();
  }

  static CachingCPUAllocator* instance;

 private:
  struct SizeClass {
    std::vector<void*> blocks;
    size_t last_use = 0;
  };

  // Moves the cached blocks of the least recently used size other than `keep` to `out` (caller frees them
  // outside the lock). Returns false when there is nothing left to evict.
  bool evict_least_recent(size_t keep, std::vector<void*>& out) {
    auto victim = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->first != keep && !it->second.blocks.empty() &&
          (victim == free_.end() || it->second.last_use < victim->second.last_use)) {
        victim = it;
      }
    }
    if (victim == free_.end()) return false;
    for (void* block : victim->second.blocks) out.push_back(block);
    cached_ -= victim->first * victim->second.blocks.size();
    victim->second.blocks.clear();
    return true;
  }

  std::mutex mutex_;
  std::unordered_map<size_t, SizeClass> free_;
  std::unordered_map<void*, size_t> sizes_;
  size_t min_bytes_;
  size_t max_cached_;
  size_t slack_;
  size_t live_ = 0;       // bytes of blocks >= min_bytes_ handed out and not yet released
  size_t peak_live_ = 0;  // highest live_ since installation or the last empty()
  size_t cached_ = 0;
  size_t hits_ = 0;
  size_t misses_ = 0;
  size_t evictions_ = 0;
  size_t clock_ = 0;
};

CachingCPUAllocator* CachingCPUAllocator::instance = nullptr;

}  // namespace

extern "C" {

// Install once per process (later calls only change the cap). `huge`: 1 to mark blocks of 2 MB and more for
// transparent huge pages (see alloc_block; applies to blocks taken from then on). Returns 1.
int agenttensor_cache_install(size_t min_bytes, size_t max_cached, size_t slack, int huge) {
  huge_pages = huge != 0;
  if (CachingCPUAllocator::instance == nullptr) {
    // never destroyed: tensors allocated here may be freed at interpreter exit
    CachingCPUAllocator::instance = new CachingCPUAllocator(min_bytes, max_cached, slack);
    c10::SetCPUAllocator(CachingCPUAllocator::instance, /*priority=*/100);
  } else {
    CachingCPUAllocator::instance->set_limit(max_cached);
  }
  return 1;
}

// hits, misses, cached bytes, cap, minimum block size, blocks evicted, bytes in use, highest bytes in use
void agenttensor_cache_stats(size_t* out) {
  if (CachingCPUAllocator::instance != nullptr) CachingCPUAllocator::instance->stats(out);
}

// Hand every cached block back to the system.
void agenttensor_cache_empty() {
  if (CachingCPUAllocator::instance != nullptr) CachingCPUAllocator::instance->empty();
}

}  // extern "C"
