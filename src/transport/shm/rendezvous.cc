#include "transport/shm/rendezvous.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>

#include "moedist/error.h"

namespace moedist::transport {

namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kClaimMagic = 0x6d6f65636c61696dull;  // "moeclaim"
constexpr uint64_t kReplyMagic = 0x6d6f657265706c79ull;  // "moereply"
constexpr int kNames = 16;       // names tried when another user holds one
constexpr int kFdsPerMsg = 240;  // below the kernel's SCM_MAX_FD (253)

struct Claim {
  uint64_t magic = kClaimMagic;
  int32_t world = 0;
  int32_t rank = 0;
  int32_t holder_pid = 0;  // non-zero: not a claim but a report: this rank is already held by that pid
  char ident[512] = {};  // job '\n' group: tells a hash collision from a duplicate
};

struct Reply {
  uint64_t magic = kReplyMagic;
  int32_t status = 0;  // 0: welcome (the pid table and the descriptors follow); else message says why not
  int32_t world = 0;
  char message[1020] = {};
};

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::string name_of(unsigned uid, const std::string& ident, int index) {
  char name[100];
  std::snprintf(name, sizeof(name), "moedist/v2/%u/%016llx/%d", uid, static_cast<unsigned long long>(fnv1a(ident)), index);
  return name;
}

sockaddr_un address(const std::string& ident, int index, socklen_t* len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  const std::string name = name_of(static_cast<unsigned>(geteuid()), ident, index);
  a.sun_path[0] = '\0';  // abstract namespace: no file, gone with the last descriptor
  std::memcpy(a.sun_path + 1, name.data(), name.size());
  *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return a;
}

struct Peer {
  int uid = -1;
  int pid = 0;
};

Peer peer_of(int fd) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return {};
  return {static_cast<int>(cred.uid), static_cast<int>(cred.pid)};
}

bool same_user(const Peer& p) { return p.uid == static_cast<int>(geteuid()); }

int ms_left(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(std::min<long long>(left, 1 << 30));
}

bool wait_readable(int fd, Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    const int r = poll(&p, 1, ms_left(deadline));
    if (r > 0) return true;
    if (r == 0) return false;
    if (errno != EINTR) return false;
  }
}

// One message with up to kFdsPerMsg descriptors.
bool send_msg(int fd, const void* data, size_t bytes, const int* fds, int nfds) {
  iovec iov{const_cast<void*>(data), bytes};
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  std::vector<char> ctl;
  if (nfds > 0) {
    ctl.assign(CMSG_SPACE(sizeof(int) * static_cast<size_t>(nfds)), 0);
    m.msg_control = ctl.data();
    m.msg_controllen = ctl.size();
    cmsghdr* c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * static_cast<size_t>(nfds));
    std::memcpy(CMSG_DATA(c), fds, sizeof(int) * static_cast<size_t>(nfds));
  }
  for (;;) {
    const ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL);
    if (n == static_cast<ssize_t>(bytes)) return true;
    if (n < 0 && errno == EINTR) continue;
    return false;
  }
}

// Receives one message of exactly `bytes` bytes (descriptors appended to *fds); false on a short or
// malformed message, a closed connection or the deadline.
bool recv_msg(int fd, void* data, size_t bytes, std::vector<int>* fds, Clock::time_point deadline) {
  if (!wait_readable(fd, deadline)) return false;
  iovec iov{data, bytes};
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  std::vector<char> ctl(CMSG_SPACE(sizeof(int) * kFdsPerMsg));
  m.msg_control = ctl.data();
  m.msg_controllen = ctl.size();
  ssize_t n;
  do n = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      const size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < k; ++i) {
        int d;
        std::memcpy(&d, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        if (fds) fds->push_back(d);
        else close(d);
      }
    }
  return n == static_cast<ssize_t>(bytes) && !(m.msg_flags & (MSG_TRUNC | MSG_CTRUNC));
}

void close_all(std::vector<int>& fds) {
  for (int f : fds)
    if (f >= 0) close(f);
  fds.clear();
}

int new_socket() {
  const int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (s < 0) throw TransportError(detail::str_cat("socket(AF_UNIX): ", std::strerror(errno)));
  return s;
}

