#include "transport/mpi/mpi_engine.h"

#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "moedist/error.h"

namespace moedist::transport {

namespace {

constexpr int kTagArrive = 0x4d31;
constexpr int kTagDone = 0x4d32;
constexpr int kTagGaveUp = 0x4d33;
constexpr size_t kMinBlock = 16 * 1024;
constexpr size_t kMaxChunk = size_t{1} << 30;  // one PutWriter::dest; blocks stay below INT_MAX bytes

// Every message carries the group's nonce: MPI may give a new communicator the context of a freed one,
// and messages a failed call left unreceived on the old one must not be taken for the new group's.
struct ArriveHdr {
  uint64_t epoch;
  uint64_t nonce;
  uint32_t nregions;
  uint32_t blob_bytes;
};
struct BlockHdr {
  uint64_t epoch;
  uint64_t nonce;
  uint32_t failed;
  uint16_t nblocks;     // first block only: messages of this wave from the sender, this one included
  uint16_t first_skip;  // padding before the first chunk header
};
// info: bytes (bits 0-47) | region (48-59) | padding after the payload before the next header (60-63).
struct ChunkHdr {
  uint64_t offset;
  uint64_t info;
};
// A rank gave up its call `epoch` with the receiver, waiting for the culprits (none: it failed itself).
struct GaveUp {
  uint64_t epoch;
  uint64_t nonce;
  int32_t nculprits;  // followed by that many int32 ranks
  int32_t unused;
};
static_assert(sizeof(ArriveHdr) == 24 && sizeof(BlockHdr) == 24 && sizeof(ChunkHdr) == 16 && sizeof(GaveUp) == 24);
constexpr uint64_t kBytesMask = (uint64_t{1} << 48) - 1;
constexpr size_t kMaxRegionsMpi = 4096;

uint64_t chunk_bytes(const ChunkHdr& h) { return h.info & kBytesMask; }
uint64_t chunk_region(const ChunkHdr& h) { return (h.info >> 48) & 0xfff; }
uint64_t chunk_skip(const ChunkHdr& h) { return h.info >> 60; }

Bytes alloc_bytes(size_t n) {
  const size_t cap = (std::max<size_t>(n, 64) + 63) / 64 * 64;
  auto* p = static_cast<unsigned char*>(std::aligned_alloc(64, cap));
  if (!p) throw Error(detail::str_cat("moedist: out of memory allocating ", cap, " bytes for MPI messages"));
  return Bytes(p);
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

uint64_t netns_id() {
  struct stat st {};
  if (stat("/proc/self/ns/net", &st) != 0) return 0;
  return (static_cast<uint64_t>(st.st_dev) << 32) ^ static_cast<uint64_t>(st.st_ino);
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

void FreeBytes::operator()(unsigned char* p) const { std::free(p); }

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
  h.nhosts = h.host_of.empty() ? 0 : h.host_of.back() + 1;
  for (int r = 0; r < world; ++r) h.nhosts = std::max(h.nhosts, h.host_of[static_cast<size_t>(r)] + 1);
  // Consecutive blocks of equal size (the last may be smaller)?
  std::vector<int> first(static_cast<size_t>(h.nhosts), -1), count(static_cast<size_t>(h.nhosts), 0);
  bool consecutive = true;
  for (int r = 0; r < world; ++r) {
    const int x = h.host_of[static_cast<size_t>(r)];
    if (first[static_cast<size_t>(x)] < 0) first[static_cast<size_t>(x)] = r;
    else if (h.host_of[static_cast<size_t>(r - 1)] != x) consecutive = false;
    ++count[static_cast<size_t>(x)];
  }
  if (consecutive) {
    const int B = count[0];
    for (int x = 0; x < h.nhosts; ++x)
      if (count[static_cast<size_t>(x)] != B && !(x == h.nhosts - 1 && count[static_cast<size_t>(x)] < B)) consecutive = false;
    if (consecutive) h.block = B;
  }
  return h;
}

MpiEngine::MpiEngine(MPI_Comm comm, std::vector<int> host_of, std::chrono::milliseconds timeout)
    : comm_(comm), host_of_(std::move(host_of)), timeout_(timeout) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &world_);
  peers_.resize(static_cast<size_t>(world_));
  if (rank_ == 0) {
    std::random_device rd;
    nonce_ = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }
  check_mpi(MPI_Bcast(&nonce_, 1, MPI_UINT64_T, 0, comm_), label(), "MPI_Bcast (group nonce)");  // the caller frees comm
  mpi_finalize_guard();
}

MpiEngine::~MpiEngine() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) {
    for (auto& r : sends_)
      if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
    for (auto& p : peers_)
      if (p.rreq != MPI_REQUEST_NULL) MPI_Request_free(&p.rreq);
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
    // The communicator itself is kept (MPI_Finalize releases it). Freed, its context could be given
    // to a new communicator while a peer's message of a call this rank never joined is still on its
    // way; Open MPI then delivers that message into the new communicator and loses track of the
    // sender's sequence numbers there, so the new group hangs.
  }
  // Buffers of abandoned requests may still be in MPI's hands: they are left allocated.
  for (auto& b : graveyard_) (void)b.release();
  for (auto& v : graveyard_vec_) new std::vector<unsigned char>(std::move(v));
  for (auto& v : notices_) new std::vector<unsigned char>(std::move(v));
}

