// The MPI transports under mpirun (one process per rank; run with -np 4 or more, oversubscribed is
// fine). Every test is collective over MPI_COMM_WORLD: each rank checks its own outputs and the
// verdict is agreed with MPI_Allreduce, so every rank reports the same pass or fail (only rank 0
// prints). A conformance case that needs more ranks than the job has is skipped, naming why.
//   Mpi/ConformanceMpi.*        the conformance suite (tests/cases.h) over make_mpi_group
//   Hybrid/ConformanceHybrid.*  the same over make_hybrid_group (shared memory inside a host)
//   MpiErrors.*                 a rank that rejects its input, a rank that never calls, MPI errors
//   MpiWorldGroup.*             make_mpi_world_group (no MPI calls in the program)
//   MpiRounds.*                 many calls in a row; large messages (several blocks per peer)
//   MpiBytes.*                  2 hosts x 2 ranks: hierarchy sends fewer bytes across hosts than fullmesh
//   MpiWaits.*                  performance_info names a slow rank (MPI and hybrid)
// Hosts: detected (MPI_COMM_TYPE_SHARED and network namespace); MOEDIST_RANKS_PER_HOST overrides.
#include <gtest/gtest.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "cases.h"
#include "harness.h"
#include "moedist/moedist.h"
#include "moedist/mpi.h"
#include "moedist/reference.h"
#include "transport/mpi/mpi_wire.h"

namespace moedist::test {
namespace {

int g_rank = 0, g_world = 1;
int g_counter = 0;

// The failing ranks' messages (the same string on every rank), or "" if every rank passed.
std::string agree(const std::string& mine) {
  const int len = static_cast<int>(mine.size());
  std::vector<int> lens(static_cast<size_t>(g_world)), displs(static_cast<size_t>(g_world), 0);
  MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, MPI_COMM_WORLD);
  int total = 0;
  for (int r = 0; r < g_world; ++r) {
    displs[static_cast<size_t>(r)] = total;
    total += lens[static_cast<size_t>(r)];
  }
  if (total == 0) return "";
  std::string all(static_cast<size_t>(total), ' ');
  MPI_Allgatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR, MPI_COMM_WORLD);
  std::string out;
  int shown = 0;
  for (int r = 0; r < g_world && shown < 4; ++r)
    if (lens[static_cast<size_t>(r)]) {
      out += (shown++ ? "\n" : "") + std::string("rank ") + std::to_string(r) + ": " +
             all.substr(static_cast<size_t>(displs[static_cast<size_t>(r)]), static_cast<size_t>(lens[static_cast<size_t>(r)]));
    }
  return out;
}

uint64_t sum_over_ranks(uint64_t v, MPI_Comm comm = MPI_COMM_WORLD) {
  uint64_t s = 0;
  MPI_Allreduce(&v, &s, 1, MPI_UINT64_T, MPI_SUM, comm);
  return s;
}

enum class Kind { kMpi, kHybrid };

std::shared_ptr<Transport> make(Kind kind, MPI_Comm comm, const GroupOptions& opt, const MpiOptions& mpi = {}) {
  return kind == Kind::kMpi ? make_mpi_group(comm, opt, mpi) : make_hybrid_group(comm, opt, mpi);
}

// The first `n` ranks of the job in a communicator of their own (MPI_COMM_NULL on the others).
MPI_Comm first_ranks(int n) {
  MPI_Comm sub = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, g_rank < n ? 0 : MPI_UNDEFINED, g_rank, &sub);
  return sub;
}

struct Registered {
  std::vector<std::string> names;
  ~Registered() {
    for (auto& n : names) unregister_group(n);
  }
  void add(const std::string& n, std::shared_ptr<Transport> t) {
    register_group(n, {std::move(t)});
    names.push_back(n);
  }
};

