// The conformance cases: every feature alone and in combination, world sizes 2, 3, 4, 8, 16 (odd ones
// included), both dtypes. Shared by the suites of every transport.
#pragma once

#include <vector>

#include "harness.h"

namespace moedist::test {

inline std::vector<Case> cases() {
  std::vector<Case> v;
  auto add = [&](Case c) { v.push_back(c); };
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    for (int W : {2, 3, 4, 8, 16}) {
      Case c;
      c.W = W;
      c.E = W * 2;
      c.K = 3;
      c.BS = 6;
      c.H = 40;
      c.dtype = dt;
      add(c);  // plain
      Case q = c;
      q.quant = 2;
      add(q);
    }
    Case b;
    b.dtype = dt;
    b.W = 4;
    b.E = 8;
    b.K = 4;
    b.BS = 8;
    b.H = 64;
    // each feature alone
    { Case c = b; c.quant = 2; c.smooth = true; add(c); }
    { Case c = b; c.etn_type = 0; add(c); }
    { Case c = b; c.Sr = 1; c.E = 6; add(c); }
    { Case c = b; c.Sr = 2; c.shared_num = 2; c.E = 6; c.W = 5; c.E = 6; add(c); }
    { Case c = b; c.Sr = 2; c.shared_num = 1; c.E = 6; add(c); }
    { Case c = b; c.shared_x = true; add(c); }
    { Case c = b; c.mask = 1; add(c); }
    { Case c = b; c.mask = 2; add(c); }
    { Case c = b; c.Z = 2; c.C = 1; c.Q = 2; add(c); }
    { Case c = b; c.ragged = true; add(c); }
    { Case c = b; c.comm_quant = 2; add(c); }
    { Case c = b; c.comm_quant = 2; c.H = 1001; c.W = 3; c.Sr = 1; c.E = 4; add(c); }  // vectors of 32, a tail of 9 (a partial group)
    { Case c = b; c.strided = true; add(c); }
    { Case c = b; c.E = 4; c.tp = 2; add(c); }
    { Case c = b; c.W = 6; c.E = 12; c.removed = {1}; add(c); }
    // combinations
    { Case c = b; c.quant = 2; c.smooth = true; c.Sr = 1; c.E = 6; c.mask = 2; c.Z = 1; c.C = 1; c.Q = 1; add(c); }
    { Case c = b; c.E = 4; c.tp = 2; c.quant = 2; c.mask = 1; c.Sr = 0; add(c); }
    { Case c = b; c.E = 3; c.K = 2; c.W = 4; c.Sr = 1; c.tp = 2; c.quant = 2; c.smooth = true; add(c); }
    { Case c = b; c.comm_quant = 2; c.Sr = 2; c.shared_num = 2; c.E = 4; c.mask = 1; c.C = 2; add(c); }
    { Case c = b; c.ragged = true; c.quant = 2; c.Sr = 1; c.E = 3; c.shared_x = false; c.Q = 1; add(c); }
    { Case c = b; c.W = 8; c.E = 12; c.Sr = 2; c.removed = {2, 5}; c.Sr_after = 2; c.quant = 2; c.Z = 1; c.Q = 1; add(c); }
    { Case c = b; c.W = 8; c.E = 12; c.Sr = 2; c.shared_num = 2; c.removed = {0, 6}; c.Sr_after = 0; c.mask = 2; add(c); }
    { Case c = b; c.W = 7; c.E = 14; c.K = 8; c.BS = 16; c.shared_x = true; c.mask = 2; c.comm_quant = 2; c.strided = true; add(c); }
    { Case c = b; c.W = 16; c.E = 64; c.K = 8; c.BS = 5; c.H = 48; c.quant = 2; c.Sr = 0; c.etn_type = 0; add(c); }
    { Case c = b; c.W = 3; c.E = 3; c.K = 3; c.BS = 0; add(c); }  // no tokens at all
    // hierarchy: servers of consecutive ranks (an uneven last server included)
    { Case c = b; c.alg = "hierarchy"; c.ranks_per_server = 2; add(c); }
    { Case c = b; c.alg = "hierarchy"; c.ranks_per_server = 2; c.quant = 2; c.mask = 2; add(c); }
    { Case c = b; c.W = 7; c.E = 12; c.Sr = 1; c.alg = "hierarchy"; c.ranks_per_server = 3; c.Z = 1; c.C = 1; c.Q = 1; c.shared_x = false; add(c); }
    { Case c = b; c.W = 8; c.E = 12; c.Sr = 2; c.shared_num = 2; c.alg = "hierarchy"; c.ranks_per_server = 4; c.mask = 1; c.ragged = false; add(c); }
    { Case c = b; c.W = 5; c.E = 10; c.alg = "hierarchy"; c.ranks_per_server = 2; c.ragged = true; c.shared_x = true; add(c); }
    { Case c = b; c.alg = "hierarchy"; c.ranks_per_server = 0; add(c); }  // one server
    // split phase (setup / teardown): fullmesh splits the exchange; hierarchy and TP run whole in setup
    { Case c = b; c.split = true; add(c); }
    { Case c = b; c.split = true; c.alg = "fullmesh_v2"; c.quant = 2; c.smooth = true; c.Sr = 1; c.E = 6; c.mask = 2; c.Z = 1; c.C = 1; c.Q = 1; add(c); }
    { Case c = b; c.split = true; c.W = 5; c.E = 10; c.ragged = true; c.comm_quant = 2; c.shared_x = true; add(c); }
    { Case c = b; c.split = true; c.W = 8; c.E = 12; c.Sr = 2; c.removed = {2, 5}; c.Sr_after = 2; c.quant = 2; add(c); }
    { Case c = b; c.split = true; c.E = 4; c.tp = 2; add(c); }
    { Case c = b; c.split = true; c.alg = "hierarchy"; c.ranks_per_server = 2; add(c); }
    // combine_add_rms_norm: the combine of the case, then residual add and RMSNorm
    { Case c = b; c.add_rms_norm = true; add(c); }
    { Case c = b; c.add_rms_norm = true; c.W = 3; c.E = 6; c.quant = 2; c.smooth = true; c.Sr = 1; c.E = 4; c.mask = 1; add(c); }
    { Case c = b; c.add_rms_norm = true; c.Z = 1; c.C = 1; c.Q = 1; c.mask = 2; c.comm_quant = 2; add(c); }
    { Case c = b; c.add_rms_norm = true; c.W = 6; c.E = 12; c.removed = {1}; c.ragged = true; add(c); }
    { Case c = b; c.add_rms_norm = true; c.E = 4; c.tp = 2; add(c); }
    { Case c = b; c.add_rms_norm = true; c.alg = "hierarchy"; c.ranks_per_server = 2; add(c); }
  }
  return v;
}

}  // namespace moedist::test
