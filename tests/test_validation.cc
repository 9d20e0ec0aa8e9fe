// Validation: one negative test for every rule of src/core/config.cc (resolve_common, resolve_dispatch,
// resolve_combine, combine_counts) and of the group registry, each checking the exception type, the
// "[rank r/W] op: " prefix, the parameter name and the offending value. Then end-to-end failure tests
// on thread ranks (a rank that rejects its call, a rank that never calls, ranks that disagree on a
// uniform parameter) and a two-rank dispatch/combine whose every output number is written out by hand.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <typeinfo>
#include <vector>

#include "core/config.h"
#include "core/half.h"
#include "ops/collective.h"
#include "harness.h"
#include "moedist/moedist.h"

namespace moedist::test {
namespace {

using Clock = std::chrono::steady_clock;

// comm_alg "" picks "hierarchy" when these are set (the Ascend rule); the tests want "" = fullmesh.
const bool kEnvCleared = [] {
  unsetenv("HCCL_INTRA_PCIE_ENABLE");
  unsetenv("HCCL_INTRA_ROCE_ENABLE");
  return true;
}();

// Owns the memory behind the views a test builds.
class Store {
 public:
  template <typename T>
  TensorView view(DType dt, std::vector<T> v, std::vector<int64_t> shape, std::vector<int64_t> strides = {}) {
    auto p = std::make_shared<std::vector<T>>(std::move(v));
    if (p->empty()) p->resize(1);  // an empty tensor still has a (non-null) data pointer
    keep_.push_back(p);
    return TensorView(p->data(), dt, std::move(shape), std::move(strides));
  }
  TensorView i32(std::vector<int32_t> v, std::vector<int64_t> shape, std::vector<int64_t> strides = {}) {
    return view(DType::kInt32, std::move(v), std::move(shape), std::move(strides));
  }
  TensorView f32(std::vector<float> v, std::vector<int64_t> shape) { return view(DType::kFloat32, std::move(v), std::move(shape)); }
  TensorView mask(std::vector<uint8_t> v, std::vector<int64_t> shape, std::vector<int64_t> strides = {}) {
    return view(DType::kBool, std::move(v), std::move(shape), std::move(strides));
  }
  // (rows, cols) of dt with small exact values; any shape when `shape` is given.
  TensorView half(DType dt, int64_t rows, int64_t cols) {
    std::vector<uint16_t> v(static_cast<size_t>(std::max<int64_t>(rows * cols, 0)));
    for (size_t i = 0; i < v.size(); ++i) v[i] = core::float_to_half(dt, static_cast<float>(static_cast<int>(i % 17) - 8) / 4.0f);
    return view(dt, std::move(v), {rows, cols});
  }
  TensorView half_shape(DType dt, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    std::vector<uint16_t> v(static_cast<size_t>(std::max<int64_t>(n, 0)), core::float_to_half(dt, 0.5f));
    return view(dt, std::move(v), std::move(shape));
  }