// Runs a conformance case on the first tp*W ranks: EP group per TP index, TP group per EP rank.
std::string run_case_mpi(const Case& c, Kind kind) {
  const int tp = c.tp == 2 ? 2 : 1;
  const int need = tp * c.W;
  const std::string prefix = "m" + std::to_string(g_counter++) + "_";
  MPI_Comm sub = first_ranks(need);
  std::string msg;
  if (sub != MPI_COMM_NULL) {
    try {
      Registered reg;
      const int q = g_rank / c.W, r = g_rank % c.W;
      GroupOptions opt;
      opt.timeout = std::chrono::milliseconds(30000);
      // The reference's servers: ranks_per_server, 0 meaning one server of all ranks.
      if (c.alg == "hierarchy") opt.ranks_per_server = c.ranks_per_server ? c.ranks_per_server : c.W;
      MPI_Comm ep = MPI_COMM_NULL, tpc = MPI_COMM_NULL;
      MPI_Comm_split(sub, q, r, &ep);
      reg.add(prefix + "ep" + std::to_string(q), make(kind, ep, opt));
      MPI_Comm_free(&ep);
      if (c.tp) {
        MPI_Comm_split(sub, r, q, &tpc);
        GroupOptions topt = opt;
        topt.ranks_per_server = 0;
        reg.add(prefix + "tp" + std::to_string(r), make(kind, tpc, topt));
        MPI_Comm_free(&tpc);
      }
      auto P = prepare(c, prefix);
      for (size_t i = 0; i < P->dargs.size(); ++i) {
        int tq;
        if (rank_of(*P, static_cast<int>(i), &tq) != r || tq != q) continue;
        msg = check_dispatch(*P, static_cast<int>(i), dispatch_v2(P->dargs[i]));
        if (msg.empty()) msg = check_combine(*P, static_cast<int>(i), combine_v2(P->cargs[i]));
        break;
      }
      // A rank removed by elastic_info does not call.
    } catch (const std::exception& e) {
      msg = std::string("exception: ") + e.what();
    }
    MPI_Comm_free(&sub);
  }
  return agree(msg);
}

#define SKIP_UNLESS_RANKS(n)                                                                                         \
  do {                                                                                                               \
    if (g_world < (n))                                                                                               \
      GTEST_SKIP() << "needs " << (n) << " MPI ranks, the job has " << g_world << " (run it with mpirun -np " << (n) \
                   << " or more)";                                                                                   \
  } while (0)

class ConformanceMpi : public ::testing::TestWithParam<Case> {};
TEST_P(ConformanceMpi, MatchesReferenceBitForBit) {
  const Case& c = GetParam();
  SKIP_UNLESS_RANKS((c.tp == 2 ? 2 : 1) * c.W);
  EXPECT_EQ(run_case_mpi(c, Kind::kMpi), "");
}
INSTANTIATE_TEST_SUITE_P(Mpi, ConformanceMpi, ::testing::ValuesIn(cases()), [](const ::testing::TestParamInfo<Case>& info) {
  return "Mpi_" + case_name(info.param) + "_" + std::to_string(info.index);
});

class ConformanceHybrid : public ::testing::TestWithParam<Case> {};
TEST_P(ConformanceHybrid, MatchesReferenceBitForBit) {
  const Case& c = GetParam();
  SKIP_UNLESS_RANKS((c.tp == 2 ? 2 : 1) * c.W);
  EXPECT_EQ(run_case_mpi(c, Kind::kHybrid), "");
}
INSTANTIATE_TEST_SUITE_P(Hybrid, ConformanceHybrid, ::testing::ValuesIn(cases()), [](const ::testing::TestParamInfo<Case>& info) {
  return "Hybrid_" + case_name(info.param) + "_" + std::to_string(info.index);
});

Case small_case() {
  Case c;
  c.W = 4;
  c.E = 8;
  c.K = 3;
  c.BS = 8;
  c.H = 64;
  return c;
}

