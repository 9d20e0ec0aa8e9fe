// `moedist demo`: one whole MoE layer (router, dispatch_v2, SwiGLU experts, combine_v2) on ranks that
// are processes over shared memory (default; make_shm_group: one host), processes of an MPI job on one
// host or several (mpirun, --transport mpi|hybrid; make_mpi_world_group) or threads of this process
// (--threads; make_thread_group), checked two ways:
//   1. numerically, against the same layer computed densely in one process in fp32 (every token times
//      every expert it picked, no communication at all);
//   2. bit for bit, against moedist::reference run on the very arguments the ranks passed.
// Every model parameter comes from a seeded generator stream keyed by (seed, what, id), so the
// dense computation can regenerate any expert's weights without talking to the rank that hosts it,
// and a rank process can rebuild every other rank's arguments for the reference.
#include "demo.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <numeric>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "launch.h"
#include "moedist/moedist.h"
#ifdef MOEDIST_HAVE_MPI
#include "moedist/mpi.h"  // mpi_hosts
#endif

namespace moedist::tools {
namespace {

// ---------------------------------------------------------------------------------------------------
// Options

struct DemoOptions {
  int ranks = 4;          // EP world size W; with --tp 2 there are 2*W ranks (processes or threads)
  int tokens = 64;        // BS per rank
  int hidden = 1024;      // H
  int topk = 4;           // K
  int experts = 16;       // E = moe_expert_num
  int ffn = 64;           // F, the experts' intermediate size
  DType dtype = DType::kBFloat16;
  int quant = 0;          // dispatch quant_mode (0 or 2)
  int comm_quant = 0;     // combine comm_quant_mode (0 or 2)
  int shared_ranks = 0;   // shared_expert_rank_num; they host one shared expert
  int tp = 0;             // tp_world_size (0 or 2)
  int zero = 0;           // zero_expert_num
  int copy = 0;           // copy_expert_num
  int constant = 0;       // const_expert_num
  int elastic = 0;        // ranks removed by elastic scale-down (the highest ones)
  bool mask = false;      // 1-D x_active_mask with the last BS/4 tokens inactive
  uint64_t seed = 1;
  int timeout_ms = 20000;
  bool threads = false;       // ranks are threads of this process instead of processes
  std::string transport = "shm";  // process mode: "shm", or under mpirun "mpi" / "hybrid"
  std::string report_dir;     // internal: set for the rank processes the demo starts
};

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

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
void validate(const DemoOptions& o) {
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
  const int routed = o.experts / moe_ranks * (moe_ranks - o.elastic);
  const int choices = routed + o.zero + o.copy + o.constant;
  require(o.topk <= choices, cat("--topk ", o.topk, " exceeds the experts the router can choose from: ", routed, " routed",
                                 o.elastic ? " (after scale-down)" : "", " + ", o.zero + o.copy + o.constant, " zero/copy/const = ", choices));
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
    } else if (name == "--report-dir") {
      o.report_dir = take_value();
      if (o.report_dir.empty()) throw UsageError("--report-dir needs a directory");
    } else if (name == "--transport") {
      o.transport = take_value();
      if (o.transport != "shm" && o.transport != "mpi" && o.transport != "hybrid")
        throw UsageError(cat("--transport '", o.transport, "' (must be shm, mpi or hybrid)"));
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

// ---------------------------------------------------------------------------------------------------
// bfloat16 / float16 (round to nearest even, written out so that the demo does not depend on the
// library's internal headers)

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_half(DType dt, float f) {
  const uint32_t u = float_bits(f);
  if (dt == DType::kBFloat16) {
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to infinity
  if (a < 0x38800000u)                                                 // subnormal: count units of 2^-24
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(bits_float(a) * 16777216.0f)));
  uint32_t r = a - 0x38000000u;  // rebias the exponent, then round the mantissa from 23 to 10 bits
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

float half_to_float(DType dt, uint16_t h) {
  if (dt == DType::kBFloat16) return bits_float(static_cast<uint32_t>(h) << 16);
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    const float v = static_cast<float>(man) * bits_float(0x33800000u);  // man * 2^-24
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

const char* short_dtype_name(DType dt) { return dt == DType::kBFloat16 ? "bf16" : "fp16"; }

// ---------------------------------------------------------------------------------------------------
// Seeded random numbers: splitmix64 streams keyed by (seed, what, id). A stream depends on nothing
// else, so any party (a rank, the dense check) regenerates the same values.

enum class Stream : uint64_t { kTokens = 1, kRouter = 2, kRoutedExpert = 3, kSharedExpert = 4, kConstExperts = 5 };

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

class Rng {
 public:
  Rng(uint64_t seed, Stream what, uint64_t id) {
    state_ = seed;
    state_ = splitmix64(state_) ^ (static_cast<uint64_t>(what) << 56) ^ id;
    splitmix64(state_);
  }
  // Uniform in [-1, 1): 24 random bits, exact in fp32.
  float uniform() { return static_cast<float>(splitmix64(state_) >> 40) * (2.0f / 16777216.0f) - 1.0f; }

 private:
  uint64_t state_;
};

// ---------------------------------------------------------------------------------------------------
// The layer: sizes, roles and the parameters every rank holds (router, const experts). Expert FFN
// weights are not here: each rank makes the ones it hosts from (seed, expert id).

struct Layer {
  DemoOptions opt;
  int64_t W = 0, BS = 0, H = 0, K = 0, F = 0, E = 0;
  int tp = 1;                // 1, or 2 with --tp 2
  int64_t active_ranks = 0;  // W minus the ranks removed by --elastic
  int64_t Sr = 0, S = 0;     // shared-expert ranks and shared experts (S is 0 or 1)
  int64_t L = 0;             // experts per MoE rank
  int64_t E_active = 0;      // routed experts in use: E, or E' = L * (active MoE ranks) after scale-down
  int64_t special = 0;       // Z + C + Q
  int64_t active_tokens = 0; // per rank: BS, or BS - BS/4 with --mask
  std::vector<float> router;                      // (H, router_columns()) fp32
  std::vector<uint16_t> alpha1, alpha2, const_v;  // (Q,), (Q,), (Q, H) in the token dtype
  std::vector<int32_t> elastic_info;              // (4 + 2W,) with --elastic, else empty

  DType dtype() const { return opt.dtype; }
  int64_t router_columns() const { return E_active + special; }
  // Router column j picks routed expert j, or a special expert; special ids stay offset by the
  // original E even after scale-down (spec section 10).
  int32_t column_expert_id(int64_t j) const { return static_cast<int32_t>(j < E_active ? j : E + (j - E_active)); }
  int64_t calling_ranks() const { return tp * active_ranks; }  // ranks that call the ops
  bool is_shared_rank(int64_t ep_rank) const { return ep_rank < Sr; }
  std::string ep_group(int tp_rank) const { return cat("moedist-demo-ep", tp_rank); }
  std::string tp_group(int64_t ep_rank) const { return cat("moedist-demo-tp", ep_rank); }
};

Layer make_layer(const DemoOptions& o) {
  Layer l;
  l.opt = o;
  l.W = o.ranks;
  l.BS = o.tokens;
  l.H = o.hidden;
  l.K = o.topk;
  l.F = o.ffn;
  l.E = o.experts;
  l.tp = o.tp == 2 ? 2 : 1;
  l.active_ranks = o.ranks - o.elastic;
  l.Sr = o.shared_ranks;
  l.S = o.shared_ranks > 0 ? 1 : 0;
  l.L = o.experts / (o.ranks - o.shared_ranks);
  l.E_active = l.L * (l.active_ranks - l.Sr);
  l.special = o.zero + o.copy + o.constant;
  l.active_tokens = o.mask ? l.BS - l.BS / 4 : l.BS;

  // Router weights scaled so that logits have a standard deviation near 1: a visibly uneven but not
  // degenerate expert load.
  const int64_t cols = l.router_columns();
  const float router_scale = 2.0f / std::sqrt(static_cast<float>(l.H));
  Rng rng(o.seed, Stream::kRouter, 0);
  l.router.resize(static_cast<size_t>(l.H * cols));
  for (float& w : l.router) w = rng.uniform() * router_scale;

  Rng crng(o.seed, Stream::kConstExperts, 0);
  for (int c = 0; c < o.constant; ++c) {
    l.alpha1.push_back(float_to_half(o.dtype, crng.uniform()));
    l.alpha2.push_back(float_to_half(o.dtype, crng.uniform()));
  }
  for (int64_t i = 0; i < o.constant * l.H; ++i) l.const_v.push_back(float_to_half(o.dtype, crng.uniform()));

  if (o.elastic > 0) {
    // The highest ranks leave, so the remaining ranks keep their ids: local id == physical id.
    l.elastic_info.assign(static_cast<size_t>(4 + 2 * l.W), -1);
    l.elastic_info[0] = 1;
    l.elastic_info[1] = static_cast<int32_t>(l.active_ranks);
    l.elastic_info[2] = static_cast<int32_t>(l.Sr);
    l.elastic_info[3] = static_cast<int32_t>(l.E_active);
    for (int64_t r = 0; r < l.active_ranks; ++r) {
      l.elastic_info[static_cast<size_t>(4 + r)] = static_cast<int32_t>(r);           // T1: physical -> local
      l.elastic_info[static_cast<size_t>(4 + l.W + r)] = static_cast<int32_t>(r);     // T2: local -> physical
    }
  }
  return l;
}

// ---------------------------------------------------------------------------------------------------
// Experts: SwiGLU FFN y = W2 (silu(W1 x) * (W3 x)) in fp32.

struct ExpertKey {
  bool shared = false;
  int64_t id = 0;  // global routed expert id, or shared expert index
};

struct ExpertWeights {
  int64_t H = 0, F = 0;
  std::vector<float> w1, w3;  // (H, F): stored input-major so the inner loops run over F contiguously
  std::vector<float> w2;      // (F, H)
};

ExpertWeights make_expert_weights(const Layer& l, ExpertKey key) {
  ExpertWeights w;
  w.H = l.H;
  w.F = l.F;
  Rng rng(l.opt.seed, key.shared ? Stream::kSharedExpert : Stream::kRoutedExpert, static_cast<uint64_t>(key.id));
  // Scales keep the intermediate activations O(1) and the output comparable to the input.
  const float in_scale = 2.0f * std::sqrt(3.0f / static_cast<float>(l.H));
  const float out_scale = std::sqrt(3.0f / static_cast<float>(l.F));
  const size_t n = static_cast<size_t>(l.H * l.F);
  w.w1.resize(n);
  w.w3.resize(n);
  w.w2.resize(n);
  for (float& v : w.w1) v = rng.uniform() * in_scale;
  for (float& v : w.w3) v = rng.uniform() * in_scale;
  for (float& v : w.w2) v = rng.uniform() * out_scale;
  return w;
}

struct FfnScratch {
  std::vector<float> gate, up;
};

// y = W2[f0:f1, :]^T (silu(x W1[:, f0:f1]) * (x W3[:, f0:f1])). With TP each rank of the pair takes
// half of the intermediate dims, so y is its partial sum (row-parallel W2) and combine adds the two.
void ffn_forward(const ExpertWeights& w, const float* x, int64_t f0, int64_t f1, FfnScratch& s, float* y) {
  const int64_t n = f1 - f0, H = w.H, F = w.F;
  s.gate.assign(static_cast<size_t>(n), 0.f);
  s.up.assign(static_cast<size_t>(n), 0.f);
  float* g = s.gate.data();
  float* u = s.up.data();
  for (int64_t h = 0; h < H; ++h) {
    const float xh = x[h];
    const float* r1 = w.w1.data() + h * F + f0;
    const float* r3 = w.w3.data() + h * F + f0;
    for (int64_t f = 0; f < n; ++f) {
      g[f] += xh * r1[f];
      u[f] += xh * r3[f];
    }
  }
  for (int64_t f = 0; f < n; ++f) g[f] = g[f] / (1.0f + std::exp(-g[f])) * u[f];
  std::fill(y, y + H, 0.f);
  for (int64_t f = 0; f < n; ++f) {
    const float a = g[f];
    const float* r2 = w.w2.data() + (f0 + f) * H;
    for (int64_t h = 0; h < H; ++h) y[h] += a * r2[h];
  }
}

// The experts a rank hosts (spec section 1): shared ranks come first, then L routed experts per rank.
std::vector<ExpertKey> hosted_experts(const Layer& l, int64_t ep_rank) {
  if (l.is_shared_rank(ep_rank)) return {ExpertKey{true, ep_rank / (l.Sr / l.S)}};
  std::vector<ExpertKey> keys;
  for (int64_t e = 0; e < l.L; ++e) keys.push_back(ExpertKey{false, (ep_rank - l.Sr) * l.L + e});
  return keys;
}

// Per-token dynamic int8 quantization as dispatch_v2 does it (spec section 5, no smooth scales), then
// dequantized: the values the experts see with --quant 2.
void quantize_dequantize(std::vector<float>& row) {
  float amax = 0.f;
  for (float v : row) amax = std::max(amax, std::fabs(v));
  if (amax == 0.f) return;  // all zeros stay zeros
  const float m = 127.0f / amax;
  const float scale = 1.0f / m;
  for (float& v : row) v = std::clamp(std::nearbyint(v * m), -128.0f, 127.0f) * scale;
}

// ---------------------------------------------------------------------------------------------------
// Ranks

struct PhaseTimes {
  double gating = 0, dispatch = 0, experts = 0, combine = 0;  // ms
};

// Everything one rank owns. Vectors have at least one element so that views of an empty tensor
// (--tokens 0) are still "present" (a null data pointer means an absent optional tensor).
struct RankState {
  int tp_rank = 0;
  int64_t ep_rank = 0;
  std::vector<uint16_t> x;           // (BS, H) in the token dtype
  std::vector<uint8_t> active_mask;  // (BS,) bool, used with --mask
  std::vector<int32_t> expert_ids;   // (BS, K), filled by gating
  std::vector<float> expert_scales;  // (BS, K), filled by gating
  DispatchArgs dispatch_args;
  DispatchResult dispatched;
  std::vector<uint16_t> expert_out;  // (expand_x rows, H): the experts' outputs, combine's expand_x
  CombineArgs combine_args;
  Tensor out;                        // (BS, H): the layer's output
  PhaseTimes times;
};

size_t at_least_one(int64_t n) { return static_cast<size_t>(std::max<int64_t>(n, 1)); }

RankState make_rank(const Layer& l, int tp_rank, int64_t ep_rank) {
  RankState st;
  st.tp_rank = tp_rank;
  st.ep_rank = ep_rank;
  const DType dt = l.dtype();
  // The two EP groups of a TP pair hold different tokens, as on the device.
  Rng rng(l.opt.seed, Stream::kTokens, static_cast<uint64_t>(tp_rank * l.W + ep_rank));
  st.x.assign(at_least_one(l.BS * l.H), 0);
  for (int64_t i = 0; i < l.BS * l.H; ++i) st.x[static_cast<size_t>(i)] = float_to_half(dt, rng.uniform());
  st.active_mask.assign(at_least_one(l.BS), 0);
  for (int64_t t = 0; t < l.active_tokens; ++t) st.active_mask[static_cast<size_t>(t)] = 1;
  st.expert_ids.assign(at_least_one(l.BS * l.K), 0);
  st.expert_scales.assign(at_least_one(l.BS * l.K), 0.f);

  DispatchArgs& a = st.dispatch_args;
  a.x = TensorView(st.x.data(), dt, {l.BS, l.H});
  a.expert_ids = TensorView(st.expert_ids.data(), DType::kInt32, {l.BS, l.K});
  a.group_ep = l.ep_group(tp_rank);
  a.ep_world_size = l.W;
  a.ep_rank_id = ep_rank;
  a.moe_expert_num = l.E;
  if (l.opt.mask) a.x_active_mask = TensorView(st.active_mask.data(), DType::kBool, {l.BS});
  a.expert_scales = TensorView(st.expert_scales.data(), DType::kFloat32, {l.BS, l.K});
  if (!l.elastic_info.empty()) a.elastic_info = TensorView(l.elastic_info.data(), DType::kInt32, {4 + 2 * l.W});
  if (l.tp == 2) {
    a.group_tp = l.tp_group(ep_rank);
    a.tp_world_size = 2;
    a.tp_rank_id = tp_rank;
  }
  a.shared_expert_num = 1;
  a.shared_expert_rank_num = l.Sr;
  a.quant_mode = l.opt.quant;
  a.expert_token_nums_type = 1;  // per-expert counts: run_experts walks them
  a.zero_expert_num = l.opt.zero;
  a.copy_expert_num = l.opt.copy;
  a.const_expert_num = l.opt.constant;
  return st;
}

// Router: logits = x Wg, softmax, top-k (ties to the lower column, so the choice is deterministic),
// weights = the chosen probabilities renormalised to sum 1.
void gate(const Layer& l, RankState& st) {
  const int64_t H = l.H, K = l.K, n = l.router_columns();
  std::vector<float> x(static_cast<size_t>(H)), prob(static_cast<size_t>(n));
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t t = 0; t < l.BS; ++t) {
    for (int64_t h = 0; h < H; ++h) x[static_cast<size_t>(h)] = half_to_float(l.dtype(), st.x[static_cast<size_t>(t * H + h)]);
    std::fill(prob.begin(), prob.end(), 0.f);
    for (int64_t h = 0; h < H; ++h) {
      const float xh = x[static_cast<size_t>(h)];
      const float* wg = l.router.data() + h * n;
      for (int64_t j = 0; j < n; ++j) prob[static_cast<size_t>(j)] += xh * wg[j];
    }
    const float max_logit = *std::max_element(prob.begin(), prob.end());
    float sum = 0.f;
    for (float& p : prob) sum += (p = std::exp(p - max_logit));
    for (float& p : prob) p /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int64_t a, int64_t b) {
      const float pa = prob[static_cast<size_t>(a)], pb = prob[static_cast<size_t>(b)];
      return pa > pb || (pa == pb && a < b);
    });
    float chosen = 0.f;
    for (int64_t k = 0; k < K; ++k) chosen += prob[static_cast<size_t>(order[static_cast<size_t>(k)])];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t j = order[static_cast<size_t>(k)];
      st.expert_ids[static_cast<size_t>(t * K + k)] = l.column_expert_id(j);
      st.expert_scales[static_cast<size_t>(t * K + k)] = prob[static_cast<size_t>(j)] / chosen;
    }
  }
}

