// Helpers shared by the algorithms: the status every blob starts with (so a rank that rejects its
// input makes its peers fail at once, naming it), the cross-rank uniformity check, and group lookup.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <map>
#include <string>
#include <vector>

#include "core/config.h"
#include "moedist/error.h"
#include "moedist/group.h"
#include "moedist/transport.h"

namespace moedist::ops {

constexpr int kMaxUniform = 24;

struct BlobHeader {
  char call[32] = {};  // the operation (and step) this rank is in
  uint64_t seq = 0;    // its number among the steps this rank ran on this endpoint
  int32_t status = 0;  // 0 ok, else this rank failed before sending (message follows)
  int32_t n_uniform = 0;
  int64_t payload_bytes = 0;
  int64_t uniform[kMaxUniform] = {};
  char message[400] = {};  // last: read only when status says this rank failed
};

// Runs one exchange whose blob is [BlobHeader | payload]. Before produce() runs, every member's header
// is checked: members in another operation or step, or at another step number, raise InvalidArgument
// listing what each member called; a failed member raises TransportError naming it; a uniform parameter
// that differs raises InvalidArgument naming the parameter and both values.
struct Step {
  std::shared_ptr<Transport> transport;
  const char* phase = "";  // tells apart the steps of one operation ("TP all-gather")
  std::vector<int> members;  // physical ranks, ascending
  const core::EpConfig* cfg = nullptr;  // for uniform params and messages; null: no uniform check
  std::vector<std::pair<const char*, int64_t>> extra_uniform;
  std::vector<unsigned char> payload;   // this rank's payload (same size on every member)
  std::vector<RecvRegion> recv;
  int64_t* waits_us = nullptr;  // ExchangeSpec::waits_us: set on the EP steps only (performance_info)
  // Whether the members' blobs stay readable (payload_of) after run() returns. false: only inside
  // produce, where the transport lends them in place (Transport::blobs_in_place): no copy of
  // members.size() blobs per rank, which at hundreds of ranks is most of a call's memory.
  bool blobs_after = true;
  std::vector<unsigned char> blobs;     // members.size() * (sizeof(BlobHeader) + payload size), when copied
  // Member i's payload (what it put after its BlobHeader): inside produce, and after run() with blobs_after.
  const unsigned char* payload_of(size_t member_index) const {
    MOEDIST_ASSERT(member_index < views_.size(), "payload_of(", member_index, ") outside produce (blobs_after is false) or past ",
                   views_.size(), " members");
    return views_[member_index] + sizeof(BlobHeader);
  }
  size_t index_of(int phys_rank) const;
  // Runs the exchange. failure: this rank's own error (null if none); produce runs only when all ok.
  void run(const char* op, const std::string& self_label, const std::string* failure, const std::function<void(PutWriter&)>& produce);
  // With split set, run() only begins the exchange (Transport::exchange_begin) and end() finishes it.
  bool split = false;
  void end() { transport->exchange_end(); }

 private:
  std::vector<const unsigned char*> views_;          // each member's blob, sizeof(BlobHeader) + payload size
  std::vector<std::vector<unsigned char>> padded_;  // lent blobs of another length, cut or zero-padded
};

// Runs `members`' step as a rejected call (this rank's error in `msg`): its peers fail at once, naming it.
// Never throws.
void reject_step(const std::shared_ptr<Transport>& t, std::vector<int> members, const char* op, const char* phase,
                 const std::string& label, const std::string& msg);

// The routing metadata a dispatch returned to this rank, as combine must be given it back: the
// assist triples of its `rows` rows, its ep counts (`n_counts`), the expert ids and mask of its tokens
// and, with TP, the TP counts. A digest, so that combine can tell metadata that is in range but not
// from a dispatch on this group (which would read rows nothing wrote).
uint64_t metadata_digest(const core::EpConfig& c, const int32_t* assist, int64_t rows, const int32_t* counts, int64_t n_counts,
                         const int32_t* tp_counts);
// The same digest of combine's arguments (what combine_v2 checks; the bench times it).
uint64_t combine_metadata_digest(const core::EpConfig& c, const CombineArgs& a, const core::CombineCounts& counts);
void remember_dispatch(Transport& t, uint64_t digest);
bool was_dispatched(Transport& t, uint64_t digest);

// InvalidArgument if a rank the group's survivors declared failed (Transport::recover) is among the
// members of this call: the caller must leave it out with elastic_info.
void check_members_alive(const core::EpConfig& c, Transport& ep, const char* op, const std::string& label);

// Exchange steps this thread has started (an op that fails before its first step must tell its peers).
uint64_t steps_started();

// The endpoint of `group` for `rank`, checked to have `world` ranks; `label` prefixes errors.
std::shared_ptr<Transport> lookup(const std::string& group, int64_t rank, int64_t world, const char* op, const char* what,
                                  const std::string& label);

// Members to use when this rank's own arguments failed validation (best effort from elastic_info;
// always including `rank`).
std::vector<int> fallback_members(const TensorView& elastic_info, int64_t world, int64_t rank);

// Open split calls (dispatch_setup, combine_setup) by handle; each handle is taken once.
template <typename Op>
class Pending {
 public:
  uint64_t add(std::unique_ptr<Op> op) {
    std::lock_guard<std::mutex> lk(mu_);
    const uint64_t id = ++next_;
    open_[id] = std::move(op);
    return id;
  }
  std::unique_ptr<Op> take(uint64_t id, const char* op) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = open_.find(id);
    if (it == open_.end())
      throw InvalidArgument(detail::str_cat(op, ": handle ", id, " is not an open setup (each setup's handle is torn down once)"));
    auto p = std::move(it->second);
    open_.erase(it);
    return p;
  }

 private:
  std::mutex mu_;
  uint64_t next_ = 0;
  std::map<uint64_t, std::unique_ptr<Op>> open_;
};

template <typename T>
void put_pod(std::vector<unsigned char>& v, const T& x) {
  const size_t n = v.size();
  v.resize(n + sizeof(T));
  std::memcpy(v.data() + n, &x, sizeof(T));
}

}  // namespace moedist::ops
