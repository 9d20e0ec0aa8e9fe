#include "transport/window/window_engine.h"

#include <sched.h>

#include <cstdlib>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <thread>

#include "moedist/error.h"

namespace moedist::transport {

using Clock = std::chrono::steady_clock;

std::chrono::milliseconds default_timeout(std::chrono::milliseconds requested) {
  if (requested.count() > 0) return requested;
  if (const char* env = std::getenv("MOEDIST_TIMEOUT_MS")) {
    char* end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (end != env && v > 0) return std::chrono::milliseconds(v);
  }
  return std::chrono::milliseconds(60000);
}

// CPUs this process may run on.
static int usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return 1;
}

WindowEngine::WindowEngine(int rank, int world, size_t blob_max, std::chrono::milliseconds timeout)
    : rank_(rank), world_(world), timeout_(default_timeout(timeout)), epoch_(static_cast<size_t>(world), 0),
      spin_(world > usable_cpus() ? 8 : 512) {
  layout_.world = world;
  layout_.blob_max = blob_max;
}

namespace {
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class WindowWriter : public PutWriter {
 public:
  WindowWriter(const std::vector<int>& slot_of, std::vector<std::vector<std::pair<void*, uint64_t>>>& regions, int me,
               const char* op)
      : slot_of_(slot_of), regions_(regions), me_(me), op_(op) {}
  void* dest(int peer, int region, size_t offset, size_t bytes) override {
    MOEDIST_ASSERT(peer >= 0 && peer < static_cast<int>(slot_of_.size()) && slot_of_[static_cast<size_t>(peer)] >= 0,
                   op_, ": rank ", me_, " writes to rank ", peer, " which is not a member");
    auto& regs = regions_[static_cast<size_t>(slot_of_[static_cast<size_t>(peer)])];
    MOEDIST_ASSERT(region >= 0 && region < static_cast<int>(regs.size()), op_, ": region ", region, " of rank ", peer);
    MOEDIST_ASSERT(offset + bytes <= regs[static_cast<size_t>(region)].second, op_, ": write of ", bytes, " bytes at ", offset,
                   " past region ", region, " (", regs[static_cast<size_t>(region)].second, " bytes) of rank ", peer);
    if (peer != me_) bytes_to_peers += bytes;
    return static_cast<unsigned char*>(regs[static_cast<size_t>(region)].first) + offset;
  }
  uint64_t bytes_to_peers = 0;  // payload written into other ranks' regions

 private:
  const std::vector<int>& slot_of_;
  std::vector<std::vector<std::pair<void*, uint64_t>>>& regions_;
  int me_;
  const char* op_;
};
}  // namespace

