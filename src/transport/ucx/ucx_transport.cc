// make_ucx_group: the HybridTransport (transport/hybrid) with UCX between hosts. UcxWire maps the
// message engine's wire (transport/message/wire.h) onto UCP's tag matching: a message is sent with
// tag (engine tag << 32 | sender rank); a receive probes for (tag, sender), or for the tag from any
// sender, takes the message out of the queue and receives it into a buffer of its size. Large messages
// go by UCX's rendezvous protocol, which on RDMA NICs reads or writes the data straight between the two
// ranks' buffers.
#include "moedist/ucx.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <random>
#include <thread>

#include "moedist/error.h"
#include "transport/hybrid/hybrid_transport.h"
#include "transport/window/window_engine.h"

#ifdef MOEDIST_HAVE_UCX
#include <ucp/api/ucp.h>
#endif

namespace moedist {

#ifndef MOEDIST_HAVE_UCX

std::shared_ptr<Transport> make_ucx_group(const UcxBootstrap&, const GroupOptions&) {
  throw Unsupported("make_ucx_group: this build of moedist has no UCX transport (install libucx-dev and rebuild)");
}
bool ucx_available() { return false; }

#else

namespace transport {
namespace {

constexpr int kTagHello = 0x4d30;  // the connection check at the end of the bootstrap
constexpr uint64_t kSenderMask = 0xffffffffull;

uint64_t full_tag(int tag, int sender) { return (static_cast<uint64_t>(static_cast<uint32_t>(tag)) << 32) | static_cast<uint32_t>(sender); }

class UcxWire : public Wire {
 public:
  UcxWire(int rank, int world, std::string label) : rank_(rank), world_(world), label_(std::move(label)) {
    eps_.assign(static_cast<size_t>(world), nullptr);
    lost_.assign(static_cast<size_t>(world), UCS_OK);
    ucp_config_t* config = nullptr;
    ok(ucp_config_read(nullptr, nullptr, &config), "ucp_config_read");
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
    params.features = UCP_FEATURE_TAG;
    params.mt_workers_shared = 0;
    const ucs_status_t st = ucp_init(&params, config, &context_);
    ucp_config_release(config);
    ok(st, "ucp_init");
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // one thread at a time, not always the same one
    if (ucs_status_t s = ucp_worker_create(context_, &wp, &worker_); s != UCS_OK) {
      ucp_cleanup(context_);
      context_ = nullptr;
      ok(s, "ucp_worker_create");
    }
  }

  ~UcxWire() override {
    // Close every endpoint gracefully (what was sent is delivered first), for at most 2 s; then by force.
    std::vector<void*> closing;
    for (ucp_ep_h ep : eps_) {
      if (!ep) continue;
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = 0;
      ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &p);
      if (UCS_PTR_IS_PTR(r)) closing.push_back(r);
    }
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (!closing.empty() && std::chrono::steady_clock::now() < until) {
      ucp_worker_progress(worker_);
      closing.erase(std::remove_if(closing.begin(), closing.end(),
                                   [](void* r) {
                                     if (ucp_request_check_status(r) == UCS_INPROGRESS) return false;
                                     ucp_request_free(r);
                                     return true;
                                   }),
                    closing.end());
    }
    for (void* r : closing) {
      ucp_request_cancel(worker_, r);
      ucp_request_free(r);
    }
    if (worker_) ucp_worker_destroy(worker_);
    if (context_) ucp_cleanup(context_);
  }

  std::string address() {
    ucp_address_t* a = nullptr;
    size_t len = 0;
    ok(ucp_worker_get_address(worker_, &a, &len), "ucp_worker_get_address");
    std::string s(reinterpret_cast<const char*>(a), len);
    ucp_worker_release_address(worker_, a);
    return s;
  }

  void connect(int peer, const std::string& addr) {
    ucp_ep_params_t p{};
    p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
    p.address = reinterpret_cast<const ucp_address_t*>(addr.data());
    p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    p.err_handler.cb = &UcxWire::on_error;
    p.err_handler.arg = &peers_[peer];
    peers_[peer] = PeerRef{this, peer};
    ok(ucp_ep_create(worker_, &p, &eps_[static_cast<size_t>(peer)]), "ucp_ep_create");
  }

  int rank() const override { return rank_; }
  int world() const override { return world_; }
  const char* engine() const override { return "UCX"; }