std::string MpiEngine::label() const { return detail::str_cat("[rank ", rank_, "/", world_, "] "); }

bool MpiEngine::serves(int peer) const {
  return peer >= 0 && peer < world_ && peer != rank_ && peers_[static_cast<size_t>(peer)].active;
}

void MpiEngine::send(int peer, const void* p, size_t bytes, int tag) {
  MPI_Request req = MPI_REQUEST_NULL;
  check(MPI_Isend(p, static_cast<int>(bytes), MPI_BYTE, peer, tag, comm_, &req), tag == kTagArrive ? "MPI_Isend (counts)" : "MPI_Isend (data)");
  sends_.push_back(req);
  sends_to_.push_back(peer);
  add(bytes_sent_, bytes);
  add(messages_, 1);
  if (host_of_[static_cast<size_t>(peer)] != host_of_[static_cast<size_t>(rank_)]) add(bytes_inter_, bytes);
}

template <typename Step, typename Missing>
void MpiEngine::poll(Step step, Missing missing) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto deadline = start + timeout_;
  auto next_check = start + std::chrono::milliseconds(20);
  waiting_ = false;
  for (int i = 0;; ++i) {
    if (step()) return;
    if (i == 0) {
      waiting_ = true;
      wait_mark_ = start;
    }
    if (i < 64) continue;  // each MPI call above progresses the transfers
    take_notices();
    const auto now = Clock::now();
    if (now >= next_check) {  // every 20 ms: was this rank interrupted (set_interrupt_check, SIGINT)?
      next_check = now + std::chrono::milliseconds(20);
      if (detail::interrupt_requested())
        throw Interrupted(detail::str_cat(label(), op_, ": interrupted while waiting for its peers"));
    }
    if (now >= deadline) {
      const auto [ranks, what] = missing();
      timed_out(ranks, what);
    }
    // More ranks than cores must still progress: yield, then sleep a little.
    if (now - start < std::chrono::milliseconds(2))
      sched_yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

void MpiEngine::arrived(int peer) {
  int64_t* waits = spec_ ? spec_->waits_us : nullptr;
  if (!waiting_ || !waits) return;
  const auto now = std::chrono::steady_clock::now();
  waits[peer] += std::chrono::duration_cast<std::chrono::microseconds>(now - wait_mark_).count();
  wait_mark_ = now;
}

std::string MpiEngine::ranks_str(const std::vector<int32_t>& r) const {
  std::string s = r.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < r.size(); ++i) s += detail::str_cat(i == 0 ? "" : i + 1 == r.size() ? " and " : ", ", r[i]);
  return s;
}

void MpiEngine::timed_out(const std::vector<int>& missing, const char* what) {
  // A missing peer that gave up its previous call waiting for other ranks is waiting for nobody now:
  // those ranks are the ones that did not come.
  std::vector<int32_t> named;
  std::string notes;
  for (int p : missing) {
    const Peer& st = peers_[static_cast<size_t>(p)];
    std::vector<int32_t> c = {p};
    if (!st.gave_up_on.empty() && st.gave_up_epoch + 1 >= st.epoch &&
        std::find(st.gave_up_on.begin(), st.gave_up_on.end(), rank_) == st.gave_up_on.end()) {
      c = st.gave_up_on;
      notes += detail::str_cat("; rank ", p, " gave up its previous call waiting for ", ranks_str(c));
    }
    for (int32_t x : c)
      if (std::find(named.begin(), named.end(), x) == named.end()) named.push_back(x);
  }
  std::sort(named.begin(), named.end());
  culprits_ = named;
  const bool one = named.size() == 1;
  throw Timeout(detail::str_cat(label(), op_, ": timed out after ", timeout_.count(), " ms waiting for ", ranks_str(named), " to ", what,
                                one ? " (it did not call " : " (they did not call ", op_, one ? ", or is stuck or dead)" : ", or are stuck or dead)",
                                notes));
}

