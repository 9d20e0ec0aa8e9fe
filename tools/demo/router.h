// The router (gating network): which experts each token goes to, with which weight.
#pragma once

#include "layer.h"

namespace moedist::tools::demo {

struct RankState;

// Router: logits = x Wg, softmax, top-k (ties to the lower column, so the choice is deterministic),
// weights = the chosen probabilities renormalised to sum 1.
// Fills st.expert_ids and st.expert_scales from st.x.
void gate(const Layer& l, RankState& st);

}  // namespace moedist::tools::demo
