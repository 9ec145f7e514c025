// A CPU allocator for torch that maps large tensors with mmap and keeps freed mappings for reuse,
// without ever holding more than the peak of live bytes.
//
// glibc either keeps freed tensors in its heap (fast, but fragmentation leaves the peak RSS several
// hundred MB above what is live) or, with a fixed mmap threshold, unmaps each one at once (RSS is
// what is live, but every new activation is a fresh mapping whose page faults cost time). This
// allocator serves requests of at least `min_bytes` from its own mappings and keeps freed ones:
// a request takes a cached mapping of its size (up to 1/8 larger; layers repeat their shapes), else
// the cached mapping nearest in size resized with mremap (its resident pages move over: no faults,
// no zeroing), else a fresh mapping. Before resizing or mapping it unmaps the oldest cached
// mappings until live + cached bytes stay within the peak of live bytes so far, so mapped bytes
// never exceed that peak. Smaller requests go to the allocator it replaces.
//
// Exposed with a C ABI for ctypes (alignkit/engine/cpu_memory.py builds and loads it):
//   alignkit_block_cache_install(min_bytes) -> 1 if installed now, 0 if it already was
//   alignkit_block_cache_stats(out[8]): live, cached, peak mapped and peak live bytes; requests served
//     from the cache, by resizing a cached mapping, by a fresh mapping; bytes unmapped
// Not handled: forking while another thread holds the lock; removing it (it lives as long as the
// process, since tensors it mapped must come back to it).
#ifndef _GNU_SOURCE
#define _GNU_SOURCE  // mremap
#endif
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t kPageBytes = 4096;

struct CachedMapping;
using CachedList = std::list<CachedMapping>;                    // least recently freed first
using SizeIndex = std::multimap<size_t, CachedList::iterator>;  // the same mappings by size
struct CachedMapping {
  void* ptr;
  size_t bytes;
  SizeIndex::iterator in_index;
};

struct BlockCache final : public c10::Allocator {
  c10::Allocator* replaced;
  size_t min_bytes;
  std::mutex mutex;
  std::unordered_map<void*, size_t> live;  // our mappings in use -> mapped bytes
  CachedList oldest_first;
  SizeIndex by_size;
  size_t live_bytes = 0, cached_bytes = 0, peak_live_bytes = 0, peak_mapped_bytes = 0, unmapped_bytes = 0;
  uint64_t hits = 0, resizes = 0, fresh = 0;

  BlockCache(c10::Allocator* replaced_allocator, size_t min_bytes_)
      : replaced(replaced_allocator), min_bytes(min_bytes_) {}

  static void free_block(void* ptr);

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes) {
      return replaced->allocate(n);
    }
    void* ptr = obtain((n + kPageBytes - 1) / kPageBytes * kPageBytes);
    return {ptr, ptr, &BlockCache::free_block, c10::Device(c10::DeviceType::CPU)};
  }

  // A mapping of `bytes` for a new tensor, in order of preference:
  // 1. the smallest cached mapping of `bytes` to `bytes` + 1/8 (row lengths vary between steps);
  // 2. the cached mapping nearest in size (the largest smaller one, else the smallest larger one),
  //    resized with mremap: its resident pages move over without page faults or zeroing;
  // 3. a fresh mapping.
  // Before 2 or 3, the oldest cached mappings are unmapped until live + cached bytes stay within
  // the peak of live bytes so far.
  void* obtain(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex);
    auto fit = by_size.lower_bound(bytes);
    if (fit != by_size.end() && fit->first <= bytes + bytes / 8) {
      ++hits;
      CachedMapping taken = take(fit->second);
      add_live(taken.ptr, taken.bytes);
      return taken.ptr;
    }
    CachedMapping donor{nullptr, 0, {}};
    if (!by_size.empty()) {
      donor = take(fit == by_size.begin() ? fit->second : std::prev(fit)->second);
    }
    const size_t allowed = std::max(peak_live_bytes, live_bytes + bytes);
    while (!oldest_first.empty() && live_bytes + cached_bytes + bytes > allowed) {
      CachedMapping oldest = take(oldest_first.begin());
      munmap(oldest.ptr, oldest.bytes);
      unmapped_bytes += oldest.bytes;
    }
    void* ptr = MAP_FAILED;
    if (donor.ptr != nullptr) {
      ptr = mremap(donor.ptr, donor.bytes, bytes, MREMAP_MAYMOVE);
      if (ptr == MAP_FAILED) {
        munmap(donor.ptr, donor.bytes);
      } else {
        ++resizes;
      }
    }
    if (ptr == MAP_FAILED) {
      ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(ptr != MAP_FAILED, "alignkit block cache: mmap of ", bytes, " bytes failed: ",
                  std::strerror(errno));
      ++fresh;
    }
    add_live(ptr, bytes);
    peak_mapped_bytes = std::max(peak_mapped_bytes, live_bytes + cached_bytes);
    return ptr;
  }

  // removes a mapping from the cache and returns it
  CachedMapping take(CachedList::iterator entry) {
    CachedMapping taken = *entry;
    by_size.erase(entry->in_index);
    oldest_first.erase(entry);
    cached_bytes -= taken.bytes;
    return taken;
  }

  void add_live(void* ptr, size_t bytes) {
    live.emplace(ptr, bytes);
    live_bytes += bytes;
    peak_live_bytes = std::max(peak_live_bytes, live_bytes);
  }

  // false when `ptr` is not one of our mappings
  bool release(void* ptr) {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = live.find(ptr);
    if (found == live.end()) {
      return false;
    }
    const size_t bytes = found->second;
    live.erase(found);
    live_bytes -= bytes;
    oldest_first.push_back({ptr, bytes, {}});
    oldest_first.back().in_index = by_size.emplace(bytes, std::prev(oldest_first.end()));
    cached_bytes += bytes;
    return true;
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &BlockCache::free_block;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

BlockCache* g_cache = nullptr;  // never destroyed: tensors may be freed during interpreter exit

void BlockCache::free_block(void* ptr) {
  if (ptr == nullptr || g_cache->release(ptr)) {
    return;
  }
  // handed out by raw_allocate of a small request: the replaced allocator's memory
  g_cache->replaced->raw_deleter()(ptr);
}

}  // namespace

extern "C" {

int alignkit_block_cache_install(size_t min_bytes) {
  if (g_cache != nullptr) {
    return 0;
  }
  g_cache = new BlockCache(c10::GetCPUAllocator(), min_bytes);
  // priority above the default allocator's registration, so later registrations at 0 cannot undo it
  c10::SetCPUAllocator(g_cache, /*priority=*/1);
  return 1;
}

void alignkit_block_cache_stats(uint64_t* out) {
  if (g_cache == nullptr) {
    std::memset(out, 0, 8 * sizeof(uint64_t));
    return;
  }
  std::lock_guard<std::mutex> lock(g_cache->mutex);
  out[0] = g_cache->live_bytes;
  out[1] = g_cache->cached_bytes;
  out[2] = g_cache->peak_mapped_bytes;
  out[3] = g_cache->peak_live_bytes;
  out[4] = g_cache->hits;
  out[5] = g_cache->resizes;
  out[6] = g_cache->fresh;
  out[7] = g_cache->unmapped_bytes;
}

}  // extern "C"
