#include "report.h"

#include <algorithm>
#include <cstdio>
#include <numeric>

#include "moedist/version.h"
#include "summary.h"
#include "util.h"

namespace moedist::tools::demo {

static const char* short_dtype_name(DType dt) { return dt == DType::kBFloat16 ? "bf16" : "fp16"; }

// How the rank processes talk (--transport), for the report.
static std::string transport_words(const DemoOptions& o) {
  if (o.transport == "mpi") return "MPI";
  if (o.transport == "hybrid") return "hybrid: shared memory within a host, MPI between hosts";
  if (o.transport == "ucx") return "shared memory within a host, UCX between hosts";
  return "shared memory";
}

void print_header(const Layer& l, bool processes, int hosts) {
  const DemoOptions& o = l.opt;
  std::string how = transport_words(o);
  if (hosts > 0) how += cat("; ", hosts, hosts == 1 ? " host" : " hosts");
  if (l.tp == 2)
    how = cat(" x tp 2 = ", l.tp * l.W, processes ? cat(" processes (", how, ")") : std::string(" threads"));
  else
    how = processes ? cat(" (processes, ", how, ")") : std::string(" (threads)");
  std::printf("moedist demo (moedist %s): %d ranks%s, %d tokens/rank, hidden %d, top-%d of %d experts (%lld per rank), ffn %d, %s",
              MOEDIST_VERSION_STRING, o.ranks, how.c_str(), o.tokens,
              o.hidden, o.topk, o.experts, static_cast<long long>(l.L), o.ffn, short_dtype_name(o.dtype));
  std::printf(", quant %d, comm-quant %d", o.quant, o.comm_quant);
  if (o.shared_ranks) std::printf(", shared ranks %d (1 shared expert)", o.shared_ranks);
  if (l.special) std::printf(", zero/copy/const %d/%d/%d", o.zero, o.copy, o.constant);
  if (o.elastic)
    std::printf(", elastic: %d removed (%lld ranks, %lld experts left)", o.elastic, static_cast<long long>(l.active_ranks),
                static_cast<long long>(l.E_active));
  if (o.mask) std::printf(", mask: last %lld tokens inactive", static_cast<long long>(l.BS - l.active_tokens));
  if (rounds_mode(o)) std::printf(", %d rounds", round_count(o));
  if (o.victim >= 0)
    std::printf(", %s rank %d in %s of round %d", o.victim_stops ? "SIGSTOP to" : "SIGKILL to", o.victim, o.victim_phase.c_str(), victim_round(o));
  std::printf(", seed %llu\n", static_cast<unsigned long long>(o.seed));
}

static void print_load(const Layer& l, const std::vector<RankSummary>& ranks) {
  // Rows each expert received, summed over ranks (and over both EP groups with TP).
  std::vector<int64_t> routed(static_cast<size_t>(l.E_active), 0);
  int64_t shared = 0, zero = 0, copy = 0, constant = 0;
  for (const RankSummary& s : ranks) {
    if (s.status != RankSummary::Status::kOk) continue;
    zero += s.zero;
    copy += s.copy;
    constant += s.constant;
    if (l.is_shared_rank(s.ep_rank)) {
      for (int64_t r : s.rows) shared += r;
      continue;
    }
    // Compact ids: TP has one expert per rank (and no scale-down); without TP the rank's first expert
    // moves with the rank (-1 if it was removed).
    const int64_t first = l.tp == 2 ? s.ep_rank - l.Sr : l.compact_of[static_cast<size_t>((s.ep_rank - l.Sr) * l.L)];
    for (size_t e = 0; e < s.rows.size(); ++e) {
      const int64_t g = first + static_cast<int64_t>(e);
      if (g >= 0 && g < l.E_active) routed[static_cast<size_t>(g)] += s.rows[e];
    }
  }

  const int64_t total = std::accumulate(routed.begin(), routed.end(), int64_t{0});
  std::printf("expert load (rows received per routed expert, all ranks; %lld rows in total):\n", static_cast<long long>(total));
  constexpr int64_t kPerLine = 8;
  for (int64_t g0 = 0; g0 < l.E_active; g0 += kPerLine) {
    const int64_t g1 = std::min(g0 + kPerLine, l.E_active);
    std::printf("  %-10s", cat("e", g0, "-", g1 - 1).c_str());
    for (int64_t g = g0; g < g1; ++g) std::printf(" %6lld", static_cast<long long>(routed[static_cast<size_t>(g)]));
    std::printf("\n");
  }
  if (!routed.empty()) {
    const auto [lo, hi] = std::minmax_element(routed.begin(), routed.end());
    const double mean = static_cast<double>(total) / static_cast<double>(routed.size());
    std::printf("  min %lld, max %lld, mean %.1f (max/mean %.2f)\n", static_cast<long long>(*lo), static_cast<long long>(*hi), mean,
                mean > 0 ? static_cast<double>(*hi) / mean : 0.0);
  }
  if (l.S > 0)
    std::printf("  shared expert: %lld rows on %lld rank%s\n", static_cast<long long>(shared), static_cast<long long>(l.Sr_active),
                l.Sr_active == 1 ? "" : "s");
  if (l.special)
    std::printf("  zero/copy/const picks (applied in combine, never sent): %lld / %lld / %lld\n", static_cast<long long>(zero),
                static_cast<long long>(copy), static_cast<long long>(constant));
}

static void print_times(const Layer& l, const std::vector<RankSummary>& ranks, bool processes) {
  std::vector<const RankSummary*> ran;
  for (const RankSummary& s : ranks)
    if (s.status == RankSummary::Status::kOk) ran.push_back(&s);
  if (ran.empty()) return;
  std::string barrier;
  if (processes) barrier = l.opt.transport == "shm" ? ", after a shared-memory barrier" : cat(", after a barrier over ", l.opt.transport);
  if (rounds_mode(l.opt))
    std::printf("phase times of the last round, ms (median / max over %zu ranks; no barrier between the phases: waiting for the "
                "peers is included):\n", ran.size());
  else
    std::printf("phase times, ms (median / max over %zu ranks; each phase starts on all ranks together%s):\n", ran.size(), barrier.c_str());
  const std::pair<const char*, double PhaseTimes::*> phases[] = {
      {"gating", &PhaseTimes::gating}, {"dispatch", &PhaseTimes::dispatch}, {"expert FFN", &PhaseTimes::experts}, {"combine", &PhaseTimes::combine}};
  for (const auto& [name, field] : phases) {
    std::vector<double> t;
    for (const RankSummary* s : ran) t.push_back(s->times.*field);
    std::sort(t.begin(), t.end());
    const size_t n = t.size();
    const double median = n % 2 ? t[n / 2] : (t[n / 2 - 1] + t[n / 2]) / 2;
    std::printf("  %-11s %9.3f / %9.3f\n", name, median, t.back());
  }
}

// Tolerance on max|out - dense| / max|dense|. Expert outputs and the combined sum are rounded to the
// token dtype (unit roundoff 2^-9 for bf16, 2^-11 for fp16), each a relative error of a few 1e-3 of
// values up to max|dense|: 2e-2 leaves a wide margin. comm-quant 2 adds int8 per 8-element groups
// (error up to 1/254 of the group's max, plus the scale's rounding to the token dtype).
static double tolerance(const Layer& l) { return l.opt.comm_quant == 2 ? 4e-2 : 2e-2; }

int fail(const std::string& why) {
  std::printf("moedist demo: FAIL (%s)\n", why.c_str());
  std::fflush(stdout);
  return 1;
}

// Prints everything after the header and the verdict; returns the exit code. `launcher_code` is the
// exit status of the rank processes (0 in thread mode).
int report(const Layer& l, const std::vector<RankSummary>& ranks, bool processes, int launcher_code) {
  // Failures in two rounds: first the ranks that failed on their own (or died), then the ones whose
  // error came from the transport (TransportError, Timeout), which usually names the first ones.
  int failed = 0, transport_failed = 0;
  for (int round = 0; round < 2; ++round)
    for (const RankSummary& s : ranks) {
      const std::string who = rank_name(l, s.tp_rank, s.ep_rank);
      if (s.status == RankSummary::Status::kMissing && round == 0) {
        std::printf("error: %s: no result (its process died or was stopped before reporting)\n", who.c_str());
        ++failed;
      } else if (s.status == RankSummary::Status::kError && s.transport_error == (round == 1)) {
        std::printf("error: %s: %s\n", who.c_str(), s.error.c_str());
        ++(round == 0 ? failed : transport_failed);
      }
    }
  if (failed + transport_failed > 0) {
    if (failed == 0) return fail(transport_failed == 1 ? "a rank failed" : cat(transport_failed, " ranks failed"));
    std::string why = failed == 1 ? "a rank failed" : cat(failed, " ranks failed");
    if (transport_failed) why += cat(", ", transport_failed, " more stopped with transport errors");
    return fail(why);
  }

  print_load(l, ranks);
  print_times(l, ranks, processes);

  Accuracy acc;
  std::string ref_diff, combine_diff;
  for (const RankSummary& s : ranks) {
    if (s.status != RankSummary::Status::kOk) continue;
    acc.merge(s.accuracy);
    if (ref_diff.empty()) ref_diff = s.dispatch_diff;
    if (combine_diff.empty()) combine_diff = s.combine_diff;
  }
  if (ref_diff.empty()) ref_diff = combine_diff;  // dispatch differences first: combine's follow from them
  const double tol = tolerance(l);
  const bool accurate = acc.non_finite == 0 && acc.rel_err() < tol;
  std::printf("dense fp32 check%s: max abs err %.3e, rel err %.3e (max abs err / max |dense| = %.3e), tolerance rel err < %.0e: %s\n",
              l.opt.quant == 2 ? " (dense inputs int8-quantized like dispatch)" : "", acc.max_abs_err, acc.rel_err(), acc.max_abs_dense, tol,
              accurate ? "ok" : "EXCEEDED");
  if (acc.non_finite) std::printf("  %lld non-finite output values\n", static_cast<long long>(acc.non_finite));
  std::printf("bit-exact vs reference: %s\n", ref_diff.empty() ? "yes" : ("no (" + ref_diff + ")").c_str());

  if (!accurate && !ref_diff.empty()) return fail("dense check and reference check");
  if (!accurate) return fail(acc.non_finite ? "non-finite output" : "error above tolerance");
  if (!ref_diff.empty()) return fail("not bit-exact vs reference");
  if (launcher_code != 0) return fail(cat("the rank processes exited with code ", launcher_code));
  std::printf("moedist demo: PASS\n");
  std::fflush(stdout);
  return 0;
}

}  // namespace moedist::tools::demo

