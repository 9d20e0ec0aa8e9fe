#include "options.h"

#include <charconv>
#include <cstdint>

#include "util.h"

namespace moedist::tools::demo {

struct IntOption {
  const char* name;
  int DemoOptions::*field;
  int min;
  int max;
};

constexpr IntOption kIntOptions[] = {
    {"--ranks", &DemoOptions::ranks, 1, 256},
    {"--tokens", &DemoOptions::tokens, 0, 4096},
    {"--hidden", &DemoOptions::hidden, 1, 16384},
    {"--topk", &DemoOptions::topk, 1, 64},
    {"--experts", &DemoOptions::experts, 1, 4096},
    {"--ffn", &DemoOptions::ffn, 1, 16384},
    {"--quant", &DemoOptions::quant, 0, 2},
    {"--comm-quant", &DemoOptions::comm_quant, 0, 2},
    {"--shared-ranks", &DemoOptions::shared_ranks, 0, 255},
    {"--tp", &DemoOptions::tp, 0, 2},
    {"--zero", &DemoOptions::zero, 0, 64},
    {"--copy", &DemoOptions::copy, 0, 64},
    {"--const", &DemoOptions::constant, 0, 64},
    {"--elastic", &DemoOptions::elastic, 0, 255},
    {"--timeout-ms", &DemoOptions::timeout_ms, 1, 3600 * 1000},
    {"--rounds", &DemoOptions::rounds, 1, 100000},
    {"--kill-round", &DemoOptions::kill_round, 1, 100000},
};

template <typename T>
T parse_number(const std::string& option, const std::string& text, T min, T max) {
  T value{};
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || ptr != end) throw UsageError(cat(option, " expects an integer, got '", text, "'"));
  if (value < min || value > max) throw UsageError(cat(option, " ", value, " is out of range (must be in [", min, ", ", max, "])"));
  return value;
}

// Cross-option rules: what the layer needs to make sense, so that a bad combination is a usage error
// here rather than an InvalidArgument from inside the ops.
static void validate(const DemoOptions& o) {
  auto require = [](bool ok, const std::string& message) {
    if (!ok) throw UsageError(message);
  };
  require(o.quant != 1, "--quant 1: must be 0 or 2 (static quantization, quant_mode 1, is not supported)");
  require(o.comm_quant != 1, "--comm-quant 1: must be 0 or 2");
  require(o.tp != 1, "--tp 1: must be 0 (no TP) or 2");
  require(o.shared_ranks < o.ranks, cat("--shared-ranks ", o.shared_ranks, " must be < --ranks ", o.ranks,
                                        " (at least one rank must host routed experts)"));
  const int moe_ranks = o.ranks - o.shared_ranks;
  require(o.experts % moe_ranks == 0, cat("--experts ", o.experts, " must be a multiple of ranks - shared ranks = ", moe_ranks,
                                          " (every MoE rank hosts the same number of experts)"));
  if (o.tp == 2) {
    require(o.experts == moe_ranks, cat("--tp 2 needs one expert per MoE rank: --experts must be ranks - shared ranks = ", moe_ranks));
    require(o.ffn % 2 == 0, cat("--tp 2 splits the intermediate dims between the TP pair: --ffn ", o.ffn, " must be even"));
    require(o.elastic == 0, "--elastic works only without TP (--tp 0)");
    require(o.comm_quant == 0, "--comm-quant 2 works only without TP (--tp 0)");
  }
  require(o.elastic < moe_ranks, cat("--elastic ", o.elastic, " must leave at least one MoE rank (must be < ranks - shared ranks = ",
                                     moe_ranks, ")"));
  if (o.kill_round > 0) require(o.victim >= 0, cat("--kill-round ", o.kill_round, " needs --kill or --stop (the rank that fails)"));
  int lost_moe_ranks = o.elastic;
  if (o.victim >= 0) {
    const std::string opt = cat(o.victim_stops ? "--stop " : "--kill ", o.victim, "@", o.victim_phase);
    require(o.victim < o.ranks, cat(opt, ": rank ", o.victim, " is out of range (must be in [0, ", o.ranks, "), the EP ranks of --ranks ",
                                    o.ranks, ")"));
    require(o.tp != 2, cat(opt, " works only without TP (--tp 0): the survivors continue with elastic_info, which excludes TP"));
    require(o.elastic == 0, cat(opt, " and --elastic ", o.elastic, " cannot be combined (leave out one of them)"));
    if (o.victim >= o.shared_ranks) {
      require(moe_ranks > 1, cat(opt, ": rank ", o.victim, " is the only rank with routed experts (ranks - shared ranks = 1), nothing would be left"));
      lost_moe_ranks = 1;
    }
    require(victim_round(o) <= round_count(o), cat("--kill-round ", victim_round(o), " is past the last round (--rounds ", round_count(o),
                                                   "): must be in [1, ", round_count(o), "]"));
  }
  const int routed = o.experts / moe_ranks * (moe_ranks - lost_moe_ranks);
  const int choices = routed + o.zero + o.copy + o.constant;
  require(o.topk <= choices, cat("--topk ", o.topk, " exceeds the experts the router can choose from: ", routed, " routed",
                                 lost_moe_ranks ? " (after scale-down)" : "", " + ", o.zero + o.copy + o.constant, " zero/copy/const = ", choices));
}

