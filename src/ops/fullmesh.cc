// fullmesh: every rank sends straight to every expert rank.
//  dispatch: one exchange. Blobs carry each rank's (destination, local expert) counts, so every rank
//    knows every receiver's layout and writes each row once, straight into its final place
//    (block (e, src) of the receiver's expand_x, token order inside the block).
//  combine: one exchange. Each expert rank writes output row (src, t, k) into slot [t][k] of the
//    source's receive buffer; the source then reduces each token in the spec's order, reading every
//    slot once.
#include <algorithm>
#include <cstring>

#include "core/half.h"
#include "core/kernels.h"
#include "core/quant.h"
#include "ops/algorithms.h"
#include "ops/collective.h"

namespace moedist::ops {

DispatchCounts fullmesh_dispatch(const DispatchCtx& d, const RowSinks& sinks, Step* split) {
  const core::EpConfig& c = d.cfg;
  const int64_t W = c.W, L = c.L, K = c.K;
  Step local;
  Step& step = split ? *split : local;
  step.split = split != nullptr;
  step.transport = d.ep;
  step.members = c.members();
  step.waits_us = c.waits_us;
  step.cfg = &c;
  step.extra_uniform = {{"quant_mode", d.quant ? 2 : 0}};
  const std::vector<int32_t> mine = send_counts(d);
  step.payload.resize(mine.size() * 4);
  MOEDIST_ASSERT(step.payload.size() == dispatch_counts_bytes(c, d.ep->ranks_per_server()));
  std::memcpy(step.payload.data(), mine.data(), step.payload.size());
  const size_t A = static_cast<size_t>(sinks.capacity);
  step.recv = {RecvRegion{sinks.expand_x, A * d.row_bytes}, RecvRegion{sinks.dynamic_scales, A * 4},
               RecvRegion{sinks.assist, A * 12}, RecvRegion{sinks.expand_scales, A * 4}};

  // The members' counts are read where the transport keeps them, inside the exchange only: a copy of
  // every member's W x L counts on every rank would grow as W^3 over the group.
  step.blobs_after = false;
  DispatchCounts out;
  const int64_t nblk = c.local_experts();
  step.run("dispatch_v2", d.label, nullptr, [&](PutWriter& w) {
    // from[r][dest * L + e]: what effective rank r sends to (dest, e)
    std::vector<const int32_t*> from(static_cast<size_t>(W));
    for (int64_t r = 0; r < W; ++r) from[static_cast<size_t>(r)] = reinterpret_cast<const int32_t*>(step.payload_of(step.index_of(c.phys(r))));
    // What this rank receives: block (e, r) holds the rows of source r for local expert e.
    out.cnt.assign(static_cast<size_t>(nblk * W), 0);
    for (int64_t e = 0; e < nblk; ++e)
      for (int64_t r = 0; r < W; ++r) {
        const int64_t n = from[static_cast<size_t>(r)][c.rank * L + e];
        out.cnt[static_cast<size_t>(e * W + r)] = n;
        out.rows += n;
      }
    // Start of block (e, me) on a destination: rows of earlier experts from every source, then rows of
    // expert e from lower-ranked sources. Worked out for the destinations this rank sends to only
    // (O(W L) each, instead of O(W^2 L) for all).
    std::vector<int64_t> next(static_cast<size_t>(W * L), 0);
    std::vector<uint8_t> known(static_cast<size_t>(W), 0);
    auto layout = [&](int64_t dst) {
      known[static_cast<size_t>(dst)] = 1;
      const int64_t blocks = dst < c.Sr ? 1 : L;
      int64_t off = 0;
      for (int64_t e = 0; e < blocks; ++e)
        for (int64_t r = 0; r < W; ++r) {
          if (r == c.rank) next[static_cast<size_t>(dst * L + e)] = off;
          off += from[static_cast<size_t>(r)][dst * L + e];
        }
      // off <= the destination's A: validation bounds every BS by global_bs / W.
    };
    // Without smooth scales a token quantizes the same for every expert: once, then copies.
    const bool reuse = d.quant && !d.smooth;
    std::vector<unsigned char> qrow(reuse ? d.row_bytes : 0);
    float qscale = 0.f;
    int64_t qtoken = -1;
    auto emit = [&](int64_t dst, int64_t e, int64_t t, int64_t kk, int64_t scale_row, float wgt) {
      const int peer = c.phys(dst);
      if (!known[static_cast<size_t>(dst)]) layout(dst);
      const size_t pos = static_cast<size_t>(next[static_cast<size_t>(dst * L + e)]++);
      float scale;
      auto* row = static_cast<unsigned char*>(w.dest(peer, 0, pos * d.row_bytes, d.row_bytes));
      if (reuse) {
        if (qtoken != t) {
          d.make_row(t, scale_row, qrow.data(), &qscale);
          qtoken = t;
        }
        std::memcpy(row, qrow.data(), d.row_bytes);
        scale = qscale;
      } else {
        d.make_row(t, scale_row, row, &scale);
      }
      std::memcpy(w.dest(peer, 1, pos * 4, 4), &scale, 4);
      const int32_t tri[3] = {static_cast<int32_t>(c.rank), static_cast<int32_t>(t), static_cast<int32_t>(kk)};
      std::memcpy(w.dest(peer, 2, pos * 12, 12), tri, 12);
      std::memcpy(w.dest(peer, 3, pos * 4, 4), &wgt, 4);
    };
    for (int64_t t = 0; t < c.BS; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        if (!c.sel(t, k)) continue;
        const int64_t g = c.ids[static_cast<size_t>(t * K + k)];
        emit(c.moe_rank_of(g), g % L, t, k, c.scale_row_base + g, d.weights ? d.weights[t * K + k] : 0.f);
      }
      if (c.token_on[static_cast<size_t>(t)])
        for (int64_t s = 0; s < c.S; ++s) emit(c.shared_dest(c.rank, s), 0, t, K + s, s, d.weights ? 1.f : 0.f);
    }
  });
  return out;
}

