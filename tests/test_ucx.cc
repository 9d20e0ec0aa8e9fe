// The UCX transport (make_ucx_group): processes forked from the test, split into hosts by the host
// layout passed to the bootstrap (shared memory inside a "host", UCX between them); what UCX itself uses
// between processes of one machine is its choice (UCX_TLS: ctest runs the suite once as UCX likes and
// once with UCX_TLS=tcp, so that the data takes the network stack). The bootstrap's allgather runs over
// a shared-memory group of all ranks, as a launcher's store would. Across real hosts (network
// namespaces) the Python suite runs under torchrun (tests/python/multihost).
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <numeric>

#include "cases.h"
#include "harness.h"
#include "moedist/moedist.h"

namespace moedist::test {
namespace {

// An allgather over a shared-memory group of every rank (in rounds of the group's largest blob).
std::function<std::vector<std::string>(const std::string&)> shm_allgather(std::shared_ptr<Transport> t) {
  return [t](const std::string& mine) {
    const int W = t->world_size();
    std::vector<int> members(static_cast<size_t>(W));
    std::iota(members.begin(), members.end(), 0);
    auto round = [&](const void* blob, size_t bytes, std::vector<unsigned char>& out) {
      out.assign(static_cast<size_t>(W) * bytes, 0);
      ExchangeSpec spec;
      spec.op = "allgather";
      spec.members = members;
      spec.blob = blob;
      spec.blob_bytes = bytes;
      spec.blobs_out = out.data();
      t->exchange(spec);
    };
    const uint64_t len = mine.size();
    std::vector<unsigned char> raw;
    round(&len, sizeof(len), raw);
    std::vector<uint64_t> lens(static_cast<size_t>(W));
    std::memcpy(lens.data(), raw.data(), 8 * lens.size());
    const uint64_t longest = *std::max_element(lens.begin(), lens.end());
    std::vector<std::string> all(static_cast<size_t>(W));
    const size_t B = std::min<size_t>(t->max_blob_bytes(), 4096);
    std::vector<unsigned char> out, piece(B);
    for (size_t at = 0; at < longest; at += B) {
      std::memset(piece.data(), 0, B);
      if (at < mine.size()) std::memcpy(piece.data(), mine.data() + at, std::min(B, mine.size() - at));
      round(piece.data(), B, out);
      for (int r = 0; r < W; ++r) {
        const uint64_t n = lens[static_cast<size_t>(r)];
        if (at < n) all[static_cast<size_t>(r)].append(reinterpret_cast<const char*>(out.data()) + r * B, std::min<size_t>(B, n - at));
      }
    }
    return all;
  };
}

std::vector<int> hosts_of(int W, int nhosts) {
  const int per = (W + nhosts - 1) / nhosts;
  std::vector<int> h(static_cast<size_t>(W));
  for (int r = 0; r < W; ++r) h[static_cast<size_t>(r)] = r / per;
  return h;
}

MakeEp ucx_maker(int nhosts) {
  return [nhosts](int W, int r, const GroupOptions& opt, const std::string& job) {
    auto boot = make_shm_group("boot", W, r, opt, job);
    UcxBootstrap b;
    b.rank = r;
    b.world_size = W;
    b.host_of = hosts_of(W, nhosts);
    b.job = job;
    b.allgather = shm_allgather(boot);
    auto t = make_ucx_group(b, opt);
    EXPECT_EQ(t->name(), "ucx");
    return t;
  };
}

struct UcxCase {
  Case c;
  int hosts;
};

std::vector<UcxCase> ucx_cases() {
  std::vector<UcxCase> v;
  for (const Case& c : cases()) {
    if (c.dtype != DType::kBFloat16) continue;  // the transport moves bytes whatever the dtype
    v.push_back({c, 2});
    if (c.W >= 6) v.push_back({c, 3});
  }
  return v;
}

class ConformanceUcx : public ::testing::TestWithParam<UcxCase> {};

TEST_P(ConformanceUcx, MatchesReferenceBitForBit) {
  if (!ucx_available()) GTEST_SKIP() << "built without UCX";
  EXPECT_EQ(run_case_procs(GetParam().c, ucx_maker(GetParam().hosts)), "");
}

INSTANTIATE_TEST_SUITE_P(Ucx, ConformanceUcx, ::testing::ValuesIn(ucx_cases()), [](const ::testing::TestParamInfo<UcxCase>& info) {
  return case_name(info.param.c) + "_" + std::to_string(info.param.hosts) + "hosts_" + std::to_string(info.index);
});

// A rank on another host that dies: its peers' calls fail naming it (within the group's timeout at the
// latest; at once where UCX sees the connection break). It dies after a round every rank completed and
// a barrier behind it, so that no rank is still reading what it sent when it goes.
TEST(UcxGroup, ADeadRankOnAnotherHostIsNamed) {
  if (!ucx_available()) GTEST_SKIP() << "built without UCX";
  Case c;
  c.W = 4;
  c.E = 8;
  c.K = 4;
  c.BS = 8;
  c.H = 64;
  const std::string result = run_processes(c.W, [&](int r) -> std::string {
    GroupOptions opt;
    opt.timeout = std::chrono::milliseconds(8000);
    const std::string job = "ucxdead" + std::to_string(getppid());
    auto barrier_group = make_shm_group("barrier", c.W, r, opt, job);
    register_group("dead_ep0", {ucx_maker(2)(c.W, r, opt, job)});
    auto P = prepare(c, "dead_");
    const auto idx = static_cast<size_t>(r);
    std::string diff = check_dispatch(*P, r, dispatch_v2(P->dargs[idx]));
    if (diff.empty()) diff = check_combine(*P, r, combine_v2(P->cargs[idx]));
    if (!diff.empty()) return diff;
    shm_allgather(barrier_group)("");
    if (r == 3) raise(SIGKILL);
    try {
      dispatch_v2(P->dargs[idx]);
    } catch (const Error& e) {
      const std::string what = e.what();
      if (what.find("rank 3") == std::string::npos) return "rank " + std::to_string(r) + ": the error does not name rank 3: " + what;
      return "";
    }
    return "rank " + std::to_string(r) + ": dispatch returned although rank 3 was dead";
  }, 90, {0, 0, 0, SIGKILL});
  EXPECT_EQ(result, "");
}

TEST(UcxGroup, BootstrapArgumentsAreChecked) {
  if (!ucx_available()) GTEST_SKIP() << "built without UCX";
  auto gather = [](const std::string& s) { return std::vector<std::string>{s}; };
  auto expect = [](const UcxBootstrap& b, const GroupOptions& o, const std::string& part) {
    try {
      make_ucx_group(b, o);
      ADD_FAILURE() << "accepted; expected an error containing " << part;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  UcxBootstrap b;
  b.rank = 0;
  b.world_size = 1;
  b.host_of = {0};
  b.job = "j";
  b.allgather = gather;
  GroupOptions o;
  { UcxBootstrap x = b; x.world_size = 0; expect(x, o, "world_size=0"); }
  { UcxBootstrap x = b; x.rank = 1; expect(x, o, "rank=1"); }
  { UcxBootstrap x = b; x.host_of = {0, 1}; expect(x, o, "host_of has 2 entries"); }
  { UcxBootstrap x = b; x.job = ""; expect(x, o, "job=\"\""); }
  { UcxBootstrap x = b; x.allgather = nullptr; expect(x, o, "allgather is empty"); }
  { GroupOptions x = o; x.ranks_per_server = -1; expect(b, x, "ranks_per_server=-1"); }
  {
    UcxBootstrap x = b;
    x.world_size = 3;
    x.host_of = {0, 1, 0};
    expect(x, o, "consecutive, equal blocks");
  }
  {
    UcxBootstrap x = b;
    x.allgather = [](const std::string&) { return std::vector<std::string>{"a", "b"}; };
    expect(x, o, "allgather returned 2 entries");
  }
}

}  // namespace
}  // namespace moedist::test
