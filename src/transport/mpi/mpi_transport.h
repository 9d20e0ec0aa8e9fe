// Transports over MPI.
//  MpiTransport: every other member is reached with MPI messages (MessageEngine over MpiWire); receive
//    regions may be any memory of this rank (the engine unpacks into them).
//  make_hybrid_group: shared memory inside a host, MPI between hosts (transport/hybrid).
#pragma once

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "moedist/mpi.h"
#include "transport/hybrid/hybrid_transport.h"
#include "transport/message/message_engine.h"
#include "transport/mpi/mpi_wire.h"

namespace moedist::transport {

class MpiTransport : public Transport {
 public:
  MpiTransport(MPI_Comm comm, const GroupOptions& options, const MpiOptions& mpi);
  int rank() const override { return engine_->rank(); }
  int world_size() const override { return engine_->world(); }
  std::string name() const override { return "mpi"; }
  int ranks_per_server() const override { return ranks_per_server_; }
  void exchange(const ExchangeSpec& spec) override;
  bool recv_anywhere() const override { return true; }
  void* scratch(int slot, size_t bytes) override;
  std::shared_ptr<unsigned char> alloc(size_t bytes) override;
  std::chrono::milliseconds timeout() const override { return engine_->timeout(); }
  size_t max_blob_bytes() const override { return kMessageBlobMax; }
  TransportStats stats() const override;
  const HostLayout& hosts() const { return hosts_; }

 private:
  HostLayout hosts_;
  std::unique_ptr<MessageEngine> engine_;
  int ranks_per_server_ = 1;
  std::atomic<uint64_t> exchanges_{0};  // stats() may be read from another thread
  std::vector<Bytes> scratch_;
  std::vector<size_t> scratch_bytes_;
};

// make_hybrid_group: the HybridTransport (transport/hybrid) over MPI between hosts.
std::shared_ptr<Transport> make_mpi_hybrid(MPI_Comm comm, const GroupOptions& options, const MpiOptions& mpi);
// make_ucx_group(MPI_Comm): the UCX transport, MPI used only to bootstrap it.
std::shared_ptr<Transport> make_mpi_ucx(MPI_Comm comm, const GroupOptions& options, const MpiOptions& mpi);

}  // namespace moedist::transport