// Row `row` of dispatch's expand_x in fp32: int8 * per-row scale with quant_mode 2.
void expand_row(const Layer& l, const DispatchResult& d, int64_t row, float* out) {
  const int64_t H = l.H;
  if (l.opt.quant == 2) {
    const int8_t* q = static_cast<const int8_t*>(d.expand_x.data()) + row * H;
    const float scale = d.dynamic_scales.data_as<float>()[row];
    for (int64_t h = 0; h < H; ++h) out[h] = static_cast<float>(q[h]) * scale;
  } else {
    const uint16_t* x = d.expand_x.data_as<uint16_t>() + row * H;
    for (int64_t h = 0; h < H; ++h) out[h] = half_to_float(l.dtype(), x[h]);
  }
}

// Runs the hosted experts on the received rows. With expert_token_nums_type 1 the rows come grouped
// by local expert: the first expert_token_nums[0] rows are local expert 0's, and so on. With TP they
// include the peer's rows, which this rank also computes its half for.
void run_experts(const Layer& l, RankState& st, const std::vector<ExpertWeights>& weights) {
  const DispatchResult& d = st.dispatched;
  const int64_t H = l.H, rows = d.expand_x.size(0);
  st.expert_out.assign(at_least_one(rows * H), 0);
  const int64_t f0 = l.tp == 2 ? st.tp_rank * (l.F / 2) : 0;
  const int64_t f1 = l.tp == 2 ? f0 + l.F / 2 : l.F;
  const bool shared = l.is_shared_rank(st.ep_rank);
  std::vector<float> x(static_cast<size_t>(H)), y(static_cast<size_t>(H));
  FfnScratch scratch;
  int64_t row = 0;
  for (int64_t e = 0; e < d.expert_token_nums.numel(); ++e) {
    const int64_t count = d.expert_token_nums.data_as<int64_t>()[e];
    if (count == 0) continue;
    if (!shared && e >= static_cast<int64_t>(weights.size()))
      throw Error(cat("rank ", st.ep_rank, ": expert_token_nums has rows for local expert ", e, " but the rank hosts ", weights.size()));
    if (row + count > rows)
      throw Error(cat("rank ", st.ep_rank, ": expert_token_nums counts ", row + count, " rows but expand_x has only ", rows));
    // A shared-expert rank hosts one expert: all its rows are that expert's.
    const ExpertWeights& w = weights[shared ? 0 : static_cast<size_t>(e)];
    for (int64_t i = 0; i < count; ++i, ++row) {
      expand_row(l, d, row, x.data());
      ffn_forward(w, x.data(), f0, f1, scratch, y.data());
      uint16_t* out = st.expert_out.data() + row * H;
      for (int64_t h = 0; h < H; ++h) out[h] = float_to_half(l.dtype(), y[static_cast<size_t>(h)]);
    }
  }
}

