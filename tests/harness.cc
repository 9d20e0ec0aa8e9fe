#include "harness.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <thread>

#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/half.h"

namespace moedist::test {

namespace {
// The op of a case: one call, or the split pair with work in between (the rank's own rows may arrive
// while it "computes").
DispatchResult run_dispatch(const Case& c, const DispatchArgs& a) {
  if (!c.split) return dispatch_v2(a);
  const uint64_t h = dispatch_setup(a);
  std::this_thread::sleep_for(std::chrono::microseconds(200 * (a.ep_rank_id % 3)));
  return dispatch_teardown(h);
}
Tensor run_combine(const Case& c, const CombineArgs& a) {
  if (!c.split) return combine_v2(a);
  const uint64_t h = combine_setup(a);
  std::this_thread::sleep_for(std::chrono::microseconds(200 * (a.ep_rank_id % 3)));
  return combine_teardown(h);
}
}  // namespace


std::string case_name(const Case& c) {
  std::ostringstream os;
  os << "W" << c.W << "_BS" << c.BS << "_H" << c.H << "_K" << c.K << "_E" << c.E << "_"
     << (c.dtype == DType::kBFloat16 ? "bf16" : "fp16");
  if (c.quant) os << "_quant" << c.quant << (c.smooth ? "smooth" : "");
  if (c.Sr) os << "_shared" << c.shared_num << "x" << c.Sr;
  if (c.tp) os << "_tp" << c.tp;
  if (c.mask) os << "_mask" << c.mask << "d";
  if (c.Z || c.C || c.Q) os << "_zcq" << c.Z << c.C << c.Q;
  if (!c.removed.empty()) os << "_elastic" << c.removed.size();
  if (c.ragged) os << "_ragged";
  if (c.comm_quant) os << "_commquant";
  if (!c.alg.empty()) os << "_" << c.alg << c.ranks_per_server;
  if (c.shared_x) os << "_sharedx";
  if (c.etn_type == 0) os << "_cumsum";
  if (c.strided) os << "_strided";
  if (c.split) os << "_split";
  if (c.add_rms_norm) os << "_addrmsnorm";
  return os.str();
}

void run_ranks(int n, const std::function<void(int)>& fn) {
  std::vector<std::exception_ptr> errs(static_cast<size_t>(n));
  std::vector<std::thread> th;
  for (int i = 0; i < n; ++i)
    th.emplace_back([&, i] {
      try {
        fn(i);
      } catch (...) {
        errs[static_cast<size_t>(i)] = std::current_exception();
      }
    });
  for (auto& t : th) t.join();
  for (auto& e : errs)
    if (e) std::rethrow_exception(e);
}

namespace {

std::atomic<int> g_case_counter{0};

uint16_t half_of(DType dt, float f) { return core::float_to_half(dt, f); }

}  // namespace

// Owned inputs of one rank. Strided cases keep the data inside a wider buffer (row stride + pad).
struct RankData {
  int tp_rank = 0, ep_rank = 0, BS = 0;
  std::vector<uint16_t> x;      // (BS, H + pad)
  std::vector<int32_t> ids;     // (BS, K + pad)
  std::vector<uint8_t> mask;
  std::vector<float> weights;   // (BS, K)
  std::vector<float> scales;    // (S + E, H)
  std::vector<int32_t> elastic;
  std::vector<uint16_t> shared_x, alpha1, alpha2, const_v;
  DispatchResult ref;
  std::vector<uint16_t> ffn;    // (rows, H + pad): combine input
  int64_t ffn_rows = 0;
};

namespace {

std::string compare(const Tensor& got, const Tensor& want, const std::string& what) {
  if (got.dtype() != want.dtype()) return what + ": dtype " + dtype_name(got.dtype()) + " vs " + dtype_name(want.dtype());
  if (got.shape() != want.shape()) {
    std::ostringstream os;
    os << what << ": shape " << got.view().shape_str() << " vs reference " << want.view().shape_str();
    return os.str();
  }
  if (std::memcmp(got.data(), want.data(), got.nbytes()) != 0) {
    const size_t es = dtype_size(got.dtype());
    for (size_t i = 0; i < got.nbytes(); ++i)
      if (static_cast<const unsigned char*>(got.data())[i] != static_cast<const unsigned char*>(want.data())[i]) {
        std::ostringstream os;
        os << what << ": first difference at element " << i / es << " of " << got.numel();
        return os.str();
      }
  }
  return "";
}

}  // namespace

std::unique_ptr<Prepared> prepare(const Case& c, const std::string& prefix) {
  auto prep = std::make_unique<Prepared>();
  Prepared& P = *prep;
  P.c = c;
  P.prefix = prefix;
  unsigned seed = 1234;
  for (char ch : case_name(c)) seed = seed * 31u + static_cast<unsigned char>(ch);
  const DType dt = c.dtype;
  const int H = c.H, K = c.K;
  const int tp = c.tp == 2 ? 2 : 1;
  const int S = c.Sr == 0 ? 0 : c.shared_num;
  const int pad = c.strided ? 3 : 0;
  std::mt19937 rng(seed);

  // Active ranks (elastic) and the expert ids they may use.
  std::vector<int> active;
  for (int r = 0; r < c.W; ++r)
    if (std::find(c.removed.begin(), c.removed.end(), r) == c.removed.end()) active.push_back(r);
  const int Wl = static_cast<int>(active.size());
  const int Sr_l = c.removed.empty() ? c.Sr : (c.Sr_after >= 0 ? c.Sr_after : c.Sr);
  const int L = c.E / (c.W - c.Sr);
  const int E_l = c.removed.empty() ? c.E : L * (Wl - Sr_l);
  std::vector<int> id_pool;
  for (int g = 0; g < E_l; ++g) id_pool.push_back(g);
  for (int g = 0; g < c.Z + c.C + c.Q; ++g) id_pool.push_back(c.E + g);

  std::vector<RankData>& ranks = P.ranks;
  for (int q = 0; q < tp; ++q)
    for (int r : active) {
      RankData d;
      d.tp_rank = q;
      d.ep_rank = r;
      d.BS = c.ragged ? std::max(0, c.BS - (r % 3)) : c.BS;
      const int BS = d.BS;
      d.x.resize(static_cast<size_t>(BS * (H + pad)));
      for (int t = 0; t < BS; ++t)
        for (int h = 0; h < H + pad; ++h) {
          // A function of (tp rank, source rank, token, h): a wrong route shows at once.
          float v = static_cast<float>(((q * 7 + r * 131 + t * 17 + h * 7) % 97) - 48) / 32.0f;
          if (h % 11 == 3) v *= 1.0f + static_cast<float>(t) / 64.0f;
          d.x[static_cast<size_t>(t * (H + pad) + h)] = half_of(dt, v);
        }
      d.ids.assign(static_cast<size_t>(BS * (K + pad)), -7);
      for (int t = 0; t < BS; ++t) {
        std::vector<int> pool = id_pool;
        std::shuffle(pool.begin(), pool.end(), rng);
        for (int k = 0; k < K; ++k) d.ids[static_cast<size_t>(t * (K + pad) + k)] = pool[static_cast<size_t>(k)];
      }
      if (c.mask == 1) {
        const int n = std::max(0, BS - (r % 3) - q);
        for (int t = 0; t < BS; ++t) d.mask.push_back(t < n);
      } else if (c.mask == 2) {
        for (int t = 0; t < BS; ++t)
          for (int k = 0; k < K; ++k) d.mask.push_back(t % 5 == 4 ? 0 : static_cast<uint8_t>((rng() % 4) != 0));
      }
      std::uniform_real_distribution<float> uw(-1.f, 1.f);
      for (int i = 0; i < BS * K; ++i) d.weights.push_back(uw(rng));
      if (c.smooth)
        for (int i = 0; i < (S + c.E) * H; ++i) d.scales.push_back(0.5f + static_cast<float>(rng() % 64) / 32.0f);
      if (!c.removed.empty()) {
        d.elastic.assign(static_cast<size_t>(4 + 2 * c.W), -1);
        d.elastic[0] = 1;
        d.elastic[1] = Wl;
        d.elastic[2] = Sr_l;
        d.elastic[3] = E_l;
        for (int l = 0; l < Wl; ++l) {
          d.elastic[static_cast<size_t>(4 + active[static_cast<size_t>(l)])] = l;
          d.elastic[static_cast<size_t>(4 + c.W + l)] = active[static_cast<size_t>(l)];
        }
      }
      if (c.shared_x)
        for (int i = 0; i < BS * H; ++i) d.shared_x.push_back(half_of(dt, static_cast<float>(i % 13) / 8.0f - 0.75f));
      for (int i = 0; i < c.Q; ++i) {
        d.alpha1.push_back(half_of(dt, uw(rng)));
        d.alpha2.push_back(half_of(dt, uw(rng)));
      }
      for (int i = 0; i < c.Q * H; ++i) d.const_v.push_back(half_of(dt, uw(rng)));
      ranks.push_back(std::move(d));
    }

  auto tp_name = [&](int r) { return P.tp_group(r); };
  auto dispatch_args = [&](const RankData& d) {
    DispatchArgs a;
    a.x = TensorView(d.x.data(), dt, {d.BS, H}, {H + pad, 1});
    a.expert_ids = TensorView(d.ids.data(), DType::kInt32, {d.BS, K}, {K + pad, 1});
    a.group_ep = P.ep_group(d.tp_rank);
    a.ep_world_size = c.W;
    a.ep_rank_id = d.ep_rank;
    a.moe_expert_num = c.E;
    if (c.smooth) a.scales = TensorView(d.scales.data(), DType::kFloat32, {S + c.E, H});
    if (c.mask == 1) a.x_active_mask = TensorView(d.mask.data(), DType::kBool, {d.BS});
    if (c.mask == 2) a.x_active_mask = TensorView(d.mask.data(), DType::kBool, {d.BS, K});
    a.expert_scales = TensorView(d.weights.data(), DType::kFloat32, {d.BS, K});
    if (!d.elastic.empty()) a.elastic_info = TensorView(d.elastic.data(), DType::kInt32, {4 + 2 * c.W});
    if (c.tp) {
      a.group_tp = tp_name(d.ep_rank);
      a.tp_world_size = c.tp;
      a.tp_rank_id = d.tp_rank;
    }
    a.shared_expert_num = c.shared_num;
    a.shared_expert_rank_num = c.Sr;
    a.quant_mode = c.quant;
    a.global_bs = c.ragged ? c.BS * c.W : 0;
    a.expert_token_nums_type = c.etn_type;
    a.comm_alg = c.alg;
    a.zero_expert_num = c.Z;
    a.copy_expert_num = c.C;
    a.const_expert_num = c.Q;
    return a;
  };

  reference::Options ropt;
  ropt.ranks_per_server = c.ranks_per_server;
  std::vector<DispatchArgs>& dargs = P.dargs;
  for (auto& d : ranks) dargs.push_back(dispatch_args(d));
  P.ref = reference::dispatch_v2(dargs, ropt);
  const std::vector<DispatchResult>& ref = P.ref;
  const int n = static_cast<int>(ranks.size());

  // Expert stand-in: y = dequant(x) * (1 + h/64) rounded to dt; rows past the count are NaN, so a
  // read of an unwritten row shows in the result.
  for (int i = 0; i < n; ++i) {
    RankData& d = ranks[static_cast<size_t>(i)];
    const DispatchResult& r = ref[static_cast<size_t>(i)];
    const int64_t rows_total = r.expand_x.size(0);
    // Rows this rank must run the experts on (own + TP peer's): from expert_token_nums.
    int64_t used = 0;
    for (int64_t e = 0; e < r.expert_token_nums.numel(); ++e) {
      const int64_t v = r.expert_token_nums.data_as<int64_t>()[e];
      used = c.etn_type == 1 ? used + v : std::max(used, v);
    }
    d.ffn_rows = rows_total;
    d.ffn.assign(static_cast<size_t>(rows_total * (H + pad)), dt == DType::kBFloat16 ? 0x7fc0 : 0x7e00);
    for (int64_t row = 0; row < used; ++row)
      for (int h = 0; h < H; ++h) {
        float v;
        if (c.quant == 2)
          v = static_cast<float>(static_cast<const int8_t*>(r.expand_x.data())[row * H + h]) * r.dynamic_scales.data_as<float>()[row];
        else
          v = core::half_to_float(dt, r.expand_x.data_as<uint16_t>()[row * H + h]);
        v = v * (1.0f + static_cast<float>(h) / 64.0f);
        if (c.tp == 2) v = v * 0.5f;  // row-parallel halves
        d.ffn[static_cast<size_t>(row * (H + pad) + h)] = half_of(dt, v);
      }
  }

  std::vector<CombineArgs>& cargs = P.cargs;
  for (int i = 0; i < n; ++i) {
    const RankData& d = ranks[static_cast<size_t>(i)];
    const DispatchArgs& da = dargs[static_cast<size_t>(i)];
    const DispatchResult& r = ref[static_cast<size_t>(i)];
    CombineArgs a;
    a.expand_x = TensorView(d.ffn.data(), dt, {d.ffn_rows, H}, {H + pad, 1});
    a.expert_ids = da.expert_ids;
    a.assist_info_for_combine = r.assist_info_for_combine;
    a.ep_send_counts = r.ep_recv_counts;
    a.expert_scales = da.expert_scales;
    a.group_ep = da.group_ep;
    a.ep_world_size = c.W;
    a.ep_rank_id = d.ep_rank;
    a.moe_expert_num = c.E;
    if (c.tp == 2) a.tp_send_counts = r.tp_recv_counts;
    a.x_active_mask = da.x_active_mask;
    a.expand_scales = r.expand_scales;
    if (c.shared_x) a.shared_expert_x = TensorView(d.shared_x.data(), dt, {d.BS, H});
    a.elastic_info = da.elastic_info;
    if (c.C || c.Q) a.ori_x = da.x;
    if (c.Q) {
      a.const_expert_alpha_1 = TensorView(d.alpha1.data(), dt, {c.Q});
      a.const_expert_alpha_2 = TensorView(d.alpha2.data(), dt, {c.Q});
      a.const_expert_v = TensorView(d.const_v.data(), dt, {c.Q, H});
    }
    a.group_tp = da.group_tp;
    a.tp_world_size = da.tp_world_size;
    a.tp_rank_id = da.tp_rank_id;
    a.shared_expert_num = c.shared_num;
    a.shared_expert_rank_num = c.Sr;
    a.global_bs = da.global_bs;
    a.comm_quant_mode = c.comm_quant;
    a.comm_alg = c.alg;
    a.zero_expert_num = c.Z;
    a.copy_expert_num = c.C;
    a.const_expert_num = c.Q;
    cargs.push_back(a);
  }
  P.cref = reference::combine_v2(cargs, ropt);
  if (c.add_rms_norm) {
    // gamma in [0.5, 1.5), residual in [-2, 2): functions of (rank, token, h), the same in every process.
    Tensor gamma(dt, {H});
    for (int64_t h = 0; h < H; ++h) gamma.data_as<uint16_t>()[h] = core::float_to_half(dt, 0.5f + static_cast<float>((h * 37) % 64) / 64.f);
    P.norm_inputs.push_back(gamma);
    for (size_t i = 0; i < cargs.size(); ++i) {
      const int64_t bs = cargs[i].expert_ids.size(0);
      Tensor res(dt, {bs, 1, H});
      for (int64_t t = 0; t < bs; ++t)
        for (int64_t h = 0; h < H; ++h)
          res.data_as<uint16_t>()[t * H + h] =
              core::float_to_half(dt, static_cast<float>((static_cast<int64_t>(i) * 131 + t * 17 + h * 7) % 64) / 16.f - 2.f);
      P.norm_inputs.push_back(res);
      CombineAddRmsNormArgs na;
      na.combine = cargs[i];
      na.residual_x = P.norm_inputs.back();
      na.gamma = P.norm_inputs.front();
      na.norm_eps = 1e-5;
      P.nargs.push_back(na);
    }
    P.nref = reference::combine_add_rms_norm(P.nargs, ropt);
  }
  for (const Tensor& w : P.cref)
    for (int64_t j = 0; j < w.numel(); ++j)
      if (std::isnan(core::half_to_float(dt, w.data_as<uint16_t>()[j])))
        throw Error("reference combine produced NaN: an unwritten row was read (test data broken)");
  return prep;
}

// Rows of a rank's dispatch output: own EP rows and, with TP, the peer's after them.
void rows_of(const Prepared& P, int i, int64_t* own, int64_t* total) {
  const DispatchResult& r = P.ref[static_cast<size_t>(i)];
  int64_t used = 0;
  for (int64_t e = 0; e < r.expert_token_nums.numel(); ++e) {
    const int64_t v = r.expert_token_nums.data_as<int64_t>()[e];
    used = P.c.etn_type == 1 ? used + v : std::max(used, v);
  }
  *total = used;
  *own = P.c.tp == 2 ? r.tp_recv_counts.data_as<int32_t>()[P.ranks[static_cast<size_t>(i)].tp_rank] : used;
}

// Compares the first `n` elements only (the rest is unspecified: rows past the received count).
std::string compare_prefix(const Tensor& got, const Tensor& want, int64_t n, const std::string& what) {
  if (got.dtype() != want.dtype() || got.shape() != want.shape()) return compare(got, want, what);
  const size_t bytes = static_cast<size_t>(n) * dtype_size(got.dtype());
  if (std::memcmp(got.data(), want.data(), bytes) == 0) return "";
  const size_t es = dtype_size(got.dtype());
  for (size_t b = 0; b < bytes; ++b)
    if (static_cast<const unsigned char*>(got.data())[b] != static_cast<const unsigned char*>(want.data())[b])
      return what + ": first difference at element " + std::to_string(b / es) + " of " + std::to_string(n) + " compared";
  return "";
}

std::string check_dispatch(const Prepared& P, int i, const DispatchResult& g) {
  const auto& w = P.ref[static_cast<size_t>(i)];
  const std::string who = "rank " + std::to_string(P.ranks[static_cast<size_t>(i)].ep_rank) + " tp " +
                          std::to_string(P.ranks[static_cast<size_t>(i)].tp_rank) + " dispatch ";
  int64_t own, total;
  rows_of(P, i, &own, &total);
  std::string diff = compare_prefix(g.expand_x, w.expand_x, total * P.c.H, who + "expand_x");
  if (diff.empty()) diff = compare_prefix(g.assist_info_for_combine, w.assist_info_for_combine, 3 * own, who + "assist_info_for_combine");
  if (!diff.empty()) return diff;
  for (auto [a, b, nm] : {std::tuple{&g.dynamic_scales, &w.dynamic_scales, "dynamic_scales"},
                          {&g.expert_token_nums, &w.expert_token_nums, "expert_token_nums"},
                          {&g.ep_recv_counts, &w.ep_recv_counts, "ep_recv_counts"},
                          {&g.tp_recv_counts, &w.tp_recv_counts, "tp_recv_counts"},
                          {&g.expand_scales, &w.expand_scales, "expand_scales"}}) {
    diff = compare(*a, *b, who + nm);
    if (!diff.empty()) return diff;
  }
  return "";
}

std::string check_combine(const Prepared& P, int i, const Tensor& got) {
  return compare(got, P.cref[static_cast<size_t>(i)], "rank " + std::to_string(P.ranks[static_cast<size_t>(i)].ep_rank) + " tp " +
                                                          std::to_string(P.ranks[static_cast<size_t>(i)].tp_rank) + " combine");
}

std::string check_add_rms_norm(const Prepared& P, int i, const CombineAddRmsNormResult& got) {
  const auto& w = P.nref[static_cast<size_t>(i)];
  const std::string who = "rank " + std::to_string(P.ranks[static_cast<size_t>(i)].ep_rank) + " combine_add_rms_norm ";
  std::string diff = compare(got.y, w.y, who + "y");
  if (diff.empty()) diff = compare(got.rstd, w.rstd, who + "rstd");
  if (diff.empty()) diff = compare(got.x, w.x, who + "x");
  return diff;
}

// Sanitizers slow every rank several times over (16 ranks on 2 cores under ThreadSanitizer): the
// deadlines of the conformance runs grow with them, so a slow rank is not taken for a stuck one.
#if defined(MOEDIST_ASAN) || defined(MOEDIST_TSAN)
constexpr int kDeadlineScale = 4;
#else
constexpr int kDeadlineScale = 1;
#endif

std::string run_case(const Case& c) {
  const std::string prefix = "t" + std::to_string(g_case_counter++) + "_";
  auto P = prepare(c, prefix);
  // Groups: one EP group per TP index, one TP group (size 2) per EP rank.
  GroupOptions opt;
  opt.timeout = std::chrono::milliseconds(20000 * kDeadlineScale);
  opt.ranks_per_server = c.ranks_per_server;
  std::vector<std::string> names;
  const int tp = c.tp == 2 ? 2 : 1;
  for (int q = 0; q < tp; ++q) {
    names.push_back(P->ep_group(q));
    register_group(names.back(), make_thread_group(c.W, opt));
  }
  if (c.tp)
    for (int r = 0; r < c.W; ++r) {
      names.push_back(P->tp_group(r));
      register_group(names.back(), make_thread_group(2, opt));
    }
  struct Cleanup {
    std::vector<std::string>& n;
    ~Cleanup() {
      for (auto& s : n) unregister_group(s);
    }
  } cleanup{names};

  const int n = static_cast<int>(P->ranks.size());
  std::vector<DispatchResult> got(static_cast<size_t>(n));
  run_ranks(n, [&](int i) { got[static_cast<size_t>(i)] = run_dispatch(c, P->dargs[static_cast<size_t>(i)]); });
  for (int i = 0; i < n; ++i) {
    std::string diff = check_dispatch(*P, i, got[static_cast<size_t>(i)]);
    if (!diff.empty()) return diff;
  }
  if (c.add_rms_norm) {
    std::vector<CombineAddRmsNormResult> ngot(static_cast<size_t>(n));
    run_ranks(n, [&](int i) { ngot[static_cast<size_t>(i)] = combine_add_rms_norm(P->nargs[static_cast<size_t>(i)]); });
    for (int i = 0; i < n; ++i) {
      std::string diff = check_add_rms_norm(*P, i, ngot[static_cast<size_t>(i)]);
      if (!diff.empty()) return diff;
    }
    return "";
  }
  std::vector<Tensor> cgot(static_cast<size_t>(n));
  run_ranks(n, [&](int i) { cgot[static_cast<size_t>(i)] = run_combine(c, P->cargs[static_cast<size_t>(i)]); });
  for (int i = 0; i < n; ++i) {
    std::string diff = check_combine(*P, i, cgot[static_cast<size_t>(i)]);
    if (!diff.empty()) return diff;
  }
  return "";
}

std::string run_body(const Case& c, const RankBody& body) {
  const std::string prefix = "t" + std::to_string(g_case_counter++) + "_";
  auto P = prepare(c, prefix);
  GroupOptions opt;
  opt.timeout = std::chrono::milliseconds(20000 * kDeadlineScale);
  opt.ranks_per_server = c.ranks_per_server;
  std::vector<std::string> names;
  const int tp = c.tp == 2 ? 2 : 1;
  for (int q = 0; q < tp; ++q) {
    names.push_back(P->ep_group(q));
    register_group(names.back(), make_thread_group(c.W, opt));
  }
  if (c.tp)
    for (int r = 0; r < c.W; ++r) {
      names.push_back(P->tp_group(r));
      register_group(names.back(), make_thread_group(2, opt));
    }
  struct Cleanup {
    std::vector<std::string>& n;
    ~Cleanup() {
      for (auto& s : n) unregister_group(s);
    }
  } cleanup{names};
  const int n = static_cast<int>(P->ranks.size());
  // A rank whose check fails stops calling, and its peers then time out: its message comes first.
  std::vector<std::string> msg(static_cast<size_t>(n)), thrown(static_cast<size_t>(n));
  run_ranks(n, [&](int i) {
    try {
      msg[static_cast<size_t>(i)] = body(*P, i);
    } catch (const std::exception& e) {
      thrown[static_cast<size_t>(i)] = "rank index " + std::to_string(i) + ": " + e.what();
    }
  });
  for (const auto* v : {&msg, &thrown})
    for (const auto& m : *v)
      if (!m.empty()) return m;
  return "";
}

namespace {
std::string str_of(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t j = 0; j < v.size(); ++j) s += (j ? ", " : "") + std::to_string(v[j]);
  return s + "]";
}
}  // namespace

