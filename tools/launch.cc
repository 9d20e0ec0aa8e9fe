// moedist launch: starts N local ranks of a program, each with MOEDIST_RANK / MOEDIST_WORLD_SIZE /
// MOEDIST_LOCAL_RANK / MOEDIST_JOB_ID set (what moedist::launch_env() reads). The job id is random, so
// two jobs never share one (an inherited MOEDIST_JOB_ID is replaced). If a rank fails, the others are
// stopped; SIGINT, SIGTERM and SIGHUP are passed on to the ranks, and ranks never outlive the launcher
// (PR_SET_PDEATHSIG). Shared-memory windows have no names, so nothing is left to clean up. A rank's end
// by a signal named with --expect-signal (a failover test kills it on purpose) is no failure.
#include "launch.h"

#include <dirent.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

volatile sig_atomic_t g_signal = 0;
void on_signal(int sig) { g_signal = sig; }

// The usage text: to stdout for --help (exit 0), to stderr after a usage error (exit 2).
int usage(FILE* out = stderr) {
  std::fprintf(out,
               "usage: moedist launch -n N [--timeout SECONDS] [--expect-signal RANK:SIGNAL] [--] PROGRAM [ARGS...]\n"
               "  Starts N ranks of PROGRAM on this host (processes; moedist groups use shared memory).\n"
               "  Each rank gets MOEDIST_RANK, MOEDIST_WORLD_SIZE, MOEDIST_LOCAL_RANK, MOEDIST_JOB_ID.\n"
               "  A rank that fails stops the others; the exit code is the first failure's.\n"
               "  --expect-signal RANK:SIGNAL: RANK ending by signal number SIGNAL is expected (a failover test):\n"
               "  it is not a failure, the others keep running (repeatable).\n");
  return out == stderr ? 2 : 0;
}

// `text` as a whole number >= min, or false.
bool parse_count(const char* text, long min, long max, long& value) {
  char* end = nullptr;
  errno = 0;
  value = std::strtol(text, &end, 10);
  return *text != '\0' && *end == '\0' && errno == 0 && value >= min && value <= max;
}

// `text` as a number of seconds >= 0, or false.
bool parse_seconds(const char* text, double& value) {
  char* end = nullptr;
  errno = 0;
  value = std::strtod(text, &end);
  return *text != '\0' && *end == '\0' && errno == 0 && value >= 0 && value == value;
}

// A job id no other job has had: 128 random bits.
std::string random_job_id() {
  unsigned char b[16] = {};
  size_t got = 0;
  while (got < sizeof(b)) {
    const ssize_t n = getrandom(b + got, sizeof(b) - got, 0);
    if (n > 0) got += static_cast<size_t>(n);
    else if (errno != EINTR) break;
  }
  static const char* hex = "0123456789abcdef";
  std::string out = "L";
  for (unsigned char c : b) {
    out += hex[c >> 4];
    out += hex[c & 15];
  }
  return out;
}

}  // namespace

