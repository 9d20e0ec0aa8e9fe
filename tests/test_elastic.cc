// elastic_info from the failed ranks, and expert ids moved to the compact layout: the worked example,
// agreement with the tables the conformance cases run (bit-exact against the reference), and errors.
#include <gtest/gtest.h>

#include "harness.h"

namespace moedist::test {
namespace {

TEST(ElasticInfo, WorkedExample) {
  // alive [T, F, T, T], no shared-expert ranks, 8 local experts
  EXPECT_EQ(make_elastic_info({0, 1, 0, 0}, 0, 8), (std::vector<int32_t>{1, 3, 0, 24, 0, -1, 1, 2, 0, 2, 3, -1}));
}

TEST(ElasticInfo, SharedExpertRanksStayFirst) {
  // W 5, Sr 2 (shared_expert_num 1), L 3; ranks 0 (shared) and 3 fail
  EXPECT_EQ(make_elastic_info({1, 0, 0, 1, 0}, 2, 3),
            (std::vector<int32_t>{1, 3, 1, 6, -1, 0, 1, -1, 2, 1, 2, 4, -1, -1}));
}

TEST(ElasticInfo, SameTablesAsTheConformanceCases) {
  // The conformance suite runs these layouts bit-exact against the reference; the helper must build
  // exactly their elastic_info.
  struct L {
    int W, E, Sr, shared_num;
    std::vector<int> removed;
    int Sr_after;  // the shared-expert ranks left (failed ones are not replaced)
  };
  for (const L& l : {L{4, 8, 0, 1, {2}, 0}, L{5, 8, 1, 1, {0}, 0}, L{6, 8, 2, 2, {3, 4}, 2}, L{8, 16, 0, 1, {0, 7}, 0}, L{5, 6, 2, 1, {1, 3}, 1}}) {
    Case c;
    c.W = l.W;
    c.E = l.E;
    c.Sr = l.Sr;
    c.shared_num = l.shared_num;
    c.removed = l.removed;
    c.Sr_after = l.Sr_after;
    c.K = 2;
    auto P = prepare(c, "el_");
    std::vector<int32_t> failed(static_cast<size_t>(l.W), 0);
    for (int r : l.removed) failed[static_cast<size_t>(r)] = 1;
    EXPECT_EQ(make_elastic_info(failed, l.Sr, l.E / (l.W - l.Sr), l.shared_num), elastic_info_of(*P, 0)) << case_name(c);
  }
}

TEST(ElasticInfo, RefusesLayoutsTheOpsRefuse) {
  auto msg = [](auto fn) {
    try {
      fn();
    } catch (const InvalidArgument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(msg([] { make_elastic_info({0, 1, 1}, 1, 2); }).find("no MoE rank is left"), std::string::npos);
  EXPECT_NE(msg([] { make_elastic_info({0, 1, 0, 0, 0}, 2, 2, 2); }).find("not a multiple of shared_expert_num=2"), std::string::npos);
  EXPECT_NE(msg([] { make_elastic_info({0, 0}, 2, 2); }).find("shared_expert_rank_num=2"), std::string::npos);
  EXPECT_NE(msg([] { make_elastic_info({0, 0}, 0, 0); }).find("local_expert_num=0"), std::string::npos);
}

TEST(RemapExpertIds, MovesExpertsWithTheirRanks) {
  // W 4, L 2: experts 0,1 on rank 0; 2,3 on rank 1 (failed); 4,5 on rank 2; 6,7 on rank 3; 8 is special
  const std::vector<int32_t> failed = {0, 1, 0, 0};
  EXPECT_EQ(remap_expert_ids({0, 1, 4, 5, 6, 7, 8, 9}, failed, 0, 2), (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 8, 9}));
  try {
    remap_expert_ids({0, 3}, failed, 0, 2);
    FAIL() << "an expert of a failed rank was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("ids[1]=3 is an expert of rank 1, which failed"), std::string::npos) << e.what();
  }
  EXPECT_EQ(remap_expert_ids({0, 3}, failed, 0, 2, {{3, 7}}), (std::vector<int32_t>{0, 5}));
  EXPECT_THROW(remap_expert_ids({2}, failed, 0, 2, {{2, 3}}), InvalidArgument);  // the replacement died too
}

TEST(RemapExpertIds, WithSharedExpertRanks) {
  // W 4, Sr 1, L 2: MoE experts 0,1 on rank 1; 2,3 on rank 2 (failed); 4,5 on rank 3
  EXPECT_EQ(remap_expert_ids({0, 5, 4, 1}, {0, 0, 1, 0}, 1, 2), (std::vector<int32_t>{0, 3, 2, 1}));
}

}  // namespace
}  // namespace moedist::test
