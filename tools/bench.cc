// moedist bench. The orchestrator (`moedist bench ...`) runs, for each rank count of the sweep,
// `mpirun -np W moedist bench-worker ...`; every worker rank runs moedist and the MPI_Alltoallv
// baseline on the same inputs, with a barrier before each timed iteration; rank 0 prints one JSON
// object per configuration and comm_alg. The orchestrator prints the table, writes JSON and the plot.
//
// Transports (--transport): shm (processes of one host, the default), mpi (MPI between every pair of
// ranks), hybrid (shared memory inside a host, MPI between hosts). Several hosts: pass mpirun's
// options through (--hostfile FILE, --mpirun-args "..."), or start the workers yourself:
//   mpirun -np 8 --hostfile hosts moedist bench-worker --transport hybrid --comm-alg fullmesh,hierarchy
// Hosts are those MPI reports (MPI_COMM_TYPE_SHARED, network namespace) unless --ranks-per-host sets
// them; comm_alg "hierarchy" uses them as its servers. For each configuration the JSON has, next to
// the latencies, the bytes that crossed between hosts per round (dispatch + combine, all ranks), for
// moedist (Transport::stats) and for the baseline (its Alltoallv counts to ranks on other hosts).
//
// Bytes per rank and round (the algorithmic bandwidth's numerator): each token row is sent to K
// experts and comes back once per expert:
//   dispatch: BS * K * (H * e + s), combine: BS * K * H * 2, with e = 1 and s = 4 for quant_mode 2
//   (int8 + scale), e = 2 and s = 0 otherwise; with comm_quant_mode 2 combine moves
//   BS * K * (H + 2 * ceil(H / 8)) (int8 and one 2-byte scale per group of 8).
#include "bench.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "moedist/moedist.h"
#include "core/config.h"
#include "ops/collective.h"
#include "core/half.h"

#ifdef MOEDIST_HAVE_MPI
#define OMPI_SKIP_MPICXX 1  // the C API only
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include "moedist/mpi.h"

#include "core/half.h"
#include "core/kernels.h"
#include "core/quant.h"
#endif

// ---- moedist bench --split: two micro-batches, their expert compute overlapped with the exchange ----
//
// Ranks are threads of this process (thread transport). Each iteration runs two micro-batches (own
// inputs each) through dispatch -> experts -> combine, where "experts" is a stand-in of fixed duration
// (--compute-us; --compute sleep: the host CPU is free meanwhile, as when an accelerator computes;
// spin: a busy loop on the host CPU). Two schedules, the same work:
//   sequential: dispatch(0) experts(0) combine(0) dispatch(1) experts(1) combine(1)
//   split:      dispatch(0) setup_d(1) experts(0) teardown_d(1) setup_c(0) experts(1) teardown_c(0) combine(1)
// A round is timed per rank after a barrier; the round time is the maximum over ranks.
namespace split_bench {

using SClock = std::chrono::steady_clock;

struct Options {
  int ranks = 4, tokens = 64, hidden = 1024, topk = 4, experts_per_rank = 2, iters = 40, warmup = 5;
  int compute_us = 500;
  bool spin = false;
};

void compute(const Options& o) {
  if (!o.spin) {
    std::this_thread::sleep_for(std::chrono::microseconds(o.compute_us));
    return;
  }
  const auto end = SClock::now() + std::chrono::microseconds(o.compute_us);
  volatile uint64_t x = 0;
  while (SClock::now() < end) x = x + 1;
}

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(mu_);
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  uint64_t gen_ = 0;
};

struct MicroBatch {
  std::vector<uint16_t> x;
  std::vector<int32_t> ids;
  std::vector<float> w;
  moedist::DispatchArgs d;
  moedist::CombineArgs c;
  moedist::DispatchResult r;
  moedist::Tensor expert_out;
};

void prepare(MicroBatch& m, const Options& o, int rank, int mb, const std::string& group) {
  const int E = o.experts_per_rank * o.ranks;
  std::mt19937 rng(static_cast<unsigned>(7919 * rank + 104729 * mb + 1));
  std::normal_distribution<float> nd(0.f, 1.f);
  m.x.resize(static_cast<size_t>(o.tokens) * static_cast<size_t>(o.hidden));
  for (auto& v : m.x) v = moedist::core::float_to_bf16(nd(rng));
  std::vector<int> pool(static_cast<size_t>(E));
  for (int t = 0; t < o.tokens; ++t) {
    for (int g = 0; g < E; ++g) pool[static_cast<size_t>(g)] = g;
    for (int k = 0; k < o.topk; ++k) {
      std::uniform_int_distribution<int> pick(k, E - 1);
      std::swap(pool[static_cast<size_t>(k)], pool[static_cast<size_t>(pick(rng))]);
      m.ids.push_back(pool[static_cast<size_t>(k)]);
      m.w.push_back(1.0f / static_cast<float>(o.topk));
    }
  }
  m.d.x = moedist::TensorView(m.x.data(), moedist::DType::kBFloat16, {o.tokens, o.hidden});
  m.d.expert_ids = moedist::TensorView(m.ids.data(), moedist::DType::kInt32, {o.tokens, o.topk});
  m.d.group_ep = group;
  m.d.ep_world_size = o.ranks;
  m.d.ep_rank_id = rank;
  m.d.moe_expert_num = E;
  m.c.expert_ids = m.d.expert_ids;
  m.c.expert_scales = moedist::TensorView(m.w.data(), moedist::DType::kFloat32, {o.tokens, o.topk});
  m.c.group_ep = group;
  m.c.ep_world_size = o.ranks;
  m.c.ep_rank_id = rank;
  m.c.moe_expert_num = E;
}

// After dispatch: the experts' output is the dispatched rows (bf16), the combine arguments follow.
void after_dispatch(MicroBatch& m) {
  m.expert_out = m.r.expand_x;
  m.c.expand_x = m.expert_out;
  m.c.assist_info_for_combine = m.r.assist_info_for_combine;
  m.c.ep_send_counts = m.r.ep_recv_counts;
}

double round_sequential(MicroBatch* mb, const Options& o) {
  const auto t0 = SClock::now();
  for (int i = 0; i < 2; ++i) {
    mb[i].r = moedist::dispatch_v2(mb[i].d);
    after_dispatch(mb[i]);
    compute(o);
    (void)moedist::combine_v2(mb[i].c);
  }
  return std::chrono::duration<double>(SClock::now() - t0).count();
}

double round_split(MicroBatch* mb, const Options& o) {
  const auto t0 = SClock::now();
  mb[0].r = moedist::dispatch_v2(mb[0].d);
  after_dispatch(mb[0]);
  const uint64_t hd = moedist::dispatch_setup(mb[1].d);
  compute(o);  // experts of micro-batch 0 while micro-batch 1's tokens travel
  mb[1].r = moedist::dispatch_teardown(hd);
  after_dispatch(mb[1]);
  const uint64_t hc = moedist::combine_setup(mb[0].c);
  compute(o);  // experts of micro-batch 1 while micro-batch 0's outputs travel back
  (void)moedist::combine_teardown(hc);
  (void)moedist::combine_v2(mb[1].c);
  return std::chrono::duration<double>(SClock::now() - t0).count();
}

