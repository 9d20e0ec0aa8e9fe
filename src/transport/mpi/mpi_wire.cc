#include "transport/mpi/mpi_wire.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <thread>

#include "moedist/error.h"

namespace moedist::transport {

namespace {

static_assert(sizeof(MPI_Request) <= sizeof(uintptr_t) && sizeof(MPI_Message) <= sizeof(uintptr_t));

template <typename T>
uintptr_t to_handle(T x) {
  uintptr_t h = 0;
  std::memcpy(&h, &x, sizeof(x));
  return h;
}
template <typename T>
T from_handle(uintptr_t h) {
  T x;
  std::memcpy(&x, &h, sizeof(x));
  return x;
}

int env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return 0;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (end == v || *end != 0 || x < 0 || x > std::numeric_limits<int>::max())
    throw InvalidArgument(detail::str_cat("environment ", name, "=\"", v, "\" is not a non-negative integer"));
  return static_cast<int>(x);
}

// The process's record of failed MPI groups, read by the finalize guard.
std::mutex g_fail_mu;
bool g_failed = false;
std::string g_fail_what;
std::chrono::milliseconds g_fail_timeout{0};

long finalize_grace_ms(std::chrono::milliseconds timeout) {
  if (const char* v = std::getenv("MOEDIST_MPI_FINALIZE_GRACE_MS")) {
    char* end = nullptr;
    const long x = std::strtol(v, &end, 10);
    if (end != v && *end == 0 && x > 0) return x;
  }
  return std::clamp<long>(static_cast<long>(timeout.count()), 10000, 60000);
}

// Runs at the start of MPI_Finalize (deletion of an attribute of MPI_COMM_SELF).
int finalize_callback(MPI_Comm, int, void*, void*) {
  std::string what;
  long grace = 0;
  {
    std::lock_guard<std::mutex> lock(g_fail_mu);
    if (!g_failed) return MPI_SUCCESS;
    what = g_fail_what;
    grace = finalize_grace_ms(g_fail_timeout);
  }
  // MPI_Finalize waits for every rank of the job; one that is stopped or stuck never comes. The
  // watchdog ends the job then; a normal finalize returns first and the process exits before it fires.
  // One rank aborting is enough (it ends the job), and several at once make Open MPI's mpirun more
  // likely to stumble: the ranks' watchdogs fire 250 ms apart, in rank order.
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  const long stagger = 250L * std::min(world_rank, 20);
  std::thread([what, grace, stagger] {
    std::this_thread::sleep_for(std::chrono::milliseconds(grace + stagger));
    std::fprintf(stderr,
                 "moedist: MPI_Finalize has not returned after %ld ms, and an MPI group of this process failed earlier: %s\n"
                 "moedist: the ranks MPI_Finalize waits for are stuck, stopped or dead: ending the job with MPI_Abort\n",
                 grace + stagger, what.c_str());
    std::fflush(stderr);
    // MPI_Abort asks the launcher to end every rank; should that itself not return or end the
    // process (the launcher is gone), the process ends on its own 10 s later.
    std::thread([] {
      std::this_thread::sleep_for(std::chrono::seconds(10));
      _exit(1);
    }).detach();
    MPI_Abort(MPI_COMM_WORLD, 1);
    _exit(1);
  }).detach();
  return MPI_SUCCESS;
}

}  // namespace

void mpi_finalize_guard() {
  static std::once_flag once;
  std::call_once(once, [] {
    int keyval = MPI_KEYVAL_INVALID;
    if (MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, finalize_callback, &keyval, nullptr) == MPI_SUCCESS)
      MPI_Comm_set_attr(MPI_COMM_SELF, keyval, nullptr);
  });
}

void note_mpi_group_failure(const std::string& what, std::chrono::milliseconds timeout) {
  {
    std::lock_guard<std::mutex> lock(g_fail_mu);
    if (!g_failed) {
      g_failed = true;
      g_fail_what = what;
      g_fail_timeout = timeout;
    }
  }
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (init && !fin) mpi_finalize_guard();
}

std::string mpi_group_failure() {
  std::lock_guard<std::mutex> lock(g_fail_mu);
  return g_failed ? g_fail_what : std::string();
}

