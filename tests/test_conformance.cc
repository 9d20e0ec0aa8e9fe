// The conformance suite: every feature alone and in combination, over world sizes 2, 3, 4, 8, 16,
// both dtypes; the ops on in-process ranks must match the reference bit for bit.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "cases.h"
#include "core/half.h"
#include "harness.h"
#include "moedist/reference.h"
#include "transport/window/window_engine.h"

namespace moedist::test {
namespace {

class Conformance : public ::testing::TestWithParam<Case> {};

TEST_P(Conformance, MatchesReferenceBitForBit) { EXPECT_EQ(run_case(GetParam()), ""); }

INSTANTIATE_TEST_SUITE_P(Thread, Conformance, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return "Thread_" + case_name(info.param) + "_" + std::to_string(info.index);
                         });

// The same suite on processes over shared memory.
class ConformanceShm : public ::testing::TestWithParam<Case> {};

TEST_P(ConformanceShm, MatchesReferenceBitForBit) { EXPECT_EQ(run_case_shm(GetParam()), ""); }

INSTANTIATE_TEST_SUITE_P(Shm, ConformanceShm, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return "Shm_" + case_name(info.param) + "_" + std::to_string(info.index);
                         });

// Large groups, up to the largest EP sizes deployed (768 ranks): thread ranks with few tokens and a small
// H, bit for bit against the reference. The exchange must cost little per pair of ranks: it used to
// reserve two 64 KiB message slots per pair (W=768: 77 GB) and copy every member's blob on every rank.
// Under the sanitizers 768 threads take minutes: that case is skipped there (shown as skipped).
struct LargeCase {
  Case c;
  bool slow_when_sanitized = false;
};

std::vector<LargeCase> large_cases() {
  std::vector<LargeCase> v;
  for (int W : {64, 256, 768}) {
    Case c;
    c.W = W;
    c.E = W;
    c.K = 4;
    c.BS = 4;
    c.H = 16;
    v.push_back({c, W == 768});
  }
  // Features that touch every peer at 64 ranks: quantization, shared expert ranks with shared slots,
  // a mask, an elastic scale-down, the split pair, and hierarchy servers.
  Case q;
  q.W = 64;
  q.E = 124;
  q.K = 4;
  q.BS = 3;
  q.H = 32;
  q.quant = 2;
  q.Sr = 2;
  q.shared_num = 2;
  q.mask = 2;
  q.comm_quant = 2;
  v.push_back({q, false});
  Case el = q;
  el.quant = 0;
  el.comm_quant = 0;
  el.removed = {5, 40};
  el.split = true;
  v.push_back({el, false});
  Case h;
  h.W = 64;
  h.E = 128;
  h.K = 4;
  h.BS = 3;
  h.H = 16;
  h.alg = "hierarchy";
  h.ranks_per_server = 8;
  v.push_back({h, false});
  return v;
}

void PrintTo(const LargeCase& c, std::ostream* os) { *os << case_name(c.c); }

class ConformanceLarge : public ::testing::TestWithParam<LargeCase> {};

#if defined(MOEDIST_ASAN) || defined(MOEDIST_TSAN)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

TEST_P(ConformanceLarge, MatchesReferenceBitForBit) {
  if (kSanitized && GetParam().slow_when_sanitized) GTEST_SKIP() << "768 threads take minutes under the sanitizers; run in Release";
  EXPECT_EQ(run_case(GetParam().c), "");
  // The whole process (inputs, reference, 768 ranks' outputs and exchanges) stays far below what two
  // slots of 64 KiB per pair of ranks took (77 GB at 768 ranks). Peak resident memory, without the
  // sanitizers' shadow memory.
  if (!kSanitized && GetParam().c.W == 768) {
    rusage ru{};
    ASSERT_EQ(getrusage(RUSAGE_SELF, &ru), 0);
    EXPECT_LT(static_cast<double>(ru.ru_maxrss) * 1024, 2e9) << "peak resident memory " << ru.ru_maxrss << " KB";
  }
}

