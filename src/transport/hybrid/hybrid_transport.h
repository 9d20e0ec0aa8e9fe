// Ranks on several hosts: members on this rank's host through a ShmTransport over the host's ranks
// (rows written straight into their windows), members on other hosts through a MessageEngine (MPI for
// make_hybrid_group, UCX for make_ucx_group). One exchange runs both halves of each wave: wave 1 of the
// messages is posted, the shm exchange runs, and inside its payload step the remote blobs are
// collected, the caller's produce writes to both, and the messages' wave 2 completes; the shm done
// flags follow. Receive regions come from the shm window (alloc/scratch of the shm part).
#pragma once

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "transport/message/message_engine.h"
#include "transport/shm/shm_transport.h"

namespace moedist::transport {

class HybridTransport : public Transport {
 public:
  // name: "hybrid" (MPI), "ucx". hosts: every rank's host; job: the same on every rank of the group,
  // unique to it (names the hosts' shared-memory groups). ranks_per_server: for comm_alg "hierarchy".
  HybridTransport(std::string name, std::unique_ptr<MessageEngine> engine, HostLayout hosts, const std::string& job,
                  const GroupOptions& options, int ranks_per_server);
  int rank() const override { return engine_->rank(); }
  int world_size() const override { return engine_->world(); }
  std::string name() const override { return name_; }
  int ranks_per_server() const override { return ranks_per_server_; }
  void exchange(const ExchangeSpec& spec) override;
  bool recv_anywhere() const override { return false; }
  void* scratch(int slot, size_t bytes) override { return shm_->scratch(slot, bytes); }
  std::shared_ptr<unsigned char> alloc(size_t bytes) override { return shm_->alloc(bytes); }
  std::chrono::milliseconds timeout() const override { return engine_->timeout(); }
  size_t max_blob_bytes() const override { return std::min(kMessageBlobMax, shm_->max_blob_bytes()); }
  TransportStats stats() const override;
  const HostLayout& hosts() const { return hosts_; }

 private:
  std::string name_;
  HostLayout hosts_;
  std::unique_ptr<MessageEngine> engine_;
  std::shared_ptr<ShmTransport> shm_;
  std::vector<int> local_of_;  // rank -> index in the host's shm group, or -1 on another host
  std::vector<int> local_ranks_;
  int ranks_per_server_ = 1;
  std::atomic<uint64_t> exchanges_{0};  // stats() may be read from another thread
};

// Members of one exchange: those reached by messages (and their positions in spec.members), and,
// where local_of is given, the host-local indices of those on this rank's host.
struct Members {
  std::vector<int> remote;
  std::vector<size_t> remote_index;
  size_t self = 0;
};
Members split_members(const ExchangeSpec& spec, int me, int world, const std::vector<int>* local_of, std::vector<int>* local);

// Inside a catch block: the exchange failed on this rank; the engine abandons it (telling the peers)
// and the exception goes on.
[[noreturn]] void abandon_and_rethrow(MessageEngine& e);
[[noreturn]] void peer_failed(const MessageEngine& e, const char* op, int peer);

}  // namespace moedist::transport