std::string check_waits_rank(const Prepared& P, int i, int slow, int sleep_ms) {
  const Case& c = P.c;
  const int me = rank_of(P, i, nullptr);
  const auto idx = static_cast<size_t>(i);
  constexpr int64_t kStart = 7;  // the op adds: what the caller put there stays part of the value
  std::vector<int64_t> perf(static_cast<size_t>(c.W), kStart);
  const TensorView pv(perf.data(), DType::kInt64, {c.W});
  std::vector<int64_t> prev = perf;
  std::string timing;  // the first complaint about the times: reported at the end, the rank keeps calling
  auto fail = [&](const std::string& when, const std::string& what) {
    return "rank " + std::to_string(me) + ", " + when + ": " + what + " (performance_info " + str_of(perf) + ", before " + str_of(prev) +
           ")";
  };
  // Every entry grew or stayed, this rank's own is untouched; "" if so.
  auto monotone = [&](const std::string& when) -> std::string {
    if (perf[static_cast<size_t>(me)] != kStart) return fail(when, "its own entry changed");
    for (size_t j = 0; j < perf.size(); ++j)
      if (perf[j] < prev[j]) return fail(when, "entry " + std::to_string(j) + " decreased");
    for (int j : c.removed)  // ranks removed by elastic_info take no part: nobody waits for them
      if (perf[static_cast<size_t>(j)] != kStart) return fail(when, "the entry of removed rank " + std::to_string(j) + " changed");
    return "";
  };
  // A warm-up round without performance_info brings the ranks into step.
  {
    std::string diff = check_dispatch(P, i, dispatch_v2(P.dargs[idx]));
    if (diff.empty())
      diff = c.add_rms_norm ? check_add_rms_norm(P, i, combine_add_rms_norm(P.nargs[idx])) : check_combine(P, i, combine_v2(P.cargs[idx]));
    if (!diff.empty()) return "warm-up: " + diff;
  }
  for (int round = 0; round < 2; ++round) {
    const std::string when = "round " + std::to_string(round);
    DispatchArgs d = P.dargs[idx];
    d.performance_info = pv;
    if (me == slow) std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms));
    DispatchResult r;
    if (c.split) {
      const uint64_t h = dispatch_setup(d);
      std::this_thread::sleep_for(std::chrono::microseconds(200 * (me % 3)));
      r = dispatch_teardown(h);
    } else {
      r = dispatch_v2(d);
    }
    std::string diff = check_dispatch(P, i, r);
    if (!diff.empty()) return when + ", dispatch with performance_info: " + diff;
    diff = monotone(when + ", dispatch");
    if (!diff.empty()) return diff;
    if (me != slow) {
      const int64_t need = kStart + (round + 1) * 20000;  // at least 20 ms per round (the slow rank sleeps longer)
      const auto s = static_cast<size_t>(slow);
      if (timing.empty() && perf[s] < need)
        timing = "timing: " + fail(when + ", dispatch", "waited less than " + std::to_string(need - kStart) + " us for the slow rank");
      for (size_t j = 0; j < perf.size() && timing.empty(); ++j)
        if (j != s && perf[j] >= perf[s]) timing = "timing: " + fail(when + ", dispatch", "entry " + std::to_string(j) + " is not below the slow rank's");
    }
    prev = perf;
    // Combine: with performance_info in round 0, without in round 1 (then the tensor stays as it is).
    const bool give = round == 0;
    if (c.add_rms_norm) {
      CombineAddRmsNormArgs n = P.nargs[idx];
      if (give) n.combine.performance_info = pv;
      diff = check_add_rms_norm(P, i, combine_add_rms_norm(n));
    } else {
      CombineArgs a = P.cargs[idx];
      if (give) a.performance_info = pv;
      if (c.split) {
        const uint64_t h = combine_setup(a);
        std::this_thread::sleep_for(std::chrono::microseconds(200 * (me % 3)));
        diff = check_combine(P, i, combine_teardown(h));
      } else {
        diff = check_combine(P, i, combine_v2(a));
      }
    }
    if (!diff.empty()) return when + ", combine: " + diff;
    diff = monotone(when + ", combine");
    if (!diff.empty()) return diff;
    if (!give && perf != prev) return fail(when + ", combine", "changed by a call without performance_info");
    prev = perf;
  }
  return timing;
}

