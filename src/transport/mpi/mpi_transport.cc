#include "transport/mpi/mpi_transport.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <cstdio>
#include <random>

#include "moedist/error.h"
#include "moedist/ucx.h"
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

class MpiWriter : public PutWriter {
 public:
  MpiWriter(MessageEngine& e, const ExchangeSpec& spec) : e_(e), spec_(spec) {}
  void* dest(int peer, int region, size_t offset, size_t bytes) override {
    if (peer != e_.rank()) return e_.dest(peer, region, offset, bytes);
    MOEDIST_ASSERT(region >= 0 && static_cast<size_t>(region) < spec_.recv.size(), spec_.op, ": region ", region, " of rank ", peer);
    const size_t size = spec_.recv[static_cast<size_t>(region)].bytes;
    MOEDIST_ASSERT(bytes <= size && offset <= size - bytes, spec_.op, ": write of ", bytes, " bytes at ", offset, " past region ", region,
                   " (", size, " bytes) of rank ", peer);
    return static_cast<unsigned char*>(spec_.recv[static_cast<size_t>(region)].data) + offset;
  }

 private:
  MessageEngine& e_;
  const ExchangeSpec& spec_;
};

// The message engine over `comm` (owned from here on); rank 0 makes the group's nonce.
std::unique_ptr<MessageEngine> mpi_engine(MPI_Comm comm, std::vector<int> host_of, std::chrono::milliseconds timeout, const std::string& label) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  uint64_t nonce = 0;
  if (rank == 0) {
    std::random_device rd;
    nonce = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }
  check_mpi(MPI_Bcast(&nonce, 1, MPI_UINT64_T, 0, comm), label, "MPI_Bcast (group nonce)");
  return std::make_unique<MessageEngine>(std::make_unique<MpiWire>(comm), std::move(host_of), timeout, nonce);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
MpiTransport::MpiTransport(MPI_Comm user, const GroupOptions& options, const MpiOptions& mpi) {
  MPI_Comm comm = private_comm(user, "make_mpi_group", options, mpi);
  hosts_ = owning(comm, [&] { return detect_hosts(comm, mpi.ranks_per_host, false, comm_label(comm) + "make_mpi_group: "); });
  int world = 0;
  MPI_Comm_size(comm, &world);
  engine_ = owning(comm, [&] { return mpi_engine(comm, hosts_.host_of, default_timeout(options.timeout), comm_label(comm)); });
  ranks_per_server_ = options.ranks_per_server > 0 ? options.ranks_per_server : hosts_.block > 0 ? hosts_.block : world;
}

void MpiTransport::exchange(const ExchangeSpec& spec) {
  MessageEngine& e = *engine_;
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
  s.bytes_received_inter_host = engine_->bytes_received_inter_host();
  s.payload_bytes = engine_->payload_bytes();
  s.payload_bytes_inter_host = engine_->payload_bytes_inter_host();
  s.messages = engine_->messages();
  s.exchanges = exchanges_.load(std::memory_order_relaxed);
  return s;
}

std::shared_ptr<Transport> make_mpi_hybrid(MPI_Comm user, const GroupOptions& options, const MpiOptions& mpi) {
  MPI_Comm comm = private_comm(user, "make_hybrid_group", options, mpi);
  const std::string label = comm_label(comm) + "make_hybrid_group: ";
  HostLayout hosts = owning(comm, [&] { return detect_hosts(comm, mpi.ranks_per_host, true, label); });
  int world = 0, rank = 0;
  MPI_Comm_size(comm, &world);
  MPI_Comm_rank(comm, &rank);
  int ranks_per_server = 0;
  if (options.ranks_per_server > 0) {
    ranks_per_server = options.ranks_per_server;
  } else if (hosts.block > 0) {
    ranks_per_server = hosts.block;
  } else {
    std::string layout;
    for (int r = 0; r < world && r < 32; ++r) layout += detail::str_cat(r ? " " : "", hosts.host_of[static_cast<size_t>(r)]);
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
  auto engine = owning(comm, [&] { return mpi_engine(comm, hosts.host_of, default_timeout(options.timeout), label); });
  return std::make_shared<HybridTransport>("hybrid", std::move(engine), std::move(hosts), job, options, ranks_per_server);
}

std::shared_ptr<Transport> make_mpi_ucx(MPI_Comm user, const GroupOptions& options, const MpiOptions& mpi) {
  // MPI only bootstraps: hosts, the job id and the allgather of the UCX addresses.
  MPI_Comm comm = private_comm(user, "make_ucx_group", options, mpi);
  const std::string label = comm_label(comm) + "make_ucx_group: ";
  try {
    HostLayout hosts = detect_hosts(comm, mpi.ranks_per_host, true, label);
    int world = 0, rank = 0;
    MPI_Comm_size(comm, &world);
    MPI_Comm_rank(comm, &rank);
    char job[64] = {};
    if (rank == 0) {
      std::random_device rd;
      std::snprintf(job, sizeof(job), "ucx%dx%08x%08x", static_cast<int>(getpid()), rd(), rd());
    }
    check_mpi(MPI_Bcast(job, sizeof(job), MPI_CHAR, 0, comm), label, "MPI_Bcast (job id)");
    UcxBootstrap b;
    b.rank = rank;
    b.world_size = world;
    b.host_of = hosts.host_of;
    b.job = job;
    b.allgather = [&](const std::string& mine) {
      int n = static_cast<int>(mine.size());
      std::vector<int> lens(static_cast<size_t>(world)), offs(static_cast<size_t>(world));
      check_mpi(MPI_Allgather(&n, 1, MPI_INT, lens.data(), 1, MPI_INT, comm), label, "MPI_Allgather (address lengths)");
      int total = 0;
      for (int r = 0; r < world; ++r) {
        offs[static_cast<size_t>(r)] = total;
        total += lens[static_cast<size_t>(r)];
      }
      std::string all(static_cast<size_t>(total), '\0');
      check_mpi(MPI_Allgatherv(mine.data(), n, MPI_CHAR, all.data(), lens.data(), offs.data(), MPI_CHAR, comm), label,
                "MPI_Allgatherv (addresses)");
      std::vector<std::string> out(static_cast<size_t>(world));
      for (int r = 0; r < world; ++r)
        out[static_cast<size_t>(r)] = all.substr(static_cast<size_t>(offs[static_cast<size_t>(r)]), static_cast<size_t>(lens[static_cast<size_t>(r)]));
      return out;
    };
    auto t = make_ucx_group(b, options);
    MPI_Comm_free(&comm);
    return t;
  } catch (...) {
    MPI_Comm_free(&comm);
    throw;
  }
}

}  // namespace moedist::transport

namespace moedist {

std::shared_ptr<Transport> make_ucx_group(MPI_Comm comm, const GroupOptions& options, const MpiOptions& mpi) {
  return transport::make_mpi_ucx(comm, options, mpi);
}

std::shared_ptr<Transport> make_mpi_group(MPI_Comm comm, const GroupOptions& options, const MpiOptions& mpi) {
  return std::make_shared<transport::MpiTransport>(comm, options, mpi);
}

std::shared_ptr<Transport> make_hybrid_group(MPI_Comm comm, const GroupOptions& options, const MpiOptions& mpi) {
  return transport::make_mpi_hybrid(comm, options, mpi);
}

std::vector<int> mpi_hosts(const Transport& t) {
  if (auto* m = dynamic_cast<const transport::MpiTransport*>(&t)) return m->hosts().host_of;
  if (auto* h = dynamic_cast<const transport::HybridTransport*>(&t)) return h->hosts().host_of;
  return {};
}

}  // namespace moedist
