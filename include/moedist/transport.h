// The transport interface: how ranks of one communicator exchange data. The ops (dispatch_v2,
// combine_v2) are written once against it; backends (thread, shm, mpi, hybrid; later cuda) implement it.
//
// The one collective is `exchange`, a counts-before-data step in two waves:
//   1. every member publishes a small blob (counts, status) and where its receive regions are;
//   2. once a member holds every peer's blob it writes its payload straight into the peers' receive
//      regions (through PutWriter), then signals completion; the call returns when every peer has
//      finished writing into this rank.
// Each wait has a deadline; a peer that does not arrive raises Timeout naming it and the operation.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace moedist {

struct RecvRegion {
  void* data = nullptr;  // where peers' payload for this region lands
  size_t bytes = 0;
};

class PutWriter {
 public:
  virtual ~PutWriter() = default;
  // A writable pointer to `bytes` bytes at `offset` of receive region `region` of member `peer`
  // (a physical rank). The caller fills it before produce() returns.
  virtual void* dest(int peer, int region, size_t offset, size_t bytes) = 0;
  // Member `index`'s blob (spec.members order) where the transport keeps it, and its length in *bytes
  // (the member's own blob_bytes): valid until produce() returns. Null from transports whose
  // blobs_in_place() is false, which only fill ExchangeSpec::blobs_out.
  virtual const void* blob(size_t index, size_t* bytes) {
    (void)index;
    *bytes = 0;
    return nullptr;
  }
};

struct ExchangeSpec {
  const char* op = "";           // operation name, for error messages ("dispatch_v2")
  std::span<const int> members;  // physical ranks taking part, ascending, including this rank
  const void* blob = nullptr;    // this rank's blob, blob_bytes long (a peer's longer blob is cut,
                                 // a shorter one zero-padded: the caller's header tells them apart)
  size_t blob_bytes = 0;
  void* blobs_out = nullptr;     // members.size() * blob_bytes: every member's blob, in members order;
                                 // may be null where blobs_in_place() (read them through PutWriter::blob)
  std::span<const RecvRegion> recv;  // this rank's receive regions
  // Called once every member's blob is in blobs_out (or readable through PutWriter::blob); writes
  // this rank's payload to its peers.
  // An exception thrown here is re-raised after the exchange completed on every member.
  std::function<void(PutWriter&)> produce;
  // Optional: world_size() entries indexed by physical rank. For every member p this rank had to wait
  // for (its blob not yet there, or its payload not yet written), the microseconds spent waiting are
  // added to waits_us[p]; nothing is written when no wait was needed. Kept until exchange_end.
  int64_t* waits_us = nullptr;
};

// Traffic this endpoint sent to other ranks since it was created (cumulative; take differences around
// a call to measure it). Receiving is not counted (except bytes_received_inter_host): the sum over
// ranks is the traffic of the group.
//   bytes_sent: every byte this rank put on the way to another rank: control messages (counts,
//     status), packing headers and payload. Writes into this rank's own memory are not counted.
//   bytes_sent_inter_host: the part of bytes_sent that went to ranks on other hosts (MPI transports;
//     0 where every rank is on one host).
//   payload_bytes, payload_bytes_inter_host: only the bytes written through PutWriter::dest (rows,
//     scales, records), without control messages and headers.
//   messages: messages (MPI) or message slots (shared memory) sent to other ranks.
//   bytes_received_inter_host: every byte of the MPI messages this rank received from ranks on other
//     hosts (the same messages as bytes_sent_inter_host, seen from the receiving side): summed over a
//     host's ranks, bytes_sent_inter_host is what left the host and this what entered it.
struct TransportStats {
  uint64_t bytes_sent = 0;
  uint64_t bytes_sent_inter_host = 0;
  uint64_t payload_bytes = 0;
  uint64_t payload_bytes_inter_host = 0;
  uint64_t messages = 0;
  uint64_t exchanges = 0;  // exchange() calls
  uint64_t bytes_received_inter_host = 0;
};

// What the ops remember per endpoint between calls; transports do not use it.
//   calls: collective steps run on this endpoint, counted per set of members (an elastic call leaves
//     some ranks out, and they may take part again later); each step carries its number, so ranks that
//     disagree on which call they are in (one skipped a call, or called combine while the others
//     dispatch) are told.
//   dispatch_digests: digests of the metadata the latest dispatches returned on this endpoint; combine
//     checks that its metadata is one of them.
struct CallState {
  std::map<uint64_t, uint64_t> calls;  // digest of the member list -> steps run with those members
  uint64_t calls_completed = 0;        // dispatch / combine calls that returned results on this endpoint
  static constexpr int kDigests = 16;
  uint64_t dispatch_digests[kDigests] = {};
  unsigned next_digest = 0;
};

