#include "transport/shm/shm_transport.h"

#include <fcntl.h>
#include <signal.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cctype>
#include <cstring>
#include <fstream>
#include <sstream>

#include "moedist/error.h"

namespace moedist::transport {

namespace {

constexpr uint64_t kMagic = 0x6d6f656469737432ull;  // "moedist2"
// The largest blob of one exchange (what max_blob_bytes reports): a bound on the ops' counts, not a
// cost per pair of ranks (a blob lies once, in its sender's outbox).
constexpr size_t kBlobMax = 64 * 1024;
constexpr size_t kGrain = size_t{2} << 20;  // reservations grow in steps of at least 2 MiB

struct SegmentHeader {
  uint64_t magic;
  int32_t pid;
  int32_t world;
  int32_t rank;
  int32_t pad;
  uint64_t window_bytes;
  GroupAlarm alarm;  // rank 0's: a duplicate claim seen after the group formed
};

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

size_t window_bytes_from_env() {
  if (const char* e = std::getenv("MOEDIST_SHM_WINDOW_BYTES")) {
    char* end = nullptr;
    unsigned long long v = std::strtoull(e, &end, 10);
    if (end != e && v > 0) return round_up(static_cast<size_t>(v), 4096);
  }
  return size_t{16} << 30;  // virtual; memory is reserved as the heap grows
}

std::string mib(uint64_t bytes) {
  std::ostringstream os;
  os.precision(1);
  os << std::fixed << static_cast<double>(bytes) / (1024.0 * 1024.0) << " MiB";
  return os.str();
}

struct MemoryLimit {
  uint64_t headroom = UINT64_MAX;  // bytes that can still be taken without hitting a limit
  std::string said;                // what limits it, for messages
};

uint64_t read_u64(const std::string& path, bool* ok) {
  std::ifstream f(path);
  std::string v;
  *ok = static_cast<bool>(f >> v) && v != "max" && !v.empty() && std::isdigit(static_cast<unsigned char>(v[0]));
  return *ok ? std::strtoull(v.c_str(), nullptr, 10) : 0;
}

// What limits memory here: MemAvailable, and the memory cgroup (v1 or v2) of this process and its
// ancestors. Exceeding a cgroup's limit gets a process killed (the OOM killer, even inside fallocate),
// so reservations are checked against it first.
MemoryLimit memory_limit() {
  MemoryLimit m;
  std::ifstream mi("/proc/meminfo");
  std::string key, unit;
  uint64_t kb = 0;
  while (mi >> key >> kb >> unit)
    if (key == "MemAvailable:") {
      m.headroom = kb * 1024;
      m.said = detail::str_cat("the host has ", mib(m.headroom), " available");
      break;
    }
  std::ifstream cg("/proc/self/cgroup");
  std::string line;
  while (std::getline(cg, line)) {
    std::string root, limit_file, usage_file, rel;
    if (line.rfind("0::", 0) == 0) {
      rel = line.substr(3);
      root = std::ifstream("/sys/fs/cgroup/cgroup.controllers") ? "/sys/fs/cgroup" : "/sys/fs/cgroup/unified";
      limit_file = "memory.max";
      usage_file = "memory.current";
    } else {
      const size_t a = line.find(':'), b = line.find(':', a + 1);
      if (a == std::string::npos || b == std::string::npos) continue;
      const std::string ctl = line.substr(a + 1, b - a - 1);
      if (ctl != "memory") continue;
      rel = line.substr(b + 1);
      root = "/sys/fs/cgroup/memory";
      limit_file = "memory.limit_in_bytes";
      usage_file = "memory.usage_in_bytes";
    }
    for (std::string dir = rel;; dir = dir.substr(0, dir.rfind('/'))) {
      bool ok_l = false, ok_u = false;
      const uint64_t limit = read_u64(root + dir + "/" + limit_file, &ok_l);
      const uint64_t used = read_u64(root + dir + "/" + usage_file, &ok_u);
      if (ok_l && ok_u && limit < (uint64_t{1} << 60)) {
        const uint64_t room = limit > used ? limit - used : 0;
        if (room < m.headroom) {
          m.headroom = room;
          m.said = detail::str_cat("the memory cgroup ", dir.empty() ? "/" : dir, " allows ", mib(limit), " and uses ", mib(used));
        }
      }
      if (dir.empty() || dir == "/") break;
    }
  }
  if (m.said.empty()) m.said = "available memory unknown";
  return m;
}

}  // namespace

void ShmTransport::Own::reserve(size_t end, const char* who) {
  std::lock_guard<std::mutex> lock(mu);
  if (end <= reserved) return;
  if (end > bytes)
    throw TransportError(detail::str_cat(label, who, ": needs ", end, " bytes of window, more than the ", bytes,
                                         " reserved in address space (set MOEDIST_SHM_WINDOW_BYTES)"));
  auto grow = [&](size_t target) -> int {
    if (ftruncate(fd, static_cast<off_t>(target)) != 0) return errno;
    // fallocate backs every page now, so that a lack of memory is an error here instead of a SIGBUS
    // on first touch (by this rank or by a peer writing into the window).
    int rc;
    do rc = fallocate(fd, 0, static_cast<off_t>(reserved), static_cast<off_t>(target - reserved));
    while (rc != 0 && errno == EINTR);
    if (rc != 0) {
      const int err = errno;
      (void)ftruncate(fd, static_cast<off_t>(reserved));
      return err;
    }
    reserved = target;
    return 0;
  };
  const size_t exact = round_up(end, 4096);
  const size_t generous = std::min(bytes, round_up(std::max(end, reserved + reserved / 4), kGrain));
  const MemoryLimit lim = memory_limit();
  // Keep 1/16 of the headroom (at least 16 MiB) for everything else this process and its peers need.
  const uint64_t margin = std::max<uint64_t>(lim.headroom / 16, uint64_t{16} << 20);
  const uint64_t room = lim.headroom > margin ? lim.headroom - margin : 0;
  int err = ENOMEM;
  if (generous - reserved <= room) err = grow(generous);
  if (err != 0 && exact - reserved <= room) err = grow(exact);
  if (err != 0)
    throw TransportError(detail::str_cat(label, who, ": cannot reserve shared memory: this rank's window needs ", mib(exact), " (",
                                         mib(reserved), " reserved so far; ", exact - reserved > room ? "over the limit" : std::strerror(err),
                                         "): ", lim.said, ". Free memory or raise the limit (e.g. docker run --memory=...); the windows ",
                                         "are anonymous memory (memfd), so the size of /dev/shm (--shm-size) does not matter"));
}

ShmTransport::Own::~Own() {
  if (base) munmap(base, bytes);
  if (fd >= 0) close(fd);
}

ShmTransport::ShmTransport(const std::string& job, const std::string& group, int world, int rank, const GroupOptions& options)
    : WindowEngine(rank, world, kBlobMax, options.timeout),
      group_(group),
      ranks_per_server_(options.ranks_per_server > 0 ? options.ranks_per_server : world),
      window_bytes_(window_bytes_from_env()),
      maps_(static_cast<size_t>(world)),
      pids_(static_cast<size_t>(world), 0) {
  header_bytes_ = round_up(sizeof(SegmentHeader), 4096) + round_up(layout_.bytes(), 4096);
  const size_t total = header_bytes_ + window_bytes_;
  const std::string label = detail::str_cat("[rank ", rank, "/", world, "] shm group setup \"", group, "\": ");
  const auto deadline = std::chrono::steady_clock::now() + timeout();

  own_ = std::make_shared<Own>();
  own_->label = detail::str_cat("[rank ", rank, "/", world, "] ");
  own_->header_bytes = header_bytes_;
  own_->fd = memfd_create(detail::str_cat("moedist-", group, "-", rank).c_str(), MFD_CLOEXEC);
  if (own_->fd < 0) throw TransportError(label + detail::str_cat("memfd_create: ", std::strerror(errno)));
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, own_->fd, 0);
  if (p == MAP_FAILED) throw TransportError(label + detail::str_cat("mmap of ", total, " bytes: ", std::strerror(errno)));
  own_->base = p;
  own_->bytes = total;
  own_->reserve(header_bytes_, "shm group setup");
  maps_[static_cast<size_t>(rank)] = {p, total};
  auto* hdr = new (p) SegmentHeader{};
  hdr->magic = kMagic;
  hdr->pid = static_cast<int32_t>(getpid());
  hdr->world = world;
  hdr->rank = rank;
  hdr->window_bytes = window_bytes_;
  pids_[static_cast<size_t>(rank)] = hdr->pid;

