#include "transport/window/window_engine.h"

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <span>
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
      spin_(world > usable_cpus() ? 8 : 512), crowded_(world > 8 * usable_cpus()) {
  layout_.world = world;
  layout_.blob_max = blob_max;
  failed_.assign(static_cast<size_t>(world), 0);
  suspects_.assign(static_cast<size_t>(world), 0);
}

namespace {
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

inline uint32_t* futex_word(std::atomic<uint32_t>& sleeper) { return reinterpret_cast<uint32_t*>(&sleeper); }

// Sleeps until `flag` reaches `epoch`, a writer wakes this rank, or `most` passed. The futex is the
// flag's sleeper word: 1 while this rank sleeps, cleared by the writer that wakes it (so no wake-up is
// lost, whatever the epochs). The flags live in memory shared between processes too, hence no
// FUTEX_PRIVATE_FLAG. Sleeper and flag are a Dekker pair (both sides store, then load the other,
// seq_cst): either the writer sees the sleeper and wakes it, or this load sees the writer's store.
void sleep_on(const std::atomic<uint64_t>& flag, uint64_t epoch, std::chrono::nanoseconds most) {
  std::atomic<uint32_t>& sleeper = PeerFlags::sleeper_of(flag);
  sleeper.store(1, std::memory_order_seq_cst);
  if (flag.load(std::memory_order_seq_cst) < epoch) {
    const long ns = static_cast<long>(std::max<int64_t>(most.count(), 50000));
    timespec ts{ns / 1000000000L, ns % 1000000000L};
    syscall(SYS_futex, futex_word(sleeper), FUTEX_WAIT, 1u, &ts, nullptr, 0);
  }
  sleeper.store(0, std::memory_order_relaxed);
}

// Publishes `epoch` in a peer's flag and wakes the peer if it sleeps on it.
void raise_flag(std::atomic<uint64_t>& flag, uint64_t epoch) {
  flag.store(epoch, std::memory_order_seq_cst);
  std::atomic<uint32_t>& sleeper = PeerFlags::sleeper_of(flag);
  if (sleeper.load(std::memory_order_seq_cst) && sleeper.exchange(0, std::memory_order_seq_cst))
    syscall(SYS_futex, futex_word(sleeper), FUTEX_WAKE, 1, nullptr, nullptr, 0);
}

class WindowWriter : public PutWriter {
 public:
  using Decode = std::function<void*(int owner, uint64_t addr, uint64_t bytes)>;
  WindowWriter(const std::vector<int>& slot_of, std::span<const int> members, const std::vector<const unsigned char*>& msgs,
               const std::vector<std::pair<const unsigned char*, size_t>>& blobs, Decode decode, int me, const char* op)
      : slot_of_(slot_of), members_(members), msgs_(msgs), blobs_(blobs), decode_(std::move(decode)), me_(me), op_(op),
        regions_(msgs.size() * kMaxRegions), nregions_(msgs.size(), -1) {}
  const void* blob(size_t index, size_t* bytes) override {
    MOEDIST_ASSERT(index < blobs_.size(), op_, ": blob of member ", index, " of ", blobs_.size());
    *bytes = blobs_[index].second;
    return blobs_[index].first;
  }
  void* dest(int peer, int region, size_t offset, size_t bytes) override {
    MOEDIST_ASSERT(peer >= 0 && peer < static_cast<int>(slot_of_.size()) && slot_of_[static_cast<size_t>(peer)] >= 0,
                   op_, ": rank ", me_, " writes to rank ", peer, " which is not a member");
    const size_t slot = static_cast<size_t>(slot_of_[static_cast<size_t>(peer)]);
    if (nregions_[slot] < 0) decode_regions(slot);
    MOEDIST_ASSERT(region >= 0 && region < nregions_[slot], op_, ": region ", region, " of rank ", peer);
    const auto& reg = regions_[slot * kMaxRegions + static_cast<size_t>(region)];
    MOEDIST_ASSERT(offset + bytes <= reg.second, op_, ": write of ", bytes, " bytes at ", offset, " past region ", region, " (",
                   reg.second, " bytes) of rank ", peer);
    if (peer != me_) bytes_to_peers += bytes;
    return static_cast<unsigned char*>(reg.first) + offset;
  }
  uint64_t bytes_to_peers = 0;  // payload written into other ranks' regions

