// Small helpers every part of the demo uses: text concatenation and phase timing.
#pragma once

#include <chrono>
#include <sstream>
#include <string>

namespace moedist::tools::demo {

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

using Clock = std::chrono::steady_clock;
inline double ms_since(Clock::time_point start) { return std::chrono::duration<double, std::milli>(Clock::now() - start).count(); }

}  // namespace moedist::tools::demo
