#include "core/config.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>

namespace moedist::core {

std::string CheckCtx::prefix() const { return detail::str_cat("[rank ", rank, "/", world, "] ", op, ": "); }
void CheckCtx::fail(const std::string& msg) const { throw InvalidArgument(prefix() + msg); }
void CheckCtx::unsupported(const std::string& msg) const { throw Unsupported(prefix() + msg); }

const uint16_t* contiguous_rows(const TensorView& v, std::vector<uint16_t>& storage) {
  const int64_t n = v.size(0), h = v.size(1);
  if (v.stride(1) == 1 && (n <= 1 || v.stride(0) == h)) return static_cast<const uint16_t*>(v.data);
  storage.resize(static_cast<size_t>(n * h));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < h; ++j) storage[static_cast<size_t>(i * h + j)] = at2<uint16_t>(v, i, j);
  return storage.data();
}

ExpertKind EpConfig::classify(int64_t id) const {
  if (id >= 0 && id < E) return ExpertKind::kMoe;
  if (id < E_orig) return ExpertKind::kInvalid;
  int64_t off = id - E_orig;
  if (off < Z) return ExpertKind::kZero;
  if (off < Z + C) return ExpertKind::kCopy;
  if (off < Z + C + Q) return ExpertKind::kConst;
  return ExpertKind::kInvalid;
}

int64_t EpConfig::ep_counts_len() const {
  if (elastic_shapes) return W_orig * tp * L;
  return W_orig * tp * local_experts();
}
int64_t EpConfig::expert_nums_len() const { return elastic_shapes ? L : local_experts(); }

std::vector<int> EpConfig::members() const {
  std::vector<int> m;
  for (int64_t l = 0; l < W; ++l) m.push_back(phys(l));
  std::sort(m.begin(), m.end());
  return m;
}

namespace {
constexpr const char* kDtypeParam = "dtype of the token data";
constexpr const char* kCommAlgParam = "comm_alg";
}  // namespace

std::string uniform_value_str(const char* name, int64_t value) {
  if (std::strcmp(name, kDtypeParam) == 0 && value >= 0 && value <= static_cast<int64_t>(DType::kBool))
    return dtype_name(static_cast<DType>(value));
  if (std::strcmp(name, kCommAlgParam) == 0 && (value == 0 || value == 1))
    return static_cast<Alg>(value) == Alg::kFullmesh ? "fullmesh" : "hierarchy";
  return std::to_string(value);
}

std::vector<std::pair<const char*, int64_t>> EpConfig::uniform_params() const {
  std::vector<std::pair<const char*, int64_t>> p = {
      {"ep_world_size", W_orig},     {"moe_expert_num", E_orig},    {"shared_expert_rank_num", Sr_orig},
      {"shared_expert_num", S},      {"tp_world_size", tp},         {"global_bs", global_bs},
      {"expert_ids.size(1) (K)", K}, {"hidden size H", H},          {kDtypeParam, static_cast<int64_t>(dtype)},
      {"zero_expert_num", Z},        {"copy_expert_num", C},        {"const_expert_num", Q},
      {kCommAlgParam, static_cast<int64_t>(alg)}, {"elastic_info[1] (active ranks)", elastic ? W : 0},
      {"elastic_info[3] (moe experts)", elastic ? E : 0}, {"elastic_info[2] (shared ranks)", elastic ? Sr : 0}};
  if (global_bs == 0) p.push_back({"BS (with global_bs=0 every rank has the same BS)", BS});
  return p;
}