void MpiEngine::take_notices() {
  for (;;) {
    int flag = 0;
    MPI_Message msg = MPI_MESSAGE_NULL;
    MPI_Status status;
    check(MPI_Improbe(MPI_ANY_SOURCE, kTagGaveUp, comm_, &flag, &msg, &status), "MPI_Improbe (notices)");
    if (!flag) break;
    int count = 0;
    MPI_Get_count(&status, MPI_BYTE, &count);
    std::vector<unsigned char> m(static_cast<size_t>(std::max(count, 1)));
    check(MPI_Mrecv(m.data(), count, MPI_BYTE, &msg, MPI_STATUS_IGNORE), "MPI_Mrecv (notice)");
    const int src = status.MPI_SOURCE;
    GaveUp g{};
    if (count < static_cast<int>(sizeof(g)) || src < 0 || src >= world_) continue;
    std::memcpy(&g, m.data(), sizeof(g));
    Peer& st = peers_[static_cast<size_t>(src)];
    if (g.nonce != nonce_ || g.epoch < st.gave_up_epoch || g.nculprits < 0 || g.nculprits > world_ ||
        static_cast<size_t>(count) != sizeof(g) + 4 * static_cast<size_t>(g.nculprits))
      continue;
    st.gave_up_epoch = g.epoch;
    st.gave_up_on.resize(static_cast<size_t>(g.nculprits));
    if (g.nculprits) std::memcpy(st.gave_up_on.data(), m.data() + sizeof(g), 4 * static_cast<size_t>(g.nculprits));
  }
  for (int p : remote_) {
    const Peer& st = peers_[static_cast<size_t>(p)];
    if (st.gave_up_epoch != st.epoch) continue;
    // p gave up this very call: it will not finish it.
    const std::vector<int32_t>& c = st.gave_up_on;
    if (std::find(c.begin(), c.end(), rank_) != c.end()) {
      culprits_ = {p};
      throw Timeout(detail::str_cat(label(), op_, ": rank ", p, " gave up this call after waiting ", timeout_.count(),
                                    " ms for this rank (this rank came too late)"));
    }
    if (!c.empty()) {
      culprits_ = c;
      throw Timeout(detail::str_cat(label(), op_, ": timed out after ", timeout_.count(), " ms waiting for ", ranks_str(c), " (rank ", p,
                                    " gave up this call waiting for ", c.size() == 1 ? "it; it" : "them; they", " did not call ", op_, ", or ",
                                    c.size() == 1 ? "is" : "are", " stuck or dead)"));
    }
    culprits_ = {p};
    throw TransportError(detail::str_cat(label(), op_, ": rank ", p, " failed in this call (its own error names the cause)"));
  }
}

void MpiEngine::check(int rc, const char* what) const {
  if (rc != MPI_SUCCESS) check_mpi(rc, label() + op_ + ": ", what);
}

bool MpiEngine::try_receive(int peer, Peer& st, int tag) {
  if (st.rstate == 0) {
    int flag = 0;
    MPI_Message msg = MPI_MESSAGE_NULL;
    MPI_Status status;
    check(MPI_Improbe(peer, tag, comm_, &flag, &msg, &status), "MPI_Improbe");
    if (!flag) return false;
    int count = 0;
    check(MPI_Get_count(&status, MPI_BYTE, &count), "MPI_Get_count");
    if (count == MPI_UNDEFINED || count < 0)
      throw TransportError(detail::str_cat(label(), op_, ": message of undefined size from rank ", peer));
    if (static_cast<size_t>(count) > st.rcap) {
      st.rbuf = alloc_bytes(static_cast<size_t>(count));
      st.rcap = (std::max<size_t>(static_cast<size_t>(count), 64) + 63) / 64 * 64;
    }
    check(MPI_Imrecv(st.rbuf.get(), count, MPI_BYTE, &msg, &st.rreq), "MPI_Imrecv");
    st.rlen = static_cast<size_t>(count);
    st.rstate = 1;
  }
  int flag = 0;
  check(MPI_Test(&st.rreq, &flag, MPI_STATUS_IGNORE), "MPI_Test (receive)");
  if (!flag) return false;
  st.rstate = 0;
  return true;
}

