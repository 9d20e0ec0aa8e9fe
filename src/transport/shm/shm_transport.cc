#include "transport/shm/shm_transport.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "moedist/error.h"

namespace moedist::transport {

namespace {

constexpr uint64_t kMagic = 0x6d6f656469737431ull;  // "moedist1"
constexpr size_t kBlobMax = 64 * 1024;

struct SegmentHeader {
  uint64_t magic;
  int32_t pid;
  int32_t world;
  uint64_t window_bytes;
  std::atomic<uint32_t> ready;
};

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

size_t window_bytes_from_env() {
  if (const char* e = std::getenv("MOEDIST_SHM_WINDOW_BYTES")) {
    char* end = nullptr;
    unsigned long long v = std::strtoull(e, &end, 10);
    if (end != e && v > 0) return static_cast<size_t>(v);
  }
  return size_t{16} << 30;  // virtual; only touched pages use memory
}

std::string sanitize(const std::string& s) {
  std::string out;
  for (char ch : s) out += (std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '.') ? ch : '_';
  return out;
}

}  // namespace

ShmTransport::ShmTransport(const std::string& job, const std::string& group, int world, int rank, const GroupOptions& options)
    : WindowEngine(rank, world, kBlobMax, options.timeout),
      prefix_("/moedist-" + sanitize(job) + "-" + sanitize(group) + "-"),
      ranks_per_server_(options.ranks_per_server > 0 ? options.ranks_per_server : world),
      window_bytes_(window_bytes_from_env()),
      maps_(static_cast<size_t>(world)),
      pids_(static_cast<size_t>(world), 0) {
  header_bytes_ = round_up(sizeof(SegmentHeader), 4096) + round_up(layout_.bytes(), 4096);
  const size_t total = header_bytes_ + window_bytes_;
  const char* op = "shm group setup";
  auto fail = [&](const std::string& what) -> void {
    throw TransportError(detail::str_cat("[rank ", rank, "/", world, "] ", op, " \"", group, "\": ", what));
  };

  // Own segment: create exclusively, size, map, first-touch the header and control block.
  const std::string mine = segment_name(rank);
  int fd = shm_open(mine.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0 && errno == EEXIST) fail(detail::str_cat("segment ", mine, " already exists (another job with the same job id and group name?)"));
  if (fd < 0) fail(detail::str_cat("shm_open(", mine, "): ", std::strerror(errno)));
  if (ftruncate(fd, static_cast<off_t>(total)) != 0) {
    const int err = errno;
    close(fd);
    shm_unlink(mine.c_str());
    fail(detail::str_cat("ftruncate(", mine, ", ", total, "): ", std::strerror(err)));
  }
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    shm_unlink(mine.c_str());
    fail(detail::str_cat("mmap(", mine, "): ", std::strerror(errno)));
  }
  maps_[static_cast<size_t>(rank)] = {p, total};
  own_ = std::make_shared<Own>();
  own_->base = p;
  own_->bytes = total;
  std::memset(p, 0, header_bytes_);
  auto* hdr = static_cast<SegmentHeader*>(p);
  hdr->magic = kMagic;
  hdr->pid = static_cast<int32_t>(getpid());
  hdr->world = world;
  hdr->window_bytes = window_bytes_;
  pids_[static_cast<size_t>(rank)] = hdr->pid;
  hdr->ready.store(1, std::memory_order_release);

  // Peers' segments: wait until each exists and is ready, then map it.
  const auto deadline = std::chrono::steady_clock::now() + timeout();
  for (int r = 0; r < world; ++r) {
    if (r == rank) continue;
    const std::string name = segment_name(r);
    for (;;) {
      int pfd = shm_open(name.c_str(), O_RDWR, 0600);
      if (pfd >= 0) {
        struct stat st {};
        if (fstat(pfd, &st) == 0 && static_cast<size_t>(st.st_size) >= header_bytes_) {
          void* q = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, pfd, 0);
          close(pfd);
          if (q == MAP_FAILED) fail(detail::str_cat("mmap(", name, "): ", std::strerror(errno)));
          auto* ph = static_cast<SegmentHeader*>(q);
          if (ph->ready.load(std::memory_order_acquire) == 1 && ph->magic == kMagic) {
            if (ph->world != world)
              fail(detail::str_cat("rank ", r, " created the group with world size ", ph->world, ", this rank with ", world));
            maps_[static_cast<size_t>(r)] = {q, static_cast<size_t>(st.st_size)};
            pids_[static_cast<size_t>(r)] = ph->pid;
            break;
          }
          munmap(q, static_cast<size_t>(st.st_size));
        } else {
          close(pfd);
        }
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        shm_unlink(mine.c_str());
        throw Timeout(detail::str_cat("[rank ", rank, "/", world, "] ", op, " \"", group, "\": timed out after ", timeout().count(),
                                      " ms waiting for rank ", r, " to create its segment ", name));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  // Once every rank has mapped every segment, the names can go: a crash leaves nothing behind.
  std::vector<int> all;
  for (int r = 0; r < world; ++r) all.push_back(r);
  ExchangeSpec spec;
  spec.op = op;
  spec.members = all;
  try {
    exchange(spec);
  } catch (...) {
    shm_unlink(mine.c_str());
    throw;
  }
  shm_unlink(mine.c_str());
  own_->heap = std::make_unique<OffsetHeap>(0, window_bytes_);
}

ShmTransport::Own::~Own() {
  if (base) munmap(base, bytes);
}

ShmTransport::~ShmTransport() {
  for (size_t r = 0; r < maps_.size(); ++r)
    if (maps_[r].base && static_cast<int>(r) != rank()) munmap(maps_[r].base, maps_[r].bytes);
  // Our own mapping goes with the last output tensor carved from it (own_).
}

std::shared_ptr<unsigned char> ShmTransport::alloc(size_t bytes) {
  const size_t off = own_->heap->alloc(bytes, "shm alloc");
  auto own = own_;
  unsigned char* p = window(rank()) + off;
  return std::shared_ptr<unsigned char>(p, [own, off](unsigned char*) { own->heap->free(off); });
}

std::string ShmTransport::segment_name(int rank) const { return prefix_ + std::to_string(rank); }

unsigned char* ShmTransport::window(int rank) const {
  return static_cast<unsigned char*>(maps_[static_cast<size_t>(rank)].base) + header_bytes_;
}

void* ShmTransport::ctrl_base(int rank) {
  return static_cast<unsigned char*>(maps_[static_cast<size_t>(rank)].base) + round_up(sizeof(SegmentHeader), 4096);
}

void* ShmTransport::scratch(int slot, size_t bytes) {
  if (slot >= static_cast<int>(slot_off_.size())) {
    slot_off_.resize(static_cast<size_t>(slot) + 1, 0);
    slot_bytes_.resize(static_cast<size_t>(slot) + 1, 0);
  }
  const size_t s = static_cast<size_t>(slot);
  if (slot_bytes_[s] < bytes) {
    if (slot_bytes_[s]) own_->heap->free(slot_off_[s]);
    const size_t need = round_up(std::max<size_t>(bytes, 1), 4096);
    slot_off_[s] = own_->heap->alloc(need, "shm scratch");
    slot_bytes_[s] = need;
  }
  return window(rank()) + slot_off_[s];
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

std::string ShmTransport::peer_failure(int rank) {
  const int pid = pids_[static_cast<size_t>(rank)];
  if (pid <= 0) return {};
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