 private:
  std::vector<std::shared_ptr<void>> keep_;
};

constexpr DType kBf16 = DType::kBFloat16;
constexpr DType kFp16 = DType::kFloat16;

// (rows, K) ids, row t = first, first+1, ... (distinct).
std::vector<int32_t> seq_ids(int64_t rows, int64_t K) {
  std::vector<int32_t> v;
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t k = 0; k < K; ++k) v.push_back(static_cast<int32_t>((t + k) % std::max<int64_t>(K + 1, 1)));
  return v;
}

// Baseline: W=4, E=8 (L=2), K=2, BS=3, H=16, bf16, rank 1. Ids stay below 4 so that variants with
// E=4 (TP), E=6 (scale-down) or shared ranks keep them valid.
const std::vector<int32_t> kBaseIds = {0, 3, 2, 1, 3, 0};

DispatchArgs base_dispatch(Store& st) {
  DispatchArgs a;
  a.x = st.half(kBf16, 3, 16);
  a.expert_ids = st.i32(kBaseIds, {3, 2});
  a.group_ep = "val_ep";
  a.ep_world_size = 4;
  a.ep_rank_id = 1;
  a.moe_expert_num = 8;
  return a;
}

// Rows of rank 1 (experts 2 and 3), e-major prefix counts: 5 rows.
const std::vector<int32_t> kBaseCounts = {1, 2, 2, 3, 3, 4, 5, 5};
const std::vector<int32_t> kBaseAssist = {0, 0, 1, 1, 2, 0, 3, 1, 1, 1, 0, 1, 2, 2, 0};

CombineArgs base_combine(Store& st) {
  CombineArgs a;
  a.expand_x = st.half(kBf16, 24, 16);  // A = global_bs * min(L, K) = 12 * 2
  a.expert_ids = st.i32(kBaseIds, {3, 2});
  a.assist_info_for_combine = st.i32(kBaseAssist, {15});
  a.ep_send_counts = st.i32(kBaseCounts, {8});
  a.expert_scales = st.f32({0.5f, 0.5f, 0.25f, 0.75f, 1.0f, -1.0f}, {3, 2});
  a.group_ep = "val_ep";
  a.ep_world_size = 4;
  a.ep_rank_id = 1;
  a.moe_expert_num = 8;
  return a;
}

// elastic_info = [is_elastic, W', Sr', E', T1[W], T2[W]].
TensorView elastic(Store& st, std::vector<int32_t> head, std::vector<int32_t> t1, std::vector<int32_t> t2) {
  std::vector<int32_t> v = std::move(head);
  v.insert(v.end(), t1.begin(), t1.end());
  v.insert(v.end(), t2.begin(), t2.end());
  const int64_t n = static_cast<int64_t>(v.size());
  return st.i32(std::move(v), {n});
}
// Rank 3 of 4 removed: W' = 3, E' = 6 (L stays 2); rank 1 keeps local id 1.
TensorView elastic_drop3(Store& st) { return elastic(st, {1, 3, 0, 6}, {0, 1, 2, -1}, {0, 1, 2, -1}); }

template <typename Args>
void set_tp(Store& st, Args& a) {
  a.tp_world_size = 2;
  a.tp_rank_id = 0;
  a.moe_expert_num = 4;  // L = 1, required with TP
  a.group_tp = "val_tp";
  (void)st;
}

enum class Err { kInvalid, kUnsupported };
const char* err_name(Err e) { return e == Err::kInvalid ? "InvalidArgument" : "Unsupported"; }

std::string prefix_of(int64_t rank, int64_t world, const char* op) {
  return "[rank " + std::to_string(rank) + "/" + std::to_string(world) + "] " + op + ": ";
}

// f() must throw `want` whose message starts with `prefix` and contains every needle.
::testing::AssertionResult raises(const std::function<void()>& f, Err want, const std::string& prefix,
                                  const std::vector<std::string>& needles) {
  std::string msg;
  Err got;
  try {
    f();
    return ::testing::AssertionFailure() << "no exception; expected " << err_name(want) << " with " << ::testing::PrintToString(needles);
  } catch (const Unsupported& e) {
    got = Err::kUnsupported;
    msg = e.what();
  } catch (const InvalidArgument& e) {
    got = Err::kInvalid;
    msg = e.what();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "wrong exception type " << typeid(e).name() << " (expected " << err_name(want) << "): " << e.what();
  }
  if (got != want) return ::testing::AssertionFailure() << "got " << err_name(got) << ", expected " << err_name(want) << ": " << msg;
  if (msg.rfind(prefix, 0) != 0) return ::testing::AssertionFailure() << "message does not start with \"" << prefix << "\": " << msg;
  for (const auto& n : needles)
    if (msg.find(n) == std::string::npos) return ::testing::AssertionFailure() << "message lacks \"" << n << "\": " << msg;
  return ::testing::AssertionSuccess() << msg;
}

// ================================================================================================
// dispatch_v2 (resolve_common through resolve_dispatch)

struct DCase {
  std::string name;
  std::function<void(Store&, DispatchArgs&)> mutate;
  Err err;
  std::vector<std::string> needles;
};
std::ostream& operator<<(std::ostream& os, const DCase& c) { return os << c.name; }

std::vector<DCase> dispatch_rejects() {
  const Err I = Err::kInvalid, U = Err::kUnsupported;
  using A = DispatchArgs;
  std::vector<DCase> v = {
      // --- group / world / rank / experts
      {"GroupEpEmpty", [](Store&, A& a) { a.group_ep = ""; }, I, {"group_ep=\"\"", "length 0", "[1, 128)"}},
      {"GroupEpTooLong", [](Store&, A& a) { a.group_ep = std::string(128, 'g'); }, I, {"group_ep=\"ggg", "length 128"}},
      {"EpWorldSizeZero", [](Store&, A& a) { a.ep_world_size = 0; }, I, {"ep_world_size=0", "(must be >= 1)"}},
      {"EpRankNegative", [](Store&, A& a) { a.ep_rank_id = -1; }, I, {"ep_rank_id=-1", "[0, ep_world_size=4)"}},
      {"EpRankTooLarge", [](Store&, A& a) { a.ep_rank_id = 4; }, I, {"ep_rank_id=4", "[0, ep_world_size=4)"}},
      {"MoeExpertNumZero", [](Store&, A& a) { a.moe_expert_num = 0; }, I, {"moe_expert_num=0", "(must be >= 1)"}},
      {"ExpertShardType1", [](Store&, A& a) { a.expert_shard_type = 1; }, I, {"expert_shard_type=1", "only 0"}},
      {"SharedRankNumNegative", [](Store&, A& a) { a.shared_expert_rank_num = -1; }, I, {"shared_expert_rank_num=-1", "[0, ep_world_size=4)"}},
      {"SharedRankNumEqualsW", [](Store&, A& a) { a.shared_expert_rank_num = 4; }, I, {"shared_expert_rank_num=4", "[0, ep_world_size=4)"}},
      {"SharedExpertNumNegative", [](Store&, A& a) { a.shared_expert_num = -1; }, I, {"shared_expert_num=-1", "[0, 4]"}},
      {"SharedExpertNumFive", [](Store&, A& a) { a.shared_expert_num = 5; a.shared_expert_rank_num = 2; }, I, {"shared_expert_num=5", "[0, 4]"}},
      {"SharedExpertNumWithoutSharedRanks", [](Store&, A& a) { a.shared_expert_num = 2; }, I, {"shared_expert_num=2", "shared_expert_rank_num=0"}},
      {"SharedExpertNumZeroWithSharedRanks", [](Store&, A& a) { a.shared_expert_num = 0; a.shared_expert_rank_num = 2; }, I,
       {"shared_expert_num=0", "shared_expert_rank_num=2"}},
      {"SharedRanksNotMultipleOfSharedExperts", [](Store&, A& a) { a.shared_expert_num = 2; a.shared_expert_rank_num = 3; }, I,
       {"shared_expert_rank_num=3", "shared_expert_num=2"}},
      {"MoeExpertNumNotMultipleOfRanks", [](Store&, A& a) { a.moe_expert_num = 6; }, I, {"moe_expert_num=6", "shared_expert_rank_num = 4"}},
      {"MoeExpertNumNotMultipleOfMoeRanks", [](Store&, A& a) { a.shared_expert_rank_num = 1; }, I, {"moe_expert_num=8", "shared_expert_rank_num = 3"}},
      {"ZeroExpertNumNegative", [](Store&, A& a) { a.zero_expert_num = -1; }, I, {"zero_expert_num=-1"}},
      {"CopyExpertNumNegative", [](Store&, A& a) { a.copy_expert_num = -2; }, I, {"copy_expert_num=-2"}},
      {"ConstExpertNumNegative", [](Store&, A& a) { a.const_expert_num = -3; }, I, {"const_expert_num=-3"}},
      {"ExpertCountOverflowsInt32", [](Store&, A& a) { a.zero_expert_num = INT32_MAX - 8; }, I,
       {"moe_expert_num + zero_expert_num + copy_expert_num + const_expert_num = 2147483647"}},
      {"TpWorldSize3", [](Store&, A& a) { a.tp_world_size = 3; }, I, {"tp_world_size=3", "0, 1 or 2"}},
      {"TpWorldSizeNegative", [](Store&, A& a) { a.tp_world_size = -1; }, I, {"tp_world_size=-1"}},
      {"TpRankWithoutTp", [](Store&, A& a) { a.tp_rank_id = 1; }, I, {"tp_rank_id=1", "[0, 1)"}},
      {"TpRankTwoWithTp", [](Store& st, A& a) { set_tp(st, a); a.tp_rank_id = 2; }, I, {"tp_rank_id=2", "[0, 2)"}},
      {"CommAlgUnknown", [](Store&, A& a) { a.comm_alg = "ring"; }, I, {"comm_alg=\"ring\""}},
      {"ProfileUnknown", [](Store&, A& a) { a.profile = "a5"; }, I, {"profile=\"a5\"", "\"a2\" or \"a3\""}},
      {"HiddenSizeZero", [](Store& st, A& a) { a.x = st.half(kBf16, 3, 0); }, I, {"hidden size H=0"}},
      {"TpNeedsOneLocalExpert", [](Store& st, A& a) { set_tp(st, a); a.moe_expert_num = 8; }, I, {"tp_world_size=2 with 2 local experts"}},
      {"GroupTpEmpty", [](Store& st, A& a) { set_tp(st, a); a.group_tp = ""; }, I, {"group_tp=\"\"", "length 0"}},
      {"GroupTpEqualsGroupEp", [](Store& st, A& a) { set_tp(st, a); a.group_tp = a.group_ep; }, I, {"group_tp=\"val_ep\"", "equals group_ep"}},
      {"HierarchyWithTp", [](Store& st, A& a) { set_tp(st, a); a.comm_alg = "hierarchy"; }, U, {"hierarchy", "tp_world_size=2"}},
      // --- expert_ids
      {"ExpertIdsMissing", [](Store&, A& a) { a.expert_ids = TensorView(); }, I, {"expert_ids is missing"}},
      {"ExpertIdsDtypeInt64", [](Store& st, A& a) { a.expert_ids = st.view<int64_t>(DType::kInt64, {0, 3, 2, 1, 3, 0}, {3, 2}); }, I,
       {"expert_ids has dtype int64", "(must be int32)"}},
      {"ExpertIdsOneDim", [](Store& st, A& a) { a.expert_ids = st.i32(kBaseIds, {6}); }, I, {"expert_ids has shape (6,)", "2-D"}},
      {"ExpertIdsNegativeDim", [](Store& st, A& a) { a.expert_ids = st.i32(kBaseIds, {3, -2}); }, I, {"expert_ids has shape (3, -2)"}},
      {"ExpertIdsStrideCount", [](Store& st, A& a) { a.expert_ids = st.i32(kBaseIds, {3, 2}, {2}); }, I,
       {"expert_ids has 1 strides for shape (3, 2)"}},
      {"ExpertIdsZeroColumns", [](Store& st, A& a) { a.expert_ids = st.i32({}, {3, 0}); }, I, {"expert_ids has K=0 columns"}},
      {"ExpertIdsTooManyColumns", [](Store& st, A& a) { a.expert_ids = st.i32(seq_ids(3, 9), {3, 9}); }, I,
       {"expert_ids has K=9 columns", "= 8]"}},
      {"ExpertIdTooLarge", [](Store& st, A& a) { a.expert_ids = st.i32({0, 3, 8, 1, 3, 0}, {3, 2}); }, I,
       {"expert_ids[1][0]=8 out of range", "= 8)"}},
      {"ExpertIdNegative", [](Store& st, A& a) { a.expert_ids = st.i32({0, 3, 2, 1, 3, -1}, {3, 2}); }, I, {"expert_ids[2][1]=-1 out of range"}},
      {"ExpertIdBeyondSpecialExperts",
       [](Store& st, A& a) {
         a.zero_expert_num = 1;
         a.copy_expert_num = 1;
         a.expert_ids = st.i32({0, 10, 2, 1, 3, 0}, {3, 2});
       },
       I, {"expert_ids[0][1]=10 out of range", "= 10)"}},
      {"ExpertIdsRepeat", [](Store& st, A& a) { a.expert_ids = st.i32({0, 3, 2, 1, 3, 3}, {3, 2}); }, I,
       {"expert_ids[2][1]=3 repeats expert_ids[2][0]", "distinct"}},
      {"ExpertIdsRepeatUnderPartialMask",
       [](Store& st, A& a) {
         a.expert_ids = st.i32({0, 3, 2, 2, 3, 0}, {3, 2});
         a.x_active_mask = st.mask({1, 1, 1, 1, 1, 0}, {3, 2});  // row 1 is fully active
       },
       I, {"expert_ids[1][1]=2 repeats expert_ids[1][0]"}},
      // --- global_bs
      {"GlobalBsNegative", [](Store&, A& a) { a.global_bs = -4; }, I, {"global_bs=-4"}},
      {"GlobalBsNotMultipleOfW", [](Store&, A& a) { a.global_bs = 14; }, I, {"global_bs=14", "not a multiple of ep_world_size=4"}},
      {"GlobalBsBelowBsTimesW", [](Store&, A& a) { a.global_bs = 8; }, I, {"global_bs=8", "BS * ep_world_size = 12"}},
      // --- x_active_mask
      {"MaskDtypeInt8", [](Store& st, A& a) { a.x_active_mask = st.view<int8_t>(DType::kInt8, {1, 1, 1}, {3}); }, I,
       {"x_active_mask has dtype int8", "(must be bool)"}},
      {"MaskWrongLength", [](Store& st, A& a) { a.x_active_mask = st.mask({1, 1}, {2}); }, I, {"x_active_mask has shape (2,)", "(3,)", "(3, 2)"}},
      {"MaskWrongK", [](Store& st, A& a) { a.x_active_mask = st.mask(std::vector<uint8_t>(9, 1), {3, 3}); }, I, {"x_active_mask has shape (3, 3)"}},
      {"MaskThreeDims", [](Store& st, A& a) { a.x_active_mask = st.mask(std::vector<uint8_t>(6, 1), {3, 2, 1}); }, I,
       {"x_active_mask has shape (3, 2, 1)"}},
      {"Mask1DTrueAfterFalse", [](Store& st, A& a) { a.x_active_mask = st.mask({1, 0, 1}, {3}); }, I,
       {"x_active_mask[2]=true after a false entry", "trues must come first"}},
      {"MaskWithRaggedBs",
       [](Store& st, A& a) {
         a.global_bs = 16;
         a.x_active_mask = st.mask({1, 1, 1}, {3});
       },
       I, {"x_active_mask given with a different BS per rank", "global_bs=16"}},
      {"Mask2DWithRaggedBs",
       [](Store& st, A& a) {
         a.global_bs = 16;
         a.x_active_mask = st.mask(std::vector<uint8_t>(6, 1), {3, 2});
       },
       I, {"x_active_mask given with a different BS per rank", "global_bs=16"}},
      // --- elastic_info
      {"ElasticDtypeInt64", [](Store& st, A& a) { a.elastic_info = st.view<int64_t>(DType::kInt64, std::vector<int64_t>(12, 0), {12}); }, I,
       {"elastic_info has dtype int64", "(must be int32)"}},
      {"ElasticTwoDims", [](Store& st, A& a) { a.elastic_info = st.i32(std::vector<int32_t>(12, 0), {2, 6}); }, I,
       {"elastic_info has shape (2, 6)", "1-D"}},
      {"ElasticWrongLength", [](Store& st, A& a) { a.elastic_info = st.i32(std::vector<int32_t>(11, 0), {11}); }, I,
       {"elastic_info has shape (11,)", "(12,)"}},
      {"ElasticWithTp",
       [](Store& st, A& a) {
         set_tp(st, a);
         a.elastic_info = elastic(st, {1, 3, 0, 3}, {0, 1, 2, -1}, {0, 1, 2, -1});
       },
       I, {"elastic_info with tp_world_size=2"}},
      {"ElasticWithHierarchy",
       [](Store& st, A& a) {
         a.comm_alg = "hierarchy";
         a.expert_scales = st.f32(std::vector<float>(6, 0.5f), {3, 2});
         a.elastic_info = elastic_drop3(st);
       },
       U, {"elastic_info", "hierarchy"}},
      {"ElasticActiveRanksZero", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 0, 0, 6}, {0, 1, 2, -1}, {0, 1, 2, -1}); }, I,
       {"elastic_info[1]=0", "[1, ep_world_size=4]"}},
      {"ElasticActiveRanksAboveW", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 5, 0, 6}, {0, 1, 2, -1}, {0, 1, 2, -1}); }, I,
       {"elastic_info[1]=5"}},
      {"ElasticSharedRanksNotBelowActive", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 3, 6}, {0, 1, 2, -1}, {0, 1, 2, -1}); },
       I, {"elastic_info[2]=3", "elastic_info[1]=3"}},
      {"ElasticSharedRanksNegative", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, -1, 6}, {0, 1, 2, -1}, {0, 1, 2, -1}); },
       I, {"elastic_info[2]=-1"}},
      {"ElasticExpertsZero", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 0, 0}, {0, 1, 2, -1}, {0, 1, 2, -1}); }, I,
       {"elastic_info[3]=0", "moe_expert_num=8"}},
      {"ElasticExpertsAboveE", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 0, 9}, {0, 1, 2, -1}, {0, 1, 2, -1}); }, I,
       {"elastic_info[3]=9", "moe_expert_num=8"}},
      {"ElasticLocalExpertsNotDivisible", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 0, 8}, {0, 1, 2, -1}, {0, 1, 2, -1}); },
       I, {"elastic_info gives 8 experts on 3 MoE ranks", "must stay 2"}},
      {"ElasticLocalExpertsChanged", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 0, 3}, {0, 1, 2, -1}, {0, 1, 2, -1}); }, I,
       {"elastic_info gives 3 experts on 3 MoE ranks", "must stay 2"}},
      {"ElasticSharedRanksNotMultiple",
       [](Store& st, A& a) {
         a.shared_expert_rank_num = 2;
         a.shared_expert_num = 2;
         a.moe_expert_num = 4;  // L = 4 / (4 - 2) = 2
         a.elastic_info = elastic(st, {1, 3, 1, 4}, {0, 1, 2, -1}, {0, 1, 2, -1});
       },
       I, {"elastic_info[2]=1", "not a multiple of shared_expert_num=2"}},
      {"ElasticTable2OutOfRange", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 0, 6}, {0, 1, 2, -1}, {0, 1, 7, -1}); }, I,
       {"elastic_info table 2 [2]=7", "[0, 4)"}},
      {"ElasticTablesDisagreeInTable2", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 0, 6}, {0, 2, 1, -1}, {0, 1, 2, -1}); }, I,
       {"elastic_info tables disagree: table 2 [1]=1 but table 1 [1]=2"}},
      {"ElasticTable2TailNotMinusOne", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 0, 6}, {0, 1, 2, -1}, {0, 1, 2, 3}); }, I,
       {"elastic_info table 2 [3]=3", "-1 beyond the 3 active ranks"}},
      {"ElasticTable1OutOfRange", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 0, 6}, {0, 1, 2, 3}, {0, 1, 2, -1}); }, I,
       {"elastic_info table 1 [3]=3", "-1 or in [0, 3)"}},
      {"ElasticTablesDisagreeInTable1", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 0, 6}, {0, 1, 2, 1}, {0, 1, 2, -1}); }, I,
       {"elastic_info tables disagree: table 1 [3]=1 but table 2 [1]=1"}},
      {"ElasticRemovedCaller", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 0, 6}, {0, -1, 1, 2}, {0, 2, 3, -1}); }, I,
       {"ep_rank_id=1 was removed by elastic_info", "table 1 [1]=-1"}},
      {"ElasticIdBeyondScaledDownExperts",
       [](Store& st, A& a) {
         a.elastic_info = elastic_drop3(st);
         a.expert_ids = st.i32({0, 3, 2, 6, 3, 0}, {3, 2});
       },
       I, {"expert_ids[1][1]=6 out of range", "[0, 6)", "after scale-down"}},
      // --- dispatch's own parameters
      {"XMissing", [](Store&, A& a) { a.x = TensorView(); }, I, {"x is missing"}},
      {"XDtypeFloat32", [](Store& st, A& a) { a.x = st.f32(std::vector<float>(48, 1.f), {3, 16}); }, I,
       {"x has dtype float32", "bfloat16 or float16"}},
      {"XOneDim", [](Store& st, A& a) { a.x = st.half_shape(kBf16, {48}); }, I, {"x has shape (48,)", "2-D"}},
      {"XRowsDisagreeWithExpertIds", [](Store& st, A& a) { a.x = st.half(kBf16, 2, 16); }, I,
       {"x has shape (2, 16) but expert_ids has 3 rows"}},
      {"QuantModeStatic", [](Store&, A& a) { a.quant_mode = 1; }, I, {"quant_mode=1", "static quantization is not supported", "must be 0 or 2"}},
      {"QuantMode3", [](Store&, A& a) { a.quant_mode = 3; }, I, {"quant_mode=3", "must be 0 or 2"}},
      {"ExpertTokenNumsType2", [](Store&, A& a) { a.expert_token_nums_type = 2; }, I, {"expert_token_nums_type=2", "0 or 1"}},
      {"ScalesWithoutQuant", [](Store& st, A& a) { a.scales = st.f32(std::vector<float>(128, 1.f), {8, 16}); }, I,
       {"scales given with quant_mode=0"}},
      {"ScalesDtypeBf16",
       [](Store& st, A& a) {
         a.quant_mode = 2;
         a.scales = st.half(kBf16, 8, 16);
       },
       I, {"scales has dtype bfloat16", "float32"}},
      {"ScalesOneDim",
       [](Store& st, A& a) {
         a.quant_mode = 2;
         a.scales = st.f32(std::vector<float>(128, 1.f), {128});
       },
       I, {"scales has shape (128,)", "2-D"}},
      {"ScalesRows",
       [](Store& st, A& a) {
         a.quant_mode = 2;
         a.scales = st.f32(std::vector<float>(112, 1.f), {7, 16});
       },
       I, {"scales has shape (7, 16)", "(8, 16)"}},
      {"ScalesColumns",
       [](Store& st, A& a) {
         a.quant_mode = 2;
         a.scales = st.f32(std::vector<float>(120, 1.f), {8, 15});
       },
       I, {"scales has shape (8, 15)", "(8, 16)"}},
      {"ScalesRowsCountSharedExperts",
       [](Store& st, A& a) {
         a.quant_mode = 2;
         a.shared_expert_rank_num = 1;
         a.moe_expert_num = 6;  // S = 1: rows must be 1 + 6
         a.scales = st.f32(std::vector<float>(96, 1.f), {6, 16});
       },
       I, {"scales has shape (6, 16)", "(7, 16)"}},
      {"ScalesShapeAfterScaleDownWithoutSharedRanks",
       [](Store& st, A& a) {
         a.ep_world_size = 5;
         a.shared_expert_rank_num = 1;
         a.moe_expert_num = 4;
         a.quant_mode = 2;
         a.scales = st.f32(std::vector<float>(6 * 16, 1.f), {6, 16});
         a.elastic_info = elastic(st, {1, 4, 0, 4}, {-1, 0, 1, 2, 3}, {1, 2, 3, 4, -1});
       },
       I, {"scales has shape (6, 16)", "(shared_expert_num + moe_expert_num, H) = (5, 16)"}},
      {"ScalesWithHierarchy",
       [](Store& st, A& a) {
         a.quant_mode = 2;
         a.comm_alg = "hierarchy";
         a.expert_scales = st.f32(std::vector<float>(6, 0.5f), {3, 2});
         a.scales = st.f32(std::vector<float>(128, 1.f), {8, 16});
       },
       U, {"smooth scales", "hierarchy"}},
      {"ExpertScalesDtype", [](Store& st, A& a) { a.expert_scales = st.half(kBf16, 3, 2); }, I, {"expert_scales has dtype bfloat16"}},
      {"ExpertScalesShape", [](Store& st, A& a) { a.expert_scales = st.f32(std::vector<float>(9, 1.f), {3, 3}); }, I,
       {"expert_scales has shape (3, 3)", "(3, 2)"}},
      {"HierarchyWithoutExpertScales", [](Store&, A& a) { a.comm_alg = "hierarchy"; }, I, {"expert_scales is missing", "hierarchy"}},
      // --- not validated by the library today (see the report): a view with fewer strides than
      // dimensions is read out of bounds later instead of being rejected here.
      {"XStrideCount", [](Store& st, A& a) { a.x = st.view<uint16_t>(kBf16, std::vector<uint16_t>(48, 0x3f80), {3, 16}, {16}); }, I,
       {"x has 1 strides"}},
      {"MaskStrideCount", [](Store& st, A& a) { a.x_active_mask = st.mask(std::vector<uint8_t>(6, 1), {3, 2}, {2}); }, I,
       {"x_active_mask has 1 strides"}},
  };

  // --- product profiles. a3: W in [2, 768], E <= 1024, BS in [1, 512], H in [1024, 8192], K <= 16.
  auto a3 = [](Store& st, A& a) {
    a.profile = "a3";
    a.x = st.half(kBf16, a.x.size(0), 1024);
  };
  auto rows = [](Store& st, A& a, int64_t bs, int64_t h, int64_t K) {
    a.x = st.half(kBf16, bs, h);
    a.expert_ids = st.i32(seq_ids(bs, K), {bs, K});
  };
  auto a3h = [](Store& st, A& a) {  // a valid A3 hierarchy call: 16 ranks, one expert each
    a.profile = "a3";
    a.ep_world_size = 16;
    a.moe_expert_num = 16;
    a.x = st.half(kBf16, 3, 1024);
    a.comm_alg = "hierarchy";
    a.expert_scales = st.f32(std::vector<float>(6, 0.5f), {3, 2});
  };
  std::vector<DCase> prof = {
      {"ProfileA3RejectsSmallH", [](Store&, A& a) { a.profile = "a3"; }, I, {"hidden size H=16", "profile a3", "[1024, 8192]"}},
      {"ProfileA3RejectsLargeH", [](Store& st, A& a) { a.profile = "a3"; a.x = st.half(kBf16, 3, 8200); }, I, {"hidden size H=8200", "profile a3"}},
      {"ProfileA3RejectsOneRank",
       [a3](Store& st, A& a) {
         a3(st, a);
         a.ep_world_size = 1;
         a.ep_rank_id = 0;
       },
       I, {"ep_world_size=1", "profile a3", "[2, 768]"}},
      {"ProfileA3RejectsManyRanks",
       [a3](Store& st, A& a) {
         a3(st, a);
         a.ep_world_size = 772;
         a.moe_expert_num = 772;
       },
       I, {"ep_world_size=772", "profile a3"}},
      {"ProfileA3RejectsManyExperts", [a3](Store& st, A& a) { a3(st, a); a.moe_expert_num = 2048; }, I, {"moe_expert_num=2048", "profile a3", "<= 1024"}},
      {"ProfileA3RejectsEmptyBatch", [rows](Store& st, A& a) { a.profile = "a3"; rows(st, a, 0, 1024, 2); }, I, {"BS=0", "profile a3", "[1, 512]"}},
      {"ProfileA3RejectsLargeBatch", [rows](Store& st, A& a) { a.profile = "a3"; rows(st, a, 513, 1024, 2); }, I, {"BS=513", "profile a3"}},
      {"ProfileA3RejectsK17",
       [rows](Store& st, A& a) {
         a.profile = "a3";
         a.moe_expert_num = 32;
         rows(st, a, 3, 1024, 17);
       },
       I, {"K=17", "profile a3", "<= 16"}},
      // comm_alg names per product: A3 takes fullmesh_v1 / fullmesh_v2, A2 takes fullmesh.
      {"ProfileA3RejectsFullmesh", [a3](Store& st, A& a) { a3(st, a); a.comm_alg = "fullmesh"; }, I,
       {"comm_alg=\"fullmesh\"", "profile a3", "fullmesh_v2"}},
      {"ProfileA2RejectsFullmeshV1", [](Store& st, A& a) { a.profile = "a2"; a.ep_world_size = 16; a.moe_expert_num = 16;
         a.x = st.half(kBf16, 3, 32); a.comm_alg = "fullmesh_v1"; }, I, {"comm_alg=\"fullmesh_v1\"", "profile a2"}},
      // fullmesh_v2 on A3: BS <= 256, K <= 12, no TP.
      {"ProfileA3FullmeshV2RejectsLargeBatch", [rows](Store& st, A& a) { a.profile = "a3"; a.comm_alg = "fullmesh_v2"; rows(st, a, 257, 1024, 2); },
       I, {"BS=257", "comm_alg \"fullmesh_v2\"", "[1, 256]"}},
      {"ProfileA3FullmeshV2RejectsK13",
       [rows](Store& st, A& a) {
         a.profile = "a3";
         a.comm_alg = "fullmesh_v2";
         a.moe_expert_num = 32;
         rows(st, a, 3, 1024, 13);
       },
       I, {"K=13", "comm_alg \"fullmesh_v2\"", "<= 12"}},
      {"ProfileA3FullmeshV2RejectsTp",
       [a3](Store& st, A& a) {
         a3(st, a);
         set_tp(st, a);
         a.comm_alg = "fullmesh_v2";
       },
       I, {"tp_world_size=2", "comm_alg \"fullmesh_v2\"", "no TP"}},
      // hierarchy on A3: EP size in [16, 256] in steps of 16, no shared ranks, no 2-D mask, no special experts,
      // no elastic_info (TP is refused for hierarchy everywhere).
      {"ProfileA3HierarchyRejects8Ranks", [a3h](Store& st, A& a) { a3h(st, a); a.ep_world_size = 8; a.moe_expert_num = 8; }, I,
       {"ep_world_size=8", "comm_alg \"hierarchy\"", "[16, 256]", "multiple of 16"}},
      {"ProfileA3HierarchyRejects24Ranks", [a3h](Store& st, A& a) { a3h(st, a); a.ep_world_size = 24; a.moe_expert_num = 24; }, I,
       {"ep_world_size=24", "comm_alg \"hierarchy\""}},
      {"ProfileA3HierarchyRejectsSharedRanks", [a3h](Store& st, A& a) { a3h(st, a); a.shared_expert_rank_num = 1; a.moe_expert_num = 15; }, I,
       {"shared_expert_rank_num=1", "comm_alg \"hierarchy\"", "no shared-expert ranks"}},
      {"ProfileA3HierarchyRejects2DMask", [a3h](Store& st, A& a) { a3h(st, a); a.x_active_mask = st.mask(std::vector<uint8_t>(6, 1), {3, 2}); }, I,
       {"x_active_mask has shape (3, 2)", "comm_alg \"hierarchy\"", "2-D mask"}},
      {"ProfileA3HierarchyRejectsSpecialExperts", [a3h](Store& st, A& a) { a3h(st, a); a.zero_expert_num = 1; }, I,
       {"zero_expert_num + copy_expert_num + const_expert_num = 1", "comm_alg \"hierarchy\""}},
      {"ProfileA3HierarchyRejectsElasticInfo",
       [a3h](Store& st, A& a) {
         a3h(st, a);
         std::vector<int32_t> id(16);
         for (int i = 0; i < 16; ++i) id[static_cast<size_t>(i)] = i;
         a.elastic_info = elastic(st, {0, 16, 0, 16}, id, id);
       },
       I, {"elastic_info", "comm_alg \"hierarchy\"", "must be absent"}},
      {"ProfileA3HierarchyRejectsPerformanceInfo",
       [a3h](Store& st, A& a) {
         a3h(st, a);
         a.performance_info = st.view<int64_t>(DType::kInt64, std::vector<int64_t>(16, 0), {16});
       },
       I, {"performance_info (profile a3 with comm_alg \"hierarchy\": not supported, must be absent)"}},
  };
  // a2: W in {16, 32, 64}, E <= 1024, BS in [1, 256], H in (0, 7168] and % 32 == 0, K <= 16,
  // L <= 24 with fullmesh, no TP, no shared ranks, no elastic, no special experts, no mask.
  auto a2 = [](Store& st, A& a) {
    a.profile = "a2";
    a.ep_world_size = 16;
    a.moe_expert_num = 16;
    a.x = st.half(kBf16, a.x.size(0), 32);
  };
  std::vector<DCase> prof2 = {
      {"ProfileA2RejectsFourRanks", [](Store& st, A& a) { a.profile = "a2"; a.x = st.half(kBf16, 3, 32); }, I, {"ep_world_size=4", "profile a2", "16, 32 or 64"}},
      {"ProfileA2RejectsManyExperts", [a2](Store& st, A& a) { a2(st, a); a.moe_expert_num = 2048; }, I, {"moe_expert_num=2048", "profile a2"}},
      {"ProfileA2RejectsEmptyBatch", [a2, rows](Store& st, A& a) { a2(st, a); rows(st, a, 0, 32, 2); }, I, {"BS=0", "profile a2", "[1, 256]"}},
      {"ProfileA2RejectsLargeBatch", [a2, rows](Store& st, A& a) { a2(st, a); rows(st, a, 257, 32, 2); }, I, {"BS=257", "profile a2"}},
      {"ProfileA2RejectsHNotMultipleOf32", [a2](Store& st, A& a) { a2(st, a); a.x = st.half(kBf16, 3, 48); }, I, {"hidden size H=48", "profile a2", "multiple of 32"}},
      {"ProfileA2RejectsLargeH", [a2](Store& st, A& a) { a2(st, a); a.x = st.half(kBf16, 3, 7200); }, I, {"hidden size H=7200", "profile a2"}},
      {"ProfileA2RejectsK17",
       [a2, rows](Store& st, A& a) {
         a2(st, a);
         a.moe_expert_num = 32;
         rows(st, a, 3, 32, 17);
       },
       I, {"K=17", "profile a2"}},
      {"ProfileA2RejectsManyLocalExperts", [a2](Store& st, A& a) { a2(st, a); a.moe_expert_num = 16 * 25; }, I,
       {"local experts per rank = 25", "profile a2 with fullmesh", "<= 24"}},
      {"ProfileA2RejectsTp",
       [a2](Store& st, A& a) {
         a2(st, a);
         a.tp_world_size = 2;
         a.group_tp = "val_tp";
       },
       I, {"tp_world_size=2", "profile a2"}},
      {"ProfileA2RejectsSharedRanks",
       [a2](Store& st, A& a) {
         a2(st, a);
         a.shared_expert_rank_num = 1;
         a.moe_expert_num = 15;
       },
       I, {"shared_expert_rank_num=1", "profile a2"}},
      {"ProfileA2RejectsElastic",
       [a2](Store& st, A& a) {
         a2(st, a);
         std::vector<int32_t> t(16, -1);
         for (int i = 0; i < 8; ++i) t[static_cast<size_t>(i)] = i;
         a.elastic_info = elastic(st, {1, 8, 0, 8}, t, t);
       },
       I, {"elastic_info", "profile a2"}},
      {"ProfileA2RejectsSpecialExperts", [a2](Store& st, A& a) { a2(st, a); a.zero_expert_num = 1; }, I, {"zero/copy/const experts", "profile a2"}},
      {"ProfileA2RejectsMask", [a2](Store& st, A& a) { a2(st, a); a.x_active_mask = st.mask({1, 1, 1}, {3}); }, I, {"x_active_mask", "profile a2"}},
  };
  v.insert(v.end(), prof.begin(), prof.end());
  // A shape with elements but a null data pointer (was a SIGSEGV): every tensor argument.
  const std::vector<DCase> null_data = {
      {"NullDataX", [](Store&, A& a) { a.x = TensorView(nullptr, kBf16, {3, 16}); }, I, {"x has shape (3, 16) but a null data pointer"}},
      {"NullDataExpertIds", [](Store&, A& a) { a.expert_ids = TensorView(nullptr, DType::kInt32, {3, 2}); }, I,
       {"expert_ids has shape (3, 2) but a null data pointer"}},
      {"NullDataMask", [](Store&, A& a) { a.x_active_mask = TensorView(nullptr, DType::kBool, {3}); }, I,
       {"x_active_mask has shape (3,) but a null data pointer"}},
      {"NullDataElasticInfo", [](Store&, A& a) { a.elastic_info = TensorView(nullptr, DType::kInt32, {12}); }, I,
       {"elastic_info has shape (12,) but a null data pointer"}},
      {"NullDataScales",
       [](Store&, A& a) {
         a.quant_mode = 2;
         a.scales = TensorView(nullptr, DType::kFloat32, {8, 16});
       },
       I, {"scales has shape (8, 16) but a null data pointer"}},
      {"NullDataExpertScales", [](Store&, A& a) { a.expert_scales = TensorView(nullptr, DType::kFloat32, {3, 2}); }, I,
       {"expert_scales has shape (3, 2) but a null data pointer"}},
  };
  v.insert(v.end(), null_data.begin(), null_data.end());
  v.insert(v.end(), prof2.begin(), prof2.end());
  // performance_info: a contiguous (ep_world_size,) int64 tensor (the op adds into it), or none.
  const std::vector<DCase> perf = {
      {"PerformanceInfoDtype", [](Store& st, A& a) { a.performance_info = st.i32({0, 0, 0, 0}, {4}); }, I,
       {"performance_info has dtype int32 (must be int64)"}},
      {"PerformanceInfoShape", [](Store& st, A& a) { a.performance_info = st.view<int64_t>(DType::kInt64, {0, 0, 0}, {3}); }, I,
       {"performance_info has shape (3,) (must be (ep_world_size,) = (4,))"}},
      {"PerformanceInfo2D", [](Store& st, A& a) { a.performance_info = st.view<int64_t>(DType::kInt64, {0, 0, 0, 0}, {1, 4}); }, I,
       {"performance_info has shape (1, 4)"}},
      {"PerformanceInfoStrided", [](Store& st, A& a) { a.performance_info = st.view<int64_t>(DType::kInt64, std::vector<int64_t>(8, 0), {4}, {2}); },
       I, {"performance_info has shape (4,) and stride 2 (must be contiguous"}},
      {"PerformanceInfoNullData", [](Store&, A& a) { a.performance_info = TensorView(nullptr, DType::kInt64, {4}); }, I,
       {"performance_info has shape (4,) but a null data pointer"}},
  };
  v.insert(v.end(), perf.begin(), perf.end());
  return v;
}

