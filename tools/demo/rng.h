// Seeded random numbers: every weight and input of the demo comes from here.
#pragma once

#include <cstdint>

namespace moedist::tools::demo {

// splitmix64 streams keyed by (seed, what, id). A stream depends on nothing
// else, so any party (a rank, the dense check) regenerates the same values.
enum class Stream : uint64_t { kTokens = 1, kRouter = 2, kRoutedExpert = 3, kSharedExpert = 4, kConstExperts = 5 };

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

class Rng {
 public:
  Rng(uint64_t seed, Stream what, uint64_t id) {
    state_ = seed;
    state_ = splitmix64(state_) ^ (static_cast<uint64_t>(what) << 56) ^ id;
    splitmix64(state_);
  }
  // Uniform in [-1, 1): 24 random bits, exact in fp32.
  float uniform() { return static_cast<float>(splitmix64(state_) >> 40) * (2.0f / 16777216.0f) - 1.0f; }

 private:
  uint64_t state_;
};

}  // namespace moedist::tools::demo