void CombineCtx::own_row(int64_t i, uint16_t* out) const {
  const int64_t H = cfg.H;
  const uint16_t* x = expand_x + i * H;
  if (!tp_partial) {
    std::memcpy(out, x, static_cast<size_t>(H) * 2);
    return;
  }
  const uint16_t* p = tp_partial + i * H;
  for (int64_t h = 0; h < H; ++h) {
    const float s = core::half_to_float(cfg.dtype, x[h]) + core::half_to_float(cfg.dtype, p[h]);
    out[h] = core::float_to_half(cfg.dtype, s);
  }
}

void CombineCtx::wire_row(int64_t i, unsigned char* dst, std::vector<uint16_t>& tmp) const {
  if (!quant && !tp_partial) {
    std::memcpy(dst, expand_x + i * cfg.H, static_cast<size_t>(cfg.H) * 2);
    return;
  }
  if (!quant) {
    own_row(i, reinterpret_cast<uint16_t*>(dst));
    return;
  }
  const uint16_t* y = expand_x + i * cfg.H;
  if (tp_partial) {
    tmp.resize(static_cast<size_t>(cfg.H));
    own_row(i, tmp.data());
    y = tmp.data();
  }
  core::comm_quant_row_fast(cfg.dtype, y, cfg.H, dst);
}

int64_t CombineCtx::triple(int64_t i, int part) const { return core::at1<int32_t>(args.assist_info_for_combine, 3 * i + part); }

void add_special_term(const CombineCtx& cc, int64_t t, int64_t id, float w, float* acc) {
  const core::EpConfig& c = cc.cfg;
  const DType dt = c.dtype;
  const int64_t H = c.H;
  const TensorView& ox = cc.args.ori_x;
  if (c.classify(id) == core::ExpertKind::kCopy) {
    for (int64_t h = 0; h < H; ++h) {
      const float prod = core::half_to_float(dt, core::at2<uint16_t>(ox, t, h)) * w;
      acc[h] = acc[h] + prod;
    }
    return;
  }
  const int64_t q = id - (c.E_orig + c.Z + c.C);
  const float a1 = core::half_to_float(dt, core::at1<uint16_t>(cc.args.const_expert_alpha_1, q));
  const float a2 = core::half_to_float(dt, core::at1<uint16_t>(cc.args.const_expert_alpha_2, q));
  for (int64_t h = 0; h < H; ++h) {
    const float x = core::half_to_float(dt, core::at2<uint16_t>(ox, t, h));
    const float v = core::half_to_float(dt, core::at2<uint16_t>(cc.args.const_expert_v, q, h));
    const float t1 = a1 * x;
    const float t2 = a2 * v;
    const float sum = t1 + t2;
    const float prod = sum * w;
    acc[h] = acc[h] + prod;
  }
}

