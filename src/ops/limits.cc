// What one call puts in the blob of its exchanges, and the check that it fits the transport's limit
// (Transport::max_blob_bytes), done during validation so that a call too large for the transport is
// refused, naming the parameters, before any byte moves.
#include <unistd.h>

#include <algorithm>

#include "moedist/error.h"
#include "ops/algorithms.h"
#include "ops/collective.h"

namespace moedist::ops {

size_t dispatch_counts_bytes(const core::EpConfig& c, int ranks_per_server) {
  size_t n = static_cast<size_t>(c.W) * static_cast<size_t>(c.L);  // send_counts(): one per (rank, local expert)
  if (c.alg == core::Alg::kHierarchy) {
    const int64_t P = ranks_per_server > 0 && ranks_per_server < c.W ? ranks_per_server : c.W;
    n += static_cast<size_t>((c.W + P - 1) / P);  // tokens per server
  }
  return n * 4;
}

namespace {
double memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<double>(pages) * static_cast<double>(page) : 1e300;
}
}  // namespace

void check_combine_fits(const core::EpConfig& c) {
  const double out_bytes = static_cast<double>(c.BS) * static_cast<double>(c.H) * 2;
  if (out_bytes > memory_bytes())
    c.ctx.fail(detail::str_cat("the output (BS, H) = (", c.BS, ", ", c.H, ") takes ", static_cast<uint64_t>(out_bytes),
                               " bytes, more than this machine's ", static_cast<uint64_t>(memory_bytes()), " bytes of memory (hidden size H=",
                               c.H, " comes from expand_x.size(1))"));
}

size_t tp_counts_bytes(const core::EpConfig& c) { return 8 + 4 * static_cast<size_t>(c.W); }

void check_dispatch_fits(const core::EpConfig& c, const Transport& ep, const Transport* tp) {
  const size_t limit = ep.max_blob_bytes();
  const size_t need = sizeof(BlobHeader) + dispatch_counts_bytes(c, ep.ranks_per_server());
  if (need > limit) {
    // The most local experts per rank that fit, as a bound on moe_expert_num.
    const size_t room = limit > sizeof(BlobHeader) ? limit - sizeof(BlobHeader) : 0;
    const size_t extra = dispatch_counts_bytes(c, ep.ranks_per_server()) - static_cast<size_t>(c.W) * static_cast<size_t>(c.L) * 4;
    const int64_t max_l = room > extra ? static_cast<int64_t>((room - extra) / 4 / static_cast<size_t>(c.W)) : 0;
    const int64_t moe_ranks = c.W_orig - c.Sr_orig;
    c.ctx.unsupported(detail::str_cat(
        "moe_expert_num=", c.E_orig, " with ep_world_size=", c.W_orig, " is too large for the ", ep.name(), " transport: each call exchanges ",
        c.W, " ranks x ", c.L, " local experts of counts (", need, " bytes with the header), and one control message of this transport holds ",
        limit, " bytes", max_l > 0 ? detail::str_cat(" (moe_expert_num must be at most ", max_l * moe_ranks, " here)") : std::string(" (ep_world_size is too large here)")));
  }
  // The outputs are allocated before any byte moves; sizes no machine can hold are refused here
  // rather than failing the allocation (or worse) later.
  const double rows = static_cast<double>(c.tp) * static_cast<double>(c.A);
  const double out_bytes = rows * static_cast<double>(c.H) * 2 + rows * 8 +
                           std::max(static_cast<double>(c.BS) * static_cast<double>(c.K), 128.0 * static_cast<double>(c.A)) * 4;
  if (out_bytes > memory_bytes())
    c.ctx.fail(detail::str_cat("global_bs=", c.global_bs, " with BS=", c.BS, ", H=", c.H, " gives outputs of ", static_cast<uint64_t>(out_bytes),
                               " bytes (A=", c.A, " rows per rank; assist_info_for_combine holds 128 * A entries), more than this machine's ",
                               static_cast<uint64_t>(memory_bytes()), " bytes of memory"));
  if (tp && sizeof(BlobHeader) + tp_counts_bytes(c) > tp->max_blob_bytes())
    c.ctx.unsupported(detail::str_cat("ep_world_size=", c.W_orig, " is too large for the TP exchange over the ", tp->name(), " transport (",
                                      sizeof(BlobHeader) + tp_counts_bytes(c), " bytes of counts, at most ", tp->max_blob_bytes(), ")"));
}

}  // namespace moedist::ops
