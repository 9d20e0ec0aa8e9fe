// Ranks that are processes on one host. Each rank owns one window: an anonymous memfd, created and
// first-touched by itself and mapped by its peers: [header | control block | window]. Peers receive
// its descriptor through the group's rendezvous (rendezvous.h): no name exists in /dev/shm or
// anywhere else, so nothing can be pre-created by another user and nothing is left behind when a
// process dies, whatever the signal and whatever the phase.
// The window is a virtual reservation (MOEDIST_SHM_WINDOW_BYTES, default 16 GiB) whose memory is
// reserved (fallocate) as the heap carved from it grows, before any byte is written: running short of
// memory is a TransportError naming what was needed and what was available, never a SIGBUS.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "moedist/group.h"
#include "transport/shm/rendezvous.h"
#include "transport/window/heap.h"
#include "transport/window/window_engine.h"

namespace moedist::transport {

class ShmTransport : public WindowEngine {
 public:
  ShmTransport(const std::string& job, const std::string& group, int world, int rank, const GroupOptions& options);
  ~ShmTransport() override;
  std::string name() const override { return "shm"; }
  int ranks_per_server() const override { return ranks_per_server_; }
  bool recv_anywhere() const override { return false; }
  void* scratch(int slot, size_t bytes) override;
  std::shared_ptr<unsigned char> alloc(size_t bytes) override;

 protected:
  void* ctrl_base(int rank) override;
  uint64_t encode(const void* p, size_t bytes) override;
  void* decode(int owner, uint64_t addr, uint64_t bytes) override;
  void* outbox(size_t bytes, bool fresh) override;
  std::string peer_failure(int rank) override;
  std::string group_failure() override;
  void retire_scratch() override;

 private:
  struct Mapping {
    void* base = nullptr;
    size_t bytes = 0;
  };
  unsigned char* window(int rank) const;

  std::string group_;
  int ranks_per_server_;
  size_t window_bytes_;
  size_t header_bytes_;
  std::vector<Mapping> maps_;
  std::vector<int> pids_;
  std::vector<int> pidfds_;  // per peer, -1 where pidfd_open is not available
  // This rank's own window: its descriptor, mapping, the memory reserved so far and the heap over it;
  // outputs carved from it keep it alive.
  struct Own {
    int fd = -1;
    void* base = nullptr;
    size_t bytes = 0;       // mapped (virtual)
    size_t reserved = 0;    // backed by memory (fallocate), from the start of the segment
    std::string label;
    std::mutex mu;
    std::unique_ptr<OffsetHeap> heap;
    size_t header_bytes = 0;
    // Makes sure window bytes [0, end) are backed by memory.
    void reserve(size_t end, const char* who);
    ~Own();
  };
  std::shared_ptr<Own> own_;
  std::shared_ptr<RendezvousListener> listener_;
  int claim_fd_ = -1;  // holds this rank's name while the group lives
  std::vector<size_t> slot_off_, slot_bytes_;
  size_t outbox_off_ = 0, outbox_bytes_ = 0;  // this rank's message, in its window
};

}  // namespace moedist::transport
