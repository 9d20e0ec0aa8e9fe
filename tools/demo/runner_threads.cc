// Thread mode: every rank is a thread of this process; the checks see every rank's state directly.
#include <condition_variable>
#include <exception>
#include <mutex>
#include <numeric>
#include <thread>

#include "checks.h"
#include "groups.h"
#include "moedist/reference.h"
#include "rank.h"
#include "report.h"
#include "runners.h"
#include "summary.h"
#include "util.h"

namespace moedist::tools::demo {

namespace {

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

// Thread mode: runs every rank on its own thread over thread groups. Returns "" or the first failure
// (in rank order), leaving aside the ranks that only stopped because of it.
static std::string run_ranks(const Layer& l, std::vector<RankState>& ranks) {
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
        run_rank(l, ranks[i], [&](Phase) { barrier.arrive_and_wait(); });
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

}  // namespace

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

}  // namespace moedist::tools::demo
