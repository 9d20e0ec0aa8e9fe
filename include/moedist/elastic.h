// Building the elastic_info of a scale-down from the ranks that failed, and moving expert ids from the
// original layout to the compact one, as frameworks do before they call the ops again.
//
// elastic_info (int32, 4 + 2W): [1, W' (ranks alive), Sr' (shared-expert ranks alive), E' (MoE experts
// alive = MoE ranks alive * L), table 1 (original rank -> compact rank, -1 if failed), table 2 (compact
// rank -> original rank, -1 beyond W')]. Ranks keep their order, so the shared-expert ranks stay first.
// Example: failed [0, 1, 0, 0], no shared-expert ranks, 8 local experts ->
//   [1, 3, 0, 24,  0, -1, 1, 2,  0, 2, 3, -1].
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "moedist/transport.h"

namespace moedist {

// Failover on a registered group (shared memory and thread transports; see docs/design.md, "Failover").
// After a call raised TransportError or Timeout because a peer died or stalled, every surviving rank
// calls recover_group: the survivors agree on the set of failed ranks (the same on every survivor, also
// when another rank dies meanwhile; a rank that does not join within the group's timeout, or that stalls
// after a peer timed out waiting for it, is declared failed), and what the failed call left in the
// buffers is never read again. A rank declared failed that wakes up gets a TransportError saying so.
// Calls then continue among the survivors with elastic_info from make_elastic_info(result.failed, ...).
// Called when this rank saw no failure and no peer is recovering, it returns at once without
// communicating. Collective among the surviving ranks; the state it returns is what query_active_mask
// returns afterwards.
RecoveryResult recover_group(const std::string& group, int64_t rank);
// The failed ranks agreed so far (one int32 per rank, 1 = failed), read locally: the "active mask" of
// other expert-parallel libraries with the opposite sense of the values (as theirs: 1 marks a masked rank).
std::vector<int32_t> query_active_mask(const std::string& group, int64_t rank);

// `failed` has one entry per original rank (non-zero: failed). Throws InvalidArgument when the values
// are out of range, or when no MoE rank is left, or when the shared-expert ranks left are not a multiple
// of shared_expert_num (the ops' own rule).
std::vector<int32_t> make_elastic_info(const std::vector<int32_t>& failed, int64_t shared_expert_rank_num, int64_t local_expert_num,
                                       int64_t shared_expert_num = 1);

// Expert ids (any shape, flattened) of the original layout (moe_expert_num = (W - Sr) * L MoE experts,
// then zero / copy / const experts) -> the compact layout of the same failures: a MoE expert moves with
// its rank; special experts keep their ids. An id of an expert that lived on a failed rank raises
// InvalidArgument naming it and its rank, unless `replacements` maps it to an expert of the original
// layout that lives on a surviving rank (e.g. a redundant copy).
std::vector<int32_t> remap_expert_ids(const std::vector<int32_t>& ids, const std::vector<int32_t>& failed, int64_t shared_expert_rank_num,
                                      int64_t local_expert_num, const std::map<int32_t, int32_t>& replacements = {});

}  // namespace moedist