namespace {

bool is_half(DType d) { return d == DType::kBFloat16 || d == DType::kFloat16; }

// Parameters both ops share.
struct Common {
  const char* op;
  const TensorView* expert_ids;
  const std::string* group_ep;
  int64_t W, rank, E;
  const TensorView* mask;
  const TensorView* elastic_info;
  const std::string* group_tp;
  int64_t tp, tp_rank, shard_type, shared_num, Sr, global_bs;
  const std::string* comm_alg;
  int64_t Z, C, Q;
  const std::string* profile;
  DType dtype;
  int64_t H;
};

// Every view: data behind a shape with elements (a null pointer is only "absent" with no shape or
// an empty one), and one stride per dimension, or none (contiguous).
void check_strides(const CheckCtx& ctx, const TensorView& v, const char* name) {
  if (!v.defined()) return;
  if (v.data == nullptr) {
    bool empty = false;
    for (int64_t s : v.shape) empty |= s == 0;
    MOEDIST_CHECK(ctx, empty, name, " has shape ", v.shape_str(), " but a null data pointer (a tensor with elements needs its data)");
  }
  if (v.strides.empty()) return;
  MOEDIST_CHECK(ctx, static_cast<int64_t>(v.strides.size()) == v.dim(), name, " has ", v.strides.size(), " strides for shape ",
                v.shape_str(), " (must be one per dimension)");
}

void check_tensor(const CheckCtx& ctx, const TensorView& v, const char* name, DType want, int64_t dims) {
  MOEDIST_CHECK(ctx, v.dtype == want, name, " has dtype ", dtype_name(v.dtype), " (must be ", dtype_name(want), ")");
  MOEDIST_CHECK(ctx, v.dim() == dims, name, " has shape ", v.shape_str(), " (must be ", dims, "-D)");
  for (int64_t d = 0; d < v.dim(); ++d) MOEDIST_CHECK(ctx, v.size(d) >= 0, name, " has shape ", v.shape_str());
  check_strides(ctx, v, name);
}

// performance_info: absent, or a contiguous (W,) int64 tensor the op adds its waits to.
void check_performance_info(EpConfig& c, const TensorView& v, const std::string& profile) {
  if (!v.defined()) return;
  const CheckCtx& ctx = c.ctx;
  MOEDIST_CHECK(ctx, !(profile == "a3" && c.alg == Alg::kHierarchy),
                "performance_info (profile a3 with comm_alg \"hierarchy\": not supported, must be absent)");
  MOEDIST_CHECK(ctx, v.dtype == DType::kInt64, "performance_info has dtype ", dtype_name(v.dtype), " (must be int64)");
  MOEDIST_CHECK(ctx, v.dim() == 1 && v.size(0) == c.W_orig, "performance_info has shape ", v.shape_str(), " (must be (ep_world_size,) = (",
                c.W_orig, ",))");
  check_strides(ctx, v, "performance_info");
  MOEDIST_CHECK(ctx, v.is_contiguous(), "performance_info has shape ", v.shape_str(), " and stride ", v.stride(0),
                " (must be contiguous: the op writes into it)");
  c.waits_us = static_cast<int64_t*>(const_cast<void*>(v.data));
}

AlgName parse_alg_name(const CheckCtx& ctx, const std::string& s) {
  if (s == "fullmesh") return AlgName::kFullmesh;
  if (s == "fullmesh_v1") return AlgName::kFullmeshV1;
  if (s == "fullmesh_v2") return AlgName::kFullmeshV2;
  if (s == "hierarchy") return AlgName::kHierarchy;
  MOEDIST_CHECK(ctx, s.empty(), "comm_alg=\"", s, "\" (must be \"\", \"fullmesh\", \"fullmesh_v1\", \"fullmesh_v2\" or \"hierarchy\")");
  return AlgName::kDefault;
}

Alg parse_alg(const CheckCtx& ctx, const std::string& s) {
  const AlgName n = parse_alg_name(ctx, s);
  if (n == AlgName::kHierarchy) return Alg::kHierarchy;
  if (n != AlgName::kDefault) return Alg::kFullmesh;
  // "" follows the Ascend rule: hierarchy when HCCL_INTRA_PCIE_ENABLE=1 and HCCL_INTRA_ROCE_ENABLE=0.
  const char* pcie = std::getenv("HCCL_INTRA_PCIE_ENABLE");
  const char* roce = std::getenv("HCCL_INTRA_ROCE_ENABLE");
  if (pcie && roce && std::strcmp(pcie, "1") == 0 && std::strcmp(roce, "0") == 0) return Alg::kHierarchy;
  return Alg::kFullmesh;
}

void check_group_name(const CheckCtx& ctx, const std::string& name, const char* param) {
  MOEDIST_CHECK(ctx, !name.empty() && name.size() < 128, param, "=\"", name, "\" has length ", name.size(),
                " (must be in [1, 128))");
}

EpConfig resolve_common(const Common& a) {
  EpConfig c;
  c.ctx = CheckCtx{a.op, a.rank, a.W};
  const CheckCtx& ctx = c.ctx;
  check_group_name(ctx, *a.group_ep, "group_ep");
  MOEDIST_CHECK(ctx, a.W >= 1, "ep_world_size=", a.W, " (must be >= 1)");
  MOEDIST_CHECK(ctx, a.rank >= 0 && a.rank < a.W, "ep_rank_id=", a.rank, " out of range (must be in [0, ep_world_size=", a.W, "))");
  MOEDIST_CHECK(ctx, a.E >= 1, "moe_expert_num=", a.E, " (must be >= 1)");
  MOEDIST_CHECK(ctx, a.shard_type == 0, "expert_shard_type=", a.shard_type, " (only 0 is supported: shared-expert ranks first)");
  MOEDIST_CHECK(ctx, a.Sr >= 0 && a.Sr < a.W, "shared_expert_rank_num=", a.Sr, " out of range (must be in [0, ep_world_size=", a.W, "))");
  MOEDIST_CHECK(ctx, a.shared_num >= 0 && a.shared_num <= 4, "shared_expert_num=", a.shared_num, " out of range (must be in [0, 4])");
  if (a.Sr == 0) {
    MOEDIST_CHECK(ctx, a.shared_num <= 1, "shared_expert_num=", a.shared_num,
                  " needs shared-expert ranks (shared_expert_rank_num=0; must be 0 or 1 without shared-expert ranks)");
  } else {
    MOEDIST_CHECK(ctx, a.shared_num >= 1, "shared_expert_num=0 with shared_expert_rank_num=", a.Sr,
                  " (must be >= 1 when there are shared-expert ranks)");
    MOEDIST_CHECK(ctx, a.Sr % a.shared_num == 0, "shared_expert_rank_num=", a.Sr, " is not a multiple of shared_expert_num=",
                  a.shared_num, " (each shared expert needs the same number of ranks)");
  }
  MOEDIST_CHECK(ctx, a.E % (a.W - a.Sr) == 0, "moe_expert_num=", a.E, " is not a multiple of ep_world_size - shared_expert_rank_num = ",
                a.W - a.Sr, " (each MoE rank holds the same number of experts)");
  MOEDIST_CHECK(ctx, a.Z >= 0, "zero_expert_num=", a.Z, " (must be >= 0)");
  MOEDIST_CHECK(ctx, a.C >= 0, "copy_expert_num=", a.C, " (must be >= 0)");
  MOEDIST_CHECK(ctx, a.Q >= 0, "const_expert_num=", a.Q, " (must be >= 0)");
  // Each below 2^31 first, so that their sum cannot overflow.
  MOEDIST_CHECK(ctx, a.E < INT32_MAX, "moe_expert_num=", a.E, " (must be < 2147483647)");
  MOEDIST_CHECK(ctx, a.Z < INT32_MAX, "zero_expert_num=", a.Z, " (must be < 2147483647)");
  MOEDIST_CHECK(ctx, a.C < INT32_MAX, "copy_expert_num=", a.C, " (must be < 2147483647)");
  MOEDIST_CHECK(ctx, a.Q < INT32_MAX, "const_expert_num=", a.Q, " (must be < 2147483647)");
  MOEDIST_CHECK(ctx, a.E + a.Z + a.C + a.Q < INT32_MAX, "moe_expert_num + zero_expert_num + copy_expert_num + const_expert_num = ",
                a.E + a.Z + a.C + a.Q, " (must be < 2147483647)");
  MOEDIST_CHECK(ctx, a.tp == 0 || a.tp == 1 || a.tp == 2, "tp_world_size=", a.tp, " (must be 0, 1 or 2)");
  c.tp_world_size_arg = a.tp;
  c.tp = a.tp == 2 ? 2 : 1;
  MOEDIST_CHECK(ctx, a.tp_rank >= 0 && a.tp_rank < c.tp, "tp_rank_id=", a.tp_rank, " out of range (must be in [0, ", c.tp, "))");
  c.tp_rank = a.tp_rank;
  c.alg = parse_alg(ctx, *a.comm_alg);
  c.alg_name = parse_alg_name(ctx, *a.comm_alg);
  const std::string& prof = *a.profile;
  MOEDIST_CHECK(ctx, prof.empty() || prof == "a2" || prof == "a3", "profile=\"", prof, "\" (must be \"\", \"a2\" or \"a3\")");
  if (prof == "a2")
    MOEDIST_CHECK(ctx, c.alg_name != AlgName::kFullmeshV1 && c.alg_name != AlgName::kFullmeshV2, "comm_alg=\"", *a.comm_alg,
                  "\" (profile a2: must be \"\", \"fullmesh\" or \"hierarchy\")");
  if (prof == "a3")
    MOEDIST_CHECK(ctx, c.alg_name != AlgName::kFullmesh, "comm_alg=\"fullmesh\" (profile a3: must be \"\", \"fullmesh_v1\", \"fullmesh_v2\" or \"hierarchy\")");

  c.W_orig = c.W = a.W;
  c.rank_orig = c.rank = a.rank;
  c.E_orig = c.E = a.E;
  c.Sr_orig = c.Sr = a.Sr;
  c.S = a.Sr == 0 ? 0 : a.shared_num;
  c.L = a.E / (a.W - a.Sr);
  c.R = c.S > 0 ? a.Sr / c.S : 1;
  c.Z = a.Z;
  c.C = a.C;
  c.Q = a.Q;
  c.dtype = a.dtype;
  c.H = a.H;
  MOEDIST_CHECK(ctx, a.H >= 1, "hidden size H=", a.H, " (must be >= 1)");
  if (c.tp == 2) {
    MOEDIST_CHECK(ctx, c.L == 1, "tp_world_size=2 with ", c.L, " local experts per rank (moe_expert_num / (ep_world_size - shared_expert_rank_num) must be 1 with TP)");
    check_group_name(ctx, *a.group_tp, "group_tp");
    MOEDIST_CHECK(ctx, *a.group_tp != *a.group_ep, "group_tp=\"", *a.group_tp, "\" equals group_ep (must be a different group)");
  }

  // expert_ids
  const TensorView& ids = *a.expert_ids;
  MOEDIST_CHECK(ctx, ids.defined(), "expert_ids is missing (must be a (BS, K) int32 tensor)");
  check_tensor(ctx, ids, "expert_ids", DType::kInt32, 2);
  c.BS = ids.size(0);
  c.K = ids.size(1);
  const int64_t total_ids = a.E + a.Z + a.C + a.Q;
  MOEDIST_CHECK(ctx, c.K >= 1 && c.K <= total_ids, "expert_ids has K=", c.K, " columns (must be in [1, moe_expert_num + zero + copy + const experts = ", total_ids, "])");

  // global_bs
  MOEDIST_CHECK(ctx, a.global_bs >= 0, "global_bs=", a.global_bs, " (must be 0 or max_bs * ep_world_size)");
  MOEDIST_CHECK(ctx, a.global_bs <= INT32_MAX, "global_bs=", a.global_bs, " (must be at most 2147483647: counts and token indices are int32)");
  if (a.global_bs != 0) {
    MOEDIST_CHECK(ctx, a.global_bs % a.W == 0, "global_bs=", a.global_bs, " is not a multiple of ep_world_size=", a.W, " (must be 0 or max_bs * ep_world_size)");
    MOEDIST_CHECK(ctx, a.global_bs >= c.BS * a.W, "global_bs=", a.global_bs, " < BS * ep_world_size = ", c.BS * a.W, " (BS=", c.BS, " is larger than global_bs / ep_world_size)");
  }
  c.global_bs = a.global_bs;
  const int64_t global_bs_real = a.global_bs ? a.global_bs : c.BS * a.W;
  c.max_bs = global_bs_real / a.W;

  // x_active_mask
  const TensorView& m = *a.mask;
  c.entry_on.assign(static_cast<size_t>(c.BS * c.K), 1);
  c.token_on.assign(static_cast<size_t>(c.BS), 1);
  if (m.defined()) {
    check_strides(ctx, m, "x_active_mask");
    MOEDIST_CHECK(ctx, m.dtype == DType::kBool, "x_active_mask has dtype ", dtype_name(m.dtype), " (must be bool)");
    MOEDIST_CHECK(ctx, (m.dim() == 1 && m.size(0) == c.BS) || (m.dim() == 2 && m.size(0) == c.BS && m.size(1) == c.K),
                  "x_active_mask has shape ", m.shape_str(), " (must be (BS,) = (", c.BS, ",) or (BS, K) = (", c.BS, ", ", c.K, "))");
    MOEDIST_CHECK(ctx, a.global_bs == 0 || a.global_bs == c.BS * a.W, "x_active_mask given with a different BS per rank (global_bs=", a.global_bs,
                  " > BS * ep_world_size = ", c.BS * a.W, "; all tokens must be valid then)");
    if (m.dim() == 1) {
      c.mask_kind = 1;
      bool seen_false = false;
      for (int64_t t = 0; t < c.BS; ++t) {
        bool on = at1<uint8_t>(m, t) != 0;
        MOEDIST_CHECK(ctx, !(on && seen_false), "x_active_mask[", t, "]=true after a false entry (the trues must come first)");
        seen_false |= !on;
        c.token_on[static_cast<size_t>(t)] = on;
        for (int64_t k = 0; k < c.K; ++k) c.entry_on[static_cast<size_t>(t * c.K + k)] = on;
      }
    } else {
      c.mask_kind = 2;
      for (int64_t t = 0; t < c.BS; ++t) {
        bool any = false;
        for (int64_t k = 0; k < c.K; ++k) {
          bool on = at2<uint8_t>(m, t, k) != 0;
          c.entry_on[static_cast<size_t>(t * c.K + k)] = on;
          any |= on;
        }
        c.token_on[static_cast<size_t>(t)] = any;
      }
    }
  }

  // elastic_info
  const TensorView& el = *a.elastic_info;
  if (el.defined()) {
    c.elastic_shapes = true;
    check_tensor(ctx, el, "elastic_info", DType::kInt32, 1);
    MOEDIST_CHECK(ctx, el.size(0) == 4 + 2 * a.W, "elastic_info has shape ", el.shape_str(), " (must be (4 + 2 * ep_world_size,) = (", 4 + 2 * a.W, ",))");
    if (at1<int32_t>(el, 0) != 0) {
      MOEDIST_CHECK(ctx, c.tp == 1, "elastic_info with tp_world_size=2 (scale-down works only without TP)");
      if (c.alg == Alg::kHierarchy) ctx.unsupported("elastic_info with comm_alg \"hierarchy\" is not supported (use \"fullmesh\")");
      const int64_t Wl = at1<int32_t>(el, 1), Srl = at1<int32_t>(el, 2), El = at1<int32_t>(el, 3);
      MOEDIST_CHECK(ctx, Wl >= 1 && Wl <= a.W, "elastic_info[1]=", Wl, " active ranks (must be in [1, ep_world_size=", a.W, "])");
      MOEDIST_CHECK(ctx, Srl >= 0 && Srl < Wl, "elastic_info[2]=", Srl, " shared-expert ranks (must be in [0, elastic_info[1]=", Wl, "))");
      MOEDIST_CHECK(ctx, El >= 1 && El <= a.E, "elastic_info[3]=", El, " MoE experts (must be in [1, moe_expert_num=", a.E, "])");
      MOEDIST_CHECK(ctx, El % (Wl - Srl) == 0 && El / (Wl - Srl) == c.L, "elastic_info gives ", El, " experts on ", Wl - Srl,
                    " MoE ranks (experts per MoE rank must stay ", c.L, " = moe_expert_num / (ep_world_size - shared_expert_rank_num))");
      MOEDIST_CHECK(ctx, Srl == 0 || c.S > 0, "elastic_info[2]=", Srl, " shared-expert ranks but there are no shared experts (shared_expert_rank_num=",
                    a.Sr, "; must be 0)");
      if (c.S > 0 && Srl > 0)
        MOEDIST_CHECK(ctx, Srl % c.S == 0, "elastic_info[2]=", Srl, " shared-expert ranks is not a multiple of shared_expert_num=", c.S);
      std::vector<int> t1(static_cast<size_t>(a.W)), t2(static_cast<size_t>(a.W));
      for (int64_t i = 0; i < a.W; ++i) {
        t1[static_cast<size_t>(i)] = at1<int32_t>(el, 4 + i);
        t2[static_cast<size_t>(i)] = at1<int32_t>(el, 4 + a.W + i);
      }
      for (int64_t l = 0; l < a.W; ++l) {
        int v = t2[static_cast<size_t>(l)];
        if (l < Wl) {
          MOEDIST_CHECK(ctx, v >= 0 && v < a.W, "elastic_info table 2 [", l, "]=", v, " (must be a rank in [0, ", a.W, "))");
          MOEDIST_CHECK(ctx, t1[static_cast<size_t>(v)] == l, "elastic_info tables disagree: table 2 [", l, "]=", v,
                        " but table 1 [", v, "]=", t1[static_cast<size_t>(v)], " (must be ", l, ")");
        } else {
          MOEDIST_CHECK(ctx, v == -1, "elastic_info table 2 [", l, "]=", v, " (must be -1 beyond the ", Wl, " active ranks)");
        }
      }
      for (int64_t p = 0; p < a.W; ++p) {
        int v = t1[static_cast<size_t>(p)];
        MOEDIST_CHECK(ctx, v >= -1 && v < Wl, "elastic_info table 1 [", p, "]=", v, " (must be -1 or in [0, ", Wl, "))");
        if (v >= 0)
          MOEDIST_CHECK(ctx, t2[static_cast<size_t>(v)] == p, "elastic_info tables disagree: table 1 [", p, "]=", v,
                        " but table 2 [", v, "]=", t2[static_cast<size_t>(v)]);
      }
      const int mine = t1[static_cast<size_t>(a.rank)];
      MOEDIST_CHECK(ctx, mine >= 0, "ep_rank_id=", a.rank, " was removed by elastic_info (table 1 [", a.rank,
                    "]=-1; removed ranks must not call the op)");
      c.elastic = true;
      c.W = Wl;
      c.Sr = Srl;
      c.E = El;
      c.rank = mine;
      if (Srl == 0) c.S = 0;
      c.R = c.S > 0 ? Srl / c.S : 1;
      c.local_to_phys.assign(t2.begin(), t2.begin() + Wl);
    }
  }

  // expert id values: in range and distinct among the entries that take part
  for (int64_t t = 0; t < c.BS; ++t) {
    for (int64_t k = 0; k < c.K; ++k) {
      const size_t i = static_cast<size_t>(t * c.K + k);
      const int32_t id = at2<int32_t>(ids, t, k);
      c.ids.push_back(id);
      if (!c.entry_on[i]) continue;
      if (c.classify(id) == ExpertKind::kInvalid) {
        if (c.elastic)
          ctx.fail(detail::str_cat("expert_ids[", t, "][", k, "]=", id, " out of range (must be in [0, ", c.E, ") for MoE experts after scale-down",
                                   total_ids > a.E ? detail::str_cat(" or [", a.E, ", ", total_ids, ") for zero/copy/const experts") : std::string(), ")"));
        ctx.fail(detail::str_cat("expert_ids[", t, "][", k, "]=", id, " out of range (must be in [0, moe_expert_num + zero + copy + const experts = ", total_ids, "))"));
      }
      for (int64_t j = 0; j < k; ++j)
        MOEDIST_CHECK(ctx, !c.entry_on[static_cast<size_t>(t * c.K + j)] || c.ids[static_cast<size_t>(t * c.K + j)] != id,
                      "expert_ids[", t, "][", k, "]=", id, " repeats expert_ids[", t, "][", j, "] (the K ids of a token must be distinct)");
    }
  }

  // output rows A (docs/semantics.md §2)
  const int64_t a_moe = global_bs_real * std::min(c.L, c.K);
  const int64_t r_orig = a.Sr > 0 ? a.Sr / a.shared_num : 1;  // ranks per shared expert, as created
  const int64_t a_shared = a.Sr > 0 ? c.max_bs * ((a.W + r_orig - 1) / r_orig) : 0;
  if (c.elastic_shapes)
    c.A = std::max(a_shared, a_moe);
  else
    c.A = c.is_shared_rank() ? a_shared : a_moe;
  // ep_recv_counts and assist_info_for_combine count rows in int32.
  MOEDIST_CHECK(ctx, c.tp * c.A <= INT32_MAX, "global_bs=", a.global_bs, " with BS=", c.BS, " gives A=", c.A,
                " rows per rank (max(tp_world_size, 1) * A must be at most 2147483647: rows are counted in int32)");

  // hierarchy limits
  if (c.alg == Alg::kHierarchy) {
    if (c.tp == 2) ctx.unsupported("comm_alg \"hierarchy\" with tp_world_size=2 is not supported (use \"fullmesh\")");
  }

  // product limits, only when asked for
  if (prof == "a3") {
    MOEDIST_CHECK(ctx, a.W >= 2 && a.W <= 768, "ep_world_size=", a.W, " (profile a3: must be in [2, 768])");
    MOEDIST_CHECK(ctx, a.E <= 1024, "moe_expert_num=", a.E, " (profile a3: must be <= 1024)");
    MOEDIST_CHECK(ctx, c.BS >= 1 && c.BS <= 512, "BS=", c.BS, " (profile a3: must be in [1, 512])");
    MOEDIST_CHECK(ctx, a.H >= 1024 && a.H <= 8192, "hidden size H=", a.H, " (profile a3: must be in [1024, 8192])");
    MOEDIST_CHECK(ctx, c.K <= 16, "K=", c.K, " (profile a3: must be <= 16)");
    if (c.alg_name == AlgName::kFullmeshV2) {
      MOEDIST_CHECK(ctx, c.BS <= 256, "BS=", c.BS, " (profile a3 with comm_alg \"fullmesh_v2\": must be in [1, 256])");
      MOEDIST_CHECK(ctx, c.K <= 12, "K=", c.K, " (profile a3 with comm_alg \"fullmesh_v2\": must be <= 12)");
      MOEDIST_CHECK(ctx, c.tp == 1, "tp_world_size=", a.tp, " (profile a3 with comm_alg \"fullmesh_v2\": no TP domain, must be 0 or 1)");
    }
    if (c.alg == Alg::kHierarchy) {  // the A3 hierarchy: inside the server first, then across servers
      MOEDIST_CHECK(ctx, a.W >= 16 && a.W <= 256 && a.W % 16 == 0, "ep_world_size=", a.W,
                    " (profile a3 with comm_alg \"hierarchy\": must be in [16, 256] and a multiple of 16)");
      // TP with hierarchy is refused above for every profile.
      MOEDIST_CHECK(ctx, a.Sr == 0, "shared_expert_rank_num=", a.Sr, " (profile a3 with comm_alg \"hierarchy\": no shared-expert ranks, must be 0)");
      MOEDIST_CHECK(ctx, c.mask_kind != 2, "x_active_mask has shape ", m.shape_str(), " (profile a3 with comm_alg \"hierarchy\": a 2-D mask is not supported, pass (BS,) or none)");
      MOEDIST_CHECK(ctx, a.Z + a.C + a.Q == 0, "zero_expert_num + copy_expert_num + const_expert_num = ", a.Z + a.C + a.Q,
                    " (profile a3 with comm_alg \"hierarchy\": no special experts, must be 0)");
      MOEDIST_CHECK(ctx, !el.defined(), "elastic_info (profile a3 with comm_alg \"hierarchy\": not supported, must be absent)");
    }
  } else if (prof == "a2") {
    MOEDIST_CHECK(ctx, a.W == 16 || a.W == 32 || a.W == 64, "ep_world_size=", a.W, " (profile a2: must be 16, 32 or 64)");
    MOEDIST_CHECK(ctx, a.E <= 1024, "moe_expert_num=", a.E, " (profile a2: must be <= 1024)");
    MOEDIST_CHECK(ctx, c.BS >= 1 && c.BS <= 256, "BS=", c.BS, " (profile a2: must be in [1, 256])");
    MOEDIST_CHECK(ctx, a.H >= 1 && a.H <= 7168 && a.H % 32 == 0, "hidden size H=", a.H, " (profile a2: must be in (0, 7168] and a multiple of 32)");
    MOEDIST_CHECK(ctx, c.K <= 16, "K=", c.K, " (profile a2: must be <= 16)");
    if (c.alg != Alg::kHierarchy) MOEDIST_CHECK(ctx, c.L <= 24, "local experts per rank = ", c.L, " (profile a2 with fullmesh: must be <= 24)");
    MOEDIST_CHECK(ctx, c.tp == 1, "tp_world_size=", a.tp, " (profile a2: no TP domain)");
    MOEDIST_CHECK(ctx, a.Sr == 0, "shared_expert_rank_num=", a.Sr, " (profile a2: no shared-expert ranks)");
    MOEDIST_CHECK(ctx, !c.elastic, "elastic_info (profile a2: no scale-down)");
    MOEDIST_CHECK(ctx, a.Z + a.C + a.Q == 0, "zero/copy/const experts (profile a2: not supported)");
    MOEDIST_CHECK(ctx, !m.defined(), "x_active_mask (profile a2: reserved, must be absent)");
  }
  return c;
}

}  // namespace