bool only_timing(const std::string& result) {
  if (result.empty()) return false;
  std::istringstream lines(result);
  std::string line;
  while (std::getline(lines, line))
    if (line.find("timing: ") == std::string::npos) return false;  // (lines may carry a "rank r: " prefix)
  return true;
}

std::string retry_timing(const std::function<std::string()>& run) {
  std::string r;
  for (int attempt = 0; attempt < 3; ++attempt) {
    r = run();
    if (!only_timing(r)) return r;
  }
  return r + " (in 3 attempts)";
}

Prepared::~Prepared() = default;

int rank_of(const Prepared& p, int index, int* tp_rank) {
  const RankData& d = p.ranks[static_cast<size_t>(index)];
  if (tp_rank) *tp_rank = d.tp_rank;
  return d.ep_rank;
}

std::vector<std::string> shm_leftovers(const std::string& job) {
  std::vector<std::string> out;
  const std::string want = "moedist-" + job + "-";
  if (DIR* dir = opendir("/dev/shm")) {
    while (dirent* e = readdir(dir))
      if (std::strncmp(e->d_name, want.c_str(), want.size()) == 0) out.push_back(e->d_name);
    closedir(dir);
  }
  return out;
}

namespace {
std::string how_it_ended(int status) {
  if (WIFEXITED(status)) return "exit code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    const char* name = sigabbrev_np(sig);
    return "killed by signal " + std::to_string(sig) + (name ? std::string(" (SIG") + name + ")" : "");
  }
  return "status " + std::to_string(status);
}

