// MessageEngine: the half of Transport::exchange for the members of a call that this rank reaches with
// messages over a Wire (wire.h): every other member for make_mpi_group; the members on other hosts for
// the hybrid groups (make_hybrid_group over MPI, make_ucx_group over UCX).
//
// Wave 1 (tag kTagArrive): this rank sends each remote member one message
//     [ArriveHdr: pair epoch, group nonce, number of receive regions, blob length | region sizes | blob]
//   and receives one from each (probe, then receive: blobs may differ in length).
// Payload: PutWriter::dest for a remote peer appends a chunk [ChunkHdr: offset, bytes, region | bytes]
//   to the peer's send arena and returns the chunk's payload; a write that continues the previous
//   chunk (same region, next offset) extends it instead. The payload starts at the same address
//   modulo a as its offset (a: the largest power of two up to 16 dividing offset and length), so
//   rows and scalars keep the alignment they have in the receive region.
// Wave 2 (tag kTagDone): every remote member gets the arena's blocks as messages, the first starting
//   with [BlockHdr: pair epoch, group nonce, failed flag, number of blocks] (a failed rank sends only
//   that header);
//   every block received is unpacked into this rank's receive regions, each chunk bounds-checked.
// The call returns once every message of both waves has arrived and every send has completed.
// Every wait polls against the group's deadline and raises Timeout naming the missing peers and the
// operation; errors of the engine underneath raise TransportError with its reason.
// Giving up (tag kTagGaveUp): a rank whose call fails sends each remote member of the call a short
//   [GaveUp: pair epoch, group nonce, number of culprits | culprits] (the ranks it timed out waiting
//   for; none when it failed for another reason).
//   A member still waiting in that call fails at once with the culprit's name instead of waiting for
//   its own deadline and then blaming the rank that gave up; a member already past it uses the
//   notice to name the culprit if it times out waiting for the rank that gave up.
// A failed exchange leaves the group out of step; it is recorded through Wire::note_failure (MPI ends
//   a job whose MPI_Finalize would wait forever for a stuck rank: see mpi_wire.h).
// Pair epochs count the calls two ranks had together, so members may be a subset (elastic) and a
// message left over from a call that failed on one side is recognised and dropped; a group nonce in
// every message does the same for leftovers of an earlier group (MPI may reuse a freed communicator's
// context).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "moedist/group.h"
#include "moedist/transport.h"
#include "transport/message/wire.h"

namespace moedist::transport {

// The largest blob one exchange carries (its wave-1 message stays below INT_MAX bytes).
constexpr size_t kMessageBlobMax = size_t{1} << 30;

// Which host each rank of a communicator is on.
struct HostLayout {
  std::vector<int> host_of;  // per rank: host index, hosts numbered in order of their lowest rank
  int nhosts = 1;
  int block = 0;             // hosts are consecutive blocks of `block` ranks (the last may be smaller); 0 if not
};
// The layout of `host_of` (nhosts, block).
HostLayout host_layout(std::vector<int> host_of);
// This process's network namespace (0 if unknown): ranks of one machine in different namespaces
// (containers) are taken for different hosts.
uint64_t netns_id();

struct FreeBytes {
  void operator()(unsigned char* p) const;
};
using Bytes = std::unique_ptr<unsigned char, FreeBytes>;

class MessageEngine {
 public:
  // host_of: every rank's host; nonce: the same on every rank of the group, different for every group.
  MessageEngine(std::unique_ptr<Wire> wire, std::vector<int> host_of, std::chrono::milliseconds timeout, uint64_t nonce);
  ~MessageEngine();
  MessageEngine(const MessageEngine&) = delete;
  MessageEngine& operator=(const MessageEngine&) = delete;

