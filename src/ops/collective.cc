#include "ops/collective.h"

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstring>

#include "moedist/error.h"
#include "moedist/ops.h"

namespace moedist::ops {

size_t Step::index_of(int phys_rank) const {
  auto it = std::lower_bound(members.begin(), members.end(), phys_rank);
  MOEDIST_ASSERT(it != members.end() && *it == phys_rank, "rank ", phys_rank, " is not a member");
  return static_cast<size_t>(it - members.begin());
}

namespace {
thread_local uint64_t t_steps = 0;

std::string call_name(const BlobHeader& h) { return std::string(h.call, strnlen(h.call, sizeof(h.call))); }
}  // namespace

uint64_t steps_started() { return t_steps; }

void Step::run(const char* op, const std::string& self_label, const std::string* failure,
               const std::function<void(PutWriter&)>& produce) {
  ++t_steps;
  BlobHeader hdr;
  std::snprintf(hdr.call, sizeof(hdr.call), "%s%s%s", op, *phase ? " " : "", phase);
  uint64_t key = 1469598103934665603ull;
  for (int m : members) key = (key ^ static_cast<uint64_t>(m + 1)) * 1099511628211ull;
  hdr.seq = ++transport->call_state().calls[key];
  if (failure) {
    hdr.status = 1;
    std::strncpy(hdr.message, failure->c_str(), sizeof(hdr.message) - 1);
  }
  std::vector<std::pair<const char*, int64_t>> uni;
  if (cfg && !failure) uni = cfg->uniform_params();
  uni.insert(uni.end(), extra_uniform.begin(), extra_uniform.end());
  MOEDIST_ASSERT(uni.size() <= static_cast<size_t>(kMaxUniform));
  hdr.n_uniform = static_cast<int32_t>(uni.size());
  hdr.payload_bytes = static_cast<int64_t>(payload.size());
  for (size_t i = 0; i < uni.size(); ++i) hdr.uniform[i] = uni[i].second;

  const size_t bb = sizeof(BlobHeader) + payload.size();
  std::vector<unsigned char> blob(bb);
  std::memcpy(blob.data(), &hdr, sizeof(hdr));
  if (!payload.empty()) std::memcpy(blob.data() + sizeof(hdr), payload.data(), payload.size());
  const bool lent = !blobs_after && transport->blobs_in_place();
  views_.clear();
  padded_.clear();
  if (lent) {
    blobs.clear();
  } else {
    blobs.assign(members.size() * bb, 0);
    for (size_t i = 0; i < members.size(); ++i) views_.push_back(blobs.data() + i * bb);
  }

  ExchangeSpec spec;
  spec.op = op;
  spec.members = members;
  spec.blob = blob.data();
  spec.blob_bytes = bb;
  spec.blobs_out = lent ? nullptr : blobs.data();
  spec.recv = recv;
  spec.waits_us = waits_us;
  spec.produce = [&](PutWriter& w) {
    if (lent) views_.resize(members.size());
    for (size_t i = 0; lent && i < members.size(); ++i) {
      size_t got = 0;
      const auto* b = static_cast<const unsigned char*>(w.blob(i, &got));
      MOEDIST_ASSERT(b || got == 0, op, ": the ", transport->name(), " transport lent no blob for member ", i);
      if (got == bb) {
        views_[i] = b;
        continue;
      }
      // Another length (the ranks disagree on the call): cut or zero-padded, as blobs_out would hold it;
      // the header checks below name the disagreement.
      padded_.emplace_back(bb, 0);
      if (got) std::memcpy(padded_.back().data(), b, std::min(got, bb));
      views_[i] = padded_.back().data();
    }
    const unsigned char* const* const view = views_.data();
    // Members' headers are read without their message, unless they failed (copying whole headers from
    // every member was most of a step's time at hundreds of ranks).
    // Same call on every member? Otherwise nothing else in the blobs can be trusted.
    bool agree = true;
    for (size_t i = 0; i < members.size() && agree; ++i) {
      BlobHeader ph;
      std::memcpy(static_cast<void*>(&ph), view[i], offsetof(BlobHeader, message));
      agree = ph.seq == hdr.seq && std::strncmp(ph.call, hdr.call, sizeof(hdr.call)) == 0;
    }
    if (!agree) {
      std::string calls;
      for (size_t i = 0; i < members.size(); ++i) {
        if (i == 16) {
          calls += ", ...";
          break;
        }
        BlobHeader ph;
        std::memcpy(&ph, view[i], sizeof(ph));
        calls += detail::str_cat(i ? ", " : "", "rank ", members[i], " ", call_name(ph), " #", ph.seq);
      }
      throw InvalidArgument(detail::str_cat(self_label, op, ": the ranks of the group are not in the same call (", calls,
                                            "; #n counts the steps each rank ran with these members): every rank must make the same calls in ",
                                            "the same order"));
    }
    for (size_t i = 0; i < members.size(); ++i) {
      BlobHeader ph;
      std::memcpy(static_cast<void*>(&ph), view[i], offsetof(BlobHeader, message));
      if (ph.status != 0 && members[i] != transport->rank()) {
        std::memcpy(&ph, view[i], sizeof(ph));
        throw TransportError(detail::str_cat(self_label, op, ": rank ", members[i], " rejected its call: ", ph.message));
      }
    }
    if (failure) throw InvalidArgument(*failure);
    for (size_t i = 0; i < members.size(); ++i) {
      BlobHeader ph;
      std::memcpy(static_cast<void*>(&ph), view[i], offsetof(BlobHeader, message));
      for (int32_t j = 0; j < ph.n_uniform && j < hdr.n_uniform; ++j)
        if (ph.uniform[j] != hdr.uniform[j])
          throw InvalidArgument(detail::str_cat(self_label, op, ": ", uni[static_cast<size_t>(j)].first, "=",
                                                core::uniform_value_str(uni[static_cast<size_t>(j)].first, hdr.uniform[j]), " but rank ",
                                                members[i], " passed ", core::uniform_value_str(uni[static_cast<size_t>(j)].first, ph.uniform[j]),
                                                " (must be equal on every rank)"));
      if (ph.payload_bytes != hdr.payload_bytes)
        throw InvalidArgument(detail::str_cat(self_label, op, ": rank ", members[i], " sent ", ph.payload_bytes, " bytes of counts, this rank ",
                                              hdr.payload_bytes, " (the ranks disagree on ep_world_size, moe_expert_num or shared_expert_rank_num)"));
    }
    if (produce) produce(w);
  };
  struct Forget {  // lent blobs are the peers' memory: not to be read once the exchange went on
    bool lent;
    std::vector<const unsigned char*>& views;
    std::vector<std::vector<unsigned char>>& padded;
    ~Forget() {
      if (lent) {
        views.clear();
        padded.clear();
      }
    }
  } forget{lent, views_, padded_};
  if (split)
    transport->exchange_begin(spec);
  else
    transport->exchange(spec);
}

void check_members_alive(const core::EpConfig& c, Transport& ep, const char* op, const std::string& label) {
  if (!ep.has_failed_ranks()) return;
  const std::vector<int32_t> failed = ep.failed_ranks();
  if (failed[static_cast<size_t>(ep.rank())])
    throw TransportError(detail::str_cat(label, op, ": this rank was declared failed by the surviving ranks of its group and can no longer take part in it"));
  for (int m : c.members())
    if (m >= 0 && static_cast<size_t>(m) < failed.size() && failed[static_cast<size_t>(m)])
      throw InvalidArgument(detail::str_cat(label, op, ": rank ", m, " failed (its group's surviving ranks agreed on it in recover_group) ",
                                            "but this call includes it: pass elastic_info without it (make_elastic_info of ",
                                            "query_active_mask, and only the surviving ranks call)"));
}

void reject_step(const std::shared_ptr<Transport>& t, std::vector<int> members, const char* op, const char* phase,
                 const std::string& label, const std::string& msg) {
  if (t->has_failed_ranks()) {  // never wait for a rank known to have failed
    const std::vector<int32_t> failed = t->failed_ranks();
    std::erase_if(members, [&](int m) { return m >= 0 && static_cast<size_t>(m) < failed.size() && failed[static_cast<size_t>(m)]; });
  }
  Step step;
  step.transport = t;
  step.members = std::move(members);
  step.phase = phase;
  try {
    step.run(op, label, &msg, nullptr);
  } catch (...) {
  }
}

namespace {
// Four independent multiply-xor lanes over 64-bit words: a few GB/s, far below a round's cost.
class Digest {
 public:
  void add(const void* p, size_t bytes) {
    const auto* b = static_cast<const unsigned char*>(p);
    size_t i = 0;
    for (; i + 32 <= bytes; i += 32)
      for (int l = 0; l < 4; ++l) mix(l, load(b + i + 8 * l));
    for (; i + 8 <= bytes; i += 8) mix(0, load(b + i));
    uint64_t tail = 0;
    if (bytes > i) std::memcpy(&tail, b + i, bytes - i);  // b may be null when bytes == 0
    mix(1, tail ^ (bytes << 56));
  }
  void add(int64_t v) { mix(2, static_cast<uint64_t>(v)); }
  uint64_t value() const {
    uint64_t h = 0;
    for (uint64_t l : lane_) h = (h ^ l) * 0x9e3779b97f4a7c15ull + (h >> 29);
    return h;
  }