// Parses the arguments after "demo". Returns false when help was asked for.
bool parse_options(const std::vector<std::string>& args, DemoOptions& o) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--help" || arg == "-h") return false;
    if (arg.rfind("--", 0) != 0) throw UsageError(cat("unexpected argument '", arg, "'"));
    std::string name = arg, value;
    bool has_value = false;
    if (const size_t eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
      has_value = true;
    }
    auto take_value = [&]() -> const std::string& {
      if (!has_value) {
        if (i + 1 >= args.size()) throw UsageError(cat(name, " needs a value"));
        value = args[++i];
      }
      return value;
    };
    if (name == "--mask" || name == "--threads") {
      if (has_value) throw UsageError(cat(name, " takes no value"));
      (name == "--mask" ? o.mask : o.threads) = true;
    } else if (name == "--kill" || name == "--stop") {
      const std::string& v = take_value();
      if (o.victim >= 0) throw UsageError(cat(name, " ", v, ": only one --kill or --stop is allowed"));
      const size_t at = v.find('@');
      if (at == std::string::npos)
        throw UsageError(cat(name, " '", v, "' must be RANK@PHASE, e.g. 3@dispatch (PHASE: dispatch or combine)"));
      o.victim = parse_number<int>(name, v.substr(0, at), 0, 255);
      o.victim_phase = v.substr(at + 1);
      if (o.victim_phase != "dispatch" && o.victim_phase != "combine")
        throw UsageError(cat(name, " ", v, ": unknown phase '", o.victim_phase, "' (must be dispatch or combine)"));
      o.victim_stops = name == "--stop";
    } else if (name == "--report-dir") {
      o.report_dir = take_value();
      if (o.report_dir.empty()) throw UsageError("--report-dir needs a directory");
    } else if (name == "--transport") {
      o.transport = take_value();
      if (o.transport != "shm" && o.transport != "mpi" && o.transport != "hybrid" && o.transport != "ucx")
        throw UsageError(cat("--transport '", o.transport, "' (must be shm, mpi, hybrid or ucx)"));
    } else if (name == "--dtype") {
      const std::string& v = take_value();
      if (v == "bf16" || v == "bfloat16")
        o.dtype = DType::kBFloat16;
      else if (v == "fp16" || v == "float16")
        o.dtype = DType::kFloat16;
      else
        throw UsageError(cat("--dtype '", v, "' (must be bf16 or fp16)"));
    } else if (name == "--seed") {
      o.seed = parse_number<uint64_t>(name, take_value(), 0, UINT64_MAX);
    } else {
      const IntOption* opt = nullptr;
      for (const IntOption& candidate : kIntOptions)
        if (name == candidate.name) opt = &candidate;
      if (!opt) throw UsageError(cat("unknown option '", name, "'"));
      o.*(opt->field) = parse_number<int>(name, take_value(), opt->min, opt->max);
    }
  }
  validate(o);
  return true;
}