const uint16_t* shared_x_rows(const CombineCtx& cc, std::vector<uint16_t>& storage) {
  const TensorView& sxv = cc.args.shared_expert_x;
  if (!sxv.defined()) return nullptr;
  const TensorView flat = sxv.dim() == 3 ? TensorView(sxv.data, sxv.dtype, {cc.cfg.BS, cc.cfg.H},
                                                      {sxv.stride(1), sxv.stride(2)})
                                         : sxv;
  // a (a, b, H) view with a*b == BS is a (BS, H) view when its first two dims are contiguous
  if (sxv.dim() == 2 || sxv.stride(0) == sxv.stride(1) * sxv.size(1)) return core::contiguous_rows(flat, storage);
  return nullptr;
}

void add_shared_x(const CombineCtx& cc, int64_t t, float* acc) {
  const TensorView& sx = cc.args.shared_expert_x;
  if (!sx.defined()) return;
  const DType dt = cc.cfg.dtype;
  const int64_t H = cc.cfg.H;
  const uint16_t* row = nullptr;
  if (sx.dim() == 2) {
    if (sx.stride(1) == 1) row = static_cast<const uint16_t*>(sx.at({t, 0}));
  } else if (sx.stride(2) == 1) {
    row = static_cast<const uint16_t*>(sx.at({t / sx.size(1), t % sx.size(1), 0}));
  }
  for (int64_t h = 0; h < H; ++h) {
    const uint16_t v = row ? row[h]
                           : (sx.dim() == 2 ? core::at2<uint16_t>(sx, t, h)
                                            : *static_cast<const uint16_t*>(sx.at({t / sx.size(1), t % sx.size(1), h})));
    acc[h] = acc[h] + core::half_to_float(dt, v);
  }
}

void fullmesh_combine(const CombineCtx& cc, uint16_t* out) {
  CombineSplit s;
  fullmesh_combine_send(cc, s);
  fullmesh_combine_reduce(cc, s, out);
}

void fullmesh_combine_send(const CombineCtx& cc, CombineSplit& s) {
  const core::EpConfig& c = cc.cfg;
  const int64_t H = c.H, SL = c.slots();
  Step& step = s.step;
  step.transport = cc.ep;
  step.members = c.members();
  step.waits_us = c.waits_us;
  step.cfg = &c;
  step.blobs_after = false;  // the sources' BS are read inside produce only
  step.extra_uniform = {{"comm_quant_mode", cc.quant ? 2 : 0}};
  put_pod<int64_t>(step.payload, c.BS);
  const size_t region = static_cast<size_t>(c.BS * SL) * cc.slot_bytes;
  s.buf = static_cast<unsigned char*>(cc.ep->scratch(4, region));
  step.recv = {RecvRegion{s.buf, region}};
  // This rank's own rows need no copy when they go out unchanged: the reduction reads them in place.
  s.in_place = !cc.quant && !cc.tp_partial;
  const bool in_place = s.in_place;
  s.direct.assign(in_place ? static_cast<size_t>(c.BS * SL) : 0, nullptr);
  auto& direct = s.direct;
  step.run("combine_v2", cc.label, nullptr, [&](PutWriter& w) {
    std::vector<uint16_t> tmp;
    for (int64_t i = 0; i < cc.own_rows; ++i) {
      const int64_t src = cc.triple(i, 0), tok = cc.triple(i, 1), kk = cc.triple(i, 2);
      int64_t src_bs;
      std::memcpy(&src_bs, step.payload_of(step.index_of(c.phys(src))), sizeof(src_bs));
      if (tok >= src_bs)
        throw InvalidArgument(detail::str_cat(cc.label, "combine_v2: assist_info_for_combine row ", i, " names token ", tok, " of rank ", src,
                                              " which has BS=", src_bs, " (pass dispatch_v2's outputs unchanged)"));
      if (in_place && src == c.rank) {
        direct[static_cast<size_t>(tok * SL + kk)] = reinterpret_cast<const unsigned char*>(cc.expand_x + i * H);
        continue;
      }
      auto* dst = static_cast<unsigned char*>(w.dest(c.phys(src), 0, static_cast<size_t>(tok * SL + kk) * cc.slot_bytes, cc.slot_bytes));
      cc.wire_row(i, dst, tmp);
    }
  });
}

