// Ranks that are processes on one host. Each rank owns one POSIX shared-memory segment, created and
// first-touched by itself and mapped by its peers: [header | control block | window]. The window is a
// sparse virtual reservation (pages exist only once touched) from which receive regions are carved, so
// peers write their rows straight into it.
// Segment names are "/moedist-<job>-<group>-<rank>"; every rank unlinks its own name as soon as all
// peers have mapped it, so nothing is left in /dev/shm once a group is up, even if a rank is killed.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "moedist/group.h"
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
  std::string peer_failure(int rank) override;

 private:
  struct Mapping {
    void* base = nullptr;
    size_t bytes = 0;
  };
  std::string segment_name(int rank) const;
  unsigned char* window(int rank) const;

  std::string prefix_;
  int ranks_per_server_;
  size_t window_bytes_;
  size_t header_bytes_;
  std::vector<Mapping> maps_;
  std::vector<int> pids_;
  // This rank's own mapping and the heap over its window; outputs carved from it keep it alive.
  struct Own {
    void* base = nullptr;
    size_t bytes = 0;
    std::unique_ptr<OffsetHeap> heap;
    ~Own();
  };
  std::shared_ptr<Own> own_;
  std::vector<size_t> slot_off_, slot_bytes_;
};

}  // namespace moedist::transport