 private:
  static uint64_t load(const unsigned char* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
  }
  void mix(int l, uint64_t v) { lane_[l] = (lane_[l] ^ v) * 0xff51afd7ed558ccdull + 0x632be59bd9b4e019ull; }
  uint64_t lane_[4] = {1, 2, 3, 4};
};
}  // namespace

uint64_t metadata_digest(const core::EpConfig& c, const int32_t* assist, int64_t rows, const int32_t* counts, int64_t n_counts,
                         const int32_t* tp_counts) {
  Digest d;
  d.add(rows);
  d.add(assist, static_cast<size_t>(rows) * 3 * sizeof(int32_t));
  d.add(n_counts);
  d.add(counts, static_cast<size_t>(n_counts) * sizeof(int32_t));
  d.add(c.BS);
  d.add(c.ids.data(), c.ids.size() * sizeof(c.ids[0]));
  d.add(c.entry_on.data(), c.entry_on.size());
  if (tp_counts) d.add(tp_counts, 2 * sizeof(int32_t));
  return d.value();
}

uint64_t combine_metadata_digest(const core::EpConfig& c, const CombineArgs& a, const core::CombineCounts& counts) {
  const int64_t need = c.W * c.local_experts();
  auto contiguous = [](const TensorView& v, int64_t n, std::vector<int32_t>& tmp) -> const int32_t* {
    if (n == 0 || v.stride(0) == 1) return static_cast<const int32_t*>(v.data);
    tmp.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) tmp[static_cast<size_t>(i)] = core::at1<int32_t>(v, i);
    return tmp.data();
  };
  std::vector<int32_t> t1, t2, t3;
  const int32_t* assist = contiguous(a.assist_info_for_combine, 3 * counts.own_rows, t1);
  const int32_t* cnt = contiguous(a.ep_send_counts, need, t2);
  const int32_t* tp = c.tp == 2 ? contiguous(a.tp_send_counts, 2, t3) : nullptr;
  return metadata_digest(c, assist, counts.own_rows, cnt, need, tp);
}