class DispatchRejects : public ::testing::TestWithParam<DCase> {};

TEST_P(DispatchRejects, NamesParameterAndValue) {
  Store st;
  DispatchArgs a = base_dispatch(st);
  GetParam().mutate(st, a);
  EXPECT_TRUE(raises([&] { core::resolve_dispatch(a); }, GetParam().err, prefix_of(a.ep_rank_id, a.ep_world_size, "dispatch_v2"),
                     GetParam().needles));
}

INSTANTIATE_TEST_SUITE_P(Rule, DispatchRejects, ::testing::ValuesIn(dispatch_rejects()),
                         [](const ::testing::TestParamInfo<DCase>& i) { return i.param.name; });

// Valid variants: must pass, and resolve to the expected shape.
struct DOk {
  std::string name;
  std::function<void(Store&, DispatchArgs&)> mutate;
  std::function<void(const core::EpConfig&)> check;
};
std::ostream& operator<<(std::ostream& os, const DOk& c) { return os << c.name; }

std::vector<DOk> dispatch_accepts() {
  using A = DispatchArgs;
  using C = core::EpConfig;
  auto none = [](Store&, A&) {};
  return {
      {"Baseline", none,
       [](const C& c) {
         EXPECT_EQ(c.W, 4);
         EXPECT_EQ(c.rank, 1);
         EXPECT_EQ(c.E, 8);
         EXPECT_EQ(c.L, 2);
         EXPECT_EQ(c.K, 2);
         EXPECT_EQ(c.BS, 3);
         EXPECT_EQ(c.H, 16);
         EXPECT_EQ(c.S, 0);  // shared_expert_num=1 with no shared ranks is forced to 0
         EXPECT_EQ(c.max_bs, 3);
         EXPECT_EQ(c.A, 24);  // global_bs * min(L, K) = 12 * 2
         EXPECT_EQ(c.mask_kind, 0);
         EXPECT_FALSE(c.elastic);
         EXPECT_EQ(c.alg, core::Alg::kFullmesh);
         EXPECT_EQ(c.ep_counts_len(), 8);
         EXPECT_EQ(c.expert_nums_len(), 2);
         EXPECT_EQ(c.ids, kBaseIds);
       }},
      {"ProfileEmptyAcceptsSmallH", [](Store&, A& a) { a.profile = ""; }, [](const C& c) { EXPECT_EQ(c.H, 16); }},
      {"FullmeshV1IsFullmesh", [](Store&, A& a) { a.comm_alg = "fullmesh_v1"; },
       [](const C& c) {
         EXPECT_EQ(c.alg, core::Alg::kFullmesh);
         EXPECT_EQ(c.alg_name, core::AlgName::kFullmeshV1);
       }},
      {"ProfileA3AcceptsFullmeshV2",
       [](Store& st, A& a) {
         a.profile = "a3";
         a.comm_alg = "fullmesh_v2";
         a.x = st.half(kBf16, 3, 1024);
       },
       [](const C& c) {
         EXPECT_EQ(c.alg, core::Alg::kFullmesh);
         EXPECT_EQ(c.alg_name, core::AlgName::kFullmeshV2);
       }},
      {"ProfileA3AcceptsHierarchy16Ranks",
       [](Store& st, A& a) {
         a.profile = "a3";
         a.ep_world_size = 16;
         a.moe_expert_num = 16;
         a.x = st.half(kBf16, 3, 1024);
         a.comm_alg = "hierarchy";
         a.expert_scales = st.f32(std::vector<float>(6, 0.5f), {3, 2});
       },
       [](const C& c) { EXPECT_EQ(c.alg, core::Alg::kHierarchy); }},
      // A scale-down that removes the only shared-expert rank (W=5, Sr=1, S=1, E=4): scales keep the shape
      // (S + E, H) = (5, 16) they had; expert g uses row 1 + g.
      {"ElasticWithoutSharedRanksKeepsScalesShape",
       [](Store& st, A& a) {
         a.ep_world_size = 5;
         a.shared_expert_rank_num = 1;
         a.moe_expert_num = 4;
         a.quant_mode = 2;
         a.scales = st.f32(std::vector<float>(5 * 16, 1.f), {5, 16});
         a.elastic_info = elastic(st, {1, 4, 0, 4}, {-1, 0, 1, 2, 3}, {1, 2, 3, 4, -1});
       },
       [](const C& c) {
         EXPECT_EQ(c.S, 0);
         EXPECT_EQ(c.Sr, 0);
         EXPECT_EQ(c.scale_row_base, 1);
       }},
      {"ElasticWithoutSharedRanksStillAcceptsExpertOnlyScales",
       [](Store& st, A& a) {
         a.ep_world_size = 5;
         a.shared_expert_rank_num = 1;
         a.moe_expert_num = 4;
         a.quant_mode = 2;
         a.scales = st.f32(std::vector<float>(4 * 16, 1.f), {4, 16});
         a.elastic_info = elastic(st, {1, 4, 0, 4}, {-1, 0, 1, 2, 3}, {1, 2, 3, 4, -1});
       },
       [](const C& c) { EXPECT_EQ(c.scale_row_base, 0); }},
      {"ProfileA3AcceptsH1024",
       [](Store& st, A& a) {
         a.profile = "a3";
         a.x = st.half(kBf16, 3, 1024);
       },
       [](const C& c) { EXPECT_EQ(c.H, 1024); }},
      {"ProfileA2Accepts",
       [](Store& st, A& a) {
         a.profile = "a2";
         a.ep_world_size = 16;
         a.moe_expert_num = 16 * 24;
         a.x = st.half(kBf16, 3, 7168);
       },
       [](const C& c) { EXPECT_EQ(c.L, 24); }},
      {"ProfileA2AcceptsManyLocalExpertsWithHierarchy",
       [](Store& st, A& a) {
         a.profile = "a2";
         a.ep_world_size = 16;
         a.moe_expert_num = 16 * 25;
         a.comm_alg = "hierarchy";
         a.expert_scales = st.f32(std::vector<float>(6, 0.5f), {3, 2});
         a.x = st.half(kBf16, 3, 64);
       },
       [](const C& c) { EXPECT_EQ(c.alg, core::Alg::kHierarchy); }},
      {"Fp16", [](Store& st, A& a) { a.x = st.half(kFp16, 3, 16); }, [](const C& c) { EXPECT_EQ(c.dtype, kFp16); }},
      {"Mask1DTruesFirst", [](Store& st, A& a) { a.x_active_mask = st.mask({1, 1, 0}, {3}); },
       [](const C& c) {
         EXPECT_EQ(c.mask_kind, 1);
         EXPECT_EQ(c.token_on, (std::vector<uint8_t>{1, 1, 0}));
       }},
      {"Mask1DAllFalse", [](Store& st, A& a) { a.x_active_mask = st.mask({0, 0, 0}, {3}); },
       [](const C& c) { EXPECT_EQ(c.token_on, (std::vector<uint8_t>{0, 0, 0})); }},
      {"Mask1DInactiveTokenMayHoldBadIds",
       [](Store& st, A& a) {
         a.x_active_mask = st.mask({1, 1, 0}, {3});
         a.expert_ids = st.i32({0, 3, 2, 1, 99, 99}, {3, 2});
       },
       [](const C& c) { EXPECT_FALSE(c.sel(2, 0)); }},
      {"Mask2DMaskedEntriesMayHoldBadIds",
       [](Store& st, A& a) {
         a.x_active_mask = st.mask({1, 1, 1, 0, 0, 0}, {3, 2});
         a.expert_ids = st.i32({0, 3, 2, -5, 3, 3}, {3, 2});
       },
       [](const C& c) {
         EXPECT_EQ(c.mask_kind, 2);
         EXPECT_EQ(c.token_on, (std::vector<uint8_t>{1, 1, 0}));
         EXPECT_TRUE(c.sel(1, 0));
         EXPECT_FALSE(c.sel(1, 1));
       }},
      {"RaggedGlobalBs", [](Store&, A& a) { a.global_bs = 16; },
       [](const C& c) {
         EXPECT_EQ(c.max_bs, 4);
         EXPECT_EQ(c.A, 32);
       }},
      {"GlobalBsEqualToBsTimesWWithMask",
       [](Store& st, A& a) {
         a.global_bs = 12;
         a.x_active_mask = st.mask({1, 0, 0}, {3});
       },
       [](const C& c) { EXPECT_EQ(c.max_bs, 3); }},
      {"EmptyBatch",
       [](Store& st, A& a) {
         a.x = st.half(kBf16, 0, 16);
         a.expert_ids = st.i32({}, {0, 2});
       },
       [](const C& c) {
         EXPECT_EQ(c.BS, 0);
         EXPECT_EQ(c.A, 0);
       }},
      {"SpecialExpertIds",
       [](Store& st, A& a) {
         a.zero_expert_num = 1;
         a.copy_expert_num = 1;
         a.const_expert_num = 1;
         a.expert_ids = st.i32({8, 9, 10, 1, 3, 0}, {3, 2});
       },
       [](const C& c) {
         EXPECT_EQ(c.classify(8), core::ExpertKind::kZero);
         EXPECT_EQ(c.classify(9), core::ExpertKind::kCopy);
         EXPECT_EQ(c.classify(10), core::ExpertKind::kConst);
         EXPECT_FALSE(c.sel(0, 0));
         EXPECT_TRUE(c.sel(1, 1));
       }},
      {"StridedExpertIds", [](Store& st, A& a) { a.expert_ids = st.i32({0, 3, -9, 2, 1, -9, 3, 0, -9}, {3, 2}, {3, 1}); },
       [](const C& c) { EXPECT_EQ(c.ids, kBaseIds); }},
      {"QuantWithSmoothScales",
       [](Store& st, A& a) {
         a.quant_mode = 2;
         a.scales = st.f32(std::vector<float>(128, 1.f), {8, 16});
       },
       [](const C&) {}},
      {"SharedRanks",
       [](Store&, A& a) {
         a.shared_expert_rank_num = 2;
         a.shared_expert_num = 2;
         a.moe_expert_num = 4;
       },
       [](const C& c) {
         EXPECT_EQ(c.S, 2);
         EXPECT_EQ(c.R, 1);
         EXPECT_TRUE(c.is_shared_rank());
         EXPECT_EQ(c.A, 3 * 4);  // shared rank: max_bs * ceil(W / R)
       }},
      {"Tp",
       [](Store& st, A& a) {
         set_tp(st, a);
         a.tp_rank_id = 1;
       },
       [](const C& c) {
         EXPECT_EQ(c.tp, 2);
         EXPECT_EQ(c.tp_rank, 1);
       }},
      {"TpWorldSize1IsNoTp", [](Store&, A& a) { a.tp_world_size = 1; }, [](const C& c) { EXPECT_EQ(c.tp, 1); }},
      {"HierarchyWithExpertScales",
       [](Store& st, A& a) {
         a.comm_alg = "hierarchy";
         a.expert_scales = st.f32(std::vector<float>(6, 0.5f), {3, 2});
       },
       [](const C& c) { EXPECT_EQ(c.alg, core::Alg::kHierarchy); }},
      {"ElasticDropLastRank", [](Store& st, A& a) { a.elastic_info = elastic_drop3(st); },
       [](const C& c) {
         EXPECT_TRUE(c.elastic);
         EXPECT_EQ(c.W, 3);
         EXPECT_EQ(c.E, 6);
         EXPECT_EQ(c.rank, 1);
         EXPECT_EQ(c.ep_counts_len(), 8);  // W_orig * L
       }},
      {"ElasticDropFirstRank", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 0, 6}, {-1, 0, 1, 2}, {1, 2, 3, -1}); },
       [](const C& c) {
         EXPECT_EQ(c.rank, 0);
         EXPECT_EQ(c.phys(0), 1);
         EXPECT_EQ(c.members(), (std::vector<int>{1, 2, 3}));
       }},
      {"ElasticSpecialIdsKeepOriginalOffset",
       [](Store& st, A& a) {
         a.zero_expert_num = 1;
         a.elastic_info = elastic_drop3(st);
         a.expert_ids = st.i32({0, 8, 2, 1, 3, 0}, {3, 2});  // 8 = E_orig + 0: the zero expert
       },
       [](const C& c) { EXPECT_EQ(c.classify(8), core::ExpertKind::kZero); }},
      {"ElasticDisabledIgnoresTables", [](Store& st, A& a) { a.elastic_info = elastic(st, {0, 99, 99, 99}, {7, 7, 7, 7}, {7, 7, 7, 7}); },
       [](const C& c) {
         EXPECT_FALSE(c.elastic);
         EXPECT_EQ(c.W, 4);
       }},
  };
}