int usage() {
  std::fprintf(stderr,
               "usage: moedist bench --split [--ranks 4] [--tokens 64] [--hidden 1024] [--topk 4] [--experts-per-rank 2]\n"
               "                     [--compute-us 500] [--compute sleep|spin] [--iters 40] [--warmup 5]\n"
               "Two micro-batches per round (ranks are threads): dispatch -> experts (a stand-in of fixed duration) ->\n"
               "combine, run sequentially and with the split-phase ops overlapping one micro-batch's experts with the\n"
               "other's exchange. Prints median and p10/p90 round times (max over ranks) of both and their ratio.\n");
  return 2;
}

int main_(int argc, char** argv) {
  Options o;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> int {
      if (i + 1 >= argc) throw moedist::InvalidArgument("moedist bench --split: " + a + " needs a value");
      return std::atoi(argv[++i]);
    };
    if (a == "--split") continue;
    if (a == "--ranks") o.ranks = next();
    else if (a == "--tokens") o.tokens = next();
    else if (a == "--hidden") o.hidden = next();
    else if (a == "--topk") o.topk = next();
    else if (a == "--experts-per-rank") o.experts_per_rank = next();
    else if (a == "--compute-us") o.compute_us = next();
    else if (a == "--iters") o.iters = next();
    else if (a == "--warmup") o.warmup = next();
    else if (a == "--compute") {
      if (i + 1 >= argc) return usage();
      const std::string k = argv[++i];
      if (k != "sleep" && k != "spin") return usage();
      o.spin = k == "spin";
    } else {
      std::fprintf(stderr, "moedist bench --split: unknown option %s\n", a.c_str());
      return usage();
    }
  }
  if (o.ranks < 1 || o.tokens < 1 || o.hidden < 1 || o.topk < 1 || o.topk > o.experts_per_rank * o.ranks || o.iters < 1 ||
      o.warmup < 0 || o.compute_us < 0)
    return usage();
  const std::string group = "bench_split";
  moedist::register_group(group, moedist::make_thread_group(o.ranks));
  Barrier barrier(o.ranks);
  // times[mode][rank][iter]
  std::vector<std::vector<std::vector<double>>> times(2, std::vector<std::vector<double>>(static_cast<size_t>(o.ranks)));
  std::vector<std::thread> threads;
  std::vector<std::string> errors(static_cast<size_t>(o.ranks));
  for (int r = 0; r < o.ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        MicroBatch mb[2];
        prepare(mb[0], o, r, 0, group);
        prepare(mb[1], o, r, 1, group);
        for (int it = 0; it < o.warmup + o.iters; ++it)
          for (int mode = 0; mode < 2; ++mode) {  // interleaved, so both see the same machine load
            barrier.wait();
            const double t = mode == 0 ? round_sequential(mb, o) : round_split(mb, o);
            if (it >= o.warmup) times[static_cast<size_t>(mode)][static_cast<size_t>(r)].push_back(t);
          }
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  moedist::unregister_group(group);
  for (const auto& e : errors)
    if (!e.empty()) {
      std::fprintf(stderr, "moedist bench --split: %s\n", e.c_str());
      return 1;
    }
  double med[2];
  for (int mode = 0; mode < 2; ++mode) {
    std::vector<double> v(static_cast<size_t>(o.iters), 0.0);
    for (int r = 0; r < o.ranks; ++r)
      for (int it = 0; it < o.iters; ++it)
        v[static_cast<size_t>(it)] = std::max(v[static_cast<size_t>(it)], times[static_cast<size_t>(mode)][static_cast<size_t>(r)][static_cast<size_t>(it)]);
    std::sort(v.begin(), v.end());
    auto q = [&](double f) { return v[static_cast<size_t>(f * static_cast<double>(v.size() - 1) + 0.5)] * 1e6; };
    med[mode] = q(0.5);
    std::printf("%-10s round (2 micro-batches): median %8.1f us  p10 %8.1f  p90 %8.1f\n", mode == 0 ? "sequential" : "split",
                q(0.5), q(0.1), q(0.9));
  }
  std::printf("ranks %d (threads), tokens %d, hidden %d, topk %d, experts %d, compute %d us per micro-batch (%s)\n", o.ranks, o.tokens,
              o.hidden, o.topk, o.experts_per_rank * o.ranks, o.compute_us, o.spin ? "spin" : "sleep");
  std::printf("split / sequential: %.3f (time saved per round: %.1f us; the experts take %d us of each round)\n", med[1] / med[0],
              med[0] - med[1], 2 * o.compute_us);
  return 0;
}

}  // namespace split_bench


namespace {

std::vector<int> parse_list(const std::string& s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) v.push_back(std::atoi(item.c_str()));
  return v;
}

[[maybe_unused]] std::string join(const std::vector<int>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

struct Sweep {
  std::vector<int> ranks = {2, 4, 8};
  std::vector<int> tokens = {1, 8, 32, 128, 512};
  std::vector<int> hidden = {7168};
  std::vector<int> experts = {16, 64};
  std::vector<int> quant = {0, 2};
  std::vector<int> comm_quant = {0};  // combine's comm_quant_mode; each value is a moedist row of its own
  int topk = 8;
  int iters = 30;
  int warmup = 5;
  std::string out = "bench-results";
  std::string transport = "shm";
  std::vector<std::string> algs = {"fullmesh"};
  int ranks_per_host = 0;
  std::string mpirun_args;  // passed to mpirun as they are (hostfile, --mca ...)
  bool waits = false;       // performance_info on every rank; rank 0 prints the W x W wait matrix
  int slow_rank = -1;       // this rank sleeps slow_us before each dispatch (to see it in the matrix)
  int slow_us = 0;
  bool python = false;      // --python: the same configurations through the Python package too
  double link_gbit = 0;     // --link-gbit: the rate of each host's link, for the link floor (0: not given)
};

std::vector<std::string> parse_words(const std::string& s, char sep) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) v.push_back(item);
  return v;
}