EpConfig resolve_dispatch(const DispatchArgs& a) {
  CheckCtx ctx{"dispatch_v2", a.ep_rank_id, a.ep_world_size};
  MOEDIST_CHECK(ctx, a.x.defined(), "x is missing (must be a (BS, H) bfloat16 or float16 tensor)");
  MOEDIST_CHECK(ctx, is_half(a.x.dtype), "x has dtype ", dtype_name(a.x.dtype), " (must be bfloat16 or float16)");
  MOEDIST_CHECK(ctx, a.x.dim() == 2, "x has shape ", a.x.shape_str(), " (must be 2-D (BS, H))");
  check_strides(ctx, a.x, "x");
  Common cm{"dispatch_v2", &a.expert_ids, &a.group_ep, a.ep_world_size, a.ep_rank_id, a.moe_expert_num, &a.x_active_mask,
            &a.elastic_info, &a.group_tp, a.tp_world_size, a.tp_rank_id, a.expert_shard_type, a.shared_expert_num,
            a.shared_expert_rank_num, a.global_bs, &a.comm_alg, a.zero_expert_num, a.copy_expert_num, a.const_expert_num,
            &a.profile, a.x.dtype, a.x.size(1)};
  EpConfig c = resolve_common(cm);
  MOEDIST_CHECK(c.ctx, a.x.size(0) == c.BS, "x has shape ", a.x.shape_str(), " but expert_ids has ", c.BS, " rows (BS must agree)");
  MOEDIST_CHECK(c.ctx, a.quant_mode == 0 || a.quant_mode == 2,
                "quant_mode=", a.quant_mode, a.quant_mode == 1 ? " (static quantization is not supported; " : " (", "must be 0 or 2)");
  MOEDIST_CHECK(c.ctx, a.expert_token_nums_type == 0 || a.expert_token_nums_type == 1, "expert_token_nums_type=", a.expert_token_nums_type, " (must be 0 or 1)");
  if (a.scales.defined()) {
    MOEDIST_CHECK(c.ctx, a.quant_mode == 2, "scales given with quant_mode=", a.quant_mode, " (smooth scales need quant_mode=2)");
    check_tensor(c.ctx, a.scales, "scales", DType::kFloat32, 2);
    // The shape is (S + E, H) with S and E as created, also after a scale-down (elastic_info carries the new
    // layout, no other argument changes). When a scale-down removed every shared-expert rank, the (E, H)
    // shape that earlier versions demanded is still accepted: then expert g uses row g.
    const int64_t s_orig = c.Sr_orig == 0 ? 0 : a.shared_expert_num;
    const bool created = a.scales.size(0) == s_orig + c.E_orig;
    const bool no_shared_left = c.S == 0 && s_orig > 0 && a.scales.size(0) == c.E_orig;
    MOEDIST_CHECK(c.ctx, (created || no_shared_left) && a.scales.size(1) == c.H, "scales has shape ", a.scales.shape_str(),
                  " (must be (shared_expert_num + moe_expert_num, H) = (", s_orig + c.E_orig, ", ", c.H, "))");
    c.scale_row_base = created ? s_orig : 0;
    if (c.alg == Alg::kHierarchy) c.ctx.unsupported("smooth scales with comm_alg \"hierarchy\" are not supported (as on Ascend A2)");
  }
  if (a.expert_scales.defined()) {
    check_tensor(c.ctx, a.expert_scales, "expert_scales", DType::kFloat32, 2);
    MOEDIST_CHECK(c.ctx, a.expert_scales.size(0) == c.BS && a.expert_scales.size(1) == c.K, "expert_scales has shape ",
                  a.expert_scales.shape_str(), " (must be (BS, K) = (", c.BS, ", ", c.K, "))");
  } else if (c.alg == Alg::kHierarchy) {
    c.ctx.fail("expert_scales is missing (comm_alg \"hierarchy\" needs the weights in dispatch: they travel with the token)");
  }
  check_performance_info(c, a.performance_info, a.profile);
  return c;
}

