// Transports over MPI.
//  MpiTransport: every other member is reached with MPI messages (MpiEngine); receive regions may be
//    any memory of this rank (the engine unpacks into them).
//  HybridTransport: members on this rank's host through a ShmTransport over the host's ranks (rows
//    written straight into their windows), members on other hosts through MpiEngine. One exchange runs
//    both halves of each wave: MPI wave 1 is posted, the shm exchange runs, and inside its payload step
//    the MPI blobs are collected, the caller's produce writes to both, and MPI wave 2 completes; the shm
//    done flags follow. Receive regions come from the shm window (alloc/scratch of the shm part).
#pragma once

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "moedist/mpi.h"
#include "transport/mpi/mpi_engine.h"
#include "transport/shm/shm_transport.h"

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
  size_t max_blob_bytes() const override { return kMpiBlobMax; }
  TransportStats stats() const override;
  const HostLayout& hosts() const { return hosts_; }

 private:
  HostLayout hosts_;
  std::unique_ptr<MpiEngine> engine_;
  int ranks_per_server_ = 1;
  std::atomic<uint64_t> exchanges_{0};  // stats() may be read from another thread
  std::vector<Bytes> scratch_;
  std::vector<size_t> scratch_bytes_;
};

class HybridTransport : public Transport {
 public:
  HybridTransport(MPI_Comm comm, const GroupOptions& options, const MpiOptions& mpi);
  int rank() const override { return engine_->rank(); }
  int world_size() const override { return engine_->world(); }
  std::string name() const override { return "hybrid"; }
  int ranks_per_server() const override { return ranks_per_server_; }
  void exchange(const ExchangeSpec& spec) override;
  bool recv_anywhere() const override { return false; }
  void* scratch(int slot, size_t bytes) override { return shm_->scratch(slot, bytes); }
  std::shared_ptr<unsigned char> alloc(size_t bytes) override { return shm_->alloc(bytes); }
  std::chrono::milliseconds timeout() const override { return engine_->timeout(); }
  size_t max_blob_bytes() const override { return std::min(kMpiBlobMax, shm_->max_blob_bytes()); }
  TransportStats stats() const override;
  const HostLayout& hosts() const { return hosts_; }

 private:
  HostLayout hosts_;
  std::unique_ptr<MpiEngine> engine_;
  std::shared_ptr<ShmTransport> shm_;
  std::vector<int> local_of_;  // rank -> index in the host's shm group, or -1 on another host
  std::vector<int> local_ranks_;
  int ranks_per_server_ = 1;
  std::atomic<uint64_t> exchanges_{0};  // stats() may be read from another thread
};

}  // namespace moedist::transport
