#include "transport/mpi/mpi_transport.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <random>

#include "moedist/error.h"
#include "transport/window/heap.h"
#include "transport/window/window_engine.h"

namespace moedist::transport {

namespace {

std::string comm_label(MPI_Comm comm) {
  int rank = -1, world = -1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &world);
  return detail::str_cat("[rank ", rank, "/", world, "] ");
}

// A private duplicate of the caller's communicator, returning MPI error codes instead of aborting.
MPI_Comm private_comm(MPI_Comm user, const char* who, const GroupOptions& options, const MpiOptions& mpi) {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (!init || fin)
    throw InvalidArgument(detail::str_cat(who, ": MPI is ", fin ? "already finalized" : "not initialized",
                                          " (call MPI_Init first, or use make_mpi_world_group, which initializes it)"));
  if (user == MPI_COMM_NULL) throw InvalidArgument(detail::str_cat(who, ": comm is MPI_COMM_NULL"));
  int inter = 0;
  check_mpi(MPI_Comm_test_inter(user, &inter), detail::str_cat(who, ": "), "MPI_Comm_test_inter");
  if (inter) throw InvalidArgument(detail::str_cat(who, ": comm is an intercommunicator (an intracommunicator is needed)"));
  const std::string label = comm_label(user) + who + ": ";
  if (options.ranks_per_server < 0)
    throw InvalidArgument(detail::str_cat(label, "ranks_per_server=", options.ranks_per_server, " (must be >= 0)"));
  if (mpi.ranks_per_host < 0) throw InvalidArgument(detail::str_cat(label, "ranks_per_host=", mpi.ranks_per_host, " (must be >= 0)"));
  MPI_Comm dup = MPI_COMM_NULL;
  check_mpi(MPI_Comm_dup(user, &dup), label, "MPI_Comm_dup");
  MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN);
  MPI_Comm_set_name(dup, const_cast<char*>("moedist"));
  return dup;
}

// Runs `f`; if it throws, frees `comm` first (the engine owns it only once constructed).
template <typename F>
auto owning(MPI_Comm& comm, F f) {
  try {
    return f();
  } catch (...) {
    MPI_Comm_free(&comm);
    throw;
  }
}

struct Members {
  std::vector<int> remote;
  std::vector<size_t> remote_index;
  size_t self = 0;
};

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

class MpiWriter : public PutWriter {
 public:
  MpiWriter(MpiEngine& e, const ExchangeSpec& spec) : e_(e), spec_(spec) {}
  void* dest(int peer, int region, size_t offset, size_t bytes) override {
    if (peer != e_.rank()) return e_.dest(peer, region, offset, bytes);
    MOEDIST_ASSERT(region >= 0 && static_cast<size_t>(region) < spec_.recv.size(), spec_.op, ": region ", region, " of rank ", peer);
    const size_t size = spec_.recv[static_cast<size_t>(region)].bytes;
    MOEDIST_ASSERT(bytes <= size && offset <= size - bytes, spec_.op, ": write of ", bytes, " bytes at ", offset, " past region ", region,
                   " (", size, " bytes) of rank ", peer);
    return static_cast<unsigned char*>(spec_.recv[static_cast<size_t>(region)].data) + offset;
  }

 private:
  MpiEngine& e_;
  const ExchangeSpec& spec_;
};

class HybridWriter : public PutWriter {
 public:
  HybridWriter(MpiEngine& e, PutWriter& shm, const std::vector<int>& local_of) : e_(e), shm_(shm), local_of_(local_of) {}
  void* dest(int peer, int region, size_t offset, size_t bytes) override {
    MOEDIST_ASSERT(peer >= 0 && static_cast<size_t>(peer) < local_of_.size(), "write to rank ", peer, " of ", local_of_.size());
    const int l = local_of_[static_cast<size_t>(peer)];
    return l >= 0 ? shm_.dest(l, region, offset, bytes) : e_.dest(peer, region, offset, bytes);
  }

