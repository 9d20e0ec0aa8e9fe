#include <map>
#include <mutex>

#include "moedist/error.h"
#include "moedist/group.h"

namespace moedist {

namespace {
std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::map<std::string, std::vector<std::shared_ptr<Transport>>>& registry() {
  static std::map<std::string, std::vector<std::shared_ptr<Transport>>> r;
  return r;
}
}  // namespace

void register_group(const std::string& name, std::vector<std::shared_ptr<Transport>> endpoints) {
  if (name.empty() || name.size() >= 128)
    throw InvalidArgument(detail::str_cat("register_group: name=\"", name, "\" has length ", name.size(), " (must be in [1, 128))"));
  if (endpoints.empty()) throw InvalidArgument(detail::str_cat("register_group(\"", name, "\"): no endpoints"));
  for (const auto& e : endpoints)
    if (!e) throw InvalidArgument(detail::str_cat("register_group(\"", name, "\"): null endpoint"));
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto [it, fresh] = registry().emplace(name, std::move(endpoints));
  if (!fresh) throw InvalidArgument(detail::str_cat("register_group: a group named \"", name, "\" is already registered"));
}

void unregister_group(const std::string& name) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().erase(name);
}

bool group_registered(const std::string& name) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  return registry().count(name) != 0;
}

std::shared_ptr<Transport> resolve_group(const std::string& name, int64_t rank, const char* op) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto it = registry().find(name);
  if (it == registry().end()) {
    std::string known;
    for (const auto& [k, v] : registry()) known += (known.empty() ? "\"" : ", \"") + k + "\"";
    throw InvalidArgument(detail::str_cat("[rank ", rank, "] ", op, ": group \"", name, "\" is not registered (registered: ",
                                          known.empty() ? "none" : known, ")"));
  }
  const auto& eps = it->second;
  if (eps.size() == 1) {
    if (eps[0]->rank() != rank)
      throw InvalidArgument(detail::str_cat("[rank ", rank, "] ", op, ": this process is rank ", eps[0]->rank(), " of group \"", name,
                                            "\" (the rank id passed must be ", eps[0]->rank(), ")"));
    return eps[0];
  }
  if (rank < 0 || rank >= static_cast<int64_t>(eps.size()))
    throw InvalidArgument(detail::str_cat("[rank ", rank, "] ", op, ": rank id ", rank, " out of range for group \"", name, "\" of ",
                                          eps.size(), " ranks"));
  return eps[static_cast<size_t>(rank)];
}

}  // namespace moedist

namespace moedist {

RecoveryResult Transport::recover() {
  throw Unsupported(detail::str_cat("[rank ", rank(), "/", world_size(), "] recover: the ", name(),
                                    " transport cannot survive the failure of a rank (shared memory and threads can; across hosts it ",
                                    "would need a fault-tolerant MPI, see docs/design.md, \"Failover\")"));
}

RecoveryResult recover_group(const std::string& group, int64_t rank) { return resolve_group(group, rank, "recover")->recover(); }

std::vector<int32_t> query_active_mask(const std::string& group, int64_t rank) {
  return resolve_group(group, rank, "query_active_mask")->failed_ranks();
}

}  // namespace moedist