void remember_dispatch(Transport& t, uint64_t digest) {
  CallState& s = t.call_state();
  s.dispatch_digests[s.next_digest++ % CallState::kDigests] = digest;
}

bool was_dispatched(Transport& t, uint64_t digest) {
  const CallState& s = t.call_state();
  for (uint64_t d : s.dispatch_digests)
    if (d == digest && digest != 0) return true;
  return false;
}

std::shared_ptr<Transport> lookup(const std::string& group, int64_t rank, int64_t world, const char* op, const char* what,
                                  const std::string& label) {
  auto t = resolve_group(group, rank, op);
  if (t->world_size() != world)
    throw InvalidArgument(detail::str_cat(label, op, ": ", what, "=", world, " but group \"", group, "\" has ", t->world_size(),
                                          " ranks (must be equal)"));
  return t;
}

std::vector<int> fallback_members(const TensorView& el, int64_t world, int64_t rank) {
  std::vector<int> all;
  for (int i = 0; i < world; ++i) all.push_back(i);
  if (!el.defined() || el.data == nullptr || el.dtype != DType::kInt32 || el.dim() != 1 || el.size(0) != 4 + 2 * world) return all;
  if (core::at1<int32_t>(el, 0) == 0) return all;
  const int64_t wl = core::at1<int32_t>(el, 1);
  if (wl < 1 || wl > world) return all;
  std::vector<int> m;
  for (int64_t l = 0; l < wl; ++l) {
    const int v = core::at1<int32_t>(el, 4 + world + l);
    if (v < 0 || v >= world) return all;
    m.push_back(v);
  }
  std::sort(m.begin(), m.end());
  if (std::adjacent_find(m.begin(), m.end()) != m.end()) return all;
  if (!std::binary_search(m.begin(), m.end(), static_cast<int>(rank))) return all;  // the caller is always a member
  return m;
}

}  // namespace moedist::ops

namespace moedist {

namespace {
template <typename Args>
void reject_call(const char* op, const Args& a, const std::string& message) {
  const std::string label = detail::str_cat("[rank ", a.ep_rank_id, "/", a.ep_world_size, "] ");
  const std::string msg = message.empty() ? "rejected by the caller" : message;
  try {
    auto ep = ops::lookup(a.group_ep, a.ep_rank_id, a.ep_world_size, op, "ep_world_size", label);
    ops::reject_step(ep, ops::fallback_members(a.elastic_info, a.ep_world_size, a.ep_rank_id), op, "", label, msg);
  } catch (...) {
  }
  if (a.tp_world_size != 2) return;
  try {
    auto tp = ops::lookup(a.group_tp, a.tp_rank_id, 2, op, "tp_world_size", label);
    ops::reject_step(tp, {0, 1}, op, "TP", label, msg);
  } catch (...) {
  }
}
}  // namespace

void reject_dispatch_v2(const DispatchArgs& args, const std::string& message) { reject_call("dispatch_v2", args, message); }
void reject_combine_v2(const CombineArgs& args, const std::string& message) { reject_call("combine_v2", args, message); }

}  // namespace moedist