CombineArgs make_combine_args(const Layer& l, const RankState& st) {
  const DispatchArgs& da = st.dispatch_args;
  const DispatchResult& d = st.dispatched;
  CombineArgs a;
  a.expand_x = TensorView(st.expert_out.data(), l.dtype(), {d.expand_x.size(0), l.H});
  a.expert_ids = da.expert_ids;
  a.assist_info_for_combine = d.assist_info_for_combine;
  a.ep_send_counts = d.ep_recv_counts;
  a.expert_scales = da.expert_scales;
  a.group_ep = da.group_ep;
  a.ep_world_size = da.ep_world_size;
  a.ep_rank_id = da.ep_rank_id;
  a.moe_expert_num = da.moe_expert_num;
  if (l.tp == 2) a.tp_send_counts = d.tp_recv_counts;
  a.x_active_mask = da.x_active_mask;
  a.elastic_info = da.elastic_info;
  if (l.opt.copy > 0 || l.opt.constant > 0) a.ori_x = da.x;
  if (l.opt.constant > 0) {
    const int64_t Q = l.opt.constant;
    a.const_expert_alpha_1 = TensorView(l.alpha1.data(), l.dtype(), {Q});
    a.const_expert_alpha_2 = TensorView(l.alpha2.data(), l.dtype(), {Q});
    a.const_expert_v = TensorView(l.const_v.data(), l.dtype(), {Q, l.H});
  }
  a.group_tp = da.group_tp;
  a.tp_world_size = da.tp_world_size;
  a.tp_rank_id = da.tp_rank_id;
  a.shared_expert_num = da.shared_expert_num;
  a.shared_expert_rank_num = da.shared_expert_rank_num;
  a.comm_quant_mode = l.opt.comm_quant;
  a.zero_expert_num = da.zero_expert_num;
  a.copy_expert_num = da.copy_expert_num;
  a.const_expert_num = da.const_expert_num;
  return a;
}