  Rendezvous rv = rendezvous(job, group, world, rank, own_->fd, deadline, timeout(), label, rank == 0 ? &hdr->alarm : nullptr, own_);
  listener_ = rv.listener;
  claim_fd_ = rv.claim_fd;
  auto fail = [&](const std::string& what) {
    for (size_t r = 0; r < rv.fds.size(); ++r)
      if (static_cast<int>(r) != rank || rank != 0) close(rv.fds[r]);
    stop_listener(listener_);
    if (claim_fd_ >= 0) close(claim_fd_);
    claim_fd_ = -1;
    throw TransportError(label + what);
  };
  for (int r = 0; r < world; ++r) {
    if (r == rank) continue;
    const int fd = rv.fds[static_cast<size_t>(r)];
    SegmentHeader ph;
    if (pread(fd, &ph, sizeof(ph), 0) != static_cast<ssize_t>(sizeof(ph)) || ph.magic != kMagic || ph.world != world || ph.rank != r)
      fail(detail::str_cat("the window handed out for rank ", r, " is not one (magic, world size or rank differ)"));
    const size_t bytes = header_bytes_ + ph.window_bytes;
    void* q = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (q == MAP_FAILED) fail(detail::str_cat("mmap of rank ", r, "'s window: ", std::strerror(errno)));
    maps_[static_cast<size_t>(r)] = {q, bytes};
    pids_[static_cast<size_t>(r)] = rv.pids[static_cast<size_t>(r)];
  }
  for (int r = 0; r < world; ++r)
    if (r != rank || rank != 0) close(rv.fds[static_cast<size_t>(r)]);  // mappings keep the windows; rank 0's own fd is own_->fd
  // A pidfd per peer tells its death without being fooled by a reused pid (busy hosts wrap pids fast).
  pidfds_.assign(static_cast<size_t>(world), -1);
  for (int r = 0; r < world; ++r)
    if (r != rank && pids_[static_cast<size_t>(r)] > 0)
      pidfds_[static_cast<size_t>(r)] = static_cast<int>(syscall(SYS_pidfd_open, pids_[static_cast<size_t>(r)], 0));