std::string mpi_error_string(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) return detail::str_cat("MPI error ", rc);
  int cls = rc;
  MPI_Error_class(rc, &cls);
  std::string s(text, static_cast<size_t>(len));
  if (cls != rc) {
    char ctext[MPI_MAX_ERROR_STRING];
    int clen = 0;
    if (MPI_Error_string(cls, ctext, &clen) == MPI_SUCCESS && std::string(ctext, static_cast<size_t>(clen)) != s)
      s += detail::str_cat(" (", std::string(ctext, static_cast<size_t>(clen)), ")");
  }
  return s;
}

void check_mpi(int rc, const std::string& label, const char* what) {
  if (rc == MPI_SUCCESS) return;
  throw TransportError(detail::str_cat(label, what, " failed: ", mpi_error_string(rc)));
}

HostLayout detect_hosts(MPI_Comm comm, int ranks_per_host, bool hybrid, const std::string& label) {
  int rank = 0, world = 0;
  check_mpi(MPI_Comm_rank(comm, &rank), label, "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm, &world), label, "MPI_Comm_size");
  // Detected hosts: MPI's shared-memory domains, split further by network namespace (ranks in
  // different namespaces of one machine, e.g. containers, are treated as different hosts).
  MPI_Comm node = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node), label, "MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)");
  int nsize = 0;
  MPI_Comm_size(node, &nsize);
  const uint64_t ns = netns_id();
  std::vector<uint64_t> nss(static_cast<size_t>(nsize));
  std::vector<int> nranks(static_cast<size_t>(nsize));
  int rc = MPI_Allgather(&ns, 1, MPI_UINT64_T, nss.data(), 1, MPI_UINT64_T, node);
  if (rc == MPI_SUCCESS) rc = MPI_Allgather(&rank, 1, MPI_INT, nranks.data(), 1, MPI_INT, node);
  MPI_Comm_free(&node);
  check_mpi(rc, label, "MPI_Allgather (host detection)");
  int leader = rank;
  for (int i = 0; i < nsize; ++i)
    if (nss[static_cast<size_t>(i)] == ns) leader = std::min(leader, nranks[static_cast<size_t>(i)]);
  std::vector<int> leaders(static_cast<size_t>(world));
  check_mpi(MPI_Allgather(&leader, 1, MPI_INT, leaders.data(), 1, MPI_INT, comm), label, "MPI_Allgather (host detection)");

  HostLayout h;
  h.host_of.resize(static_cast<size_t>(world));
  std::map<int, int> index;  // leader rank -> host index (leaders ascend with the hosts' lowest ranks)
  for (int l : leaders) index.emplace(l, 0);
  int next = 0;
  for (auto& [l, i] : index) i = next++;
  for (int r = 0; r < world; ++r) h.host_of[static_cast<size_t>(r)] = index[leaders[static_cast<size_t>(r)]];

  int P = ranks_per_host > 0 ? ranks_per_host : env_int("MOEDIST_RANKS_PER_HOST");
  if (P > 0) {
    const char* from = ranks_per_host > 0 ? "ranks_per_host" : "MOEDIST_RANKS_PER_HOST";
    if (hybrid)
      for (int r = 1; r < world; ++r)
        if (r / P == (r - 1) / P && h.host_of[static_cast<size_t>(r)] != h.host_of[static_cast<size_t>(r - 1)])
          throw InvalidArgument(detail::str_cat(label, "make_hybrid_group: ", from, "=", P, " puts ranks ", r - 1, " and ", r,
                                                " on one host, but they do not share memory (MPI_COMM_TYPE_SHARED / network namespace): "
                                                "shared memory cannot join them (use make_mpi_group, or a ranks_per_host that divides the hosts)"));
    for (int r = 0; r < world; ++r) h.host_of[static_cast<size_t>(r)] = r / P;
  }
  return host_layout(std::move(h.host_of));
}

// ---------------------------------------------------------------------------------------------------
MpiWire::MpiWire(MPI_Comm comm) : comm_(comm) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &world_);
  mpi_finalize_guard();
}

MpiWire::~MpiWire() {
  // The communicator itself is kept (MPI_Finalize releases it). Freed, its context could be given to a
  // new communicator while a peer's message of a call this rank never joined is still on its way; Open
  // MPI then delivers that message into the new communicator and loses track of the sender's sequence
  // numbers there, so the new group hangs.
}

bool MpiWire::closed() const {
  int fin = 0;
  MPI_Finalized(&fin);
  return fin != 0;
}

