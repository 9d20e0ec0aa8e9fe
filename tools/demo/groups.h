// Groups (communicators) made for a run, and their options.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "layer.h"
#include "moedist/group.h"
#include "moedist/transport.h"

namespace moedist::tools::demo {

// The groups this process registered for the run; unregistered when it ends.
class GroupRegistration {
 public:
  GroupRegistration() = default;
  ~GroupRegistration() {
    for (const std::string& name : names_) unregister_group(name);
  }
  GroupRegistration(const GroupRegistration&) = delete;
  GroupRegistration& operator=(const GroupRegistration&) = delete;
  void add(const std::string& name, std::vector<std::shared_ptr<Transport>> endpoints) {
    register_group(name, std::move(endpoints));
    names_.push_back(name);
  }

 private:
  std::vector<std::string> names_;
};

// The ops' groups: every wait has the --timeout-ms deadline.
GroupOptions group_options(const Layer& l);

}  // namespace moedist::tools::demo
