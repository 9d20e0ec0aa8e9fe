#include "transport/window/heap.h"

#include <cstdlib>
#include <vector>

#include "moedist/error.h"

namespace moedist::transport {

namespace {
size_t round_page(size_t v) { return (v + 4095) / 4096 * 4096; }
}  // namespace

OffsetHeap::OffsetHeap(size_t begin, size_t end) : end_(end) {
  if (end > begin) free_[begin] = end - begin;
}

size_t OffsetHeap::alloc(size_t bytes, const char* who) {
  const size_t need = round_page(bytes ? bytes : 1);
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < need) continue;
    const size_t off = it->first, size = it->second;
    free_.erase(it);
    if (size > need) free_[off + need] = size - need;
    used_[off] = need;
    return off;
  }
  throw TransportError(detail::str_cat(who, ": shared-memory window of ", end_, " bytes is full (need ", need,
                                       " more; set MOEDIST_SHM_WINDOW_BYTES or drop old outputs)"));
}

void OffsetHeap::free(size_t offset) {
  std::lock_guard<std::mutex> lock(mu_);
  auto u = used_.find(offset);
  MOEDIST_ASSERT(u != used_.end(), "free of an unknown block");
  size_t off = u->first, size = u->second;
  used_.erase(u);
  auto next = free_.lower_bound(off);
  if (next != free_.end() && next->first == off + size) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {
      prev->second += size;
      return;
    }
  }
  free_[off] = size;
}

namespace {
struct HostPool {
  std::mutex mu;
  std::multimap<size_t, void*> cached;  // size -> block
  size_t cached_bytes = 0;
  static constexpr size_t kLimit = size_t{2} << 30;
  ~HostPool() {
    for (auto& [s, p] : cached) std::free(p);
  }
};
HostPool& host_pool() {
  static HostPool* pool = new HostPool();  // never destroyed: tensors may outlive static destruction
  return *pool;
}
}  // namespace

std::shared_ptr<unsigned char> pooled_host_alloc(size_t bytes) {
  const size_t size = bytes < 65536 ? (bytes ? bytes : 1) : round_page(bytes);
  if (size < 65536) {
    void* p = std::malloc(size);
    if (!p) throw Error("moedist: out of memory");
    return std::shared_ptr<unsigned char>(static_cast<unsigned char*>(p), [](unsigned char* q) { std::free(q); });
  }
  HostPool& pool = host_pool();
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    auto it = pool.cached.lower_bound(size);
    if (it != pool.cached.end() && it->first <= size + size / 4) {  // do not hand out much larger blocks
      p = it->second;
      pool.cached_bytes -= it->first;
      const size_t got = it->first;
      pool.cached.erase(it);
      return std::shared_ptr<unsigned char>(static_cast<unsigned char*>(p), [got](unsigned char* q) {
        HostPool& hp = host_pool();
        std::lock_guard<std::mutex> l(hp.mu);
        if (hp.cached_bytes + got > HostPool::kLimit) {
          std::free(q);
          return;
        }
        hp.cached.emplace(got, q);
        hp.cached_bytes += got;
      });
    }
  }
  p = std::aligned_alloc(4096, size);
  if (!p) throw Error(detail::str_cat("moedist: out of memory allocating ", size, " bytes"));
  return std::shared_ptr<unsigned char>(static_cast<unsigned char*>(p), [size](unsigned char* q) {
    HostPool& hp = host_pool();
    std::lock_guard<std::mutex> l(hp.mu);
    if (hp.cached_bytes + size > HostPool::kLimit) {
      std::free(q);
      return;
    }
    hp.cached.emplace(size, q);
    hp.cached_bytes += size;
  });
}

void keep_forever(std::shared_ptr<void> p) {
  static std::mutex* mu = new std::mutex();
  static auto* kept = new std::vector<std::shared_ptr<void>>();  // never destroyed
  std::lock_guard<std::mutex> lock(*mu);
  kept->push_back(std::move(p));
}

}  // namespace moedist::transport
