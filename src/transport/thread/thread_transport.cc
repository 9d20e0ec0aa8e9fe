#include "transport/thread/thread_transport.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "moedist/error.h"

namespace moedist::transport {

// The largest blob of one exchange (what max_blob_bytes reports): a bound on the ops' counts, not a
// cost per pair of ranks (a blob lies once, in its sender's outbox).
constexpr size_t kBlobMax = 64 * 1024;

struct FreeDeleter {
  void operator()(unsigned char* p) const { std::free(p); }
};
struct ThreadShared {
  CtrlLayout layout;
  std::vector<std::unique_ptr<unsigned char, FreeDeleter>> ctrl;  // one control block per rank
};

ThreadTransport::ThreadTransport(int rank, std::shared_ptr<ThreadShared> shared, const GroupOptions& options)
    : WindowEngine(rank, shared->layout.world, shared->layout.blob_max, options.timeout),
      shared_(std::move(shared)),
      ranks_per_server_(options.ranks_per_server > 0 ? options.ranks_per_server : shared_->layout.world) {}

void* ThreadTransport::ctrl_base(int rank) { return shared_->ctrl[static_cast<size_t>(rank)].get(); }

ThreadTransport::~ThreadTransport() {
  // A slow peer may still write into the buffers of an abandoned call: they stay allocated.
  if (abandoned()) {
    for (auto& b : scratch_)
      if (b) keep_forever(std::shared_ptr<unsigned char[]>(b.release()));
    if (outbox_) keep_forever(std::shared_ptr<unsigned char[]>(outbox_.release()));
  }
}

void* ThreadTransport::outbox(size_t bytes, bool fresh) {
  if (fresh && outbox_) {  // a slow peer may still read the old message: leave it be
    keep_forever(std::shared_ptr<unsigned char[]>(outbox_.release()));
    outbox_bytes_ = 0;
  }
  if (outbox_bytes_ < bytes) {
    // Grown in steps, so that blobs of slowly growing size do not reallocate on every call.
    const size_t want = std::max(bytes, std::min<size_t>(2 * outbox_bytes_, bytes + (size_t{1} << 20)));
    outbox_.reset(new unsigned char[want]);
    outbox_bytes_ = want;
  }
  return outbox_.get();
}

void ThreadTransport::retire_scratch() {
  for (auto& b : scratch_)
    if (b) keep_forever(std::shared_ptr<unsigned char[]>(b.release()));
  scratch_.clear();
  scratch_bytes_.clear();
}

void* ThreadTransport::scratch(int slot, size_t bytes) {
  if (abandoned())  // its buffers may still be written into by a slow peer: never reuse or free them
    throw TransportError(detail::str_cat("[rank ", rank(), "/", world_size(), "] this group can no longer be used: an earlier call was abandoned"));
  if (slot >= static_cast<int>(scratch_.size())) {
    scratch_.resize(static_cast<size_t>(slot) + 1);
    scratch_bytes_.resize(static_cast<size_t>(slot) + 1, 0);
  }
  auto& buf = scratch_[static_cast<size_t>(slot)];
  if (scratch_bytes_[static_cast<size_t>(slot)] < bytes) {
    buf.reset(new unsigned char[bytes]);
    scratch_bytes_[static_cast<size_t>(slot)] = bytes;
  }
  return buf.get();
}

}  // namespace moedist::transport

namespace moedist {

std::vector<std::shared_ptr<Transport>> make_thread_group(int world_size, const GroupOptions& options) {
  if (world_size < 1) throw InvalidArgument(detail::str_cat("make_thread_group: world_size=", world_size, " (must be >= 1)"));
  if (options.ranks_per_server < 0)
    throw InvalidArgument(detail::str_cat("make_thread_group: ranks_per_server=", options.ranks_per_server, " (must be >= 0)"));
  auto shared = std::make_shared<transport::ThreadShared>();
  shared->layout.world = world_size;
  shared->layout.blob_max = transport::kBlobMax;
  for (int r = 0; r < world_size; ++r) {
    const size_t bytes = (shared->layout.bytes() + 63) / 64 * 64;
    auto* p = static_cast<unsigned char*>(std::aligned_alloc(64, bytes));
    if (!p) throw Error("make_thread_group: out of memory");
    std::memset(p, 0, bytes);
    // PeerFlags hold atomics; zeroed memory is their initial state (0 epochs).
    shared->ctrl.emplace_back(p);
  }
  std::vector<std::shared_ptr<Transport>> out;
  for (int r = 0; r < world_size; ++r) out.push_back(std::make_shared<transport::ThreadTransport>(r, shared, options));
  return out;
}

}  // namespace moedist
