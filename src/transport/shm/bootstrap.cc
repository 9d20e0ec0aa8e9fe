// Finding the job a process belongs to, from the variables its launcher set.
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "moedist/error.h"
#include "moedist/group.h"
#include "transport/shm/shm_transport.h"

namespace moedist {

namespace {
const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}
int env_int(const char* name, int fallback) {
  const char* v = env(name);
  if (!v) return fallback;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  if (end == v || *end != 0) throw InvalidArgument(detail::str_cat("environment ", name, "=\"", v, "\" is not an integer"));
  return static_cast<int>(x);
}
}  // namespace

LaunchEnv launch_env() {
  LaunchEnv e;
  if (env("MOEDIST_RANK")) {
    e.launcher = "moedist";
    e.rank = env_int("MOEDIST_RANK", 0);
    e.world_size = env_int("MOEDIST_WORLD_SIZE", 1);
    e.local_rank = env_int("MOEDIST_LOCAL_RANK", e.rank);
    e.job = env("MOEDIST_JOB_ID") ? env("MOEDIST_JOB_ID") : "";
  } else if (env("OMPI_COMM_WORLD_RANK")) {
    e.launcher = "openmpi";
    e.rank = env_int("OMPI_COMM_WORLD_RANK", 0);
    e.world_size = env_int("OMPI_COMM_WORLD_SIZE", 1);
    e.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", e.rank);
    const char* ns = env("PMIX_NAMESPACE") ? env("PMIX_NAMESPACE") : env("OMPI_MCA_ess_base_jobid");
    e.job = ns ? ns : "";
  } else if (env("RANK") && env("WORLD_SIZE")) {
    e.launcher = "torchrun";
    e.rank = env_int("RANK", 0);
    e.world_size = env_int("WORLD_SIZE", 1);
    e.local_rank = env_int("LOCAL_RANK", e.rank);
    // torchrun's run id is "none" unless --rdzv-id is given: the same for every job. The rendezvous
    // store's address is held by one running job only, and the restart count tells restarts apart.
    const char* run_id = env("TORCHELASTIC_RUN_ID");
    if (run_id && std::string(run_id) != "none")
      e.job = run_id;
    else if (env("MASTER_PORT"))
      e.job = std::string("torchrun_") + (env("MASTER_ADDR") ? env("MASTER_ADDR") : "local") + "_" + env("MASTER_PORT");
    if (!e.job.empty() && env("TORCHELASTIC_RESTART_COUNT")) e.job += std::string("_r") + env("TORCHELASTIC_RESTART_COUNT");
  } else {
    return e;
  }
  if (env("MOEDIST_JOB_ID")) e.job = env("MOEDIST_JOB_ID");
  e.found = true;
  if (e.world_size < 1) throw InvalidArgument(detail::str_cat("launcher world size ", e.world_size, " (must be >= 1)"));
  if (e.rank < 0 || e.rank >= e.world_size)
    throw InvalidArgument(detail::str_cat("launcher rank ", e.rank, " out of range (must be in [0, ", e.world_size, "))"));
  return e;
}

std::shared_ptr<Transport> make_shm_group(const std::string& group, int world_size, int rank, const GroupOptions& options,
                                          const std::string& job) {
  if (group.empty() || group.size() >= 128)
    throw InvalidArgument(detail::str_cat("make_shm_group: group=\"", group, "\" has length ", group.size(), " (must be in [1, 128))"));
  if (world_size < 1) throw InvalidArgument(detail::str_cat("make_shm_group: world_size=", world_size, " (must be >= 1)"));
  if (rank < 0 || rank >= world_size)
    throw InvalidArgument(detail::str_cat("make_shm_group: rank=", rank, " out of range (must be in [0, ", world_size, "))"));
  if (options.ranks_per_server < 0)
    throw InvalidArgument(detail::str_cat("make_shm_group: ranks_per_server=", options.ranks_per_server, " (must be >= 0)"));
  std::string j = job;
  if (j.empty()) j = launch_env().job;
  if (j.empty())
    throw InvalidArgument(detail::str_cat("make_shm_group(\"", group, "\"): no job id (pass one, start the ranks with `moedist launch`, ",
                                          "or set MOEDIST_JOB_ID to the same value in every rank)"));
  return std::make_shared<transport::ShmTransport>(j, group, world_size, rank, options);
}

}  // namespace moedist
