// Test harness: builds every rank's inputs for a case, runs the ops on in-process ranks (threads) and
// the reference in one process, and compares bit for bit.
#pragma once

#include <functional>
#include <memory>
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
  bool split = false;    // call *_setup then *_teardown instead of dispatch_v2 / combine_v2
  bool add_rms_norm = false;  // combine with combine_add_rms_norm (residual add + RMSNorm)
};

std::string case_name(const Case& c);
inline void PrintTo(const Case& c, std::ostream* os) { *os << case_name(c); }

// Runs `fn(i)` on n threads; rethrows the first exception (by rank order).
void run_ranks(int n, const std::function<void(int)>& fn);

struct RankData;

// Every calling rank's inputs, arguments and reference outputs of one case, built deterministically
// from the case alone, so separate processes build the same data. Ranks are listed TP index major,
// then active EP rank.
struct Prepared {
  Case c;
  std::string prefix;  // group names: prefix + "ep<q>" / prefix + "tp<r>"
  std::vector<RankData> ranks;
  std::vector<DispatchArgs> dargs;
  std::vector<DispatchResult> ref;
  std::vector<CombineArgs> cargs;  // expand_x = expert stand-in applied to the reference's rows
  std::vector<Tensor> cref;
  // add_rms_norm cases: residual_x (BS, 1, H) per rank and gamma (H,), the arguments and the reference.
  std::vector<Tensor> norm_inputs;
  std::vector<CombineAddRmsNormArgs> nargs;
  std::vector<CombineAddRmsNormResult> nref;
  std::string ep_group(int q) const { return prefix + "ep" + std::to_string(q); }
  std::string tp_group(int r) const { return prefix + "tp" + std::to_string(r); }
  ~Prepared();
};
std::unique_ptr<Prepared> prepare(const Case& c, const std::string& prefix);
int rank_of(const Prepared& p, int index, int* tp_rank);
// The elastic_info calling rank `index` passes (empty without elastic).
std::vector<int32_t> elastic_info_of(const Prepared& p, int index);  // EP rank (and TP index) of calling rank `index`
// "" on a bit-exact match with the reference, else the first difference.
std::string check_dispatch(const Prepared& p, int index, const DispatchResult& got);
std::string check_combine(const Prepared& p, int index, const Tensor& got);
std::string check_add_rms_norm(const Prepared& p, int index, const CombineAddRmsNormResult& got);

// Runs the case on in-process ranks (threads).
std::string run_case(const Case& c);
// Runs the case on processes over shared memory (forked from this one, one per rank).
std::string run_case_shm(const Case& c);

// What one calling rank (its index in Prepared::ranks) does in a case instead of one checked dispatch
// and combine; returns "" when it passed, else what went wrong.
using RankBody = std::function<std::string(const Prepared&, int)>;
// The case's groups, as run_case / run_case_shm make them, with `body` on every calling rank.
std::string run_body(const Case& c, const RankBody& body);
std::string run_body_shm(const Case& c, const RankBody& body);
// The same on processes (forked, one per rank) whose EP group make_ep(W, rank, options, job) makes;
// TP groups are made over shared memory. `job` is unique to the case and the TP index.
using MakeEp = std::function<std::shared_ptr<Transport>(int, int, const GroupOptions&, const std::string&)>;
std::string run_body_procs(const Case& c, const MakeEp& make_ep, const RankBody& body);
std::string run_case_procs(const Case& c, const MakeEp& make_ep);

// performance_info on calling rank i: two rounds in which EP rank `slow` sleeps `sleep_ms` before
// dispatch; every output is checked against the reference bit for bit, and the wait times must
// single out the slow rank (generous lower bounds only), accumulate, leave the rank's own entry alone
// and stay untouched by a call without performance_info. A complaint about the times alone starts with
// "timing: " and comes after the rank made all its calls (its peers are not left waiting).
std::string check_waits_rank(const Prepared& P, int i, int slow, int sleep_ms);
// Runs `run` until it returns anything but a "timing: " complaint, at most 3 times: on a loaded machine
// any rank can be delayed for longer than the slow rank sleeps, but hardly three times running.
std::string retry_timing(const std::function<std::string()>& run);
// True if every line of `result` is such a complaint.
bool only_timing(const std::string& result);

// Forks n processes running child(i); returns the first non-empty child message, an abnormal end, or
// a timeout (all children killed). Used by the process transports' tests.
std::string run_processes(int n, const std::function<std::string(int)>& child, int timeout_s);
// The same, where process i is to end by signal killed_by[i] (0: exit normally; missing: 0).
std::string run_processes(int n, const std::function<std::string(int)>& child, int timeout_s, const std::vector<int>& killed_by);
// Names in /dev/shm left by job `job`.
std::vector<std::string> shm_leftovers(const std::string& job);

}  // namespace moedist::test