Wire::Req MpiWire::isend(int peer, const void* p, size_t bytes, int tag, const char* what) {
  MPI_Request req = MPI_REQUEST_NULL;
  check(MPI_Isend(p, static_cast<int>(bytes), MPI_BYTE, peer, tag, comm_, &req), what);
  return Req{to_handle(req), true};
}

size_t MpiWire::test_sends(std::span<Req> reqs) {
  // One MPI_Testsome over the live requests (one progress pass for all of them).
  scratch_.clear();
  for (const Req& r : reqs) scratch_.push_back(r.live ? from_handle<MPI_Request>(r.h) : MPI_REQUEST_NULL);
  done_.resize(scratch_.size());
  int out = 0;
  check(MPI_Testsome(static_cast<int>(scratch_.size()), scratch_.data(), &out, done_.data(), MPI_STATUSES_IGNORE), "MPI_Testsome (sends)");
  size_t live = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].live = scratch_[i] != MPI_REQUEST_NULL;
    reqs[i].h = to_handle(scratch_[i]);
    live += reqs[i].live ? 1 : 0;
  }
  return live;
}

bool MpiWire::probe(int peer, int tag, Msg* m) {
  int flag = 0;
  MPI_Message msg = MPI_MESSAGE_NULL;
  MPI_Status status;
  check(MPI_Improbe(peer < 0 ? MPI_ANY_SOURCE : peer, tag, comm_, &flag, &msg, &status), "MPI_Improbe");
  if (!flag) return false;
  int count = 0;
  check(MPI_Get_count(&status, MPI_BYTE, &count), "MPI_Get_count");
  if (count == MPI_UNDEFINED || count < 0) throw TransportError(detail::str_cat(prefix_, "message of undefined size from rank ", status.MPI_SOURCE));
  m->source = status.MPI_SOURCE;
  m->bytes = static_cast<size_t>(count);
  m->h = to_handle(msg);
  return true;
}

Wire::Req MpiWire::irecv(const Msg& m, void* buf) {
  MPI_Message msg = from_handle<MPI_Message>(m.h);
  MPI_Request req = MPI_REQUEST_NULL;
  check(MPI_Imrecv(buf, static_cast<int>(m.bytes), MPI_BYTE, &msg, &req), "MPI_Imrecv");
  return Req{to_handle(req), true};
}

bool MpiWire::test(Req& r) {
  if (!r.live) return true;
  MPI_Request req = from_handle<MPI_Request>(r.h);
  int flag = 0;
  check(MPI_Test(&req, &flag, MPI_STATUS_IGNORE), "MPI_Test");
  r.h = to_handle(req);
  if (flag) r.live = false;
  return flag != 0;
}

void MpiWire::release(Req& r) noexcept {
  if (!r.live) return;
  r.live = false;
  if (closed()) return;
  MPI_Request req = from_handle<MPI_Request>(r.h);
  if (req != MPI_REQUEST_NULL) MPI_Request_free(&req);
}

bool MpiWire::post(int peer, const void* p, size_t bytes, int tag) noexcept {
  if (closed()) return false;
  MPI_Request req = MPI_REQUEST_NULL;
  if (MPI_Isend(p, static_cast<int>(bytes), MPI_BYTE, peer, tag, comm_, &req) != MPI_SUCCESS) return false;
  MPI_Request_free(&req);
  return true;
}

void MpiWire::drain() noexcept {
  if (closed()) return;
  // Messages of a failed call that already arrived are received, not left in MPI's queues.
  std::vector<unsigned char> sink;
  for (int i = 0; i < 100000; ++i) {
    int flag = 0, count = 0;
    MPI_Message msg;
    MPI_Status status;
    if (MPI_Improbe(MPI_ANY_SOURCE, MPI_ANY_TAG, comm_, &flag, &msg, &status) != MPI_SUCCESS || !flag) break;
    MPI_Get_count(&status, MPI_BYTE, &count);
    sink.resize(static_cast<size_t>(std::max(count, 1)));
    MPI_Mrecv(sink.data(), count, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
  }
}

void MpiWire::note_failure(const std::string& what, std::chrono::milliseconds timeout) noexcept {
  try {
    note_mpi_group_failure(what, timeout);
  } catch (...) {
  }
}

}  // namespace moedist::transport
