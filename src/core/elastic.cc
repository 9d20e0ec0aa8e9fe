#include "moedist/elastic.h"

#include "moedist/error.h"

namespace moedist {

namespace {
void check_layout(const char* fn, const std::vector<int32_t>& failed, int64_t Sr, int64_t L) {
  const int64_t W = static_cast<int64_t>(failed.size());
  if (W < 1) throw InvalidArgument(detail::str_cat(fn, ": failed has ", W, " entries (must have one per rank, >= 1)"));
  if (Sr < 0 || Sr >= W)
    throw InvalidArgument(detail::str_cat(fn, ": shared_expert_rank_num=", Sr, " (must be in [0, ", W, "): the ranks of failed)"));
  if (L < 1) throw InvalidArgument(detail::str_cat(fn, ": local_expert_num=", L, " (must be >= 1)"));
}
}  // namespace

std::vector<int32_t> make_elastic_info(const std::vector<int32_t>& failed, int64_t Sr, int64_t L, int64_t S) {
  const char* fn = "make_elastic_info";
  check_layout(fn, failed, Sr, L);
  const int64_t W = static_cast<int64_t>(failed.size());
  if (S < 1) throw InvalidArgument(detail::str_cat(fn, ": shared_expert_num=", S, " (must be >= 1)"));
  std::vector<int32_t> info(static_cast<size_t>(4 + 2 * W), -1);
  int32_t alive = 0, shared_alive = 0;
  for (int64_t r = 0; r < W; ++r) {
    if (failed[static_cast<size_t>(r)]) continue;
    info[static_cast<size_t>(4 + r)] = alive;
    info[static_cast<size_t>(4 + W + alive)] = static_cast<int32_t>(r);
    ++alive;
    if (r < Sr) ++shared_alive;
  }
  const int64_t moe_alive = alive - shared_alive;
  if (moe_alive < 1) throw InvalidArgument(detail::str_cat(fn, ": no MoE rank is left (ranks ", Sr, "..", W - 1, " all failed)"));
  if (shared_alive > 0 && shared_alive % S != 0)
    throw InvalidArgument(detail::str_cat(fn, ": ", shared_alive, " shared-expert ranks are left, not a multiple of shared_expert_num=", S,
                                          " (the ops need every shared expert on the same number of ranks)"));
  info[0] = 1;
  info[1] = alive;
  info[2] = shared_alive;
  info[3] = static_cast<int32_t>(moe_alive * L);
  return info;
}

std::vector<int32_t> remap_expert_ids(const std::vector<int32_t>& ids, const std::vector<int32_t>& failed, int64_t Sr, int64_t L,
                                      const std::map<int32_t, int32_t>& replacements) {
  const char* fn = "remap_expert_ids";
  check_layout(fn, failed, Sr, L);
  const int64_t W = static_cast<int64_t>(failed.size());
  const int64_t E = (W - Sr) * L;
  // compact MoE rank of each original MoE rank, -1 if it failed
  std::vector<int64_t> moe_rank(static_cast<size_t>(W - Sr), -1);
  int64_t next = 0;
  for (int64_t m = 0; m < W - Sr; ++m)
    if (!failed[static_cast<size_t>(Sr + m)]) moe_rank[static_cast<size_t>(m)] = next++;
  if (next == 0) throw InvalidArgument(detail::str_cat(fn, ": no MoE rank is left"));
  auto compact = [&](int64_t g) -> int64_t { return moe_rank[static_cast<size_t>(g / L)] < 0 ? -1 : moe_rank[static_cast<size_t>(g / L)] * L + g % L; };
  std::vector<int32_t> out(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t g = ids[i];
    if (g < 0) throw InvalidArgument(detail::str_cat(fn, ": ids[", i, "]=", g, " (expert ids are >= 0)"));
    if (g >= E) {  // zero / copy / const experts keep their ids
      out[i] = static_cast<int32_t>(g);
      continue;
    }
    int64_t v = compact(g);
    if (v < 0) {
      auto it = replacements.find(static_cast<int32_t>(g));
      if (it == replacements.end())
        throw InvalidArgument(detail::str_cat(fn, ": ids[", i, "]=", g, " is an expert of rank ", Sr + g / L,
                                              ", which failed (route around it, or name a replacement expert on a surviving rank)"));
      const int64_t rep = it->second;
      if (rep < 0 || rep >= E || compact(rep) < 0)
        throw InvalidArgument(detail::str_cat(fn, ": the replacement of expert ", g, " is ", rep,
                                              ", which is not a MoE expert of a surviving rank (must be in [0, ", E, ") on a rank that did not fail)"));
      v = compact(rep);
    }
    out[i] = static_cast<int32_t>(v);
  }
  return out;
}

}  // namespace moedist