// What the surviving ranks of a group agreed on after a failure (Transport::recover).
//   failed: one entry per rank of the group, 1 for every rank declared failed so far (the set only grows).
//   generation: how many agreements the group has run (each one a new generation of its epochs).
//   calls_completed: the dispatch / combine calls that every surviving rank completed on this endpoint
//     (since the group was made). A rank may have completed one call more than a peer that failed in
//     it (the dead rank finished writing to one and not to the other); calls past this number did not
//     complete everywhere and are to be made again.
//   newly_failed: the ranks this agreement added, ascending.
struct RecoveryResult {
  std::vector<int32_t> failed;
  uint64_t generation = 0;
  uint64_t calls_completed = 0;
  std::vector<int> newly_failed;
};

class Transport {
 public:
  virtual ~Transport() = default;
  CallState& call_state() { return call_state_; }
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::string name() const = 0;  // "thread", "shm", "mpi"
  // Ranks per server for comm_alg "hierarchy" (consecutive ranks form a server).
  virtual int ranks_per_server() const = 0;
  virtual void exchange(const ExchangeSpec& spec) = 0;
  // The exchange in two halves, so a caller can compute while peers finish writing into it (the split
  // ops: dispatch_setup / _teardown, combine_setup / _teardown). exchange_begin publishes the blob, waits
  // for the peers' blobs, runs produce and signals "done"; exchange_end waits for every peer's "done" and
  // raises what exchange would. One split exchange at a time per endpoint, no other exchange in between.
  // The spec's memory need only live through exchange_begin; the receive regions until exchange_end.
  // Default: the whole exchange in exchange_begin, nothing left for exchange_end.
  virtual void exchange_begin(const ExchangeSpec& spec) { exchange(spec); }
  virtual void exchange_end() {}
  // True if receive regions may be any memory of this rank (peers share its address space).
  // Otherwise they must lie in scratch() memory, and the ops copy results out of it.
  virtual bool recv_anywhere() const = 0;
  // Transport-owned memory usable as a receive region; `slot` tells apart buffers needed at once.
  // Valid until the next scratch() call with the same slot.
  virtual void* scratch(int slot, size_t bytes) = 0;
  // Memory for an output that peers write into (a receive region that outlives the call): kept until
  // its last owner drops it; contents unspecified. Shared memory carves it from this rank's window.
  virtual std::shared_ptr<unsigned char> alloc(size_t bytes) = 0;
  virtual std::chrono::milliseconds timeout() const = 0;
  // The largest blob (ExchangeSpec::blob_bytes) one exchange can carry. The ops check their blobs
  // against it during validation, so arguments that would need more are refused before any byte moves.
  virtual size_t max_blob_bytes() const { return std::numeric_limits<size_t>::max(); }
  // True if PutWriter::blob lends every member's blob during produce, so that a caller that needs them
  // only there can pass no blobs_out (and keep no members x blob_bytes copy of its own).
  virtual bool blobs_in_place() const { return false; }
  // What this endpoint has sent so far; a transport that does not count returns zeros.
  virtual TransportStats stats() const { return {}; }
  // True once a call on this endpoint was given up midway (a timeout, a dead peer, an interrupt): a
  // slow peer may still be writing into the receive regions of that call, so they must never be freed.
  virtual bool abandoned() const { return false; }
  // Failure recovery (docs/design.md, "Failover"). After a call failed because peers died or stalled,
  // the surviving ranks each call recover(): they agree on one set of failed ranks (also when another
  // rank fails meanwhile), the group forgets what the failed call left behind, and calls continue among
  // the survivors (with elastic_info leaving the failed ranks out). Transports that cannot survive a
  // rank's death raise Unsupported.
  virtual RecoveryResult recover();
  // The failed ranks agreed so far (1 = failed), without communicating; zeros before any failure.
  virtual bool has_failed_ranks() const { return false; }
  virtual std::vector<int32_t> failed_ranks() const { return std::vector<int32_t>(static_cast<size_t>(world_size()), 0); }

 private:
  CallState call_state_;
};

}  // namespace moedist