 private:
  // A member's receive regions, decoded when this rank first writes to it (at hundreds of ranks most
  // members are never written to in a call).
  void decode_regions(size_t slot) {
    MsgHeader ph;
    std::memcpy(&ph, msgs_[slot], sizeof(ph));
    const uint32_t nr = std::min<uint32_t>(ph.nregions, kMaxRegions);
    for (uint32_t r = 0; r < nr; ++r)
      regions_[slot * kMaxRegions + r] = {ph.regions[r].bytes ? decode_(members_[slot], ph.regions[r].addr, ph.regions[r].bytes) : nullptr,
                                          ph.regions[r].bytes};
    nregions_[slot] = static_cast<int>(nr);
  }

  const std::vector<int>& slot_of_;
  std::span<const int> members_;
  const std::vector<const unsigned char*>& msgs_;                      // in the members' outboxes
  const std::vector<std::pair<const unsigned char*, size_t>>& blobs_;  // likewise
  Decode decode_;
  int me_;
  const char* op_;
  std::vector<std::pair<void*, uint64_t>> regions_;  // kMaxRegions per member
  std::vector<int> nregions_;                        // per member; -1 until decoded
};

// Runs `wait` (a wait for `flag` to reach `epoch`); with `waits` (ExchangeSpec::waits_us), adds the
// microseconds it blocked to waits[peer]. No clock is read when the flag is there at the first look.
template <typename Wait>
inline void timed_wait(int64_t* waits, int peer, const std::atomic<uint64_t>& flag, uint64_t epoch, Wait wait) {
  if (!waits || flag.load(std::memory_order_acquire) >= epoch) return wait();
  const auto t0 = Clock::now();
  wait();
  waits[peer] += std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count();
}
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
      // The most telling first: the group is void, this rank was declared failed, the peer gave up (and
      // why), the peer is dead.
      OwnerStatus* mine = layout_.status(ctrl_base(rank_));
      mine->heartbeat.fetch_add(1, std::memory_order_relaxed);
      std::string why = group_failure();
      if (!why.empty()) throw TransportError(detail::str_cat(label(), op, ": ", why));
      check_excluded(op);
      const OwnerStatus* st = layout_.status(ctrl_base(peer));
      if (peer != rank_ && st->failed.load(std::memory_order_acquire) == gen_ + 1)
        throw TransportError(detail::str_cat(label(), op, ": rank ", name_of(peer), " abandoned the call (",
                                             std::string(st->why, strnlen(st->why, sizeof(st->why))), ")"));
      why = peer_failure(peer);
      if (!why.empty()) {
        suspects_[static_cast<size_t>(peer)] = 1;
        throw TransportError(detail::str_cat(label(), op, ": rank ", name_of(peer), " ", why, " (while waiting for it to ", what,
                                             " at step ", epoch, " of the pair; it reached ", flag.load(std::memory_order_acquire), ")"));
      }
      if (detail::interrupt_requested())
        throw Interrupted(detail::str_cat(label(), op, ": interrupted while waiting for rank ", name_of(peer), " to ", what));
    }
    if (now >= deadline) {
      suspects_[static_cast<size_t>(peer)] = 1;
      throw Timeout(detail::str_cat(label(), op, ": timed out after ", timeout_.count(), " ms waiting for rank ", name_of(peer),
                                    " to ", what, " (it did not call ", op, ", or is stuck or dead)"));
    }
    // Crowded (ranks outnumber CPUs 8 to 1 and more): yielding would keep every waiter runnable and
    // starve the ranks that have work, so sleep at once; the writer wakes this rank. Otherwise yield
    // for 2 ms first (a wake-up costs more than a yield when few wait). Sleeps end by the next check.
    if (!crowded_ && now - start < std::chrono::milliseconds(2))
      sched_yield();
    else
      sleep_on(flag, epoch, std::min(next_check, deadline) - now);
  }
}

