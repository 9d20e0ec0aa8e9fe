// Processes over shared memory: a rank that dies, never arrives or rejects its input makes the others
// fail with an error naming it, and no segment is left in /dev/shm after success, failure or a kill.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "harness.h"

namespace moedist::test {
namespace {

std::atomic<int> g_job{0};

std::string new_job(const char* what) { return std::string(what) + std::to_string(getpid()) + "_" + std::to_string(g_job++); }

Case small_case() {
  Case c;
  c.W = 4;
  c.E = 8;
  c.K = 3;
  c.BS = 8;
  c.H = 64;
  return c;
}

// Every rank but `victim` must fail with `Kind` naming "rank <victim>" and `words`.
template <typename Kind>
std::string expect_named_failure(const std::function<void()>& call, int victim, const std::string& words) {
  try {
    call();
  } catch (const Kind& e) {
    const std::string m = e.what();
    if (m.find("rank " + std::to_string(victim)) == std::string::npos || m.find(words) == std::string::npos)
      return "message does not name rank " + std::to_string(victim) + " / '" + words + "': " + m;
    return "";
  } catch (const std::exception& e) {
    return std::string("wrong exception type: ") + e.what();
  }
  return "no exception";
}

struct Scenario {
  const char* name;
  int victim;
  // What the victim does: 0 dies before dispatch, 1 dies before combine, 2 dies inside dispatch while
  // waiting for a peer, 3 never calls, 4 rejects its input.
  int mode;
};

inline void PrintTo(const Scenario& s, std::ostream* os) { *os << s.name; }

class ShmFault : public ::testing::TestWithParam<Scenario> {};

TEST_P(ShmFault, PeersFailNamingTheRank) {
  const Scenario sc = GetParam();
  const Case c = small_case();
  const std::string job = new_job("fault");
  const std::string err = run_processes(c.W, [&](int r) -> std::string {
    GroupOptions opt;
    opt.timeout = std::chrono::milliseconds(sc.mode == 3 ? 1500 : 30000);
    register_group("s_ep0", {make_shm_group("ep0", c.W, r, opt, job)});
    auto P = prepare(c, "s_");
    const int i = r;  // no TP, no elastic: calling rank index == EP rank
    if (r == sc.victim) {
      switch (sc.mode) {
        case 0: raise(SIGKILL); break;
        case 1:
          (void)dispatch_v2(P->dargs[static_cast<size_t>(i)]);
          raise(SIGKILL);
          break;
        case 2: {
          std::thread killer([] {
            std::this_thread::sleep_for(std::chrono::milliseconds(200));
            raise(SIGKILL);
          });
          killer.detach();
          (void)dispatch_v2(P->dargs[static_cast<size_t>(i)]);  // blocks: the last rank comes late
          return "victim returned from dispatch";
        }
        case 3:  // alive, but never calls
          std::this_thread::sleep_for(std::chrono::milliseconds(4000));
          return "";
        case 4: {
          DispatchArgs bad = P->dargs[static_cast<size_t>(i)];
          bad.moe_expert_num = 7;
          return expect_named_failure<InvalidArgument>([&] { (void)dispatch_v2(bad); }, r, "moe_expert_num");
        }
      }
      return "victim survived";
    }
    if (sc.mode == 2 && r == c.W - 1) std::this_thread::sleep_for(std::chrono::milliseconds(600));
    if (sc.mode == 1) {
      (void)dispatch_v2(P->dargs[static_cast<size_t>(i)]);
      return expect_named_failure<TransportError>([&] { (void)combine_v2(P->cargs[static_cast<size_t>(i)]); }, sc.victim, "died");
    }
    if (sc.mode == 3)
      return expect_named_failure<Timeout>([&] { (void)dispatch_v2(P->dargs[static_cast<size_t>(i)]); }, sc.victim, "timed out");
    if (sc.mode == 4)
      return expect_named_failure<TransportError>([&] { (void)dispatch_v2(P->dargs[static_cast<size_t>(i)]); }, sc.victim, "moe_expert_num");
    return expect_named_failure<TransportError>([&] { (void)dispatch_v2(P->dargs[static_cast<size_t>(i)]); }, sc.victim, "died");
  }, 60);
  // The victim's own process ends by SIGKILL in modes 0-2: that is the only abnormal end allowed.
  if (sc.mode <= 2) {
    EXPECT_TRUE(err.empty() || (err.find('\n') == std::string::npos && err.rfind("process " + std::to_string(sc.victim) + " (pid", 0) == 0 &&
                                err.find("SIGKILL") != std::string::npos))
        << err;
  } else {
    EXPECT_EQ(err, "");
  }
  EXPECT_TRUE(shm_leftovers(job).empty());
}

INSTANTIATE_TEST_SUITE_P(Shm, ShmFault,
                         ::testing::Values(Scenario{"KilledBeforeDispatch", 2, 0}, Scenario{"KilledBeforeCombine", 1, 1},
                                           Scenario{"KilledInsideDispatch", 2, 2}, Scenario{"NeverCalls", 3, 3},
                                           Scenario{"RejectsInput", 1, 4}),
                         [](const ::testing::TestParamInfo<Scenario>& info) { return info.param.name; });

TEST(ShmGroup, TwoJobsWithTheSameGroupNameDoNotCollide) {
  const std::string a = new_job("ja"), b = new_job("jb");
  const Case c = small_case();
  const std::string err = run_processes(2 * c.W, [&](int p) -> std::string {
    const std::string& job = p < c.W ? a : b;
    const int r = p % c.W;
    register_group("s_ep0", {make_shm_group("ep0", c.W, r, {}, job)});
    auto P = prepare(c, "s_");
    std::string d = check_dispatch(*P, r, dispatch_v2(P->dargs[static_cast<size_t>(r)]));
    return d.empty() ? check_combine(*P, r, combine_v2(P->cargs[static_cast<size_t>(r)])) : d;
  }, 60);
  EXPECT_EQ(err, "");
  EXPECT_TRUE(shm_leftovers(a).empty());
  EXPECT_TRUE(shm_leftovers(b).empty());
}

TEST(ShmGroup, RankThatNeverJoinsTimesOutNamingIt) {
  const std::string job = new_job("join");
  const std::string err = run_processes(2, [&](int r) -> std::string {
    if (r == 1) return "";
    GroupOptions opt;
    opt.timeout = std::chrono::milliseconds(300);
    try {
      (void)make_shm_group("ep0", 3, 0, opt, job);
    } catch (const Timeout& e) {
      return std::string(e.what()).find("rank 1") != std::string::npos ? "" : e.what();
    }
    return "no timeout";
  }, 30);
  EXPECT_EQ(err, "");
  EXPECT_TRUE(shm_leftovers(job).empty());
}

TEST(ShmGroup, ManyCallsReuseTheWindow) {
  // 20 rounds on 3 processes: the alternating message slots and per-pair epochs stay in step.
  Case c = small_case();
  c.W = 3;
  c.E = 6;
  c.quant = 2;
  const std::string job = new_job("rounds");
  const std::string err = run_processes(c.W, [&](int r) -> std::string {
    register_group("s_ep0", {make_shm_group("ep0", c.W, r, {}, job)});
    auto P = prepare(c, "s_");
    for (int round = 0; round < 20; ++round) {
      std::string d = check_dispatch(*P, r, dispatch_v2(P->dargs[static_cast<size_t>(r)]));
      if (d.empty()) d = check_combine(*P, r, combine_v2(P->cargs[static_cast<size_t>(r)]));
      if (!d.empty()) return "round " + std::to_string(round) + ": " + d;
    }
    return "";
  }, 60);
  EXPECT_EQ(err, "");
}

}  // namespace
}  // namespace moedist::test