class DispatchAccepts : public ::testing::TestWithParam<DOk> {};

TEST_P(DispatchAccepts, Resolves) {
  Store st;
  DispatchArgs a = base_dispatch(st);
  GetParam().mutate(st, a);
  core::EpConfig c;
  try {
    c = core::resolve_dispatch(a);
  } catch (const std::exception& e) {
    FAIL() << "rejected: " << e.what();
  }
  GetParam().check(c);
}

INSTANTIATE_TEST_SUITE_P(Valid, DispatchAccepts, ::testing::ValuesIn(dispatch_accepts()),
                         [](const ::testing::TestParamInfo<DOk>& i) { return i.param.name; });

// performance_info is optional; given, the op writes into the caller's memory (a view of it, no copy),
// also with elastic_info, where its length stays the group's size as created.
TEST(DispatchRules, PerformanceInfoIsTheCallersMemory) {
  Store st;
  DispatchArgs a = base_dispatch(st);
  EXPECT_EQ(core::resolve_dispatch(a).waits_us, nullptr);
  std::vector<int64_t> perf(4, 0);
  a.performance_info = TensorView(perf.data(), DType::kInt64, {4});
  EXPECT_EQ(core::resolve_dispatch(a).waits_us, perf.data());
  a.performance_info = TensorView(perf.data(), DType::kInt64, {4}, {1});  // explicit unit stride
  EXPECT_EQ(core::resolve_dispatch(a).waits_us, perf.data());
}

TEST(DispatchRules, EmptyCommAlgFollowsHcclEnvironment) {
  Store st;
  DispatchArgs a = base_dispatch(st);
  setenv("HCCL_INTRA_PCIE_ENABLE", "1", 1);
  setenv("HCCL_INTRA_ROCE_ENABLE", "0", 1);
  // "" now means hierarchy, which needs expert_scales in dispatch.
  EXPECT_TRUE(raises([&] { core::resolve_dispatch(a); }, Err::kInvalid, prefix_of(1, 4, "dispatch_v2"), {"expert_scales is missing", "hierarchy"}));
  a.comm_alg = "fullmesh";
  EXPECT_NO_THROW(core::resolve_dispatch(a));
  unsetenv("HCCL_INTRA_PCIE_ENABLE");
  unsetenv("HCCL_INTRA_ROCE_ENABLE");
  a.comm_alg = "";
  EXPECT_EQ(core::resolve_dispatch(a).alg, core::Alg::kFullmesh);
}

// ================================================================================================
// combine_v2 (resolve_common through resolve_combine, then combine_counts)

enum class Stage { kResolve, kCounts };
struct CCase {
  std::string name;
  std::function<void(Store&, CombineArgs&)> mutate;
  Err err;
  std::vector<std::string> needles;
  Stage stage = Stage::kResolve;
};
std::ostream& operator<<(std::ostream& os, const CCase& c) { return os << c.name; }

// TP variant of the combine baseline: E=4 (L=1), own rows = ep_send_counts[W-1] = 3.
void combine_tp(Store& st, CombineArgs& a) {
  set_tp(st, a);
  a.tp_send_counts = st.i32({3, 2}, {2});
}

