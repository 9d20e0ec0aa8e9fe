// Process mode under mpirun (--transport mpi|hybrid): every group is made by make_mpi_world_group,
// collective over MPI_COMM_WORLD (see process_groups.h for the order of the calls).
#include <algorithm>
#include <exception>

#include "process_groups.h"
#ifdef MOEDIST_HAVE_MPI
#include "moedist/mpi.h"  // mpi_hosts
#endif

namespace moedist::tools::demo {

void join_mpi_groups(const Layer& l, int p, bool with_report, ProcessGroups& g) {
  const int tp_rank = static_cast<int>(p / l.W), ep_rank = static_cast<int>(p % l.W);
  const bool removed = ep_rank >= l.active_ranks;
  const int member = removed ? -1 : static_cast<int>(tp_rank * l.active_ranks + ep_rank);
  const GroupOptions options = group_options(l);
  const std::string ep_group = l.ep_group(tp_rank), tp_group = l.tp_group(ep_rank);
  // After a call that failed here this process still makes the others, so that no process waits for it
  // inside MPI_Comm_split; the first error is raised at the end.
  std::exception_ptr error;
  auto make = [&](const GroupOptions& opt, const std::string& transport, int color, int key) -> std::shared_ptr<Transport> {
    try {
      return make_mpi_world_group(opt, transport, color, key);
    } catch (...) {
      if (!error) error = std::current_exception();
      return nullptr;
    }
  };
  if (auto ep = make(options, l.opt.transport, tp_rank, ep_rank)) g.registered.add(ep_group, {ep});
  if (l.tp == 2)
    if (auto tp = make(options, l.opt.transport, removed ? -1 : ep_rank, tp_rank)) g.registered.add(tp_group, {tp});
  g.all = make(options, l.opt.transport, removed ? -1 : 0, member);
  if (with_report) g.report = make(report_options(l), "mpi", removed ? -1 : 0, member);
  if (error) std::rethrow_exception(error);
}

// The hosts the ranks that call the ops run on, as the MPI transports see them; 0 for shared memory.
int mpi_host_count(const ProcessGroups& g) {
#ifdef MOEDIST_HAVE_MPI
  if (g.all) {
    const std::vector<int> hosts = mpi_hosts(*g.all);
    if (!hosts.empty()) return *std::max_element(hosts.begin(), hosts.end()) + 1;
  }
#else
  (void)g;
#endif
  return 0;
}

}  // namespace moedist::tools::demo