EpConfig resolve_combine(const CombineArgs& a) {
  CheckCtx ctx{"combine_v2", a.ep_rank_id, a.ep_world_size};
  MOEDIST_CHECK(ctx, a.expand_x.defined(), "expand_x is missing (must be a (rows, H) bfloat16 or float16 tensor)");
  MOEDIST_CHECK(ctx, is_half(a.expand_x.dtype), "expand_x has dtype ", dtype_name(a.expand_x.dtype), " (must be bfloat16 or float16; int8 expert outputs are not accepted)");
  MOEDIST_CHECK(ctx, a.expand_x.dim() == 2, "expand_x has shape ", a.expand_x.shape_str(), " (must be 2-D)");
  check_strides(ctx, a.expand_x, "expand_x");
  Common cm{"combine_v2", &a.expert_ids, &a.group_ep, a.ep_world_size, a.ep_rank_id, a.moe_expert_num, &a.x_active_mask,
            &a.elastic_info, &a.group_tp, a.tp_world_size, a.tp_rank_id, a.expert_shard_type, a.shared_expert_num,
            a.shared_expert_rank_num, a.global_bs, &a.comm_alg, a.zero_expert_num, a.copy_expert_num, a.const_expert_num,
            &a.profile, a.expand_x.dtype, a.expand_x.size(1)};
  EpConfig c = resolve_common(cm);
  const CheckCtx& cx = c.ctx;
  const char* dt = dtype_name(c.dtype);
  MOEDIST_CHECK(cx, a.comm_quant_mode == 0 || a.comm_quant_mode == 2, "comm_quant_mode=", a.comm_quant_mode, " (must be 0 or 2)");
  MOEDIST_CHECK(cx, !(a.comm_quant_mode == 2 && c.tp == 2), "comm_quant_mode=2 with tp_world_size=2 (int8 communication only without TP)");
  MOEDIST_CHECK(cx, a.expert_scales.defined(), "expert_scales is missing (must be a (BS, K) float32 tensor)");
  check_tensor(cx, a.expert_scales, "expert_scales", DType::kFloat32, 2);
  MOEDIST_CHECK(cx, a.expert_scales.size(0) == c.BS && a.expert_scales.size(1) == c.K, "expert_scales has shape ",
                a.expert_scales.shape_str(), " (must be (BS, K) = (", c.BS, ", ", c.K, "))");
  MOEDIST_CHECK(cx, a.assist_info_for_combine.defined(), "assist_info_for_combine is missing (pass dispatch_v2's output)");
  check_tensor(cx, a.assist_info_for_combine, "assist_info_for_combine", DType::kInt32, 1);
  MOEDIST_CHECK(cx, a.ep_send_counts.defined(), "ep_send_counts is missing (pass dispatch_v2's ep_recv_counts)");
  check_tensor(cx, a.ep_send_counts, "ep_send_counts", DType::kInt32, 1);
  if (c.tp == 2) {
    MOEDIST_CHECK(cx, a.tp_send_counts.defined(), "tp_send_counts is missing (required with tp_world_size=2: pass dispatch_v2's tp_recv_counts)");
    check_tensor(cx, a.tp_send_counts, "tp_send_counts", DType::kInt32, 1);
    MOEDIST_CHECK(cx, a.tp_send_counts.size(0) == 2, "tp_send_counts has shape ", a.tp_send_counts.shape_str(), " (must be (tp_world_size,) = (2,))");
  }
  if (a.shared_expert_x.defined()) {
    MOEDIST_CHECK(cx, c.Sr_orig == 0, "shared_expert_x given with shared_expert_rank_num=", c.Sr_orig, " (only allowed without shared-expert ranks)");
    const TensorView& s = a.shared_expert_x;
    check_strides(cx, s, "shared_expert_x");
    MOEDIST_CHECK(cx, s.dtype == c.dtype, "shared_expert_x has dtype ", dtype_name(s.dtype), " (must match expand_x: ", dt, ")");
    const bool ok2 = s.dim() == 2 && s.size(0) == c.BS && s.size(1) == c.H;
    const bool ok3 = s.dim() == 3 && s.size(0) * s.size(1) == c.BS && s.size(2) == c.H;
    MOEDIST_CHECK(cx, ok2 || ok3, "shared_expert_x has shape ", s.shape_str(), " (must be (BS, H) = (", c.BS, ", ", c.H, ") or (a, b, H) with a*b = BS)");
  }
  if (c.C > 0 || c.Q > 0 || a.ori_x.defined()) {
    MOEDIST_CHECK(cx, a.ori_x.defined(), "ori_x is missing (required with copy_expert_num=", c.C, " or const_expert_num=", c.Q, ")");
    check_strides(cx, a.ori_x, "ori_x");
    MOEDIST_CHECK(cx, a.ori_x.dtype == c.dtype, "ori_x has dtype ", dtype_name(a.ori_x.dtype), " (must match expand_x: ", dt, ")");
    MOEDIST_CHECK(cx, a.ori_x.dim() == 2 && a.ori_x.size(0) == c.BS && a.ori_x.size(1) == c.H, "ori_x has shape ", a.ori_x.shape_str(),
                  " (must be (BS, H) = (", c.BS, ", ", c.H, "))");
  }
  const std::pair<const TensorView*, const char*> consts[] = {{&a.const_expert_alpha_1, "const_expert_alpha_1"},
                                                              {&a.const_expert_alpha_2, "const_expert_alpha_2"},
                                                              {&a.const_expert_v, "const_expert_v"}};
  for (const auto& [v, name] : consts) {
    if (c.Q == 0 && !v->defined()) continue;
    MOEDIST_CHECK(cx, v->defined(), name, " is missing (required with const_expert_num=", c.Q, ")");
    check_strides(cx, *v, name);
    MOEDIST_CHECK(cx, v->dtype == c.dtype, name, " has dtype ", dtype_name(v->dtype), " (must match expand_x: ", dt, ")");
    const bool is_v = v == &a.const_expert_v;
    const bool ok = is_v ? (v->dim() == 2 && v->size(0) == c.Q && v->size(1) == c.H) : (v->dim() == 1 && v->size(0) == c.Q);
    MOEDIST_CHECK(cx, ok, name, " has shape ", v->shape_str(), is_v ? detail::str_cat(" (must be (const_expert_num, H) = (", c.Q, ", ", c.H, "))")
                                                                     : detail::str_cat(" (must be (const_expert_num,) = (", c.Q, ",))"));
  }
  if (c.alg == Alg::kHierarchy) {
    MOEDIST_CHECK(cx, a.expand_scales.defined(), "expand_scales is missing (comm_alg \"hierarchy\" pre-reduces with the weights that dispatch_v2 returned in expand_scales)");
    if (a.comm_quant_mode == 2) cx.unsupported("comm_quant_mode=2 with comm_alg \"hierarchy\" is not supported (use \"fullmesh\")");
  }
  if (a.expand_scales.defined()) check_tensor(cx, a.expand_scales, "expand_scales", DType::kFloat32, 1);
  check_performance_info(c, a.performance_info, a.profile);
  return c;
}

