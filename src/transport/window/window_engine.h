// The exchange protocol of transports whose ranks can load and store each other's memory (threads of
// one process, processes sharing POSIX segments). Each rank owns a control block; peers write into it:
//   per sender: an `arrive` epoch flag (message published), a `done` epoch flag (payload written), and
//   two alternating message slots. Flags are cache-line padded, released by the writer and acquired by
//   the owner, who polls only its own memory.
// A message (receive-region descriptors + blob) is the same for every peer, so the sender writes it once,
// into memory of its own that peers can read (its outbox: WindowEngine::outbox), and a message slot only
// says where it lies: 32 bytes per pair of ranks whatever the blob's size, instead of a copy of the
// largest blob per pair. Receivers read the message in place; they are done with it before they raise
// their `done` flag, and the sender rewrites its outbox only after it saw every member's `done` (the
// end of its previous exchange), so one outbox per rank suffices. An exchange that was abandoned midway
// leaves its outbox to slow readers: the next one gets a fresh outbox.
// Epochs count per pair of ranks, so a subset of the ranks (elastic scale-down) can exchange while
// the others stay away. Two message slots suffice without a closing barrier: a peer can only reach
// epoch s+2 after this rank finished epoch s+1, hence stopped reading slot s % 2.
#pragma once

#include <atomic>
#include <cstddef>
#include <chrono>
#include <exception>
#include <cstdint>
#include <string>
#include <vector>

#include "moedist/error.h"
#include "moedist/transport.h"