// A connection to the listener of name `index`, or -1 (no listener there).
int connect_to(const std::string& ident, int index) {
  const int s = new_socket();
  socklen_t len;
  const sockaddr_un a = address(ident, index, &len);
  if (connect(s, reinterpret_cast<const sockaddr*>(&a), len) == 0) return s;
  close(s);
  return -1;
}

void send_error(int conn, int world, const std::string& message) {
  Reply r;
  r.status = 1;
  r.world = world;
  std::snprintf(r.message, sizeof(r.message), "%s", message.c_str());
  (void)send_msg(conn, &r, sizeof(r), nullptr, 0);
}

std::string duplicate_message(int rank, const std::string& group, const std::string& job, int pid_a, int pid_b) {
  return detail::str_cat("rank ", rank, " of group \"", group, "\" is claimed by two processes, pid ", pid_a, " and pid ", pid_b,
                         ", under job id \"", job, "\": two jobs use the same job id. Give every job its own (MOEDIST_JOB_ID; ",
                         "under torchrun TORCHELASTIC_RUN_ID or --rdzv-id; `moedist launch` makes a unique one)");
}

struct FdGuard {
  int fd = -1;
  ~FdGuard() {
    if (fd >= 0) close(fd);
  }
  int release() {
    const int f = fd;
    fd = -1;
    return f;
  }
};