std::vector<CCase> combine_rejects() {
  const Err I = Err::kInvalid, U = Err::kUnsupported;
  const Stage N = Stage::kCounts;
  using A = CombineArgs;
  auto consts = [](Store& st, A& a) {
    a.const_expert_num = 1;
    a.ori_x = st.half(kBf16, 3, 16);
    a.const_expert_alpha_1 = st.half_shape(kBf16, {1});
    a.const_expert_alpha_2 = st.half_shape(kBf16, {1});
    a.const_expert_v = st.half(kBf16, 1, 16);
  };
  return {
      // --- the shared rules, seen through combine_v2 (op name in the prefix)
      {"GroupEpEmpty", [](Store&, A& a) { a.group_ep = ""; }, I, {"group_ep=\"\""}},
      {"EpRankTooLarge", [](Store&, A& a) { a.ep_rank_id = 7; }, I, {"ep_rank_id=7"}},
      {"MoeExpertNumNotMultiple", [](Store&, A& a) { a.moe_expert_num = 7; }, I, {"moe_expert_num=7"}},
      {"ExpertIdTooLarge", [](Store& st, A& a) { a.expert_ids = st.i32({0, 3, 2, 1, 9, 0}, {3, 2}); }, I, {"expert_ids[2][0]=9 out of range"}},
      {"Mask1DTrueAfterFalse", [](Store& st, A& a) { a.x_active_mask = st.mask({0, 1, 1}, {3}); }, I, {"x_active_mask[1]=true after a false entry"}},
      {"ElasticRemovedCaller", [](Store& st, A& a) { a.elastic_info = elastic(st, {1, 3, 0, 6}, {0, -1, 1, 2}, {0, 2, 3, -1}); }, I,
       {"ep_rank_id=1 was removed by elastic_info"}},
      {"ProfileA3RejectsSmallH", [](Store&, A& a) { a.profile = "a3"; }, I, {"hidden size H=16", "profile a3"}},
      {"TpWorldSize3", [](Store&, A& a) { a.tp_world_size = 3; }, I, {"tp_world_size=3"}},
      {"GlobalBsBelowBsTimesW", [](Store&, A& a) { a.global_bs = 4; }, I, {"global_bs=4", "BS * ep_world_size = 12"}},
      // --- expand_x
      {"ExpandXMissing", [](Store&, A& a) { a.expand_x = TensorView(); }, I, {"expand_x is missing"}},
      {"ExpandXInt8", [](Store& st, A& a) { a.expand_x = st.view<int8_t>(DType::kInt8, std::vector<int8_t>(384, 1), {24, 16}); }, I,
       {"expand_x has dtype int8", "int8 expert outputs are not accepted"}},
      {"ExpandXOneDim", [](Store& st, A& a) { a.expand_x = st.half_shape(kBf16, {384}); }, I, {"expand_x has shape (384,)", "2-D"}},
      // --- comm_quant_mode
      {"CommQuantMode1", [](Store&, A& a) { a.comm_quant_mode = 1; }, I, {"comm_quant_mode=1", "0 or 2"}},
      {"CommQuantMode3", [](Store&, A& a) { a.comm_quant_mode = 3; }, I, {"comm_quant_mode=3"}},
      {"CommQuantWithTp",
       [](Store& st, A& a) {
         combine_tp(st, a);
         a.comm_quant_mode = 2;
       },
       I, {"comm_quant_mode=2 with tp_world_size=2"}},
      // --- expert_scales, assist_info_for_combine, ep_send_counts, tp_send_counts
      {"ExpertScalesMissing", [](Store&, A& a) { a.expert_scales = TensorView(); }, I, {"expert_scales is missing"}},
      {"ExpertScalesDtype", [](Store& st, A& a) { a.expert_scales = st.half(kBf16, 3, 2); }, I, {"expert_scales has dtype bfloat16"}},
      {"ExpertScalesShape", [](Store& st, A& a) { a.expert_scales = st.f32(std::vector<float>(9, 1.f), {3, 3}); }, I,
       {"expert_scales has shape (3, 3)", "(3, 2)"}},
      {"ExpertScalesOneDim", [](Store& st, A& a) { a.expert_scales = st.f32(std::vector<float>(6, 1.f), {6}); }, I,
       {"expert_scales has shape (6,)", "2-D"}},
      {"AssistMissing", [](Store&, A& a) { a.assist_info_for_combine = TensorView(); }, I, {"assist_info_for_combine is missing"}},
      {"AssistDtype", [](Store& st, A& a) { a.assist_info_for_combine = st.view<int64_t>(DType::kInt64, std::vector<int64_t>(15, 0), {15}); }, I,
       {"assist_info_for_combine has dtype int64"}},
      {"AssistTwoDims", [](Store& st, A& a) { a.assist_info_for_combine = st.i32(kBaseAssist, {5, 3}); }, I,
       {"assist_info_for_combine has shape (5, 3)", "1-D"}},
      {"EpSendCountsMissing", [](Store&, A& a) { a.ep_send_counts = TensorView(); }, I, {"ep_send_counts is missing"}},
      {"EpSendCountsDtype", [](Store& st, A& a) { a.ep_send_counts = st.view<int64_t>(DType::kInt64, std::vector<int64_t>(8, 0), {8}); }, I,
       {"ep_send_counts has dtype int64"}},
      {"TpSendCountsMissing",
       [](Store& st, A& a) {
         combine_tp(st, a);
         a.tp_send_counts = TensorView();
       },
       I, {"tp_send_counts is missing", "tp_world_size=2"}},
      {"TpSendCountsDtype",
       [](Store& st, A& a) {
         combine_tp(st, a);
         a.tp_send_counts = st.f32({3, 2}, {2});
       },
       I, {"tp_send_counts has dtype float32"}},
      {"TpSendCountsShape",
       [](Store& st, A& a) {
         combine_tp(st, a);
         a.tp_send_counts = st.i32({3, 2, 0}, {3});
       },
       I, {"tp_send_counts has shape (3,)", "(2,)"}},
      // --- shared_expert_x
      {"SharedExpertXWithSharedRanks",
       [](Store& st, A& a) {
         a.shared_expert_rank_num = 1;
         a.moe_expert_num = 6;
         a.shared_expert_x = st.half(kBf16, 3, 16);
       },
       I, {"shared_expert_x given with shared_expert_rank_num=1"}},
      {"SharedExpertXDtype", [](Store& st, A& a) { a.shared_expert_x = st.half(kFp16, 3, 16); }, I,
       {"shared_expert_x has dtype float16", "bfloat16"}},
      {"SharedExpertXShape", [](Store& st, A& a) { a.shared_expert_x = st.half(kBf16, 3, 8); }, I, {"shared_expert_x has shape (3, 8)", "(3, 16)"}},
      {"SharedExpertX3DBadProduct", [](Store& st, A& a) { a.shared_expert_x = st.half_shape(kBf16, {2, 2, 16}); }, I,
       {"shared_expert_x has shape (2, 2, 16)"}},
      {"SharedExpertXOneDim", [](Store& st, A& a) { a.shared_expert_x = st.half_shape(kBf16, {48}); }, I, {"shared_expert_x has shape (48,)"}},
      // --- ori_x and the const experts
      {"OriXMissingWithCopyExperts", [](Store&, A& a) { a.copy_expert_num = 1; }, I, {"ori_x is missing", "copy_expert_num=1"}},
      {"OriXMissingWithConstExperts", [](Store&, A& a) { a.const_expert_num = 1; }, I, {"ori_x is missing", "const_expert_num=1"}},
      {"OriXDtype",
       [](Store& st, A& a) {
         a.copy_expert_num = 1;
         a.ori_x = st.half(kFp16, 3, 16);
       },
       I, {"ori_x has dtype float16", "bfloat16"}},
      {"OriXShape",
       [](Store& st, A& a) {
         a.copy_expert_num = 1;
         a.ori_x = st.half(kBf16, 3, 8);
       },
       I, {"ori_x has shape (3, 8)", "(3, 16)"}},
      {"OriXShapeCheckedEvenWithoutSpecialExperts", [](Store& st, A& a) { a.ori_x = st.half(kBf16, 2, 16); }, I, {"ori_x has shape (2, 16)"}},
      {"ConstAlpha1Missing", [consts](Store& st, A& a) { consts(st, a); a.const_expert_alpha_1 = TensorView(); }, I,
       {"const_expert_alpha_1 is missing", "const_expert_num=1"}},
      {"ConstAlpha2Missing", [consts](Store& st, A& a) { consts(st, a); a.const_expert_alpha_2 = TensorView(); }, I,
       {"const_expert_alpha_2 is missing"}},
      {"ConstVMissing", [consts](Store& st, A& a) { consts(st, a); a.const_expert_v = TensorView(); }, I, {"const_expert_v is missing"}},
      {"ConstAlpha1Dtype", [consts](Store& st, A& a) { consts(st, a); a.const_expert_alpha_1 = st.half_shape(kFp16, {1}); }, I,
       {"const_expert_alpha_1 has dtype float16", "bfloat16"}},
      {"ConstAlpha2Shape", [consts](Store& st, A& a) { consts(st, a); a.const_expert_alpha_2 = st.half_shape(kBf16, {2}); }, I,
       {"const_expert_alpha_2 has shape (2,)", "(1,)"}},
      {"ConstAlpha1PerHidden", [consts](Store& st, A& a) { consts(st, a); a.const_expert_alpha_1 = st.half(kBf16, 1, 16); }, I,
       {"const_expert_alpha_1 has shape (1, 16)", "(const_expert_num,) = (1,)"}},
      {"ConstVShape", [consts](Store& st, A& a) { consts(st, a); a.const_expert_v = st.half(kBf16, 1, 8); }, I,
       {"const_expert_v has shape (1, 8)", "(1, 16)"}},
      {"ConstVDtype", [consts](Store& st, A& a) { consts(st, a); a.const_expert_v = st.f32(std::vector<float>(16, 1.f), {1, 16}); }, I,
       {"const_expert_v has dtype float32"}},
      // --- hierarchy and expand_scales
      {"HierarchyWithoutExpandScales", [](Store&, A& a) { a.comm_alg = "hierarchy"; }, I, {"expand_scales is missing", "hierarchy"}},
      {"HierarchyWithCommQuant",
       [](Store& st, A& a) {
         a.comm_alg = "hierarchy";
         a.expand_scales = st.f32(std::vector<float>(24, 1.f), {24});
         a.comm_quant_mode = 2;
       },
       U, {"comm_quant_mode=2", "hierarchy"}},
      {"HierarchyWithTp",
       [](Store& st, A& a) {
         combine_tp(st, a);
         a.comm_alg = "hierarchy";
       },
       U, {"hierarchy", "tp_world_size=2"}},
      {"ExpandScalesDtype", [](Store& st, A& a) { a.expand_scales = st.half_shape(kBf16, {24}); }, I, {"expand_scales has dtype bfloat16"}},
      {"ExpandScalesTwoDims", [](Store& st, A& a) { a.expand_scales = st.f32(std::vector<float>(24, 1.f), {4, 6}); }, I,
       {"expand_scales has shape (4, 6)", "1-D"}},
      // --- combine_counts
      {"EpSendCountsTooShort", [](Store& st, A& a) { a.ep_send_counts = st.i32({1, 2, 2, 3, 3, 4, 5}, {7}); }, I,
       {"ep_send_counts has shape (7,)", "at least 8"}, N},
      {"EpSendCountsDecreasing", [](Store& st, A& a) { a.ep_send_counts = st.i32({1, 2, 2, 1, 3, 4, 5, 5}, {8}); }, I,
       {"ep_send_counts[3]=1 is smaller than ep_send_counts[2]=2"}, N},
      {"EpSendCountsNegative", [](Store& st, A& a) { a.ep_send_counts = st.i32({-1, 2, 2, 3, 3, 4, 5, 5}, {8}); }, I,
       {"ep_send_counts[0]=-1"}, N},
      {"EpSendCountsExceedA", [](Store& st, A& a) { a.ep_send_counts = st.i32({1, 2, 2, 3, 3, 4, 5, 25}, {8}); }, I,
       {"ep_send_counts[7]=25 rows exceed A=24"}, N},
      {"ExpandXFewerRowsThanCounts", [](Store& st, A& a) { a.expand_x = st.half(kBf16, 4, 16); }, I,
       {"expand_x has 4 rows but the counts need 5"}, N},
      {"AssistTooShort", [](Store& st, A& a) { a.assist_info_for_combine = st.i32(std::vector<int32_t>(14, 0), {14}); }, I,
       {"assist_info_for_combine has shape (14,)", "3 * 5"}, N},
      {"AssistRankOutOfRange", [](Store& st, A& a) { a.assist_info_for_combine = st.i32({0, 0, 1, 4, 2, 0, 3, 1, 1, 1, 0, 1, 2, 2, 0}, {15}); }, I,
       {"assist_info_for_combine[3..5]=(4, 2, 0)", "rank < 4"}, N},
      {"AssistRankNegative", [](Store& st, A& a) { a.assist_info_for_combine = st.i32({-1, 0, 1, 1, 2, 0, 3, 1, 1, 1, 0, 1, 2, 2, 0}, {15}); }, I,
       {"assist_info_for_combine[0..2]=(-1, 0, 1)"}, N},
      {"AssistTokenOutOfRange", [](Store& st, A& a) { a.assist_info_for_combine = st.i32({0, 0, 1, 1, 2, 0, 3, 1, 1, 1, 0, 1, 2, 3, 0}, {15}); }, I,
       {"assist_info_for_combine[12..14]=(2, 3, 0)", "token < 3"}, N},
      {"AssistSlotOutOfRange", [](Store& st, A& a) { a.assist_info_for_combine = st.i32({0, 0, 1, 1, 2, 2, 3, 1, 1, 1, 0, 1, 2, 2, 0}, {15}); }, I,
       {"assist_info_for_combine[3..5]=(1, 2, 2)", "k < 2"}, N},
      {"TpSendCountsDisagreeWithEpSendCounts",
       [](Store& st, A& a) {
         combine_tp(st, a);
         a.tp_send_counts = st.i32({4, 2}, {2});
       },
       I, {"tp_send_counts[0]=4 disagrees with ep_send_counts[3]=3"}, N},
      {"TpSendCountsNegativePeer",
       [](Store& st, A& a) {
         combine_tp(st, a);
         a.tp_send_counts = st.i32({3, -1}, {2});
       },
       I, {"tp_send_counts[1]=-1"}, N},
      {"TpExpandXTooFewRowsForPeer",
       [](Store& st, A& a) {
         combine_tp(st, a);
         a.expand_x = st.half(kBf16, 4, 16);  // own 3 + peer 2
       },
       I, {"expand_x has 4 rows but the counts need 5"}, N},
      {"HierarchyExpandScalesTooShort",
       [](Store& st, A& a) {
         a.comm_alg = "hierarchy";
         a.expand_scales = st.f32({1, 1}, {2});
       },
       I, {"expand_scales has shape (2,)", "5 entries"}, N},
      // --- a shape with elements but a null data pointer (was a SIGSEGV)
      {"NullDataExpandX", [](Store&, A& a) { a.expand_x = TensorView(nullptr, kBf16, {24, 16}); }, I, {"expand_x has shape (24, 16) but a null data pointer"}},
      {"NullDataCombineExpertIds", [](Store&, A& a) { a.expert_ids = TensorView(nullptr, DType::kInt32, {3, 2}); }, I,
       {"expert_ids has shape (3, 2) but a null data pointer"}},
      {"NullDataAssistInfo", [](Store&, A& a) { a.assist_info_for_combine = TensorView(nullptr, DType::kInt32, {15}); }, I,
       {"assist_info_for_combine has shape (15,) but a null data pointer"}},
      {"NullDataEpSendCounts", [](Store&, A& a) { a.ep_send_counts = TensorView(nullptr, DType::kInt32, {8}); }, I,
       {"ep_send_counts has shape (8,) but a null data pointer"}},
      {"NullDataCombineExpertScales", [](Store&, A& a) { a.expert_scales = TensorView(nullptr, DType::kFloat32, {3, 2}); }, I,
       {"expert_scales has shape (3, 2) but a null data pointer"}},
      {"NullDataSharedExpertX", [](Store&, A& a) { a.shared_expert_x = TensorView(nullptr, kBf16, {3, 16}); }, I,
       {"shared_expert_x has shape (3, 16) but a null data pointer"}},
      {"NullDataOriX", [](Store&, A& a) { a.ori_x = TensorView(nullptr, kBf16, {3, 16}); }, I, {"ori_x has shape (3, 16) but a null data pointer"}},
      {"NullDataExpandScales", [](Store&, A& a) { a.expand_scales = TensorView(nullptr, DType::kFloat32, {24}); }, I,
       {"expand_scales has shape (24,) but a null data pointer"}},
      // --- performance_info
      {"CombinePerformanceInfoDtype", [](Store& st, A& a) { a.performance_info = st.f32({0, 0, 0, 0}, {4}); }, I,
       {"performance_info has dtype float32 (must be int64)"}},
      {"CombinePerformanceInfoShape", [](Store& st, A& a) { a.performance_info = st.view<int64_t>(DType::kInt64, std::vector<int64_t>(5, 0), {5}); },
       I, {"performance_info has shape (5,) (must be (ep_world_size,) = (4,))"}},
      {"CombinePerformanceInfoStrided",
       [](Store& st, A& a) { a.performance_info = st.view<int64_t>(DType::kInt64, std::vector<int64_t>(12, 0), {4}, {3}); }, I,
       {"performance_info has shape (4,) and stride 3 (must be contiguous"}},
      // --- not validated by the library today (see the report)
      {"ExpandXStrideCount", [](Store& st, A& a) { a.expand_x = st.view<uint16_t>(kBf16, std::vector<uint16_t>(384, 0), {24, 16}, {16}); }, I,
       {"expand_x has 1 strides"}},
  };
}