// The usage text: to stdout for --help (exit 0), to stderr after a usage error (exit 2).
int bench_usage(FILE* out = stderr) {
  std::fprintf(out,
               "usage: moedist bench [--ranks 2,4,8] [--tokens 1,8,32,128,512] [--hidden 7168] [--experts 16,64]\n"
               "                     [--quant 0,2] [--comm-quant 0] [--topk 8] [--iters 30] [--warmup 5] [--out DIR] [--quick]\n"
               "                     [--transport shm|mpi|hybrid|ucx] [--comm-alg fullmesh,hierarchy] [--ranks-per-host N]\n"
               "                     [--hostfile FILE] [--mpirun-args \"ARGS\"] [--waits [--slow-rank R --slow-us N]] [--python]\n"
               "                     [--link-gbit G]\n"
               "  Runs each configuration under mpirun: moedist and the MPI_Alltoallv pipeline baseline side by\n"
               "  side, plus memcpy bandwidth, and the bytes that crossed between hosts per round for both.\n"
               "  --transport: shm (processes of this host, default), mpi (MPI between all ranks), hybrid\n"
               "  (shared memory inside a host, MPI between hosts), ucx (the same with UCX between hosts; MPI\n"
               "  only starts it). --comm-alg: the algorithms to time\n"
               "  (hierarchy: servers = hosts). --ranks-per-host: consecutive blocks of N ranks are hosts\n"
               "  (default: as MPI reports them). --hostfile / --mpirun-args go to mpirun (several hosts:\n"
               "  --hostfile hosts --mpirun-args \"--mca btl tcp,self\"). Writes DIR/bench.json, DIR/bench.md\n"
               "  and DIR/latency.png (the plot needs python3 with matplotlib).\n"
               "  --quant: dispatch's quant_mode; --comm-quant: combine's comm_quant_mode (0 and/or 2, 2 = int8 with\n"
               "  one scale per 8 elements; fullmesh only), each timed on the same inputs, one row each.\n"
               "  With quant 0, comm-quant 0 and fullmesh, one more untimed round whose experts return their input rows checks\n"
               "  that moedist and the baseline combine to the same bits; a difference fails the run.\n"
               "  --waits: every rank passes performance_info to the timed calls; for each configuration and\n"
               "  comm_alg the W x W matrix of wait times is printed (row i = rank i, column j = microseconds rank i\n"
               "  waited for rank j, per round: dispatch + combine, mean over the timed rounds). --slow-rank R\n"
               "  --slow-us N: rank R sleeps N microseconds before each dispatch, so its column stands out (the\n"
               "  other ranks' moedist times in the table then include that wait; the baseline is not delayed).\n"
               "  --python: after each rank count's C++ run, the same configurations through the Python package\n"
               "  (bench/python_bench.py: processes, torch ops) go into bench.json as \"python\" beside \"moedist\", with\n"
               "  python_vs_moedist_round and the time Python adds per call; the interpreter is $MOEDIST_PYTHON, else\n"
               "  build-py/venv/bin/python of the source tree, else python3 (without torch and moedist the entry says so).\n"
               "  Every row has, for moedist and the baseline, the bytes on the busiest host link per round (the larger\n"
               "  direction, in or out, of the host that moves most across hosts). --link-gbit G: each host's link\n"
               "  carries G Gbit/s each way (scripts/shaped-links.sh makes such links), and the rows add the link floor\n"
               "  (those bytes / G; no round can be faster) and the median round's ratio to it. cpu_ms_per_round: the CPU\n"
               "  time (user + system) all ranks' processes used per timed round, summed.\n"
               "  The worker can be started directly: mpirun -np 8 --hostfile hosts moedist bench-worker [options]\n"
               "  prints one JSON object per configuration.\n");
  return out == stderr ? 2 : 0;
}

bool help_asked(int argc, char** argv) {
  for (int i = 0; i < argc; ++i)
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") return true;
  return false;
}

[[maybe_unused]] bool parse_sweep(int argc, char** argv, Sweep& s) {
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--ranks") s.ranks = parse_list(next());
    else if (a == "--tokens") s.tokens = parse_list(next());
    else if (a == "--hidden") s.hidden = parse_list(next());
    else if (a == "--experts") s.experts = parse_list(next());
    else if (a == "--quant") s.quant = parse_list(next());
    else if (a == "--comm-quant") s.comm_quant = parse_list(next());
    else if (a == "--topk") s.topk = std::atoi(next().c_str());
    else if (a == "--iters") s.iters = std::atoi(next().c_str());
    else if (a == "--warmup") s.warmup = std::atoi(next().c_str());
    else if (a == "--out") s.out = next();
    else if (a == "--transport") s.transport = next();
    else if (a == "--comm-alg") s.algs = parse_words(next(), ',');
    else if (a == "--ranks-per-host") s.ranks_per_host = std::atoi(next().c_str());
    else if (a == "--hostfile") s.mpirun_args += " --hostfile '" + next() + "'";
    else if (a == "--mpirun-args") s.mpirun_args += " " + next();
    else if (a == "--waits") s.waits = true;
    else if (a == "--slow-rank") s.slow_rank = std::atoi(next().c_str());
    else if (a == "--slow-us") s.slow_us = std::atoi(next().c_str());
    else if (a == "--python") s.python = true;
    else if (a == "--link-gbit") {
      const std::string v = next();
      char* end = nullptr;
      s.link_gbit = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0' || !(s.link_gbit > 0) || s.link_gbit > 1e6) {
        std::fprintf(stderr, "moedist bench: --link-gbit takes the links' rate in Gbit/s, a number > 0, got '%s'\n", v.c_str());
        return false;
      }
    }
    else if (a == "--quick") {
      s.ranks = {2, 3};
      s.tokens = {1, 8};
      s.hidden = {256};
      s.experts = {6};
      s.quant = {0, 2};
      s.comm_quant = {0, 2};
      s.topk = 2;
      s.iters = 3;
      s.warmup = 1;
    } else {
      std::fprintf(stderr, "moedist bench: unknown option %s\n", a.c_str());
      return false;
    }
  }
  if (s.transport != "shm" && s.transport != "mpi" && s.transport != "hybrid" && s.transport != "ucx") {
    std::fprintf(stderr, "moedist bench: --transport takes shm, mpi, hybrid or ucx, got '%s'\n", s.transport.c_str());
    return false;
  }
  for (const auto& a : s.algs)
    if (a != "fullmesh" && a != "hierarchy") {
      std::fprintf(stderr, "moedist bench: --comm-alg takes fullmesh and/or hierarchy, got '%s'\n", a.c_str());
      return false;
    }
  if (s.algs.empty() || s.ranks_per_host < 0) {
    std::fprintf(stderr, "moedist bench: empty --comm-alg or negative --ranks-per-host\n");
    return false;
  }
  for (int q : s.quant)
    if (q != 0 && q != 2) {
      std::fprintf(stderr, "moedist bench: --quant takes 0 and/or 2, got %d\n", q);
      return false;
    }
  for (int q : s.comm_quant)
    if (q != 0 && q != 2) {
      std::fprintf(stderr, "moedist bench: --comm-quant takes 0 and/or 2, got %d\n", q);
      return false;
    }
  if (s.comm_quant.empty()) {
    std::fprintf(stderr, "moedist bench: empty --comm-quant\n");
    return false;
  }
  if (s.slow_us < 0 || s.slow_rank < -1 || (s.slow_us > 0 && s.slow_rank < 0)) {
    std::fprintf(stderr, "moedist bench: --slow-us N needs N >= 0 and --slow-rank R with R >= 0 (got --slow-rank %d --slow-us %d)\n",
                 s.slow_rank, s.slow_us);
    return false;
  }
  if (s.iters < 1 || s.warmup < 0 || s.topk < 1 || s.ranks.empty() || s.tokens.empty() || s.hidden.empty() || s.experts.empty()) {
    std::fprintf(stderr, "moedist bench: empty sweep or bad --iters/--warmup/--topk\n");
    return false;
  }
  return true;
}

}  // namespace

#ifndef MOEDIST_HAVE_MPI
int bench_main(int argc, char** argv, const char*) {
  for (int i = 0; i < argc; ++i)
    if (std::string(argv[i]) == "--split") return split_bench::main_(argc, argv);
  if (help_asked(argc, argv)) return bench_usage(stdout);
  std::fprintf(stderr, "moedist bench: this build has no MPI (install libopenmpi-dev openmpi-bin and rebuild)\n");
  return 2;
}
int bench_worker_main(int, char**) { return bench_main(0, nullptr, nullptr); }
#else

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct Stats {
  double median = 0, p10 = 0, p90 = 0;
};
Stats stats_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  auto q = [&](double f) { return v[static_cast<size_t>(std::min<double>(static_cast<double>(v.size() - 1), f * static_cast<double>(v.size() - 1) + 0.5))]; };
  return {q(0.5), q(0.1), q(0.9)};
}

