#include "transport/message/message_engine.h"

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
constexpr size_t kMaxRegions = 4096;

uint64_t chunk_bytes(const ChunkHdr& h) { return h.info & kBytesMask; }
uint64_t chunk_region(const ChunkHdr& h) { return (h.info >> 48) & 0xfff; }
uint64_t chunk_skip(const ChunkHdr& h) { return h.info >> 60; }

Bytes alloc_bytes(size_t n) {
  const size_t cap = (std::max<size_t>(n, 64) + 63) / 64 * 64;
  auto* p = static_cast<unsigned char*>(std::aligned_alloc(64, cap));
  if (!p) throw Error(detail::str_cat("moedist: out of memory allocating ", cap, " bytes for messages"));
  return Bytes(p);
}

}  // namespace

void FreeBytes::operator()(unsigned char* p) const { std::free(p); }

uint64_t netns_id() {
  struct stat st {};
  if (stat("/proc/self/ns/net", &st) != 0) return 0;
  return (static_cast<uint64_t>(st.st_dev) << 32) ^ static_cast<uint64_t>(st.st_ino);
}

HostLayout host_layout(std::vector<int> host_of) {
  HostLayout h;
  h.host_of = std::move(host_of);
  const int world = static_cast<int>(h.host_of.size());
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


MessageEngine::MessageEngine(std::unique_ptr<Wire> wire, std::vector<int> host_of, std::chrono::milliseconds timeout, uint64_t nonce)
    : wire_(std::move(wire)), host_of_(std::move(host_of)), timeout_(timeout), nonce_(nonce) {
  rank_ = wire_->rank();
  world_ = wire_->world();
  peers_.resize(static_cast<size_t>(world_));
}

MessageEngine::~MessageEngine() {
  if (!wire_->closed()) {
    for (auto& r : sends_) wire_->release(r);
    for (auto& p : peers_) wire_->release(p.rreq);
    wire_->drain();
  }
  // Buffers of abandoned requests may still be in the engine's hands: they are left allocated.
  for (auto& b : graveyard_) (void)b.release();
  for (auto& v : graveyard_vec_) new std::vector<unsigned char>(std::move(v));
  for (auto& v : notices_) new std::vector<unsigned char>(std::move(v));
}

std::string MessageEngine::label() const { return detail::str_cat("[rank ", rank_, "/", world_, "] "); }

bool MessageEngine::serves(int peer) const {
  return peer >= 0 && peer < world_ && peer != rank_ && peers_[static_cast<size_t>(peer)].active;
}

void MessageEngine::send(int peer, const void* p, size_t bytes, int tag) {
  sends_.push_back(wire_->isend(peer, p, bytes, tag, tag == kTagArrive ? "send (counts)" : "send (data)"));
  sends_to_.push_back(peer);
  add(bytes_sent_, bytes);
  add(messages_, 1);
  if (host_of_[static_cast<size_t>(peer)] != host_of_[static_cast<size_t>(rank_)]) add(bytes_inter_, bytes);
}

namespace {
// The longest nap of a rank that has waited 2 ms: long waits are for slow links or peers, and a rank
// that polls its sockets every 20 us spends a core's worth of CPU among 8 ranks on 2 cores.
constexpr int kMaxNapUs = 200;
}  // namespace

template <typename Step, typename Missing>
void MessageEngine::poll(Step step, Missing missing) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto deadline = start + timeout_;
  auto next_check = start + std::chrono::milliseconds(20);
  waiting_ = false;
  int nap_us = 20;
  for (int i = 0;; ++i) {
    if (step()) return;
    if (i == 0) {
      waiting_ = true;
      wait_mark_ = start;
    }
    if (i < 64) continue;  // each probe and test above progresses the transfers
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
    // More ranks than cores must still progress: yield, then sleep a little, longer as the wait goes on
    // (20 us doubling to kMaxNapUs).
    if (now - start < std::chrono::milliseconds(2)) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(nap_us));
      nap_us = std::min(nap_us * 2, kMaxNapUs);
    }
  }
}

void MessageEngine::arrived(int peer) {
  int64_t* waits = spec_ ? spec_->waits_us : nullptr;
  if (!waiting_ || !waits) return;
  const auto now = std::chrono::steady_clock::now();
  waits[peer] += std::chrono::duration_cast<std::chrono::microseconds>(now - wait_mark_).count();
  wait_mark_ = now;
}

std::string MessageEngine::ranks_str(const std::vector<int32_t>& r) const {
  std::string s = r.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < r.size(); ++i) s += detail::str_cat(i == 0 ? "" : i + 1 == r.size() ? " and " : ", ", r[i]);
  return s;
}

