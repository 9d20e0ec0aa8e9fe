#include "transport/hybrid/hybrid_transport.h"

#include <algorithm>
#include <cstring>
#include <exception>

#include "moedist/error.h"

namespace moedist::transport {

Members split_members(const ExchangeSpec& spec, int me, int world, const std::vector<int>* local_of, std::vector<int>* local) {
  Members m;
  bool found = false;
  for (size_t i = 0; i < spec.members.size(); ++i) {
    const int p = spec.members[i];
    MOEDIST_ASSERT(p >= 0 && p < world && (i == 0 || p > spec.members[i - 1]), "bad member list");
    if (p == me) {
      m.self = i;
      found = true;
    }
    if (local_of && (*local_of)[static_cast<size_t>(p)] >= 0) {
      local->push_back((*local_of)[static_cast<size_t>(p)]);
    } else if (p != me) {
      m.remote.push_back(p);
      m.remote_index.push_back(i);
    }
  }
  MOEDIST_ASSERT(found, "rank ", me, " is not among the members");
  return m;
}

[[noreturn]] void abandon_and_rethrow(MessageEngine& e) {
  try {
    throw;
  } catch (const std::exception& ex) {
    e.abandon(ex.what());
    throw;
  } catch (...) {
    e.abandon("unknown error");
    throw;
  }
}

[[noreturn]] void peer_failed(const MessageEngine& e, const char* op, int peer) {
  throw TransportError(detail::str_cat(e.label(), op, ": rank ", peer, " failed while writing its data (its own error names the cause)"));
}

namespace {

class HybridWriter : public PutWriter {
 public:
  HybridWriter(MessageEngine& e, PutWriter& shm, const std::vector<int>& local_of) : e_(e), shm_(shm), local_of_(local_of) {}
  void* dest(int peer, int region, size_t offset, size_t bytes) override {
    MOEDIST_ASSERT(peer >= 0 && static_cast<size_t>(peer) < local_of_.size(), "write to rank ", peer, " of ", local_of_.size());
    const int l = local_of_[static_cast<size_t>(peer)];
    return l >= 0 ? shm_.dest(l, region, offset, bytes) : e_.dest(peer, region, offset, bytes);
  }

 private:
  MessageEngine& e_;
  PutWriter& shm_;
  const std::vector<int>& local_of_;
};

}  // namespace

HybridTransport::HybridTransport(std::string name, std::unique_ptr<MessageEngine> engine, HostLayout hosts, const std::string& job,
                                 const GroupOptions& options, int ranks_per_server)
    : name_(std::move(name)), hosts_(std::move(hosts)), engine_(std::move(engine)), ranks_per_server_(ranks_per_server) {
  const int world = engine_->world(), rank = engine_->rank();
  local_of_.assign(static_cast<size_t>(world), -1);
  const int my_host = hosts_.host_of[static_cast<size_t>(rank)];
  int my_local = -1;
  for (int r = 0; r < world; ++r)
    if (hosts_.host_of[static_cast<size_t>(r)] == my_host) {
      if (r == rank) my_local = static_cast<int>(local_ranks_.size());
      local_of_[static_cast<size_t>(r)] = static_cast<int>(local_ranks_.size());
      local_ranks_.push_back(r);
    }
  GroupOptions shm_options = options;
  shm_options.ranks_per_server = 0;
  shm_ = std::make_shared<ShmTransport>(job, detail::str_cat("h", my_host), static_cast<int>(local_ranks_.size()), my_local, shm_options);
  shm_->name_ranks(local_ranks_, world);  // its errors name ranks of this group
}

void HybridTransport::exchange(const ExchangeSpec& spec) {
  MessageEngine& e = *engine_;
  std::vector<int> local;
  const Members m = split_members(spec, e.rank(), e.world(), &local_of_, &local);
  exchanges_.store(exchanges_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  try {
    e.begin(spec, m.remote, m.remote_index);
  } catch (...) {
    abandon_and_rethrow(e);
  }
  const size_t bb = spec.blob_bytes;
  std::vector<unsigned char> local_blobs(local.size() * bb);
  bool mpi_done = false;
  ExchangeSpec sub;
  sub.op = spec.op;
  sub.members = local;
  sub.blob = spec.blob;
  sub.blob_bytes = bb;
  sub.blobs_out = local_blobs.data();
  sub.recv = spec.recv;
  // The shm half counts its waits by host-local index; they are added to spec.waits_us by rank.
  std::vector<int64_t> local_waits(spec.waits_us ? local_ranks_.size() : 0, 0);
  if (spec.waits_us) sub.waits_us = local_waits.data();
  auto add_local_waits = [&] {
    for (size_t l = 0; l < local_waits.size(); ++l) spec.waits_us[local_ranks_[l]] += local_waits[l];
  };
  sub.produce = [&](PutWriter& shm_writer) {
    // The shm blobs are in; now the remote ones, then the payload to both, then MPI wave 2.
    e.collect();
    for (size_t i = 0; i < local.size() && bb; ++i) {
      const int r = local_ranks_[static_cast<size_t>(local[i])];
      const size_t at = static_cast<size_t>(std::lower_bound(spec.members.begin(), spec.members.end(), r) - spec.members.begin());
      std::memcpy(static_cast<unsigned char*>(spec.blobs_out) + at * bb, local_blobs.data() + i * bb, bb);
    }
    std::exception_ptr local_error;
    if (spec.produce) {
      HybridWriter w(e, shm_writer, local_of_);
      try {
        spec.produce(w);
      } catch (...) {
        local_error = std::current_exception();
      }
    }
    const int failed = e.finish(local_error != nullptr);
    mpi_done = true;
    if (local_error) std::rethrow_exception(local_error);
    if (failed >= 0) peer_failed(e, spec.op, failed);
  };
  try {
    shm_->exchange(sub);
  } catch (const Timeout& ex) {
    add_local_waits();
    if (!mpi_done) abandon_and_rethrow(e);
    e.wire().note_failure(ex.what(), e.timeout());  // the shared-memory half timed out
    throw;
  } catch (...) {
    add_local_waits();
    if (!mpi_done) abandon_and_rethrow(e);
    throw;
  }
  add_local_waits();
}

TransportStats HybridTransport::stats() const {
  TransportStats s = shm_->stats();
  s.bytes_sent += engine_->bytes_sent();
  s.bytes_sent_inter_host = engine_->bytes_sent_inter_host();
  s.bytes_received_inter_host = engine_->bytes_received_inter_host();
  s.payload_bytes += engine_->payload_bytes();
  s.payload_bytes_inter_host = engine_->payload_bytes_inter_host();
  s.messages += engine_->messages();
  s.exchanges = exchanges_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace moedist::transport
