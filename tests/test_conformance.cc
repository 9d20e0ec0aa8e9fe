// The conformance suite: every feature alone and in combination, over world sizes 2, 3, 4, 8, 16,
// both dtypes; the ops on in-process ranks must match the reference bit for bit.
#include <gtest/gtest.h>

#include "cases.h"
#include "harness.h"

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

}  // namespace
}  // namespace moedist::test