namespace moedist::transport {

constexpr int kMaxRegions = 6;

struct RegionDesc {
  uint64_t addr;   // pointer (threads) or offset in the owner's window (shared memory)
  uint64_t bytes;
};

// Each flag is followed by its sleeper word (a futex): 1 while the owner sleeps waiting for the flag, so
// that the writer wakes it after the store (and makes no system call otherwise).
struct alignas(64) PeerFlags {
  std::atomic<uint64_t> arrive{0};
  std::atomic<uint32_t> arrive_sleeper{0};
  char pad0[64 - sizeof(std::atomic<uint64_t>) - sizeof(std::atomic<uint32_t>)];
  std::atomic<uint64_t> done{0};
  std::atomic<uint32_t> done_sleeper{0};
  std::atomic<uint32_t> done_failed{0};
  char pad1[64 - sizeof(std::atomic<uint64_t>) - 2 * sizeof(std::atomic<uint32_t>)];
  // The sleeper word of `arrive` or `done`.
  static std::atomic<uint32_t>& sleeper_of(const std::atomic<uint64_t>& flag) {
    return *reinterpret_cast<std::atomic<uint32_t>*>(const_cast<unsigned char*>(reinterpret_cast<const unsigned char*>(&flag)) + 8);
  }
};
static_assert(sizeof(PeerFlags) == 128);
static_assert(offsetof(PeerFlags, arrive_sleeper) == offsetof(PeerFlags, arrive) + 8 &&
              offsetof(PeerFlags, done_sleeper) == offsetof(PeerFlags, done) + 8);

// A message, in the sender's outbox: this header, then blob_bytes of blob.
struct MsgHeader {
  uint32_t nregions;
  uint32_t blob_bytes;
  RegionDesc regions[kMaxRegions];
};

// A message slot: where the sender's message lies (encoded like receive regions) and its length.
struct MsgSlot {
  RegionDesc at;
  uint64_t reserved[2];
};
static_assert(sizeof(MsgSlot) == 32);

// The owner's status, at the start of its control block. `failed` is written when the owner abandons a
// call (a timeout, a dead peer, an interrupt): peers waiting for it stop at once and name it, instead of
// waiting out their deadline. The rest serves failure recovery (WindowEngine::recover):
//   heartbeat: bumped about every 20 ms while the owner waits inside moedist, so that a peer can tell a
//     rank that waits (alive) from one that is stopped;
//   joined / calls: the latest recovery generation the owner joined, and its completed calls then;
//   proposal_gen / proposal_calls (+ the proposal mask after the fixed part): the owner's proposal;
//   decision: used in rank 0's block only (it stays mapped by every survivor when rank 0 dies): the
//     proposal that won generation g, as (g << 16) | (proposer + 1), set by compare-and-swap.
// After the fixed part: `words` uint64 of suspects (ranks the owner timed out on or saw die), then
// `words` of its proposal (the failed set), words = ceil(W / 64).
struct alignas(64) OwnerStatus {
  std::atomic<uint64_t> failed{0};  // 1 + the generation in which the owner abandoned a call; 0: never
  char why[248] = {};
  std::atomic<uint64_t> heartbeat{0};
  std::atomic<uint64_t> joined{0};
  std::atomic<uint64_t> calls{0};
  std::atomic<uint64_t> proposal_gen{0};
  std::atomic<uint64_t> proposal_calls{0};
  std::atomic<uint64_t> decision{0};
  char pad[16] = {};
};
static_assert(sizeof(OwnerStatus) == 320);

// Memory layout of one control block: [status area][PeerFlags x W][message slot x W x 2]; the status
// area is OwnerStatus, then suspects and proposal masks.
struct CtrlLayout {
  int world = 0;
  size_t blob_max = 0;
  size_t mask_words() const { return (static_cast<size_t>(world) + 63) / 64; }
  size_t status_bytes() const { return (sizeof(OwnerStatus) + 2 * mask_words() * 8 + 63) / 64 * 64; }
  static size_t msg_bytes() { return sizeof(MsgSlot); }
  size_t bytes() const { return status_bytes() + static_cast<size_t>(world) * (sizeof(PeerFlags) + 2 * msg_bytes()); }
  OwnerStatus* status(void* base) const { return static_cast<OwnerStatus*>(base); }
  std::atomic<uint64_t>* suspects(void* base) const {
    return reinterpret_cast<std::atomic<uint64_t>*>(static_cast<unsigned char*>(base) + sizeof(OwnerStatus));
  }
  std::atomic<uint64_t>* proposal(void* base) const { return suspects(base) + mask_words(); }
  PeerFlags* flags(void* base, int peer) const {
    return reinterpret_cast<PeerFlags*>(static_cast<unsigned char*>(base) + status_bytes()) + peer;
  }
  MsgSlot* msg(void* base, int peer, uint64_t epoch) const {
    return reinterpret_cast<MsgSlot*>(static_cast<unsigned char*>(base) + status_bytes() + static_cast<size_t>(world) * sizeof(PeerFlags)) +
           (static_cast<size_t>(peer) * 2 + (epoch & 1));
  }
};

class WindowEngine : public Transport {
 public:
  WindowEngine(int rank, int world, size_t blob_max, std::chrono::milliseconds timeout);
  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  std::chrono::milliseconds timeout() const override { return timeout_; }
  size_t max_blob_bytes() const override { return layout_.blob_max; }
  // Bytes of this rank's control block (what every rank reserves for the protocol, outbox aside).
  size_t control_block_bytes() const { return layout_.bytes(); }
  void exchange(const ExchangeSpec& spec) override;
  bool abandoned() const override { return !broken_.empty(); }
  bool blobs_in_place() const override { return true; }
  void exchange_begin(const ExchangeSpec& spec) override;
  void exchange_end() override;
  TransportStats stats() const override;
  RecoveryResult recover() override;
  std::vector<int32_t> failed_ranks() const override;
  bool has_failed_ranks() const override { return gen_ > 0 || !excluded_.empty(); }
  // This group is one host's part of a larger group (HybridTransport): messages name ranks by their
  // rank in it (names[local rank]) and label this rank "[rank names[rank]/world] ".
  void name_ranks(std::vector<int> names, int world) {
    names_ = std::move(names);
    names_world_ = world;
  }

