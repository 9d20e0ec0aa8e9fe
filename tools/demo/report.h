// The report: the header line, the expert load, the phase times, the checks' verdict.
#pragma once

#include <string>
#include <vector>

#include "layer.h"
#include "summary.h"

namespace moedist::tools::demo {

// `hosts`: the hosts the MPI job runs on (0: not known, or not an MPI transport).
void print_header(const Layer& l, bool processes, int hosts = 0);

// Prints 'moedist demo: FAIL (why)'; returns 1, the exit code.
int fail(const std::string& why);

// Prints everything after the header and the verdict; returns the exit code. `launcher_code` is the
// exit status of the rank processes (0 in thread mode).
int report(const Layer& l, const std::vector<RankSummary>& ranks, bool processes, int launcher_code);

// The report of rounds mode (--rounds, --kill, --stop): checks that the victim failed as asked and the
// survivors agreed on it and completed and checked every round, prints the failover line with the time
// from the victim's signal (`victim`, nullptr if it left no record) to the end of the survivors' next
// completed round, then the report of the last round's layout.
int report_rounds(const Layer& l, const std::vector<RankSummary>& ranks, const VictimRecord* victim, int launcher_code);

}  // namespace moedist::tools::demo
