// The golden model. Plain loops over all ranks of one step, in the order the spec states:
//  dispatch (docs/semantics.md §3): rows of MoE rank d: local expert e ascending, then source rank ascending, then
//    token ascending; rows of shared rank d: source ranks r with r % R == d % R ascending, then token.
//    expand_x row = x row (quant_mode 0) or its dynamic int8 quantization with the source's smooth
//    scale row S + g (MoE, S as created) / s (shared); assist triple = (source rank, token, k) with k = K + s for
//    shared rows; ep_recv_counts = inclusive prefix sums over (e, r); TP: [own rows; peer's rows].
//  combine (docs/semantics.md §12): y = expand_x row (TP: rne(float(own) + float(peer partial))); with comm quant,
//    y = dequant(quant(y)); per active token acc = 0f; k ascending: MoE acc += y*w, copy acc += x*w,
//    const acc += (a1*x + a2*v)*w (each product and sum rounded to fp32, no FMA); then shared slots
//    K..K+S-1 unweighted; then shared_expert_x; out = rne(acc). Inactive tokens: zeros.
#include "moedist/reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <tuple>

#include "core/config.h"
#include "core/half.h"
#include "core/quant.h"

namespace moedist::reference {

using core::EpConfig;
using core::ExpertKind;

namespace {

struct RowRef {
  int64_t src, tok, kk, scale_row;  // scale_row: row of the source's smooth scales
};

// Checks that the calls form whole groups; returns groups[tp][effective rank] = call index.
std::vector<std::vector<int>> group_calls(const std::vector<EpConfig>& cfgs, const char* op) {
  MOEDIST_ASSERT(!cfgs.empty());
  const int64_t tp = cfgs[0].tp, W = cfgs[0].W;
  std::vector<std::vector<int>> groups(static_cast<size_t>(tp), std::vector<int>(static_cast<size_t>(W), -1));
  for (size_t i = 0; i < cfgs.size(); ++i) {
    const EpConfig& c = cfgs[i];
    if (c.tp != tp || c.W != W)
      throw InvalidArgument(detail::str_cat("reference ", op, ": call ", i, " has tp_world_size/active ranks ", c.tp, "/", c.W,
                                            " but call 0 has ", tp, "/", W));
    int& slot = groups[static_cast<size_t>(c.tp_rank)][static_cast<size_t>(c.rank)];
    if (slot != -1)
      throw InvalidArgument(detail::str_cat("reference ", op, ": two calls for tp rank ", c.tp_rank, ", EP rank ", c.rank));
    slot = static_cast<int>(i);
  }
  for (size_t q = 0; q < groups.size(); ++q)
    for (size_t r = 0; r < groups[q].size(); ++r)
      if (groups[q][r] == -1)
        throw InvalidArgument(detail::str_cat("reference ", op, ": no call for tp rank ", q, ", EP rank ", r));
  return groups;
}

void check_uniform(const std::vector<EpConfig>& cfgs) {
  const auto base = cfgs[0].uniform_params();
  for (size_t i = 1; i < cfgs.size(); ++i) {
    const auto p = cfgs[i].uniform_params();
    for (size_t j = 0; j < base.size() && j < p.size(); ++j)
      if (p[j].second != base[j].second)
        cfgs[i].ctx.fail(detail::str_cat(p[j].first, "=", core::uniform_value_str(p[j].first, p[j].second), " but rank ", cfgs[0].rank_orig,
                                         " passed ", core::uniform_value_str(p[j].first, base[j].second), " (must be equal on every rank)"));
  }
}

int64_t server_of(int64_t rank, int ranks_per_server) { return ranks_per_server > 0 ? rank / ranks_per_server : 0; }

}  // namespace

std::vector<DispatchResult> dispatch_v2(const std::vector<DispatchArgs>& calls, const Options&) {
  std::vector<EpConfig> cfgs;
  for (const auto& a : calls) cfgs.push_back(core::resolve_dispatch(a));
  check_uniform(cfgs);
  for (size_t i = 1; i < calls.size(); ++i)
    if (calls[i].quant_mode != calls[0].quant_mode)
      cfgs[i].ctx.fail(detail::str_cat("quant_mode=", calls[i].quant_mode, " but another rank passed ", calls[0].quant_mode, " (must be equal on every rank)"));
  const auto groups = group_calls(cfgs, "dispatch_v2");
  const EpConfig& c0 = cfgs[0];
  const int64_t W = c0.W, K = c0.K, H = c0.H, L = c0.L, Sr = c0.Sr, tp = c0.tp;
  const bool quant = calls[0].quant_mode == 2;
  const size_t esz = quant ? 1 : 2;

  std::vector<DispatchResult> out(calls.size());
  std::vector<int64_t> own_rows(calls.size(), 0);
  for (size_t q = 0; q < groups.size(); ++q) {
    const auto& g = groups[q];
    for (int64_t d = 0; d < W; ++d) {
      const int ci = g[static_cast<size_t>(d)];
      const EpConfig& cd = cfgs[static_cast<size_t>(ci)];
      DispatchResult& res = out[static_cast<size_t>(ci)];
      res.expand_x = Tensor(quant ? DType::kInt8 : cd.dtype, {tp * cd.A, H});
      res.dynamic_scales = Tensor(DType::kFloat32, {tp * cd.A});
      res.assist_info_for_combine = Tensor(DType::kInt32, {std::max(cd.BS * K, 128 * cd.A)});
      res.expert_token_nums = Tensor(DType::kInt64, {cd.expert_nums_len()});
      res.ep_recv_counts = Tensor(DType::kInt32, {cd.ep_counts_len()});
      res.tp_recv_counts = Tensor(DType::kInt32, {cd.tp_world_size_arg});
      res.expand_scales = Tensor(DType::kFloat32, {cd.A});

      // The rows this rank receives, in order, with the count of each (e, r) block.
      std::vector<RowRef> rows;
      const int64_t nblk = d < Sr ? 1 : L;
      std::vector<int64_t> cnt(static_cast<size_t>(nblk * W), 0);
      if (d >= Sr) {
        for (int64_t e = 0; e < L; ++e) {
          const int64_t gid = (d - Sr) * L + e;
          for (int64_t r = 0; r < W; ++r) {
            const EpConfig& cr = cfgs[static_cast<size_t>(g[static_cast<size_t>(r)])];
            for (int64_t t = 0; t < cr.BS; ++t)
              for (int64_t k = 0; k < K; ++k)
                if (cr.sel(t, k) && cr.ids[static_cast<size_t>(t * K + k)] == gid) {
                  rows.push_back({r, t, k, cr.scale_row_base + gid});
                  ++cnt[static_cast<size_t>(e * W + r)];
                }
          }
        }
      } else {
        const int64_t s = d / cd.R;
        for (int64_t r = 0; r < W; ++r) {
          if (r % cd.R != d % cd.R) continue;
          const EpConfig& cr = cfgs[static_cast<size_t>(g[static_cast<size_t>(r)])];
          for (int64_t t = 0; t < cr.BS; ++t)
            if (cr.token_on[static_cast<size_t>(t)]) {
              rows.push_back({r, t, K + s, s});
              ++cnt[static_cast<size_t>(r)];
            }
        }
      }
      MOEDIST_ASSERT(static_cast<int64_t>(rows.size()) <= cd.A, "rows ", rows.size(), " > A ", cd.A);
      own_rows[static_cast<size_t>(ci)] = static_cast<int64_t>(rows.size());

      auto* ex = static_cast<unsigned char*>(res.expand_x.data());
      auto* dyn = res.dynamic_scales.data_as<float>();
      auto* assist = res.assist_info_for_combine.data_as<int32_t>();
      auto* esc = res.expand_scales.data_as<float>();
      for (size_t i = 0; i < rows.size(); ++i) {
        const RowRef& rr = rows[i];
        const DispatchArgs& src = calls[static_cast<size_t>(g[static_cast<size_t>(rr.src)])];
        std::vector<uint16_t> xrow(static_cast<size_t>(H));
        for (int64_t h = 0; h < H; ++h) xrow[static_cast<size_t>(h)] = core::at2<uint16_t>(src.x, rr.tok, h);
        if (quant) {
          std::vector<float> smooth;
          if (src.scales.defined())
            for (int64_t h = 0; h < H; ++h) smooth.push_back(core::at2<float>(src.scales, rr.scale_row, h));
          core::dynamic_quant_row(cd.dtype, xrow.data(), smooth.empty() ? nullptr : smooth.data(), H,
                                  reinterpret_cast<int8_t*>(ex + i * H * esz), &dyn[i]);
        } else {
          std::memcpy(ex + i * H * esz, xrow.data(), H * esz);
        }
        assist[3 * i] = static_cast<int32_t>(rr.src);
        assist[3 * i + 1] = static_cast<int32_t>(rr.tok);
        assist[3 * i + 2] = static_cast<int32_t>(rr.kk);
        if (src.expert_scales.defined())
          esc[i] = rr.kk < K ? core::at2<float>(src.expert_scales, rr.tok, rr.kk) : 1.0f;
      }
      // Inclusive prefix counts, expert-major; expert_token_nums per type.
      auto* epc = res.ep_recv_counts.data_as<int32_t>();
      auto* etn = res.expert_token_nums.data_as<int64_t>();
      int64_t run = 0;
      for (int64_t e = 0; e < nblk; ++e) {
        int64_t per = 0;
        for (int64_t r = 0; r < W; ++r) {
          run += cnt[static_cast<size_t>(e * W + r)];
          per += cnt[static_cast<size_t>(e * W + r)];
          epc[e * W + r] = static_cast<int32_t>(run);
        }
        etn[e] = calls[static_cast<size_t>(ci)].expert_token_nums_type == 0 ? run : per;
      }
    }
  }
  // TP: each rank appends its peer's rows (peer order), counts and scales follow.
  for (size_t q = 0; q < groups.size() && tp == 2; ++q) {
    for (int64_t d = 0; d < W; ++d) {
      const size_t me = static_cast<size_t>(groups[q][static_cast<size_t>(d)]);
      const size_t peer = static_cast<size_t>(groups[1 - q][static_cast<size_t>(d)]);
      const int64_t own = own_rows[me], prow = own_rows[peer];
      DispatchResult& r = out[me];
      const DispatchResult& p = out[peer];
      std::memcpy(static_cast<unsigned char*>(r.expand_x.data()) + own * H * esz, p.expand_x.data(), prow * H * esz);
      std::memcpy(r.dynamic_scales.data_as<float>() + own, p.dynamic_scales.data(), prow * sizeof(float));
      r.expert_token_nums.data_as<int64_t>()[0] = own + prow;
      r.tp_recv_counts.data_as<int32_t>()[q] = static_cast<int32_t>(own);
      r.tp_recv_counts.data_as<int32_t>()[1 - q] = static_cast<int32_t>(prow);
    }
  }
  // TP peer's cumulative counts go to [W, 2W) (after the peer copy above read only the first half).
  for (size_t q = 0; q < groups.size() && tp == 2; ++q)
    for (int64_t d = 0; d < W; ++d) {
      DispatchResult& r = out[static_cast<size_t>(groups[q][static_cast<size_t>(d)])];
      const DispatchResult& p = out[static_cast<size_t>(groups[1 - q][static_cast<size_t>(d)])];
      for (int64_t i = 0; i < W; ++i) r.ep_recv_counts.data_as<int32_t>()[W + i] = p.ep_recv_counts.data_as<int32_t>()[i];
    }
  for (size_t i = 0; i < calls.size() && tp == 1; ++i)
    if (cfgs[i].tp_world_size_arg == 1) out[i].tp_recv_counts.data_as<int32_t>()[0] = static_cast<int32_t>(own_rows[i]);
  return out;
}

std::vector<Tensor> combine_v2(const std::vector<CombineArgs>& calls, const Options& options) {
  std::vector<EpConfig> cfgs;
  std::vector<core::CombineCounts> counts;
  for (const auto& a : calls) {
    cfgs.push_back(core::resolve_combine(a));
    counts.push_back(core::combine_counts(cfgs.back(), a));
  }
  check_uniform(cfgs);
  const auto groups = group_calls(cfgs, "combine_v2");
  const EpConfig& c0 = cfgs[0];
  const int64_t W = c0.W, K = c0.K, H = c0.H, S = c0.S;
  const DType dt = c0.dtype;
  const bool hier = c0.alg == core::Alg::kHierarchy;
  const bool cquant = calls[0].comm_quant_mode == 2;

  // y of every (tp group, source rank, token, slot), as floats exactly representable in dt; plus the
  // row's weight and server for the hierarchy order.
  struct Slot {
    std::vector<float> y;
    float w;
    int64_t server;
  };
  std::vector<std::map<std::tuple<int64_t, int64_t, int64_t>, Slot>> slots(groups.size());
  for (size_t q = 0; q < groups.size(); ++q) {
    for (int64_t d = 0; d < W; ++d) {
      const size_t ci = static_cast<size_t>(groups[q][static_cast<size_t>(d)]);
      const CombineArgs& a = calls[ci];
      for (int64_t i = 0; i < counts[ci].own_rows; ++i) {
        std::vector<uint16_t> y(static_cast<size_t>(H));
        for (int64_t h = 0; h < H; ++h) y[static_cast<size_t>(h)] = core::at2<uint16_t>(a.expand_x, i, h);
        if (c0.tp == 2) {
          const size_t pi = static_cast<size_t>(groups[1 - q][static_cast<size_t>(d)]);
          const int64_t prow = counts[pi].own_rows + i;  // the peer's partial for my row i
          for (int64_t h = 0; h < H; ++h) {
            const float sum = core::half_to_float(dt, y[static_cast<size_t>(h)]) +
                              core::half_to_float(dt, core::at2<uint16_t>(calls[pi].expand_x, prow, h));
            y[static_cast<size_t>(h)] = core::float_to_half(dt, sum);
          }
        }
        Slot sl;
        sl.y.resize(static_cast<size_t>(H));
        if (cquant) {
          std::vector<unsigned char> packed(static_cast<size_t>(core::comm_quant_row_bytes(H)));
          core::comm_quant_row(dt, y.data(), H, packed.data());
          core::comm_dequant_row(dt, packed.data(), H, sl.y.data());
        } else {
          for (int64_t h = 0; h < H; ++h) sl.y[static_cast<size_t>(h)] = core::half_to_float(dt, y[static_cast<size_t>(h)]);
        }
        sl.w = hier ? core::at1<float>(a.expand_scales, i) : 0.f;
        sl.server = server_of(d, options.ranks_per_server);
        const auto key = std::make_tuple(static_cast<int64_t>(core::at1<int32_t>(a.assist_info_for_combine, 3 * i)),
                                         static_cast<int64_t>(core::at1<int32_t>(a.assist_info_for_combine, 3 * i + 1)),
                                         static_cast<int64_t>(core::at1<int32_t>(a.assist_info_for_combine, 3 * i + 2)));
        const bool fresh = slots[q].emplace(key, std::move(sl)).second;
        if (!fresh)
          cfgs[ci].ctx.fail(detail::str_cat("assist_info_for_combine row ", i, " repeats (rank, token, k)=(", std::get<0>(key), ", ",
                                            std::get<1>(key), ", ", std::get<2>(key), ") (each must be unique)"));
      }
    }
  }

  std::vector<Tensor> out;
  for (size_t ci = 0; ci < calls.size(); ++ci) {
    const CombineArgs& a = calls[ci];
    const EpConfig& c = cfgs[ci];
    Tensor o(dt, {c.BS, H});
    auto* po = o.data_as<uint16_t>();
    auto& my = slots[static_cast<size_t>(c.tp_rank)];
    auto find = [&](int64_t t, int64_t kk) -> const Slot& {
      auto it = my.find(std::make_tuple(c.rank, t, kk));
      if (it == my.end())
        c.ctx.fail(detail::str_cat("no expert row for token ", t, " slot ", kk, " (expand_x/assist_info do not match expert_ids)"));
      return it->second;
    };
    std::vector<float> acc(static_cast<size_t>(H));
    for (int64_t t = 0; t < c.BS; ++t) {
      if (!c.token_on[static_cast<size_t>(t)]) continue;  // zeros
      std::fill(acc.begin(), acc.end(), 0.f);
      if (hier) {
        // per server: slot order, y * w (shared rows carry w = 1), rounded to dt; then servers in order
        std::map<int64_t, std::vector<float>> part;
        for (int64_t kk = 0; kk < K + S; ++kk) {
          if (kk < K && !c.sel(t, kk)) continue;
          const Slot& sl = find(t, kk);
          auto& p = part[sl.server];
          p.resize(static_cast<size_t>(H), 0.f);
          for (int64_t h = 0; h < H; ++h) {
            const float prod = sl.y[static_cast<size_t>(h)] * sl.w;
            p[static_cast<size_t>(h)] = p[static_cast<size_t>(h)] + prod;
          }
        }
        for (auto& [server, p] : part)
          for (int64_t h = 0; h < H; ++h) acc[static_cast<size_t>(h)] = acc[static_cast<size_t>(h)] + core::round_to(dt, p[static_cast<size_t>(h)]);
      }
      for (int64_t k = 0; k < K; ++k) {
        if (!c.entry_on[static_cast<size_t>(t * K + k)]) continue;
        const int64_t id = c.ids[static_cast<size_t>(t * K + k)];
        const float w = core::at2<float>(a.expert_scales, t, k);
        switch (c.classify(id)) {
          case ExpertKind::kMoe: {
            if (hier) break;
            const Slot& sl = find(t, k);
            for (int64_t h = 0; h < H; ++h) {
              const float prod = sl.y[static_cast<size_t>(h)] * w;
              acc[static_cast<size_t>(h)] = acc[static_cast<size_t>(h)] + prod;
            }
            break;
          }
          case ExpertKind::kZero: break;
          case ExpertKind::kCopy:
            for (int64_t h = 0; h < H; ++h) {
              const float prod = core::half_to_float(dt, core::at2<uint16_t>(a.ori_x, t, h)) * w;
              acc[static_cast<size_t>(h)] = acc[static_cast<size_t>(h)] + prod;
            }
            break;
          case ExpertKind::kConst: {
            const int64_t qc = id - (c.E_orig + c.Z + c.C);
            const float a1 = core::half_to_float(dt, core::at1<uint16_t>(a.const_expert_alpha_1, qc));
            const float a2 = core::half_to_float(dt, core::at1<uint16_t>(a.const_expert_alpha_2, qc));
            for (int64_t h = 0; h < H; ++h) {
              const float x = core::half_to_float(dt, core::at2<uint16_t>(a.ori_x, t, h));
              const float v = core::half_to_float(dt, core::at2<uint16_t>(a.const_expert_v, qc, h));
              const float t1 = a1 * x;
              const float t2 = a2 * v;
              const float sum = t1 + t2;
              const float prod = sum * w;
              acc[static_cast<size_t>(h)] = acc[static_cast<size_t>(h)] + prod;
            }
            break;
          }
          case ExpertKind::kInvalid: MOEDIST_ASSERT(false, "invalid id passed validation");
        }
      }
      if (!hier)
        for (int64_t s = 0; s < S; ++s) {
          const Slot& sl = find(t, K + s);
          for (int64_t h = 0; h < H; ++h) acc[static_cast<size_t>(h)] = acc[static_cast<size_t>(h)] + sl.y[static_cast<size_t>(h)];
        }
      if (a.shared_expert_x.defined()) {
        const TensorView& sx = a.shared_expert_x;
        for (int64_t h = 0; h < H; ++h) {
          const uint16_t v = sx.dim() == 2 ? core::at2<uint16_t>(sx, t, h)
                                           : *static_cast<const uint16_t*>(sx.at({t / sx.size(1), t % sx.size(1), h}));
          acc[static_cast<size_t>(h)] = acc[static_cast<size_t>(h)] + core::half_to_float(dt, v);
        }
      }
      for (int64_t h = 0; h < H; ++h) po[t * H + h] = core::float_to_half(dt, acc[static_cast<size_t>(h)]);
    }
    out.push_back(std::move(o));
  }
  return out;
}

std::vector<CombineAddRmsNormResult> combine_add_rms_norm(const std::vector<CombineAddRmsNormArgs>& calls,
                                                         const Options& options) {
  std::vector<CombineArgs> combine_calls;
  for (const auto& a : calls) combine_calls.push_back(a.combine);
  std::vector<Tensor> combined = combine_v2(combine_calls, options);
  std::vector<CombineAddRmsNormResult> out;
  for (size_t i = 0; i < calls.size(); ++i) {
    const CombineAddRmsNormArgs& a = calls[i];
    const EpConfig c = core::resolve_combine(a.combine);
    core::check_add_rms_norm(c, a);
    const DType dt = c.dtype;
    const int64_t BS = c.BS, H = c.H;
    const float eps = static_cast<float>(a.norm_eps);
    CombineAddRmsNormResult r;
    r.y = Tensor(dt, {BS, 1, H});
    r.rstd = Tensor(DType::kFloat32, {BS, 1, 1});
    r.x = Tensor(dt, {BS, 1, H});
    const uint16_t* cb = combined[i].data_as<uint16_t>();
    for (int64_t t = 0; t < BS; ++t) {
      // x = combine row (already rounded) + residual, rounded once.
      float sum = 0.f;
      for (int64_t h = 0; h < H; ++h) {
        const TensorView& res = a.residual_x;
        const uint16_t rv = res.dim() == 3 ? *static_cast<const uint16_t*>(res.at({t, 0, h})) : core::at2<uint16_t>(res, t, h);
        const float added = core::half_to_float(dt, cb[t * H + h]) + core::half_to_float(dt, rv);
        const uint16_t xh = core::float_to_half(dt, added);
        r.x.data_as<uint16_t>()[t * H + h] = xh;
        // Sum of squares, h ascending: the square rounded to float32, then added.
        const float xf = core::half_to_float(dt, xh);
        const float sq = xf * xf;
        sum = sum + sq;
      }
      // rstd = 1 / sqrt(mean + eps), all float32.
      const float mean = sum / static_cast<float>(H);
      const float rstd = 1.f / std::sqrt(mean + eps);
      r.rstd.data_as<float>()[t] = rstd;
      // y = (x * rstd) * gamma, rounded once.
      for (int64_t h = 0; h < H; ++h) {
        const float xf = core::half_to_float(dt, r.x.data_as<uint16_t>()[t * H + h]);
        const float normed = xf * rstd;
        const float scaled = normed * core::half_to_float(dt, core::at1<uint16_t>(a.gamma, h));
        r.y.data_as<uint16_t>()[t * H + h] = core::float_to_half(dt, scaled);
      }
    }
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace moedist::reference