void MpiEngine::begin(const ExchangeSpec& spec, std::span<const int> remote, std::span<const size_t> index) {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) throw TransportError(detail::str_cat(label(), spec.op, ": MPI was finalized (the MPI group can no longer be used)"));
  spec_ = &spec;
  op_ = spec.op;
  culprits_.clear();
  for (int p : remote_) peers_[static_cast<size_t>(p)].active = false;
  remote_.assign(remote.begin(), remote.end());
  sends_.clear();
  sends_to_.clear();
  MOEDIST_ASSERT(spec.recv.size() < kMaxRegionsMpi);
  MOEDIST_ASSERT(spec.blob_bytes <= kMpiBlobMax, "blob of ", spec.blob_bytes, " bytes > ", kMpiBlobMax);
  ArriveHdr hdr{0, nonce_, static_cast<uint32_t>(spec.recv.size()), static_cast<uint32_t>(spec.blob_bytes)};
  const size_t abytes = sizeof(ArriveHdr) + 8 * spec.recv.size() + spec.blob_bytes;
  for (size_t i = 0; i < remote.size(); ++i) {
    const int p = remote[i];
    MOEDIST_ASSERT(p >= 0 && p < world_ && p != rank_, "bad remote member ", p);
    Peer& st = peers_[static_cast<size_t>(p)];
    st.active = true;
    st.index = index[i];
    ++st.epoch;
    st.regions.clear();
    st.nblocks = 0;
    st.last_chunk = SIZE_MAX;
    st.rstate = 0;
    st.first = true;
    st.blocks_left = 0;
    st.failed = false;
    hdr.epoch = st.epoch;
    st.arrive.resize(abytes);
    unsigned char* m = st.arrive.data();
    std::memcpy(m, &hdr, sizeof(hdr));
    for (size_t r = 0; r < spec.recv.size(); ++r) {
      const uint64_t b = spec.recv[r].bytes;
      std::memcpy(m + sizeof(hdr) + 8 * r, &b, 8);
    }
    if (spec.blob_bytes) std::memcpy(m + sizeof(hdr) + 8 * spec.recv.size(), spec.blob, spec.blob_bytes);
  }
  for (int p : remote_) send(p, peers_[static_cast<size_t>(p)].arrive.data(), abytes, kTagArrive);
}

void MpiEngine::collect() {
  const ExchangeSpec& spec = *spec_;
  size_t pending = remote_.size();
  poll(
      [&] {
        for (int p : remote_) {
          Peer& st = peers_[static_cast<size_t>(p)];
          if (st.rstate == 2) continue;
          while (st.rstate != 2 && try_receive(p, st, kTagArrive)) {
            const unsigned char* m = st.rbuf.get();
            ArriveHdr h;
            if (st.rlen < sizeof(h)) throw TransportError(detail::str_cat(label(), op_, ": malformed message from rank ", p));
            std::memcpy(&h, m, sizeof(h));
            if (h.nonce != nonce_ || h.epoch < st.epoch) continue;  // left over from a call that failed on one side
            if (h.epoch > st.epoch)
              throw TransportError(detail::str_cat(label(), op_, ": rank ", p, " is in its call ", h.epoch, " with this rank, this rank in call ",
                                                   st.epoch, " (an earlier call failed on one side: make the group again)"));
            if (h.nregions >= kMaxRegionsMpi || st.rlen != sizeof(h) + 8 * size_t{h.nregions} + h.blob_bytes)
              throw TransportError(detail::str_cat(label(), op_, ": malformed message from rank ", p));
            st.regions.resize(h.nregions);
            if (h.nregions) std::memcpy(st.regions.data(), m + sizeof(h), 8 * size_t{h.nregions});
            if (spec.blob_bytes) {
              // A longer blob is cut, a shorter one zero-padded: the caller's header tells them apart.
              unsigned char* dst = static_cast<unsigned char*>(spec.blobs_out) + st.index * spec.blob_bytes;
              const size_t n = std::min<size_t>(h.blob_bytes, spec.blob_bytes);
              std::memcpy(dst, m + sizeof(h) + 8 * size_t{h.nregions}, n);
              std::memset(dst + n, 0, spec.blob_bytes - n);
            }
            st.rstate = 2;
            --pending;
            arrived(p);
          }
        }
        return pending == 0;
      },
      [&] {
        std::vector<int> m;
        for (int p : remote_)
          if (peers_[static_cast<size_t>(p)].rstate != 2) m.push_back(p);
        return std::pair<std::vector<int>, const char*>{m, "arrive"};
      });
  for (int p : remote_) peers_[static_cast<size_t>(p)].rstate = 0;
}

