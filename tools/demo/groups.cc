#include "groups.h"

namespace moedist::tools::demo {

GroupOptions group_options(const Layer& l) {
  GroupOptions options;
  options.timeout = std::chrono::milliseconds(l.opt.timeout_ms);
  return options;
}

}  // namespace moedist::tools::demo
