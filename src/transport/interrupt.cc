// Interrupting waits: a check set by the program (the Python package sets one that runs Python's signal
// handlers), and SIGINT / SIGTERM pending while blocked.
#include <signal.h>

#include <atomic>

#include "moedist/error.h"
#include "moedist/group.h"

namespace moedist {

namespace {
std::atomic<InterruptCheck> g_check{nullptr};
}  // namespace

void set_interrupt_check(InterruptCheck check) { g_check.store(check, std::memory_order_release); }

namespace detail {
bool interrupt_requested() {
  if (InterruptCheck check = g_check.load(std::memory_order_acquire))
    if (check()) return true;
  sigset_t pending;
  if (sigpending(&pending) != 0) return false;
  return sigismember(&pending, SIGINT) == 1 || sigismember(&pending, SIGTERM) == 1;
}
}  // namespace detail

}  // namespace moedist
