// Process mode: every rank is a process (see process_groups.h for its groups). Started directly, the demo
// is the parent: it starts the rank processes through `moedist launch`, and they write their results to
// files it reads (--report-dir). Started by an outside launcher, rank 0 gathers the results over the
// report group.
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <span>
#include <sstream>

#include "checks.h"
#include "moedist/error.h"
#include "process_groups.h"
#include "rank.h"
#include "report.h"
#include "runners.h"
#include "summary.h"
#include "util.h"

namespace moedist::tools::demo {

namespace {

// Process mode: the same line-up across processes, as an empty exchange (no blob, no payload) on a
// group (shared memory, MPI or hybrid) of every rank that calls the ops: it returns once all of them
// have arrived. A dead or failed peer raises TransportError naming it, or Timeout, instead of hanging.
class GroupBarrier {
 public:
  explicit GroupBarrier(std::shared_ptr<Transport> group) : group_(std::move(group)) {
    for (int r = 0; r < group_->world_size(); ++r) members_.push_back(r);
  }
  void arrive_and_wait() {
    ExchangeSpec spec;
    spec.op = "moedist demo phase barrier";
    spec.members = members_;
    group_->exchange(spec);
  }

 private:
  std::shared_ptr<Transport> group_;
  std::vector<int> members_;
};

// One rank process, once it joined its groups: runs its rank and checks it. Never throws: a failure is
// the summary's error.
void run_process_rank(const Layer& l, ProcessGroups& groups, RankSummary& s) {
  if (s.ep_rank >= l.active_ranks) {  // removed by elastic scale-down: does not call the ops
    s.status = RankSummary::Status::kRemoved;
    return;
  }
  try {
    const size_t me = static_cast<size_t>(s.tp_rank * l.active_ranks + s.ep_rank);
    GroupBarrier barrier(groups.all);
    std::vector<RankState> ranks;
    for (int q = 0; q < l.tp; ++q)
      for (int64_t r = 0; r < l.active_ranks; ++r) ranks.push_back(make_rank(l, q, r));
    run_rank(l, ranks[me], [&](Phase) { barrier.arrive_and_wait(); });
    barrier.arrive_and_wait();  // the checks below do not load the CPUs while a peer is still timing
    summarize_run(l, ranks[me], s);
    check_own_rank(l, ranks, me, s);
  } catch (const std::exception& e) {
    record_error(s, e);
  }
}

// Gathers every member's `text` to member 0 of `group` in two exchanges: first each member's length
// (a small blob each, which every member receives), then the texts, each written at its offset into
// member 0's one receive region (in the transport's scratch memory unless receive regions may be any
// memory). Returns the texts in member order on member 0, nothing on the others. Every wait has the
// group's timeout: a member that does not arrive raises Timeout naming it.
std::vector<std::string> gather_texts(Transport& group, const std::string& text) {
  struct SizeBlob {
    uint64_t magic;
    uint64_t bytes;
  };
  constexpr uint64_t kMagic = 0x6d6f656469737452ull;  // tells a result size from a peer's other exchange
  constexpr uint64_t kMaxBytes = uint64_t{1} << 24;
  const int n = group.world_size(), me = group.rank();
  std::vector<int> members(static_cast<size_t>(n));
  std::iota(members.begin(), members.end(), 0);
  const SizeBlob mine{kMagic, text.size()};
  std::vector<SizeBlob> sizes(static_cast<size_t>(n));
  ExchangeSpec first;
  first.op = "moedist demo result sizes";
  first.members = members;
  first.blob = &mine;
  first.blob_bytes = sizeof(SizeBlob);
  first.blobs_out = sizes.data();
  group.exchange(first);
  // Every member holds the same sizes, so every member decides the same here.
  std::vector<size_t> offset(static_cast<size_t>(n) + 1, 0);
  for (int r = 0; r < n; ++r) {
    const SizeBlob& b = sizes[static_cast<size_t>(r)];
    if (b.magic != kMagic || b.bytes > kMaxBytes) throw Error(cat("rank ", r, " sent no valid result size to the results gather"));
    offset[static_cast<size_t>(r) + 1] = offset[static_cast<size_t>(r)] + static_cast<size_t>(b.bytes);
  }

  std::vector<char> local;
  RecvRegion region;
  if (me == 0) {
    region.bytes = offset.back();
    if (group.recv_anywhere()) {
      local.resize(region.bytes);
      region.data = local.data();
    } else {
      region.data = group.scratch(0, region.bytes);
    }
  }
  ExchangeSpec second;
  second.op = "moedist demo results";
  second.members = members;
  if (me == 0) second.recv = std::span<const RecvRegion>(&region, 1);
  second.produce = [&](PutWriter& w) {
    if (me != 0 && !text.empty()) std::memcpy(w.dest(0, 0, offset[static_cast<size_t>(me)], text.size()), text.data(), text.size());
  };
  group.exchange(second);
  if (me != 0) return {};
  std::vector<std::string> texts(static_cast<size_t>(n));
  texts[0] = text;
  for (int r = 1; r < n; ++r)
    texts[static_cast<size_t>(r)].assign(static_cast<const char*>(region.data) + offset[static_cast<size_t>(r)],
                                         static_cast<size_t>(sizes[static_cast<size_t>(r)].bytes));
  return texts;
}

// The demo's parent, after the rank processes ended: every rank's file, or a missing result.
std::vector<RankSummary> collect_summaries(const Layer& l, const std::string& dir, int processes) {
  std::vector<RankSummary> out(static_cast<size_t>(processes));
  for (int p = 0; p < processes; ++p) {
    RankSummary& s = out[static_cast<size_t>(p)];
    s.tp_rank = static_cast<int>(p / l.W);
    s.ep_rank = p % l.W;
    read_summary(summary_path(dir, p), s);
  }
  return out;
}

// Rank 0 under an outside launcher: the results gathered over the report group, in global rank order.
// The removed ranks (--elastic) are not in the group: their status is known.
std::vector<RankSummary> gathered_summaries(const Layer& l, const std::vector<std::string>& texts) {
  std::vector<RankSummary> out(static_cast<size_t>(l.tp * l.W));
  for (size_t p = 0; p < out.size(); ++p) {
    out[p].tp_rank = static_cast<int>(static_cast<int64_t>(p) / l.W);
    out[p].ep_rank = static_cast<int64_t>(p) % l.W;
    if (out[p].ep_rank >= l.active_ranks) out[p].status = RankSummary::Status::kRemoved;
  }
  for (size_t m = 0; m < texts.size(); ++m) {
    const int64_t member = static_cast<int64_t>(m);
    RankSummary& s = out[static_cast<size_t>(member / l.active_ranks * l.W + member % l.active_ranks)];
    std::istringstream in(texts[m]);
    if (!parse_summary(in, s)) {
      s.status = RankSummary::Status::kError;
      s.error = "its result could not be read";
    }
  }
  return out;
}

std::string temp_root() {
  const char* t = std::getenv("TMPDIR");
  return t && *t ? t : "/tmp";
}

std::string self_exe() {
  char path[4096];
  const ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
  return n > 0 ? std::string(path, static_cast<size_t>(n)) : std::string("/proc/self/exe");
}

}  // namespace

// This process is one rank of a job: started by this demo's parent with --report-dir (it writes its
// result there), or by `moedist launch`, torchrun or mpirun (then rank 0 gathers the results over the
// report group and prints the report).
int run_rank_process(const DemoOptions& o, const LaunchEnv& env) {
  const Layer l = make_layer(o);
  const int processes = static_cast<int>(l.tp * l.W);
  const bool gather = o.report_dir.empty();
  if (env.world_size != processes) {
    if (env.rank == 0)
      std::fprintf(stderr, "moedist demo: started as rank %d of %d by the %s launcher, but --ranks %d%s needs %d processes\n", env.rank,
                   env.world_size, env.launcher.c_str(), o.ranks, l.tp == 2 ? " --tp 2" : "", processes);
    return 2;
  }
  RankSummary s;
  s.tp_rank = static_cast<int>(env.rank / l.W);
  s.ep_rank = env.rank % l.W;
  ProcessGroups groups;
  try {
    join_groups(l, env.rank, gather, groups);
  } catch (const std::exception& e) {
    record_error(s, e);
  }
  if (gather && env.rank == 0) {
    print_header(l, true, mpi_host_count(groups));
    std::fflush(stdout);
  }
  if (s.status != RankSummary::Status::kError) {
    if (rounds_mode(o))
      run_rounds_rank(l, env.rank, s);
    else
      run_process_rank(l, groups, s);
  }
  // The stopped rank of --stop that was told it is out did what it must.
  const int code = s.status == RankSummary::Status::kError && !s.declared_failed ? 1 : 0;

  if (!gather) {
    const bool written = write_summary(o.report_dir, env.rank, s);
    if (!written) std::fprintf(stderr, "moedist demo: rank %d: cannot write its result to %s\n", env.rank, o.report_dir.c_str());
    continue_stopped_rank(l, env.rank);
    return written ? code : 1;
  }
  if (s.status == RankSummary::Status::kError) std::fprintf(stderr, "moedist demo: rank %d: %s\n", env.rank, s.error.c_str());
  if (!groups.report) {  // removed by --elastic, or it could not join the report group
    if (env.rank != 0) return code;
    std::printf("error: %s: %s\n", rank_name(l, s.tp_rank, s.ep_rank).c_str(), s.error.c_str());
    return fail("rank 0 could not join its groups");
  }
  std::vector<std::string> texts;
  try {
    texts = gather_texts(*groups.report, summary_text(s));
  } catch (const std::exception& e) {
    if (env.rank != 0) {
      std::fprintf(stderr, "moedist demo: rank %d: cannot send its result to rank 0: %s\n", env.rank, e.what());
      return 1;
    }
    const std::string who = rank_name(l, s.tp_rank, s.ep_rank);
    if (s.status == RankSummary::Status::kError) std::printf("error: %s: %s\n", who.c_str(), s.error.c_str());
    std::printf("error: gathering the results on rank 0: %s\n", e.what());
    return fail("the ranks' results could not be gathered");
  }
  // Rank 0 now has this rank's result, failure included, and its exit code tells: a rank exiting 1 here
  // would make mpirun stop the job, rank 0 too, maybe before it printed the report.
  if (env.rank != 0) return 0;
  return report(l, gathered_summaries(l, texts), true, 0);
}

// Started directly: starts the rank processes through `moedist launch` (which stops the others when
// one fails and removes the job's shared-memory segments), each with these arguments plus
// --report-dir, then reads their results.
int run_parent(const DemoOptions& o, const std::vector<std::string>& args) {
  const Layer l = make_layer(o);
  const int processes = static_cast<int>(l.tp * l.W);
  print_header(l, true);
  std::fflush(stdout);

  std::string dir = temp_root() + "/moedist-demo-XXXXXX";
  if (!mkdtemp(dir.data())) throw std::runtime_error(cat("cannot create a directory ", dir, ": ", std::strerror(errno)));
  std::vector<std::string> launch_args = {"-n", std::to_string(processes), "--", self_exe(), "demo"};
  if (o.victim >= 0 && !o.victim_stops)  // the victim's death by SIGKILL is no failure of the job
    launch_args.insert(launch_args.begin(), {"--expect-signal", cat(o.victim, ":", SIGKILL)});
  launch_args.insert(launch_args.end(), args.begin(), args.end());
  launch_args.insert(launch_args.end(), {"--report-dir", dir});
  std::vector<char*> argv;
  for (std::string& a : launch_args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const int code = launch_main(static_cast<int>(launch_args.size()), argv.data());

  const std::vector<RankSummary> summaries = collect_summaries(l, dir, processes);
  VictimRecord victim;
  const bool have_victim = read_victim_record(dir, victim);
  remove_report_dir(dir, processes);
  if (rounds_mode(o)) return report_rounds(l, summaries, have_victim ? &victim : nullptr, code);
  return report(l, summaries, true, code);
}

}  // namespace moedist::tools::demo