MpiEngine::Block& MpiEngine::room(Peer& st, size_t need) {
  if (st.nblocks > 0) {
    Block& b = st.blocks[st.nblocks - 1];
    if (b.used + need <= b.cap) return b;
  }
  const size_t want = need + sizeof(BlockHdr) + 16;
  if (st.nblocks < st.blocks.size() && st.blocks[st.nblocks].cap >= want) {
    // reuse
  } else {
    size_t cap = std::max({want, st.next_cap, kMinBlock});
    if (st.nblocks > 0) cap = std::max(cap, std::min<size_t>(2 * st.blocks[st.nblocks - 1].cap, kMaxChunk));
    Block nb;
    nb.data = alloc_bytes(cap);
    nb.cap = cap;
    if (st.nblocks < st.blocks.size())
      st.blocks[st.nblocks] = std::move(nb);
    else
      st.blocks.push_back(std::move(nb));
  }
  MOEDIST_ASSERT(st.nblocks < 65535, "too many MPI message blocks");
  Block& b = st.blocks[st.nblocks++];
  b.used = sizeof(BlockHdr);
  std::memset(b.data.get(), 0, sizeof(BlockHdr));
  st.last_chunk = SIZE_MAX;
  return b;
}

void* MpiEngine::dest(int peer, int region, size_t offset, size_t bytes) {
  MOEDIST_ASSERT(serves(peer), op_, ": rank ", rank_, " writes to rank ", peer, " which is not a member");
  Peer& st = peers_[static_cast<size_t>(peer)];
  MOEDIST_ASSERT(region >= 0 && static_cast<size_t>(region) < st.regions.size(), op_, ": region ", region, " of rank ", peer);
  const uint64_t size = st.regions[static_cast<size_t>(region)];
  MOEDIST_ASSERT(bytes <= size && offset <= size - bytes, op_, ": write of ", bytes, " bytes at ", offset, " past region ", region, " (",
                 size, " bytes) of rank ", peer);
  static unsigned char nothing[16];
  if (bytes == 0) return nothing;
  if (bytes > kMaxChunk)
    throw Unsupported(detail::str_cat(label(), op_, ": one write of ", bytes, " bytes to rank ", peer, " (the MPI transport takes at most ",
                                      kMaxChunk, " bytes per write)"));
  add(payload_, bytes);
  if (host_of_[static_cast<size_t>(peer)] != host_of_[static_cast<size_t>(rank_)]) add(payload_inter_, bytes);
  // Extend the previous chunk when this write continues it.
  if (st.nblocks > 0 && st.last_chunk != SIZE_MAX) {
    Block& b = st.blocks[st.nblocks - 1];
    ChunkHdr h;  // headers are not aligned: copied, not dereferenced
    std::memcpy(&h, b.data.get() + st.last_chunk, sizeof(h));
    if (chunk_region(h) == static_cast<uint64_t>(region) && h.offset + chunk_bytes(h) == offset && chunk_bytes(h) + bytes <= kMaxChunk &&
        b.used + bytes <= b.cap) {
      h.info += bytes;
      std::memcpy(b.data.get() + st.last_chunk, &h, sizeof(h));
      unsigned char* p = b.data.get() + b.used;
      b.used += bytes;
      return p;
    }
  }
  // The payload gets the alignment the write has in the receive region (up to 16): a 4-byte scale
  // at a multiple of 4 needs at most 3 bytes of padding, a row at a multiple of 16 up to 15.
  const size_t a = std::min<size_t>(16, static_cast<size_t>((offset | bytes | 16) & ~((offset | bytes | 16) - 1)));
  Block* b = &room(st, a - 1 + sizeof(ChunkHdr) + bytes);
  const size_t pad = static_cast<size_t>((offset - b->used) & (a - 1));
  const size_t at = b->used + pad;
  if (st.last_chunk != SIZE_MAX) {
    ChunkHdr prev;
    std::memcpy(&prev, b->data.get() + st.last_chunk, sizeof(prev));
    prev.info |= static_cast<uint64_t>(pad) << 60;
    std::memcpy(b->data.get() + st.last_chunk, &prev, sizeof(prev));
  } else {
    reinterpret_cast<BlockHdr*>(b->data.get())->first_skip = static_cast<uint16_t>(pad);
  }
  ChunkHdr h{offset, static_cast<uint64_t>(bytes) | (static_cast<uint64_t>(region) << 48)};
  std::memcpy(b->data.get() + at, &h, sizeof(h));
  st.last_chunk = at;
  b->used = at + sizeof(ChunkHdr) + bytes;
  return b->data.get() + at + sizeof(ChunkHdr);
}