  // The heap first: the setup exchange's message lies in this rank's window (its outbox).
  own_->heap = std::make_unique<OffsetHeap>(0, window_bytes_);
  // Every rank has mapped every window once this returns on all of them.
  std::vector<int> all;
  for (int r = 0; r < world; ++r) all.push_back(r);
  ExchangeSpec spec;
  spec.op = "shm group setup";
  spec.members = all;
  try {
    exchange(spec);
  } catch (...) {
    stop_listener(listener_);
    if (claim_fd_ >= 0) close(claim_fd_);
    claim_fd_ = -1;
    throw;
  }
}

ShmTransport::~ShmTransport() {
  stop_listener(listener_);
  if (claim_fd_ >= 0) close(claim_fd_);
  for (int fd : pidfds_)
    if (fd >= 0) close(fd);
  for (size_t r = 0; r < maps_.size(); ++r)
    if (maps_[r].base && static_cast<int>(r) != rank()) munmap(maps_[r].base, maps_[r].bytes);
  // Our own mapping goes with the last output tensor carved from it (own_).
}

std::shared_ptr<unsigned char> ShmTransport::alloc(size_t bytes) {
  const size_t off = own_->heap->alloc(bytes, "shm alloc");
  try {
    own_->reserve(header_bytes_ + off + round_up(std::max<size_t>(bytes, 1), 4096), "shm alloc");
  } catch (...) {
    own_->heap->free(off);
    throw;
  }
  auto own = own_;
  unsigned char* p = window(rank()) + off;
  return std::shared_ptr<unsigned char>(p, [own, off](unsigned char*) { own->heap->free(off); });
}

unsigned char* ShmTransport::window(int rank) const {
  return static_cast<unsigned char*>(maps_[static_cast<size_t>(rank)].base) + header_bytes_;
}

void* ShmTransport::ctrl_base(int rank) {
  return static_cast<unsigned char*>(maps_[static_cast<size_t>(rank)].base) + round_up(sizeof(SegmentHeader), 4096);
}