// ---------------------------------------------------------------------------------------------------
// Running a rank

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point start) { return std::chrono::duration<double, std::milli>(Clock::now() - start).count(); }

// Thread mode: thrown on the ranks that stop because another rank failed; the report shows the
// original error.
struct RankStopped : std::exception {
  const char* what() const noexcept override { return "stopped because another rank failed"; }
};

// Thread mode: lines the ranks up before each phase, so that a phase's time does not include waiting
// for a peer still busy with the previous one. A failing rank breaks it, so its peers stop instead of
// hanging.
class PhaseBarrier {
 public:
  explicit PhaseBarrier(int64_t n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (broken_) throw RankStopped();
    const uint64_t generation = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation || broken_; });
    if (generation_ == generation) throw RankStopped();
  }
  void break_barrier() {
    std::lock_guard<std::mutex> lock(mutex_);
    broken_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int64_t n_;
  int64_t arrived_ = 0;
  uint64_t generation_ = 0;
  bool broken_ = false;
};

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

// One rank's layer. `align` lines the ranks up before each phase; setup (the hosted experts' weights)
// is not timed.
void run_rank(const Layer& l, RankState& st, const std::function<void()>& align) {
  std::vector<ExpertWeights> weights;
  for (const ExpertKey& key : hosted_experts(l, st.ep_rank)) weights.push_back(make_expert_weights(l, key));

  align();
  Clock::time_point start = Clock::now();
  gate(l, st);
  st.times.gating = ms_since(start);

  align();
  start = Clock::now();
  st.dispatched = dispatch_v2(st.dispatch_args);
  st.times.dispatch = ms_since(start);

  align();
  start = Clock::now();
  run_experts(l, st, weights);
  st.times.experts = ms_since(start);

  st.combine_args = make_combine_args(l, st);
  align();
  start = Clock::now();
  st.out = combine_v2(st.combine_args);
  st.times.combine = ms_since(start);
}

// The groups this process registered for the run; unregistered when it ends.
class GroupRegistration {
 public:
  GroupRegistration() = default;
  ~GroupRegistration() {
    for (const std::string& name : names_) unregister_group(name);
  }
  GroupRegistration(const GroupRegistration&) = delete;
  GroupRegistration& operator=(const GroupRegistration&) = delete;
  void add(const std::string& name, std::vector<std::shared_ptr<Transport>> endpoints) {
    register_group(name, std::move(endpoints));
    names_.push_back(name);
  }

 private:
  std::vector<std::string> names_;
};

GroupOptions group_options(const Layer& l) {
  GroupOptions options;
  options.timeout = std::chrono::milliseconds(l.opt.timeout_ms);
  return options;
}

std::string rank_name(const Layer& l, int tp_rank, int64_t ep_rank) {
  return l.tp == 2 ? cat("rank ", ep_rank, " (tp ", tp_rank, ")") : cat("rank ", ep_rank);
}
std::string rank_name(const Layer& l, const RankState& st) { return rank_name(l, st.tp_rank, st.ep_rank); }

// Thread mode: runs every rank on its own thread over thread groups. Returns "" or the first failure
// (in rank order), leaving aside the ranks that only stopped because of it.
std::string run_ranks(const Layer& l, std::vector<RankState>& ranks) {
  GroupRegistration groups;
  const GroupOptions options = group_options(l);
  for (int q = 0; q < l.tp; ++q) groups.add(l.ep_group(q), make_thread_group(static_cast<int>(l.W), options));
  if (l.tp == 2)
    for (int64_t r = 0; r < l.W; ++r) groups.add(l.tp_group(r), make_thread_group(2, options));

  PhaseBarrier barrier(static_cast<int64_t>(ranks.size()));
  std::vector<std::exception_ptr> errors(ranks.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < ranks.size(); ++i)
    threads.emplace_back([&, i] {
      try {
        run_rank(l, ranks[i], [&] { barrier.arrive_and_wait(); });
      } catch (...) {
        errors[i] = std::current_exception();
        barrier.break_barrier();
      }
    });
  for (std::thread& t : threads) t.join();
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (!errors[i]) continue;
    try {
      std::rethrow_exception(errors[i]);
    } catch (const RankStopped&) {
    } catch (const std::exception& e) {
      return cat(rank_name(l, ranks[i]), ": ", e.what());
    }
  }
  return "";
}

// ---------------------------------------------------------------------------------------------------
// Checks