// Per-iteration times, the maximum over ranks (the round ends when the slowest rank is done).
std::vector<double> max_over_ranks(const std::vector<double>& mine) {
  std::vector<double> out(mine.size());
  MPI_Allreduce(mine.data(), out.data(), static_cast<int>(mine.size()), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

// The bytes on the busiest host link per round: each host's link carries, out, what its ranks sent to
// other hosts and, in, what they received from other hosts; the larger direction of the busiest host.
// Collective; the result is meaningful on rank 0.
double busiest_host_link_bytes(uint64_t sent_inter, uint64_t recv_inter, const std::vector<int>& host_of, int iters) {
  int W = 0, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &W);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const uint64_t mine[2] = {sent_inter, recv_inter};
  std::vector<uint64_t> all(2 * static_cast<size_t>(W));
  MPI_Gather(mine, 2, MPI_UINT64_T, all.data(), 2, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  if (rank != 0) return 0;
  std::map<int, std::pair<uint64_t, uint64_t>> link;  // host -> (out, in)
  for (int r = 0; r < W; ++r) {
    auto& l = link[host_of[static_cast<size_t>(r)]];
    l.first += all[2 * static_cast<size_t>(r)];
    l.second += all[2 * static_cast<size_t>(r) + 1];
  }
  uint64_t busiest = 0;
  for (const auto& [h, l] : link) busiest = std::max({busiest, l.first, l.second});
  return static_cast<double>(busiest) / iters;
}

// ",\"busiest_host_link_bytes_per_round\":B" and, given the links' rate, the floor that many bytes
// put on a round (B / rate) and the median round's ratio to it.
std::string json_link(double busiest, double link_gbit, double round_median_s, double cpu_ms_per_round) {
  char buf[320];
  int n = std::snprintf(buf, sizeof(buf), ",\"cpu_ms_per_round\":%.2f,\"busiest_host_link_bytes_per_round\":%.0f", cpu_ms_per_round, busiest);
  if (link_gbit > 0) {
    const double floor_s = busiest * 8.0 / (link_gbit * 1e9);
    std::snprintf(buf + n, sizeof(buf) - static_cast<size_t>(n), ",\"link_floor_us\":%.2f,\"round_over_link_floor\":%.3f", floor_s * 1e6,
                  floor_s > 0 ? round_median_s / floor_s : 0.0);
  }
  return buf;
}

// CPU time (user + system) this process has used, in seconds.
double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + 1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

struct Inputs {
  int W, rank, BS, H, K, E, quant;
  std::vector<uint16_t> x;
  std::vector<int32_t> ids;
  std::vector<float> w;
};

Inputs make_inputs(int W, int rank, int BS, int H, int K, int E, int quant) {
  Inputs in{W, rank, BS, H, K, E, quant, {}, {}, {}};
  std::mt19937 rng(static_cast<unsigned>(1000 + rank * 7 + BS * 13 + E));
  std::normal_distribution<float> nd(0.f, 1.f);
  in.x.resize(static_cast<size_t>(BS) * H);
  for (auto& v : in.x) v = moedist::core::float_to_bf16(nd(rng));
  std::vector<int> pool(static_cast<size_t>(E));
  for (int t = 0; t < BS; ++t) {
    for (int g = 0; g < E; ++g) pool[static_cast<size_t>(g)] = g;
    for (int k = 0; k < K; ++k) {
      std::uniform_int_distribution<int> pick(k, E - 1);
      std::swap(pool[static_cast<size_t>(k)], pool[static_cast<size_t>(pick(rng))]);
      in.ids.push_back(pool[static_cast<size_t>(k)]);
      in.w.push_back(1.0f / static_cast<float>(K));
    }
  }
  return in;
}

struct Timing {
  std::vector<double> dispatch, combine, round;
  uint64_t bytes_inter = 0, bytes_all = 0;  // this rank's sends over the timed iterations
  uint64_t bytes_recv_inter = 0;            // what this rank received from other hosts over them
  double cpu_s = 0;                         // CPU time (user + system) this process used in them
  // quant_mode 0: the combined output of one more, untimed round whose experts return their input
  // rows, so that moedist and the baseline can be checked against each other (bit for bit: the same
  // rows summed in the same order by the same kernel); empty with quant_mode 2.
  std::vector<uint16_t> check_out;
  double metadata_check_us = 0;  // combine's check of its metadata against dispatch's, per call (median)
};

// waits: null, or W entries that the timed rounds' performance_info accumulates into. slow_us: this
// rank sleeps that long before each dispatch (outside its own timings).
Timing run_moedist(const Inputs& in, int warmup, int iters, const std::string& alg, int comm_quant, moedist::Transport& t,
                   int64_t* waits = nullptr, int slow_us = 0) {
  using namespace moedist;
  const bool hier = alg == "hierarchy";
  DispatchArgs d;
  d.x = TensorView(in.x.data(), DType::kBFloat16, {in.BS, in.H});
  d.expert_ids = TensorView(in.ids.data(), DType::kInt32, {in.BS, in.K});
  d.group_ep = "bench";
  d.ep_world_size = in.W;
  d.ep_rank_id = in.rank;
  d.moe_expert_num = in.E;
  d.quant_mode = in.quant;
  d.comm_alg = alg;
  if (hier) d.expert_scales = TensorView(in.w.data(), DType::kFloat32, {in.BS, in.K});  // hierarchy carries the weights
  DispatchResult r = dispatch_v2(d);
  // The experts' output stands in as a fixed bf16 buffer of the dispatched rows, filled with this
  // rank's token values (so that comm_quant_mode 2 quantizes realistic values, not zeros).
  Tensor expert_out(DType::kBFloat16, {r.expand_x.size(0), in.H});
  {
    unsigned char* eo = static_cast<unsigned char*>(expert_out.data());
    const size_t total = static_cast<size_t>(expert_out.numel()) * 2, chunk = in.x.size() * 2;
    for (size_t at = 0; chunk && at < total; at += chunk) std::memcpy(eo + at, in.x.data(), std::min(chunk, total - at));
  }
  CombineArgs c;
  c.expand_x = expert_out;
  c.expert_ids = d.expert_ids;
  c.expert_scales = TensorView(in.w.data(), DType::kFloat32, {in.BS, in.K});
  c.group_ep = "bench";
  c.ep_world_size = in.W;
  c.ep_rank_id = in.rank;
  c.moe_expert_num = in.E;
  c.comm_alg = alg;
  c.comm_quant_mode = comm_quant;
  Timing tm;
  TransportStats s0{};
  std::vector<int64_t> warmup_waits(static_cast<size_t>(in.W), 0);  // the warmup rounds' waits, not reported
  for (int it = 0; it < warmup + iters; ++it) {
    if (waits) {
      const TensorView pi(it < warmup ? warmup_waits.data() : waits, DType::kInt64, {in.W});
      d.performance_info = pi;
      c.performance_info = pi;
    }
    MPI_Barrier(MPI_COMM_WORLD);
    if (it == warmup) {
      s0 = t.stats();
      tm.cpu_s = -cpu_seconds();
    }
    if (slow_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(slow_us));
    const auto t0 = Clock::now();
    r = dispatch_v2(d);
    const double td = seconds_since(t0);
    c.assist_info_for_combine = r.assist_info_for_combine;
    c.ep_send_counts = r.ep_recv_counts;
    if (hier) c.expand_scales = r.expand_scales;
    const auto t1 = Clock::now();
    Tensor out = combine_v2(c);
    const double tc = seconds_since(t1);
    if (it >= warmup) {
      tm.dispatch.push_back(td);
      tm.combine.push_back(tc);
      tm.round.push_back(td + tc);
    }
  }
  {  // what combine's metadata check costs, on this rank's real metadata (part of the combine times above)
    const moedist::core::EpConfig cfg = moedist::core::resolve_combine(c);
    const moedist::core::CombineCounts counts = moedist::core::combine_counts(cfg, c);
    std::vector<double> us;
    for (int i = 0; i < std::max(iters, 5); ++i) {
      const auto t0 = Clock::now();
      const bool ok = moedist::ops::was_dispatched(t, moedist::ops::combine_metadata_digest(cfg, c, counts));
      us.push_back(seconds_since(t0) * 1e6);
      if (!ok) throw moedist::Error("bench: the metadata check did not recognise dispatch's own outputs");
    }
    std::sort(us.begin(), us.end());
    tm.metadata_check_us = us[us.size() / 2];
  }
  d.performance_info = c.performance_info = TensorView();  // the check round below is not counted
  tm.cpu_s += cpu_seconds();
  const TransportStats s1 = t.stats();
  tm.bytes_inter = s1.bytes_sent_inter_host - s0.bytes_sent_inter_host;
  tm.bytes_all = s1.bytes_sent - s0.bytes_sent;
  tm.bytes_recv_inter = s1.bytes_received_inter_host - s0.bytes_received_inter_host;
  if (in.quant == 0 && comm_quant == 0) {  // the check round: each expert returns the rows it received
    MPI_Barrier(MPI_COMM_WORLD);
    r = dispatch_v2(d);
    c.expand_x = r.expand_x;
    c.assist_info_for_combine = r.assist_info_for_combine;
    c.ep_send_counts = r.ep_recv_counts;
    if (hier) c.expand_scales = r.expand_scales;
    const Tensor out = combine_v2(c);
    tm.check_out.assign(out.data_as<uint16_t>(), out.data_as<uint16_t>() + out.numel());
  }
  return tm;
}

// displs[p] = counts[0] + ... + counts[p - 1]
void exclusive_sums(const std::vector<int>& counts, std::vector<int>& displs) {
  int sum = 0;
  for (size_t p = 0; p < counts.size(); ++p) {
    displs[p] = sum;
    sum += counts[p];
  }
}

// The pipeline a user would write with MPI: permute rows by destination, exchange counts, Alltoallv,
// regroup by local expert; back: permute to arrival order, Alltoallv, weighted sum. Buffers are
// allocated once; rows carry their local expert (and scale) in a small header.
Timing run_baseline(const Inputs& in, int warmup, int iters, const std::vector<int>& host_of) {
  const int W = in.W, BS = in.BS, H = in.H, K = in.K, L = in.E / W;
  const bool q = in.quant == 2;
  const size_t payload = static_cast<size_t>(H) * (q ? 1 : 2);
  const size_t rec = 8 + payload;  // [int32 local expert | float scale | row]
  const size_t ret = static_cast<size_t>(H) * 2;
  const size_t n_send = static_cast<size_t>(BS) * K;
  std::vector<int> scount(W), sdispl(W), rcount(W), rdispl(W), cnt_rows(W), rcnt_rows(W);
  std::vector<unsigned char> sendbuf(n_send * rec), recvbuf, expand, expert_out, backsend, backrecv(n_send * ret);
  std::vector<size_t> order(n_send);  // send position -> (t*K + k)
  std::vector<size_t> where;          // received row -> its row in the expert-major buffer
  std::vector<uint16_t> out(static_cast<size_t>(BS) * H);
  std::vector<moedist::core::RowTerm> terms(static_cast<size_t>(K));
  std::vector<int8_t> qx(q ? static_cast<size_t>(BS) * H : 0);
  std::vector<float> qscale(q ? static_cast<size_t>(BS) : 0);
  Timing t;
  const int check = q ? 0 : 1;  // quant_mode 0: one more, untimed round with experts returning their input
  for (int it = 0; it < warmup + iters + check; ++it) {
    const bool checking = it == warmup + iters;
    MPI_Barrier(MPI_COMM_WORLD);
    if (it == warmup) t.cpu_s = -cpu_seconds();
    if (checking) t.cpu_s += cpu_seconds();
    const auto t0 = Clock::now();
    // dispatch: permute by destination rank
    std::fill(cnt_rows.begin(), cnt_rows.end(), 0);
    for (size_t i = 0; i < n_send; ++i) ++cnt_rows[static_cast<size_t>(in.ids[i] / L)];
    std::vector<int> pos(W, 0);
    for (int p = 1; p < W; ++p) pos[static_cast<size_t>(p)] = pos[static_cast<size_t>(p - 1)] + cnt_rows[static_cast<size_t>(p - 1)];
    // quant_mode 2: each token quantized once (moedist's vectorized kernel), then copied like bf16 rows
    if (q)
      for (int tk = 0; tk < BS; ++tk)
        moedist::core::dynamic_quant_row_fast(moedist::DType::kBFloat16, in.x.data() + static_cast<size_t>(tk) * H, nullptr, H,
                                              qx.data() + static_cast<size_t>(tk) * H, &qscale[static_cast<size_t>(tk)]);
    for (size_t i = 0; i < n_send; ++i) {
      const int g = in.ids[i];
      const size_t at = static_cast<size_t>(pos[static_cast<size_t>(g / L)]++);
      order[at] = i;
      unsigned char* r = sendbuf.data() + at * rec;
      const int32_t e = g % L;
      std::memcpy(r, &e, 4);
      const size_t tk = i / static_cast<size_t>(K);
      const float scale = q ? qscale[tk] : 0.f;
      if (q)
        std::memcpy(r + 8, qx.data() + tk * static_cast<size_t>(H), payload);
      else
        std::memcpy(r + 8, in.x.data() + tk * static_cast<size_t>(H), payload);
      std::memcpy(r + 4, &scale, 4);
    }
    MPI_Alltoall(cnt_rows.data(), 1, MPI_INT, rcnt_rows.data(), 1, MPI_INT, MPI_COMM_WORLD);
    // Bytes this rank sends to other ranks (counts, rows out, rows back), and to other hosts.
    if (it >= warmup && !checking)
      for (int p = 0; p < W; ++p) {
        if (p == in.rank) continue;
        const uint64_t b = 4 + static_cast<uint64_t>(cnt_rows[static_cast<size_t>(p)]) * rec +
                           static_cast<uint64_t>(rcnt_rows[static_cast<size_t>(p)]) * ret;
        t.bytes_all += b;
        if (host_of[static_cast<size_t>(p)] != host_of[static_cast<size_t>(in.rank)]) {
          t.bytes_inter += b;
          t.bytes_recv_inter += 4 + static_cast<uint64_t>(rcnt_rows[static_cast<size_t>(p)]) * rec +
                                static_cast<uint64_t>(cnt_rows[static_cast<size_t>(p)]) * ret;
        }
      }
    int total = 0;
    for (int p = 0; p < W; ++p) {
      scount[static_cast<size_t>(p)] = cnt_rows[static_cast<size_t>(p)] * static_cast<int>(rec);
      rcount[static_cast<size_t>(p)] = rcnt_rows[static_cast<size_t>(p)] * static_cast<int>(rec);
      total += rcnt_rows[static_cast<size_t>(p)];
    }
    exclusive_sums(scount, sdispl);
    exclusive_sums(rcount, rdispl);
    recvbuf.resize(static_cast<size_t>(total) * rec);
    MPI_Alltoallv(sendbuf.data(), scount.data(), sdispl.data(), MPI_BYTE, recvbuf.data(), rcount.data(), rdispl.data(), MPI_BYTE,
                  MPI_COMM_WORLD);
    // regroup by local expert (stable: source rank, then token order)
    std::vector<int> per(static_cast<size_t>(L) + 1, 0);
    for (int i = 0; i < total; ++i) {
      int32_t e;
      std::memcpy(&e, recvbuf.data() + static_cast<size_t>(i) * rec, 4);
      ++per[static_cast<size_t>(e) + 1];
    }
    for (int e = 0; e < L; ++e) per[static_cast<size_t>(e) + 1] += per[static_cast<size_t>(e)];
    expand.resize(static_cast<size_t>(total) * (payload + 4));
    where.resize(static_cast<size_t>(total));
    for (int i = 0; i < total; ++i) {
      const unsigned char* r = recvbuf.data() + static_cast<size_t>(i) * rec;
      int32_t e;
      std::memcpy(&e, r, 4);
      const size_t at = static_cast<size_t>(per[static_cast<size_t>(e)]++);
      where[static_cast<size_t>(i)] = at;
      std::memcpy(expand.data() + at * payload, r + 8, payload);
    }
    const double td = seconds_since(t0);

    // combine: the experts' output (a fixed bf16 buffer), back in arrival order, Alltoallv, weighted sum
    expert_out.resize(static_cast<size_t>(total) * ret);
    if (checking) std::memcpy(expert_out.data(), expand.data(), static_cast<size_t>(total) * ret);  // payload == ret
    const auto t1 = Clock::now();
    backsend.resize(static_cast<size_t>(total) * ret);
    for (int i = 0; i < total; ++i)
      std::memcpy(backsend.data() + static_cast<size_t>(i) * ret, expert_out.data() + where[static_cast<size_t>(i)] * ret, ret);
    for (int p = 0; p < W; ++p) {
      scount[static_cast<size_t>(p)] = rcnt_rows[static_cast<size_t>(p)] * static_cast<int>(ret);
      rcount[static_cast<size_t>(p)] = cnt_rows[static_cast<size_t>(p)] * static_cast<int>(ret);
    }
    exclusive_sums(scount, sdispl);
    exclusive_sums(rcount, rdispl);
    MPI_Alltoallv(backsend.data(), scount.data(), sdispl.data(), MPI_BYTE, backrecv.data(), rcount.data(), rdispl.data(), MPI_BYTE,
                  MPI_COMM_WORLD);
    // position of (t, k) in backrecv: the inverse of `order`
    std::vector<size_t> slot_of(n_send);
    for (size_t at = 0; at < n_send; ++at) slot_of[order[at]] = at;
    // the weighted sum with moedist's own vectorized kernel, so that the two differ in data movement only
    for (int tk = 0; tk < BS; ++tk) {
      for (int k = 0; k < K; ++k) {
        const size_t i = static_cast<size_t>(tk) * K + static_cast<size_t>(k);
        terms[static_cast<size_t>(k)] = {reinterpret_cast<const uint16_t*>(backrecv.data() + slot_of[i] * ret), in.w[i], true};
      }
      moedist::core::reduce_terms_bf16(out.data() + static_cast<size_t>(tk) * H, terms.data(), K, H);
    }
    const double tc = seconds_since(t1);
    if (checking) t.check_out = out;
    if (it >= warmup && !checking) {
      t.dispatch.push_back(td);
      t.combine.push_back(tc);
      t.round.push_back(td + tc);
    }
  }
  return t;
}

double memcpy_gbps() {
  const size_t n = size_t{256} << 20;
  std::vector<unsigned char> a(n, 1), b(n, 0);
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), n);
    best = std::min(best, seconds_since(t0));
  }
  volatile unsigned char sink = b[n / 2];
  (void)sink;
  return static_cast<double>(n) / best / 1e9;
}