void MpiEngine::unpack(int peer, const unsigned char* m, size_t len) {
  const ExchangeSpec& spec = *spec_;
  auto bad = [&](const char* why) {
    return TransportError(detail::str_cat(label(), op_, ": malformed data message from rank ", peer, " (", why, ")"));
  };
  BlockHdr bh;
  std::memcpy(&bh, m, sizeof(bh));
  size_t pos = sizeof(BlockHdr) + bh.first_skip;
  while (pos < len) {
    if (len - pos < sizeof(ChunkHdr)) throw bad("truncated chunk header");
    ChunkHdr h;
    std::memcpy(&h, m + pos, sizeof(h));
    const uint64_t n = chunk_bytes(h), r = chunk_region(h);
    if (n > len - pos - sizeof(ChunkHdr)) throw bad("chunk past the end");
    if (r >= spec.recv.size()) throw bad("no such receive region");
    const uint64_t size = spec.recv[r].bytes;
    if (n > size || h.offset > size - n)
      throw TransportError(detail::str_cat(label(), op_, ": rank ", peer, " wrote ", n, " bytes at ", h.offset, " of receive region ", r, " (",
                                           size, " bytes)"));
    std::memcpy(static_cast<unsigned char*>(spec.recv[r].data) + h.offset, m + pos + sizeof(ChunkHdr), n);
    pos += sizeof(ChunkHdr) + n + chunk_skip(h);
  }
}