// performance_info over MPI and hybrid: EP rank 2 of 4 sleeps before each dispatch; every other rank's
// entry for it must grow by at least 20 ms per round and exceed its others (check_waits_rank), with the
// outputs checked against the reference in the same calls.
TEST(MpiWaits, SlowRankStandsOut) {
  SKIP_UNLESS_RANKS(4);
  for (Kind kind : {Kind::kMpi, Kind::kHybrid}) {
    Case c = small_case();
    c.name = kind == Kind::kMpi ? "waits_mpi" : "waits_hybrid";
    auto attempt = [&]() -> std::string {
      const std::string prefix = "w" + std::to_string(g_counter++) + "_";
      MPI_Comm sub = first_ranks(c.W);
      std::string msg;
      if (sub != MPI_COMM_NULL) {
        try {
          Registered reg;
          GroupOptions opt;
          opt.timeout = std::chrono::milliseconds(30000);
          reg.add(prefix + "ep0", make(kind, sub, opt));
          auto P = prepare(c, prefix);
          for (size_t i = 0; i < P->dargs.size(); ++i)
            if (rank_of(*P, static_cast<int>(i), nullptr) == g_rank) msg = check_waits_rank(*P, static_cast<int>(i), 2, 40);
        } catch (const std::exception& e) {
          msg = std::string("exception: ") + e.what();
        }
        MPI_Comm_free(&sub);
      }
      return agree(msg);  // the same verdict on every rank: all make the same number of attempts
    };
    EXPECT_EQ(retry_timing(attempt), "") << c.name;
  }
}

// `call` must raise Kind with a message containing every one of `words`.
template <typename Kind>
std::string expect_error(const std::function<void()>& call, const std::vector<std::string>& words) {
  try {
    call();
  } catch (const Kind& e) {
    const std::string m = e.what();
    for (const auto& w : words)
      if (m.find(w) == std::string::npos) return "message lacks '" + w + "': " + m;
    return "";
  } catch (const std::exception& e) {
    return std::string("wrong exception type: ") + e.what();
  }
  return "no exception";
}

// A rank that rejects its input: it raises InvalidArgument, every peer TransportError naming it and
// the reason, at once; the group stays usable (the next correct call passes).
TEST(MpiErrors, RankThatRejectsItsInputIsNamedAndTheGroupStaysUsable) {
  SKIP_UNLESS_RANKS(4);
  for (Kind kind : {Kind::kMpi, Kind::kHybrid}) {
    const Case c = small_case();
    const std::string prefix = "e" + std::to_string(g_counter++) + "_";
    MPI_Comm sub = first_ranks(c.W);
    std::string msg;
    if (sub != MPI_COMM_NULL) {
      try {
        Registered reg;
        GroupOptions opt;
        opt.timeout = std::chrono::milliseconds(30000);
        reg.add(prefix + "ep0", make(kind, sub, opt));
        auto P = prepare(c, prefix);
        const auto t0 = std::chrono::steady_clock::now();
        if (g_rank == 1) {
          DispatchArgs bad = P->dargs[1];
          bad.moe_expert_num = 7;
          msg = expect_error<InvalidArgument>([&] { (void)dispatch_v2(bad); }, {"moe_expert_num"});
        } else {
          msg = expect_error<TransportError>([&] { (void)dispatch_v2(P->dargs[static_cast<size_t>(g_rank)]); }, {"rank 1", "moe_expert_num"});
        }
        if (msg.empty() && std::chrono::steady_clock::now() - t0 > std::chrono::seconds(10)) msg = "the failure took more than 10 s";
        if (msg.empty()) msg = check_dispatch(*P, g_rank, dispatch_v2(P->dargs[static_cast<size_t>(g_rank)]));
        if (msg.empty()) msg = check_combine(*P, g_rank, combine_v2(P->cargs[static_cast<size_t>(g_rank)]));
      } catch (const std::exception& e) {
        msg = std::string("exception: ") + e.what();
      }
      MPI_Comm_free(&sub);
    }
    EXPECT_EQ(agree(msg), "") << (kind == Kind::kMpi ? "mpi" : "hybrid");
  }
}

