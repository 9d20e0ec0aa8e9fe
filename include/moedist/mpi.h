// Ranks that are MPI processes, on one host or several. Needs <mpi.h> (Open MPI or any MPI-3 library);
// available when moedist was built with MPI (CMake found it: moedist then links MPI::MPI_CXX; after find_package(moedist), moedist_HAVE_MPI says so).
//
//   MPI_Init(&argc, &argv);
//   moedist::register_group("ep", moedist::make_mpi_group(MPI_COMM_WORLD));      // MPI between all ranks
//   moedist::register_group("ep", moedist::make_hybrid_group(MPI_COMM_WORLD));   // shm on a host, MPI across
//
// Both are collective over `comm` (every rank of it calls, like MPI_Comm_dup) and give the endpoint of
// the calling rank; its rank is the rank in `comm`. moedist works on a duplicate of `comm`, so its
// messages never mix with the program's. A group is used by one thread at a time (several threads
// need MPI_THREAD_MULTIPLE). The duplicate communicator stays allocated until MPI_Finalize, also after
// the group is destroyed (a freed one's context could be reused while messages of a failed call are
// still on their way to it); a group that lives past MPI_Finalize makes no MPI call any more.
// After a TransportError or Timeout raised by the transport itself (a peer failed or did not arrive)
// the group is out of step: make a new one. Errors of the arguments (InvalidArgument, a rank that
// rejected its call) leave it usable. A rank that gives up a call tells the other members, which
// then fail at once with a Timeout naming the ranks that did not arrive (not the rank that gave up).
// MPI_Finalize after such a failure: it waits for every rank of the job, and a rank that is stopped
// or stuck never comes. moedist therefore watches MPI_Finalize in a process whose MPI group failed:
// if it has not returned after a grace period (the group's timeout, at least 10 s and at most 60 s;
// MOEDIST_MPI_FINALIZE_GRACE_MS sets it), the process prints the failure and ends the job with
// MPI_Abort (exit status 1). When every rank reaches MPI_Finalize it returns as usual.
//
// Hosts: ranks that share memory according to MPI (MPI_COMM_TYPE_SHARED) and sit in the same network
// namespace form a host. `MpiOptions::ranks_per_host` (or the environment variable
// MOEDIST_RANKS_PER_HOST) overrides this: consecutive blocks of that many ranks are hosts. Traffic to
// ranks on other hosts is counted apart (Transport::stats().bytes_sent_inter_host), and the hybrid
// group uses shared memory only inside a host.
// comm_alg "hierarchy" takes its servers from GroupOptions::ranks_per_server, else from the hosts when
// they are consecutive blocks of equal size (the last may be smaller), as mpirun places ranks by
// default (--map-by slot / core); otherwise make_mpi_group uses one server and make_hybrid_group
// refuses (pass ranks_per_server, or place ranks by host).
#pragma once

#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1  // the C API only
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <memory>
#include <vector>

#include "moedist/group.h"

namespace moedist {

struct MpiOptions {
  // Consecutive blocks of this many ranks are hosts; 0: take MOEDIST_RANKS_PER_HOST, else detect.
  // For the hybrid group each such block must lie on one machine (shared memory must work in it).
  int ranks_per_host = 0;
};

// MPI between every pair of ranks: two-sided, nonblocking point-to-point messages, which work on every
// interconnect the MPI library supports. MPI errors raise TransportError with MPI's error string.
std::shared_ptr<Transport> make_mpi_group(MPI_Comm comm, const GroupOptions& options = {}, const MpiOptions& mpi = {});

// Shared memory between the ranks of one host (as make_shm_group), MPI between hosts. Its outputs live
// in this rank's shared-memory window (like make_shm_group's).
std::shared_ptr<Transport> make_hybrid_group(MPI_Comm comm, const GroupOptions& options = {}, const MpiOptions& mpi = {});

// Shared memory inside a host, UCX between hosts (moedist/ucx.h), with MPI used only to bootstrap it
// (hosts as detected here, the job id, the allgather of the UCX addresses): UCX's data path under an
// mpirun job, e.g. to compare it with MPI's. Raises Unsupported if moedist was built without UCX.
std::shared_ptr<Transport> make_ucx_group(MPI_Comm comm, const GroupOptions& options = {}, const MpiOptions& mpi = {});

// Hosts of a group made by make_mpi_group / make_hybrid_group / make_ucx_group(MPI_Comm): host index (0, 1, ... in order of the
// hosts' lowest ranks) of every rank. Empty for other transports.
std::vector<int> mpi_hosts(const Transport& transport);

}  // namespace moedist
