// The exchange protocol of transports whose ranks can load and store each other's memory (threads of
// one process, processes sharing POSIX segments). Each rank owns a control block; peers write into it:
//   per sender: an `arrive` epoch flag (message published), a `done` epoch flag (payload written), and
//   two alternating message slots (receive-region descriptors + blob). Flags are cache-line padded,
//   released by the writer and acquired by the owner, who polls only its own memory.
// Epochs count per pair of ranks, so a subset of the ranks (elastic scale-down) can exchange while
// the others stay away. Two message slots suffice without a closing barrier: a peer can only reach
// epoch s+2 after this rank finished epoch s+1, hence stopped reading slot s % 2.
#pragma once

#include <atomic>
#include <chrono>
#include <exception>
#include <cstdint>
#include <string>
#include <vector>

#include "moedist/transport.h"

namespace moedist::transport {

constexpr int kMaxRegions = 6;

struct RegionDesc {
  uint64_t addr;   // pointer (threads) or offset in the owner's window (shared memory)
  uint64_t bytes;
};

struct alignas(64) PeerFlags {
  std::atomic<uint64_t> arrive{0};
  char pad0[64 - sizeof(std::atomic<uint64_t>)];
  std::atomic<uint64_t> done{0};
  std::atomic<uint32_t> done_failed{0};
  char pad1[64 - sizeof(std::atomic<uint64_t>) - sizeof(std::atomic<uint32_t>)];
};
static_assert(sizeof(PeerFlags) == 128);

struct MsgHeader {
  uint32_t nregions;
  uint32_t blob_bytes;
  RegionDesc regions[kMaxRegions];
};

// Written by the owner of a control block when it abandons a call (a timeout, a dead peer, an
// interrupt): peers waiting for it stop at once and name it, instead of waiting out their deadline.
struct alignas(64) OwnerStatus {
  std::atomic<uint32_t> failed{0};
  char why[252] = {};
};
static_assert(sizeof(OwnerStatus) == 256);

// Memory layout of one control block: [OwnerStatus][PeerFlags x W][message slot x W x 2].
struct CtrlLayout {
  int world = 0;
  size_t blob_max = 0;
  size_t msg_bytes() const { return (sizeof(MsgHeader) + blob_max + 63) / 64 * 64; }
  size_t bytes() const { return sizeof(OwnerStatus) + static_cast<size_t>(world) * (sizeof(PeerFlags) + 2 * msg_bytes()); }
  OwnerStatus* status(void* base) const { return static_cast<OwnerStatus*>(base); }
  PeerFlags* flags(void* base, int peer) const {
    return reinterpret_cast<PeerFlags*>(static_cast<unsigned char*>(base) + sizeof(OwnerStatus)) + peer;
  }
  unsigned char* msg(void* base, int peer, uint64_t epoch) const {
    return static_cast<unsigned char*>(base) + sizeof(OwnerStatus) + static_cast<size_t>(world) * sizeof(PeerFlags) +
           (static_cast<size_t>(peer) * 2 + (epoch & 1)) * msg_bytes();
  }
};

class WindowEngine : public Transport {
 public:
  WindowEngine(int rank, int world, size_t blob_max, std::chrono::milliseconds timeout);
  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  std::chrono::milliseconds timeout() const override { return timeout_; }
  size_t max_blob_bytes() const override { return layout_.blob_max; }
  void exchange(const ExchangeSpec& spec) override;
  bool abandoned() const override { return !broken_.empty(); }
  void exchange_begin(const ExchangeSpec& spec) override;
  void exchange_end() override;
  TransportStats stats() const override;

 protected:
  virtual void* ctrl_base(int rank) = 0;                   // control block of `rank`
  virtual uint64_t encode(const void* p, size_t bytes) = 0;  // describe my memory to peers
  virtual void* decode(int owner, uint64_t addr, uint64_t bytes) = 0;
  // Empty if `rank` is alive as far as can be told; otherwise why it is not.
  virtual std::string peer_failure(int rank) { (void)rank; return {}; }
  // Empty unless the whole group is known to be unusable (e.g. a rank claimed twice); then why.
  virtual std::string group_failure() { return {}; }

  CtrlLayout layout_;

 private:
  void wait_flag(const std::atomic<uint64_t>& flag, uint64_t epoch, int peer, const char* op, const char* what);
  void run_exchange(const ExchangeSpec& spec);
  void run_begin(const ExchangeSpec& spec);  // waves 1 and the payload, "done" signalled
  void run_end();                            // wave 2: every member's "done"
  void check_usable(const char* op);
  // This rank leaves a call unfinished: peers are told (OwnerStatus) and later calls fail at once.
  void abandon(const std::string& why);

  int rank_;
  int world_;
  std::chrono::milliseconds timeout_;
  std::vector<uint64_t> epoch_;  // per peer
  int spin_;                     // polls before the first yield: fewer when ranks outnumber CPUs
  bool completed_ = false;       // the current exchange finished on this rank (both waves)
  // Between run_begin and run_end: the members, the op and this rank's own error from produce.
  struct Pending {
    bool active = false;
    std::vector<int> members;
    const char* op = "";
    std::exception_ptr local_error;
  } pending_;
  std::string broken_;           // set once a call was abandoned: the group's epochs are out of step
  // Traffic counters: written by this rank's thread only (relaxed), readable from any thread.
  std::atomic<uint64_t> bytes_sent_{0}, payload_bytes_{0}, messages_{0}, exchanges_{0};
};

std::chrono::milliseconds default_timeout(std::chrono::milliseconds requested);

}  // namespace moedist::transport
