#include "ops/collective.h"

#include <algorithm>

#include "moedist/error.h"

namespace moedist::ops {

size_t Step::index_of(int phys_rank) const {
  auto it = std::lower_bound(members.begin(), members.end(), phys_rank);
  MOEDIST_ASSERT(it != members.end() && *it == phys_rank, "rank ", phys_rank, " is not a member");
  return static_cast<size_t>(it - members.begin());
}

void Step::run(const char* op, const std::string& self_label, const std::string* failure,
               const std::function<void(PutWriter&)>& produce) {
  BlobHeader hdr;
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
  blobs.assign(members.size() * bb, 0);

  ExchangeSpec spec;
  spec.op = op;
  spec.members = members;
  spec.blob = blob.data();
  spec.blob_bytes = bb;
  spec.blobs_out = blobs.data();
  spec.recv = recv;
  spec.produce = [&](PutWriter& w) {
    for (size_t i = 0; i < members.size(); ++i) {
      BlobHeader ph;
      std::memcpy(&ph, blobs.data() + i * bb, sizeof(ph));
      if (ph.status != 0 && members[i] != transport->rank())
        throw TransportError(detail::str_cat(self_label, op, ": rank ", members[i], " rejected its call: ", ph.message));
    }
    if (failure) throw InvalidArgument(*failure);
    for (size_t i = 0; i < members.size(); ++i) {
      BlobHeader ph;
      std::memcpy(&ph, blobs.data() + i * bb, sizeof(ph));
      for (int32_t j = 0; j < ph.n_uniform && j < hdr.n_uniform; ++j)
        if (ph.uniform[j] != hdr.uniform[j])
          throw InvalidArgument(detail::str_cat(self_label, op, ": ", uni[static_cast<size_t>(j)].first, "=", hdr.uniform[j], " but rank ",
                                                members[i], " passed ", ph.uniform[j], " (must be equal on every rank)"));
      if (ph.payload_bytes != hdr.payload_bytes)
        throw InvalidArgument(detail::str_cat(self_label, op, ": rank ", members[i], " sent ", ph.payload_bytes, " bytes of counts, this rank ",
                                              hdr.payload_bytes, " (the ranks disagree on ep_world_size, moe_expert_num or shared_expert_rank_num)"));
    }
    if (produce) produce(w);
  };
  transport->exchange(spec);
}

std::shared_ptr<Transport> lookup(const std::string& group, int64_t rank, int64_t world, const char* op, const char* what,
                                  const std::string& label) {
  auto t = resolve_group(group, rank, op);
  if (t->world_size() != world)
    throw InvalidArgument(detail::str_cat(label, op, ": ", what, "=", world, " but group \"", group, "\" has ", t->world_size(),
                                          " ranks (must be equal)"));
  return t;
}

std::vector<int> fallback_members(const TensorView& el, int64_t world) {
  std::vector<int> all;
  for (int i = 0; i < world; ++i) all.push_back(i);
  if (!el.defined() || el.dtype != DType::kInt32 || el.dim() != 1 || el.size(0) != 4 + 2 * world) return all;
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
  return m;
}

}  // namespace moedist::ops