 private:
  MpiEngine& e_;
  PutWriter& shm_;
  const std::vector<int>& local_of_;
};

// Inside a catch block: the exchange failed on this rank; the engine abandons it (telling the peers)
// and the exception goes on.
[[noreturn]] void abandon_and_rethrow(MpiEngine& e) {
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

[[noreturn]] void peer_failed(const MpiEngine& e, const char* op, int peer) {
  throw TransportError(detail::str_cat(e.label(), op, ": rank ", peer, " failed while writing its data (its own error names the cause)"));
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
MpiTransport::MpiTransport(MPI_Comm user, const GroupOptions& options, const MpiOptions& mpi) {
  MPI_Comm comm = private_comm(user, "make_mpi_group", options, mpi);
  hosts_ = owning(comm, [&] { return detect_hosts(comm, mpi.ranks_per_host, false, comm_label(comm) + "make_mpi_group: "); });
  int world = 0;
  MPI_Comm_size(comm, &world);
  engine_ = owning(comm, [&] { return std::make_unique<MpiEngine>(comm, hosts_.host_of, default_timeout(options.timeout)); });
  ranks_per_server_ = options.ranks_per_server > 0 ? options.ranks_per_server : hosts_.block > 0 ? hosts_.block : world;
}

void MpiTransport::exchange(const ExchangeSpec& spec) {
  MpiEngine& e = *engine_;
  const Members m = split_members(spec, e.rank(), e.world(), nullptr, nullptr);
  exchanges_.store(exchanges_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  try {
    e.begin(spec, m.remote, m.remote_index);
    e.collect();
  } catch (...) {
    abandon_and_rethrow(e);
  }
  if (spec.blob_bytes) std::memcpy(static_cast<unsigned char*>(spec.blobs_out) + m.self * spec.blob_bytes, spec.blob, spec.blob_bytes);
  std::exception_ptr local_error;
  if (spec.produce) {
    MpiWriter w(e, spec);
    try {
      spec.produce(w);
    } catch (...) {
      local_error = std::current_exception();
    }
  }
  int failed = -1;
  try {
    failed = e.finish(local_error != nullptr);
  } catch (...) {
    abandon_and_rethrow(e);
  }
  if (local_error) std::rethrow_exception(local_error);
  if (failed >= 0) peer_failed(e, spec.op, failed);
}

void* MpiTransport::scratch(int slot, size_t bytes) {
  if (slot >= static_cast<int>(scratch_.size())) {
    scratch_.resize(static_cast<size_t>(slot) + 1);
    scratch_bytes_.resize(static_cast<size_t>(slot) + 1, 0);
  }
  const size_t s = static_cast<size_t>(slot);
  if (scratch_bytes_[s] < bytes || !scratch_[s]) {
    const size_t n = std::max<size_t>(bytes, 64);
    auto* p = static_cast<unsigned char*>(std::aligned_alloc(64, (n + 63) / 64 * 64));
    if (!p) throw Error(detail::str_cat("moedist: out of memory allocating ", n, " bytes of scratch"));
    scratch_[s].reset(p);
    scratch_bytes_[s] = n;
  }
  return scratch_[s].get();
}

std::shared_ptr<unsigned char> MpiTransport::alloc(size_t bytes) { return pooled_host_alloc(bytes); }

TransportStats MpiTransport::stats() const {
  TransportStats s;
  s.bytes_sent = engine_->bytes_sent();
  s.bytes_sent_inter_host = engine_->bytes_sent_inter_host();
  s.payload_bytes = engine_->payload_bytes();
  s.payload_bytes_inter_host = engine_->payload_bytes_inter_host();
  s.messages = engine_->messages();
  s.exchanges = exchanges_.load(std::memory_order_relaxed);
  return s;
}

// ---------------------------------------------------------------------------------------------------
HybridTransport::HybridTransport(MPI_Comm user, const GroupOptions& options, const MpiOptions& mpi) {
  MPI_Comm comm = private_comm(user, "make_hybrid_group", options, mpi);
  const std::string label = comm_label(comm) + "make_hybrid_group: ";
  hosts_ = owning(comm, [&] { return detect_hosts(comm, mpi.ranks_per_host, true, label); });
  int world = 0, rank = 0;
  MPI_Comm_size(comm, &world);
  MPI_Comm_rank(comm, &rank);
  if (options.ranks_per_server > 0) {
    ranks_per_server_ = options.ranks_per_server;
  } else if (hosts_.block > 0) {
    ranks_per_server_ = hosts_.block;
  } else {
    std::string layout;
    for (int r = 0; r < world && r < 32; ++r) layout += detail::str_cat(r ? " " : "", hosts_.host_of[static_cast<size_t>(r)]);
    MPI_Comm_free(&comm);
    throw InvalidArgument(detail::str_cat(label, "the hosts do not hold consecutive, equal blocks of ranks (host of each rank: ", layout,
                                          world > 32 ? " ..." : "", "), which comm_alg \"hierarchy\" needs for its servers: place ranks by "
                                          "slot (mpirun --map-by slot, the default) or pass GroupOptions::ranks_per_server"));
  }
  // Job id for the host's shared-memory segments: made by rank 0, the same on every rank.
  char job[64] = {};
  if (rank == 0) {
    std::random_device rd;
    std::snprintf(job, sizeof(job), "mpi%dx%08x%08x", static_cast<int>(getpid()), rd(), rd());
  }
  owning(comm, [&] {
    check_mpi(MPI_Bcast(job, sizeof(job), MPI_CHAR, 0, comm), label, "MPI_Bcast (job id)");
    return 0;
  });
  local_of_.assign(static_cast<size_t>(world), -1);
  const int my_host = hosts_.host_of[static_cast<size_t>(rank)];
  int my_local = -1;
  for (int r = 0; r < world; ++r)
    if (hosts_.host_of[static_cast<size_t>(r)] == my_host) {
      if (r == rank) my_local = static_cast<int>(local_ranks_.size());
      local_of_[static_cast<size_t>(r)] = static_cast<int>(local_ranks_.size());
      local_ranks_.push_back(r);
    }
  engine_ = owning(comm, [&] { return std::make_unique<MpiEngine>(comm, hosts_.host_of, default_timeout(options.timeout)); });
  GroupOptions shm_options = options;
  shm_options.ranks_per_server = 0;
  shm_ = std::make_shared<ShmTransport>(job, detail::str_cat("h", my_host), static_cast<int>(local_ranks_.size()), my_local, shm_options);
}

void HybridTransport::exchange(const ExchangeSpec& spec) {
  MpiEngine& e = *engine_;
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
    note_mpi_group_failure(ex.what(), e.timeout());  // the shared-memory half timed out
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
  s.payload_bytes += engine_->payload_bytes();
  s.payload_bytes_inter_host = engine_->payload_bytes_inter_host();
  s.messages += engine_->messages();
  s.exchanges = exchanges_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace moedist::transport

namespace moedist {

std::shared_ptr<Transport> make_mpi_group(MPI_Comm comm, const GroupOptions& options, const MpiOptions& mpi) {
  return std::make_shared<transport::MpiTransport>(comm, options, mpi);
}

std::shared_ptr<Transport> make_hybrid_group(MPI_Comm comm, const GroupOptions& options, const MpiOptions& mpi) {
  return std::make_shared<transport::HybridTransport>(comm, options, mpi);
}

std::vector<int> mpi_hosts(const Transport& t) {
  if (auto* m = dynamic_cast<const transport::MpiTransport*>(&t)) return m->hosts().host_of;
  if (auto* h = dynamic_cast<const transport::HybridTransport*>(&t)) return h->hosts().host_of;
  return {};
}

}  // namespace moedist
