// The demo's command-line options: what they hold, how they are parsed and checked, and the help text.
#pragma once

#include <cstdint>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "moedist/tensor.h"

namespace moedist::tools::demo {

struct DemoOptions {
  int ranks = 4;          // EP world size W; with --tp 2 there are 2*W ranks (processes or threads)
  int tokens = 64;        // BS per rank
  int hidden = 1024;      // H
  int topk = 4;           // K
  int experts = 16;       // E = moe_expert_num
  int ffn = 64;           // F, the experts' intermediate size
  DType dtype = DType::kBFloat16;
  int quant = 0;          // dispatch quant_mode (0 or 2)
  int comm_quant = 0;     // combine comm_quant_mode (0 or 2)
  int shared_ranks = 0;   // shared_expert_rank_num; they host one shared expert
  int tp = 0;             // tp_world_size (0 or 2)
  int zero = 0;           // zero_expert_num
  int copy = 0;           // copy_expert_num
  int constant = 0;       // const_expert_num
  int elastic = 0;        // ranks removed by elastic scale-down (the highest ones)
  bool mask = false;      // 1-D x_active_mask with the last BS/4 tokens inactive
  uint64_t seed = 1;
  int timeout_ms = 20000;
  int rounds = 0;         // rounds of the layer, each with its own tokens; 0: the default (1, or 6 with --kill / --stop)
  int kill_round = 0;     // the round (1-based) the victim fails in; 0: the default (2)
  int victim = -1;        // --kill / --stop RANK@PHASE: the EP rank that fails, -1: none
  std::string victim_phase;   // "dispatch" or "combine"
  bool victim_stops = false;  // --stop (SIGSTOP) instead of --kill (SIGKILL)
  bool threads = false;       // ranks are threads of this process instead of processes
  std::string transport = "shm";  // process mode: "shm", or under mpirun "mpi" / "hybrid"
  std::string report_dir;     // internal: set for the rank processes the demo starts
};

// The rounds the run makes, and the round the victim fails in.
inline int round_count(const DemoOptions& o) { return o.rounds > 0 ? o.rounds : (o.victim >= 0 ? 6 : 1); }
inline int victim_round(const DemoOptions& o) { return o.kill_round > 0 ? o.kill_round : 2; }
// True when the run has several rounds or a rank that fails (--rounds, --kill, --stop): runner_rounds.cc.
inline bool rounds_mode(const DemoOptions& o) { return round_count(o) > 1 || o.victim >= 0; }

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Parses the arguments after "demo" and checks the options against each other (UsageError on a bad
// one). Returns false when help was asked for.
bool parse_options(const std::vector<std::string>& args, DemoOptions& o);

// The help text of `moedist demo`.
void print_help(std::ostream& os);

}  // namespace moedist::tools::demo