class CombineRejects : public ::testing::TestWithParam<CCase> {};

TEST_P(CombineRejects, NamesParameterAndValue) {
  Store st;
  CombineArgs a = base_combine(st);
  GetParam().mutate(st, a);
  const std::string prefix = prefix_of(a.ep_rank_id, a.ep_world_size, "combine_v2");
  if (GetParam().stage == Stage::kResolve) {
    EXPECT_TRUE(raises(
        [&] {
          core::EpConfig c = core::resolve_combine(a);
          core::combine_counts(c, a);
        },
        GetParam().err, prefix, GetParam().needles));
  } else {
    core::EpConfig c;
    try {
      c = core::resolve_combine(a);
    } catch (const std::exception& e) {
      FAIL() << "resolve_combine rejected what only combine_counts should: " << e.what();
    }
    EXPECT_TRUE(raises([&] { core::combine_counts(c, a); }, GetParam().err, prefix, GetParam().needles));
  }
}

INSTANTIATE_TEST_SUITE_P(Rule, CombineRejects, ::testing::ValuesIn(combine_rejects()),
                         [](const ::testing::TestParamInfo<CCase>& i) { return i.param.name; });

struct COk {
  std::string name;
  std::function<void(Store&, CombineArgs&)> mutate;
  int64_t own = 5, peer = 0;
};
std::ostream& operator<<(std::ostream& os, const COk& c) { return os << c.name; }

class CombineAccepts : public ::testing::TestWithParam<COk> {};

TEST_P(CombineAccepts, ResolvesAndCounts) {
  Store st;
  CombineArgs a = base_combine(st);
  GetParam().mutate(st, a);
  try {
    core::EpConfig c = core::resolve_combine(a);
    core::CombineCounts n = core::combine_counts(c, a);
    EXPECT_EQ(n.own_rows, GetParam().own);
    EXPECT_EQ(n.peer_rows, GetParam().peer);
  } catch (const std::exception& e) {
    FAIL() << "rejected: " << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Valid, CombineAccepts,
    ::testing::Values(
        COk{"Baseline", [](Store&, CombineArgs&) {}},
        COk{"Tp", combine_tp, 3, 2},
        COk{"TpRank1",
            [](Store& st, CombineArgs& a) {
              combine_tp(st, a);
              a.tp_rank_id = 1;
              a.tp_send_counts = st.i32({2, 3}, {2});
            },
            3, 2},
        COk{"SharedExpertX2D", [](Store& st, CombineArgs& a) { a.shared_expert_x = st.half(kBf16, 3, 16); }},
        COk{"SharedExpertX3D", [](Store& st, CombineArgs& a) { a.shared_expert_x = st.half_shape(kBf16, {1, 3, 16}); }},
        COk{"SharedExpertX3DOther", [](Store& st, CombineArgs& a) { a.shared_expert_x = st.half_shape(kBf16, {3, 1, 16}); }},
        COk{"CopyExpertsWithOriX",
            [](Store& st, CombineArgs& a) {
              a.copy_expert_num = 1;
              a.ori_x = st.half(kBf16, 3, 16);
            }},
        COk{"ConstExperts",
            [](Store& st, CombineArgs& a) {
              a.const_expert_num = 2;
              a.ori_x = st.half(kBf16, 3, 16);
              a.const_expert_alpha_1 = st.half_shape(kBf16, {2});
              a.const_expert_alpha_2 = st.half_shape(kBf16, {2});
              a.const_expert_v = st.half(kBf16, 2, 16);
            }},
        COk{"HierarchyWithExpandScales",
            [](Store& st, CombineArgs& a) {
              a.comm_alg = "hierarchy";
              a.expand_scales = st.f32(std::vector<float>(24, 1.f), {24});
            }},
        COk{"CommQuant", [](Store&, CombineArgs& a) { a.comm_quant_mode = 2; }},
        COk{"LongerCountsAndAssist",
            [](Store& st, CombineArgs& a) {
              std::vector<int32_t> asst = kBaseAssist;
              asst.resize(3072, 0);
              a.assist_info_for_combine = st.i32(asst, {3072});
            }},
        COk{"ZeroRows",
            [](Store& st, CombineArgs& a) {
              a.ep_send_counts = st.i32(std::vector<int32_t>(8, 0), {8});
              a.assist_info_for_combine = st.i32({}, {0});
            },
            0}),
    [](const ::testing::TestParamInfo<COk>& i) { return i.param.name; });

// ================================================================================================
// Group registry and the lookup of the ops

std::string unique_name(const std::string& stem) {
  static std::atomic<int> n{0};
  return "val_" + stem + "_" + std::to_string(n++);
}

// A thread group registered for the lifetime of the object.
struct Group {
  std::string name;
  explicit Group(int world, std::chrono::milliseconds timeout = std::chrono::milliseconds(5000), const std::string& stem = "g") {
    name = unique_name(stem);
    GroupOptions opt;
    opt.timeout = timeout;
    register_group(name, make_thread_group(world, opt));
  }
  ~Group() { unregister_group(name); }
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;
};

TEST(Registry, RegisterRejectsBadNames) {
  auto eps = make_thread_group(2);
  EXPECT_TRUE(raises([&] { register_group("", eps); }, Err::kInvalid, "register_group", {"name=\"\"", "length 0", "[1, 128)"}));
  EXPECT_TRUE(raises([&] { register_group(std::string(128, 'n'), eps); }, Err::kInvalid, "register_group", {"length 128"}));
  const std::string ok(127, 'n');
  EXPECT_NO_THROW(register_group(ok, eps));
  EXPECT_TRUE(group_registered(ok));
  unregister_group(ok);
  EXPECT_FALSE(group_registered(ok));
}

TEST(Registry, RegisterRejectsDuplicatesAndEmptyEndpoints) {
  const std::string name = unique_name("dup");
  register_group(name, make_thread_group(2));
  EXPECT_TRUE(raises([&] { register_group(name, make_thread_group(2)); }, Err::kInvalid, "register_group", {name, "already registered"}));
  unregister_group(name);
  EXPECT_NO_THROW(register_group(name, make_thread_group(2)));  // free again after unregister
  unregister_group(name);
  EXPECT_TRUE(raises([&] { register_group(name, {}); }, Err::kInvalid, "register_group", {name, "no endpoints"}));
  EXPECT_TRUE(raises([&] { register_group(name, {nullptr}); }, Err::kInvalid, "register_group", {name, "null endpoint"}));
  EXPECT_FALSE(group_registered(name));
}

TEST(Registry, ResolveUnknownGroupNamesWhatIsRegistered) {
  Group g(2);
  EXPECT_TRUE(raises([&] { resolve_group("val_nope", 1, "dispatch_v2"); }, Err::kInvalid, "[rank 1] dispatch_v2: ",
                     {"group \"val_nope\" is not registered", "\"" + g.name + "\""}));
}

TEST(Registry, ResolveRankOutOfRange) {
  Group g(4);
  EXPECT_TRUE(raises([&] { resolve_group(g.name, 4, "combine_v2"); }, Err::kInvalid, "[rank 4] combine_v2: ",
                     {"rank id 4 out of range for group \"" + g.name + "\" of 4 ranks"}));
  EXPECT_TRUE(raises([&] { resolve_group(g.name, -1, "combine_v2"); }, Err::kInvalid, "[rank -1] combine_v2: ", {"rank id -1 out of range"}));
  EXPECT_EQ(resolve_group(g.name, 3)->rank(), 3);
  EXPECT_EQ(resolve_group(g.name, 3)->world_size(), 4);
}

TEST(Registry, SingleEndpointRankMismatch) {
  // A process of a multi-process job registers only its own endpoint; the rank passed must be its rank.
  const std::string name = unique_name("one");
  auto eps = make_thread_group(4);
  register_group(name, {eps[2]});
  EXPECT_TRUE(raises([&] { resolve_group(name, 1, "dispatch_v2"); }, Err::kInvalid, "[rank 1] dispatch_v2: ",
                     {"this process is rank 2 of group \"" + name + "\"", "must be 2"}));
  EXPECT_EQ(resolve_group(name, 2)->rank(), 2);
  unregister_group(name);
}

// The ops look the group up before anything else: one rank's call fails at once, without peers.
TEST(Registry, OpsRejectUnknownGroup) {
  Store st;
  DispatchArgs d = base_dispatch(st);
  d.group_ep = "val_not_registered";
  EXPECT_TRUE(raises([&] { dispatch_v2(d); }, Err::kInvalid, "[rank 1] dispatch_v2: ", {"group \"val_not_registered\" is not registered"}));
  CombineArgs c = base_combine(st);
  c.group_ep = "val_not_registered";
  EXPECT_TRUE(raises([&] { combine_v2(c); }, Err::kInvalid, "[rank 1] combine_v2: ", {"group \"val_not_registered\" is not registered"}));
}

TEST(Registry, OpsRejectRankOutsideGroup) {
  Group g(4);
  Store st;
  DispatchArgs d = base_dispatch(st);
  d.group_ep = g.name;
  d.ep_rank_id = 5;
  EXPECT_TRUE(raises([&] { dispatch_v2(d); }, Err::kInvalid, "[rank 5] dispatch_v2: ", {"rank id 5 out of range", "of 4 ranks"}));
}

TEST(Registry, OpsRejectRankOfOtherProcess) {
  const std::string name = unique_name("one");
  auto eps = make_thread_group(4);
  register_group(name, {eps[2]});
  Store st;
  DispatchArgs d = base_dispatch(st);
  d.group_ep = name;
  EXPECT_TRUE(raises([&] { dispatch_v2(d); }, Err::kInvalid, "[rank 1] dispatch_v2: ", {"this process is rank 2"}));
  unregister_group(name);
}

TEST(Registry, OpsRejectWorldSizeOtherThanGroupSize) {
  Group g(4);
  Store st;
  DispatchArgs d = base_dispatch(st);
  d.group_ep = g.name;
  d.ep_world_size = 8;
  d.moe_expert_num = 16;
  EXPECT_TRUE(raises([&] { dispatch_v2(d); }, Err::kInvalid, prefix_of(1, 8, "dispatch_v2"),
                     {"ep_world_size=8 but group \"" + g.name + "\" has 4 ranks"}));
  Group g2(2);
  CombineArgs c = base_combine(st);
  c.group_ep = g2.name;
  EXPECT_TRUE(raises([&] { combine_v2(c); }, Err::kInvalid, prefix_of(1, 4, "combine_v2"), {"ep_world_size=4 but group \"" + g2.name + "\" has 2 ranks"}));
}

TEST(Registry, OpsRejectBadTpGroup) {
  Group ep(4);
  Store st;
  DispatchArgs d = base_dispatch(st);
  d.group_ep = ep.name;
  set_tp(st, d);
  d.group_tp = "val_tp_not_registered";
  EXPECT_TRUE(raises([&] { dispatch_v2(d); }, Err::kInvalid, "[rank 0] dispatch_v2: ", {"group \"val_tp_not_registered\" is not registered"}));
  Group tp4(4);
  d.group_tp = tp4.name;
  // The prefix names the EP rank (the caller's identity in its EP group), not the TP rank.
  EXPECT_TRUE(raises([&] { dispatch_v2(d); }, Err::kInvalid, "[rank 1/4] dispatch_v2: ", {"tp_world_size=2 but group \"" + tp4.name + "\" has 4 ranks"}));
}

// ================================================================================================
// End to end on thread ranks: failures must reach every rank at once, naming the culprit.

// Rank r's tokens: (3, 16) bf16, values depend on (r, t, h); ids as in the baseline, shifted by r.
struct RankInputs {
  std::vector<uint16_t> x;
  std::vector<int32_t> ids;
  std::vector<float> w;
  explicit RankInputs(int r, int BS = 3, int H = 16) {
    for (int t = 0; t < BS; ++t)
      for (int h = 0; h < H; ++h) x.push_back(core::float_to_bf16(static_cast<float>((r * 5 + t * 3 + h) % 11 - 5) / 8.0f));
    for (int t = 0; t < BS; ++t) {
      ids.push_back((r + 2 * t) % 8);
      ids.push_back((r + 2 * t + 3) % 8);
      w.push_back(0.25f);
      w.push_back(0.5f);
    }
  }
  DispatchArgs args(const std::string& group, int r, int W = 4, int E = 8) const {
    DispatchArgs a;
    const int64_t BS = static_cast<int64_t>(ids.size() / 2);
    a.x = TensorView(x.data(), kBf16, {BS, static_cast<int64_t>(x.size()) / std::max<int64_t>(BS, 1)});
    a.expert_ids = TensorView(ids.data(), DType::kInt32, {BS, 2});
    a.expert_scales = TensorView(w.data(), DType::kFloat32, {BS, 2});
    a.group_ep = group;
    a.ep_world_size = W;
    a.ep_rank_id = r;
    a.moe_expert_num = E;
    return a;
  }
};

CombineArgs combine_args_from(const DispatchArgs& d, const DispatchResult& r) {
  CombineArgs a;
  a.expand_x = r.expand_x;
  a.expert_ids = d.expert_ids;
  a.assist_info_for_combine = r.assist_info_for_combine;
  a.ep_send_counts = r.ep_recv_counts;
  a.expert_scales = d.expert_scales;
  a.group_ep = d.group_ep;
  a.ep_world_size = d.ep_world_size;
  a.ep_rank_id = d.ep_rank_id;
  a.moe_expert_num = d.moe_expert_num;
  a.global_bs = d.global_bs;
  return a;
}

enum class Outcome { kOk, kInvalid, kUnsupported, kTimeout, kTransport, kOther };
const char* outcome_name(Outcome o) {
  switch (o) {
    case Outcome::kOk: return "no error";
    case Outcome::kInvalid: return "InvalidArgument";
    case Outcome::kUnsupported: return "Unsupported";
    case Outcome::kTimeout: return "Timeout";
    case Outcome::kTransport: return "TransportError";
    case Outcome::kOther: return "other exception";
  }
  return "?";
}

struct Result {
  Outcome outcome = Outcome::kOther;
  std::string message;
  double seconds = 0;
};

// Runs fn on this thread, classifying how it ended and how long it took.
Result observe(const std::function<void()>& fn) {
  Result r;
  const auto t0 = Clock::now();
  try {
    fn();
    r.outcome = Outcome::kOk;
  } catch (const Timeout& e) {  // before TransportError: Timeout is one
    r.outcome = Outcome::kTimeout;
    r.message = e.what();
  } catch (const TransportError& e) {
    r.outcome = Outcome::kTransport;
    r.message = e.what();
  } catch (const Unsupported& e) {
    r.outcome = Outcome::kUnsupported;
    r.message = e.what();
  } catch (const InvalidArgument& e) {
    r.outcome = Outcome::kInvalid;
    r.message = e.what();
  } catch (const std::exception& e) {
    r.message = e.what();
  }
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return r;
}

::testing::AssertionResult ended(const Result& r, Outcome want, const std::vector<std::string>& needles, double max_seconds) {
  if (r.outcome != want)
    return ::testing::AssertionFailure() << "got " << outcome_name(r.outcome) << " (expected " << outcome_name(want) << "): " << r.message;
  for (const auto& n : needles)
    if (r.message.find(n) == std::string::npos) return ::testing::AssertionFailure() << "message lacks \"" << n << "\": " << r.message;
  if (r.seconds >= max_seconds) return ::testing::AssertionFailure() << "took " << r.seconds << " s (limit " << max_seconds << " s): " << r.message;
  return ::testing::AssertionSuccess();
}

TEST(PeerFailure, DispatchRankRejectsItsCall) {
  Group g(4, std::chrono::milliseconds(5000), "dfail");
  std::vector<RankInputs> in;
  for (int r = 0; r < 4; ++r) in.emplace_back(r);
  in[2].ids[2] = 8;  // rank 2, token 1, k 0: out of range
  std::vector<Result> res(4);
  run_ranks(4, [&](int r) { res[static_cast<size_t>(r)] = observe([&] { dispatch_v2(in[static_cast<size_t>(r)].args(g.name, r)); }); });
  EXPECT_TRUE(ended(res[2], Outcome::kInvalid, {"[rank 2/4] dispatch_v2: ", "expert_ids[1][0]=8 out of range"}, 2.0));
  for (int r : {0, 1, 3}) {
    EXPECT_TRUE(ended(res[static_cast<size_t>(r)], Outcome::kTransport, {"[rank " + std::to_string(r) + "/4] ", "dispatch_v2", "rank 2", "expert_ids"}, 2.0))
        << "rank " << r;
  }
  // The group stays usable: the next, valid call succeeds on every rank.
  in[2] = RankInputs(2);
  std::vector<Result> again(4);
  run_ranks(4, [&](int r) { again[static_cast<size_t>(r)] = observe([&] { dispatch_v2(in[static_cast<size_t>(r)].args(g.name, r)); }); });
  for (int r = 0; r < 4; ++r) EXPECT_TRUE(ended(again[static_cast<size_t>(r)], Outcome::kOk, {}, 2.0)) << "rank " << r;
}

TEST(PeerFailure, CombineRankRejectsItsCall) {
  Group g(4, std::chrono::milliseconds(5000), "cfail");
  std::vector<RankInputs> in;
  for (int r = 0; r < 4; ++r) in.emplace_back(r);
  std::vector<DispatchArgs> da;
  for (int r = 0; r < 4; ++r) da.push_back(in[static_cast<size_t>(r)].args(g.name, r));
  std::vector<DispatchResult> dr(4);
  run_ranks(4, [&](int r) { dr[static_cast<size_t>(r)] = dispatch_v2(da[static_cast<size_t>(r)]); });
  std::vector<CombineArgs> ca;
  for (int r = 0; r < 4; ++r) ca.push_back(combine_args_from(da[static_cast<size_t>(r)], dr[static_cast<size_t>(r)]));
  std::vector<float> bad(9, 0.5f);
  ca[1].expert_scales = TensorView(bad.data(), DType::kFloat32, {3, 3});
  std::vector<Result> res(4);
  run_ranks(4, [&](int r) { res[static_cast<size_t>(r)] = observe([&] { combine_v2(ca[static_cast<size_t>(r)]); }); });
  EXPECT_TRUE(ended(res[1], Outcome::kInvalid, {"[rank 1/4] combine_v2: ", "expert_scales has shape (3, 3)"}, 2.0));
  for (int r : {0, 2, 3})
    EXPECT_TRUE(ended(res[static_cast<size_t>(r)], Outcome::kTransport, {"[rank " + std::to_string(r) + "/4] ", "combine_v2", "rank 1", "expert_scales"}, 2.0))
        << "rank " << r;
  // A valid retry on the same group succeeds.
  ca[1].expert_scales = da[1].expert_scales;
  std::vector<Result> again(4);
  run_ranks(4, [&](int r) { again[static_cast<size_t>(r)] = observe([&] { combine_v2(ca[static_cast<size_t>(r)]); }); });
  for (int r = 0; r < 4; ++r) EXPECT_TRUE(ended(again[static_cast<size_t>(r)], Outcome::kOk, {}, 2.0)) << "rank " << r;
}

// A bad performance_info on one rank, through the ops: that rank raises InvalidArgument naming it, its
// shape and what is allowed; its peers a TransportError naming the rank at once; the rejected tensor
// is not written; the group stays usable.
TEST(PeerFailure, RankWithBadPerformanceInfo) {
  Group g(4, std::chrono::milliseconds(5000), "perfbad");
  std::vector<RankInputs> in;
  for (int r = 0; r < 4; ++r) in.emplace_back(r);
  std::vector<std::vector<int64_t>> perf(4, std::vector<int64_t>(4, 5));
  std::vector<DispatchArgs> da;
  for (int r = 0; r < 4; ++r) {
    da.push_back(in[static_cast<size_t>(r)].args(g.name, r));
    da.back().performance_info = TensorView(perf[static_cast<size_t>(r)].data(), DType::kInt64, {4});
  }
  da[3].performance_info = TensorView(perf[3].data(), DType::kInt64, {2, 2});
  std::vector<Result> res(4);
  run_ranks(4, [&](int r) { res[static_cast<size_t>(r)] = observe([&] { dispatch_v2(da[static_cast<size_t>(r)]); }); });
  EXPECT_TRUE(ended(res[3], Outcome::kInvalid, {"[rank 3/4] dispatch_v2: ", "performance_info has shape (2, 2) (must be (ep_world_size,) = (4,))"}, 2.0));
  for (int r : {0, 1, 2})
    EXPECT_TRUE(ended(res[static_cast<size_t>(r)], Outcome::kTransport, {"[rank " + std::to_string(r) + "/4] ", "dispatch_v2", "rank 3", "performance_info"}, 2.0))
        << "rank " << r;
  // The rejected tensor is not written; the peers' may hold waits of the failed call, only added.
  EXPECT_EQ(perf[3], std::vector<int64_t>(4, 5));
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(perf[static_cast<size_t>(r)][static_cast<size_t>(r)], 5) << "rank " << r;
    for (int j = 0; j < 4; ++j) EXPECT_GE(perf[static_cast<size_t>(r)][static_cast<size_t>(j)], 5) << "rank " << r;
  }
  // Valid everywhere: the group is usable, and the op adds to what the tensor held (never subtracts).
  da[3].performance_info = TensorView(perf[3].data(), DType::kInt64, {4});
  std::vector<DispatchResult> dr(4);
  run_ranks(4, [&](int r) { dr[static_cast<size_t>(r)] = dispatch_v2(da[static_cast<size_t>(r)]); });
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(perf[static_cast<size_t>(r)][static_cast<size_t>(r)], 5) << "rank " << r << ": a rank never waits for itself";
    for (int j = 0; j < 4; ++j) EXPECT_GE(perf[static_cast<size_t>(r)][static_cast<size_t>(j)], 5) << "rank " << r;
  }
  // combine_v2 with a float32 performance_info on rank 0.
  std::vector<CombineArgs> ca;
  for (int r = 0; r < 4; ++r) ca.push_back(combine_args_from(da[static_cast<size_t>(r)], dr[static_cast<size_t>(r)]));
  std::vector<float> fbad(4, 0.f);
  ca[0].performance_info = TensorView(fbad.data(), DType::kFloat32, {4});
  run_ranks(4, [&](int r) { res[static_cast<size_t>(r)] = observe([&] { combine_v2(ca[static_cast<size_t>(r)]); }); });
  EXPECT_TRUE(ended(res[0], Outcome::kInvalid, {"[rank 0/4] combine_v2: ", "performance_info has dtype float32 (must be int64)"}, 2.0));
  for (int r : {1, 2, 3})
    EXPECT_TRUE(ended(res[static_cast<size_t>(r)], Outcome::kTransport, {"combine_v2", "rank 0", "performance_info"}, 2.0)) << "rank " << r;
}