  Req isend(int peer, const void* p, size_t bytes, int tag, const char* what) override {
    return send(peer, p, bytes, tag, what, false);
  }

  // synced: the send completes only once the peer has received it (ucp_tag_send_sync_nbx).
  Req send(int peer, const void* p, size_t bytes, int tag, const char* what, bool synced) {
    ucs_status_ptr_t r = synced ? ucp_tag_send_sync_nbx(ep(peer, what), p, bytes, full_tag(tag, rank_), &no_params_)
                                : ucp_tag_send_nbx(ep(peer, what), p, bytes, full_tag(tag, rank_), &no_params_);
    if (UCS_PTR_IS_ERR(r)) fail(UCS_PTR_STATUS(r), what, peer);
    return Req{reinterpret_cast<uintptr_t>(r), r != nullptr};
  }

  size_t test_sends(std::span<Req> reqs) override {
    ucp_worker_progress(worker_);
    size_t live = 0;
    for (Req& r : reqs)
      if (r.live && !done(r, "send")) ++live;
    return live;
  }

  bool probe(int peer, int tag, Msg* m) override {
    ucp_worker_progress(worker_);
    ucp_tag_recv_info_t info{};
    const uint64_t mask = peer < 0 ? ~kSenderMask : ~uint64_t{0};
    ucp_tag_message_h msg = ucp_tag_probe_nb(worker_, full_tag(tag, peer < 0 ? 0 : peer), mask, 1, &info);
    if (!msg) {
      // Nothing from a peer whose connection broke: it will not come.
      if (peer >= 0 && lost_[static_cast<size_t>(peer)] != UCS_OK) fail(lost_[static_cast<size_t>(peer)], "receive", peer);
      return false;
    }
    m->source = static_cast<int>(info.sender_tag & kSenderMask);
    m->bytes = info.length;
    m->h = reinterpret_cast<uintptr_t>(msg);
    return true;
  }

  Req irecv(const Msg& m, void* buf) override {
    ucs_status_ptr_t r = ucp_tag_msg_recv_nbx(worker_, buf, m.bytes, reinterpret_cast<ucp_tag_message_h>(m.h), &no_params_);
    if (UCS_PTR_IS_ERR(r)) fail(UCS_PTR_STATUS(r), "ucp_tag_msg_recv_nbx", m.source);
    return Req{reinterpret_cast<uintptr_t>(r), r != nullptr};
  }

  bool test(Req& r) override {
    if (!r.live) return true;
    ucp_worker_progress(worker_);
    return done(r, "receive");
  }

  void release(Req& r) noexcept override {
    if (!r.live) return;
    r.live = false;
    void* q = reinterpret_cast<void*>(r.h);
    ucp_request_cancel(worker_, q);
    ucp_request_free(q);
  }

  bool post(int peer, const void* p, size_t bytes, int tag) noexcept override {
    if (peer < 0 || peer >= world_ || !eps_[static_cast<size_t>(peer)] || lost_[static_cast<size_t>(peer)] != UCS_OK) return false;
    ucs_status_ptr_t r = ucp_tag_send_nbx(eps_[static_cast<size_t>(peer)], p, bytes, full_tag(tag, rank_), &no_params_);
    if (UCS_PTR_IS_ERR(r)) return false;
    if (r) ucp_request_free(r);  // completes on its own
    return true;
  }

  void drain() noexcept override {
    std::vector<unsigned char> sink;
    for (int i = 0; i < 100000; ++i) {
      ucp_worker_progress(worker_);
      ucp_tag_recv_info_t info{};
      ucp_tag_message_h msg = ucp_tag_probe_nb(worker_, 0, 0, 1, &info);
      if (!msg) break;
      sink.resize(std::max<size_t>(info.length, 1));
      ucs_status_ptr_t r = ucp_tag_msg_recv_nbx(worker_, sink.data(), info.length, msg, &no_params_);
      if (UCS_PTR_IS_ERR(r)) break;
      if (r) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
        while (ucp_request_check_status(r) == UCS_INPROGRESS && std::chrono::steady_clock::now() < until) ucp_worker_progress(worker_);
        ucp_request_cancel(worker_, r);
        ucp_request_free(r);
      }
    }
  }