int MpiEngine::finish(bool failed) {
  // Send: the header completes each peer's first block; a failed rank sends the header alone.
  for (int p : remote_) {
    Peer& st = peers_[static_cast<size_t>(p)];
    if (st.nblocks == 0) room(st, 0);
    if (failed) st.nblocks = 1;
    for (size_t i = 0; i < st.nblocks; ++i) {
      Block& b = st.blocks[i];
      auto* h = reinterpret_cast<BlockHdr*>(b.data.get());
      h->epoch = st.epoch;
      h->nonce = nonce_;
      h->failed = failed ? 1u : 0u;
      h->nblocks = static_cast<uint16_t>(i == 0 ? st.nblocks : 0);
      if (failed) {
        h->first_skip = 0;
        b.used = sizeof(BlockHdr);
      }
    }
  }
  for (int p : remote_) {
    Peer& st = peers_[static_cast<size_t>(p)];
    for (size_t i = 0; i < st.nblocks; ++i) send(p, st.blocks[i].data.get(), st.blocks[i].used, kTagDone);
  }
  // Receive every peer's blocks, unpacking each as it lands; complete our own sends.
  size_t pending = remote_.size();
  size_t sends_left = sends_.size();  // the wave-1 sends are among them
  std::vector<int> done_idx(sends_.size());
  poll(
      [&] {
        for (int p : remote_) {
          Peer& st = peers_[static_cast<size_t>(p)];
          while (st.rstate != 2 && try_receive(p, st, kTagDone)) {
            const unsigned char* m = st.rbuf.get();
            BlockHdr bh;
            if (st.rlen < sizeof(bh)) throw TransportError(detail::str_cat(label(), op_, ": malformed data message from rank ", p));
            std::memcpy(&bh, m, sizeof(bh));
            if (bh.nonce != nonce_ || bh.epoch < st.epoch) continue;  // left over from a call that failed on one side
            if (bh.epoch > st.epoch)
              throw TransportError(detail::str_cat(label(), op_, ": rank ", p, " is in its call ", bh.epoch, " with this rank, this rank in call ",
                                                   st.epoch, " (an earlier call failed on one side: make the group again)"));
            if (st.first) {
              st.first = false;
              if (bh.nblocks < 1) throw TransportError(detail::str_cat(label(), op_, ": malformed data message from rank ", p));
              st.failed = bh.failed != 0;
              st.blocks_left = bh.nblocks;
            }
            if (!st.failed) unpack(p, m, st.rlen);
            if (--st.blocks_left == 0) {
              st.rstate = 2;
              --pending;
              arrived(p);
            }
          }
        }
        if (sends_left > 0) {
          int out = 0;
          check(MPI_Testsome(static_cast<int>(sends_.size()), sends_.data(), &out, done_idx.data(), MPI_STATUSES_IGNORE),
                "MPI_Testsome (sends)");
          sends_left = out == MPI_UNDEFINED ? 0 : sends_left - static_cast<size_t>(out);
        }
        const bool sends_done = sends_left == 0;
        return pending == 0 && sends_done;
      },
      [&] {
        // The peers whose data is missing; only when none is, those that have not taken this rank's.
        std::vector<int> m;
        for (int p : remote_)
          if (peers_[static_cast<size_t>(p)].rstate != 2) m.push_back(p);
        if (!m.empty()) return std::pair<std::vector<int>, const char*>{m, "finish writing"};
        for (size_t i = 0; i < sends_.size(); ++i)
          if (sends_[i] != MPI_REQUEST_NULL && std::find(m.begin(), m.end(), sends_to_[i]) == m.end()) m.push_back(sends_to_[i]);
        return std::pair<std::vector<int>, const char*>{m, "receive this rank's data"};
      });
  sends_.clear();
  sends_to_.clear();
  int failed_peer = -1;
  for (int p : remote_) {
    Peer& st = peers_[static_cast<size_t>(p)];
    if (st.failed && failed_peer < 0) failed_peer = p;
    // Several blocks this time: one block of their total size next time.
    if (st.nblocks > 1) {
      size_t total = 0;
      for (size_t i = 0; i < st.nblocks; ++i) total += st.blocks[i].used;
      st.blocks.clear();
      st.next_cap = std::min(total + total / 4, kMaxChunk + kMaxChunk / 2);
    }
    st.nblocks = 0;
  }
  return failed_peer;
}

void MpiEngine::abandon(const char* why) noexcept {
  try {
    note_mpi_group_failure(why ? why : "unknown error", timeout_);
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) {
      // Tell the remote members of this call that this rank gave up, and on whom.
      for (int p : remote_) {
        const GaveUp g{peers_[static_cast<size_t>(p)].epoch, nonce_, static_cast<int32_t>(culprits_.size()), 0};
        std::vector<unsigned char> buf(sizeof(g) + 4 * culprits_.size());
        std::memcpy(buf.data(), &g, sizeof(g));
        if (!culprits_.empty()) std::memcpy(buf.data() + sizeof(g), culprits_.data(), 4 * culprits_.size());
        MPI_Request req = MPI_REQUEST_NULL;
        if (MPI_Isend(buf.data(), static_cast<int>(buf.size()), MPI_BYTE, p, kTagGaveUp, comm_, &req) == MPI_SUCCESS) {
          MPI_Request_free(&req);
          notices_.push_back(std::move(buf));  // MPI may still read it
        }
      }
    }
  } catch (...) {
  }
  for (auto& r : sends_)
    if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
  sends_.clear();
  sends_to_.clear();
  for (auto& st : peers_) {
    if (st.rreq != MPI_REQUEST_NULL) MPI_Request_free(&st.rreq);
    if (!st.arrive.empty()) graveyard_vec_.push_back(std::move(st.arrive));
    st.arrive = {};
    for (auto& b : st.blocks) graveyard_.push_back(std::move(b.data));
    st.blocks.clear();
    st.nblocks = 0;
    st.last_chunk = SIZE_MAX;
    if (st.rbuf) graveyard_.push_back(std::move(st.rbuf));
    st.rcap = 0;
    st.rstate = 0;
  }
}

}  // namespace moedist::transport
