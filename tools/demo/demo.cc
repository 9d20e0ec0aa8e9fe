// `moedist demo`: one whole MoE layer (router, dispatch_v2, SwiGLU experts, combine_v2) on ranks that
// are processes over shared memory (default; make_shm_group: one host), processes of an MPI job on one
// host or several (mpirun, --transport mpi|hybrid; make_mpi_world_group) or threads of this process
// (--threads; make_thread_group), checked two ways:
//   1. numerically, against the same layer computed densely in one process in fp32 (every token times
//      every expert it picked, no communication at all);
//   2. bit for bit, against moedist::reference run on the very arguments the ranks passed.
// Every model parameter comes from a seeded generator stream keyed by (seed, what, id), so the
// dense computation can regenerate any expert's weights without talking to the rank that hosts it,
// and a rank process can rebuild every other rank's arguments for the reference.
//
// The parts, one file each (tools/demo/):
//   options      the command line: DemoOptions, parsing, cross-option checks, help
//   rng.h        seeded random streams: every weight and input from (seed, what, id)
//   layer        sizes, roles, the router's and the const experts' parameters
//   router       gating: softmax, top-k, renormalised weights
//   experts      SwiGLU FFN experts, their weights, the rows each one gets
//   rank         one rank's state and its phases (gating, dispatch, experts, combine)
//   checks       the dense fp32 layer and the bit-for-bit comparison with moedist::reference
//   summary      a rank's results, as the report needs them, and their text form between processes
//   report       what is printed, and the verdict
//   runners.h    the runners: threads (runner_threads.cc), processes (runner_processes.cc), whose
//                groups come from process_groups_shm.cc or process_groups_mpi.cc
#include "demo.h"

#include <cstdio>
#include <iostream>

#include "launch.h"
#include "moedist/group.h"
#include "options.h"
#include "report.h"
#include "runners.h"
#include "util.h"

namespace moedist::tools {

void print_demo_help(std::ostream& os) { demo::print_help(os); }

int demo_main(const std::vector<std::string>& args) {
  using namespace demo;
  DemoOptions options;
  LaunchEnv env;
  try {
    if (!parse_options(args, options)) {
      demo::print_help(std::cout);
      return 0;
    }
    env = launch_env();
    if (options.threads && env.found && env.world_size > 1)
      throw UsageError(cat("--threads runs every rank in this one process, but it was started as rank ", env.rank, " of ", env.world_size,
                           " by the ", env.launcher, " launcher (leave out --threads, or start it directly)"));
    if (rounds_mode(options)) {
      const std::string what = options.victim >= 0 ? cat(options.victim_stops ? "--stop " : "--kill ", options.victim, "@", options.victim_phase)
                                                   : cat("--rounds ", options.rounds);
      if (options.threads)
        throw UsageError(cat(what, " needs rank processes: threads of one process cannot be killed or stopped one by one, and the "
                             "rounds run only in process mode (leave out --threads)"));
      if (options.transport != "shm")
        throw UsageError(cat(what, " works only with --transport shm: a rank that dies ends an MPI job (mpirun kills the "
                             "others; docs/design.md, Failover), not with --transport ", options.transport));
      if (env.found && options.report_dir.empty())
        throw UsageError(cat(what, " needs the demo started directly (moedist demo ...), not by the ", env.launcher,
                             " launcher: the demo's parent reports, so that any rank, rank 0 too, may fail"));
    }
    if (!options.report_dir.empty() && (options.threads || !env.found))
      throw UsageError("--report-dir is internal: the demo sets it for the rank processes it starts");
    if (options.transport != "shm") {
      const std::string option = cat("--transport ", options.transport);
      if (options.threads)
        throw UsageError(cat(option, " is for rank processes started by mpirun, --threads runs the ranks as threads of this process "
                             "(leave out one of them)"));
      const std::string started = env.found ? cat("was started by the ", env.launcher, " launcher") : "was started directly";
      if (env.launcher != "openmpi")
        throw UsageError(cat(option, " needs rank processes started by mpirun (mpirun -np N moedist demo ", option,
                             " ...), but this process ", started, ": here only --transport shm (the default) is allowed"));
      if (!mpi_available())
        throw UsageError(cat(option, ": this build of moedist has no MPI (install an MPI library, e.g. libopenmpi-dev, and rebuild): only "
                             "--transport shm (the default) is allowed"));
    }
  } catch (const UsageError& e) {
    std::fprintf(stderr, "moedist demo: %s\n(see 'moedist demo --help')\n", e.what());
    return 2;
  } catch (const std::exception& e) {  // launch_env(): malformed launcher variables
    std::fprintf(stderr, "moedist demo: %s\n", e.what());
    return 2;
  }
  try {
    if (options.threads) return run_threads(options);
    if (env.found) return run_rank_process(options, env);
    return run_parent(options, args);
  } catch (const std::exception& e) {  // moedist::Error from the reference, or out of memory
    std::printf("error: %s\n", e.what());
    return fail("error");
  }
}

}  // namespace moedist::tools
