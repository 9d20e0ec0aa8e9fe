// Named communicators. As on Ascend, the ops take group names (group_ep, group_tp); a program creates
// communicators over a transport and registers them under a name. The ops resolve (name, rank id).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "moedist/transport.h"

namespace moedist {

struct GroupOptions {
  // Deadline for every wait inside one collective. 0: take MOEDIST_TIMEOUT_MS or 60 s.
  std::chrono::milliseconds timeout{0};
  // Ranks per server for comm_alg "hierarchy"; 0: the transport's default (all ranks on one server).
  int ranks_per_server = 0;
};

// Waiting for peers can be cut short. While a call waits (for a peer to arrive or to finish writing),
// moedist asks about every 20 ms whether to give up: it calls `check` (if set) and looks for a SIGINT or
// SIGTERM that is pending because the program blocks it (e.g. to read it from a signalfd). Either ends
// the call on this rank with moedist::Interrupted; its peers then fail within about 20 ms, naming it,
// and the group can no longer be used. A SIGINT with the default action ends the process, which its
// peers notice as a dead rank just as fast. The Python package installs a check that runs Python's
// signal handlers, so Ctrl-C raises KeyboardInterrupt within about 20 ms. `check` must be cheap and
// thread-safe; nullptr removes it.
using InterruptCheck = bool (*)();
void set_interrupt_check(InterruptCheck check);

// Registers the endpoints of a communicator under `name`. For in-process ranks (threads) all
// endpoints are registered at once; a process of a multi-process job registers its own endpoint.
// Throws InvalidArgument if the name is empty, 128 characters or longer, or already registered.
void register_group(const std::string& name, std::vector<std::shared_ptr<Transport>> endpoints);
void unregister_group(const std::string& name);
// The endpoint of `name` for `rank`; InvalidArgument naming what is registered if there is none.
std::shared_ptr<Transport> resolve_group(const std::string& name, int64_t rank, const char* op = "");
bool group_registered(const std::string& name);

// In-process communicator: `world_size` ranks that are threads of this process.
std::vector<std::shared_ptr<Transport>> make_thread_group(int world_size, const GroupOptions& options = {});

// Processes on one host over POSIX shared memory: every rank of the group calls this with the same
// `group` name and job id; it returns when all `world_size` ranks have joined (or raises Timeout
// naming the rank that did not). `job` "" takes the launcher's (see launch_env()). Two jobs, or two
// groups of one job, never share a segment.
std::shared_ptr<Transport> make_shm_group(const std::string& group, int world_size, int rank, const GroupOptions& options = {},
                                          const std::string& job = "");

// Ranks that are the processes of an MPI job (started by mpirun), without the program touching MPI:
// collective over MPI_COMM_WORLD, which moedist initializes if the program has not (MPI_Init_thread,
// and MPI_Finalize at exit). Ranks passing the same `color` form one group, ordered by `key` (-1: the
// world rank), as MPI_Comm_split; a rank passing color < 0 takes part in the split but joins no group
// (nullptr is returned). transport "mpi": MPI between all ranks; "hybrid": shared memory
// between the ranks of one host, MPI between hosts; "ucx": the same with UCX between hosts (MPI only
// bootstraps it: moedist/mpi.h, make_ucx_group) (see moedist/mpi.h for hosts, make_mpi_group and
// make_hybrid_group on a communicator of the program's own). Throws Unsupported if moedist was built
// without MPI.
std::shared_ptr<Transport> make_mpi_world_group(const GroupOptions& options = {}, const std::string& transport = "mpi", int color = 0,
                                                int key = -1);
// True if this build of moedist has the MPI transports.
bool mpi_available();

// Where this process stands in a job started by `moedist launch` (MOEDIST_RANK, MOEDIST_WORLD_SIZE,
// MOEDIST_LOCAL_RANK, MOEDIST_JOB_ID), torchrun (RANK, WORLD_SIZE, LOCAL_RANK, TORCHELASTIC_RUN_ID or
// MASTER_ADDR:MASTER_PORT) or Open MPI's mpirun (OMPI_COMM_WORLD_*, the job's namespace).
struct LaunchEnv {
  bool found = false;  // false: no launcher variables; a single rank 0 of 1
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string job;       // unique per job on this host
  std::string launcher;  // "moedist", "torchrun", "openmpi" or ""
};
LaunchEnv launch_env();

}  // namespace moedist
