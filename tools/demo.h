// `moedist demo`: a whole MoE layer on in-process ranks, checked against a dense computation and
// against moedist::reference.
#pragma once

#include <ostream>
#include <string>
#include <vector>

namespace moedist::tools {

// Runs the demo with the arguments after "demo". Returns the exit code: 0 PASS, 1 FAIL, 2 usage error.
int demo_main(const std::vector<std::string>& args);

// The demo's options, for `moedist demo --help` and `moedist help demo`.
void print_demo_help(std::ostream& os);

}  // namespace moedist::tools
