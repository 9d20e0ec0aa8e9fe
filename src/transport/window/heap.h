// Allocators for receive regions that outlive one call (output tensors peers write into).
//  OffsetHeap: first-fit blocks of a window (shared memory), freed blocks coalesce.
//  pooled_host_alloc: process memory whose freed blocks are kept for reuse, so repeated calls of the
//  same shape touch warm pages instead of faulting fresh zero pages in on every call.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

namespace moedist::transport {

class OffsetHeap {
 public:
  OffsetHeap(size_t begin, size_t end);
  // Offset of a free block of at least `bytes` (rounded up to 4 KiB); throws TransportError when full.
  size_t alloc(size_t bytes, const char* who);
  void free(size_t offset);

 private:
  std::mutex mu_;
  std::map<size_t, size_t> free_;  // offset -> size
  std::map<size_t, size_t> used_;  // offset -> size
  size_t end_;
};

std::shared_ptr<unsigned char> pooled_host_alloc(size_t bytes);

// Keeps `p` alive until the process ends: receive regions of an abandoned call, which a slow peer may
// still write into (a deliberate leak on a failure path, instead of a write into freed memory).
void keep_forever(std::shared_ptr<void> p);

}  // namespace moedist::transport
