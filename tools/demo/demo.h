// `moedist demo`: a whole MoE layer on ranks that are processes (over shared memory by default; under
// mpirun also over MPI, on several hosts, with --transport mpi|hybrid) or threads of this process
// (--threads), checked against a dense computation and against moedist::reference.
#pragma once

#include <ostream>
#include <string>
#include <vector>

namespace moedist::tools {

// Runs the demo with the arguments after "demo". Returns the exit code: 0 PASS, 1 FAIL, 2 usage error.
// Started directly, it starts the rank processes (copies of this program, through launch_main) and
// reports; started by a launcher (moedist::launch_env().found), this process is one rank of the demo,
// and rank 0 gathers the others' results over a group of the transport and reports.
int demo_main(const std::vector<std::string>& args);

// The demo's options, for `moedist demo --help` and `moedist help demo`.
void print_demo_help(std::ostream& os);

}  // namespace moedist::tools