// The layer computed densely in fp32 in one process: for every active token,
//   sum_k w_k * expert_{id_k}(x)  (+ the shared expert's FFN(x), unweighted),
// with zero -> 0, copy -> x, const -> alpha1*x + alpha2*v. Inputs of the FFN experts are quantized
// and dequantized exactly like dispatch_v2 does with --quant 2, so the check measures the layer's
// rounding (expert outputs and the combined sum in the token dtype), not the int8 error.
// Only the ranks in `which` are computed (a rank process checks its own tokens); the others' entries
// stay empty.
std::vector<std::vector<float>> dense_layer(const Layer& l, const std::vector<RankState>& ranks, const std::vector<size_t>& which) {
  const int64_t H = l.H, K = l.K;
  const size_t n = ranks.size();
  std::vector<std::vector<float>> raw(n), input(n), out(n);
  for (size_t i : which) {
    raw[i].resize(static_cast<size_t>(l.BS * H));
    for (size_t j = 0; j < raw[i].size(); ++j) raw[i][j] = half_to_float(l.dtype(), ranks[i].x[j]);
    input[i] = raw[i];
    if (l.opt.quant == 2)
      for (int64_t t = 0; t < l.BS; ++t) {
        std::vector<float> row(input[i].begin() + t * H, input[i].begin() + (t + 1) * H);
        quantize_dequantize(row);
        std::copy(row.begin(), row.end(), input[i].begin() + t * H);
      }
    out[i].assign(static_cast<size_t>(l.BS * H), 0.f);
  }

  // Group the (token, k) entries by routed expert, so each expert's weights are made once.
  struct Use {
    size_t rank;
    int64_t token;
    float weight;
  };
  std::vector<std::vector<Use>> uses(static_cast<size_t>(l.E_active));
  const int64_t zero_end = l.E + l.opt.zero, copy_end = zero_end + l.opt.copy;
  for (size_t i : which)
    for (int64_t t = 0; t < l.active_tokens; ++t) {
      float* acc = out[i].data() + t * H;
      const float* x = raw[i].data() + t * H;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t id = ranks[i].expert_ids[static_cast<size_t>(t * K + k)];
        const float w = ranks[i].expert_scales[static_cast<size_t>(t * K + k)];
        if (id < l.E_active) {
          uses[static_cast<size_t>(id)].push_back(Use{i, t, w});
        } else if (id >= zero_end && id < copy_end) {
          for (int64_t h = 0; h < H; ++h) acc[h] += w * x[h];
        } else if (id >= copy_end) {
          const size_t c = static_cast<size_t>(id - copy_end);
          const float a1 = half_to_float(l.dtype(), l.alpha1[c]), a2 = half_to_float(l.dtype(), l.alpha2[c]);
          const uint16_t* v = l.const_v.data() + c * static_cast<size_t>(H);
          for (int64_t h = 0; h < H; ++h) acc[h] += w * (a1 * x[h] + a2 * half_to_float(l.dtype(), v[h]));
        }  // zero experts add nothing
      }
    }

  std::vector<float> y(static_cast<size_t>(H));
  FfnScratch scratch;
  for (int64_t g = 0; g < l.E_active; ++g) {
    if (uses[static_cast<size_t>(g)].empty()) continue;
    const ExpertWeights w = make_expert_weights(l, ExpertKey{false, g});
    for (const Use& u : uses[static_cast<size_t>(g)]) {
      ffn_forward(w, input[u.rank].data() + u.token * H, 0, l.F, scratch, y.data());
      float* acc = out[u.rank].data() + u.token * H;
      for (int64_t h = 0; h < H; ++h) acc[h] += u.weight * y[static_cast<size_t>(h)];
    }
  }
  if (l.S > 0) {
    const ExpertWeights w = make_expert_weights(l, ExpertKey{true, 0});
    for (size_t i : which)
      for (int64_t t = 0; t < l.active_tokens; ++t) {
        ffn_forward(w, input[i].data() + t * H, 0, l.F, scratch, y.data());
        float* acc = out[i].data() + t * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += y[static_cast<size_t>(h)];
      }
  }
  return out;
}

struct Accuracy {
  double max_abs_err = 0;
  double max_abs_dense = 0;
  int64_t non_finite = 0;
  double rel_err() const { return max_abs_dense > 0 ? max_abs_err / max_abs_dense : max_abs_err; }
  void merge(const Accuracy& a) {
    max_abs_err = std::max(max_abs_err, a.max_abs_err);
    max_abs_dense = std::max(max_abs_dense, a.max_abs_dense);
    non_finite += a.non_finite;
  }
};

Accuracy compare_with_dense(const Layer& l, const RankState& st, const std::vector<float>& dense) {
  Accuracy a;
  const uint16_t* got = st.out.data_as<uint16_t>();
  for (size_t j = 0; j < dense.size(); ++j) {
    const double v = half_to_float(l.dtype(), got[j]), want = dense[j];
    if (!std::isfinite(v)) {
      ++a.non_finite;
      continue;
    }
    a.max_abs_err = std::max(a.max_abs_err, std::fabs(v - want));
    a.max_abs_dense = std::max(a.max_abs_dense, std::fabs(want));
  }
  return a;
}

// "" if the first `elements` elements of got and want (all of them when negative) hold the same bits.
// Only the meaningful prefix is compared: rows past the received count are unspecified (spec section 2).
std::string first_difference(const Tensor& got, const Tensor& want, int64_t elements, const std::string& what) {
  if (got.dtype() != want.dtype()) return cat(what, ": dtype ", dtype_name(got.dtype()), " vs reference ", dtype_name(want.dtype()));
  if (got.shape() != want.shape()) return cat(what, ": shape ", got.view().shape_str(), " vs reference ", want.view().shape_str());
  const int64_t n = elements < 0 ? want.numel() : std::min(elements, want.numel());
  const size_t es = dtype_size(want.dtype());
  const auto* a = static_cast<const unsigned char*>(got.data());
  const auto* b = static_cast<const unsigned char*>(want.data());
  for (int64_t i = 0; i < n; ++i)
    if (std::memcmp(a + static_cast<size_t>(i) * es, b + static_cast<size_t>(i) * es, es) != 0)
      return cat(what, ": element ", i, " of ", want.numel(), " differs from the reference");
  return "";
}

int64_t sum_counts(const Tensor& expert_token_nums) {
  int64_t total = 0;
  for (int64_t e = 0; e < expert_token_nums.numel(); ++e) total += expert_token_nums.data_as<int64_t>()[e];
  return total;
}

// Rows this rank received on its own EP group (without its TP peer's).
int64_t own_rows(const Layer& l, const RankState& st, const DispatchResult& d) {
  return l.tp == 2 ? d.tp_recv_counts.data_as<int32_t>()[st.tp_rank] : sum_counts(d.expert_token_nums);
}