std::string last_lines(const std::string& out, size_t max_chars) {
  if (out.empty()) return "(no output)";
  return out.size() <= max_chars ? out : "..." + out.substr(out.size() - max_chars);
}
}  // namespace

std::vector<int32_t> elastic_info_of(const Prepared& p, int index) { return p.ranks[static_cast<size_t>(index)].elastic; }

std::string run_processes(int nproc, const std::function<std::string(int)>& child, int timeout_s) {
  return run_processes(nproc, child, timeout_s, {});
}

std::string run_processes(int nproc, const std::function<std::string(int)>& child, int timeout_s, const std::vector<int>& killed_by) {
  std::vector<pid_t> pids;
  std::vector<int> fds, errs;  // per child: its result message, its stderr
  std::fflush(nullptr);
  for (int i = 0; i < nproc; ++i) {
    int fd[2], ef[2];
    if (pipe(fd) != 0 || pipe(ef) != 0) return "pipe failed";
    const pid_t pid = fork();
    if (pid < 0) return "fork failed";
    if (pid == 0) {
      close(fd[0]);
      close(ef[0]);
      dup2(ef[1], 2);  // the child's stderr (sanitizer reports, crash messages) comes back to the parent
      close(ef[1]);
      std::string msg;
      try {
        msg = child(i);
      } catch (const std::exception& e) {
        msg = std::string("exception: ") + e.what();
      }
      if (!msg.empty()) {
        msg = "process " + std::to_string(i) + ": " + msg;
        ssize_t n = write(fd[1], msg.data(), msg.size());
        (void)n;
      }
      close(fd[1]);
      std::fflush(nullptr);
      _exit(msg.empty() ? 0 : 1);
    }
    close(fd[1]);
    close(ef[1]);
    pids.push_back(pid);
    fds.push_back(fd[0]);
    errs.push_back(ef[0]);
  }
  // Read every pipe until all are closed (or the deadline): results and stderr alike.
  std::vector<std::string> msgs(static_cast<size_t>(nproc)), outs(static_cast<size_t>(nproc));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  std::vector<int> all = fds;
  all.insert(all.end(), errs.begin(), errs.end());
  std::vector<bool> done(all.size(), false);
  size_t open_fds = all.size();
  while (open_fds > 0 && std::chrono::steady_clock::now() < deadline) {
    std::vector<pollfd> pf;
    std::vector<size_t> idx;
    for (size_t i = 0; i < all.size(); ++i)
      if (!done[i]) {
        pf.push_back({all[i], POLLIN, 0});
        idx.push_back(i);
      }
    if (poll(pf.data(), pf.size(), 100) <= 0) continue;
    for (size_t j = 0; j < pf.size(); ++j) {
      if (!(pf[j].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[4096];
      const ssize_t n = read(pf[j].fd, buf, sizeof(buf));
      const size_t k = idx[j];
      if (n > 0) {
        std::string& dst = k < fds.size() ? msgs[k] : outs[k - fds.size()];
        dst.append(buf, static_cast<size_t>(n));
        if (dst.size() > (1u << 20)) dst.erase(0, dst.size() - (1u << 19));
      } else {
        done[k] = true;
        --open_fds;
      }
    }
  }
  std::string result;
  if (open_fds > 0) {
    result = "processes still running after " + std::to_string(timeout_s) + " s (deadlock?)";
    for (pid_t p : pids) kill(p, SIGKILL);
  }
  // Every process that failed is reported: its message, or how it ended and its last output.
  for (size_t i = 0; i < pids.size(); ++i) {
    int status = 0;
    waitpid(pids[i], &status, 0);
    close(fds[i]);
    close(errs[i]);
    std::string line;
    if (!msgs[i].empty()) line = msgs[i];
    const int want_sig = i < killed_by.size() ? killed_by[i] : 0;
    if (want_sig != 0) {  // this process is to end by that signal
      if (!(WIFSIGNALED(status) && WTERMSIG(status) == want_sig) && msgs[i].empty())
        line = "process " + std::to_string(i) + " was to end by signal " + std::to_string(want_sig) + " but " + how_it_ended(status) +
               "; its last output: " + last_lines(outs[i], 1500);
    } else if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0) && msgs[i].empty())
      line = "process " + std::to_string(i) + " (pid " + std::to_string(pids[i]) + ") ended abnormally: " + how_it_ended(status) +
             "; its last output: " + last_lines(outs[i], 1500);
    if (!line.empty()) result += (result.empty() ? "" : "\n") + line;
  }
  return result;
}