std::string json_stats(const char* name, const std::vector<double>& v) {
  const Stats s = stats_of(v);
  char buf[256];
  std::snprintf(buf, sizeof(buf), "\"%s_us\":{\"median\":%.2f,\"p10\":%.2f,\"p90\":%.2f}", name, s.median * 1e6, s.p10 * 1e6, s.p90 * 1e6);
  return buf;
}

// ---- --python: the same configurations through the Python package (bench/python_bench.py) ----

std::string shell_quote(const std::string& v) {
  std::string o = "'";
  for (char c : v) o += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return o + "'";
}

std::string json_escape(const std::string& v) {
  std::string o;
  for (unsigned char c : v) {
    if (c == '"' || c == '\\') o += '\\', o += static_cast<char>(c);
    else if (c < 0x20) o += ' ';
    else o += static_cast<char>(c);
  }
  return o;
}

// $MOEDIST_PYTHON, else the source tree's build-py/venv (scripts/python-setup.sh), else python3.
std::string python_interpreter() {
  const char* e = std::getenv("MOEDIST_PYTHON");
  if (e != nullptr && *e != '\0') return e;
  const std::string venv = std::string(MOEDIST_SOURCE_DIR) + "/build-py/venv/bin/python";
  if (access(venv.c_str(), X_OK) == 0) return venv;
  return "python3";
}

