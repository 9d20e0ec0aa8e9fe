// Ranks on several hosts in a job that no mpirun started (torchrun, a scheduler of its own): shared
// memory among the ranks of one host, UCX between hosts. UCX (the Unified Communication X library,
// Debian: libucx0) reaches InfiniBand, RoCE and other RDMA NICs as well as plain TCP; which of them it
// uses is UCX's choice, steered by its environment (UCX_TLS, UCX_NET_DEVICES). Available when moedist
// was built with UCX (CMake found it through pkg-config; moedist_HAVE_UCX after find_package(moedist)).
//
// The job bootstraps the group itself: every rank calls make_ucx_group with the same job id and
// host layout and an `allgather` of its own (the Python package passes one over the process group's
// gloo backend; a C++ program can use its launcher's key-value store). moedist calls allgather once,
// with this rank's UCX worker address (a few hundred bytes); it must return every rank's bytes, in rank
// order. The group then checks that every rank on another host answers (within the group's timeout)
// before it returns.
//
// Errors: a rank whose connection breaks (it died, its host went away) makes its peers' calls raise
// TransportError naming it; one that stops answering, Timeout. As with the MPI groups, the group is out
// of step after such a failure: make a new one. recover_group is not supported across hosts.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moedist/group.h"

namespace moedist {

struct UcxBootstrap {
  int rank = 0;
  int world_size = 0;
  // Every rank's host: ranks with equal values share memory (the same machine and network namespace);
  // hosts are numbered by their lowest rank whatever values are passed.
  std::vector<int> host_of;
  // The same on every rank, unique to this group (it names the hosts' shared-memory groups).
  std::string job;
  // Collective: every rank passes its bytes and gets every rank's, in rank order.
  std::function<std::vector<std::string>(const std::string&)> allgather;
};

// The endpoint of this rank. comm_alg "hierarchy" takes its servers from options.ranks_per_server, else
// from the hosts when they hold consecutive blocks of equal size (the last may be smaller), as torchrun
// numbers ranks node by node; otherwise it raises InvalidArgument (pass ranks_per_server). Raises
// Unsupported if moedist was built without UCX.
std::shared_ptr<Transport> make_ucx_group(const UcxBootstrap& boot, const GroupOptions& options = {});
// True if this build of moedist has the UCX transport.
bool ucx_available();

}  // namespace moedist