// A null data pointer behind a shape with elements, through the op on thread ranks: the rank raises
// InvalidArgument naming the parameter (it was a SIGSEGV), its peers a TransportError naming it.
TEST(PeerFailure, NullDataIsRejectedNotDereferenced) {
  Group g(2, std::chrono::milliseconds(5000), "nulldata");
  std::vector<RankInputs> in;
  for (int r = 0; r < 2; ++r) in.emplace_back(r);
  std::vector<DispatchArgs> da;
  for (int r = 0; r < 2; ++r) da.push_back(in[static_cast<size_t>(r)].args(g.name, r, 2, 8));
  da[1].x = TensorView(nullptr, kBf16, {3, 16});
  std::vector<Result> res(2);
  run_ranks(2, [&](int r) { res[static_cast<size_t>(r)] = observe([&] { dispatch_v2(da[static_cast<size_t>(r)]); }); });
  EXPECT_TRUE(ended(res[1], Outcome::kInvalid, {"[rank 1/2] dispatch_v2: ", "x has shape (3, 16) but a null data pointer"}, 2.0));
  EXPECT_TRUE(ended(res[0], Outcome::kTransport, {"rank 1", "null data pointer"}, 2.0));
  // elastic_info with a null pointer: the rejection path reads it too (for the members to tell).
  da[1] = in[1].args(g.name, 1, 2, 8);
  da[0].elastic_info = TensorView(nullptr, DType::kInt32, {8});
  run_ranks(2, [&](int r) { res[static_cast<size_t>(r)] = observe([&] { dispatch_v2(da[static_cast<size_t>(r)]); }); });
  EXPECT_TRUE(ended(res[0], Outcome::kInvalid, {"[rank 0/2] dispatch_v2: ", "elastic_info has shape (8,) but a null data pointer"}, 2.0));
  EXPECT_TRUE(ended(res[1], Outcome::kTransport, {"rank 0", "elastic_info"}, 2.0));
}

// moe_expert_num so large that the counts of one call do not fit the transport's control message
// (64 KiB on threads and shared memory): Unsupported naming moe_expert_num, ep_world_size, the bytes
// and the largest moe_expert_num that fits, on every rank, before any byte moves (it was "moedist
// internal error, please report: ... blob of 262752 bytes > 65536"). The largest that fits runs.
TEST(PeerFailure, TooManyExpertsForTheTransportIsRefusedClearly) {
  Group g(2, std::chrono::milliseconds(5000), "bigE");
  const auto t = resolve_group(g.name, 0);
  EXPECT_EQ(t->max_blob_bytes(), 65536u);
  // W = 2, no shared ranks: the counts are W * (E / W) = E int32 after the step's header.
  const int max_e = static_cast<int>((t->max_blob_bytes() - sizeof(ops::BlobHeader)) / 4);
  for (int64_t E : {int64_t{65536}, int64_t{max_e} + 2}) {
    std::vector<RankInputs> in;
    for (int r = 0; r < 2; ++r) in.emplace_back(r);
    std::vector<Result> res(2);
    run_ranks(2, [&](int r) { res[static_cast<size_t>(r)] = observe([&] { dispatch_v2(in[static_cast<size_t>(r)].args(g.name, r, 2, static_cast<int>(E))); }); });
    for (int r = 0; r < 2; ++r)
      EXPECT_TRUE(ended(res[static_cast<size_t>(r)], Outcome::kUnsupported,
                        {"[rank " + std::to_string(r) + "/2] dispatch_v2: ", "moe_expert_num=" + std::to_string(E), "ep_world_size=2",
                         "thread transport", "65536 bytes", "moe_expert_num must be at most " + std::to_string(max_e)},
                        2.0))
          << "rank " << r << " E=" << E;
  }
  std::vector<RankInputs> in;
  for (int r = 0; r < 2; ++r) in.emplace_back(r);
  std::vector<Result> res(2);
  run_ranks(2, [&](int r) { res[static_cast<size_t>(r)] = observe([&] { dispatch_v2(in[static_cast<size_t>(r)].args(g.name, r, 2, max_e)); }); });
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(ended(res[static_cast<size_t>(r)], Outcome::kOk, {}, 5.0)) << "rank " << r << " E=" << max_e;
}

TEST(PeerFailure, RankThatNeverCallsTimesOut) {
  Group g(4, std::chrono::milliseconds(300), "never");
  std::vector<RankInputs> in;
  for (int r = 0; r < 4; ++r) in.emplace_back(r);
  std::vector<Result> res(3);
  run_ranks(3, [&](int r) { res[static_cast<size_t>(r)] = observe([&] { dispatch_v2(in[static_cast<size_t>(r)].args(g.name, r)); }); });
  for (int r = 0; r < 3; ++r) {
    EXPECT_TRUE(ended(res[static_cast<size_t>(r)], Outcome::kTimeout, {"[rank " + std::to_string(r) + "/4] dispatch_v2", "rank 3", "300 ms"}, 3.0))
        << "rank " << r;
    EXPECT_GE(res[static_cast<size_t>(r)].seconds, 0.25) << "gave up before the deadline";
  }
}