// Empty when `py` imports torch and moedist; else why the Python entries are missing.
std::string python_unavailable(const std::string& py) {
  FILE* p = popen((shell_quote(py) + " -c 'import torch, moedist' 2>&1").c_str(), "r");
  if (p == nullptr) return "cannot start " + py;
  std::string out, last;
  char buf[4096];
  while (std::fgets(buf, sizeof(buf), p)) out += buf;
  const int rc = pclose(p);
  if (rc == 0) return "";
  std::stringstream ss(out);
  for (std::string line; std::getline(ss, line);)
    if (!line.empty()) last = line;
  return py + " cannot import torch and moedist (" + (last.empty() ? "exit status " + std::to_string(rc) : last) +
         "); scripts/python-setup.sh installs them, MOEDIST_PYTHON names another interpreter";
}

std::string config_key(int W, int BS, int H, int E, int q, int cq, const std::string& alg) {
  return std::to_string(W) + " " + std::to_string(BS) + " " + std::to_string(H) + " " + std::to_string(E) + " " +
         std::to_string(q) + " " + std::to_string(cq) + " " + alg;
}

// Runs bench/python_bench.py for W ranks; its rows go to `got` by configuration. Empty, or why it failed.
std::string run_python(const std::string& py, int W, const std::string& args, std::map<std::string, std::string>& got) {
  const std::string cmd = shell_quote(py) + " " + shell_quote(std::string(MOEDIST_SOURCE_DIR) + "/bench/python_bench.py") +
                          " --ranks " + std::to_string(W) + args;
  std::fprintf(stderr, "moedist bench: %s\n", cmd.c_str());
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return "cannot start " + py;
  char line[8192];
  while (std::fgets(line, sizeof(line), p)) {
    int w = 0, bs = 0, h = 0, e = 0, q = 0, cq = 0, n = 0;
    char alg[64] = {};
    if (std::sscanf(line, "PYROW %d %d %d %d %d %d %63s %n", &w, &bs, &h, &e, &q, &cq, alg, &n) == 7 && line[n] == '{') {
      std::string obj(line + n);
      obj.erase(obj.find_last_not_of("\r\n") + 1);
      got[config_key(w, bs, h, e, q, cq, alg)] = obj;
    }
  }
  const int rc = pclose(p);
  if (rc != 0) return "the Python run with " + std::to_string(W) + " ranks failed (exit status " + std::to_string(rc) + ", its errors are above)";
  return "";
}

