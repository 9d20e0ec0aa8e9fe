// How the processes of one shared-memory group find each other, without any name in the file system.
//
// Every rank's window is an anonymous memfd. Rank 0 listens on a Unix-domain socket in the abstract
// namespace (it vanishes with the process: nothing to pre-create, nothing left behind); the name is
// derived from (user id, job id, group name). Every other rank connects, checks with SO_PEERCRED that
// the listener runs under its own user id, and sends its claim (rank, world size, job and group) with
// its window's descriptor (SCM_RIGHTS). Rank 0 checks each caller's user id the same way, collects one
// claim per rank and answers every member with all the descriptors. Another user can neither join,
// nor read or write a window, nor block the group (a name held by another user is skipped).
//
// Every rank also holds a name of its own (rank 0: its listener), so a second process claiming a rank
// fails at once naming both pids (the holder's from SO_PEERCRED), whenever it comes, and reports the
// duplicate to rank 0. Two processes claiming one rank (two jobs started with the same job id) make the
// group fail on every member with an error naming both. Rank 0 keeps listening for the group's whole life, so a duplicate
// claim that arrives after the group formed still raises the group's alarm (GroupAlarm, kept in rank
// 0's window header, which every member checks at each call): a group can never silently mix jobs.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace moedist::transport {

struct GroupAlarm {
  std::atomic<uint32_t> raised{0};
  char message[1020] = {};
};

class RendezvousListener;  // rank 0: answers late claimants while the group lives

struct Rendezvous {
  std::vector<int> fds;   // every rank's window descriptor (this rank's own included); caller owns them
  std::vector<int> pids;  // every rank's process id
  std::shared_ptr<RendezvousListener> listener;  // rank 0 only
  int claim_fd = -1;  // ranks > 0: the socket holding this rank's name (close it when the group ends)
};

// Forms the group. `window_fd`: this rank's memfd. `alarm` (rank 0 only): where a duplicate claim seen
// after the group formed is reported; `keepalive` keeps that memory mapped while the listener runs.
// Throws TransportError (a duplicate claim, a conflicting world size) or Timeout (a rank that did not
// join before `deadline`, named) with messages prefixed by `label`.
Rendezvous rendezvous(const std::string& job, const std::string& group, int world, int rank, int window_fd,
                      std::chrono::steady_clock::time_point deadline, std::chrono::milliseconds timeout, const std::string& label,
                      GroupAlarm* alarm, std::shared_ptr<void> keepalive);

// The abstract socket name (without its leading NUL) of rendezvous name `index` of a job and group, as
// the user `uid` sees it. Public so that tests can play a hostile user holding it.
std::string rendezvous_name(unsigned uid, const std::string& job, const std::string& group, int index);

// A claim of `rank` as it travels on the wire (tests play a hostile user sending one).
std::vector<unsigned char> claim_message(const std::string& job, const std::string& group, int world, int rank);

// Stops rank 0's listener (called when the group is destroyed).
void stop_listener(const std::shared_ptr<RendezvousListener>& listener);

}  // namespace moedist::transport