void fullmesh_combine_reduce(const CombineCtx& cc, CombineSplit& s, uint16_t* out) {
  if (s.step.split) s.step.end();
  const core::EpConfig& c = cc.cfg;
  const int64_t K = c.K, H = c.H, SL = c.slots();
  const DType dt = c.dtype;
  const unsigned char* buf = s.buf;
  const bool in_place = s.in_place;
  const auto& direct = s.direct;

  // Reduce in the spec's order: k ascending (MoE, copy, const), shared slots, shared_expert_x.
  // Tokens whose terms are all rows (MoE, copy, shared, shared_expert_x; with comm_quant_mode 2 the
  // MoE and shared rows are int8, dequantized inside the kernel) take the chunked kernel; tokens with
  // a const expert take the general loop. Both round the same way.
  std::vector<float> acc(static_cast<size_t>(H)), deq(cc.quant ? static_cast<size_t>(H) : 0);
  std::vector<core::RowTerm> terms;
  std::vector<uint16_t> ori_storage, sx_storage;
  const TensorView& ox = cc.args.ori_x;
  const uint16_t* ori = ox.defined() ? core::contiguous_rows(ox, ori_storage) : nullptr;
  const TensorView& sxv = cc.args.shared_expert_x;
  const uint16_t* sx = shared_x_rows(cc, sx_storage);
  for (int64_t t = 0; t < c.BS; ++t) {
    if (!c.token_on[static_cast<size_t>(t)]) continue;
    auto slot_values = [&](int64_t kk) -> const unsigned char* {
      const size_t at = static_cast<size_t>(t * SL + kk);
      return in_place && direct[at] ? direct[at] : buf + at * cc.slot_bytes;
    };
    bool simple = !sxv.defined() || sx;
    auto slot_term = [&](int64_t kk, float w, bool weighted) -> core::RowTerm {
      const unsigned char* p = slot_values(kk);
      if (cc.quant) return {nullptr, w, weighted, p};
      return {reinterpret_cast<const uint16_t*>(p), w, weighted};
    };
    terms.clear();
    for (int64_t k = 0; k < K && simple; ++k) {
      if (!c.entry_on[static_cast<size_t>(t * K + k)]) continue;
      const int64_t id = c.ids[static_cast<size_t>(t * K + k)];
      const float w = core::at2<float>(cc.args.expert_scales, t, k);
      const core::ExpertKind kind = c.classify(id);
      if (kind == core::ExpertKind::kMoe)
        terms.push_back(slot_term(k, w, true));
      else if (kind == core::ExpertKind::kCopy)
        terms.push_back({ori + t * H, w, true});
      else if (kind == core::ExpertKind::kConst)
        simple = false;
    }
    uint16_t* o = out + t * H;
    if (simple) {
      for (int64_t s = 0; s < c.S; ++s) terms.push_back(slot_term(K + s, 1.f, false));
      if (sx) terms.push_back({sx + t * H, 1.f, false});
      if (dt == DType::kBFloat16)
        core::reduce_terms_bf16(o, terms.data(), static_cast<int>(terms.size()), H);
      else
        core::reduce_terms_fp16(o, terms.data(), static_cast<int>(terms.size()), H);
      continue;
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    float* a = acc.data();
    auto add_slot = [&](int64_t kk, float w, bool weighted) {
      const unsigned char* p = slot_values(kk);
      if (cc.quant) {
        core::comm_dequant_row_fast(dt, p, H, deq.data());
        for (int64_t h = 0; h < H; ++h) {
          const float term = weighted ? deq[static_cast<size_t>(h)] * w : deq[static_cast<size_t>(h)];
          a[h] = a[h] + term;
        }
        return;
      }
      const uint16_t* y = reinterpret_cast<const uint16_t*>(p);
      if (dt == DType::kBFloat16)
        weighted ? core::axpy_bf16(a, y, w, H) : core::add_bf16(a, y, H);
      else
        weighted ? core::axpy_fp16(a, y, w, H) : core::add_fp16(a, y, H);
    };
    for (int64_t k = 0; k < K; ++k) {
      if (!c.entry_on[static_cast<size_t>(t * K + k)]) continue;
      const int64_t id = c.ids[static_cast<size_t>(t * K + k)];
      const float w = core::at2<float>(cc.args.expert_scales, t, k);
      const core::ExpertKind kind = c.classify(id);
      if (kind == core::ExpertKind::kMoe)
        add_slot(k, w, true);
      else if (kind == core::ExpertKind::kCopy || kind == core::ExpertKind::kConst)
        add_special_term(cc, t, id, w, a);
    }
    for (int64_t s = 0; s < c.S; ++s) add_slot(K + s, 0.f, false);
    add_shared_x(cc, t, a);
    if (dt == DType::kBFloat16)
      core::store_bf16(o, a, H);
    else
      for (int64_t h = 0; h < H; ++h) o[h] = core::float_to_fp16(a[h]);
  }
}

}  // namespace moedist::ops