// The median of "<field>":{"median":...} (the first occurrence), or -1.
double median_of(const std::string& json, const std::string& field) {
  const std::string pat = "\"" + field + "\":{\"median\":";
  const size_t at = json.find(pat);
  return at == std::string::npos ? -1.0 : std::strtod(json.c_str() + at + pat.size(), nullptr);
}

// A row of the C++ worker with its "python" entry added (and the comparison, when there is one).
std::string with_python(const std::string& row, const std::map<std::string, std::string>& got,
                        const std::map<int, std::string>& failed, const std::string& unavailable) {
  int W = 0, BS = 0, H = 0, K = 0, E = 0, q = 0, cq = 0;
  char transport[64] = {}, alg[64] = {};
  const int n = std::sscanf(row.c_str(), "{\"ranks\":%d,\"tokens\":%d,\"hidden\":%d,\"topk\":%d,\"experts\":%d,\"quant_mode\":%d,"
                            "\"comm_quant_mode\":%d,\"transport\":\"%63[^\"]\",\"comm_alg\":\"%63[^\"]\"", &W, &BS, &H, &K, &E, &q, &cq,
                            transport, alg);
  std::string add;
  const auto hit = n == 9 ? got.find(config_key(W, BS, H, E, q, cq, alg)) : got.end();
  if (hit != got.end()) {
    const double pr = median_of(hit->second, "round_us"), mr = median_of(row, "round_us");
    char buf[256];
    std::snprintf(buf, sizeof(buf), ",\"python_vs_moedist_round\":%.3f,\"python_added_us_per_call\":{\"dispatch\":%.2f,\"combine\":%.2f}",
                  mr > 0 ? pr / mr : 0.0, median_of(hit->second, "dispatch_us") - median_of(row, "dispatch_us"),
                  median_of(hit->second, "combine_us") - median_of(row, "combine_us"));
    add = ",\"python\":" + hit->second + buf;
  } else {
    std::string why = unavailable;
    if (why.empty()) {
      const auto f = failed.find(W);
      why = f != failed.end() ? f->second : "no Python result for this configuration";
    }
    add = ",\"python\":{\"unavailable\":\"" + json_escape(why) + "\"}";
  }
  const size_t end = row.find_last_of('}');
  return row.substr(0, end) + add + row.substr(end);
}

}  // namespace