CombineCounts combine_counts(const EpConfig& c, const CombineArgs& a) {
  const CheckCtx& cx = c.ctx;
  const TensorView& cnt = a.ep_send_counts;
  const int64_t need = c.W * c.local_experts();
  MOEDIST_CHECK(cx, cnt.size(0) >= need, "ep_send_counts has shape ", cnt.shape_str(), " (must hold at least ", need,
                " entries: ep_world_size * local experts)");
  int64_t prev = 0;
  for (int64_t i = 0; i < need; ++i) {
    const int64_t v = at1<int32_t>(cnt, i);
    if (i == 0)
      MOEDIST_CHECK(cx, v >= 0, "ep_send_counts[0]=", v, " (must be >= 0: the prefix counts dispatch_v2 returned)");
    else
      MOEDIST_CHECK(cx, v >= prev, "ep_send_counts[", i, "]=", v, " is smaller than ep_send_counts[", i - 1, "]=", prev,
                    " (must be the non-decreasing prefix counts dispatch_v2 returned)");
    prev = v;
  }
  CombineCounts r;
  r.own_rows = prev;
  if (c.tp == 2) {
    const int64_t own_tp = at1<int32_t>(a.tp_send_counts, c.tp_rank);
    r.peer_rows = at1<int32_t>(a.tp_send_counts, 1 - c.tp_rank);
    MOEDIST_CHECK(cx, own_tp == r.own_rows, "tp_send_counts[", c.tp_rank, "]=", own_tp, " disagrees with ep_send_counts[", need - 1, "]=",
                  r.own_rows, " (both count this rank's rows)");
    MOEDIST_CHECK(cx, r.peer_rows >= 0, "tp_send_counts[", 1 - c.tp_rank, "]=", r.peer_rows, " (must be >= 0)");
  }
  MOEDIST_CHECK(cx, r.own_rows <= c.A, "ep_send_counts[", need - 1, "]=", r.own_rows, " rows exceed A=", c.A, " (the most a rank can receive)");
  MOEDIST_CHECK(cx, r.own_rows + r.peer_rows <= a.expand_x.size(0), "expand_x has ", a.expand_x.size(0), " rows but the counts need ",
                r.own_rows + r.peer_rows);
  MOEDIST_CHECK(cx, a.assist_info_for_combine.size(0) >= 3 * r.own_rows, "assist_info_for_combine has shape ", a.assist_info_for_combine.shape_str(),
                " (must hold 3 * ", r.own_rows, " entries)");
  if (c.alg == Alg::kHierarchy)
    MOEDIST_CHECK(cx, a.expand_scales.size(0) >= r.own_rows, "expand_scales has shape ", a.expand_scales.shape_str(), " (must hold ", r.own_rows, " entries)");
  // Each triple must name a token slot that exists on its source rank.
  for (int64_t i = 0; i < r.own_rows; ++i) {
    const int64_t src = at1<int32_t>(a.assist_info_for_combine, 3 * i);
    const int64_t tok = at1<int32_t>(a.assist_info_for_combine, 3 * i + 1);
    const int64_t kk = at1<int32_t>(a.assist_info_for_combine, 3 * i + 2);
    MOEDIST_CHECK(cx, src >= 0 && src < c.W && tok >= 0 && tok < c.max_bs && kk >= 0 && kk < c.slots(), "assist_info_for_combine[", 3 * i,
                  "..", 3 * i + 2, "]=(", src, ", ", tok, ", ", kk, ") is not a row dispatch_v2 produced (rank < ", c.W, ", token < ",
                  c.max_bs, ", k < ", c.slots(), ")");
  }
  return r;
}