void WindowEngine::wait_flag(const std::atomic<uint64_t>& flag, uint64_t epoch, int peer, const char* op, const char* what) {
  // Spin briefly, then yield, then sleep a little. With more ranks than CPUs the peer awaited may
  // need this very CPU, so spinning only delays it: yield almost at once.
  for (int i = 0; i < spin_; ++i) {
    if (flag.load(std::memory_order_acquire) >= epoch) return;
    cpu_relax();
  }
  const auto start = Clock::now();
  const auto deadline = start + timeout_;
  auto next_check = start + std::chrono::milliseconds(2);
  for (;;) {
    if (flag.load(std::memory_order_acquire) >= epoch) return;
    const auto now = Clock::now();
    if (now >= next_check) {
      // Every 20 ms: is the peer dead or has it given up, is the group void, was this rank interrupted?
      next_check = now + std::chrono::milliseconds(20);
      // The most telling first: the group is void, the peer gave up (and why), the peer is dead.
      std::string why = group_failure();
      if (!why.empty()) throw TransportError(detail::str_cat("[rank ", rank_, "/", world_, "] ", op, ": ", why));
      const OwnerStatus* st = layout_.status(ctrl_base(peer));
      if (peer != rank_ && st->failed.load(std::memory_order_acquire))
        throw TransportError(detail::str_cat("[rank ", rank_, "/", world_, "] ", op, ": rank ", peer, " abandoned the call (",
                                             std::string(st->why, strnlen(st->why, sizeof(st->why))), ")"));
      why = peer_failure(peer);
      if (!why.empty())
        throw TransportError(detail::str_cat("[rank ", rank_, "/", world_, "] ", op, ": rank ", peer, " ", why, " (while waiting for it to ", what,
                                             " at step ", epoch, " of the pair; it reached ", flag.load(std::memory_order_acquire), ")"));
      if (detail::interrupt_requested())
        throw Interrupted(detail::str_cat("[rank ", rank_, "/", world_, "] ", op, ": interrupted while waiting for rank ", peer, " to ", what));
    }
    if (now >= deadline)
      throw Timeout(detail::str_cat("[rank ", rank_, "/", world_, "] ", op, ": timed out after ", timeout_.count(), " ms waiting for rank ", peer,
                                    " to ", what, " (it did not call ", op, ", or is stuck or dead)"));
    if (now - start < std::chrono::milliseconds(2))
      sched_yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void WindowEngine::abandon(const std::string& why) {
  if (broken_.empty()) broken_ = why;
  OwnerStatus* st = layout_.status(ctrl_base(rank_));
  if (st->failed.load(std::memory_order_relaxed)) return;
  std::snprintf(st->why, sizeof(st->why), "%s", why.c_str());
  st->failed.store(1, std::memory_order_release);
}

void WindowEngine::check_usable(const char* op) {
  if (!broken_.empty())
    throw TransportError(detail::str_cat("[rank ", rank_, "/", world_, "] ", op, ": this group can no longer be used: an earlier call ",
                                         "was abandoned (", broken_, ")"));
  const std::string void_group = group_failure();
  if (!void_group.empty()) throw TransportError(detail::str_cat("[rank ", rank_, "/", world_, "] ", op, ": ", void_group));
  if (pending_.active)
    throw InvalidArgument(detail::str_cat("[rank ", rank_, "/", world_, "] ", op, ": a split exchange (", pending_.op,
                                          ") is still open on this group: finish it (its teardown) first"));
}

void WindowEngine::exchange(const ExchangeSpec& spec) {
  check_usable(spec.op);
  completed_ = false;
  try {
    run_exchange(spec);
  } catch (const std::exception& e) {
    if (!completed_) abandon(e.what());
    throw;
  }
}

void WindowEngine::exchange_begin(const ExchangeSpec& spec) {
  check_usable(spec.op);
  completed_ = false;
  try {
    run_begin(spec);
  } catch (const std::exception& e) {
    pending_ = Pending{};
    abandon(e.what());
    throw;
  }
}

void WindowEngine::exchange_end() {
  MOEDIST_ASSERT(pending_.active, "exchange_end without exchange_begin");
  try {
    run_end();
  } catch (const std::exception& e) {
    if (!completed_) abandon(e.what());
    throw;
  }
}

void WindowEngine::run_exchange(const ExchangeSpec& spec) {
  run_begin(spec);
  run_end();
}

void WindowEngine::run_begin(const ExchangeSpec& spec) {
  const auto& members = spec.members;
  const size_t n = members.size();
  MOEDIST_ASSERT(spec.blob_bytes <= layout_.blob_max, "blob of ", spec.blob_bytes, " bytes > ", layout_.blob_max);
  MOEDIST_ASSERT(spec.recv.size() <= static_cast<size_t>(kMaxRegions));
  std::vector<int> slot_of(static_cast<size_t>(world_), -1);
  for (size_t i = 0; i < n; ++i) {
    MOEDIST_ASSERT(members[i] >= 0 && members[i] < world_ && slot_of[static_cast<size_t>(members[i])] == -1, "bad member list");
    slot_of[static_cast<size_t>(members[i])] = static_cast<int>(i);
  }
  MOEDIST_ASSERT(slot_of[static_cast<size_t>(rank_)] >= 0, "rank ", rank_, " is not among the members");

  // Wave 1: publish regions and blob to every member, then collect theirs.
  MsgHeader hdr{};
  hdr.nregions = static_cast<uint32_t>(spec.recv.size());
  hdr.blob_bytes = static_cast<uint32_t>(spec.blob_bytes);
  for (size_t r = 0; r < spec.recv.size(); ++r)
    hdr.regions[r] = RegionDesc{encode(spec.recv[r].data, spec.recv[r].bytes), spec.recv[r].bytes};
  for (size_t i = 0; i < n; ++i) {
    const int p = members[i];
    const uint64_t ep = ++epoch_[static_cast<size_t>(p)];
    void* base = ctrl_base(p);
    unsigned char* msg = layout_.msg(base, rank_, ep);
    std::memcpy(msg, &hdr, sizeof(hdr));
    if (spec.blob_bytes) std::memcpy(msg + sizeof(MsgHeader), spec.blob, spec.blob_bytes);
    layout_.flags(base, rank_)->arrive.store(ep, std::memory_order_release);
  }
  void* mine = ctrl_base(rank_);
  std::vector<std::vector<std::pair<void*, uint64_t>>> regions(n);
  for (size_t i = 0; i < n; ++i) {
    const int p = members[i];
    const uint64_t ep = epoch_[static_cast<size_t>(p)];
    wait_flag(layout_.flags(mine, p)->arrive, ep, p, spec.op, "arrive");
    const unsigned char* msg = layout_.msg(mine, p, ep);
    MsgHeader ph;
    std::memcpy(&ph, msg, sizeof(ph));
    // Blobs may differ in length when ranks disagree on the call (or one failed before counting):
    // the caller's header check reports that; here the shorter one is zero-padded.
    if (spec.blob_bytes) {
      unsigned char* dst = static_cast<unsigned char*>(spec.blobs_out) + i * spec.blob_bytes;
      const size_t n = std::min<size_t>(ph.blob_bytes, spec.blob_bytes);
      std::memcpy(dst, msg + sizeof(MsgHeader), n);
      std::memset(dst + n, 0, spec.blob_bytes - n);
    }
    for (uint32_t r = 0; r < ph.nregions && r < static_cast<uint32_t>(kMaxRegions); ++r)
      regions[i].emplace_back(ph.regions[r].bytes ? decode(p, ph.regions[r].addr, ph.regions[r].bytes) : nullptr, ph.regions[r].bytes);
  }

  // Payload, then wave 2: tell every member we are done writing into it (and whether we failed).
  std::exception_ptr local_error;
  uint64_t payload = 0;
  if (spec.produce) {
    WindowWriter writer(slot_of, regions, rank_, spec.op);
    try {
      spec.produce(writer);
    } catch (...) {
      local_error = std::current_exception();
    }
    payload = writer.bytes_to_peers;
  }
  // Counted: a message slot (header + blob) and the payload per peer other than this rank.
  const uint64_t others = n - 1;
  exchanges_.store(exchanges_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  messages_.store(messages_.load(std::memory_order_relaxed) + others, std::memory_order_relaxed);
  payload_bytes_.store(payload_bytes_.load(std::memory_order_relaxed) + payload, std::memory_order_relaxed);
  bytes_sent_.store(bytes_sent_.load(std::memory_order_relaxed) + payload + others * (sizeof(MsgHeader) + spec.blob_bytes),
                    std::memory_order_relaxed);
  for (size_t i = 0; i < n; ++i) {
    const int p = members[i];
    PeerFlags* f = layout_.flags(ctrl_base(p), rank_);
    f->done_failed.store(local_error ? 1u : 0u, std::memory_order_relaxed);
    f->done.store(epoch_[static_cast<size_t>(p)], std::memory_order_release);
  }
  pending_.active = true;
  pending_.members.assign(members.begin(), members.end());
  pending_.op = spec.op;
  pending_.local_error = local_error;
}

void WindowEngine::run_end() {
  const std::vector<int> members = std::move(pending_.members);
  const char* op = pending_.op;
  const std::exception_ptr local_error = pending_.local_error;
  pending_ = Pending{};
  const size_t n = members.size();
  void* mine = ctrl_base(rank_);
  int failed_peer = -1;
  for (size_t i = 0; i < n; ++i) {
    const int p = members[i];
    PeerFlags* f = layout_.flags(mine, p);
    wait_flag(f->done, epoch_[static_cast<size_t>(p)], p, op, "finish writing");
    if (f->done_failed.load(std::memory_order_relaxed) && failed_peer < 0 && p != rank_) failed_peer = p;
  }
  completed_ = true;  // errors from here on were seen by every member alike: the group stays in step
  if (local_error) std::rethrow_exception(local_error);
  if (failed_peer >= 0)
    throw TransportError(detail::str_cat("[rank ", rank_, "/", world_, "] ", op, ": rank ", failed_peer,
                                         " failed while writing its data (its own error names the cause)"));
}

TransportStats WindowEngine::stats() const {
  TransportStats s;
  s.bytes_sent = bytes_sent_.load(std::memory_order_relaxed);
  s.payload_bytes = payload_bytes_.load(std::memory_order_relaxed);
  s.messages = messages_.load(std::memory_order_relaxed);
  s.exchanges = exchanges_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace moedist::transport