void print_help(std::ostream& os) {
  os << "usage: moedist demo [options]\n"
        "\n"
        "Runs one MoE layer on N ranks: a seeded router (softmax, top-k), dispatch_v2, per-expert SwiGLU\n"
        "FFNs, combine_v2. Checks the output against the same layer computed densely in fp32 and, bit for\n"
        "bit, against moedist::reference on the same arguments.\n"
        "By default the ranks are processes on this host over shared memory: the demo starts N of them\n"
        "(2N with --tp 2) like `moedist launch` and reports. Started under a launcher (`moedist launch -n N\n"
        "-- moedist demo ...`, torchrun, mpirun) with that many processes, each process is one rank and\n"
        "rank 0 gathers the results and reports. Global rank p is EP rank p % N of TP index p / N. Under\n"
        "mpirun the ranks may be on several hosts with --transport mpi or hybrid, e.g.\n"
        "  mpirun -np 8 --hostfile HOSTS moedist demo --transport hybrid --ranks 8\n"
        "--threads runs the ranks as threads of this one process instead.\n"
        "The last line is 'moedist demo: PASS' (exit 0) or 'moedist demo: FAIL ...' (exit 1).\n"
        "\n"
        "options (value as '--opt V' or '--opt=V'):\n"
        "  --ranks N          EP ranks (default 4)\n"
        "  --tokens BS        tokens per rank (default 64)\n"
        "  --hidden H         hidden size (default 1024)\n"
        "  --topk K           experts per token (default 4)\n"
        "  --experts E        routed experts, a multiple of N - Sr (default 16)\n"
        "  --ffn F            expert intermediate size (default 64)\n"
        "  --dtype bf16|fp16  token dtype (default bf16)\n"
        "  --quant 0|2        dispatch quant_mode: 2 = dynamic per-token int8 (default 0)\n"
        "  --comm-quant 0|2   combine comm_quant_mode: 2 = int8 communication (default 0)\n"
        "  --shared-ranks Sr  shared-expert ranks hosting one shared expert (default 0)\n"
        "  --tp 0|2           2: two EP groups paired into TP groups (2N ranks), row-parallel FFN;\n"
        "                     needs E = N - Sr (default 0)\n"
        "  --zero Z           zero experts (default 0)\n"
        "  --copy C           copy experts (default 0)\n"
        "  --const Q          const experts (default 0)\n"
        "  --elastic R        remove the R highest ranks by elastic scale-down (default 0); their\n"
        "                     processes join the EP group but do not call the ops\n"
        "  --mask             1-D x_active_mask: the last BS/4 tokens of each rank are inactive\n"
        "  --seed S           seed of every random value (default 1)\n"
        "  --timeout-ms T     deadline of every wait inside the ops and groups (default 20000; rank 0\n"
        "                     waits 2T + 60 s for the results of the others)\n"
        "  --rounds N         rounds of the layer, each with its own tokens (seeded by the round), each\n"
        "                     checked (default 1, 6 with --kill or --stop; more than 1 only in process\n"
        "                     mode over shared memory, started directly)\n"
        "  --kill R@PHASE     failover: EP rank R dies by a real SIGKILL inside PHASE (dispatch or combine)\n"
        "                     of round --kill-round. It calls the op, and when the op first checks on it\n"
        "                     while it waits (moedist::set_interrupt_check), it records the time and\n"
        "                     raises SIGKILL on itself; the other ranks enter that op once it is waiting,\n"
        "                     at least 10 ms late. The survivors get a TransportError, agree on the\n"
        "                     failed rank (moedist::recover_group), redo the rounds not every survivor\n"
        "                     completed (calls_completed), and serve the remaining rounds with\n"
        "                     elastic_info (make_elastic_info of the agreed mask): the router no longer\n"
        "                     picks the experts of the dead rank (a dead shared-expert rank removes its\n"
        "                     copy of the shared expert). Every round is checked against the dense layer\n"
        "                     without the lost experts and bit for bit against moedist::reference with\n"
        "                     the shrunk layout. Prints 'rank R died in PHASE of round N; M ranks\n"
        "                     continued after T ms' (T: from the SIGKILL to the end of the survivors'\n"
        "                     next completed round, the slowest survivor's). Only in process mode over\n"
        "                     shared memory, started directly (the parent reports, so rank 0 may die);\n"
        "                     not with --threads, MPI (the job cannot outlive a rank), --tp 2, --elastic\n"
        "  --stop R@PHASE     the same with SIGSTOP: the survivors go on once the deadline (--timeout-ms)\n"
        "                     and the agreement's grace (50 ms) have passed; at the end the stopped rank\n"
        "                     is continued (SIGCONT) and must be told it was declared failed. Prints\n"
        "                     'rank R stopped in PHASE of round N; M ranks continued after T ms'\n"
        "  --kill-round N     the round (1-based) the rank fails in (default 2)\n"
        "  --transport T      how the rank processes talk (default shm):\n"
        "                       shm     shared memory, every rank on this host\n"
        "                       mpi     MPI between all ranks (only under mpirun; hosts: see mpirun)\n"
        "                       hybrid  shared memory within a host, MPI between hosts (only under mpirun)\n"
        "                       ucx     shared memory within a host, UCX between hosts (under mpirun, which\n"
        "                               only starts it)\n"
        "  --threads          ranks are threads of this process (thread groups), not processes\n"
        "  --report-dir DIR   (internal) set by the demo for its rank processes: write the rank's result\n"
        "                     to DIR and leave the report to the parent\n"
        "  --help             this help\n";
}

}  // namespace moedist::tools::demo
