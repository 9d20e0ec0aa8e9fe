// The runners: how the ranks are started and where their results meet.
//   runner_threads.cc    every rank a thread of this process, over thread groups (--threads)
//   runner_processes.cc  every rank a process: started by the demo itself (through `moedist launch`), or
//                        by an outside launcher (moedist launch, torchrun, mpirun); its groups are made
//                        by process_groups_shm.cc (shared memory, one host) or process_groups_mpi.cc
//                        (--transport mpi|hybrid under mpirun)
// Each runner hands run_rank (rank.h) the hook it calls before every phase.
#pragma once

#include <string>
#include <vector>

#include "launch.h"
#include "layer.h"
#include "options.h"

namespace moedist::tools::demo {

// Thread mode: runs every rank as a thread, checks all of them and reports. Returns the exit code.
int run_threads(const DemoOptions& o);

// Started directly in process mode: starts the rank processes, each with `args` plus --report-dir, then
// reads their results and reports. Returns the exit code.
int run_parent(const DemoOptions& o, const std::vector<std::string>& args);

// This process is one rank of a job started by a launcher (`env`). Returns this process's exit code.
int run_rank_process(const DemoOptions& o, const LaunchEnv& env);

struct RankSummary;

// Rounds mode in rank process p started by the demo's parent: runs the rounds (the victim fails in its
// round, the survivors recover and go on), then checks every round. Never throws: a failure is the
// summary's error.
void run_rounds_rank(const Layer& l, int p, RankSummary& s);

// With --stop, after rank p wrote its result: the lowest surviving rank waits for every survivor's result,
// then continues the stopped rank (SIGCONT), which then finds out that it was declared failed.
void continue_stopped_rank(const Layer& l, int p);

}  // namespace moedist::tools::demo
