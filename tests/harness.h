// Test harness: builds every rank's inputs for a case, runs the ops on in-process ranks (threads) and
// the reference in one process, and compares bit for bit.
#pragma once

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "moedist/moedist.h"

namespace moedist::test {

struct Case {
  std::string name;
  int W = 2;          // ep_world_size (as created)
  int BS = 4;         // tokens per rank (max when ragged)
  int H = 32;
  int K = 2;
  int E = 4;          // moe_expert_num
  DType dtype = DType::kBFloat16;
  int quant = 0;      // quant_mode
  bool smooth = false;  // smooth scales with quant_mode 2
  int Sr = 0;         // shared_expert_rank_num
  int shared_num = 1; // shared_expert_num
  int tp = 0;         // tp_world_size
  int mask = 0;       // 0 none, 1 (BS,), 2 (BS, K)
  int Z = 0, C = 0, Q = 0;
  std::vector<int> removed;  // elastic: ranks removed (elastic_info given when non-empty)
  int Sr_after = -1;         // elastic: shared ranks after scale-down (-1: unchanged)
  bool ragged = false;       // different BS per rank, global_bs = BS * W
  int comm_quant = 0;
  std::string alg = "";
  int ranks_per_server = 0;
  bool shared_x = false;
  int etn_type = 1;
  bool strided = false;  // pass x / expert_ids / expand_x as non-contiguous views
};

std::string case_name(const Case& c);
inline void PrintTo(const Case& c, std::ostream* os) { *os << case_name(c); }

// Runs `fn(i)` on n threads; rethrows the first exception (by rank order).
void run_ranks(int n, const std::function<void(int)>& fn);

// Runs the case: dispatch and combine on threads versus the reference. Returns a non-empty string
// describing the first difference, or "" on a bit-exact match.
std::string run_case(const Case& c);

}  // namespace moedist::test