// What every rank reserves for the exchange protocol grows by a few cache lines per peer, not by the
// largest blob: at most 256 bytes per pair (plus the owner's status) on threads and shared memory.
TEST(LargeGroups, ControlBlockCostsLittlePerPeer) {
  for (int W : {2, 64, 768}) {
    auto group = make_thread_group(W);
    auto* engine = dynamic_cast<transport::WindowEngine*>(group[0].get());
    ASSERT_NE(engine, nullptr);
    EXPECT_LE(engine->control_block_bytes(), 4096u + 256u * static_cast<size_t>(W)) << "W=" << W;
    EXPECT_EQ(engine->max_blob_bytes(), 65536u) << "W=" << W;
  }
  const std::string job = "ctrl" + std::to_string(getpid());
  const std::string err = run_processes(2, [&](int r) -> std::string {
    auto t = make_shm_group("cb", 2, r, {}, job);
    auto* engine = dynamic_cast<transport::WindowEngine*>(t.get());
    if (!engine) return "the shm transport is not a window engine";
    if (engine->control_block_bytes() > 4096u + 2 * 256u) return "control block of " + std::to_string(engine->control_block_bytes()) + " bytes";
    return "";
  }, 60);
  EXPECT_EQ(err, "");
}

INSTANTIATE_TEST_SUITE_P(Thread, ConformanceLarge, ::testing::ValuesIn(large_cases()),
                         [](const ::testing::TestParamInfo<LargeCase>& info) {
                           return "Thread_" + case_name(info.param.c) + "_" + std::to_string(info.index);
                         });

// Processes over shared memory at 64 ranks (64 processes; small data).
TEST(ConformanceShmLarge, W64MatchesReferenceBitForBit) {
  Case c;
  c.W = 64;
  c.E = 64;
  c.K = 4;
  c.BS = 2;
  c.H = 16;
  EXPECT_EQ(run_case_shm(c), "");
}