std::string run_body_procs(const Case& c, const MakeEp& make_ep, const RankBody& body) {
  const std::string job = "test" + std::to_string(getpid()) + "_" + std::to_string(g_case_counter++);
  const int tp = c.tp == 2 ? 2 : 1;
  const std::string prefix = "s_";
  std::string result = run_processes(tp * c.W, [&](int p) -> std::string {
    const int q = p / c.W, r = p % c.W;
    GroupOptions opt;
    opt.timeout = std::chrono::milliseconds(20000 * kDeadlineScale);
    // The reference's servers: ranks_per_server, 0 meaning one server of all ranks (which a transport
    // spanning hosts would otherwise take from its hosts).
    opt.ranks_per_server = c.ranks_per_server ? c.ranks_per_server : c.alg == "hierarchy" ? c.W : 0;
    register_group(prefix + "ep" + std::to_string(q), {make_ep(c.W, r, opt, job + "q" + std::to_string(q))});
    if (c.tp) register_group(prefix + "tp" + std::to_string(r), {make_shm_group("tp" + std::to_string(r), 2, q, opt, job)});
    auto P = prepare(c, prefix);
    std::string out;  // "": removed by elastic_info, does not call
    for (size_t i = 0; i < P->ranks.size(); ++i) {
      int tq;
      if (rank_of(*P, static_cast<int>(i), &tq) == r && tq == q) out = body(*P, static_cast<int>(i));
    }
    // The groups go before the process does (it ends with _exit): a transport that sends through a
    // library's queues (UCX) delivers what it still holds when its endpoint is destroyed.
    P.reset();
    unregister_group(prefix + "ep" + std::to_string(q));
    if (c.tp) unregister_group(prefix + "tp" + std::to_string(r));
    return out;
  }, 90 * kDeadlineScale);
  const auto left = shm_leftovers(job);
  if (result.empty() && !left.empty()) result = "segment left in /dev/shm: " + left[0];
  return result;
}

std::string run_body_shm(const Case& c, const RankBody& body) {
  return run_body_procs(c, [](int W, int r, const GroupOptions& opt, const std::string& job) {
    return make_shm_group("ep", W, r, opt, job);
  }, body);
}

std::string run_case_shm(const Case& c) {
  return run_case_procs(c, [](int W, int r, const GroupOptions& opt, const std::string& job) {
    return make_shm_group("ep", W, r, opt, job);
  });
}

std::string run_case_procs(const Case& c, const MakeEp& make_ep) {
  return run_body_procs(c, make_ep, [&](const Prepared& P, int i) -> std::string {
    const auto idx = static_cast<size_t>(i);
    std::string diff = check_dispatch(P, i, run_dispatch(c, P.dargs[idx]));
    if (!diff.empty()) return diff;
    if (c.add_rms_norm) return check_add_rms_norm(P, i, combine_add_rms_norm(P.nargs[idx]));
    return check_combine(P, i, run_combine(c, P.cargs[idx]));
  });
}

}  // namespace moedist::test
