// Process mode: every rank is a process. Global rank p (0 <= p < tp * W) is EP rank p % W of the EP
// group of TP index p / W ("moedist-demo-ep<p / W>"); with --tp 2, ranks p and p + W form the TP group
// "moedist-demo-tp<p % W>". So ranks 0..W-1 are the first EP group, W..2W-1 the second, in the order of
// the thread mode. The ranks that call the ops (all but the ones --elastic removes, which join their
// EP group and stop) also join "moedist-demo-all", the phase barrier, as member tp_index * (active
// ranks) + ep_rank (== p), and, unless the demo's parent collects the results from files
// (--report-dir), "moedist-demo-report", the same members again, over which rank 0 gathers the results.
// --transport shm: every group is made by make_shm_group (one host). mpi, hybrid (under mpirun): by
// make_mpi_world_group, collective over MPI_COMM_WORLD, so every process makes the same calls in the
// same order, removed ranks included (they pass color -1 where they join no group): EP group (color
// tp index, key EP rank), with --tp 2 the TP group (color EP rank, key tp index), the barrier group
// and the report group (color 0, key member). The report group is plain MPI for both (it carries a few
// kilobytes once).
#pragma once

#include <memory>

#include "groups.h"
#include "layer.h"
#include "moedist/transport.h"

namespace moedist::tools::demo {

inline constexpr const char* kAllGroup = "moedist-demo-all";
inline constexpr const char* kReportGroup = "moedist-demo-report";

// The groups of one rank process; the EP and TP groups are registered under their names for the ops.
struct ProcessGroups {
  GroupRegistration registered;
  std::shared_ptr<Transport> all;     // phase barrier; nullptr on a removed rank
  std::shared_ptr<Transport> report;  // results to rank 0; nullptr on a removed rank, or with --report-dir
};

// The report group's options (report_options): a longer deadline than the ops', see process_groups.cc.
GroupOptions report_options(const Layer& l);

// Joins the groups of global rank p (with_report: the report group too), over the transport --transport
// names: shared memory (process_groups_shm.cc) or MPI / hybrid (process_groups_mpi.cc).
void join_groups(const Layer& l, int p, bool with_report, ProcessGroups& g);
void join_shm_groups(const Layer& l, int p, bool with_report, ProcessGroups& g);
void join_mpi_groups(const Layer& l, int p, bool with_report, ProcessGroups& g);

// The hosts the ranks that call the ops run on, as the MPI transports see them; 0 for shared memory.
int mpi_host_count(const ProcessGroups& g);

}  // namespace moedist::tools::demo