namespace moedist::tools::demo {

int report_rounds(const Layer& base, const std::vector<RankSummary>& ranks, const VictimRecord* victim, int launcher_code) {
  const DemoOptions& o = base.opt;
  const int rounds = round_count(o);
  std::vector<std::string> problems;
  std::vector<RankSummary> survivors = ranks;
  std::vector<int32_t> expect_failed(static_cast<size_t>(base.W), 0);
  const char* verb = o.victim_stops ? "stopped" : "died";
  if (o.victim >= 0) {
    expect_failed[static_cast<size_t>(o.victim)] = 1;
    RankSummary& v = survivors[static_cast<size_t>(o.victim)];
    if (!victim) problems.push_back(cat("rank ", o.victim, " left no record of its signal: it did not fail inside ", o.victim_phase));
    if (!o.victim_stops && v.status != RankSummary::Status::kMissing)
      problems.push_back(cat("rank ", o.victim, " did not die: it reported ", v.status == RankSummary::Status::kError ? v.error : "results"));
    if (o.victim_stops && !v.declared_failed)
      problems.push_back(cat("rank ", o.victim, ", stopped and continued, was not told that it had been declared failed: ",
                             v.status == RankSummary::Status::kError ? v.error
                             : v.status == RankSummary::Status::kMissing ? "it left no result" : "it reported results"));
    v.status = RankSummary::Status::kRemoved;  // not one of the ranks report() looks at
  }
  std::string mask;
  for (int32_t f : expect_failed) mask += f ? '1' : '0';
  int restart = -1;
  int64_t last_end_ns = 0, last_recovered_ns = 0;
  for (const RankSummary& s : survivors) {
    if (s.status != RankSummary::Status::kOk) continue;  // report() names it
    const std::string who = rank_name(base, s.tp_rank, s.ep_rank);
    if (s.rounds_checked != rounds) problems.push_back(cat(who, " checked ", s.rounds_checked, " of ", rounds, " rounds"));
    if (o.victim < 0) continue;
    if (s.failed_mask != mask) problems.push_back(cat(who, " agreed on failed ranks '", s.failed_mask, "', expected '", mask, "'"));
    if (restart < 0) restart = s.restart_round;
    if (s.restart_round != restart)
      problems.push_back(cat(who, " restarted from round ", s.restart_round, ", another survivor from round ", restart));
    if (s.recovered_round_end_ns == 0) problems.push_back(cat(who, " completed no round after the recovery"));
    last_end_ns = std::max(last_end_ns, s.recovered_round_end_ns);
    last_recovered_ns = std::max(last_recovered_ns, s.recovered_ns);
  }
  for (const std::string& p : problems) std::printf("error: %s\n", p.c_str());

  Layer l = base;
  if (o.victim >= 0) {
    l = with_removed(base, expect_failed);
    const double ms = victim && last_end_ns > 0 ? static_cast<double>(last_end_ns - victim->signal_ns) / 1e6 : -1;
    std::printf("rounds: %d, each with its own tokens; rank %d fails in round %d, the survivors make again the rounds from the first "
                "one they did not all complete (round %d) with %lld ranks and %lld routed experts (elastic_info of the agreed failed "
                "ranks %s)\n",
                rounds, o.victim, victim_round(o), restart, static_cast<long long>(l.active_ranks), static_cast<long long>(l.E_active),
                mask.c_str());
    std::printf("rank %d %s in %s of round %d; %lld ranks continued after %.0f ms\n", o.victim, verb, o.victim_phase.c_str(), victim_round(o),
                static_cast<long long>(l.active_ranks), ms);
    if (victim && last_recovered_ns > 0 && last_end_ns > 0)
      std::printf("  (%.0f ms until every survivor had found the failure and agreed: recover_group returned; the last survivor completed "
                  "the round made again %.0f ms later)\n",
                  static_cast<double>(last_recovered_ns - victim->signal_ns) / 1e6, static_cast<double>(last_end_ns - last_recovered_ns) / 1e6);
  } else {
    std::printf("rounds: %d, each with its own tokens\n", rounds);
  }
  std::fflush(stdout);
  if (!problems.empty()) {
    return fail(problems.size() == 1 ? problems[0] : cat(problems[0], "; and ", problems.size() - 1, " more"));
  }
  return report(l, survivors, true, launcher_code);
}

}  // namespace moedist::tools::demo
