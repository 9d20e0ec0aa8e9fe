// The message layer under MessageEngine: tagged, nonblocking point-to-point messages between the ranks
// of one group, whose size the receiver learns before it posts the receive (probe, then receive the
// probed message). Two engines implement it: MPI (MpiWire: MPI_Isend, MPI_Improbe + MPI_Imrecv) for jobs
// started by mpirun, and UCX (UcxWire: ucp_tag_send_nbx, ucp_tag_probe_nb + ucp_tag_msg_recv_nbx) for jobs
// that bootstrap themselves (torchrun). Both reach RDMA networks where the cluster has them.
//
// Errors raise TransportError "<prefix><what> failed: <the engine's reason>"; the engine sets the prefix
// (this rank and the operation) before each call. A request is "live" until test() saw it complete or
// release() gave it up; its buffer must stay untouched while it is live, and after release() for as
// long as the engine may still touch it (the caller keeps such buffers until the wire is destroyed).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace moedist::transport {

class Wire {
 public:
  struct Req {
    uintptr_t h = 0;
    bool live = false;
  };
  // A probed message, taken out of the queue: receive it with irecv.
  struct Msg {
    int source = -1;
    size_t bytes = 0;
    uintptr_t h = 0;
  };

  virtual ~Wire() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  virtual const char* engine() const = 0;  // "MPI", "UCX": for messages
  // True once the engine underneath was shut down (MPI_Finalize): no call may be made any more.
  virtual bool closed() const { return false; }
  void set_prefix(std::string p) { prefix_ = std::move(p); }

  // Starts sending `bytes` bytes at p to `peer` with `tag` (what: names the step in errors).
  virtual Req isend(int peer, const void* p, size_t bytes, int tag, const char* what) = 0;
  // Advances the sends in reqs; those that completed are no longer live. Returns how many still are.
  virtual size_t test_sends(std::span<Req> reqs) = 0;
  // A message from `peer` (-1: from any rank) with `tag`, if one has arrived.
  virtual bool probe(int peer, int tag, Msg* m) = 0;
  // Receives a probed message into buf (m.bytes long).
  virtual Req irecv(const Msg& m, void* buf) = 0;
  // True (and r no longer live) once r completed.
  virtual bool test(Req& r) = 0;
  // Stops waiting for r; its buffer must outlive whatever the engine may still do with it.
  virtual void release(Req& r) noexcept = 0;
  // Sends without waiting for completion (the buffer must outlive it); false if it could not be posted.
  virtual bool post(int peer, const void* p, size_t bytes, int tag) noexcept = 0;
  // Receives and drops the messages that already arrived (the group is going away).
  virtual void drain() noexcept {}
  // A call of the group failed with `what` (timeout: the group's deadline). MPI records it for its
  // finalize guard (mpi_wire.h).
  virtual void note_failure(const std::string& what, std::chrono::milliseconds timeout) noexcept {
    (void)what;
    (void)timeout;
  }

 protected:
  std::string prefix_;
};

}  // namespace moedist::transport