// A rank that never calls: every other rank raises Timeout naming it and the operation.
TEST(MpiErrors, RankThatNeverCallsTimesOutNamingIt) {
  SKIP_UNLESS_RANKS(4);
  const Case c = small_case();
  const std::string prefix = "n" + std::to_string(g_counter++) + "_";
  MPI_Comm sub = first_ranks(c.W);
  std::string msg;
  if (sub != MPI_COMM_NULL) {
    try {
      Registered reg;
      GroupOptions opt;
      opt.timeout = std::chrono::milliseconds(1500);
      reg.add(prefix + "ep0", make_mpi_group(sub, opt));
      auto P = prepare(c, prefix);
      if (g_rank != 3) {
        const auto t0 = std::chrono::steady_clock::now();
        msg = expect_error<Timeout>([&] { (void)dispatch_v2(P->dargs[static_cast<size_t>(g_rank)]); },
                                    {"rank 3", "dispatch_v2", "timed out after 1500 ms"});
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        // Not much less than the timeout (a rank that fails at once is a defect), but a rank may learn of
        // the timeout from a peer that started waiting earlier, by up to the ranks' skew (1.397 s was seen
        // across loaded network-namespace hosts).
        if (msg.empty() && (s < 0.75 || s > 8)) msg = "timed out after " + std::to_string(s) + " s, wanted about 1.5";
      }
    } catch (const std::exception& e) {
      msg = std::string("exception: ") + e.what();
    }
    MPI_Comm_free(&sub);
  }
  EXPECT_EQ(agree(msg), "");
}

// MPI's own error codes come out as TransportError carrying MPI_Error_string's text.
TEST(MpiErrors, MpiErrorBecomesTransportErrorWithMpiErrorString) {
  MPI_Comm c = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &c);
  MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN);
  char byte = 0;
  const int rc = MPI_Send(&byte, -1, MPI_BYTE, 0, 0, c);  // a negative count: MPI_ERR_COUNT
  MPI_Comm_free(&c);
  std::string msg;
  if (rc == MPI_SUCCESS) {
    msg = "MPI_Send with count -1 succeeded";
  } else {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, text, &len);
    msg = expect_error<TransportError>([&] { transport::check_mpi(rc, "[rank 0/4] dispatch_v2: ", "MPI_Isend (data)"); },
                                       {"[rank 0/4] dispatch_v2: MPI_Isend (data) failed: ", std::string(text, static_cast<size_t>(len))});
  }
  EXPECT_EQ(agree(msg), "");
}

TEST(MpiErrors, BadCommunicatorsAreRefusedClearly) {
  std::string msg = expect_error<InvalidArgument>([] { (void)make_mpi_group(MPI_COMM_NULL); }, {"make_mpi_group", "MPI_COMM_NULL"});
  if (msg.empty()) {
    GroupOptions opt;
    opt.ranks_per_server = -2;
    msg = expect_error<InvalidArgument>([&] { (void)make_mpi_group(MPI_COMM_SELF, opt); }, {"ranks_per_server=-2"});
  }
  EXPECT_EQ(agree(msg), "");
}

// make_mpi_world_group: groups of MPI_COMM_WORLD made without touching MPI (as the demo and Python do);
// a rank with color < 0 joins none.
TEST(MpiWorldGroup, SplitsTheJobByColor) {
  SKIP_UNLESS_RANKS(4);
  const Case c = small_case();
  const std::string prefix = "w" + std::to_string(g_counter++) + "_";
  const bool in = g_rank < c.W;
  std::string msg;
  try {
    Registered reg;
    // Ranks 0..3 in reverse order; the others in no group.
    auto t = make_mpi_world_group({}, "mpi", in ? 0 : -1, c.W - 1 - g_rank);
    if (!in && t) msg = "a rank with color -1 got a group";
    if (in && (!t || t->world_size() != c.W || t->rank() != c.W - 1 - g_rank || t->name() != "mpi"))
      msg = "wrong group: " + (t ? t->name() + " rank " + std::to_string(t->rank()) + " of " + std::to_string(t->world_size()) : "none");
    // A hybrid group of ranks 0..3 in order runs a case.
    auto h = make_mpi_world_group({}, "hybrid", in ? 0 : -1, g_rank);
    if (msg.empty() && in) {
      reg.add(prefix + "ep0", h);
      auto P = prepare(c, prefix);
      msg = check_dispatch(*P, g_rank, dispatch_v2(P->dargs[static_cast<size_t>(g_rank)]));
      if (msg.empty()) msg = check_combine(*P, g_rank, combine_v2(P->cargs[static_cast<size_t>(g_rank)]));
    }
  } catch (const std::exception& e) {
    msg = std::string("exception: ") + e.what();
  }
  EXPECT_EQ(agree(msg), "");
}

