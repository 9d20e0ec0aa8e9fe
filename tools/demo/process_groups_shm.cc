// Process mode over shared memory: every group is made by make_shm_group (one host).
#include "process_groups.h"

namespace moedist::tools::demo {

void join_shm_groups(const Layer& l, int p, bool with_report, ProcessGroups& g) {
  const int tp_rank = static_cast<int>(p / l.W), ep_rank = static_cast<int>(p % l.W);
  const bool removed = ep_rank >= l.active_ranks;
  const int member = removed ? -1 : static_cast<int>(tp_rank * l.active_ranks + ep_rank);
  const GroupOptions options = group_options(l);
  const std::string ep_group = l.ep_group(tp_rank), tp_group = l.tp_group(ep_rank);
  const int calling = static_cast<int>(l.calling_ranks());
  g.registered.add(ep_group, {make_shm_group(ep_group, static_cast<int>(l.W), ep_rank, options)});
  if (removed) return;
  if (l.tp == 2) g.registered.add(tp_group, {make_shm_group(tp_group, 2, tp_rank, options)});
  g.all = make_shm_group(kAllGroup, calling, member, options);
  if (with_report) g.report = make_shm_group(kReportGroup, calling, member, report_options(l));
}

}  // namespace moedist::tools::demo
