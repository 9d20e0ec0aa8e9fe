// Helpers shared by the algorithms: the status every blob starts with (so a rank that rejects its
// input makes its peers fail at once, naming it), the cross-rank uniformity check, and group lookup.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "moedist/group.h"
#include "moedist/transport.h"

namespace moedist::ops {

constexpr int kMaxUniform = 24;

struct BlobHeader {
  int32_t status = 0;  // 0 ok, else this rank failed before sending (message follows)
  int32_t n_uniform = 0;
  int64_t payload_bytes = 0;
  char message[400] = {};
  int64_t uniform[kMaxUniform] = {};
};

// Runs one exchange whose blob is [BlobHeader | payload]. Before produce() runs, every member's header
// is checked: a failed member raises TransportError naming it; a uniform parameter that differs raises
// InvalidArgument naming the parameter and both values.
struct Step {
  std::shared_ptr<Transport> transport;
  std::vector<int> members;  // physical ranks, ascending
  const core::EpConfig* cfg = nullptr;  // for uniform params and messages; null: no uniform check
  std::vector<std::pair<const char*, int64_t>> extra_uniform;
  std::vector<unsigned char> payload;   // this rank's payload (same size on every member)
  std::vector<RecvRegion> recv;
  std::vector<unsigned char> blobs;     // filled: members.size() * (sizeof(BlobHeader) + payload size)
  const unsigned char* payload_of(size_t member_index) const {
    return blobs.data() + member_index * (sizeof(BlobHeader) + payload.size()) + sizeof(BlobHeader);
  }
  size_t index_of(int phys_rank) const;
  // Runs the exchange. failure: this rank's own error (null if none); produce runs only when all ok.
  void run(const char* op, const std::string& self_label, const std::string* failure, const std::function<void(PutWriter&)>& produce);
};

// The endpoint of `group` for `rank`, checked to have `world` ranks; `label` prefixes errors.
std::shared_ptr<Transport> lookup(const std::string& group, int64_t rank, int64_t world, const char* op, const char* what,
                                  const std::string& label);

// Members to use when this rank's own arguments failed validation (best effort from elastic_info).
std::vector<int> fallback_members(const TensorView& elastic_info, int64_t world);

template <typename T>
void put_pod(std::vector<unsigned char>& v, const T& x) {
  const size_t n = v.size();
  v.resize(n + sizeof(T));
  std::memcpy(v.data() + n, &x, sizeof(T));
}

}  // namespace moedist::ops