// "" if the rank's dispatch outputs match the reference's bit for bit.
std::string compare_dispatch(const Layer& l, const RankState& st, const DispatchResult& w) {
  const DispatchResult& got = st.dispatched;
  const std::string who = rank_name(l, st) + " dispatch_v2 ";
  std::string diff = first_difference(got.expert_token_nums, w.expert_token_nums, -1, who + "expert_token_nums");
  if (diff.empty()) diff = first_difference(got.ep_recv_counts, w.ep_recv_counts, -1, who + "ep_recv_counts");
  if (diff.empty()) diff = first_difference(got.tp_recv_counts, w.tp_recv_counts, -1, who + "tp_recv_counts");
  if (!diff.empty()) return diff;
  const int64_t rows = sum_counts(w.expert_token_nums), own = own_rows(l, st, w);
  diff = first_difference(got.expand_x, w.expand_x, rows * l.H, who + "expand_x");
  if (diff.empty() && l.opt.quant == 2) diff = first_difference(got.dynamic_scales, w.dynamic_scales, rows, who + "dynamic_scales");
  if (diff.empty()) diff = first_difference(got.assist_info_for_combine, w.assist_info_for_combine, 3 * own, who + "assist_info_for_combine");
  if (diff.empty()) diff = first_difference(got.expand_scales, w.expand_scales, own, who + "expand_scales");
  return diff;
}

std::string compare_combine(const Layer& l, const RankState& st, const Tensor& want) {
  return first_difference(st.out, want, -1, rank_name(l, st) + " combine_v2 output");
}

// ---------------------------------------------------------------------------------------------------
// Per-rank results: what a rank measured and checked, all the report needs. In process mode each rank
// sends its own, as text (summary_text), to rank 0 over a group (gather_texts), or writes it to a file
// that the demo's parent reads (--report-dir).

struct RankSummary {
  enum class Status { kMissing, kOk, kRemoved, kError };
  Status status = Status::kMissing;
  int tp_rank = 0;
  int64_t ep_rank = 0;
  std::string error;               // kError
  bool transport_error = false;    // the error is a TransportError or Timeout: often a peer's failure
  PhaseTimes times;
  std::vector<int64_t> rows;       // rows received per local expert (one entry on a shared rank or with TP)
  int64_t zero = 0, copy = 0, constant = 0;  // zero/copy/const picks of this rank's tokens
  Accuracy accuracy;               // vs the dense layer, this rank's tokens
  std::string dispatch_diff, combine_diff;  // vs the reference, "" when bit-exact
};

// What a rank's run measured: times, the rows per expert, the special experts picked.
void summarize_run(const Layer& l, const RankState& st, RankSummary& s) {
  s.status = RankSummary::Status::kOk;
  s.tp_rank = st.tp_rank;
  s.ep_rank = st.ep_rank;
  s.times = st.times;
  const DispatchResult& d = st.dispatched;
  s.rows.clear();
  if (l.is_shared_rank(st.ep_rank) || l.tp == 2)
    s.rows.push_back(own_rows(l, st, d));
  else
    for (int64_t e = 0; e < d.expert_token_nums.numel(); ++e) s.rows.push_back(d.expert_token_nums.data_as<int64_t>()[e]);
  const int64_t zero_end = l.E + l.opt.zero, copy_end = zero_end + l.opt.copy;
  for (int64_t i = 0; i < l.active_tokens * l.K; ++i) {
    const int64_t id = st.expert_ids[static_cast<size_t>(i)];
    if (id < l.E) continue;
    if (id < zero_end)
      ++s.zero;
    else if (id < copy_end)
      ++s.copy;
    else
      ++s.constant;
  }
}

std::string one_line(std::string text) {
  for (char& c : text)
    if (c == '\n' || c == '\r') c = ' ';
  return text;
}

const char* status_name(RankSummary::Status s) {
  switch (s) {
    case RankSummary::Status::kOk: return "ok";
    case RankSummary::Status::kRemoved: return "removed";
    case RankSummary::Status::kError: return "error";
    default: return "missing";
  }
}

std::string summary_path(const std::string& dir, int rank) { return cat(dir, "/rank", rank, ".txt"); }

// A summary as text, one "key values" line per field, ending with "end"; parse_summary reads it back.
std::string summary_text(const RankSummary& s) {
  std::ostringstream f;
  f.precision(17);
  f << "status " << status_name(s.status) << "\n"
    << "rank " << s.tp_rank << " " << s.ep_rank << "\n"
    << "times " << s.times.gating << " " << s.times.dispatch << " " << s.times.experts << " " << s.times.combine << "\n"
    << "rows " << s.rows.size();
  for (int64_t r : s.rows) f << " " << r;
  f << "\n"
    << "special " << s.zero << " " << s.copy << " " << s.constant << "\n"
    << "dense " << s.accuracy.max_abs_err << " " << s.accuracy.max_abs_dense << " " << s.accuracy.non_finite << "\n"
    << "transport_error " << (s.transport_error ? 1 : 0) << "\n"
    << "error " << one_line(s.error) << "\n"
    << "dispatch_diff " << one_line(s.dispatch_diff) << "\n"
    << "combine_diff " << one_line(s.combine_diff) << "\n"
    << "end\n";
  return f.str();
}

// Written to a temporary name, then renamed: a reader sees the whole file or none.
bool write_summary(const std::string& dir, int rank, const RankSummary& s) {
  mkdir(dir.c_str(), 0700);  // made by the demo's parent already
  const std::string tmp = cat(dir, "/.rank", rank, ".tmp");
  {
    std::ofstream f(tmp);
    f << summary_text(s);
    if (!f.flush()) return false;
  }
  return std::rename(tmp.c_str(), summary_path(dir, rank).c_str()) == 0;
}

// False (and `s` unchanged) unless `f` holds a whole summary.
bool parse_summary(std::istream& f, RankSummary& s) {
  RankSummary r;
  bool complete = false;
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream in(line);
    std::string key;
    in >> key;
    const std::string rest = line.size() > key.size() ? line.substr(key.size() + 1) : "";
    if (key == "status") {
      r.status = rest == "ok" ? RankSummary::Status::kOk : rest == "removed" ? RankSummary::Status::kRemoved : RankSummary::Status::kError;
    } else if (key == "rank") {
      in >> r.tp_rank >> r.ep_rank;
    } else if (key == "times") {
      in >> r.times.gating >> r.times.dispatch >> r.times.experts >> r.times.combine;
    } else if (key == "rows") {
      size_t n = 0;
      in >> n;
      r.rows.assign(n, 0);
      for (int64_t& v : r.rows) in >> v;
    } else if (key == "special") {
      in >> r.zero >> r.copy >> r.constant;
    } else if (key == "dense") {
      in >> r.accuracy.max_abs_err >> r.accuracy.max_abs_dense >> r.accuracy.non_finite;
    } else if (key == "transport_error") {
      in >> r.transport_error;
    } else if (key == "error") {
      r.error = rest;
    } else if (key == "dispatch_diff") {
      r.dispatch_diff = rest;
    } else if (key == "combine_diff") {
      r.combine_diff = rest;
    } else if (key == "end") {
      complete = true;
    }
    if (!in && key != "end" && key != "error" && key != "dispatch_diff" && key != "combine_diff" && key != "status") return false;
  }
  if (!complete) return false;
  s = std::move(r);
  return true;
}

bool read_summary(const std::string& path, RankSummary& s) {
  std::ifstream f(path);
  return f && parse_summary(f, s);
}

