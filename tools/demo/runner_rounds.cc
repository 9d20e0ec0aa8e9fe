// Rounds mode (--rounds, --kill, --stop) of a rank process started by the demo's parent: the layer runs
// round after round, each with its own tokens, on the EP group alone (no phase barrier: a barrier group
// would have to be recovered too). With --kill / --stop one rank fails inside an op of one round; the
// survivors agree on the failed ranks (recover_group), make again the rounds not every survivor completed
// (calls_completed: two calls per round), and go on with the layout without the failed rank. Every
// round is checked at the end, against the reference of the layout it ran with and the dense layer.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>

#include "checks.h"
#include "experts.h"
#include "moedist/elastic.h"
#include "moedist/error.h"
#include "moedist/group.h"
#include "router.h"
#include "runners.h"
#include "summary.h"
#include "util.h"

namespace moedist::tools::demo {

namespace {

// The victim's interrupt check (moedist calls it about every 20 ms while the rank waits inside an op):
// armed just before the op, it records the time and the pid, then raises the signal on this process.
std::atomic<int> g_armed_signal{0};
std::string g_record_dir;

bool fail_in_check() {
  const int sig = g_armed_signal.exchange(0);
  if (sig == 0) return false;
  VictimRecord v;
  v.pid = static_cast<int>(getpid());
  v.signal_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
  write_victim_record(g_record_dir, v);
  raise(sig);
  return false;  // after SIGCONT (--stop): the op goes on and finds out that this rank was declared failed
}

// A survivor at the op the victim fails in: enters it once the victim is waiting inside (its record is
// written just before the signal), and at least 10 ms late; no later than the deadline.
void wait_for_victim(const Layer& l) {
  const auto start = Clock::now();
  VictimRecord v;
  for (;;) {
    const double waited = ms_since(start);
    if (waited >= l.opt.timeout_ms) return;
    if (waited >= 10 && read_victim_record(l.opt.report_dir, v)) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

int64_t now_ns() { return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count(); }

// One round as this rank ran it: the layout, and its state (whose views point into the layout).
struct RoundRun {
  Layer layer;
  RankState st;
};

}  // namespace

void run_rounds_rank(const Layer& base, int p, RankSummary& s) {
  const DemoOptions& o = base.opt;
  const int rounds = round_count(o);
  const int fail_round = o.victim >= 0 ? victim_round(o) - 1 : -1;  // 0-based
  const bool victim = p == o.victim;
  const int sig = o.victim_stops ? SIGSTOP : SIGKILL;
  const std::string group = base.ep_group(0);
  if (victim) {
    g_record_dir = o.report_dir;
    set_interrupt_check(&fail_in_check);
  }
  try {
    std::vector<ExpertWeights> weights;
    for (const ExpertKey& key : hosted_experts(base, p)) weights.push_back(make_expert_weights(base, key));
    std::vector<int32_t> failed(static_cast<size_t>(base.W), 0);
    std::vector<std::unique_ptr<RoundRun>> runs(static_cast<size_t>(rounds));
    bool failure_seen = false;
    int recoveries = 0;
    for (int round = 0; round < rounds;) {
      auto run = std::make_unique<RoundRun>();
      bool any_failed = false;
      for (int32_t f : failed) any_failed = any_failed || f != 0;
      run->layer = any_failed ? with_removed(base, failed) : base;
      run->st = make_rank(run->layer, 0, p, round);
      const Layer& l = run->layer;
      RankState& st = run->st;
      const bool fail_here = round == fail_round && !failure_seen;
      auto before_op = [&](const char* phase) {
        if (!fail_here || o.victim_phase != phase) return;
        if (victim)
          g_armed_signal = sig;
        else
          wait_for_victim(l);
      };
      try {
        Clock::time_point start = Clock::now();
        gate(l, st);
        st.times.gating = ms_since(start);
        before_op("dispatch");
        start = Clock::now();
        st.dispatched = dispatch_v2(st.dispatch_args);
        st.times.dispatch = ms_since(start);
        g_armed_signal = 0;
        start = Clock::now();
        run_experts(l, st, weights);
        st.times.experts = ms_since(start);
        st.combine_args = make_combine_args(l, st);
        before_op("combine");
        start = Clock::now();
        st.out = combine_v2(st.combine_args);
        st.times.combine = ms_since(start);
        g_armed_signal = 0;
      } catch (const TransportError& e) {
        g_armed_signal = 0;
        if (std::string(e.what()).find("declared failed") != std::string::npos) {
          // The stopped victim, continued at the end: it is out of the group, and says so.
          record_error(s, e);
          s.declared_failed = true;
          return;
        }
        if (++recoveries > 3) throw;
        failure_seen = true;
        const RecoveryResult r = recover_group(group, p);
        s.recovered_ns = now_ns();
        failed = r.failed;
        // Two calls per round (dispatch, combine): the rounds every survivor completed stand, the
        // first one that some survivor did not complete is made again, by every survivor.
        round = static_cast<int>(r.calls_completed / 2);
        s.restart_round = round + 1;
        s.failed_mask.clear();
        for (int32_t f : failed) s.failed_mask += f ? '1' : '0';
        continue;
      }
      if (failure_seen && s.recovered_round_end_ns == 0) s.recovered_round_end_ns = now_ns();
      runs[static_cast<size_t>(round)] = std::move(run);
      ++round;
    }
    set_interrupt_check(nullptr);

    // The checks, after every round ran: the last round's load and times for the report, then each
    // round against the reference and the dense layer of its own layout.
    summarize_run(runs.back()->layer, runs.back()->st, s);
    for (int round = 0; round < rounds; ++round) {
      RoundRun& run = *runs[static_cast<size_t>(round)];
      const Layer& l = run.layer;
      std::vector<RankState> ranks;
      size_t me = 0;
      for (int64_t q : l.active_rank_ids()) {
        if (q == p) {
          me = ranks.size();
          ranks.push_back(std::move(run.st));
        } else {
          ranks.push_back(make_rank(l, 0, q, round));
        }
      }
      RankSummary checked;
      check_own_rank(l, ranks, me, checked);
      s.accuracy.merge(checked.accuracy);
      if (s.dispatch_diff.empty() && !checked.dispatch_diff.empty()) s.dispatch_diff = cat("round ", round + 1, ": ", checked.dispatch_diff);
      if (s.combine_diff.empty() && !checked.combine_diff.empty()) s.combine_diff = cat("round ", round + 1, ": ", checked.combine_diff);
      ++s.rounds_checked;
    }
  } catch (const std::exception& e) {
    set_interrupt_check(nullptr);
    record_error(s, e);
  }
}

void continue_stopped_rank(const Layer& l, int p) {
  const DemoOptions& o = l.opt;
  if (o.victim < 0 || !o.victim_stops || p == o.victim) return;
  const int lowest = o.victim == 0 ? 1 : 0;
  if (p != lowest) return;
  // Once every survivor's result is written (or the report's deadline passed), wake the stopped rank.
  const auto start = Clock::now();
  for (;;) {
    int written = 0;
    for (int q = 0; q < l.W; ++q)
      if (q != o.victim && access(summary_path(o.report_dir, q).c_str(), F_OK) == 0) ++written;
    if (written == l.W - 1 || ms_since(start) > 2.0 * o.timeout_ms + 60000) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  VictimRecord v;
  if (read_victim_record(o.report_dir, v) && v.pid > 0) kill(v.pid, SIGCONT);
}

}  // namespace moedist::tools::demo
