// MPI under the message engine (MpiWire), and what MPI jobs need around it: host detection, error
// strings, and the finalize guard.
#pragma once

#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <chrono>
#include <string>
#include <vector>

#include "transport/message/message_engine.h"
#include "transport/message/wire.h"

namespace moedist::transport {

// Raises TransportError "<label><what> failed: <MPI error class and string>" unless rc == MPI_SUCCESS.
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

// Collective over comm. ranks_per_host > 0: consecutive blocks of that size (for `hybrid`, each block
// must lie inside one detected host: shared memory must work in it); 0: MOEDIST_RANKS_PER_HOST, else
// MPI_COMM_TYPE_SHARED refined by network namespace.
HostLayout detect_hosts(MPI_Comm comm, int ranks_per_host, bool hybrid, const std::string& label);

// Messages over an MPI communicator (a private duplicate, which the wire keeps: see ~MpiWire).
class MpiWire : public Wire {
 public:
  explicit MpiWire(MPI_Comm comm);
  ~MpiWire() override;
  MPI_Comm comm() const { return comm_; }
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  const char* engine() const override { return "MPI"; }
  bool closed() const override;
  Req isend(int peer, const void* p, size_t bytes, int tag, const char* what) override;
  size_t test_sends(std::span<Req> reqs) override;
  bool probe(int peer, int tag, Msg* m) override;
  Req irecv(const Msg& m, void* buf) override;
  bool test(Req& r) override;
  void release(Req& r) noexcept override;
  bool post(int peer, const void* p, size_t bytes, int tag) noexcept override;
  void drain() noexcept override;
  void note_failure(const std::string& what, std::chrono::milliseconds timeout) noexcept override;

 private:
  void check(int rc, const char* what) const { check_mpi(rc, prefix_, what); }
  MPI_Comm comm_;
  int rank_ = 0, world_ = 0;
  std::vector<MPI_Request> scratch_;
  std::vector<int> done_;
};

}  // namespace moedist::transport