// Removes the rank files and the directory.
void remove_report_dir(const std::string& dir, int processes) {
  for (int p = 0; p < processes; ++p) {
    std::remove(summary_path(dir, p).c_str());
    std::remove(cat(dir, "/.rank", p, ".tmp").c_str());
  }
  rmdir(dir.c_str());
}

// ---------------------------------------------------------------------------------------------------
// Report

// How the rank processes talk (--transport), for the report.
std::string transport_words(const DemoOptions& o) {
  if (o.transport == "mpi") return "MPI";
  if (o.transport == "hybrid") return "hybrid: shared memory within a host, MPI between hosts";
  return "shared memory";
}

// `hosts`: the hosts the MPI job runs on (0: not known, or not an MPI transport).
void print_header(const Layer& l, bool processes, int hosts = 0) {
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
  std::printf(", seed %llu\n", static_cast<unsigned long long>(o.seed));
}

void print_load(const Layer& l, const std::vector<RankSummary>& ranks) {
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
    const int64_t first = l.tp == 2 ? s.ep_rank - l.Sr : (s.ep_rank - l.Sr) * l.L;  // TP: one expert per rank
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
    std::printf("  shared expert: %lld rows on %lld rank%s\n", static_cast<long long>(shared), static_cast<long long>(l.Sr), l.Sr > 1 ? "s" : "");
  if (l.special)
    std::printf("  zero/copy/const picks (applied in combine, never sent): %lld / %lld / %lld\n", static_cast<long long>(zero),
                static_cast<long long>(copy), static_cast<long long>(constant));
}

