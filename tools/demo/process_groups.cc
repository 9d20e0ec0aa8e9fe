#include "process_groups.h"

namespace moedist::tools::demo {

// The report group waits longer than the ops: its members arrive when their checks are done, which
// takes each rank its own time, and a rank that failed early waits there for the ones still timing out.
GroupOptions report_options(const Layer& l) {
  GroupOptions options;
  options.timeout = std::chrono::milliseconds(2 * static_cast<int64_t>(l.opt.timeout_ms) + 60000);
  return options;
}

void join_groups(const Layer& l, int p, bool with_report, ProcessGroups& g) {
  if (l.opt.transport == "shm")
    join_shm_groups(l, p, with_report, g);
  else
    join_mpi_groups(l, p, with_report, g);
}

}  // namespace moedist::tools::demo