int bench_worker_main(int argc, char** argv) {
  Sweep s;
  if (help_asked(argc, argv)) return bench_usage(stdout);
  if (!parse_sweep(argc, argv, s)) return 2;
  MPI_Init(nullptr, nullptr);
  int W, rank;
  MPI_Comm_size(MPI_COMM_WORLD, &W);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  int rc = 0;
  try {
    moedist::GroupOptions opt;
    moedist::MpiOptions mo;
    mo.ranks_per_host = s.ranks_per_host;
    std::shared_ptr<moedist::Transport> group;
    if (s.transport == "shm") {
      opt.ranks_per_server = s.ranks_per_host;  // hierarchy's servers; all ranks share this host
      group = moedist::make_shm_group("bench", W, rank, opt);
    } else if (s.transport == "mpi") {
      group = moedist::make_mpi_group(MPI_COMM_WORLD, opt, mo);
    } else if (s.transport == "ucx") {
      group = moedist::make_ucx_group(MPI_COMM_WORLD, opt, mo);
    } else {
      group = moedist::make_hybrid_group(MPI_COMM_WORLD, opt, mo);
    }
    moedist::register_group("bench", {group});
    std::vector<int> host_of = moedist::mpi_hosts(*group);
    if (host_of.empty()) host_of.assign(static_cast<size_t>(W), 0);
    const int nhosts = *std::max_element(host_of.begin(), host_of.end()) + 1;
    const double mem = rank == 0 ? memcpy_gbps() : 0.0;
    for (int H : s.hidden)
      for (int E : s.experts)
        for (int q : s.quant)
          for (int BS : s.tokens) {
            if (E % W != 0 || s.topk > E) continue;
            const Inputs in = make_inputs(W, rank, BS, H, s.topk, E, q);
            const Timing b = run_baseline(in, s.warmup, s.iters, host_of);
            const auto bd = max_over_ranks(b.dispatch), bc = max_over_ranks(b.combine), br = max_over_ranks(b.round);
            uint64_t bb[2] = {b.bytes_inter, b.bytes_all}, bsum[2] = {};
            MPI_Allreduce(bb, bsum, 2, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
            const double b_busiest = busiest_host_link_bytes(b.bytes_inter, b.bytes_recv_inter, host_of, s.iters);
            double b_cpu = 0;
            MPI_Reduce(&b.cpu_s, &b_cpu, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
            for (const std::string& alg : s.algs)
            for (int cq : s.comm_quant) {
              if (cq == 2 && alg == "hierarchy") continue;  // hierarchy refuses comm_quant_mode 2
              std::vector<int64_t> waits(static_cast<size_t>(W), 0);
              const Timing m = run_moedist(in, s.warmup, s.iters, alg, cq, *group, s.waits ? waits.data() : nullptr,
                                           rank == s.slow_rank ? s.slow_us : 0);
              if (s.waits) {
                std::vector<int64_t> all(static_cast<size_t>(W) * static_cast<size_t>(W));
                MPI_Gather(waits.data(), W, MPI_INT64_T, all.data(), W, MPI_INT64_T, 0, MPI_COMM_WORLD);
                if (rank == 0) {
                  std::printf("waits: ranks %d, tokens %d, hidden %d, experts %d, quant_mode %d, comm_quant_mode %d, %s, %s", W, BS, H, E, q,
                              cq, s.transport.c_str(), alg.c_str());
                  if (s.slow_rank >= 0 && s.slow_us > 0) std::printf(", rank %d sleeps %d us before each dispatch", s.slow_rank, s.slow_us);
                  std::printf("\n  row i = rank i, column j = us rank i waited for rank j (per round, mean of %d)\n  %6s", s.iters, "");
                  char name[16];
                  for (int j = 0; j < W; ++j) {
                    std::snprintf(name, sizeof(name), "r%d", j);
                    std::printf(" %8s", name);
                  }
                  std::printf("\n");
                  for (int i = 0; i < W; ++i) {
                    std::snprintf(name, sizeof(name), "r%d", i);
                    std::printf("  %6s", name);
                    for (int j = 0; j < W; ++j)
                      std::printf(" %8.1f", static_cast<double>(all[static_cast<size_t>(i) * static_cast<size_t>(W) + static_cast<size_t>(j)]) / s.iters);
                    std::printf("\n");
                  }
                  std::fflush(stdout);
                }
              }
              // fullmesh sums a token's terms in k order, as the baseline does; hierarchy pre-sums per server;
              // comm_quant_mode 2 returns int8 rows (the baseline returns the bf16 rows).
              const bool comparable = q == 0 && cq == 0 && alg != "hierarchy";
              int mismatch = comparable && m.check_out != b.check_out ? 1 : 0, mismatches = 0;
              MPI_Allreduce(&mismatch, &mismatches, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
              const char* check = !comparable ? "not compared" : mismatches ? "MISMATCH" : "bit-identical";
              if (mismatches) {
                if (rank == 0)
                  std::fprintf(stderr, "moedist bench-worker: %d of %d ranks got a different combine output from moedist and the baseline "
                               "(W %d, BS %d, H %d, E %d, %s)\n", mismatches, W, W, BS, H, E, alg.c_str());
                rc = 1;
              }
              const auto md = max_over_ranks(m.dispatch), mc = max_over_ranks(m.combine), mr = max_over_ranks(m.round);
              double check_us = 0;
              MPI_Allreduce(&m.metadata_check_us, &check_us, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
              uint64_t mb[2] = {m.bytes_inter, m.bytes_all}, msum[2] = {};
              MPI_Allreduce(mb, msum, 2, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
              const double m_busiest = busiest_host_link_bytes(m.bytes_inter, m.bytes_recv_inter, host_of, s.iters);
              double m_cpu = 0;
              MPI_Reduce(&m.cpu_s, &m_cpu, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
              if (rank == 0) {
                const double back = cq == 2 ? H + 2.0 * ((H + 7) / 8) : H * 2.0;
                const double bytes = static_cast<double>(BS) * s.topk * (H * (q ? 1.0 : 2.0) + (q ? 4.0 : 0.0) + back);
                const double algbw = bytes / stats_of(mr).median / 1e9;
                const double it = static_cast<double>(s.iters);
                std::printf("{\"ranks\":%d,\"tokens\":%d,\"hidden\":%d,\"topk\":%d,\"experts\":%d,\"quant_mode\":%d,\"comm_quant_mode\":%d,"
                            "\"transport\":\"%s\",\"comm_alg\":\"%s\",\"hosts\":%d,"
                            "\"moedist\":{%s,%s,%s,\"algbw_GBps\":%.3f,\"bytes_inter_host_per_round\":%.0f,\"bytes_per_round\":%.0f,"
                            "\"metadata_check_us\":%.2f,\"metadata_check_pct_of_round\":%.3f%s},"
                            "\"mpi_alltoallv\":{%s,%s,%s,\"bytes_inter_host_per_round\":%.0f,\"bytes_per_round\":%.0f%s},"
                            "\"speedup_round\":%.3f,\"memcpy_GBps\":%.2f,\"outputs_vs_baseline\":\"%s\"%s}\n",
                            W, BS, H, s.topk, E, q, cq, s.transport.c_str(), alg.c_str(), nhosts, json_stats("dispatch", md).c_str(),
                            json_stats("combine", mc).c_str(), json_stats("round", mr).c_str(), algbw, static_cast<double>(msum[0]) / it,
                            static_cast<double>(msum[1]) / it, check_us, 100.0 * check_us / (stats_of(mr).median * 1e6),
                            json_link(m_busiest, s.link_gbit, stats_of(mr).median, 1e3 * m_cpu / s.iters).c_str(), json_stats("dispatch", bd).c_str(), json_stats("combine", bc).c_str(),
                            json_stats("round", br).c_str(), static_cast<double>(bsum[0]) / it, static_cast<double>(bsum[1]) / it,
                            json_link(b_busiest, s.link_gbit, stats_of(br).median, 1e3 * b_cpu / s.iters).c_str(), stats_of(br).median / stats_of(mr).median, mem, check,
                            s.link_gbit > 0 ? (",\"link_gbit\":" + std::to_string(s.link_gbit)).c_str() : "");
                std::fflush(stdout);
              }
            }
          }
    moedist::unregister_group("bench");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moedist bench-worker rank %d: %s\n", rank, e.what());
    rc = 1;
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return rc;
}

int bench_main(int argc, char** argv, const char* argv0) {
  // mpirun needs this program's real path.
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  std::string self_path = argv0 ? argv0 : "moedist";
  if (n > 0) self_path.assign(exe, static_cast<size_t>(n));
  const char* self = self_path.c_str();
  for (int i = 0; i < argc; ++i)
    if (std::string(argv[i]) == "--split") return split_bench::main_(argc, argv);
  Sweep s;
  if (help_asked(argc, argv)) return bench_usage(stdout);
  if (!parse_sweep(argc, argv, s)) return bench_usage();
  std::string cmd_common = " --tokens " + join(s.tokens) + " --hidden " + join(s.hidden) + " --experts " + join(s.experts) +
                           " --quant " + join(s.quant) + " --comm-quant " + join(s.comm_quant) + " --topk " + std::to_string(s.topk) + " --iters " + std::to_string(s.iters) +
                           " --warmup " + std::to_string(s.warmup) + " --transport " + s.transport + " --comm-alg " +
                           [&] {
                             std::string a;
                             for (const auto& x : s.algs) a += (a.empty() ? "" : ",") + x;
                             return a;
                           }() +
                           " --ranks-per-host " + std::to_string(s.ranks_per_host) +
                           (s.link_gbit > 0 ? " --link-gbit " + std::to_string(s.link_gbit) : "") +
                           (s.waits ? " --waits --slow-rank " + std::to_string(s.slow_rank) + " --slow-us " + std::to_string(s.slow_us) : "");
  if (std::system(("mkdir -p '" + s.out + "'").c_str()) != 0) {
    std::fprintf(stderr, "moedist bench: cannot create %s\n", s.out.c_str());
    return 1;
  }
  std::vector<std::string> rows;
  // --python: the interpreter, and why there are no Python entries (empty: they are measured)
  const std::string py = s.python ? python_interpreter() : "";
  std::string py_unavailable;
  if (s.python)
    py_unavailable = s.transport != "shm" ? "the Python package's communicators are shared memory only (--transport shm)"
                                          : python_unavailable(py);
  if (!py_unavailable.empty()) std::fprintf(stderr, "moedist bench: --python: %s\n", py_unavailable.c_str());
  std::map<std::string, std::string> py_rows;
  std::map<int, std::string> py_failed;
  for (int W : s.ranks) {
    const std::string cmd = "mpirun --allow-run-as-root --oversubscribe --bind-to none" + s.mpirun_args + " -np " + std::to_string(W) +
                            " '" + self + "' bench-worker" + cmd_common;
    std::fprintf(stderr, "moedist bench: %s\n", cmd.c_str());
    FILE* p = popen(cmd.c_str(), "r");
    if (!p) return 1;
    char line[4096];
    while (std::fgets(line, sizeof(line), p)) {
      if (line[0] == '{') {
        rows.emplace_back(line);
      } else {
        std::fputs(line, stdout);  // the --waits matrices
        std::fflush(stdout);
      }
    }
    if (pclose(p) != 0) {
      std::fprintf(stderr, "moedist bench: the run with %d ranks failed\n", W);
      return 1;
    }
    if (s.python && py_unavailable.empty()) {  // right after the C++ run, so that both see the same machine load
      const std::string why = run_python(py, W, cmd_common, py_rows);
      if (!why.empty()) {
        std::fprintf(stderr, "moedist bench: --python: %s\n", why.c_str());
        py_failed[W] = why;
      }
    }
  }
  if (s.python)
    for (auto& r : rows) r = with_python(r.substr(0, r.find_last_not_of("\n") + 1), py_rows, py_failed, py_unavailable) + "\n";
  // JSON array, markdown table and plot (python3 + matplotlib, optional).
  std::ofstream js(s.out + "/bench.json");
  js << "[\n";
  for (size_t i = 0; i < rows.size(); ++i) js << "  " << rows[i].substr(0, rows[i].find_last_not_of("\n") + 1) << (i + 1 < rows.size() ? ",\n" : "\n");
  js << "]\n";
  js.close();
  const std::string table_cmd = "python3 '" + std::string(MOEDIST_SOURCE_DIR) + "/bench/report.py' '" + s.out + "/bench.json' '" + s.out + "'";
  const int rc = std::system(table_cmd.c_str());
  if (rc != 0) std::fprintf(stderr, "moedist bench: report.py failed; raw results are in %s/bench.json\n", s.out.c_str());
  return 0;
}
#endif
