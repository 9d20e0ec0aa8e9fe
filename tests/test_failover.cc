// Failover: a rank dies (SIGKILL) or stops (SIGSTOP) at a chosen point of a round, the others agree on
// the failed ranks (recover_group) and continue on the same group with elastic_info, bit-exact against
// the reference for the shrunk configuration. In the style of a shrink test: processes over shared
// memory, W 4 and 8, the victim a MoE rank, a shared-expert rank or rank 0, killed before dispatch,
// inside dispatch, between the two ops, inside combine; a second death after the first; a death during
// the agreement; a stopped rank that wakes up after it was declared failed.
//
// How a rank dies "inside" an op: the victim calls the op as the others do, but the others start it
// 60 ms late, so the victim has published its message and waits for them; its interrupt check (which
// moedist calls while it waits, moedist::set_interrupt_check) then raises the signal on itself.
//
// MOEDIST_FAILOVER_REPEAT=N repeats every scenario N times (a stress run; default 1).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <map>
#include <set>
#include <thread>

#include "harness.h"
#include "moedist/elastic.h"

namespace moedist::test {
namespace {

#if defined(MOEDIST_ASAN) || defined(MOEDIST_TSAN)
constexpr int kScale = 4;
#else
constexpr int kScale = 1;
#endif

using Clock = std::chrono::steady_clock;

enum class Where { kBefore, kDispatch, kBetween, kCombine, kAgreement };
const char* where_name(Where w) {
  switch (w) {
    case Where::kBefore: return "before dispatch";
    case Where::kDispatch: return "inside dispatch";
    case Where::kBetween: return "between dispatch and combine";
    case Where::kCombine: return "inside combine";
    case Where::kAgreement: return "during the agreement";
  }
  return "?";
}

struct Death {
  int rank;
  Where where;
  int round;
  int sig = SIGKILL;  // or SIGSTOP: the rank stops and is continued at the end; it must then be told it is out
};

struct Scenario {
  int W = 4;
  int Sr = 0;
  int E = 8;
  int rounds = 4;
  std::vector<Death> deaths;
};

std::string describe(const Scenario& s) {
  std::string d = "W" + std::to_string(s.W) + " Sr" + std::to_string(s.Sr);
  for (const Death& x : s.deaths)
    d += detail::str_cat(", rank ", x.rank, x.sig == SIGSTOP ? " stops " : " dies ", where_name(x.where), " of round ", x.round);
  return d;
}

// Shared between the forked processes (MAP_SHARED before the fork).
struct Board {
  std::atomic<int> pid[16];
  std::atomic<int> done[16];  // survivors that finished every round
};

// The signal the victim raises from its interrupt check (0: none armed).
std::atomic<int> g_armed{0};
bool die_in_check() {
  if (const int sig = g_armed.load()) {
    g_armed = 0;
    raise(sig);
  }
  return false;
}

Case base_case(const Scenario& s, const std::vector<int32_t>& failed) {
  Case c;
  c.W = s.W;
  c.BS = 5;
  c.H = 48;
  c.K = 3;
  c.E = s.E;
  c.Sr = s.Sr;
  c.shared_num = 1;
  int shared_failed = 0;
  for (int r = 0; r < s.W; ++r)
    if (failed[static_cast<size_t>(r)]) {
      c.removed.push_back(r);
      if (r < s.Sr) ++shared_failed;
    }
  if (!c.removed.empty()) c.Sr_after = s.Sr - shared_failed;
  return c;
}

// One rank process of a scenario. Returns "" when it behaved as it must.
std::string rank_main(const Scenario& s, int me, const std::string& job, Board* board) {
  board->pid[me] = getpid();
  set_interrupt_check(&die_in_check);
  GroupOptions opt;
  opt.timeout = std::chrono::milliseconds(1500 * kScale);
  const std::string prefix = "fo_";
  register_group(prefix + "ep0", {make_shm_group("fo", s.W, me, opt, job)});
  std::map<std::vector<int32_t>, std::unique_ptr<Prepared>> cases;
  auto prepared = [&](const std::vector<int32_t>& failed) -> Prepared& {
    auto& p = cases[failed];
    if (!p) p = prepare(base_case(s, failed), prefix);
    return *p;
  };
  auto my_death = [&](int round, Where w) -> const Death* {
    for (const Death& d : s.deaths)
      if (d.rank == me && d.round == round && d.where == w) return &d;
    return nullptr;
  };
  auto someone_dies = [&](int round, Where w) {
    for (const Death& d : s.deaths)
      if (d.rank != me && d.round == round && d.where == w) return true;
    return false;
  };
  std::vector<int32_t> expect_failed(static_cast<size_t>(s.W), 0);
  uint64_t recoveries = 0;
  for (int round = 0; round < s.rounds; ++round) {
    for (const Death& d : s.deaths)
      if (d.round <= round) expect_failed[static_cast<size_t>(d.rank)] = 1;
    for (int attempt = 0;; ++attempt) {
      if (attempt > 3) return detail::str_cat("rank ", me, ": round ", round, " failed ", attempt, " times");
      const std::vector<int32_t> failed = query_active_mask(prefix + "ep0", me);
      Prepared& P = prepared(failed);
      int idx = -1;
      for (int i = 0; i < static_cast<int>(P.dargs.size()); ++i)
        if (rank_of(P, i, nullptr) == me) idx = i;
      if (idx < 0) return detail::str_cat("rank ", me, ": listed as failed while alive");
      // elastic_info from the agreed mask equals the layout the reference runs.
      if (std::count(failed.begin(), failed.end(), 1)) {
        const std::vector<int32_t> el = make_elastic_info(failed, s.Sr, s.E / (s.W - s.Sr));
        if (el != elastic_info_of(P, idx)) return detail::str_cat("rank ", me, ": make_elastic_info differs from the layout's");
      }
      try {
        if (const Death* d = my_death(round, Where::kBefore)) raise(d->sig);
        if (const Death* d = my_death(round, Where::kDispatch)) g_armed = d->sig;
        if (someone_dies(round, Where::kDispatch) && attempt == 0) std::this_thread::sleep_for(std::chrono::milliseconds(60));
        DispatchResult got = dispatch_v2(P.dargs[static_cast<size_t>(idx)]);
        g_armed = 0;
        std::string diff = check_dispatch(P, idx, got);
        if (!diff.empty()) return detail::str_cat("rank ", me, " round ", round, ": ", diff);
        if (const Death* d = my_death(round, Where::kBetween)) raise(d->sig);
        if (const Death* d = my_death(round, Where::kCombine)) g_armed = d->sig;
        if (someone_dies(round, Where::kCombine) && attempt == 0) std::this_thread::sleep_for(std::chrono::milliseconds(60));
        Tensor out = combine_v2(P.cargs[static_cast<size_t>(idx)]);
        g_armed = 0;
        diff = check_combine(P, idx, out);
        if (!diff.empty()) return detail::str_cat("rank ", me, " round ", round, ": ", diff);
        break;
      } catch (const TransportError& e) {
        if (std::string(e.what()).find("declared failed") != std::string::npos) {
          // A stopped rank woken after the others excluded it: told so, and nothing else.
          if (expect_failed[static_cast<size_t>(me)]) return "";
          return detail::str_cat("rank ", me, " was excluded but should not be: ", e.what());
        }
      }
      g_armed = 0;
      if (const Death* d = my_death(round, Where::kAgreement)) g_armed = d->sig;
      try {
        const RecoveryResult r = recover_group(prefix + "ep0", me);
        g_armed = 0;
        recoveries = r.generation;
      } catch (const TransportError& e) {
        if (expect_failed[static_cast<size_t>(me)] && std::string(e.what()).find("declared failed") != std::string::npos) return "";
        return detail::str_cat("rank ", me, " recover_group: ", e.what());
      }
    }
    // Every failure of an earlier round is agreed, and nothing but failures up to this round. (A rank
    // that dies inside an op after it wrote all its part is noticed at the next call.)
    const std::vector<int32_t> failed = query_active_mask(prefix + "ep0", me);
    bool fits = true;
    for (int r = 0; r < s.W; ++r) {
      bool earlier = false;
      for (const Death& d : s.deaths)
        if (d.rank == r && d.round < round) earlier = true;
      if ((earlier && !failed[static_cast<size_t>(r)]) || (failed[static_cast<size_t>(r)] && !expect_failed[static_cast<size_t>(r)])) fits = false;
    }
    if (!fits) {
      std::string a, b;
      for (int r = 0; r < s.W; ++r) {
        a += std::to_string(failed[static_cast<size_t>(r)]);
        b += std::to_string(expect_failed[static_cast<size_t>(r)]);
      }
      return detail::str_cat("rank ", me, " after round ", round, ": agreed failed ", a, ", failures planned up to this round ", b);
    }
  }
  (void)recoveries;
  board->done[me] = 1;
  // Wake the stopped ranks now that every survivor is done (the last survivor to finish does it).
  int finished = 0, survivors = 0;
  for (int r = 0; r < s.W; ++r) {
    if (expect_failed[static_cast<size_t>(r)]) continue;
    ++survivors;
  }
  const auto until = Clock::now() + std::chrono::seconds(20 * kScale);
  while (Clock::now() < until) {
    finished = 0;
    for (int r = 0; r < s.W; ++r)
      if (!expect_failed[static_cast<size_t>(r)] && board->done[r]) ++finished;
    if (finished == survivors) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (me == [&] {
        for (int r = 0; r < s.W; ++r)
          if (!expect_failed[static_cast<size_t>(r)]) return r;
        return -1;
      }())
    for (const Death& d : s.deaths)
      if (d.sig == SIGSTOP) kill(board->pid[d.rank], SIGCONT);
  return "";
}

std::string run_scenario(const Scenario& s) {
  void* mem = mmap(nullptr, sizeof(Board), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return "mmap failed";
  Board* board = new (mem) Board{};
  const std::string job = detail::str_cat("fo", getpid(), "-", Clock::now().time_since_epoch().count());
  std::vector<int> killed_by(static_cast<size_t>(s.W), 0);
  for (const Death& d : s.deaths)
    if (d.sig == SIGKILL) killed_by[static_cast<size_t>(d.rank)] = SIGKILL;
  std::string err = run_processes(s.W, [&](int r) { return rank_main(s, r, job, board); }, 90 * kScale, killed_by);
  munmap(mem, sizeof(Board));
  return err.empty() ? "" : describe(s) + ": " + err;
}

int repeats() {
  const char* v = std::getenv("MOEDIST_FAILOVER_REPEAT");
  return v && std::atoi(v) > 0 ? std::atoi(v) : 1;
}

void run_all(const std::vector<Scenario>& list) {
  for (int i = 0; i < repeats(); ++i)
    for (const Scenario& s : list) {
      const std::string err = run_scenario(s);
      ASSERT_EQ(err, "") << "repeat " << i;
    }
}

Scenario one(int W, int Sr, int victim, Where where, int sig = SIGKILL) {
  Scenario s;
  s.W = W;
  s.Sr = Sr;
  s.E = 2 * (W - Sr);
  s.deaths = {{victim, where, 1, sig}};
  return s;
}

TEST(Failover, AMoeRankKilledAtEachPointOfARoundW4) {
  run_all({one(4, 0, 2, Where::kBefore), one(4, 0, 2, Where::kDispatch), one(4, 0, 2, Where::kBetween), one(4, 0, 2, Where::kCombine)});
}

TEST(Failover, RankZeroKilledW4) {
  // Rank 0's control block holds the agreement's decision word: it must serve after rank 0's death.
  run_all({one(4, 0, 0, Where::kDispatch), one(4, 0, 0, Where::kCombine)});
}

TEST(Failover, SharedExpertRankAndMoeRanksKilledW8) {
  run_all({one(8, 2, 1, Where::kDispatch), one(8, 2, 5, Where::kCombine), one(8, 2, 0, Where::kBetween)});
}

TEST(Failover, ASecondDeathAfterTheFirst) {
  Scenario s = one(8, 0, 3, Where::kDispatch);
  s.rounds = 5;
  s.deaths.push_back({6, Where::kCombine, 3});
  Scenario t = one(4, 0, 1, Where::kCombine);
  t.rounds = 5;
  t.deaths.push_back({0, Where::kBefore, 3});
  run_all({s, t});
}

TEST(Failover, ADeathDuringTheAgreement) {
  // Rank 5 dies while the survivors of rank 2's death agree: they obtain one set holding both.
  Scenario s = one(8, 0, 2, Where::kDispatch);
  s.deaths.push_back({5, Where::kAgreement, 1});
  Scenario t = one(4, 0, 3, Where::kCombine);
  t.deaths.push_back({0, Where::kAgreement, 1});
  run_all({s, t});
}

TEST(Failover, AStoppedRankIsDeclaredFailedAndToldWhenItWakes) {
  // SIGSTOP: the survivors time out (1.5 s), see no heartbeat from it and go on without it; continued
  // at the end, it finds it was excluded (TransportError), and reads nobody's data.
  run_all({one(4, 0, 1, Where::kBefore, SIGSTOP), one(4, 0, 2, Where::kDispatch, SIGSTOP)});
}

// Threads: a rank that stops calling (its thread is stuck elsewhere) is declared failed once the others
// time out; the group continues among the other threads, bit-exact, and the stuck one is told it is
// out when it calls again.
TEST(Failover, ThreadRanksContinueWithoutAStuckRank) {
  const int W = 4, victim = 2;
  GroupOptions opt;
  opt.timeout = std::chrono::milliseconds(300 * kScale);
  const std::string prefix = "fot_";
  register_group(prefix + "ep0", make_thread_group(W, opt));
  Scenario sc;
  sc.W = W;
  sc.E = 8;
  std::vector<int32_t> none(W, 0), failed(W, 0);
  failed[victim] = 1;
  auto full = prepare(base_case(sc, none), prefix);
  auto shrunk = prepare(base_case(sc, failed), prefix);
  std::vector<std::string> errs(W);
  std::atomic<int> finished{0};
  run_ranks(W, [&](int r) {
    std::string& err = errs[static_cast<size_t>(r)];
    // Round 0: everyone.
    DispatchResult d = dispatch_v2(full->dargs[static_cast<size_t>(r)]);
    err = check_dispatch(*full, r, d);
    if (err.empty()) err = check_combine(*full, r, combine_v2(full->cargs[static_cast<size_t>(r)]));
    if (!err.empty()) return;
    if (r == victim) {
      // Stuck for several deadlines, then it calls again.
      while (finished.load() < W - 1) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      try {
        dispatch_v2(full->dargs[static_cast<size_t>(r)]);
        err = "the stuck rank's call succeeded after it was declared failed";
      } catch (const TransportError& e) {
        if (std::string(e.what()).find("declared failed") == std::string::npos) err = std::string("wrong error: ") + e.what();
      }
      if (query_active_mask(prefix + "ep0", r) != std::vector<int32_t>({0, 0, 1, 0})) err += " (its mask does not show it failed)";
      return;
    }
    try {
      dispatch_v2(full->dargs[static_cast<size_t>(r)]);
      err = "round 1 succeeded without rank 2";
      return;
    } catch (const TransportError&) {  // Timeout, or a peer gave up first
    }
    const RecoveryResult rec = recover_group(prefix + "ep0", r);
    if (rec.failed != failed || rec.generation != 1 || rec.newly_failed != std::vector<int>{victim} || rec.calls_completed != 2) {
      err = detail::str_cat("recovery: generation ", rec.generation, ", calls ", rec.calls_completed, ", newly failed ", rec.newly_failed.size());
      return;
    }
    const int idx = r < victim ? r : r - 1;
    for (int round = 0; round < 2 && err.empty(); ++round) {
      DispatchResult got = dispatch_v2(shrunk->dargs[static_cast<size_t>(idx)]);
      err = check_dispatch(*shrunk, idx, got);
      if (err.empty()) err = check_combine(*shrunk, idx, combine_v2(shrunk->cargs[static_cast<size_t>(idx)]));
    }
    // The full layout names the failed rank: a clear error, not a wait.
    try {
      dispatch_v2(full->dargs[static_cast<size_t>(r)]);
      err += " (a call including the failed rank succeeded)";
    } catch (const InvalidArgument& e) {
      if (std::string(e.what()).find("rank 2") == std::string::npos) err += std::string(" (wrong error: ") + e.what() + ")";
    }
    ++finished;
  });
  unregister_group(prefix + "ep0");
  for (int r = 0; r < W; ++r) EXPECT_EQ(errs[static_cast<size_t>(r)], "") << "rank " << r;
}

// What a failed call left in the control blocks is never read after the recovery: rank 0 fails in an
// exchange with rank 2 (stuck) before it reaches its exchange with rank 1, which has already published
// its message for that one. After the recovery both exchange again and must see each other's new blob.
TEST(Failover, WhatAFailedCallLeftIsNeverReadAfterTheRecovery) {
  GroupOptions opt;
  opt.timeout = std::chrono::milliseconds(300 * kScale);
  auto eps = make_thread_group(3, opt);
  std::atomic<int> finished{0};
  std::vector<std::string> errs(3);
  run_ranks(3, [&](int r) {
    Transport& t = *eps[static_cast<size_t>(r)];
    auto ex = [&](std::vector<int> members, uint64_t value) {
      std::vector<uint64_t> out(members.size());
      ExchangeSpec s;
      s.op = "test";
      s.members = members;
      s.blob = &value;
      s.blob_bytes = sizeof(value);
      s.blobs_out = out.data();
      t.exchange(s);
      return out;
    };
    if (r == 2) {
      while (finished.load() < 2) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      return;
    }
    try {
      if (r == 0) ex({0, 2}, 100);
      ex({0, 1}, 101);
      errs[static_cast<size_t>(r)] = "the exchange succeeded without rank 2";
    } catch (const TransportError&) {
    }
    const RecoveryResult rec = t.recover();
    if (rec.failed != std::vector<int32_t>({0, 0, 1})) errs[static_cast<size_t>(r)] += " wrong failed set;";
    try {
      const std::vector<uint64_t> got = ex({0, 1}, 200 + static_cast<uint64_t>(r));
      if (got != std::vector<uint64_t>({200, 201}))
        errs[static_cast<size_t>(r)] += detail::str_cat(" read ", got[0], ", ", got[1], " instead of 200, 201");
    } catch (const std::exception& e) {
      errs[static_cast<size_t>(r)] += e.what();
    }
    ++finished;
  });
  for (int r = 0; r < 3; ++r) EXPECT_EQ(errs[static_cast<size_t>(r)], "") << "rank " << r;
}

TEST(Failover, RecoverWithoutAFailureReturnsAtOnce) {
  // Nobody failed and nobody else recovers: had it waited for the others, it would wait out the
  // 10-minute deadline and the test's timeout would end it.
  GroupOptions opt;
  opt.timeout = std::chrono::minutes(10);
  register_group("fo_idle", make_thread_group(3, opt));
  const RecoveryResult r = recover_group("fo_idle", 1);
  EXPECT_EQ(r.generation, 0u);
  EXPECT_EQ(r.failed, std::vector<int32_t>(3, 0));
  EXPECT_EQ(query_active_mask("fo_idle", 2), std::vector<int32_t>(3, 0));
  unregister_group("fo_idle");
}

}  // namespace
}  // namespace moedist::test