// The same group for many calls in a row (pair epochs and reused send blocks stay in step), with
// messages large enough to need several blocks per peer the first time.
TEST(MpiRounds, ManyCallsAndLargeMessages) {
  SKIP_UNLESS_RANKS(3);
  for (Kind kind : {Kind::kMpi, Kind::kHybrid}) {
    Case c;
    c.W = 3;
    c.E = 6;
    c.K = 4;
    c.BS = 96;
    c.H = 2048;
    c.quant = 2;
    const std::string prefix = "r" + std::to_string(g_counter++) + "_";
    MPI_Comm sub = first_ranks(c.W);
    std::string msg;
    if (sub != MPI_COMM_NULL) {
      try {
        Registered reg;
        reg.add(prefix + "ep0", make(kind, sub, {}));
        auto P = prepare(c, prefix);
        for (int round = 0; round < 8 && msg.empty(); ++round) {
          msg = check_dispatch(*P, g_rank, dispatch_v2(P->dargs[static_cast<size_t>(g_rank)]));
          if (msg.empty()) msg = check_combine(*P, g_rank, combine_v2(P->cargs[static_cast<size_t>(g_rank)]));
          if (!msg.empty()) msg = "round " + std::to_string(round) + ": " + msg;
        }
        const TransportStats s = resolve_group(prefix + "ep0", g_rank)->stats();
        if (msg.empty() && s.exchanges != 16) msg = "stats: " + std::to_string(s.exchanges) + " exchanges, wanted 16";
      } catch (const std::exception& e) {
        msg = std::string("exception: ") + e.what();
      }
      MPI_Comm_free(&sub);
    }
    EXPECT_EQ(agree(msg), "") << (kind == Kind::kMpi ? "mpi" : "hybrid");
  }
}