void WindowEngine::abandon(const std::string& why) {
  if (broken_.empty()) broken_ = why;
  OwnerStatus* st = layout_.status(ctrl_base(rank_));
  if (st->failed.load(std::memory_order_relaxed) == gen_ + 1) return;
  std::snprintf(st->why, sizeof(st->why), "%s", why.c_str());
  st->failed.store(gen_ + 1, std::memory_order_release);
}

void WindowEngine::check_usable(const char* op) {
  if (!excluded_.empty()) throw TransportError(excluded_);
  check_excluded(op);
  if (!broken_.empty())
    throw TransportError(detail::str_cat(label(), op, ": this group cannot be used until its surviving ranks ",
                                         "recover (moedist::recover_group): an earlier call was abandoned (", broken_, ")"));
  const std::string void_group = group_failure();
  if (!void_group.empty()) throw TransportError(detail::str_cat(label(), op, ": ", void_group));
  if (pending_.active)
    throw InvalidArgument(detail::str_cat(label(), op, ": a split exchange (", pending_.op,
                                          ") is still open on this group: finish it (its teardown) first"));
}

void WindowEngine::check_members(const ExchangeSpec& spec) {
  for (int m : spec.members)
    if (m >= 0 && m < world_ && failed_[static_cast<size_t>(m)])
      throw InvalidArgument(detail::str_cat(label(), spec.op, ": rank ", name_of(m),
                                            " is among the members of this call but failed (agreed at recovery ", gen_,
                                            "): leave it out with elastic_info (moedist::make_elastic_info of the failed ranks)"));
}

void WindowEngine::exchange(const ExchangeSpec& spec) {
  check_usable(spec.op);
  check_members(spec);
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
  check_members(spec);
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

  // Wave 1: publish regions and blob (once, in this rank's outbox; its place in every member's slot),
  // then collect theirs.
  MsgHeader hdr{};
  hdr.nregions = static_cast<uint32_t>(spec.recv.size());
  hdr.blob_bytes = static_cast<uint32_t>(spec.blob_bytes);
  for (size_t r = 0; r < spec.recv.size(); ++r)
    hdr.regions[r] = RegionDesc{encode(spec.recv[r].data, spec.recv[r].bytes), spec.recv[r].bytes};
  const size_t msg_bytes = sizeof(MsgHeader) + spec.blob_bytes;
  auto* out = static_cast<unsigned char*>(outbox(msg_bytes, outbox_busy_));
  std::memcpy(out, &hdr, sizeof(hdr));
  if (spec.blob_bytes) std::memcpy(out + sizeof(MsgHeader), spec.blob, spec.blob_bytes);
  outbox_busy_ = true;  // until every member said it is done (run_end)
  const RegionDesc where{encode(out, msg_bytes), msg_bytes};
  for (size_t i = 0; i < n; ++i) {
    const int p = members[i];
    const uint64_t ep = ++epoch_[static_cast<size_t>(p)];
    void* base = ctrl_base(p);
    layout_.msg(base, rank_, ep)->at = where;
    raise_flag(layout_.flags(base, rank_)->arrive, ep);
  }
  void* mine = ctrl_base(rank_);
  std::vector<const unsigned char*> msgs(n);
  std::vector<std::pair<const unsigned char*, size_t>> blobs(n);
  for (size_t i = 0; i < n; ++i) {
    const int p = members[i];
    const uint64_t ep = epoch_[static_cast<size_t>(p)];
    const auto& arrive = layout_.flags(mine, p)->arrive;
    timed_wait(spec.waits_us, p, arrive, ep, [&] { wait_flag(arrive, ep, p, spec.op, "arrive"); });
    const RegionDesc at = layout_.msg(mine, p, ep)->at;
    MOEDIST_ASSERT(at.bytes >= sizeof(MsgHeader), spec.op, ": rank ", p, " published a message of ", at.bytes, " bytes");
    const auto* msg = static_cast<const unsigned char*>(decode(p, at.addr, at.bytes));
    uint32_t blob_bytes;
    std::memcpy(&blob_bytes, msg + offsetof(MsgHeader, blob_bytes), sizeof(blob_bytes));
    MOEDIST_ASSERT(blob_bytes <= at.bytes - sizeof(MsgHeader), spec.op, ": rank ", p, "'s blob of ", blob_bytes,
                   " bytes overruns its message of ", at.bytes);
    msgs[i] = msg;
    blobs[i] = {msg + sizeof(MsgHeader), blob_bytes};
    // Blobs may differ in length when ranks disagree on the call (or one failed before counting):
    // the caller's header check reports that; here the shorter one is zero-padded.
    if (spec.blob_bytes && spec.blobs_out) {
      unsigned char* dst = static_cast<unsigned char*>(spec.blobs_out) + i * spec.blob_bytes;
      const size_t k = std::min<size_t>(blob_bytes, spec.blob_bytes);
      std::memcpy(dst, msg + sizeof(MsgHeader), k);
      std::memset(dst + k, 0, spec.blob_bytes - k);
    }
  }

  // Payload, then wave 2: tell every member we are done writing into it (and whether we failed).
  std::exception_ptr local_error;
  uint64_t payload = 0;
  if (spec.produce) {
    WindowWriter writer(slot_of, members, msgs, blobs, [this](int o, uint64_t a, uint64_t b) { return decode(o, a, b); }, rank_, spec.op);
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
    raise_flag(f->done, epoch_[static_cast<size_t>(p)]);
  }
  pending_.active = true;
  pending_.members.assign(members.begin(), members.end());
  pending_.op = spec.op;
  pending_.local_error = local_error;
  pending_.waits_us = spec.waits_us;
}

