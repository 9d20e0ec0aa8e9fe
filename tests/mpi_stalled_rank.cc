// A rank of an MPI job that stops (SIGSTOP) before a call, run under mpirun by
// tests/mpi_stalled_rank.sh, which checks that the job ends on its own, soon, with these lines:
//   mpi_stalled_rank <world|own> <stopped ranks>   (the last <stopped ranks> ranks stop themselves)
// world: the group comes from make_mpi_world_group (moedist initializes MPI and finalizes it at
// exit); own: the program calls MPI_Init, make_mpi_group and MPI_Finalize itself.
// Every rank prints "pid <r> <pid>" first (the script kills what is left at the end). The stopped
// ranks raise(SIGSTOP) before their second dispatch; rank 0 starts it 1 s after the others, so that
// the others give up before it. Each running rank must get Timeout naming exactly the stopped ranks
// ("rank 2", or "ranks 2 and 3") and prints "CHECK rank <r>: ok" or "CHECK rank <r>: FAIL <why>".
// Then it leaves main (world) or calls MPI_Finalize (own): MPI_Finalize cannot complete with stopped
// ranks, and moedist must end the job (MPI_Abort) instead of hanging.
//   mpi_stalled_rank killed 1   (run by tests/mpi_killed_rank.sh): the last rank dies (SIGKILL) before
// its second dispatch; a job across hosts cannot survive that (no fault-tolerant MPI): it must end
// promptly with the rank named. Every rank first checks that recover_group says so (Unsupported).
#include "moedist/mpi.h"  // <mpi.h>, C API only
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "moedist/moedist.h"

using namespace moedist;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: mpi_stalled_rank <world|own> <stopped ranks>\n");
    return 2;
  }
  const bool own = std::strcmp(argv[1], "own") == 0;
  const bool killed = std::strcmp(argv[1], "killed") == 0;
  const int nstop = std::atoi(argv[2]);
  GroupOptions opt;
  opt.timeout = std::chrono::milliseconds(1500);
  std::shared_ptr<Transport> t;
  if (own) {
    MPI_Init(&argc, &argv);
    t = make_mpi_group(MPI_COMM_WORLD, opt);
  } else {
    t = make_mpi_world_group(opt, "mpi");
  }
  const int r = t->rank(), W = t->world_size();
  std::printf("pid %d %d\n", r, static_cast<int>(getpid()));
  std::fflush(stdout);
  register_group("ep", {t});
  const int BS = 4, H = 64, K = 2, E = 2 * W;
  std::vector<uint16_t> x(static_cast<size_t>(BS * H), 0x3f80);
  std::vector<int32_t> ids;
  for (int i = 0; i < BS; ++i)
    for (int k = 0; k < K; ++k) ids.push_back((i + r + k) % E);
  DispatchArgs a;
  a.x = TensorView(x.data(), DType::kBFloat16, {BS, H});
  a.expert_ids = TensorView(ids.data(), DType::kInt32, {BS, K});
  a.group_ep = "ep";
  a.ep_world_size = W;
  a.ep_rank_id = r;
  a.moe_expert_num = E;
  dispatch_v2(a);  // one call that works: every rank is there
  if (killed) {
    try {
      recover_group("ep", r);
      std::printf("CHECK rank %d: FAIL recover_group did not refuse\n", r);
    } catch (const Unsupported& e) {
      std::printf("CHECK rank %d: ok (%s)\n", r, e.what());
    }
    std::fflush(stdout);
    if (r == W - 1) raise(SIGKILL);
    try {
      dispatch_v2(a);
      std::printf("rank %d: FAIL dispatch_v2 succeeded without rank %d\n", r, W - 1);
    } catch (const std::exception& e) {
      std::printf("rank %d: %s\n", r, e.what());
    }
    std::fflush(stdout);
    return 1;
  }
  const bool stops = r >= W - nstop;
  if (stops) raise(SIGSTOP);
  if (r == 0) std::this_thread::sleep_for(std::chrono::seconds(1));
  std::string want = nstop == 1 ? "rank " + std::to_string(W - 1) : "ranks ";
  for (int s = W - nstop; nstop > 1 && s < W; ++s) want += std::to_string(s) + (s + 2 < W ? ", " : s + 2 == W ? " and " : "");
  std::string verdict;
  try {
    dispatch_v2(a);
    verdict = stops ? "ok" : "FAIL dispatch_v2 succeeded with stopped ranks";
  } catch (const Timeout& e) {
    const std::string m = e.what();
    std::printf("rank %d: Timeout: %s\n", r, m.c_str());
    verdict = m.find(want) != std::string::npos ? "ok" : "FAIL the Timeout does not name " + want;
    for (int p = 0; p < W - nstop && verdict == "ok"; ++p)
      if (m.find("waiting for rank " + std::to_string(p) + " ") != std::string::npos) verdict = "FAIL the Timeout blames running rank " + std::to_string(p);
  } catch (const std::exception& e) {
    verdict = std::string("FAIL not a Timeout: ") + e.what();
  }
  if (!stops) std::printf("CHECK rank %d: %s\n", r, verdict.c_str());
  std::fflush(stdout);
  unregister_group("ep");
  t.reset();
  if (own) MPI_Finalize();
  return 0;
}