// 2 hosts x 2 ranks (the first 4 ranks; hosts detected when MOEDIST_TEST_DETECT_HOSTS=1, e.g. across
// network namespaces, else set as 2 ranks per host): the same tokens through fullmesh and hierarchy.
// Hierarchy sends each token across once per remote host that needs it, and pre-reduces combine on
// the expert host, so fewer bytes cross hosts. Both results are checked against their references.
TEST(MpiBytes, HierarchyCrossesHostsWithFewerBytesThanFullmesh) {
  SKIP_UNLESS_RANKS(4);
  const bool detect = std::getenv("MOEDIST_TEST_DETECT_HOSTS") != nullptr;
  for (Kind kind : {Kind::kMpi, Kind::kHybrid}) {
    Case c;
    c.W = 4;
    c.E = 16;
    c.K = 8;
    c.BS = 32;
    c.H = 1024;
    const std::string prefix = "b" + std::to_string(g_counter++) + "_";
    MPI_Comm sub = first_ranks(c.W);
    std::string msg;
    uint64_t full[4] = {}, hier[4] = {};
    if (sub != MPI_COMM_NULL) {
      try {
        Registered reg;
        MpiOptions mo;
        mo.ranks_per_host = detect ? 0 : 2;
        GroupOptions opt;
        opt.timeout = std::chrono::milliseconds(30000);
        opt.ranks_per_server = 2;
        reg.add(prefix + "ep0", make(kind, sub, opt, mo));
        auto t = resolve_group(prefix + "ep0", g_rank);
        const std::vector<int> hosts = mpi_hosts(*t);
        if (hosts != std::vector<int>{0, 0, 1, 1}) {
          std::string h;
          for (int x : hosts) h += std::to_string(x) + " ";
          msg = "hosts of ranks 0-3 are " + h + "(wanted 0 0 1 1: two hosts of two ranks)";
        }
        auto P = prepare(c, prefix);
        const int i = g_rank;
        auto measure = [&](const DispatchArgs& d, CombineArgs ca, const DispatchResult* dref, const Tensor* cref, uint64_t out[4]) {
          const TransportStats s0 = t->stats();
          const DispatchResult got = dispatch_v2(d);
          Tensor y = combine_v2(ca);
          const TransportStats s1 = t->stats();
          out[0] = s1.bytes_sent_inter_host - s0.bytes_sent_inter_host;
          out[1] = s1.payload_bytes_inter_host - s0.payload_bytes_inter_host;
          out[2] = s1.bytes_sent - s0.bytes_sent;
          out[3] = s1.bytes_received_inter_host - s0.bytes_received_inter_host;
          std::string m = check_dispatch(*P, i, got);  // expand_x etc. are the same for both algorithms
          if (m.empty() && dref && std::memcmp(got.expand_scales.data(), dref->expand_scales.data(), got.expand_scales.nbytes()) != 0)
            m = "expand_scales differ";
          if (m.empty()) {
            if (y.nbytes() != cref->nbytes() || std::memcmp(y.data(), cref->data(), y.nbytes()) != 0) m = "combine differs from its reference";
          }
          return m;
        };
        if (msg.empty()) msg = measure(P->dargs[static_cast<size_t>(i)], P->cargs[static_cast<size_t>(i)], nullptr, &P->cref[static_cast<size_t>(i)], full);
        // The same inputs with comm_alg "hierarchy" and its reference (servers of 2 ranks).
        std::vector<DispatchArgs> hd = P->dargs;
        std::vector<CombineArgs> hc = P->cargs;
        for (auto& d : hd) d.comm_alg = "hierarchy";
        for (auto& a : hc) a.comm_alg = "hierarchy";
        reference::Options ro;
        ro.ranks_per_server = 2;
        const std::vector<DispatchResult> hdref = reference::dispatch_v2(hd, ro);
        const std::vector<Tensor> hcref = reference::combine_v2(hc, ro);
        if (msg.empty())
          msg = measure(hd[static_cast<size_t>(i)], hc[static_cast<size_t>(i)], &hdref[static_cast<size_t>(i)], &hcref[static_cast<size_t>(i)], hier);
      } catch (const std::exception& e) {
        msg = std::string("exception: ") + e.what();
      }
    }
    uint64_t F[4], Hh[4];
    for (int k = 0; k < 4; ++k) {
      F[k] = sum_over_ranks(full[k]);
      Hh[k] = sum_over_ranks(hier[k]);
    }
    if (sub != MPI_COMM_NULL) MPI_Comm_free(&sub);
    const char* name = kind == Kind::kMpi ? "mpi" : "hybrid";
    if (g_rank == 0)
      std::printf("[ bytes    ] %s, 2 hosts x 2 ranks, BS=%d H=%d K=%d E=%d bf16, one dispatch + combine, summed over ranks:\n"
                  "[ bytes    ]   fullmesh : %llu bytes across hosts (payload %llu), %llu bytes sent in all\n"
                  "[ bytes    ]   hierarchy: %llu bytes across hosts (payload %llu), %llu bytes sent in all (%.2fx fewer across hosts)\n",
                  name, c.BS, c.H, c.K, c.E, static_cast<unsigned long long>(F[0]), static_cast<unsigned long long>(F[1]),
                  static_cast<unsigned long long>(F[2]), static_cast<unsigned long long>(Hh[0]), static_cast<unsigned long long>(Hh[1]),
                  static_cast<unsigned long long>(Hh[2]), Hh[0] ? static_cast<double>(F[0]) / static_cast<double>(Hh[0]) : 0.0);
    EXPECT_EQ(agree(msg), "") << name;
    EXPECT_GT(Hh[0], 0u) << name;
    // Every byte sent to another host was received there: summed over ranks, the two counts agree.
    EXPECT_EQ(F[3], F[0]) << name << ": fullmesh received " << F[3] << " bytes from other hosts, sent " << F[0];
    EXPECT_EQ(Hh[3], Hh[0]) << name << ": hierarchy received " << Hh[3] << " bytes from other hosts, sent " << Hh[0];
    EXPECT_LT(Hh[0], F[0]) << name << ": hierarchy sent " << Hh[0] << " bytes across hosts, fullmesh " << F[0];
    EXPECT_LT(Hh[1], F[1]) << name << ": payload across hosts, hierarchy " << Hh[1] << ", fullmesh " << F[1];
  }
}

}  // namespace
}  // namespace moedist::test

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // under mpirun stdout is a pipe: show progress line by line
  MPI_Comm_rank(MPI_COMM_WORLD, &moedist::test::g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &moedist::test::g_world);
  ::testing::InitGoogleTest(&argc, argv);
  if (moedist::test::g_rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int rc = RUN_ALL_TESTS();
  int worst = 0;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
