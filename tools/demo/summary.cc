#include "summary.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "moedist/error.h"
#include "util.h"

namespace moedist::tools::demo {

void summarize_run(const Layer& l, const RankState& st, RankSummary& s) {
  s.status = RankSummary::Status::kOk;
  s.tp_rank = st.tp_rank;
  s.ep_rank = st.ep_rank;
  s.times = st.times;
  const DispatchResult& d = st.dispatched;
  s.rows.clear();
  if (l.is_shared_rank(st.ep_rank) || l.tp == 2)
    s.rows.push_back(own_rows(l, st, d));
  else
    for (int64_t e = 0; e < d.expert_token_nums.numel(); ++e) s.rows.push_back(d.expert_token_nums.data_as<int64_t>()[e]);
  const int64_t zero_end = l.E + l.opt.zero, copy_end = zero_end + l.opt.copy;
  for (int64_t i = 0; i < l.active_tokens * l.K; ++i) {
    const int64_t id = st.expert_ids[static_cast<size_t>(i)];
    if (id < l.E) continue;
    if (id < zero_end)
      ++s.zero;
    else if (id < copy_end)
      ++s.copy;
    else
      ++s.constant;
  }
}

static std::string one_line(std::string text) {
  for (char& c : text)
    if (c == '\n' || c == '\r') c = ' ';
  return text;
}

static const char* status_name(RankSummary::Status s) {
  switch (s) {
    case RankSummary::Status::kOk: return "ok";
    case RankSummary::Status::kRemoved: return "removed";
    case RankSummary::Status::kError: return "error";
    default: return "missing";
  }
}

std::string summary_path(const std::string& dir, int rank) { return cat(dir, "/rank", rank, ".txt"); }

// A summary as text, one "key values" line per field, ending with "end"; parse_summary reads it back.
std::string summary_text(const RankSummary& s) {
  std::ostringstream f;
  f.precision(17);
  f << "status " << status_name(s.status) << "\n"
    << "rank " << s.tp_rank << " " << s.ep_rank << "\n"
    << "times " << s.times.gating << " " << s.times.dispatch << " " << s.times.experts << " " << s.times.combine << "\n"
    << "rows " << s.rows.size();
  for (int64_t r : s.rows) f << " " << r;
  f << "\n"
    << "special " << s.zero << " " << s.copy << " " << s.constant << "\n"
    << "dense " << s.accuracy.max_abs_err << " " << s.accuracy.max_abs_dense << " " << s.accuracy.non_finite << "\n"
    << "transport_error " << (s.transport_error ? 1 : 0) << "\n"
    << "error " << one_line(s.error) << "\n"
    << "dispatch_diff " << one_line(s.dispatch_diff) << "\n"
    << "combine_diff " << one_line(s.combine_diff) << "\n"
    << "rounds " << s.rounds_checked << " " << s.restart_round << " " << s.recovered_round_end_ns << " " << (s.declared_failed ? 1 : 0) << " " << s.recovered_ns
    << "\n"
    << "failed_mask " << s.failed_mask << "\n"
    << "end\n";
  return f.str();
}

// Written to a temporary name, then renamed: a reader sees the whole file or none.
bool write_summary(const std::string& dir, int rank, const RankSummary& s) {
  mkdir(dir.c_str(), 0700);  // made by the demo's parent already
  const std::string tmp = cat(dir, "/.rank", rank, ".tmp");
  {
    std::ofstream f(tmp);
    f << summary_text(s);
    if (!f.flush()) return false;
  }
  return std::rename(tmp.c_str(), summary_path(dir, rank).c_str()) == 0;
}

// False (and `s` unchanged) unless `f` holds a whole summary.
bool parse_summary(std::istream& f, RankSummary& s) {
  RankSummary r;
  bool complete = false;
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream in(line);
    std::string key;
    in >> key;
    const std::string rest = line.size() > key.size() ? line.substr(key.size() + 1) : "";
    if (key == "status") {
      r.status = rest == "ok" ? RankSummary::Status::kOk : rest == "removed" ? RankSummary::Status::kRemoved : RankSummary::Status::kError;
    } else if (key == "rank") {
      in >> r.tp_rank >> r.ep_rank;
    } else if (key == "times") {
      in >> r.times.gating >> r.times.dispatch >> r.times.experts >> r.times.combine;
    } else if (key == "rows") {
      size_t n = 0;
      in >> n;
      r.rows.assign(n, 0);
      for (int64_t& v : r.rows) in >> v;
    } else if (key == "special") {
      in >> r.zero >> r.copy >> r.constant;
    } else if (key == "dense") {
      in >> r.accuracy.max_abs_err >> r.accuracy.max_abs_dense >> r.accuracy.non_finite;
    } else if (key == "transport_error") {
      in >> r.transport_error;
    } else if (key == "error") {
      r.error = rest;
    } else if (key == "dispatch_diff") {
      r.dispatch_diff = rest;
    } else if (key == "combine_diff") {
      r.combine_diff = rest;
    } else if (key == "rounds") {
      in >> r.rounds_checked >> r.restart_round >> r.recovered_round_end_ns >> r.declared_failed >> r.recovered_ns;
    } else if (key == "failed_mask") {
      r.failed_mask = rest;
    } else if (key == "end") {
      complete = true;
    }
    if (!in && key != "end" && key != "error" && key != "dispatch_diff" && key != "combine_diff" && key != "status" && key != "failed_mask")
      return false;
  }
  if (!complete) return false;
  s = std::move(r);
  return true;
}

bool read_summary(const std::string& path, RankSummary& s) {
  std::ifstream f(path);
  return f && parse_summary(f, s);
}

std::string victim_record_path(const std::string& dir) { return dir + "/victim.txt"; }

bool write_victim_record(const std::string& dir, const VictimRecord& v) {
  const std::string path = victim_record_path(dir), tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    f << v.signal_ns << " " << v.pid << "\n";
    if (!f.flush()) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

bool read_victim_record(const std::string& dir, VictimRecord& v) {
  std::ifstream f(victim_record_path(dir));
  VictimRecord r;
  if (!(f >> r.signal_ns >> r.pid)) return false;
  v = r;
  return true;
}

// Removes the rank files and the directory.
void remove_report_dir(const std::string& dir, int processes) {
  for (int p = 0; p < processes; ++p) {
    std::remove(summary_path(dir, p).c_str());
    std::remove(cat(dir, "/.rank", p, ".tmp").c_str());
  }
  std::remove(victim_record_path(dir).c_str());
  std::remove((victim_record_path(dir) + ".tmp").c_str());
  rmdir(dir.c_str());
}

void record_error(RankSummary& s, const std::exception& e) {
  s.status = RankSummary::Status::kError;
  s.error = e.what();
  s.transport_error = dynamic_cast<const TransportError*>(&e) != nullptr;
}

}  // namespace moedist::tools::demo