// Tells rank 0 that `rank` was claimed a second time, so that its group fails too: best effort, trying
// for up to 2 s while rank 0 is not listening yet.
void report_duplicate(const std::string& ident, const Claim& mine, int holder_pid) {
  const auto until = Clock::now() + std::chrono::seconds(2);
  while (Clock::now() < until) {
    for (int idx = 0; idx < kNames; ++idx) {
      const int conn = connect_to(ident, idx);
      if (conn < 0) break;
      if (!same_user(peer_of(conn))) {
        close(conn);
        continue;
      }
      Claim report = mine;
      report.holder_pid = holder_pid;
      (void)send_msg(conn, &report, sizeof(report), nullptr, 0);
      Reply r;
      (void)recv_msg(conn, &r, sizeof(r), nullptr, Clock::now() + std::chrono::milliseconds(500));
      close(conn);
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace

// Rank 0's listener once the group has formed: every later claim for this job and group is a second
// process claiming a rank that is taken, so the group's alarm is raised and the claimant is refused.
class RendezvousListener {
 public:
  int fd = -1;
  pid_t owner = 0;
  std::atomic<bool> stop{false};
  std::string ident, job, group;
  int world = 0;
  std::vector<int> pids;
  GroupAlarm* alarm = nullptr;
  std::shared_ptr<void> keepalive;

  void run() {
    while (!stop.load(std::memory_order_acquire)) {
      pollfd p{fd, POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      const int conn = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (conn < 0) continue;
      const Peer peer = peer_of(conn);
      Claim cl;
      if (same_user(peer) && recv_msg(conn, &cl, sizeof(cl), nullptr, Clock::now() + std::chrono::seconds(2)) &&
          cl.magic == kClaimMagic && std::strncmp(cl.ident, ident.c_str(), sizeof(cl.ident)) == 0) {
        const int r = cl.rank >= 0 && cl.rank < world ? cl.rank : 0;
        const std::string msg = duplicate_message(r, group, job, cl.holder_pid ? cl.holder_pid : pids[static_cast<size_t>(r)], peer.pid);
        if (alarm && alarm->raised.load(std::memory_order_acquire) == 0) {
          std::snprintf(alarm->message, sizeof(alarm->message), "%s (the second claim came after the group had formed)", msg.c_str());
          alarm->raised.store(1, std::memory_order_release);
        }
        send_error(conn, world, msg);
      }
      close(conn);
    }
    close(fd);
  }
};

std::string rendezvous_name(unsigned uid, const std::string& job, const std::string& group, int index) {
  return name_of(uid, job + "\n" + group, index);
}

std::vector<unsigned char> claim_message(const std::string& job, const std::string& group, int world, int rank) {
  Claim c;
  c.world = world;
  c.rank = rank;
  std::snprintf(c.ident, sizeof(c.ident), "%s", (job + "\n" + group).c_str());
  std::vector<unsigned char> out(sizeof(c));
  std::memcpy(out.data(), &c, sizeof(c));
  return out;
}

void stop_listener(const std::shared_ptr<RendezvousListener>& l) {
  if (!l) return;
  // In a forked child the thread does not exist; the descriptor is shared with the parent: leave both.
  if (l->owner != getpid()) return;
  l->stop.store(true, std::memory_order_release);
}

Rendezvous rendezvous(const std::string& job, const std::string& group, int world, int rank, int window_fd, Clock::time_point deadline,
                      std::chrono::milliseconds timeout, const std::string& label, GroupAlarm* alarm, std::shared_ptr<void> keepalive) {
  const std::string ident = job + "\n" + group;
  Claim mine;
  mine.world = world;
  mine.rank = rank;
  std::snprintf(mine.ident, sizeof(mine.ident), "%s", ident.c_str());
  Rendezvous out;
  if (world == 1) {
    out.fds = {window_fd};
    out.pids = {static_cast<int>(getpid())};
    return out;
  }
  auto fail = [&](const std::string& what) -> TransportError { return TransportError(label + what); };

  FdGuard claim;  // this rank's own name, held for the group's life (rank 0's is its listener)
  if (rank != 0) {
    const std::string rid = ident + "\nrank " + std::to_string(rank);
    for (int idx = 0; idx < kNames && claim.fd < 0; ++idx) {
      const int sock = new_socket();
      socklen_t len;
      const sockaddr_un a = address(rid, idx, &len);
      if (bind(sock, reinterpret_cast<const sockaddr*>(&a), len) == 0 && listen(sock, 16) == 0) {
        claim.fd = sock;
        break;
      }
      const int err = errno;
      close(sock);
      if (err != EADDRINUSE) throw fail(detail::str_cat("bind (abstract Unix socket): ", std::strerror(err)));
      int conn = connect_to(rid, idx);
      for (int i = 0; i < 20 && conn < 0; ++i) {  // its holder may be between bind and listen
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        conn = connect_to(rid, idx);
      }
      if (conn < 0) continue;  // bound and never listening: not one of ours
      const Peer holder = peer_of(conn);
      close(conn);
      if (!same_user(holder)) continue;
      report_duplicate(ident, mine, holder.pid);
      throw fail(duplicate_message(rank, group, job, holder.pid, static_cast<int>(getpid())));
    }
    if (claim.fd < 0) throw fail(detail::str_cat("all ", kNames, " names of rank ", rank, " are held by other users"));
  }

  if (rank != 0) {
    // Find rank 0's listener (skipping names other users hold), claim this rank, receive the group.
    auto pause = std::chrono::microseconds(500);
    for (;;) {
      int conn = -1;
      for (int idx = 0; idx < kNames && conn < 0; ++idx) {
        conn = connect_to(ident, idx);
        if (conn < 0) break;  // nobody there yet: rank 0 takes the first name no other user holds
        if (!same_user(peer_of(conn))) {
          close(conn);
          conn = -1;
        }
      }
      if (conn >= 0) {
        Reply r;
        const bool sent = send_msg(conn, &mine, sizeof(mine), &window_fd, 1);
        if (!sent || !recv_msg(conn, &r, sizeof(r), nullptr, deadline) || r.magic != kReplyMagic) {
          close(conn);
          if (Clock::now() >= deadline)
            throw Timeout(label + detail::str_cat("timed out after ", timeout.count(), " ms waiting for rank 0 to admit this rank"));
          continue;  // rank 0 went away during the handshake: look again
        }
        if (r.status != 0) {
          close(conn);
          throw fail(detail::str_cat("rank 0 refused this rank: ", r.message));
        }
        if (r.world != world) {
          close(conn);
          throw fail(detail::str_cat("rank 0 formed the group with world size ", r.world, ", this rank with ", world));
        }
        std::vector<int32_t> pids(static_cast<size_t>(world));
        std::vector<int> fds;
        bool ok = recv_msg(conn, pids.data(), pids.size() * sizeof(int32_t), nullptr, deadline);
        while (ok && static_cast<int>(fds.size()) < world) {
          int32_t count = 0;
          ok = recv_msg(conn, &count, sizeof(count), &fds, deadline);
        }
        close(conn);
        if (!ok || static_cast<int>(fds.size()) != world) {
          close_all(fds);
          throw fail("rank 0 broke off while handing out the group's windows");
        }
        out.fds = std::move(fds);
        out.pids.assign(pids.begin(), pids.end());
        out.claim_fd = claim.release();
        return out;
      }
      if (Clock::now() >= deadline)
        throw Timeout(label + detail::str_cat("timed out after ", timeout.count(), " ms waiting for rank 0 to open the group (it did not start, ",
                                              "failed, or runs under another job id or group name)"));
      std::this_thread::sleep_for(pause);
      pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(10));
    }
  }

  // Rank 0: take the first name no other user holds.
  int lfd = -1;
  for (int idx = 0; idx < kNames && lfd < 0; ++idx) {
    const int s = new_socket();
    socklen_t len;
    const sockaddr_un a = address(ident, idx, &len);
    if (bind(s, reinterpret_cast<const sockaddr*>(&a), len) == 0) {
      if (listen(s, SOMAXCONN) != 0) {
        const int err = errno;
        close(s);
        throw fail(detail::str_cat("listen: ", std::strerror(err)));
      }
      lfd = s;
      break;
    }
    const int err = errno;
    close(s);
    if (err != EADDRINUSE) throw fail(detail::str_cat("bind (abstract Unix socket): ", std::strerror(err)));
    const int conn = connect_to(ident, idx);
    if (conn < 0) {
      --idx;  // its holder just went away: try the same name again
      continue;
    }
    if (!same_user(peer_of(conn))) {
      close(conn);
      continue;
    }
    // Another process of this user is rank 0 of this job and group: claim rank 0 there, so that it
    // learns of the duplicate too, and fail with its answer.
    Reply r;
    const bool got = send_msg(conn, &mine, sizeof(mine), &window_fd, 1) && recv_msg(conn, &r, sizeof(r), nullptr, deadline) &&
                     r.magic == kReplyMagic && r.status != 0;
    close(conn);
    throw fail(got ? std::string(r.message)
                   : detail::str_cat("rank 0 of group \"", group, "\" under job id \"", job, "\" is already held by another process of this ",
                                     "user: two jobs use the same job id (give every job its own: MOEDIST_JOB_ID)"));
  }
  if (lfd < 0) throw fail(detail::str_cat("all ", kNames, " rendezvous names of this group are held by other users"));

  std::vector<int> conns(static_cast<size_t>(world), -1), fds(static_cast<size_t>(world), -1), pids(static_cast<size_t>(world), 0);
  fds[0] = window_fd;
  pids[0] = static_cast<int>(getpid());
  std::vector<int> refused;  // claimants told no, kept open until the end so they read the answer
  int joined = 1;
  std::string conflict;
  auto refuse_all = [&](const std::string& msg) {
    for (int r = 1; r < world; ++r)
      if (conns[static_cast<size_t>(r)] >= 0) send_error(conns[static_cast<size_t>(r)], world, msg);
  };
  auto cleanup = [&] {
    for (int r = 1; r < world; ++r) {
      if (conns[static_cast<size_t>(r)] >= 0) close(conns[static_cast<size_t>(r)]);
      if (fds[static_cast<size_t>(r)] >= 0) close(fds[static_cast<size_t>(r)]);
    }
    close_all(refused);
  };
  // After a conflict, claimants still arriving are answered (so they fail at once, naming both claimants)
  // until every rank has been claimed twice, as when two whole jobs share the id, or the deadline.
  std::vector<int> claims(static_cast<size_t>(world), 0);
  claims[0] = 1;
  auto all_twice = [&] { return std::all_of(claims.begin(), claims.end(), [](int n) { return n >= 2; }); };
  while (joined < world || (!conflict.empty() && !all_twice())) {
    if (Clock::now() >= deadline) break;
    if (!wait_readable(lfd, std::min(deadline, Clock::now() + std::chrono::milliseconds(100)))) continue;
    const int conn = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    if (conn < 0) continue;
    const Peer peer = peer_of(conn);
    if (!same_user(peer)) {  // another user: not even an answer
      close(conn);
      continue;
    }
    Claim cl;
    std::vector<int> got;
    if (!recv_msg(conn, &cl, sizeof(cl), &got, std::min(deadline, Clock::now() + std::chrono::seconds(5))) || cl.magic != kClaimMagic ||
        got.size() != (cl.holder_pid ? 0u : 1u)) {
      close_all(got);
      close(conn);
      continue;
    }
    if (std::strncmp(cl.ident, mine.ident, sizeof(cl.ident)) != 0) {
      send_error(conn, world, "a different job and group hash to the same rendezvous name");
      close_all(got);
      close(conn);
      continue;
    }
    if (cl.rank >= 0 && cl.rank < world) ++claims[static_cast<size_t>(cl.rank)];
    std::string why;
    if (cl.holder_pid) {
      why = duplicate_message(cl.rank, group, job, cl.holder_pid, peer.pid);
    } else if (cl.world != world) {
      why = detail::str_cat("pid ", peer.pid, " joined group \"", group, "\" (job id \"", job, "\") as rank ", cl.rank, " of ", cl.world,
                            " ranks, rank 0 (pid ", pids[0], ") has ", world, ": two jobs use the same job id, or the ranks disagree on ",
                            "the world size");
    } else if (cl.rank <= 0 || cl.rank >= world) {
      why = cl.rank == 0 ? duplicate_message(0, group, job, pids[0], peer.pid)
                         : detail::str_cat("pid ", peer.pid, " claimed rank ", cl.rank, " (must be in [0, ", world, "))");
    } else if (conns[static_cast<size_t>(cl.rank)] >= 0 || !conflict.empty()) {
      why = conns[static_cast<size_t>(cl.rank)] >= 0 ? duplicate_message(cl.rank, group, job, pids[static_cast<size_t>(cl.rank)], peer.pid)
                                                     : conflict;
    }
    if (!why.empty()) {
      if (conflict.empty()) {
        conflict = why;
        refuse_all(conflict);
      }
      send_error(conn, world, why == conflict ? why : conflict);
      close_all(got);
      refused.push_back(conn);
      continue;
    }
    conns[static_cast<size_t>(cl.rank)] = conn;
    fds[static_cast<size_t>(cl.rank)] = got[0];
    pids[static_cast<size_t>(cl.rank)] = peer.pid;
    ++joined;
  }
  if (!conflict.empty()) {
    cleanup();
    close(lfd);
    throw fail(conflict);
  }
  if (joined < world) {
    std::string missing;
    int n = 0;
    for (int r = 1; r < world; ++r)
      if (conns[static_cast<size_t>(r)] < 0 && n++ < 16) missing += detail::str_cat(missing.empty() ? "" : ", ", "rank ", r);
    const std::string msg = detail::str_cat("timed out after ", timeout.count(), " ms waiting for ", missing, n > 16 ? ", ..." : "",
                                            " to join (not started, failed, or under another job id or group name)");
    refuse_all(detail::str_cat("rank 0 ", msg));
    cleanup();
    close(lfd);
    throw Timeout(label + msg);
  }

  // Welcome every member: the pid table, then every window descriptor.
  std::vector<int32_t> pid_table(pids.begin(), pids.end());
  for (int r = 1; r < world; ++r) {
    const int conn = conns[static_cast<size_t>(r)];
    Reply ok;
    ok.world = world;
    bool sent = send_msg(conn, &ok, sizeof(ok), nullptr, 0) && send_msg(conn, pid_table.data(), pid_table.size() * 4, nullptr, 0);
    for (int at = 0; sent && at < world; at += kFdsPerMsg) {
      const int32_t count = std::min(kFdsPerMsg, world - at);
      sent = send_msg(conn, &count, sizeof(count), fds.data() + at, count);
    }
    (void)sent;  // a member that went away fails its own setup; the group's first exchange names it
  }
  for (int r = 1; r < world; ++r) close(conns[static_cast<size_t>(r)]);
  close_all(refused);

  auto l = std::make_shared<RendezvousListener>();
  l->fd = lfd;
  l->owner = getpid();
  l->ident = ident;
  l->job = job;
  l->group = group;
  l->world = world;
  l->pids = pids;
  l->alarm = alarm;
  l->keepalive = std::move(keepalive);
  std::thread([l] { l->run(); }).detach();
  out.fds = std::move(fds);
  out.pids = std::move(pids);
  out.listener = std::move(l);
  return out;
}

}  // namespace moedist::transport