// Ranks that disagree on a parameter that must be equal everywhere: every rank fails, naming it.
struct Mismatch {
  std::string name;
  std::function<void(DispatchArgs&, Store&)> odd;  // applied to rank 1 only
  std::string param;
};
std::ostream& operator<<(std::ostream& os, const Mismatch& m) { return os << m.name; }

class UniformMismatch : public ::testing::TestWithParam<Mismatch> {};

// Four ranks call dispatch_v2 on thread groups, rank 1 with its arguments changed by `odd`.
std::vector<Result> dispatch_with_odd_rank1(const std::function<void(DispatchArgs&, Store&)>& odd) {
  Group g(4, std::chrono::milliseconds(5000), "uni");
  std::vector<RankInputs> in;
  for (int r = 0; r < 4; ++r) in.emplace_back(r);
  std::vector<Store> stores(4);
  std::vector<DispatchArgs> da;
  for (int r = 0; r < 4; ++r) da.push_back(in[static_cast<size_t>(r)].args(g.name, r));
  odd(da[1], stores[1]);
  std::vector<Result> res(4);
  run_ranks(4, [&](int r) { res[static_cast<size_t>(r)] = observe([&] { dispatch_v2(da[static_cast<size_t>(r)]); }); });
  return res;
}

TEST_P(UniformMismatch, EveryRankFailsNamingIt) {
  const std::vector<Result> res = dispatch_with_odd_rank1(GetParam().odd);
  for (int r = 0; r < 4; ++r)
    EXPECT_TRUE(ended(res[static_cast<size_t>(r)], Outcome::kInvalid, {"[rank " + std::to_string(r) + "/4] dispatch_v2", GetParam().param}, 2.0))
        << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(
    Dispatch, UniformMismatch,
    ::testing::Values(Mismatch{"GlobalBs", [](DispatchArgs& a, Store&) { a.global_bs = 16; }, "global_bs"},
                      Mismatch{"QuantMode", [](DispatchArgs& a, Store&) { a.quant_mode = 2; }, "quant_mode"},
                      Mismatch{"MoeExpertNum", [](DispatchArgs& a, Store&) { a.moe_expert_num = 16; }, "moe_expert_num"},
                      Mismatch{"TopK",
                               [](DispatchArgs& a, Store& st) {
                                 a.expert_ids = st.i32({0, 1, 2}, {3, 1});
                                 a.expert_scales = st.f32({1, 1, 1}, {3, 1});
                               },
                               "(K)"},
                      Mismatch{"HiddenSize", [](DispatchArgs& a, Store& st) { a.x = st.half(kBf16, 3, 32); }, "hidden size H"},
                      Mismatch{"BatchSizeWithoutGlobalBs",
                               [](DispatchArgs& a, Store& st) {
                                 a.x = st.half(kBf16, 2, 16);
                                 a.expert_ids = st.i32({1, 2, 3, 4}, {2, 2});
                                 a.expert_scales = st.f32({1, 1, 1, 1}, {2, 2});
                               },
                               "BS"},
                      Mismatch{"Dtype", [](DispatchArgs& a, Store& st) { a.x = st.half(kFp16, 3, 16); }, "dtype"}),
    [](const ::testing::TestParamInfo<Mismatch>& i) { return i.param.name; });

// The token dtypes are named, not shown as numbers.
TEST(UniformMismatchMessage, NamesTheDtypes) {
  const std::vector<Result> res = dispatch_with_odd_rank1([](DispatchArgs& a, Store& st) { a.x = st.half(kFp16, 3, 16); });
  EXPECT_TRUE(ended(res[1], Outcome::kInvalid, {"dtype of the token data=float16 but rank 0 passed bfloat16"}, 2.0));
  for (int r : {0, 2, 3})
    EXPECT_TRUE(ended(res[static_cast<size_t>(r)], Outcome::kInvalid, {"dtype of the token data=bfloat16 but rank 1 passed float16"}, 2.0))
        << "rank " << r;
}

// ================================================================================================
// A two-rank case worked out by hand.
//
// W = 2, E = 2 (expert e on rank e, L = 1), K = 2 (every token goes to both ranks), BS = 2, H = 4, bf16.
//   rank 0: x = [[1, 2, 0.5, -1], [3, -2, 0.25, 4]]       ids = [[0, 1], [1, 0]]
//   rank 1: x = [[-1, 0.5, 2, 8], [0.125, 1, -3, 0.75]]   ids = [[1, 0], [0, 1]]
// Each rank receives, in order (local expert 0, then source rank, then token):
//   (src 0, t 0), (src 0, t 1), (src 1, t 0), (src 1, t 1)
// so expand_x is the same four rows on both ranks; the k of each row differs:
//   rank 0 (expert 0): k = 0, 1, 1, 0        rank 1 (expert 1): k = 1, 0, 0, 1
// ep_recv_counts = [2, 4] (inclusive prefix over source ranks), expert_token_nums = [4],
// A = global_bs * min(L, K) = 4 rows, assist_info length max(BS*K, 128*A) = 512.
// The gating weights (also passed to dispatch, so expand_scales carries them):
//   rank 0: [[0.25, 0.75], [0.5, 0.5]]      rank 1: [[0.75, 0.25], [1.0, 0.5]]
// Expert 0 (rank 0) computes y = 2x, expert 1 (rank 1) computes y = -x (different, so that a
// mixed-up k would show). combine: out[t] = sum_k w[t][k] * y_k(t), k ascending:
//   rank 0 t0: 0.25*(2x) + 0.75*(-x) = -0.25x = [-0.25, -0.5, -0.125, 0.25]
//   rank 0 t1: 0.5*(-x)  + 0.5*(2x)  =  0.5x  = [1.5, -1, 0.125, 2]
//   rank 1 t0: 0.75*(-x) + 0.25*(2x) = -0.25x = [0.25, -0.125, -0.5, -2]
//   rank 1 t1: 1.0*(2x)  + 0.5*(-x)  =  1.5x  = [0.1875, 1.5, -4.5, 1.125]
// Every number is exact in bf16 and every partial sum exact in fp32.

struct HandCase {
  std::vector<std::vector<float>> x = {{1, 2, 0.5f, -1, 3, -2, 0.25f, 4}, {-1, 0.5f, 2, 8, 0.125f, 1, -3, 0.75f}};
  std::vector<std::vector<int32_t>> ids = {{0, 1, 1, 0}, {1, 0, 0, 1}};
  std::vector<std::vector<float>> w = {{0.25f, 0.75f, 0.5f, 0.5f}, {0.75f, 0.25f, 1.0f, 0.5f}};
  // Dispatch, expected.
  std::vector<float> rows = {1, 2, 0.5f, -1, 3, -2, 0.25f, 4, -1, 0.5f, 2, 8, 0.125f, 1, -3, 0.75f};
  std::vector<std::vector<int32_t>> assist = {{0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0}, {0, 0, 1, 0, 1, 0, 1, 0, 0, 1, 1, 1}};
  std::vector<std::vector<float>> expand_scales = {{0.25f, 0.5f, 0.25f, 1.0f}, {0.75f, 0.5f, 0.75f, 0.5f}};
  std::vector<int32_t> ep_recv_counts = {2, 4};
  std::vector<int64_t> expert_token_nums = {4};
  // Combine input: the expert outputs (rank 0: 2 * rows, rank 1: -rows), written out.
  std::vector<std::vector<float>> y = {{2, 4, 1, -2, 6, -4, 0.5f, 8, -2, 1, 4, 16, 0.25f, 2, -6, 1.5f},
                                       {-1, -2, -0.5f, 1, -3, 2, -0.25f, -4, 1, -0.5f, -2, -8, -0.125f, -1, 3, -0.75f}};
  // Combine, expected.
  std::vector<std::vector<float>> out = {{-0.25f, -0.5f, -0.125f, 0.25f, 1.5f, -1, 0.125f, 2},
                                         {0.25f, -0.125f, -0.5f, -2, 0.1875f, 1.5f, -4.5f, 1.125f}};

  // Storage behind the views.
  std::vector<std::vector<uint16_t>> xb, yb;
  std::vector<int32_t> counts = {2, 4};

  HandCase() {
    for (int r = 0; r < 2; ++r) {
      xb.push_back(to_bf16(x[static_cast<size_t>(r)]));
      yb.push_back(to_bf16(y[static_cast<size_t>(r)]));
    }
  }
  static std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
    std::vector<uint16_t> o;
    for (float f : v) {
      o.push_back(core::float_to_bf16(f));
      EXPECT_EQ(core::bf16_to_float(o.back()), f) << "hand value not exact in bf16";
    }
    return o;
  }
  DispatchArgs dispatch_args(int r, const std::string& group) const {
    DispatchArgs a;
    a.x = TensorView(xb[static_cast<size_t>(r)].data(), kBf16, {2, 4});
    a.expert_ids = TensorView(ids[static_cast<size_t>(r)].data(), DType::kInt32, {2, 2});
    a.expert_scales = TensorView(w[static_cast<size_t>(r)].data(), DType::kFloat32, {2, 2});
    a.group_ep = group;
    a.ep_world_size = 2;
    a.ep_rank_id = r;
    a.moe_expert_num = 2;
    return a;
  }
  CombineArgs combine_args(int r, const std::string& group) const {
    CombineArgs a;
    a.expand_x = TensorView(yb[static_cast<size_t>(r)].data(), kBf16, {4, 4});
    a.expert_ids = TensorView(ids[static_cast<size_t>(r)].data(), DType::kInt32, {2, 2});
    a.assist_info_for_combine = TensorView(assist[static_cast<size_t>(r)].data(), DType::kInt32, {12});
    a.ep_send_counts = TensorView(counts.data(), DType::kInt32, {2});
    a.expert_scales = TensorView(w[static_cast<size_t>(r)].data(), DType::kFloat32, {2, 2});
    a.group_ep = group;
    a.ep_world_size = 2;
    a.ep_rank_id = r;
    a.moe_expert_num = 2;
    return a;
  }

  void check_dispatch(const DispatchResult& d, int r, const std::string& who) const {
    SCOPED_TRACE(who + " rank " + std::to_string(r));
    ASSERT_EQ(d.expand_x.dtype(), kBf16);
    ASSERT_EQ(d.expand_x.shape(), (std::vector<int64_t>{4, 4}));
    for (int i = 0; i < 16; ++i) EXPECT_EQ(core::bf16_to_float(d.expand_x.data_as<uint16_t>()[i]), rows[static_cast<size_t>(i)]) << "expand_x element " << i;
    ASSERT_EQ(d.assist_info_for_combine.shape(), (std::vector<int64_t>{512}));
    for (int i = 0; i < 12; ++i)
      EXPECT_EQ(d.assist_info_for_combine.data_as<int32_t>()[i], assist[static_cast<size_t>(r)][static_cast<size_t>(i)]) << "assist element " << i;
    ASSERT_EQ(d.ep_recv_counts.shape(), (std::vector<int64_t>{2}));
    for (int i = 0; i < 2; ++i) EXPECT_EQ(d.ep_recv_counts.data_as<int32_t>()[i], ep_recv_counts[static_cast<size_t>(i)]);
    ASSERT_EQ(d.expert_token_nums.shape(), (std::vector<int64_t>{1}));
    EXPECT_EQ(d.expert_token_nums.data_as<int64_t>()[0], expert_token_nums[0]);
    ASSERT_EQ(d.expand_scales.shape(), (std::vector<int64_t>{4}));
    for (int i = 0; i < 4; ++i)
      EXPECT_EQ(d.expand_scales.data_as<float>()[i], expand_scales[static_cast<size_t>(r)][static_cast<size_t>(i)]) << "expand_scales " << i;
    ASSERT_EQ(d.dynamic_scales.shape(), (std::vector<int64_t>{4}));
    EXPECT_EQ(d.tp_recv_counts.numel(), 0);
  }
  void check_combine(const Tensor& t, int r, const std::string& who) const {
    SCOPED_TRACE(who + " rank " + std::to_string(r));
    ASSERT_EQ(t.dtype(), kBf16);
    ASSERT_EQ(t.shape(), (std::vector<int64_t>{2, 4}));
    for (int i = 0; i < 8; ++i)
      EXPECT_EQ(core::bf16_to_float(t.data_as<uint16_t>()[i]), out[static_cast<size_t>(r)][static_cast<size_t>(i)]) << "out element " << i;
  }
};

TEST(HandChecked, TwoRanksReference) {
  HandCase h;
  std::vector<DispatchArgs> da = {h.dispatch_args(0, "unused"), h.dispatch_args(1, "unused")};
  std::vector<DispatchResult> dr = reference::dispatch_v2(da);
  ASSERT_EQ(dr.size(), 2u);
  for (int r = 0; r < 2; ++r) h.check_dispatch(dr[static_cast<size_t>(r)], r, "reference");
  std::vector<CombineArgs> ca = {h.combine_args(0, "unused"), h.combine_args(1, "unused")};
  std::vector<Tensor> out = reference::combine_v2(ca);
  ASSERT_EQ(out.size(), 2u);
  for (int r = 0; r < 2; ++r) h.check_combine(out[static_cast<size_t>(r)], r, "reference");
}

TEST(HandChecked, TwoRanksThreads) {
  HandCase h;
  Group g(2, std::chrono::milliseconds(5000), "hand");
  std::vector<DispatchResult> dr(2);
  run_ranks(2, [&](int r) { dr[static_cast<size_t>(r)] = dispatch_v2(h.dispatch_args(r, g.name)); });
  for (int r = 0; r < 2; ++r) h.check_dispatch(dr[static_cast<size_t>(r)], r, "threads");
  std::vector<Tensor> out(2);
  run_ranks(2, [&](int r) { out[static_cast<size_t>(r)] = combine_v2(h.combine_args(r, g.name)); });
  for (int r = 0; r < 2; ++r) h.check_combine(out[static_cast<size_t>(r)], r, "threads");
  // The same combine fed with dispatch's own outputs (assist_info, counts) gives the same result.
  std::vector<Tensor> out2(2);
  run_ranks(2, [&](int r) {
    CombineArgs a = h.combine_args(r, g.name);
    a.assist_info_for_combine = dr[static_cast<size_t>(r)].assist_info_for_combine;
    a.ep_send_counts = dr[static_cast<size_t>(r)].ep_recv_counts;
    a.expand_scales = dr[static_cast<size_t>(r)].expand_scales;
    out2[static_cast<size_t>(r)] = combine_v2(a);
  });
  for (int r = 0; r < 2; ++r) h.check_combine(out2[static_cast<size_t>(r)], r, "threads, dispatch outputs");
}

}  // namespace
}  // namespace moedist::test