void ShmTransport::retire_scratch() {
  // The slots' window memory stays allocated (a rank declared failed may still write into it).
  slot_off_.clear();
  slot_bytes_.clear();
}

void* ShmTransport::scratch(int slot, size_t bytes) {
  if (abandoned())  // a slow peer may still write into the old buffers: never hand them out again
    throw TransportError(detail::str_cat("[rank ", rank(), "/", world_size(), "] this group can no longer be used: an earlier call was abandoned"));
  if (slot >= static_cast<int>(slot_off_.size())) {
    slot_off_.resize(static_cast<size_t>(slot) + 1, 0);
    slot_bytes_.resize(static_cast<size_t>(slot) + 1, 0);
  }
  const size_t s = static_cast<size_t>(slot);
  if (slot_bytes_[s] < bytes) {
    if (slot_bytes_[s]) own_->heap->free(slot_off_[s]);
    slot_bytes_[s] = 0;
    const size_t need = round_up(std::max<size_t>(bytes, 1), 4096);
    const size_t off = own_->heap->alloc(need, "shm scratch");
    try {
      own_->reserve(header_bytes_ + off + need, "shm scratch");
    } catch (...) {
      own_->heap->free(off);
      throw;
    }
    slot_off_[s] = off;
    slot_bytes_[s] = need;
  }
  return window(rank()) + slot_off_[s];
}

void* ShmTransport::outbox(size_t bytes, bool fresh) {
  if (fresh) outbox_bytes_ = 0;  // a slow peer may still read the old message: its block stays allocated
  if (outbox_bytes_ < bytes) {
    if (outbox_bytes_) own_->heap->free(outbox_off_);
    outbox_bytes_ = 0;
    const size_t need = round_up(std::max<size_t>(bytes, 1), 4096);
    const size_t off = own_->heap->alloc(need, "shm message");
    try {
      own_->reserve(header_bytes_ + off + need, "shm message");
    } catch (...) {
      own_->heap->free(off);
      throw;
    }
    outbox_off_ = off;
    outbox_bytes_ = need;
  }
  return window(rank()) + outbox_off_;
}

uint64_t ShmTransport::encode(const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  const unsigned char* w = window(rank());
  MOEDIST_ASSERT(b >= w && b + bytes <= w + window_bytes_, "shm receive region outside this rank's window (use alloc() or scratch())");
  return static_cast<uint64_t>(b - w);
}

void* ShmTransport::decode(int owner, uint64_t addr, uint64_t bytes) {
  const size_t limit = maps_[static_cast<size_t>(owner)].bytes - header_bytes_;
  MOEDIST_ASSERT(addr + bytes <= limit, "rank ", owner, " described a region past its window");
  return window(owner) + addr;
}

std::string ShmTransport::group_failure() {
  const auto* h0 = static_cast<const SegmentHeader*>(maps_[0].base);
  if (h0->alarm.raised.load(std::memory_order_acquire) == 0) return {};
  return std::string(h0->alarm.message, strnlen(h0->alarm.message, sizeof(h0->alarm.message)));
}

std::string ShmTransport::peer_failure(int rank) {
  const int pid = pids_[static_cast<size_t>(rank)];
  if (pid <= 0) return {};
  if (const int fd = pidfds_.empty() ? -1 : pidfds_[static_cast<size_t>(rank)]; fd >= 0) {
    pollfd p{fd, POLLIN, 0};
    return poll(&p, 1, 0) > 0 ? detail::str_cat("(pid ", pid, ") has died") : std::string();
  }
  if (kill(pid, 0) != 0 && errno == ESRCH) return detail::str_cat("(pid ", pid, ") has died");
  // A killed child that its parent has not reaped yet is a zombie: dead all the same.
  if (FILE* f = std::fopen(detail::str_cat("/proc/", pid, "/stat").c_str(), "r")) {
    char buf[512];
    const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
    std::fclose(f);
    buf[n] = 0;
    const char* close_paren = std::strrchr(buf, ')');
    if (close_paren && (close_paren[2] == 'Z' || close_paren[2] == 'X')) return detail::str_cat("(pid ", pid, ") has died");
  }
  return {};
}

}  // namespace moedist::transport