void MessageEngine::timed_out(const std::vector<int>& missing, const char* what) {
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

void MessageEngine::take_notices() {
  for (;;) {
    Wire::Msg msg;
    if (!wire_->probe(-1, kTagGaveUp, &msg)) break;
    std::vector<unsigned char> m(std::max<size_t>(msg.bytes, 1));
    Wire::Req r = wire_->irecv(msg, m.data());
    while (!wire_->test(r)) {
    }
    const size_t count = msg.bytes;
    const int src = msg.source;
    GaveUp g{};
    if (count < sizeof(g) || src < 0 || src >= world_) continue;
    std::memcpy(&g, m.data(), sizeof(g));
    Peer& st = peers_[static_cast<size_t>(src)];
    if (g.nonce != nonce_ || g.epoch < st.gave_up_epoch || g.nculprits < 0 || g.nculprits > world_ ||
        count != sizeof(g) + 4 * static_cast<size_t>(g.nculprits))
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

bool MessageEngine::try_receive(int peer, Peer& st, int tag) {
  if (st.rstate == 0) {
    Wire::Msg msg;
    if (!wire_->probe(peer, tag, &msg)) return false;
    if (msg.bytes > st.rcap) {
      st.rbuf = alloc_bytes(msg.bytes);
      st.rcap = (std::max<size_t>(msg.bytes, 64) + 63) / 64 * 64;
    }
    st.rreq = wire_->irecv(msg, st.rbuf.get());
    st.rlen = msg.bytes;
    st.rstate = 1;
  }
  if (!wire_->test(st.rreq)) return false;
  st.rstate = 0;
  if (host_of_[static_cast<size_t>(peer)] != host_of_[static_cast<size_t>(rank_)]) add(recv_inter_, st.rlen);
  return true;
}

void MessageEngine::begin(const ExchangeSpec& spec, std::span<const int> remote, std::span<const size_t> index) {
  if (wire_->closed())
    throw TransportError(detail::str_cat(label(), spec.op, ": ", wire_->engine(), " was finalized (the group can no longer be used)"));
  spec_ = &spec;
  op_ = spec.op;
  wire_->set_prefix(detail::str_cat(label(), op_, ": "));
  culprits_.clear();
  for (int p : remote_) peers_[static_cast<size_t>(p)].active = false;
  remote_.assign(remote.begin(), remote.end());
  sends_.clear();
  sends_to_.clear();
  MOEDIST_ASSERT(spec.recv.size() < kMaxRegions);
  MOEDIST_ASSERT(spec.blob_bytes <= kMessageBlobMax, "blob of ", spec.blob_bytes, " bytes > ", kMessageBlobMax);
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

void MessageEngine::collect() {
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
            if (h.nregions >= kMaxRegions || st.rlen != sizeof(h) + 8 * size_t{h.nregions} + h.blob_bytes)
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

MessageEngine::Block& MessageEngine::room(Peer& st, size_t need) {
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
  MOEDIST_ASSERT(st.nblocks < 65535, "too many message blocks");
  Block& b = st.blocks[st.nblocks++];
  b.used = sizeof(BlockHdr);
  std::memset(b.data.get(), 0, sizeof(BlockHdr));
  st.last_chunk = SIZE_MAX;
  return b;
}

void* MessageEngine::dest(int peer, int region, size_t offset, size_t bytes) {
  MOEDIST_ASSERT(serves(peer), op_, ": rank ", rank_, " writes to rank ", peer, " which is not a member");
  Peer& st = peers_[static_cast<size_t>(peer)];
  MOEDIST_ASSERT(region >= 0 && static_cast<size_t>(region) < st.regions.size(), op_, ": region ", region, " of rank ", peer);
  const uint64_t size = st.regions[static_cast<size_t>(region)];
  MOEDIST_ASSERT(bytes <= size && offset <= size - bytes, op_, ": write of ", bytes, " bytes at ", offset, " past region ", region, " (",
                 size, " bytes) of rank ", peer);
  static unsigned char nothing[16];
  if (bytes == 0) return nothing;
  if (bytes > kMaxChunk)
    throw Unsupported(detail::str_cat(label(), op_, ": one write of ", bytes, " bytes to rank ", peer, " (the ", wire_->engine(), " transport takes at most ",
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

void MessageEngine::unpack(int peer, const unsigned char* m, size_t len) {
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

int MessageEngine::finish(bool failed) {
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
        if (sends_left > 0) sends_left = wire_->test_sends(sends_);
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
          if (sends_[i].live && std::find(m.begin(), m.end(), sends_to_[i]) == m.end()) m.push_back(sends_to_[i]);
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

void MessageEngine::abandon(const char* why) noexcept {
  try {
    wire_->note_failure(why ? why : "unknown error", timeout_);
    if (!wire_->closed()) {
      // Tell the remote members of this call that this rank gave up, and on whom.
      for (int p : remote_) {
        const GaveUp g{peers_[static_cast<size_t>(p)].epoch, nonce_, static_cast<int32_t>(culprits_.size()), 0};
        std::vector<unsigned char> buf(sizeof(g) + 4 * culprits_.size());
        std::memcpy(buf.data(), &g, sizeof(g));
        if (!culprits_.empty()) std::memcpy(buf.data() + sizeof(g), culprits_.data(), 4 * culprits_.size());
        if (wire_->post(p, buf.data(), buf.size(), kTagGaveUp)) notices_.push_back(std::move(buf));  // still read by the engine
      }
    }
  } catch (...) {
  }
  for (auto& r : sends_) wire_->release(r);
  sends_.clear();
  sends_to_.clear();
  for (auto& st : peers_) {
    wire_->release(st.rreq);
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
