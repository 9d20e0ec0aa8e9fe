// Safety where moedist really runs: two jobs that share a job id, another user on the same host, a
// small /dev/shm (Docker's 64 MiB) and memory limits, processes killed during setup, ranks whose calls
// do not match, and combine metadata that dispatch did not produce.
#include <gtest/gtest.h>

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <regex>
#include <set>
#include <thread>

#include "harness.h"
#include "transport/shm/rendezvous.h"

#if defined(MOEDIST_ASAN) || defined(MOEDIST_TSAN)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

namespace moedist::test {
namespace {

using namespace std::chrono_literals;

std::atomic<int> g_job{0};
std::string new_job(const char* what) { return std::string(what) + std::to_string(getpid()) + "_" + std::to_string(g_job++); }

Case small_case() {
  Case c;
  c.W = 4;
  c.E = 8;
  c.K = 3;
  c.BS = 8;
  c.H = 64;
  return c;
}

std::string round_trip(Prepared& P, int r) {
  std::string d = check_dispatch(P, r, dispatch_v2(P.dargs[static_cast<size_t>(r)]));
  return d.empty() ? check_combine(P, r, combine_v2(P.cargs[static_cast<size_t>(r)])) : d;
}

std::set<std::string> dev_shm_names() {
  std::set<std::string> out;
  if (DIR* dir = opendir("/dev/shm")) {
    while (dirent* e = readdir(dir))
      if (e->d_name[0] != '.') out.insert(e->d_name);
    closedir(dir);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Isolation: a rank never silently joins a group with a process of another job.

TEST(ShmIsolation, TwoJobsWithOneJobIdFailNamingBothClaimants) {
  // Eight processes, two jobs of four ranks, one job id (as torchrun's default run id "none", or a
  // MOEDIST_JOB_ID exported in a shell, used to give). No process may complete a round; a process fails
  // naming two claimants of one rank, or, if it came so late that every other process had already failed
  // and gone, with a Timeout waiting for its rank 0, or, as the second rank 0 after the first one's group
  // had formed, saying that rank 0 is already held. At least one names both claimants.
  const Case c = small_case();
  const std::string job = new_job("same");
  std::atomic<int>* named = static_cast<std::atomic<int>*>(
      mmap(nullptr, sizeof(std::atomic<int>), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(named, MAP_FAILED);
  new (named) std::atomic<int>(0);
  const std::string err = run_processes(2 * c.W, [&](int p) -> std::string {
    const int r = p % c.W;
    GroupOptions opt;
    opt.timeout = 5s;
    try {
      register_group("s_ep0", {make_shm_group("ep0", c.W, r, opt, job)});
      std::this_thread::sleep_for(300ms);  // the other job's claims arrive while this group lives
      auto P = prepare(c, "s_");
      for (int round = 0; round < 3; ++round) {
        const std::string d = round_trip(*P, r);
        if (!d.empty()) return "round " + std::to_string(round) + ": " + d;
      }
      return "completed 3 rounds in a group formed while another job had the same job id";
    } catch (const Timeout& e) {
      const std::string m = e.what();
      return m.find("waiting for rank 0 to open the group") != std::string::npos ? "" : std::string("unexpected timeout: ") + m;
    } catch (const TransportError& e) {
      const std::string m = e.what();
      if (m.find("claimed by two processes") != std::string::npos && std::regex_search(m, std::regex("pid [0-9]+ and pid [0-9]+"))) {
        named->fetch_add(1);
        return "";
      }
      // A second rank 0 that finds the first one's group already formed (its rendezvous over, nobody
      // left to answer the claim) fails at its deadline saying what happened, without the pids.
      if (r == 0 && m.find("is already held by another process of this user: two jobs use the same job id") != std::string::npos)
        return "";
      return std::string("error without both claimants: ") + m;
    }
  }, 60);
  EXPECT_EQ(err, "");
  EXPECT_GE(named->load(), 1);
  munmap(named, sizeof(std::atomic<int>));
}

TEST(ShmIsolation, AKilledSetupDoesNotBlockALaterJob) {
  // A rank killed while it waits for its peers leaves nothing that could block the next job with the
  // same job id (torchrun restarting a job, a user re-running a command).
  const std::string job = new_job("stale");
  std::fflush(nullptr);
  const pid_t early = fork();
  if (early == 0) {
    GroupOptions opt;
    opt.timeout = 20s;
    try {
      (void)make_shm_group("ep0", 2, 0, opt, job);
    } catch (...) {
    }
    _exit(0);
  }
  std::this_thread::sleep_for(300ms);
  kill(early, SIGKILL);
  waitpid(early, nullptr, 0);
  Case c = small_case();
  c.W = 2;
  c.E = 4;
  const std::string err = run_processes(c.W, [&](int r) -> std::string {
    register_group("s_ep0", {make_shm_group("ep0", c.W, r, {}, job)});
    auto P = prepare(c, "s_");
    return round_trip(*P, r);
  }, 60);
  EXPECT_EQ(err, "");
}

// ---------------------------------------------------------------------------------------------------
// Ownership: another user can neither block a job, nor join it, nor read or write its memory.

TEST(ShmOwnership, AnotherUserCannotBlockOrJoinAJob) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root, to run a process as another user (nobody)";
  const Case c = [] {
    Case k = small_case();
    k.W = 3;
    k.E = 6;
    return k;
  }();
  const std::string job = new_job("owner");
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  std::fflush(nullptr);
  const pid_t intruder = fork();
  if (intruder == 0) {
    close(ready[0]);
    if (setgid(65534) != 0 || setuid(65534) != 0) _exit(3);
    // What the job's names were and would be: segments in /dev/shm, and the rendezvous names as root
    // sees them. The intruder takes the first rendezvous name and keeps claiming ranks at the others.
    for (int r = 0; r < c.W; ++r) {
      const int fd = shm_open(("/moedist-" + job + "-ep0-" + std::to_string(r)).c_str(), O_CREAT | O_EXCL | O_RDWR, 0666);
      if (fd >= 0) close(fd);
    }
    const int squat = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    auto fill = [&](int index) {
      const std::string name = transport::rendezvous_name(0, job, "ep0", index);
      std::memset(a.sun_path, 0, sizeof(a.sun_path));
      std::memcpy(a.sun_path + 1, name.data(), name.size());
      return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    };
    socklen_t len = fill(0);
    if (bind(squat, reinterpret_cast<sockaddr*>(&a), len) != 0 || listen(squat, 64) != 0) _exit(4);
    if (write(ready[1], "x", 1) != 1) _exit(5);
    close(ready[1]);
    const int memfd = memfd_create("intruder", 0);
    (void)ftruncate(memfd, 1 << 20);
    const auto until = std::chrono::steady_clock::now() + 4s;
    while (std::chrono::steady_clock::now() < until) {
      for (int index = 1; index < 4; ++index) {
        const int s = socket(AF_UNIX, SOCK_SEQPACKET, 0);
        len = fill(index);
        if (connect(s, reinterpret_cast<sockaddr*>(&a), len) == 0) {
          const std::vector<unsigned char> claim = transport::claim_message(job, "ep0", c.W, 1 + index % 2);
          iovec iov{const_cast<unsigned char*>(claim.data()), claim.size()};
          char ctl[CMSG_SPACE(sizeof(int))] = {};
          msghdr m{};
          m.msg_iov = &iov;
          m.msg_iovlen = 1;
          m.msg_control = ctl;
          m.msg_controllen = sizeof(ctl);
          cmsghdr* cm = CMSG_FIRSTHDR(&m);
          cm->cmsg_level = SOL_SOCKET;
          cm->cmsg_type = SCM_RIGHTS;
          cm->cmsg_len = CMSG_LEN(sizeof(int));
          std::memcpy(CMSG_DATA(cm), &memfd, sizeof(int));
          (void)sendmsg(s, &m, MSG_NOSIGNAL);
        }
        close(s);
      }
      const int conn = accept4(squat, nullptr, nullptr, SOCK_NONBLOCK);  // whoever knocks at the squatted name
      if (conn >= 0) close(conn);
      std::this_thread::sleep_for(1ms);
    }
    _exit(0);
  }
  close(ready[1]);
  char x;
  ASSERT_EQ(read(ready[0], &x, 1), 1) << "the intruder could not start as user nobody";
  close(ready[0]);
  const std::string err = run_processes(c.W, [&](int r) -> std::string {
    GroupOptions opt;
    opt.timeout = 10s;
    register_group("s_ep0", {make_shm_group("ep0", c.W, r, opt, job)});
    auto P = prepare(c, "s_");
    for (int round = 0; round < 3; ++round) {
      const std::string d = round_trip(*P, r);
      if (!d.empty()) return d;
    }
    return "";
  }, 60);
  kill(intruder, SIGKILL);
  int status = 0;
  waitpid(intruder, &status, 0);
  for (int r = 0; r < c.W; ++r) shm_unlink(("/moedist-" + job + "-ep0-" + std::to_string(r)).c_str());
  EXPECT_EQ(err, "");
}

// ---------------------------------------------------------------------------------------------------
// Memory: Docker's 64 MiB /dev/shm does not matter; a memory limit is a clear error, never a SIGBUS or
// an OOM kill.

std::string in_private_mounts(const std::function<std::string()>& body) {
  int pfd[2];
  if (pipe(pfd) != 0) return "pipe failed";
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    close(pfd[0]);
    std::string msg;
    if (unshare(CLONE_NEWNS) != 0 || mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
        mount("tmpfs", "/dev/shm", "tmpfs", 0, "size=64m") != 0)
      msg = std::string("SKIP: cannot mount a 64 MiB /dev/shm here: ") + std::strerror(errno);
    else
      msg = body();
    if (!msg.empty() && write(pfd[1], msg.data(), msg.size()) < 0) _exit(2);
    _exit(0);
  }
  close(pfd[1]);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(pfd[0], buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  close(pfd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0) && out.empty()) out = "the mount namespace child ended abnormally";
  return out;
}

TEST(ShmMemory, DockersSmallDevShmIsEnough) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root, to mount a 64 MiB /dev/shm in a private mount namespace";
  // 4 ranks, 256 tokens each of H 7168, top-8 (the case that died of SIGBUS): about 240 MiB of windows.
  Case c;
  c.W = 4;
  c.E = 8;
  c.K = 8;
  c.BS = kSanitized ? 32 : 256;
  c.H = 7168;
  const std::string job = new_job("smallshm");
  const std::string err = in_private_mounts([&] {
    return run_processes(c.W, [&](int r) -> std::string {
      register_group("s_ep0", {make_shm_group("ep0", c.W, r, {}, job)});
      auto P = prepare(c, "s_");
      return round_trip(*P, r);
    }, 120);
  });
  if (err.rfind("SKIP:", 0) == 0) GTEST_SKIP() << err;
  EXPECT_EQ(err, "");
}

// A memory cgroup (v1 or v2) below this process's own, with `limit` bytes; empty if none can be made.
struct MemCgroup {
  std::string dir, procs;
  ~MemCgroup() {
    if (!dir.empty()) rmdir(dir.c_str());
  }
  static std::unique_ptr<MemCgroup> make(uint64_t limit) {
    std::ifstream cg("/proc/self/cgroup");
    std::string line;
    while (std::getline(cg, line)) {
      std::string base, limit_file;
      if (line.rfind("0::", 0) == 0) {
        const std::string root = std::ifstream("/sys/fs/cgroup/cgroup.controllers") ? "/sys/fs/cgroup" : "/sys/fs/cgroup/unified";
        std::ifstream ctl(root + line.substr(3) + "/cgroup.subtree_control");
        std::string list;
        std::getline(ctl, list);
        if (list.find("memory") == std::string::npos) continue;
        base = root + line.substr(3);
        limit_file = "memory.max";
      } else if (line.find(":memory:") != std::string::npos) {
        base = "/sys/fs/cgroup/memory" + line.substr(line.find(":memory:") + 8);
        limit_file = "memory.limit_in_bytes";
      } else {
        continue;
      }
      auto m = std::make_unique<MemCgroup>();
      m->dir = base + "/moedist-test-" + std::to_string(getpid());
      if (mkdir(m->dir.c_str(), 0755) != 0) {
        m->dir.clear();
        continue;
      }
      std::ofstream(m->dir + "/" + limit_file) << limit;
      uint64_t got = 0;
      std::ifstream(m->dir + "/" + limit_file) >> got;
      if (got == 0 || got > limit + 4096) continue;
      m->procs = m->dir + "/cgroup.procs";
      return m;
    }
    return nullptr;
  }
  bool join() const {
    std::ofstream f(procs);
    f << getpid();
    f.flush();
    return static_cast<bool>(f);
  }
};

TEST(ShmMemory, AMemoryLimitIsAClearErrorOnEveryRank) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root, to make a memory cgroup";
  if (kSanitized) GTEST_SKIP() << "sanitizers' shadow memory would count against the limit";
  auto cg = MemCgroup::make(uint64_t{24} << 20);
  if (!cg) GTEST_SKIP() << "no memory cgroup can be made here";
  Case c;
  c.W = 2;
  c.E = 4;
  c.K = 4;
  c.BS = 256;
  c.H = 7168;  // about 30 MiB of rows per rank, more than the 24 MiB the cgroup allows
  const std::string job = new_job("memlimit");
  const std::string err = run_processes(c.W, [&](int r) -> std::string {
    auto P = prepare(c, "s_");  // charged to the parent's cgroup: only the group's memory counts below
    if (!cg->join()) return "could not join the memory cgroup";
    try {
      register_group("s_ep0", {make_shm_group("ep0", c.W, r, {}, job)});
      const std::string d = round_trip(*P, r);
      return d.empty() ? "the round fit in 24 MiB: the test needs a larger case" : d;
    } catch (const TransportError& e) {
      const std::string m = e.what();
      if (m.find("cannot reserve shared memory") != std::string::npos && m.find("MiB") != std::string::npos) return "";
      return "error that does not say what memory was needed: " + m;
    }
  }, 60);
  EXPECT_EQ(err, "");
}

// ---------------------------------------------------------------------------------------------------
// Leftovers: nothing in /dev/shm, whatever the signal and the phase.

TEST(ShmLeftovers, NothingIsLeftWhenRanksAreKilledDuringSetup) {
  const auto before = dev_shm_names();
  const std::string job = new_job("leftover");
  const int sigs[] = {SIGKILL, SIGHUP, SIGTERM, SIGINT};
  std::vector<pid_t> pids;
  std::fflush(nullptr);
  for (int r = 0; r < 4; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      GroupOptions opt;
      opt.timeout = 20s;
      try {
        (void)make_shm_group("ep0", 5, r, opt, job);  // rank 4 never comes: they wait in setup
      } catch (...) {
      }
      _exit(0);
    }
    pids.push_back(pid);
  }
  std::this_thread::sleep_for(400ms);
  for (size_t i = 0; i < pids.size(); ++i) kill(pids[i], sigs[i]);
  for (pid_t p : pids) waitpid(p, nullptr, 0);
  std::vector<std::string> left;
  for (const auto& n : dev_shm_names())
    if (!before.count(n) && n.find("moedist") != std::string::npos) left.push_back(n);
  EXPECT_TRUE(left.empty()) << "left in /dev/shm: " << left.front();
}

// ---------------------------------------------------------------------------------------------------
// Calls that do not match: every rank raises InvalidArgument naming what each rank called.

Case tiny_case() {
  Case c;
  c.W = 2;
  c.E = 2;
  c.K = 1;
  c.BS = 4;
  c.H = 16;
  return c;
}

std::string expect_mismatch(const std::function<void()>& call) {
  try {
    call();
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    if (m.find("not in the same call") != std::string::npos && m.find("rank 0") != std::string::npos && m.find("rank 1") != std::string::npos)
      return "";
    return "message does not name the ranks' calls: " + m;
  } catch (const std::exception& e) {
    return std::string("wrong error type: ") + e.what();
  }
  return "no error";
}

TEST(MismatchedCalls, CombineWhilePeersDispatchFailsOnEveryRank) {
  // W 2, E 2, K 1: tokens routed to local experts, where a combine paired with a dispatch used to give
  // zeros silently.
  const Case c = tiny_case();
  auto P = prepare(c, "mm_");
  register_group("mm_ep0", make_thread_group(c.W, {std::chrono::milliseconds(10000), 0}));
  std::vector<std::string> errs(2);
  run_ranks(2, [&](int r) {
    std::string d = round_trip(*P, r);  // round 1: fine
    if (!d.empty()) {
      errs[static_cast<size_t>(r)] = d;
      return;
    }
    if (r == 0)  // round 2: rank 0 skips its dispatch
      errs[0] = expect_mismatch([&] { (void)combine_v2(P->cargs[0]); });
    else
      errs[1] = expect_mismatch([&] { (void)dispatch_v2(P->dargs[1]); });
  });
  unregister_group("mm_ep0");
  EXPECT_EQ(errs[0], "");
  EXPECT_EQ(errs[1], "");
}

TEST(MismatchedCalls, ProcessesOverSharedMemoryToo) {
  const Case c = tiny_case();
  const std::string job = new_job("mismatch");
  const std::string err = run_processes(c.W, [&](int r) -> std::string {
    register_group("s_ep0", {make_shm_group("ep0", c.W, r, {}, job)});
    auto P = prepare(c, "s_");
    const std::string d = round_trip(*P, r);
    if (!d.empty()) return d;
    if (r == 0) return expect_mismatch([&] { (void)combine_v2(P->cargs[0]); });
    return expect_mismatch([&] { (void)dispatch_v2(P->dargs[1]); });
  }, 60);
  EXPECT_EQ(err, "");
}

TEST(MismatchedCalls, ARankThatSkipsACallIsCaughtAtTheNextOne) {
  // Rank 1 leaves out the dispatch of round 2 and goes on with round 2's combine: without call numbers
  // every later round would pair one call off, silently.
  const Case c = small_case();
  auto P = prepare(c, "skip_");
  register_group("skip_ep0", make_thread_group(c.W, {std::chrono::milliseconds(10000), 0}));
  std::vector<std::string> errs(static_cast<size_t>(c.W));
  run_ranks(c.W, [&](int r) {
    std::string& e = errs[static_cast<size_t>(r)];
    e = round_trip(*P, r);
    if (!e.empty()) return;
    if (r == 1) {
      e = expect_mismatch([&] { (void)combine_v2(P->cargs[1]); });
      return;
    }
    e = expect_mismatch([&] { (void)dispatch_v2(P->dargs[static_cast<size_t>(r)]); });
  });
  unregister_group("skip_ep0");
  for (int r = 0; r < c.W; ++r) EXPECT_EQ(errs[static_cast<size_t>(r)], "") << "rank " << r;
}

// ---------------------------------------------------------------------------------------------------
// Combine metadata that is in range but not what dispatch returned: an error, not rows nothing wrote.

TEST(CombineMetadata, InRangeButNotFromDispatchIsRejected) {
  const Case c = small_case();
  auto P = prepare(c, "meta_");
  register_group("meta_ep0", make_thread_group(c.W, {std::chrono::milliseconds(10000), 0}));
  std::vector<std::string> errs(static_cast<size_t>(c.W));
  run_ranks(c.W, [&](int r) {
    std::string& e = errs[static_cast<size_t>(r)];
    const DispatchResult d = dispatch_v2(P->dargs[static_cast<size_t>(r)]);
    CombineArgs a = P->cargs[static_cast<size_t>(r)];
    // Rank 0 swaps two of its assist triples: every value stays in range.
    Tensor assist(DType::kInt32, {d.assist_info_for_combine.size(0)});
    std::memcpy(assist.data(), d.assist_info_for_combine.data(), assist.nbytes());
    if (r == 0) {
      int32_t* t = assist.data_as<int32_t>();
      const int64_t rows = d.ep_recv_counts.data_as<int32_t>()[d.ep_recv_counts.size(0) - 1];
      for (int64_t i = 1; i < rows; ++i)
        if (t[3 * i] != t[0] || t[3 * i + 1] != t[1] || t[3 * i + 2] != t[2]) {
          for (int j = 0; j < 3; ++j) std::swap(t[j], t[3 * i + j]);
          break;
        }
    }
    a.assist_info_for_combine = assist;
    try {
      (void)combine_v2(a);
      e = "no error";
    } catch (const InvalidArgument& x) {
      const std::string m = x.what();
      e = r == 0 && m.find("assist_info_for_combine") != std::string::npos && m.find("dispatch_v2") != std::string::npos ? "" : m;
    } catch (const TransportError& x) {
      const std::string m = x.what();
      e = r != 0 && m.find("rank 0 rejected its call") != std::string::npos ? "" : m;
    }
  });
  unregister_group("meta_ep0");
  for (int r = 0; r < c.W; ++r) EXPECT_EQ(errs[static_cast<size_t>(r)], "") << "rank " << r;
}

}  // namespace
}  // namespace moedist::test