// Non-finite token values through the ops (docs/semantics.md): dispatch quant_mode 2 and combine
// comm_quant_mode 2 on thread ranks, bit for bit against the reference. Rows: finite; a NaN; +inf
// and -inf; a NaN and an inf. H on and off the vector width. The NaN row's dynamic scale must be NaN
// (0x7fc00000) with int8 zeros, the inf row's +inf with +-127 at the infinities; in combine, the
// 8-element group holding an expert output's NaN comes back NaN.
TEST(NonFinite, QuantizedDispatchAndCombineMatchTheReference) {
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    for (int64_t H : {32, 40}) {
      const int W = 2, E = 4, K = 2, BS = 4;
      const std::string what = std::string(dtype_name(dt)) + " H=" + std::to_string(H);
      const uint16_t nan = dt == DType::kBFloat16 ? 0x7fc0 : 0x7e00;
      const uint16_t pinf = dt == DType::kBFloat16 ? 0x7f80 : 0x7c00, ninf = static_cast<uint16_t>(pinf | 0x8000);
      std::vector<std::vector<uint16_t>> x(W, std::vector<uint16_t>(static_cast<size_t>(BS * H)));
      std::vector<std::vector<int32_t>> ids(W);
      std::vector<std::vector<float>> w(W);
      for (int r = 0; r < W; ++r) {
        for (int64_t i = 0; i < BS * H; ++i)
          x[r][static_cast<size_t>(i)] = core::float_to_half(dt, static_cast<float>((i * 7 + r * 3) % 23 - 11) / 8.0f);
        x[r][static_cast<size_t>(1 * H + 5)] = nan;
        x[r][static_cast<size_t>(2 * H + 0)] = pinf;
        x[r][static_cast<size_t>(2 * H + H - 1)] = ninf;
        x[r][static_cast<size_t>(3 * H + 17)] = nan;
        x[r][static_cast<size_t>(3 * H + 3)] = pinf;
        for (int t = 0; t < BS; ++t)
          for (int k = 0; k < K; ++k) {
            ids[r].push_back((t + k + r) % E);
            w[r].push_back(0.25f * static_cast<float>(k + 1));
          }
      }
      const std::string g = "nonfinite_" + what;
      GroupOptions opt;
      opt.timeout = std::chrono::milliseconds(20000);
      register_group(g, make_thread_group(W, opt));
      std::vector<DispatchArgs> da(W);
      for (int r = 0; r < W; ++r) {
        DispatchArgs& a = da[static_cast<size_t>(r)];
        a.x = TensorView(x[r].data(), dt, {BS, H});
        a.expert_ids = TensorView(ids[r].data(), DType::kInt32, {BS, K});
        a.expert_scales = TensorView(w[r].data(), DType::kFloat32, {BS, K});
        a.group_ep = g;
        a.ep_world_size = W;
        a.ep_rank_id = r;
        a.moe_expert_num = E;
        a.quant_mode = 2;
      }
      std::vector<DispatchResult> got(W);
      run_ranks(W, [&](int r) { got[static_cast<size_t>(r)] = dispatch_v2(da[static_cast<size_t>(r)]); });
      const std::vector<DispatchResult> ref = reference::dispatch_v2(da);
      // Combine input: every received row dequantized, with a NaN put into row 0 element 9 (group 1).
      std::vector<std::vector<uint16_t>> ffn(W);
      std::vector<CombineArgs> ca(W);
      for (int r = 0; r < W; ++r) {
        const DispatchResult& d = got[static_cast<size_t>(r)];
        const int64_t rows = d.ep_recv_counts.data_as<int32_t>()[d.ep_recv_counts.numel() - 1];
        ASSERT_GT(rows, 0) << what;
        EXPECT_EQ(std::memcmp(d.expand_x.data(), ref[static_cast<size_t>(r)].expand_x.data(), static_cast<size_t>(rows * H)), 0)
            << what << " rank " << r << ": expand_x differs from the reference";
        EXPECT_EQ(std::memcmp(d.dynamic_scales.data(), ref[static_cast<size_t>(r)].dynamic_scales.data(), static_cast<size_t>(rows) * 4), 0)
            << what << " rank " << r << ": dynamic_scales differ from the reference";
        const auto* info = d.assist_info_for_combine.data_as<int32_t>();
        const auto* sc = d.dynamic_scales.data_as<float>();
        const auto* q = d.expand_x.data_as<int8_t>();
        ffn[r].assign(static_cast<size_t>(d.expand_x.shape()[0] * H), 0);
        for (int64_t i = 0; i < rows; ++i) {
          const int tok = info[3 * i + 1];
          uint32_t bits;
          std::memcpy(&bits, &sc[i], 4);
          if (tok == 1 || tok == 3) {
            EXPECT_EQ(bits, 0x7fc00000u) << what << " rank " << r << " row " << i << " (token " << tok << ")";
            for (int64_t h = 0; h < H; ++h) EXPECT_EQ(q[i * H + h], 0) << what << " row " << i << " h " << h;
          } else if (tok == 2) {
            EXPECT_EQ(bits, 0x7f800000u) << what << " rank " << r << " row " << i;
            for (int64_t h = 0; h < H; ++h) EXPECT_EQ(q[i * H + h], h == 0 ? 127 : h == H - 1 ? -127 : 0) << what << " row " << i << " h " << h;
          } else {
            EXPECT_TRUE(std::isfinite(sc[i])) << what << " row " << i;
          }
          for (int64_t h = 0; h < H; ++h) ffn[r][static_cast<size_t>(i * H + h)] = core::float_to_half(dt, static_cast<float>(q[i * H + h]) * sc[i]);
        }
        ffn[r][9] = nan;
        CombineArgs& c = ca[static_cast<size_t>(r)];
        c.expand_x = TensorView(ffn[r].data(), dt, {d.expand_x.shape()[0], H});
        c.expert_ids = da[static_cast<size_t>(r)].expert_ids;
        c.assist_info_for_combine = d.assist_info_for_combine.view();
        c.ep_send_counts = d.ep_recv_counts.view();
        c.expert_scales = da[static_cast<size_t>(r)].expert_scales;
        c.group_ep = g;
        c.ep_world_size = W;
        c.ep_rank_id = r;
        c.moe_expert_num = E;
        c.comm_quant_mode = 2;
      }
      std::vector<Tensor> cgot(W);
      run_ranks(W, [&](int r) { cgot[static_cast<size_t>(r)] = combine_v2(ca[static_cast<size_t>(r)]); });
      const std::vector<Tensor> cref = reference::combine_v2(ca);
      int nan_groups = 0;
      for (int r = 0; r < W; ++r) {
        const auto* a = cgot[static_cast<size_t>(r)].data_as<uint16_t>();
        const auto* b = cref[static_cast<size_t>(r)].data_as<uint16_t>();
        for (int64_t i = 0; i < BS * H; ++i) {
          const bool an = std::isnan(core::half_to_float(dt, a[i])), bn = std::isnan(core::half_to_float(dt, b[i]));
          EXPECT_TRUE(an == bn && (an || a[i] == b[i])) << what << " rank " << r << " combine element " << i << ": 0x" << std::hex << a[i]
                                                        << " vs reference 0x" << b[i];
        }
        // Token 0's rows are finite on both ranks; the NaN put into a row of group 1 reaches the token
        // that row belongs to, over the whole group (elements 8..15).
        for (int t = 0; t < BS; ++t) {
          bool all = true;
          for (int64_t h = 8; h < 16; ++h) all &= std::isnan(core::half_to_float(dt, a[t * H + h]));
          nan_groups += all;
        }
      }
      EXPECT_GE(nan_groups, 2) << what << ": the NaN of an expert output did not reach its tokens' group";
      unregister_group(g);
    }
  }
}

}  // namespace
}  // namespace moedist::test