  int rank() const { return rank_; }
  int world() const { return world_; }
  Wire& wire() { return *wire_; }
  const std::vector<int>& host_of() const { return host_of_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  std::string label() const;

  // One exchange, in this order. `remote`: the members reached by messages, ascending, without this rank;
  // `index`: each remote member's position in spec.members (for blobs_out).
  void begin(const ExchangeSpec& spec, std::span<const int> remote, std::span<const size_t> index);  // posts wave 1
  void collect();                                                          // waits for wave 1
  void* dest(int peer, int region, size_t offset, size_t bytes);            // payload for a remote member
  bool serves(int peer) const;                                             // `peer` is a remote member now
  // Sends wave 2 (failed: this rank's produce failed), receives and unpacks the peers'. Returns the
  // first remote member that reported a failure, or -1.
  int finish(bool failed);
  // After an exception inside an exchange (`why`: its message): pending requests are released and
  // their buffers kept alive (the engine may still use them); the remote members are told that this
  // rank gave up (and on whom); the failure is noted (Wire::note_failure); the next exchange starts clean.
  void abandon(const char* why) noexcept;

  // Traffic counters (this rank's sends).
  uint64_t bytes_sent() const { return bytes_sent_.load(std::memory_order_relaxed); }
  uint64_t bytes_sent_inter_host() const { return bytes_inter_.load(std::memory_order_relaxed); }
  uint64_t payload_bytes() const { return payload_.load(std::memory_order_relaxed); }
  uint64_t payload_bytes_inter_host() const { return payload_inter_.load(std::memory_order_relaxed); }
  uint64_t messages() const { return messages_.load(std::memory_order_relaxed); }
  // Bytes of the exchanges' messages received from ranks on other hosts.
  uint64_t bytes_received_inter_host() const { return recv_inter_.load(std::memory_order_relaxed); }

 private:
  struct Block {
    Bytes data;
    size_t cap = 0;
    size_t used = 0;
  };
  struct Peer {
    uint64_t epoch = 0;
    bool active = false;  // a remote member of the current exchange
    size_t index = 0;     // position in spec.members
    std::vector<uint64_t> regions;  // its receive regions' sizes (from wave 1)
    // send side
    std::vector<unsigned char> arrive;  // wave-1 message
    std::vector<Block> blocks;          // arena; blocks[0..nblocks) in use
    size_t nblocks = 0;
    size_t next_cap = 0;                // size of the first block to allocate
    size_t last_chunk = SIZE_MAX;       // offset of the last chunk header in the current block
    // receive side
    Bytes rbuf;
    size_t rcap = 0;
    size_t rlen = 0;      // length of the message in rbuf
    Wire::Req rreq;
    int rstate = 0;       // 0: probing, 1: receiving, 2: done
    bool first = true;    // wave 2: the next message is the first block
    int blocks_left = 0;  // wave 2: messages still expected after the current one
    bool failed = false;
    // Latest GaveUp notice from this peer: the call (pair epoch) it gave up and on whom (-1: itself).
    uint64_t gave_up_epoch = 0;
    std::vector<int32_t> gave_up_on;
  };

  void add(std::atomic<uint64_t>& c, uint64_t v) { c.store(c.load(std::memory_order_relaxed) + v, std::memory_order_relaxed); }
  void send(int peer, const void* p, size_t bytes, int tag);
  // Polls until step() is true; `missing` returns the peers still awaited (their messages are
  // missing) and what they have not done yet, for the Timeout. A notice that a peer of this call gave
  // up ends the wait at once.
  template <typename Step, typename Missing>
  void poll(Step step, Missing missing);
  bool try_receive(int peer, Peer& st, int tag);  // advances one receive; true when a message is complete
  void take_notices();                            // receives GaveUp notices; throws if a peer of this call gave up
  [[noreturn]] void timed_out(const std::vector<int>& missing, const char* what);
  std::string ranks_str(const std::vector<int32_t>& r) const;  // "rank 2" / "ranks 2 and 3"
  void unpack(int peer, const unsigned char* msg, size_t len);
  // Inside poll's step: `peer`'s message of the current wave is complete. When poll had to wait, the
  // time since the wait began or the previous peer completed is added to spec.waits_us[peer].
  void arrived(int peer);
  Block& room(Peer& st, size_t need);

  std::unique_ptr<Wire> wire_;
  int rank_ = 0, world_ = 0;
  std::vector<int> host_of_;
  std::chrono::milliseconds timeout_;
  uint64_t nonce_ = 0;  // the same on every rank of the group, different for every group
  std::vector<Peer> peers_;
  std::vector<int> remote_;
  std::vector<Wire::Req> sends_;
  std::vector<int> sends_to_;
  std::vector<Bytes> graveyard_;  // buffers of abandoned requests
  std::vector<std::vector<unsigned char>> graveyard_vec_;
  const ExchangeSpec* spec_ = nullptr;
  const char* op_ = "";
  bool waiting_ = false;  // poll's first look found messages missing (arrived() measures)
  std::chrono::steady_clock::time_point wait_mark_{};
  std::vector<int32_t> culprits_;  // the peers this rank timed out waiting for in the current call
  std::vector<std::vector<unsigned char>> notices_;  // GaveUp messages in flight (the engine may still read them)
  std::atomic<uint64_t> bytes_sent_{0}, bytes_inter_{0}, payload_{0}, payload_inter_{0}, messages_{0}, recv_inter_{0};
};

}  // namespace moedist::transport
