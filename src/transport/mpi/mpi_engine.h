// The MPI half of Transport::exchange, for the members of a call that this rank reaches over MPI
// (every other member for make_mpi_group; the members on other hosts for make_hybrid_group).
//
// Wave 1 (tag kTagArrive): this rank sends each remote member one message
//     [ArriveHdr: pair epoch, group nonce, number of receive regions, blob length | region sizes | blob]
//   and receives one from each (MPI_Improbe + MPI_Imrecv: blobs may differ in length).
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
// Every wait polls (MPI_Improbe / MPI_Test) against the group's deadline and raises Timeout naming the
// missing peers and the operation; MPI error codes (MPI_ERRORS_RETURN on the private communicator)
// raise TransportError with MPI_Error_string.
// Giving up (tag kTagGaveUp): a rank whose call fails sends each remote member of the call a short
//   [GaveUp: pair epoch, group nonce, number of culprits | culprits] (the ranks it timed out waiting
//   for; none when it failed for another reason).
//   A member still waiting in that call fails at once with the culprit's name instead of waiting for
//   its own deadline and then blaming the rank that gave up; a member already past it uses the
//   notice to name the culprit if it times out waiting for the rank that gave up.
// A failed exchange leaves the communicator out of step, and a rank that never returns (stopped,
//   stuck) would keep MPI_Finalize waiting forever: the failure is recorded for the process
//   (note_mpi_group_failure), and MPI_Finalize then ends the job (see mpi_finalize_guard below).
// Pair epochs count the calls two ranks had together, so members may be a subset (elastic) and a
// message left over from a call that failed on one side is recognised and dropped; a group nonce in
// every message does the same for leftovers of an earlier group whose communicator context MPI reused.
#pragma once

#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "moedist/group.h"
#include "moedist/transport.h"

namespace moedist::transport {

// The largest blob one MPI exchange carries (its wave-1 message must stay below INT_MAX bytes).
constexpr size_t kMpiBlobMax = size_t{1} << 30;

// Raises TransportError "<label><what>: <MPI error class and string>" unless rc == MPI_SUCCESS.
void check_mpi(int rc, const std::string& label, const char* what);
std::string mpi_error_string(int rc);

// Records that an MPI group of this process failed (Timeout or TransportError inside an exchange)
// with message `what`; `timeout`: that group's deadline. Installs the finalize guard if needed.
void note_mpi_group_failure(const std::string& what, std::chrono::milliseconds timeout);
// The first failure recorded, or "" if none.
std::string mpi_group_failure();
// Installs, once per process (MPI must be initialized), a callback that MPI_Finalize runs first
// (an attribute of MPI_COMM_SELF). If an MPI group of this process failed, it prints the failure and
// starts a watchdog: when MPI_Finalize has not returned within the grace period (the failed group's
// timeout, clamped to [10 s, 60 s]; MOEDIST_MPI_FINALIZE_GRACE_MS overrides), MPI_Finalize is waiting
// for ranks that will never join it, and the watchdog ends the job with MPI_Abort (exit code 1). If
// every rank reaches MPI_Finalize it returns normally and the watchdog never fires.
void mpi_finalize_guard();

// Which host each rank of a communicator is on.
struct HostLayout {
  std::vector<int> host_of;  // per rank: host index, hosts numbered in order of their lowest rank
  int nhosts = 1;
  int block = 0;             // hosts are consecutive blocks of `block` ranks (the last may be smaller); 0 if not
};
// Collective over comm. ranks_per_host > 0: consecutive blocks of that size (for `hybrid`, each block
// must lie inside one detected host: shared memory must work in it); 0: MOEDIST_RANKS_PER_HOST, else
// MPI_COMM_TYPE_SHARED refined by network namespace.
HostLayout detect_hosts(MPI_Comm comm, int ranks_per_host, bool hybrid, const std::string& label);

struct FreeBytes {
  void operator()(unsigned char* p) const;
};
using Bytes = std::unique_ptr<unsigned char, FreeBytes>;

class MpiEngine {
 public:
  // Takes ownership of `comm` (a private duplicate); host_of: every rank's host.
  MpiEngine(MPI_Comm comm, std::vector<int> host_of, std::chrono::milliseconds timeout);
  ~MpiEngine();
  MpiEngine(const MpiEngine&) = delete;
  MpiEngine& operator=(const MpiEngine&) = delete;

  int rank() const { return rank_; }
  int world() const { return world_; }
  MPI_Comm comm() const { return comm_; }
  const std::vector<int>& host_of() const { return host_of_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  std::string label() const;

  // One exchange, in this order. `remote`: the members reached over MPI, ascending, without this rank;
  // `index`: each remote member's position in spec.members (for blobs_out).
  void begin(const ExchangeSpec& spec, std::span<const int> remote, std::span<const size_t> index);  // posts wave 1
  void collect();                                                          // waits for wave 1
  void* dest(int peer, int region, size_t offset, size_t bytes);            // payload for a remote member
  bool serves(int peer) const;                                             // `peer` is a remote member now
  // Sends wave 2 (failed: this rank's produce failed), receives and unpacks the peers'. Returns the
  // first remote member that reported a failure, or -1.
  int finish(bool failed);
  // After an exception inside an exchange (`why`: its message): pending requests are released and
  // their buffers kept alive (MPI may still use them); the remote members are told that this rank gave
  // up (and on whom); the failure is recorded for MPI_Finalize; the next exchange starts clean.
  void abandon(const char* why) noexcept;

  // Traffic counters (this rank's sends over MPI).
  uint64_t bytes_sent() const { return bytes_sent_.load(std::memory_order_relaxed); }
  uint64_t bytes_sent_inter_host() const { return bytes_inter_.load(std::memory_order_relaxed); }
  uint64_t payload_bytes() const { return payload_.load(std::memory_order_relaxed); }
  uint64_t payload_bytes_inter_host() const { return payload_inter_.load(std::memory_order_relaxed); }
  uint64_t messages() const { return messages_.load(std::memory_order_relaxed); }

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
    MPI_Request rreq = MPI_REQUEST_NULL;
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
  void check(int rc, const char* what) const;  // check_mpi with this rank's label and the operation
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

  MPI_Comm comm_;
  int rank_ = 0, world_ = 0;
  std::vector<int> host_of_;
  std::chrono::milliseconds timeout_;
  uint64_t nonce_ = 0;  // the same on every rank of the group, different for every group
  std::vector<Peer> peers_;
  std::vector<int> remote_;
  std::vector<MPI_Request> sends_;
  std::vector<int> sends_to_;
  std::vector<Bytes> graveyard_;  // buffers of abandoned requests
  std::vector<std::vector<unsigned char>> graveyard_vec_;
  const ExchangeSpec* spec_ = nullptr;
  const char* op_ = "";
  bool waiting_ = false;  // poll's first look found messages missing (arrived() measures)
  std::chrono::steady_clock::time_point wait_mark_{};
  std::vector<int32_t> culprits_;  // the peers this rank timed out waiting for in the current call
  std::vector<std::vector<unsigned char>> notices_;  // GaveUp messages in flight (MPI may still read them)
  std::atomic<uint64_t> bytes_sent_{0}, bytes_inter_{0}, payload_{0}, payload_inter_{0}, messages_{0};
};

}  // namespace moedist::transport