void WindowEngine::run_end() {
  const std::vector<int> members = std::move(pending_.members);
  const char* op = pending_.op;
  const std::exception_ptr local_error = pending_.local_error;
  int64_t* const waits = pending_.waits_us;
  pending_ = Pending{};
  const size_t n = members.size();
  void* mine = ctrl_base(rank_);
  int failed_peer = -1;
  for (size_t i = 0; i < n; ++i) {
    const int p = members[i];
    PeerFlags* f = layout_.flags(mine, p);
    const uint64_t ep = epoch_[static_cast<size_t>(p)];
    timed_wait(waits, p, f->done, ep, [&] { wait_flag(f->done, ep, p, op, "finish writing"); });
    if (f->done_failed.load(std::memory_order_relaxed) && failed_peer < 0 && p != rank_) failed_peer = p;
  }
  completed_ = true;  // errors from here on were seen by every member alike: the group stays in step
  outbox_busy_ = false;  // every member is done reading this rank's message
  if (local_error) std::rethrow_exception(local_error);
  if (failed_peer >= 0)
    throw TransportError(detail::str_cat(label(), op, ": rank ", name_of(failed_peer),
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

// ---- Failure recovery ---------------------------------------------------------------------------------
//
// The survivors of a failure agree on the failed ranks by consensus through shared memory: each one
// joins generation g (publishing its suspects and completed calls), resolves every member (joined: alive;
// dead, or stopped after being suspected, or absent past the group's timeout: failed), publishes its
// proposal and tries to install it with compare-and-swap on one word in rank 0's control block (mapped
// by every survivor, also after rank 0's death). The first proposal installed is the decision: every
// survivor adopts it, whether its own or not, so all obtain the same set; a proposer that dies after
// installing left its proposal readable. A rank that joins too late, or never, finds itself in the set.
// Then each survivor starts generation g of its epochs (g << 40 with every peer): flags and messages
// left by the failed call are all older, so nothing it left can be read as new.

namespace {
constexpr auto kStallGrace = std::chrono::milliseconds(50);  // a suspect with no heartbeat this long (2.5 beats): stopped
constexpr int kEpochShift = 40;
bool mask_has(const std::atomic<uint64_t>* words, int r) {
  return (words[r / 64].load(std::memory_order_relaxed) >> (r % 64)) & 1u;
}
}  // namespace

std::string WindowEngine::excluded_message(uint64_t generation, const char* op) const {
  return detail::str_cat(label(), op, ": this rank was declared failed by the surviving ranks of its group at ",
                         "recovery ", generation, " (it did not join their agreement in time: it was stopped, too slow, or its call ",
                         "failed and it did not call recover_group); it can no longer take part in this group");
}

void WindowEngine::check_excluded(const char* op) {
  if (!excluded_.empty()) throw TransportError(excluded_);
  const uint64_t d = decided_generation();
  if (d <= gen_) return;
  // A generation this rank has not adopted was decided: it is out unless it is recovering right now.
  if (layout_.status(ctrl_base(rank_))->joined.load(std::memory_order_relaxed) >= d) return;
  excluded_ = excluded_message(d, op);
  throw TransportError(excluded_);
}

std::vector<int32_t> WindowEngine::failed_ranks() const {
  std::vector<int32_t> out = failed_;
  if (!excluded_.empty()) out[static_cast<size_t>(rank_)] = 1;
  return out;
}

RecoveryResult WindowEngine::recover() {
  const char* op = "recover";
  if (!excluded_.empty()) throw TransportError(excluded_);
  const std::string void_group = group_failure();
  if (!void_group.empty()) throw TransportError(detail::str_cat(label(), op, ": ", void_group));
  if (pending_.active) {  // a split exchange left open: it cannot be finished any more
    pending_ = Pending{};
    abandon("it recovered while a split exchange was open");
  }
  void* mine_base = ctrl_base(rank_);
  OwnerStatus* me = layout_.status(mine_base);
  const uint64_t g = gen_ + 1;
  const auto current = [&] {
    RecoveryResult r;
    r.failed = failed_;
    r.generation = gen_;
    r.calls_completed = recovery_calls_;
    return r;
  };
  std::vector<int> alive;
  for (int r = 0; r < world_; ++r)
    if (!failed_[static_cast<size_t>(r)]) alive.push_back(r);
  if (broken_.empty() && decided_generation() < g) {
    // This rank saw no failure: join only if a peer is recovering.
    bool someone = false;
    for (int r : alive)
      if (r != rank_ && layout_.status(ctrl_base(r))->joined.load(std::memory_order_acquire) >= g) someone = true;
    if (!someone) return current();
  }
  check_excluded(op);

  // Join generation g: suspects and completed calls first, then the flag that publishes them.
  const size_t nw = layout_.mask_words();
  std::atomic<uint64_t>* my_susp = layout_.suspects(mine_base);
  for (size_t w = 0; w < nw; ++w) {
    uint64_t bits = 0;
    for (int b = 0; b < 64 && static_cast<int>(w * 64) + b < world_; ++b)
      if (suspects_[w * 64 + static_cast<size_t>(b)]) bits |= uint64_t{1} << b;
    my_susp[w].store(bits, std::memory_order_relaxed);
  }
  me->calls.store(call_state().calls_completed, std::memory_order_relaxed);
  me->joined.store(g, std::memory_order_release);

  // Resolve every other surviving rank: 1 alive (joined), 2 failed.
  std::atomic<uint64_t>* decision = &layout_.status(ctrl_base(0))->decision;
  const auto start = Clock::now();
  std::vector<int> state(static_cast<size_t>(world_), 0);
  std::vector<uint64_t> beat(static_cast<size_t>(world_), 0);
  std::vector<Clock::time_point> beat_at(static_cast<size_t>(world_), start);
  for (int r : alive) beat[static_cast<size_t>(r)] = layout_.status(ctrl_base(r))->heartbeat.load(std::memory_order_relaxed);
  state[static_cast<size_t>(rank_)] = 1;
  auto next_beat = start;
  for (;;) {
    const auto now = Clock::now();
    if (now >= next_beat) {
      me->heartbeat.fetch_add(1, std::memory_order_relaxed);
      next_beat = now + std::chrono::milliseconds(10);
    }
    if (detail::interrupt_requested())
      throw Interrupted(detail::str_cat(label(), op, ": interrupted while the surviving ranks agreed on the failed ones"));
    if ((decision->load(std::memory_order_acquire) >> 16) >= g) break;  // decided: adopt it
    // Suspects: this rank's and those of every rank that joined.
    auto suspected = [&](int r) {
      if (suspects_[static_cast<size_t>(r)]) return true;
      for (int q : alive)
        if (state[static_cast<size_t>(q)] == 1 && q != rank_ && mask_has(layout_.suspects(ctrl_base(q)), r)) return true;
      return false;
    };
    int open = 0;
    for (int r : alive) {
      int& st = state[static_cast<size_t>(r)];
      if (st != 0) continue;
      const OwnerStatus* ps = layout_.status(ctrl_base(r));
      if (ps->joined.load(std::memory_order_acquire) >= g) {
        st = 1;
        continue;
      }
      if (!peer_failure(r).empty()) {
        st = 2;
        continue;
      }
      const uint64_t hb = ps->heartbeat.load(std::memory_order_relaxed);
      if (hb != beat[static_cast<size_t>(r)]) {
        beat[static_cast<size_t>(r)] = hb;
        beat_at[static_cast<size_t>(r)] = now;
      }
      if ((suspected(r) && now - beat_at[static_cast<size_t>(r)] >= kStallGrace) || now - start >= timeout_) {
        st = 2;
        continue;
      }
      ++open;
    }
    if (open == 0) {
      // A rank that joined and died since is failed too. Then propose and try to install the proposal.
      for (int r : alive)
        if (r != rank_ && state[static_cast<size_t>(r)] == 1 && !peer_failure(r).empty()) state[static_cast<size_t>(r)] = 2;
      std::atomic<uint64_t>* prop = layout_.proposal(mine_base);
      uint64_t calls = call_state().calls_completed;
      for (size_t w = 0; w < nw; ++w) {
        uint64_t bits = 0;
        for (int b = 0; b < 64 && static_cast<int>(w * 64) + b < world_; ++b) {
          const size_t r = w * 64 + static_cast<size_t>(b);
          if (failed_[r] || state[r] == 2) bits |= uint64_t{1} << b;
        }
        prop[w].store(bits, std::memory_order_relaxed);
      }
      for (int r : alive)
        if (r != rank_ && state[static_cast<size_t>(r)] == 1)
          calls = std::min<uint64_t>(calls, layout_.status(ctrl_base(r))->calls.load(std::memory_order_relaxed));
      me->proposal_calls.store(calls, std::memory_order_relaxed);
      me->proposal_gen.store(g, std::memory_order_release);
      uint64_t d = decision->load(std::memory_order_acquire);
      while ((d >> 16) < g && !decision->compare_exchange_weak(d, (g << 16) | static_cast<uint64_t>(rank_ + 1), std::memory_order_acq_rel)) {
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }

  // Adopt the decision of generation g.
  const uint64_t d = decision->load(std::memory_order_acquire);
  const int winner = static_cast<int>(d & 0xffff) - 1;
  bool ok = (d >> 16) == g && winner >= 0 && winner < world_;
  std::vector<int32_t> agreed(static_cast<size_t>(world_), 0);
  uint64_t calls = 0;
  if (ok) {
    void* wb = ctrl_base(winner);
    const OwnerStatus* ws = layout_.status(wb);
    ok = ws->proposal_gen.load(std::memory_order_acquire) == g;
    const std::atomic<uint64_t>* prop = layout_.proposal(wb);
    for (int r = 0; r < world_; ++r) agreed[static_cast<size_t>(r)] = mask_has(prop, r) ? 1 : 0;
    calls = ws->proposal_calls.load(std::memory_order_relaxed);
    // The proposer may have moved on to a later generation while this rank read (it would have had to
    // exclude this rank to get there): read again to be sure.
    std::atomic_thread_fence(std::memory_order_acquire);
    ok = ok && ws->proposal_gen.load(std::memory_order_relaxed) == g;
  }
  if (!ok || agreed[static_cast<size_t>(rank_)]) {
    excluded_ = excluded_message(std::max<uint64_t>(d >> 16, g), op);
    throw TransportError(excluded_);
  }
  RecoveryResult res;
  for (int r = 0; r < world_; ++r)
    if (agreed[static_cast<size_t>(r)] && !failed_[static_cast<size_t>(r)]) res.newly_failed.push_back(r);
  failed_ = agreed;
  gen_ = g;
  recovery_calls_ = calls;
  broken_.clear();
  suspects_.assign(static_cast<size_t>(world_), 0);
  completed_ = false;
  pending_ = Pending{};
  for (int r = 0; r < world_; ++r) epoch_[static_cast<size_t>(r)] = g << kEpochShift;
  call_state().calls.clear();
  retire_scratch();
  res.failed = failed_;
  res.generation = gen_;
  res.calls_completed = calls;
  return res;
}

}  // namespace moedist::transport
