// Validation and the resolved configuration of one dispatch_v2 / combine_v2 call: pure, no I/O.
// Everything here runs before any byte moves; every failure names op, rank, parameter, value and
// what was allowed.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moedist/error.h"
#include "moedist/ops.h"

namespace moedist::core {

struct CheckCtx {
  const char* op = "";
  int64_t rank = -1;
  int64_t world = 0;
  std::string prefix() const;
  [[noreturn]] void fail(const std::string& msg) const;         // InvalidArgument
  [[noreturn]] void unsupported(const std::string& msg) const;  // Unsupported
};

// One check per parameter; the message is only built on failure.
#define MOEDIST_CHECK(ctx, cond, ...) \
  do {                                \
    if (!(cond)) (ctx).fail(::moedist::detail::str_cat(__VA_ARGS__)); \
  } while (0)

// fullmesh_v1 / fullmesh_v2 are the A3 names of fullmesh: the same rows, the same results (only their
// product limits differ, checked under profile "a3").
enum class Alg { kFullmesh, kHierarchy };
enum class AlgName { kDefault, kFullmesh, kFullmeshV1, kFullmeshV2, kHierarchy };
enum class ExpertKind { kMoe, kZero, kCopy, kConst, kInvalid };

// Strided element access (views may be non-contiguous).
template <typename T>
inline T at1(const TensorView& v, int64_t i) {
  return *static_cast<const T*>(v.at({i}));
}
template <typename T>
inline T at2(const TensorView& v, int64_t i, int64_t j) {
  return *static_cast<const T*>(v.at({i, j}));
}
// Rows of a (n, H) half tensor copied to a contiguous buffer if the view is not row-contiguous.
// Returns a pointer to row-major contiguous data (either the view's own memory or `storage`).
const uint16_t* contiguous_rows(const TensorView& v, std::vector<uint16_t>& storage);

struct EpConfig {
  CheckCtx ctx;
  // As passed.
  int64_t W_orig = 0, rank_orig = 0, E_orig = 0, Sr_orig = 0;
  // Effective: elastic-local ids when elastic_info is active, else the same as passed.
  int64_t W = 0, Sr = 0, E = 0, rank = 0, L = 0, S = 0, R = 1;
  int64_t K = 0, BS = 0, H = 0, Z = 0, C = 0, Q = 0;
  int64_t tp = 1, tp_rank = 0, tp_world_size_arg = 0;
  int64_t global_bs = 0, max_bs = 0, A = 0;
  DType dtype = DType::kBFloat16;
  int mask_kind = 0;  // 0: none, 1: (BS,), 2: (BS, K)
  bool elastic = false;         // elastic_info is active (is_elastic != 0)
  bool elastic_shapes = false;  // elastic_info was passed: output shapes follow the elastic formulas
                                // (shapes never depend on tensor values, so graph tracing can infer them)
  std::vector<int> local_to_phys;  // effective rank -> physical EP rank
  Alg alg = Alg::kFullmesh;
  AlgName alg_name = AlgName::kDefault;  // as spelled by the caller
  // Row of the smooth scales for MoE expert g: scale_row_base + g (shared expert s: row s). The caller
  // passes (S + E, H) with S and E as created, also after a scale-down: base = S as created.
  int64_t scale_row_base = 0;
  std::vector<int32_t> ids;        // (BS, K) expert ids, row-major copy
  std::vector<uint8_t> entry_on;   // (BS, K): the mask allows entry (t, k) (before the id filter)
  std::vector<uint8_t> token_on;   // (BS,): token t is active (takes part at all)
  int64_t* waits_us = nullptr;     // performance_info's W_orig entries (by physical rank), or null

  int64_t slots() const { return K + S; }
  bool is_shared_rank() const { return rank < Sr; }
  int64_t local_experts() const { return is_shared_rank() ? 1 : L; }
  int64_t moe_rank_of(int64_t g) const { return Sr + g / L; }
  int64_t shared_dest(int64_t src, int64_t s) const { return s * R + src % R; }
  int phys(int64_t local) const { return elastic ? local_to_phys[static_cast<size_t>(local)] : static_cast<int>(local); }
  ExpertKind classify(int64_t id) const;
  // (t, k) is sent to a MoE expert.
  bool sel(int64_t t, int64_t k) const {
    return entry_on[static_cast<size_t>(t * K + k)] && classify(ids[static_cast<size_t>(t * K + k)]) == ExpertKind::kMoe;
  }
  int64_t ep_counts_len() const;    // length of ep_recv_counts
  int64_t expert_nums_len() const;  // length of expert_token_nums
  std::vector<int> members() const;  // physical EP ranks taking part, ascending
  // Values that must be equal on every rank of the EP group, with their parameter names.
  std::vector<std::pair<const char*, int64_t>> uniform_params() const;
};

// A value of uniform_params() as a message shows it: the dtype and comm_alg entries by name
// ("bfloat16", "hierarchy"), every other one as the number.
std::string uniform_value_str(const char* name, int64_t value);

EpConfig resolve_dispatch(const DispatchArgs& a);
EpConfig resolve_combine(const CombineArgs& a);

// The TP peer's rows and own rows as dispatch_v2 wrote them (tp_send_counts / ep_send_counts).
struct CombineCounts {
  int64_t own_rows = 0;
  int64_t peer_rows = 0;
};
CombineCounts combine_counts(const EpConfig& c, const CombineArgs& a);
// The add + RMSNorm arguments of combine_add_rms_norm, against the resolved combine (c).
void check_add_rms_norm(const EpConfig& c, const CombineAddRmsNormArgs& a);

}  // namespace moedist::core