void check_add_rms_norm(const EpConfig& c, const CombineAddRmsNormArgs& a) {
  CheckCtx cx = c.ctx;
  cx.op = "combine_add_rms_norm";
  const char* dt = dtype_name(c.dtype);
  const TensorView& r = a.residual_x;
  MOEDIST_CHECK(cx, r.defined(), "residual_x is missing (must be a (BS, 1, H) tensor of expand_x's dtype)");
  check_strides(cx, r, "residual_x");
  MOEDIST_CHECK(cx, r.dtype == c.dtype, "residual_x has dtype ", dtype_name(r.dtype), " (must match expand_x: ", dt, ")");
  const bool ok3 = r.dim() == 3 && r.size(0) == c.BS && r.size(1) == 1 && r.size(2) == c.H;
  const bool ok2 = r.dim() == 2 && r.size(0) == c.BS && r.size(1) == c.H;
  MOEDIST_CHECK(cx, ok3 || ok2, "residual_x has shape ", r.shape_str(), " (must be (BS, 1, H) = (", c.BS, ", 1, ", c.H, ") or (BS, H))");
  const TensorView& g = a.gamma;
  MOEDIST_CHECK(cx, g.defined(), "gamma is missing (must be an (H,) tensor of expand_x's dtype)");
  check_strides(cx, g, "gamma");
  MOEDIST_CHECK(cx, g.dtype == c.dtype, "gamma has dtype ", dtype_name(g.dtype), " (must match expand_x: ", dt, ")");
  MOEDIST_CHECK(cx, g.dim() == 1 && g.size(0) == c.H, "gamma has shape ", g.shape_str(), " (must be (H,) = (", c.H, ",))");
  MOEDIST_CHECK(cx, a.norm_eps >= 0 && a.norm_eps <= 3.4e38, "norm_eps=", a.norm_eps, " (must be finite and >= 0)");
}

}  // namespace moedist::core