void print_times(const Layer& l, const std::vector<RankSummary>& ranks, bool processes) {
  std::vector<const RankSummary*> ran;
  for (const RankSummary& s : ranks)
    if (s.status == RankSummary::Status::kOk) ran.push_back(&s);
  if (ran.empty()) return;
  std::string barrier;
  if (processes) barrier = l.opt.transport == "shm" ? ", after a shared-memory barrier" : cat(", after a barrier over ", l.opt.transport);
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
double tolerance(const Layer& l) { return l.opt.comm_quant == 2 ? 4e-2 : 2e-2; }

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

// ---------------------------------------------------------------------------------------------------
// Thread mode: every rank is a thread of this process; the checks see every rank's state directly.

int run_threads(const DemoOptions& o) {
  const Layer l = make_layer(o);
  print_header(l, false);
  std::fflush(stdout);

  std::vector<RankState> ranks;
  for (int q = 0; q < l.tp; ++q)
    for (int64_t r = 0; r < l.active_ranks; ++r) ranks.push_back(make_rank(l, q, r));
  const std::string error = run_ranks(l, ranks);
  if (!error.empty()) {
    std::printf("error: %s\n", error.c_str());
    return fail("a rank failed");
  }

  std::vector<RankSummary> summaries(ranks.size());
  std::vector<size_t> all(ranks.size());
  std::iota(all.begin(), all.end(), size_t{0});
  const std::vector<std::vector<float>> dense = dense_layer(l, ranks, all);
  std::vector<DispatchArgs> dispatch_calls;
  std::vector<CombineArgs> combine_calls;
  for (const RankState& st : ranks) {
    dispatch_calls.push_back(st.dispatch_args);
    combine_calls.push_back(st.combine_args);
  }
  const std::vector<DispatchResult> want = reference::dispatch_v2(dispatch_calls);
  const std::vector<Tensor> want_out = reference::combine_v2(combine_calls);
  for (size_t i = 0; i < ranks.size(); ++i) {
    summarize_run(l, ranks[i], summaries[i]);
    summaries[i].accuracy = compare_with_dense(l, ranks[i], dense[i]);
    summaries[i].dispatch_diff = compare_dispatch(l, ranks[i], want[i]);
    summaries[i].combine_diff = compare_combine(l, ranks[i], want_out[i]);
  }
  return report(l, summaries, false, 0);
}

// ---------------------------------------------------------------------------------------------------
// Process mode: every rank is a process. Global rank p (0 <= p < tp * W) is EP rank p % W of the EP
// group of TP index p / W ("moedist-demo-ep<p / W>"); with --tp 2, ranks p and p + W form the TP group
// "moedist-demo-tp<p % W>". So ranks 0..W-1 are the first EP group, W..2W-1 the second, in the order of
// the thread mode. The ranks that call the ops (all but the ones --elastic removes, which join their
// EP group and stop) also join "moedist-demo-all", the phase barrier, as member tp_index * (active
// ranks) + ep_rank (== p), and, unless the demo's parent collects the results from files
// (--report-dir), "moedist-demo-report", the same members again, over which rank 0 gathers the results.
// --transport shm: every group is made by make_shm_group (one host). mpi, hybrid (under mpirun): by
// make_mpi_world_group, collective over MPI_COMM_WORLD, so every process makes the same calls in the
// same order, removed ranks included (they pass color -1 where they join no group): EP group (color
// tp index, key EP rank), with --tp 2 the TP group (color EP rank, key tp index), the barrier group
// and the report group (color 0, key member). The report group is plain MPI for both (it carries a few
// kilobytes once).

constexpr const char* kAllGroup = "moedist-demo-all";
constexpr const char* kReportGroup = "moedist-demo-report";

// The groups of one rank process; the EP and TP groups are registered under their names for the ops.
struct ProcessGroups {
  GroupRegistration registered;
  std::shared_ptr<Transport> all;     // phase barrier; nullptr on a removed rank
  std::shared_ptr<Transport> report;  // results to rank 0; nullptr on a removed rank, or with --report-dir
};

// The report group waits longer than the ops: its members arrive when their checks are done, which
// takes each rank its own time, and a rank that failed early waits there for the ones still timing out.
GroupOptions report_options(const Layer& l) {
  GroupOptions options;
  options.timeout = std::chrono::milliseconds(2 * static_cast<int64_t>(l.opt.timeout_ms) + 60000);
  return options;
}

// Joins the groups of global rank p (with_report: the report group too).
void join_groups(const Layer& l, int p, bool with_report, ProcessGroups& g) {
  const int tp_rank = static_cast<int>(p / l.W), ep_rank = static_cast<int>(p % l.W);
  const bool removed = ep_rank >= l.active_ranks;
  const int member = removed ? -1 : static_cast<int>(tp_rank * l.active_ranks + ep_rank);
  const int calling = static_cast<int>(l.calling_ranks());
  const GroupOptions options = group_options(l);
  const std::string ep_group = l.ep_group(tp_rank), tp_group = l.tp_group(ep_rank);
  if (l.opt.transport == "shm") {
    g.registered.add(ep_group, {make_shm_group(ep_group, static_cast<int>(l.W), ep_rank, options)});
    if (removed) return;
    if (l.tp == 2) g.registered.add(tp_group, {make_shm_group(tp_group, 2, tp_rank, options)});
    g.all = make_shm_group(kAllGroup, calling, member, options);
    if (with_report) g.report = make_shm_group(kReportGroup, calling, member, report_options(l));
    return;
  }
  // After a call that failed here this process still makes the others, so that no process waits for it
  // inside MPI_Comm_split; the first error is raised at the end.
  std::exception_ptr error;
  auto make = [&](const GroupOptions& opt, const std::string& transport, int color, int key) -> std::shared_ptr<Transport> {
    try {
      return make_mpi_world_group(opt, transport, color, key);
    } catch (...) {
      if (!error) error = std::current_exception();
      return nullptr;
    }
  };
  if (auto ep = make(options, l.opt.transport, tp_rank, ep_rank)) g.registered.add(ep_group, {ep});
  if (l.tp == 2)
    if (auto tp = make(options, l.opt.transport, removed ? -1 : ep_rank, tp_rank)) g.registered.add(tp_group, {tp});
  g.all = make(options, l.opt.transport, removed ? -1 : 0, member);
  if (with_report) g.report = make(report_options(l), "mpi", removed ? -1 : 0, member);
  if (error) std::rethrow_exception(error);
}

// The hosts the ranks that call the ops run on, as the MPI transports see them; 0 for shared memory.
int mpi_host_count(const ProcessGroups& g) {
#ifdef MOEDIST_HAVE_MPI
  if (g.all) {
    const std::vector<int> hosts = mpi_hosts(*g.all);
    if (!hosts.empty()) return *std::max_element(hosts.begin(), hosts.end()) + 1;
  }
#else
  (void)g;
#endif
  return 0;
}

void record_error(RankSummary& s, const std::exception& e) {
  s.status = RankSummary::Status::kError;
  s.error = e.what();
  s.transport_error = dynamic_cast<const TransportError*>(&e) != nullptr;
}

// The checks of rank `me` in a rank process: every other rank's arguments are rebuilt from the seed
// (inputs, gating, and expert outputs computed from the reference's dispatch rows, which is what the
// rank itself computes when its dispatch is bit-exact), so the reference can run all ranks' calls.
void check_own_rank(const Layer& l, std::vector<RankState>& ranks, size_t me, RankSummary& s) {
  for (size_t i = 0; i < ranks.size(); ++i)
    if (i != me) gate(l, ranks[i]);
  std::vector<DispatchArgs> dispatch_calls;
  for (const RankState& st : ranks) dispatch_calls.push_back(st.dispatch_args);
  std::vector<DispatchResult> want = reference::dispatch_v2(dispatch_calls);
  s.dispatch_diff = compare_dispatch(l, ranks[me], want[me]);

  std::vector<CombineArgs> combine_calls;
  for (size_t i = 0; i < ranks.size(); ++i) {
    RankState& st = ranks[i];
    if (i != me) {
      std::vector<ExpertWeights> weights;
      for (const ExpertKey& key : hosted_experts(l, st.ep_rank)) weights.push_back(make_expert_weights(l, key));
      st.dispatched = std::move(want[i]);
      run_experts(l, st, weights);
      st.combine_args = make_combine_args(l, st);
    }
    combine_calls.push_back(st.combine_args);
  }
  const std::vector<Tensor> want_out = reference::combine_v2(combine_calls);
  s.combine_diff = compare_combine(l, ranks[me], want_out[me]);

  s.accuracy = compare_with_dense(l, ranks[me], dense_layer(l, ranks, {me})[me]);
}

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
    run_rank(l, ranks[me], [&] { barrier.arrive_and_wait(); });
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
  if (s.status != RankSummary::Status::kError) run_process_rank(l, groups, s);
  const int code = s.status == RankSummary::Status::kError ? 1 : 0;

  if (!gather) {
    const bool written = write_summary(o.report_dir, env.rank, s);
    if (!written) std::fprintf(stderr, "moedist demo: rank %d: cannot write its result to %s\n", env.rank, o.report_dir.c_str());
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

std::string temp_root() {
  const char* t = std::getenv("TMPDIR");
  return t && *t ? t : "/tmp";
}

std::string self_exe() {
  char path[4096];
  const ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
  return n > 0 ? std::string(path, static_cast<size_t>(n)) : std::string("/proc/self/exe");
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
  launch_args.insert(launch_args.end(), args.begin(), args.end());
  launch_args.insert(launch_args.end(), {"--report-dir", dir});
  std::vector<char*> argv;
  for (std::string& a : launch_args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const int code = launch_main(static_cast<int>(launch_args.size()), argv.data());

  const std::vector<RankSummary> summaries = collect_summaries(l, dir, processes);
  remove_report_dir(dir, processes);
  return report(l, summaries, true, code);
}

}  // namespace

void print_demo_help(std::ostream& os) {
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
        "  --transport T      how the rank processes talk (default shm):\n"
        "                       shm     shared memory, every rank on this host\n"
        "                       mpi     MPI between all ranks (only under mpirun; hosts: see mpirun)\n"
        "                       hybrid  shared memory within a host, MPI between hosts (only under mpirun)\n"
        "  --threads          ranks are threads of this process (thread groups), not processes\n"
        "  --report-dir DIR   (internal) set by the demo for its rank processes: write the rank's result\n"
        "                     to DIR and leave the report to the parent\n"
        "  --help             this help\n";
}

int demo_main(const std::vector<std::string>& args) {
  DemoOptions options;
  LaunchEnv env;
  try {
    if (!parse_options(args, options)) {
      print_demo_help(std::cout);
      return 0;
    }
    env = launch_env();
    if (options.threads && env.found && env.world_size > 1)
      throw UsageError(cat("--threads runs every rank in this one process, but it was started as rank ", env.rank, " of ", env.world_size,
                           " by the ", env.launcher, " launcher (leave out --threads, or start it directly)"));
    if (!options.report_dir.empty() && (options.threads || !env.found))
      throw UsageError("--report-dir is internal: the demo sets it for the rank processes it starts");
    if (options.transport != "shm") {
      const std::string option = cat("--transport ", options.transport);
      if (options.threads)
        throw UsageError(cat(option, " is for rank processes started by mpirun, --threads runs the ranks as threads of this process "
                             "(leave out one of them)"));
      const std::string started = env.found ? cat("was started by the ", env.launcher, " launcher") : "was started directly";
      if (env.launcher != "openmpi")
        throw UsageError(cat(option, " needs rank processes started by mpirun (mpirun -np N moedist demo ", option,
                             " ...), but this process ", started, ": here only --transport shm (the default) is allowed"));
      if (!mpi_available())
        throw UsageError(cat(option, ": this build of moedist has no MPI (install an MPI library, e.g. libopenmpi-dev, and rebuild): only "
                             "--transport shm (the default) is allowed"));
    }
  } catch (const UsageError& e) {
    std::fprintf(stderr, "moedist demo: %s\n(see 'moedist demo --help')\n", e.what());
    return 2;
  } catch (const std::exception& e) {  // launch_env(): malformed launcher variables
    std::fprintf(stderr, "moedist demo: %s\n", e.what());
    return 2;
  }
  try {
    if (options.threads) return run_threads(options);
    if (env.found) return run_rank_process(options, env);
    return run_parent(options, args);
  } catch (const std::exception& e) {  // moedist::Error from the reference, or out of memory
    std::printf("error: %s\n", e.what());
    return fail("error");
  }
}

}  // namespace moedist::tools