  // Checks that every rank in `peers` is reachable: sends each a hello and waits for theirs, and for its
  // own to be received (so that a rank may leave the group, or die, once make_ucx_group returned
  // everywhere without leaving a peer waiting for its hello).
  void hello(const std::vector<int>& peers, std::chrono::milliseconds timeout) {
    set_prefix(label_ + "make_ucx_group: ");
    const uint64_t mark = 0x6d6f656469737421ull;
    std::vector<Req> sends;
    for (int p : peers) sends.push_back(send(p, &mark, sizeof(mark), kTagHello, "send (connection check)", true));
    std::vector<bool> got(static_cast<size_t>(world_), false);
    size_t pending = peers.size();
    const auto until = std::chrono::steady_clock::now() + timeout;
    uint64_t in = 0;
    while (pending > 0 || test_sends(sends) > 0) {
      for (int p : peers) {
        Msg m;
        if (got[static_cast<size_t>(p)] || !probe(p, kTagHello, &m)) continue;
        if (m.bytes != sizeof(in))
          throw TransportError(detail::str_cat(prefix_, "rank ", p, " sent a connection check of ", m.bytes, " bytes (", sizeof(in),
                                               " expected): its moedist differs from this one"));
        Req r = irecv(m, &in);
        while (!test(r)) {
        }
        got[static_cast<size_t>(p)] = true;
        --pending;
      }
      if (std::chrono::steady_clock::now() >= until) {
        std::string missing;
        for (int p : peers)
          if (!got[static_cast<size_t>(p)]) missing += detail::str_cat(missing.empty() ? "" : ", ", p);
        for (Req& r : sends) release(r);
        throw Timeout(detail::str_cat(prefix_, "no answer within ", timeout.count(), " ms from rank(s) ", missing.empty() ? "(sends)" : missing,
                                      " on other hosts over UCX (is the network between the hosts up, and does UCX use it? see UCX_TLS and "
                                      "UCX_NET_DEVICES; `ucx_info -d` lists the devices UCX sees)"));
      }
      if (detail::interrupt_requested()) throw Interrupted(detail::str_cat(prefix_, "interrupted while connecting"));
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  struct PeerRef {
    UcxWire* wire = nullptr;
    int rank = -1;
  };

  static void on_error(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* ref = static_cast<PeerRef*>(arg);
    ref->wire->lost_[static_cast<size_t>(ref->rank)] = status;
  }

  ucp_ep_h ep(int peer, const char* what) {
    if (peer < 0 || peer >= world_ || !eps_[static_cast<size_t>(peer)])
      throw TransportError(detail::str_cat(prefix_, what, ": no UCX connection to rank ", peer));
    if (lost_[static_cast<size_t>(peer)] != UCS_OK) fail(lost_[static_cast<size_t>(peer)], what, peer);
    return eps_[static_cast<size_t>(peer)];
  }

  bool done(Req& r, const char* what) {
    void* q = reinterpret_cast<void*>(r.h);
    const ucs_status_t st = ucp_request_check_status(q);
    if (st == UCS_INPROGRESS) return false;
    ucp_request_free(q);
    r.live = false;
    if (st != UCS_OK) fail(st, what, -1);
    return true;
  }

  [[noreturn]] void fail(ucs_status_t st, const char* what, int peer) {
    std::string who;
    for (int p = 0; p < world_; ++p)
      if (lost_[static_cast<size_t>(p)] != UCS_OK) who += detail::str_cat(who.empty() ? "" : ", ", p);
    if (peer >= 0 && who.empty()) who = detail::str_cat(peer);
    throw TransportError(detail::str_cat(prefix_, "UCX ", what, " failed: ", ucs_status_string(st),
                                         who.empty() ? "" : detail::str_cat(" (connection lost to rank ", who, ": it died, or its host is unreachable)")));
  }

  void ok(ucs_status_t st, const char* what) {
    if (st != UCS_OK) throw TransportError(detail::str_cat(label_, "make_ucx_group: ", what, " failed: ", ucs_status_string(st)));
  }

  int rank_, world_;
  std::string label_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::vector<ucp_ep_h> eps_;
  std::vector<ucs_status_t> lost_;  // per peer: the error its endpoint reported (UCS_OK: none)
  std::map<int, PeerRef> peers_;    // stable addresses for the error handlers
  ucp_request_param_t no_params_{};
};

}  // namespace
}  // namespace transport

std::shared_ptr<Transport> make_ucx_group(const UcxBootstrap& boot, const GroupOptions& options) {
  using namespace transport;
  const int W = boot.world_size, R = boot.rank;
  const std::string label = detail::str_cat("[rank ", R, "/", W, "] make_ucx_group: ");
  if (W < 1) throw InvalidArgument(detail::str_cat(label, "world_size=", W, " (must be >= 1)"));
  if (R < 0 || R >= W) throw InvalidArgument(detail::str_cat(label, "rank=", R, " (must be in [0, ", W, "))"));
  if (static_cast<int>(boot.host_of.size()) != W)
    throw InvalidArgument(detail::str_cat(label, "host_of has ", boot.host_of.size(), " entries (must have world_size=", W, ")"));
  if (boot.job.empty() || boot.job.size() > 64) throw InvalidArgument(detail::str_cat(label, "job=\"", boot.job, "\" (must have 1 to 64 characters)"));
  if (!boot.allgather) throw InvalidArgument(detail::str_cat(label, "allgather is empty (a collective over the job's ranks is needed)"));
  if (options.ranks_per_server < 0) throw InvalidArgument(detail::str_cat(label, "ranks_per_server=", options.ranks_per_server, " (must be >= 0)"));
  // Hosts numbered by their lowest rank.
  std::map<int, int> number;
  std::vector<int> host_of(static_cast<size_t>(W));
  for (int r = 0; r < W; ++r) {
    auto [it, fresh] = number.emplace(boot.host_of[static_cast<size_t>(r)], static_cast<int>(number.size()));
    host_of[static_cast<size_t>(r)] = it->second;
  }
  HostLayout hosts = host_layout(std::move(host_of));
  int ranks_per_server = options.ranks_per_server;
  if (ranks_per_server == 0) {
    if (hosts.block == 0) {
      std::string layout;
      for (int r = 0; r < W && r < 32; ++r) layout += detail::str_cat(r ? " " : "", hosts.host_of[static_cast<size_t>(r)]);
      throw InvalidArgument(detail::str_cat(label, "the hosts do not hold consecutive, equal blocks of ranks (host of each rank: ", layout,
                                            W > 32 ? " ..." : "", "), which comm_alg \"hierarchy\" needs for its servers: pass ranks_per_server"));
    }
    ranks_per_server = hosts.block;
  }
  const auto timeout = default_timeout(options.timeout);
  auto wire = std::make_unique<UcxWire>(R, W, detail::str_cat("[rank ", R, "/", W, "] "));
  // One allgather: [nonce (rank 0's is the group's) | UCX worker address].
  uint64_t nonce = 0;
  if (R == 0) {
    std::random_device rd;
    nonce = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }
  std::string mine(sizeof(nonce), '\0');
  std::memcpy(mine.data(), &nonce, sizeof(nonce));
  mine += wire->address();
  const std::vector<std::string> all = boot.allgather(mine);
  if (static_cast<int>(all.size()) != W)
    throw InvalidArgument(detail::str_cat(label, "allgather returned ", all.size(), " entries (must return world_size=", W, ")"));
  if (all[static_cast<size_t>(R)] != mine) throw InvalidArgument(detail::str_cat(label, "allgather did not return this rank's bytes at its rank"));
  for (int r = 0; r < W; ++r)
    if (all[static_cast<size_t>(r)].size() <= sizeof(nonce))
      throw TransportError(detail::str_cat(label, "rank ", r, " sent no UCX address (", all[static_cast<size_t>(r)].size(), " bytes)"));
  std::memcpy(&nonce, all[0].data(), sizeof(nonce));
  std::vector<int> remote;
  for (int r = 0; r < W; ++r)
    if (hosts.host_of[static_cast<size_t>(r)] != hosts.host_of[static_cast<size_t>(R)]) {
      wire->connect(r, all[static_cast<size_t>(r)].substr(sizeof(nonce)));
      remote.push_back(r);
    }
  wire->hello(remote, timeout);
  auto engine = std::make_unique<MessageEngine>(std::move(wire), hosts.host_of, timeout, nonce);
  return std::make_shared<HybridTransport>("ucx", std::move(engine), std::move(hosts), boot.job, options, ranks_per_server);
}

bool ucx_available() { return true; }

#endif

}  // namespace moedist
