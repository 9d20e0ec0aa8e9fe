// Ranks that are threads of one process: control blocks and receive regions are plain process memory,
// so peers write straight into a rank's output tensors (recv_anywhere).
#pragma once

#include <memory>
#include <vector>

#include "moedist/group.h"
#include "transport/window/heap.h"
#include "transport/window/window_engine.h"

namespace moedist::transport {

struct ThreadShared;

class ThreadTransport : public WindowEngine {
 public:
  ThreadTransport(int rank, std::shared_ptr<ThreadShared> shared, const GroupOptions& options);
  ~ThreadTransport() override;
  std::string name() const override { return "thread"; }
  int ranks_per_server() const override { return ranks_per_server_; }
  bool recv_anywhere() const override { return true; }
  void* scratch(int slot, size_t bytes) override;
  std::shared_ptr<unsigned char> alloc(size_t bytes) override { return pooled_host_alloc(bytes); }

 protected:
  void* ctrl_base(int rank) override;
  uint64_t encode(const void* p, size_t) override { return reinterpret_cast<uint64_t>(p); }
  void* decode(int, uint64_t addr, uint64_t) override { return reinterpret_cast<void*>(addr); }
  void retire_scratch() override;
  void* outbox(size_t bytes, bool fresh) override;

 private:
  std::shared_ptr<ThreadShared> shared_;
  int ranks_per_server_;
  std::vector<std::unique_ptr<unsigned char[]>> scratch_;
  std::vector<size_t> scratch_bytes_;
  std::unique_ptr<unsigned char[]> outbox_;  // this rank's message, read by its peers in place
  size_t outbox_bytes_ = 0;
};

}  // namespace moedist::transport
