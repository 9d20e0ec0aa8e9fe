// The EP data movement of dispatch_v2 / combine_v2, one file per algorithm (fullmesh, hierarchy).
// dispatch.cc / combine.cc do validation, the TP step, output allocation and copy-out around them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "ops/collective.h"
#include "moedist/ops.h"
#include "moedist/transport.h"

namespace moedist::ops {

// Where this rank's EP rows land (output tensors, or transport scratch to be copied out).
struct RowSinks {
  unsigned char* expand_x = nullptr;
  float* dynamic_scales = nullptr;
  int32_t* assist = nullptr;  // 3 per row
  float* expand_scales = nullptr;
  int64_t capacity = 0;  // rows
};

struct DispatchCtx {
  const DispatchArgs& args;
  const core::EpConfig& cfg;
  std::shared_ptr<Transport> ep;
  std::string label;  // "[rank r/W] "
  bool quant = false;
  size_t row_bytes = 0;  // expand_x bytes per row
  const uint16_t* x = nullptr;       // (BS, H) contiguous
  const float* smooth = nullptr;     // (S+E, H) contiguous or null
  const float* weights = nullptr;    // (BS, K) contiguous or null
  // Writes the expand_x bytes of token t for smooth-scale row `scale_row` and returns its scale.
  void make_row(int64_t t, int64_t scale_row, unsigned char* dst, float* scale) const;
};

// Result of the EP step: blocks (e, r) counted for this rank.
struct DispatchCounts {
  std::vector<int64_t> cnt;  // [local expert][source rank]
  int64_t rows = 0;
};

// Counts of each (destination rank, local expert) for this rank's tokens, in effective ranks.
std::vector<int32_t> send_counts(const DispatchCtx& d);
// Bytes of the counts a rank publishes in the EP exchange of dispatch (the blob's payload, after the
// BlobHeader); `ranks_per_server`: the EP transport's, for comm_alg "hierarchy".
size_t dispatch_counts_bytes(const core::EpConfig& c, int ranks_per_server);
size_t tp_counts_bytes(const core::EpConfig& c);  // the same for the TP all-gather
// Raises Unsupported, naming moe_expert_num / ep_world_size and the limit, if a dispatch with this
// configuration would need a larger blob than `ep` (or `tp`, when given) carries.
void check_dispatch_fits(const core::EpConfig& c, const Transport& ep, const Transport* tp);
// Raises InvalidArgument if combine's output, (BS, H), is larger than this machine's memory.
void check_combine_fits(const core::EpConfig& c);

// With `split` (dispatch_setup), the exchange is only begun on *split; the caller finishes it (split->end())
// before reading the sinks. The counts are known when this returns.
DispatchCounts fullmesh_dispatch(const DispatchCtx& d, const RowSinks& sinks, Step* split = nullptr);
DispatchCounts hierarchy_dispatch(const DispatchCtx& d, const RowSinks& sinks);

struct CombineCtx {
  const CombineArgs& args;
  const core::EpConfig& cfg;
  std::shared_ptr<Transport> ep;
  std::string label;
  bool quant = false;
  size_t slot_bytes = 0;  // bytes of one received expert output (H halves, or packed int8)
  int64_t own_rows = 0;
  const uint16_t* expand_x = nullptr;  // own rows, contiguous (H halves each)
  const uint16_t* tp_partial = nullptr;  // TP peer's partial sums of own rows, or null
  // y of own row i (TP-added) into `out` as H halves.
  void own_row(int64_t i, uint16_t* out) const;
  // Writes the wire form of own row i (halves or packed int8) into dst.
  void wire_row(int64_t i, unsigned char* dst, std::vector<uint16_t>& tmp) const;
  int64_t triple(int64_t i, int part) const;
};

// Each writes the (BS, H) result into out (already zero-filled).
void fullmesh_combine(const CombineCtx& c, uint16_t* out);
// fullmesh_combine in two halves (combine_setup / _teardown): send writes this rank's expert outputs to
// their sources and leaves the exchange begun; reduce finishes it and reduces into out.
struct CombineSplit {
  Step step;
  unsigned char* buf = nullptr;
  bool in_place = false;
  std::vector<const unsigned char*> direct;
};
void fullmesh_combine_send(const CombineCtx& c, CombineSplit& s);
void fullmesh_combine_reduce(const CombineCtx& c, CombineSplit& s, uint16_t* out);
void hierarchy_combine(const CombineCtx& c, uint16_t* out);

// acc += the copy or const expert term of (t, k) (docs/semantics.md §9), weight w.
void add_special_term(const CombineCtx& c, int64_t t, int64_t id, float w, float* acc);
// acc += shared_expert_x[t] when given.
void add_shared_x(const CombineCtx& c, int64_t t, float* acc);
// shared_expert_x as BS contiguous rows of H (in `storage` when it has to be gathered); nullptr when it
// is not given or its view cannot be read as (BS, H) rows (add_shared_x then reads it element by element).
const uint16_t* shared_x_rows(const CombineCtx& c, std::vector<uint16_t>& storage);

}  // namespace moedist::ops
