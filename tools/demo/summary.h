// Per-rank results: what a rank measured and checked, all the report needs. In process mode each rank
// sends its own, as text (summary_text), to rank 0 over a group (gather_texts), or writes it to a file
// that the demo's parent reads (--report-dir).
#pragma once

#include <cstdint>
#include <exception>
#include <istream>
#include <string>
#include <vector>

#include "checks.h"
#include "layer.h"
#include "rank.h"

namespace moedist::tools::demo {

struct RankSummary {
  enum class Status { kMissing, kOk, kRemoved, kError };
  Status status = Status::kMissing;
  int tp_rank = 0;
  int64_t ep_rank = 0;
  std::string error;               // kError
  bool transport_error = false;    // the error is a TransportError or Timeout: often a peer's failure
  PhaseTimes times;
  std::vector<int64_t> rows;       // rows received per local expert (one entry on a shared rank or with TP)
  int64_t zero = 0, copy = 0, constant = 0;  // zero/copy/const picks of this rank's tokens
  Accuracy accuracy;               // vs the dense layer, this rank's tokens
  std::string dispatch_diff, combine_diff;  // vs the reference, "" when bit-exact
  // Rounds (--rounds, --kill, --stop):
  int rounds_checked = 0;          // rounds run and checked
  int restart_round = 0;           // the round (1-based) the survivors made again after a recovery; 0: none
  std::string failed_mask;         // the failed ranks the survivors agreed on, one digit per rank ("" before any)
  int64_t recovered_ns = 0;            // steady clock when recover_group returned
  int64_t recovered_round_end_ns = 0;  // steady clock at the end of the first round completed after the recovery
  bool declared_failed = false;    // this rank was told it had been declared failed (the victim of --stop)
};

// What a rank's run measured: times, the rows per expert, the special experts picked.
void summarize_run(const Layer& l, const RankState& st, RankSummary& s);

// The rank's failure: its message, and whether it came from the transport (TransportError, Timeout).
void record_error(RankSummary& s, const std::exception& e);

// A summary as text, one "key values" line per field, ending with "end"; parse_summary reads it back.
std::string summary_text(const RankSummary& s);
// False (and `s` unchanged) unless `f` holds a whole summary.
bool parse_summary(std::istream& f, RankSummary& s);

// The file of global rank `rank` in the demo parent's report directory.
std::string summary_path(const std::string& dir, int rank);
// Written to a temporary name, then renamed: a reader sees the whole file or none.
bool write_summary(const std::string& dir, int rank, const RankSummary& s);
bool read_summary(const std::string& path, RankSummary& s);
// --kill / --stop: the victim's record in the report directory, written just before it raises the
// signal: the steady-clock time (CLOCK_MONOTONIC, the same clock in every process of the host) and its pid.
struct VictimRecord {
  int64_t signal_ns = 0;
  int pid = 0;
};
std::string victim_record_path(const std::string& dir);
bool write_victim_record(const std::string& dir, const VictimRecord& v);
bool read_victim_record(const std::string& dir, VictimRecord& v);

// Removes the rank files, the victim's record and the directory.
void remove_report_dir(const std::string& dir, int processes);

}  // namespace moedist::tools::demo
