// Typed errors of moedist. Every user mistake raises InvalidArgument (Python: ValueError) with a
// message naming the operation, the rank, the parameter, its value and what was allowed; a capability
// that a backend lacks raises Unsupported (NotImplementedError); communication failures raise
// TransportError, and a peer that does not arrive within the deadline raises Timeout (RuntimeError).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moedist {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
class InvalidArgument : public Error {
 public:
  using Error::Error;
};
class Unsupported : public Error {
 public:
  using Error::Error;
};
class TransportError : public Error {
 public:
  using Error::Error;
};
class Timeout : public TransportError {
 public:
  using TransportError::TransportError;
};
// A wait for peers cut short on this rank (see set_interrupt_check in group.h). Python: KeyboardInterrupt.
class Interrupted : public TransportError {
 public:
  using TransportError::TransportError;
};

namespace detail {
template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
// True when a wait should end now: the check set by set_interrupt_check() says so, or SIGINT / SIGTERM
// is pending while this thread blocks it.
bool interrupt_requested();
[[noreturn]] void internal_error(const char* file, int line, const char* cond, const std::string& msg);
}  // namespace detail

}  // namespace moedist

// Internal invariant: always on, never for user input.
#define MOEDIST_ASSERT(cond, ...)                                                                  \
  do {                                                                                             \
    if (!(cond)) ::moedist::detail::internal_error(__FILE__, __LINE__, #cond,                      \
                                                   ::moedist::detail::str_cat("" __VA_OPT__(, ) __VA_ARGS__));    \
  } while (0)