 protected:
  int name_of(int r) const { return names_.empty() || r < 0 || r >= static_cast<int>(names_.size()) ? r : names_[static_cast<size_t>(r)]; }
  std::string label() const {
    return detail::str_cat("[rank ", name_of(rank_), "/", names_.empty() ? world_ : names_world_, "] ");
  }
  virtual void* ctrl_base(int rank) = 0;                   // control block of `rank`
  virtual uint64_t encode(const void* p, size_t bytes) = 0;  // describe my memory to peers
  virtual void* decode(int owner, uint64_t addr, uint64_t bytes) = 0;
  // This rank's outbox: at least `bytes` of its memory that peers can read (decode(rank, encode(p))),
  // kept until the next call. `fresh`: the previous message may still be read by a slow peer (its
  // exchange was abandoned), so it must stay as it is: hand out other memory.
  virtual void* outbox(size_t bytes, bool fresh) = 0;
  // Empty if `rank` is alive as far as can be told; otherwise why it is not.
  virtual std::string peer_failure(int rank) { (void)rank; return {}; }
  // Empty unless the whole group is known to be unusable (e.g. a rank claimed twice); then why.
  virtual std::string group_failure() { return {}; }
  // Called when a recovery is agreed: the receive regions of the failed call may still be written by a
  // rank declared failed; scratch memory handed out before must never be handed out again.
  virtual void retire_scratch() {}

  CtrlLayout layout_;

 private:
  std::vector<int> names_;  // see name_ranks
  int names_world_ = 0;
  void wait_flag(const std::atomic<uint64_t>& flag, uint64_t epoch, int peer, const char* op, const char* what);
  void run_exchange(const ExchangeSpec& spec);
  void run_begin(const ExchangeSpec& spec);  // waves 1 and the payload, "done" signalled
  void run_end();                            // wave 2: every member's "done"
  void check_usable(const char* op);
  void check_members(const ExchangeSpec& spec);  // InvalidArgument if a failed rank is among them
  // This rank leaves a call unfinished: peers are told (OwnerStatus) and later calls fail at once.
  void abandon(const std::string& why);
  // Throws if the survivors of a recovery this rank did not join declared it failed.
  void check_excluded(const char* op);
  std::string excluded_message(uint64_t generation, const char* op) const;
  uint64_t decided_generation() { return layout_.status(ctrl_base(0))->decision.load(std::memory_order_acquire) >> 16; }

  int rank_;
  int world_;
  std::chrono::milliseconds timeout_;
  std::vector<uint64_t> epoch_;  // per peer
  int spin_;                     // polls before the first yield: fewer when ranks outnumber CPUs
  bool crowded_;                 // ranks outnumber CPUs 8:1 or more: waiters sleep (futex) at once instead of yielding
  bool completed_ = false;       // the current exchange finished on this rank (both waves)
  bool outbox_busy_ = false;     // peers may still read this rank's outbox (its exchange did not end)
  // Between run_begin and run_end: the members, the op and this rank's own error from produce.
  struct Pending {
    bool active = false;
    std::vector<int> members;
    const char* op = "";
    std::exception_ptr local_error;
    int64_t* waits_us = nullptr;  // ExchangeSpec::waits_us
  } pending_;
  std::string broken_;           // set once a call was abandoned: the group's epochs are out of step
  // Failure recovery: the generation (recoveries agreed), the failed ranks agreed, the ranks this rank
  // timed out on or saw die since the last agreement, and why this rank was excluded (empty if it was not).
  uint64_t gen_ = 0;
  std::vector<int32_t> failed_;
  std::vector<uint8_t> suspects_;
  std::string excluded_;
  uint64_t recovery_calls_ = 0;  // calls_completed agreed at the last recovery
  // Traffic counters: written by this rank's thread only (relaxed), readable from any thread.
  std::atomic<uint64_t> bytes_sent_{0}, payload_bytes_{0}, messages_{0}, exchanges_{0};
};

std::chrono::milliseconds default_timeout(std::chrono::milliseconds requested);

}  // namespace moedist::transport
