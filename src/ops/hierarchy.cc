// comm_alg "hierarchy": see docs/design.md. (implementation follows)
#include "ops/algorithms.h"

namespace moedist::ops {

DispatchCounts hierarchy_dispatch(const DispatchCtx& d, const RowSinks&) {
  d.cfg.ctx.unsupported("comm_alg \"hierarchy\" is not implemented yet");
}
void hierarchy_combine(const CombineCtx& c, uint16_t*) { c.cfg.ctx.unsupported("comm_alg \"hierarchy\" is not implemented yet"); }

}  // namespace moedist::ops