int launch_main(int argc, char** argv) {
  int n = 0;
  double timeout_s = 0;
  std::vector<std::pair<long, long>> expected;  // (rank, signal) whose end is no failure
  int i = 0;
  for (; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--expect-signal") {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "moedist launch: %s needs a value\n", a.c_str());
        return usage();
      }
      const std::string value = argv[++i];
      const size_t colon = value.find(':');
      long rank = 0, sig = 0;
      if (colon == std::string::npos || !parse_count(value.substr(0, colon).c_str(), 0, 99999, rank) ||
          !parse_count(value.substr(colon + 1).c_str(), 1, 64, sig)) {
        std::fprintf(stderr, "moedist launch: --expect-signal %s is not RANK:SIGNAL (a rank >= 0 and a signal number 1 to 64)\n",
                     value.c_str());
        return usage();
      }
      expected.emplace_back(rank, sig);
    } else if (a == "-n" || a == "--np" || a == "--nproc" || a == "--timeout") {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "moedist launch: %s needs a value\n", a.c_str());
        return usage();
      }
      const char* value = argv[++i];
      long count = 0;
      if (a == "--timeout" ? !parse_seconds(value, timeout_s) : !parse_count(value, 1, 100000, count)) {
        std::fprintf(stderr, "moedist launch: %s %s is not %s\n", a.c_str(), value,
                     a == "--timeout" ? "a number of seconds >= 0" : "a positive integer (1 to 100000)");
        return usage();
      }
      if (a != "--timeout") n = static_cast<int>(count);
    } else if (a == "--") {
      ++i;
      break;
    } else if (a == "-h" || a == "--help") {
      return usage(stdout);
    } else if (!a.empty() && a[0] == '-') {
      std::fprintf(stderr, "moedist launch: unknown option %s\n", a.c_str());
      return usage();
    } else {
      break;
    }
  }
  if (n < 1) {
    std::fprintf(stderr, "moedist launch: -n N (the number of ranks) is required\n");
    return usage();
  }
  if (i >= argc) {
    std::fprintf(stderr, "moedist launch: no program given\n");
    return usage();
  }
  const std::string job = random_job_id();
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGHUP, on_signal);
  const pid_t launcher = getpid();
  std::vector<pid_t> pids(static_cast<size_t>(n), -1);
  for (int r = 0; r < n; ++r) {
    std::fflush(nullptr);
    const pid_t pid = fork();
    if (pid < 0) {
      std::perror("moedist launch: fork");
      for (pid_t p : pids)
        if (p > 0) kill(p, SIGKILL);
      return 1;
    }
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // ranks do not outlive the launcher
      if (getppid() != launcher) _exit(1);
      setenv("MOEDIST_RANK", std::to_string(r).c_str(), 1);
      setenv("MOEDIST_WORLD_SIZE", std::to_string(n).c_str(), 1);
      setenv("MOEDIST_LOCAL_RANK", std::to_string(r).c_str(), 1);
      setenv("MOEDIST_LOCAL_WORLD_SIZE", std::to_string(n).c_str(), 1);
      setenv("MOEDIST_JOB_ID", job.c_str(), 1);
      execvp(argv[i], argv + i);
      std::fprintf(stderr, "moedist launch: cannot run %s: %s\n", argv[i], std::strerror(errno));
      _exit(127);
    }
    pids[static_cast<size_t>(r)] = pid;
  }

  int first_failure = 0, running = n;
  const auto start = std::chrono::steady_clock::now();
  bool stopping = false;
  auto stop_all = [&](int sig) {
    for (pid_t p : pids)
      if (p > 0) kill(p, sig);
  };
  auto stop_since = start;
  while (running > 0) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      int r = 0;
      while (r < n && pids[static_cast<size_t>(r)] != pid) ++r;
      if (r == n) continue;
      pids[static_cast<size_t>(r)] = -1;
      --running;
      int code = 0;
      if (WIFEXITED(status)) code = WEXITSTATUS(status);
      if (WIFSIGNALED(status)) code = 128 + WTERMSIG(status);
      if (WIFSIGNALED(status))
        for (const auto& [er, es] : expected)
          if (er == r && es == WTERMSIG(status)) {
            std::fprintf(stderr, "moedist launch: rank %d ended by signal %d, as expected; the others keep running\n", r, WTERMSIG(status));
            code = 0;
          }
      if (code != 0 && first_failure == 0) {
        first_failure = code;
        if (WIFSIGNALED(status))
          std::fprintf(stderr, "moedist launch: rank %d was killed by signal %d; stopping the others\n", r, WTERMSIG(status));
        else
          std::fprintf(stderr, "moedist launch: rank %d exited with code %d; stopping the others\n", r, code);
      }
      if (code != 0 && !stopping && running > 0) {
        // Give the others a moment to report the failed peer themselves, then stop them.
        stopping = true;
        stop_since = std::chrono::steady_clock::now();
      }
      continue;
    }
    const auto now = std::chrono::steady_clock::now();
    if (g_signal && !stopping) {
      std::fprintf(stderr, "moedist launch: signal %d; passing it on to the ranks\n", static_cast<int>(g_signal));
      stop_all(g_signal);
      stopping = true;
      stop_since = now;
      if (first_failure == 0) first_failure = 128 + g_signal;
    }
    if (timeout_s > 0 && !stopping && now - start > std::chrono::duration<double>(timeout_s)) {
      std::fprintf(stderr, "moedist launch: timeout of %.0f s reached; stopping the ranks\n", timeout_s);
      stop_all(SIGTERM);
      stopping = true;
      stop_since = now;
      first_failure = 124;
    }
    if (stopping && now - stop_since > std::chrono::seconds(5)) stop_all(SIGKILL);
    else if (stopping && now - stop_since > std::chrono::seconds(2)) stop_all(SIGTERM);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return first_failure;
}
