// comm_alg "hierarchy": consecutive ranks form servers (Transport::ranks_per_server). A token crosses
// to another server at most once, and combine pre-reduces within the server before crossing back.
//  relay(r, s): the rank of server s with the same local index as source rank r (its own server's
//  relay is r itself).
//  dispatch, step 1: each source sends each token once per server that needs it to that server's
//    relay, as a record (token, per-k ids and weights for that server, shared-expert flags, the row,
//    quantized once at the source: hierarchy takes no smooth scales). Blobs carry the (destination,
//    local expert) counts, so every rank knows every final layout.
//  dispatch, step 2: each relay writes each record's rows straight into their final places in the
//    expert ranks of its server: rows come out exactly as with fullmesh.
//  combine, step 1: each expert rank writes its output rows, with their weights (expand_scales), into
//    the relay of the row's source for its server.
//  combine, step 2: each relay sums the rows of a token in slot order (y * w in fp32, shared rows
//    w = 1), rounds the partial to the token dtype and sends one row per token back to the source,
//    which adds the partials in server order, then copy/const experts, then shared_expert_x.
#include <algorithm>
#include <cstring>

#include "core/half.h"
#include "core/kernels.h"
#include "ops/algorithms.h"
#include "ops/collective.h"

namespace moedist::ops {

namespace {

struct Servers {
  int64_t W = 0, P = 1, n = 1;
  Servers(int64_t world, int rps) : W(world), P(rps > 0 && rps < world ? rps : world), n((world + P - 1) / P) {}
  int64_t of(int64_t rank) const { return rank / P; }
  int64_t size(int64_t s) const { return std::min(P, W - s * P); }
  int64_t relay(int64_t src, int64_t s) const { return s * P + (src % P) % size(s); }
  // Sources that relay `rank` serves for its own server, ascending.
  std::vector<int64_t> sources_of(int64_t rank) const {
    std::vector<int64_t> v;
    for (int64_t r = 0; r < W; ++r)
      if (relay(r, of(rank)) == rank) v.push_back(r);
    return v;
  }
};

// Dispatch record layout.
struct RecordLayout {
  int64_t K, S;
  size_t row_bytes;
  size_t ids_off() const { return 4; }
  size_t w_off() const { return 4 + 4 * static_cast<size_t>(K); }
  size_t shared_off() const { return w_off() + 4 * static_cast<size_t>(K); }
  size_t scale_off() const { return shared_off() + 4 * static_cast<size_t>(S); }
  size_t row_off() const { return (scale_off() + 4 + 15) / 16 * 16; }
  size_t bytes() const { return (row_off() + row_bytes + 15) / 16 * 16; }
};

}  // namespace

DispatchCounts hierarchy_dispatch(const DispatchCtx& d, const RowSinks& sinks) {
  const core::EpConfig& c = d.cfg;
  const int64_t W = c.W, L = c.L, K = c.K, S = c.S, me = c.rank;
  const Servers sv(W, d.ep->ranks_per_server());
  const RecordLayout rl{K, S, d.row_bytes};
  const size_t rec = rl.bytes();

  // Which servers each token goes to.
  std::vector<uint8_t> to_server(static_cast<size_t>(c.BS * sv.n), 0);
  std::vector<int32_t> ntok(static_cast<size_t>(sv.n), 0);
  for (int64_t t = 0; t < c.BS; ++t) {
    for (int64_t k = 0; k < K; ++k)
      if (c.sel(t, k)) to_server[static_cast<size_t>(t * sv.n + sv.of(c.moe_rank_of(c.ids[static_cast<size_t>(t * K + k)])))] = 1;
    if (c.token_on[static_cast<size_t>(t)])
      for (int64_t s = 0; s < S; ++s) to_server[static_cast<size_t>(t * sv.n + sv.of(c.shared_dest(me, s)))] = 1;
    for (int64_t s = 0; s < sv.n; ++s) ntok[static_cast<size_t>(s)] += to_server[static_cast<size_t>(t * sv.n + s)];
  }

  // Step 1: records to the relays.
  Step s1;
  s1.transport = d.ep;
  s1.members = c.members();
  s1.waits_us = c.waits_us;
  s1.cfg = &c;
  s1.extra_uniform = {{"quant_mode", d.quant ? 2 : 0}, {"ranks per server", sv.P}};
  const std::vector<int32_t> mine = send_counts(d);
  s1.payload.resize((mine.size() + ntok.size()) * 4);
  MOEDIST_ASSERT(s1.payload.size() == dispatch_counts_bytes(c, d.ep->ranks_per_server()));
  std::memcpy(s1.payload.data(), mine.data(), mine.size() * 4);
  std::memcpy(s1.payload.data() + mine.size() * 4, ntok.data(), ntok.size() * 4);
  const std::vector<int64_t> my_sources = sv.sources_of(me);
  const size_t stage_bytes = my_sources.size() * static_cast<size_t>(c.max_bs) * rec;
  auto* stage = static_cast<unsigned char*>(d.ep->scratch(6, std::max<size_t>(stage_bytes, 1)));
  s1.recv = {RecvRegion{stage, stage_bytes}};
  auto counts_from = [&](int64_t r) { return reinterpret_cast<const int32_t*>(s1.payload_of(s1.index_of(c.phys(r)))); };
  auto ntok_from = [&](int64_t r, int64_t s) { return counts_from(r)[W * L + s]; };
  s1.run("dispatch_v2", d.label, nullptr, [&](PutWriter& w) {
    for (int64_t s = 0; s < sv.n; ++s) {
      if (!ntok[static_cast<size_t>(s)]) continue;
      const int64_t relay = sv.relay(me, s);
      size_t first = 0;  // records of lower-ranked sources of the same relay come first
      for (int64_t r = 0; r < me; ++r)
        if (sv.relay(r, s) == relay) first += static_cast<size_t>(ntok_from(r, s));
      auto* out = static_cast<unsigned char*>(w.dest(static_cast<int>(c.phys(relay)), 0, first * rec,
                                                     static_cast<size_t>(ntok[static_cast<size_t>(s)]) * rec));
      for (int64_t t = 0; t < c.BS; ++t) {
        if (!to_server[static_cast<size_t>(t * sv.n + s)]) continue;
        std::memset(out, 0, rl.row_off());
        const int32_t tok = static_cast<int32_t>(t);
        std::memcpy(out, &tok, 4);
        for (int64_t k = 0; k < K; ++k) {
          int32_t id = -1;
          if (c.sel(t, k)) {
            const int32_t g = c.ids[static_cast<size_t>(t * K + k)];
            if (sv.of(c.moe_rank_of(g)) == s) id = g;
          }
          std::memcpy(out + rl.ids_off() + 4 * static_cast<size_t>(k), &id, 4);
          std::memcpy(out + rl.w_off() + 4 * static_cast<size_t>(k), &d.weights[t * K + k], 4);
        }
        if (c.token_on[static_cast<size_t>(t)])
          for (int64_t sh = 0; sh < S; ++sh) {
            const int32_t on = sv.of(c.shared_dest(me, sh)) == s;
            std::memcpy(out + rl.shared_off() + 4 * static_cast<size_t>(sh), &on, 4);
          }
        float scale;
        d.make_row(t, 0, out + rl.row_off(), &scale);
        std::memcpy(out + rl.scale_off(), &scale, 4);
        out += rec;
      }
    }
  });

  // Step 2: relays write rows into their final places on the expert ranks of their server.
  Step s2;
  s2.transport = d.ep;
  s2.members = c.members();
  s2.waits_us = c.waits_us;
  const size_t A = static_cast<size_t>(sinks.capacity);
  s2.recv = {RecvRegion{sinks.expand_x, A * d.row_bytes}, RecvRegion{sinks.dynamic_scales, A * 4},
             RecvRegion{sinks.assist, A * 12}, RecvRegion{sinks.expand_scales, A * 4}};
  s2.run("dispatch_v2", d.label, nullptr, [&](PutWriter& w) {
    const int64_t srv = sv.of(me);
    const unsigned char* p = stage;
    // next[(dst - first rank of server) * L + e]: the next row of block (e, src) on dst
    const int64_t base = srv * sv.P, nloc = sv.size(srv);
    std::vector<int64_t> next(static_cast<size_t>(nloc * L));
    for (int64_t src : my_sources) {
      for (int64_t i = 0; i < nloc; ++i) {
        const int64_t dst = base + i;
        const int64_t nblk = dst < c.Sr ? 1 : L;
        for (int64_t e = 0; e < nblk; ++e) {
          int64_t off = 0;
          for (int64_t e2 = 0; e2 < e; ++e2)
            for (int64_t r = 0; r < W; ++r) off += counts_from(r)[dst * L + e2];
          for (int64_t r = 0; r < src; ++r) off += counts_from(r)[dst * L + e];
          next[static_cast<size_t>(i * L + e)] = off;
        }
      }
      auto emit = [&](const unsigned char* r, int64_t dst, int64_t e, int64_t kk, float wgt) {
        const int peer = c.phys(dst);
        const size_t pos = static_cast<size_t>(next[static_cast<size_t>((dst - base) * L + e)]++);
        std::memcpy(w.dest(peer, 0, pos * d.row_bytes, d.row_bytes), r + rl.row_off(), d.row_bytes);
        std::memcpy(w.dest(peer, 1, pos * 4, 4), r + rl.scale_off(), 4);
        int32_t tri[3] = {static_cast<int32_t>(src), 0, static_cast<int32_t>(kk)};
        std::memcpy(&tri[1], r, 4);
        std::memcpy(w.dest(peer, 2, pos * 12, 12), tri, 12);
        std::memcpy(w.dest(peer, 3, pos * 4, 4), &wgt, 4);
      };
      for (int32_t j = 0; j < ntok_from(src, srv); ++j, p += rec) {
        for (int64_t k = 0; k < K; ++k) {
          int32_t id;
          std::memcpy(&id, p + rl.ids_off() + 4 * static_cast<size_t>(k), 4);
          if (id < 0) continue;
          float wgt;
          std::memcpy(&wgt, p + rl.w_off() + 4 * static_cast<size_t>(k), 4);
          emit(p, c.moe_rank_of(id), id % L, k, wgt);
        }
        for (int64_t sh = 0; sh < S; ++sh) {
          int32_t on;
          std::memcpy(&on, p + rl.shared_off() + 4 * static_cast<size_t>(sh), 4);
          if (on) emit(p, c.shared_dest(src, sh), 0, K + sh, 1.0f);
        }
      }
    }
  });

  DispatchCounts out;
  const int64_t nblk = c.local_experts();
  out.cnt.assign(static_cast<size_t>(nblk * W), 0);
  for (int64_t e = 0; e < nblk; ++e)
    for (int64_t r = 0; r < W; ++r) {
      const int64_t n = counts_from(r)[me * L + e];
      out.cnt[static_cast<size_t>(e * W + r)] = n;
      out.rows += n;
    }
  return out;
}

void hierarchy_combine(const CombineCtx& cc, uint16_t* out) {
  const core::EpConfig& c = cc.cfg;
  const int64_t W = c.W, K = c.K, H = c.H, SL = c.slots(), me = c.rank;
  const DType dt = c.dtype;
  const Servers sv(W, cc.ep->ranks_per_server());
  const size_t row = static_cast<size_t>(H) * 2;
  const std::vector<int64_t> my_sources = sv.sources_of(me);
  auto reduce = [&](uint16_t* dst, const std::vector<core::RowTerm>& terms) {
    if (dt == DType::kBFloat16)
      core::reduce_terms_bf16(dst, terms.data(), static_cast<int>(terms.size()), H);
    else
      core::reduce_terms_fp16(dst, terms.data(), static_cast<int>(terms.size()), H);
  };
  auto src_index = [&](int64_t r) {
    return static_cast<size_t>(std::lower_bound(my_sources.begin(), my_sources.end(), r) - my_sources.begin());
  };

  // Step 1: expert rows (with weights) to the relay of their source in this server.
  Step s1;
  s1.transport = cc.ep;
  s1.members = c.members();
  s1.waits_us = c.waits_us;
  s1.cfg = &c;
  s1.extra_uniform = {{"comm_quant_mode", 0}, {"ranks per server", sv.P}};
  put_pod<int64_t>(s1.payload, c.BS);
  const size_t nslots = my_sources.size() * static_cast<size_t>(c.max_bs * SL);
  // The rows (whole rows apart, so the sums read them aligned), their weights, and which slots came.
  auto* stage = static_cast<unsigned char*>(cc.ep->scratch(6, std::max<size_t>(nslots * row, 1)));
  auto* weights = static_cast<float*>(cc.ep->scratch(10, std::max<size_t>(nslots * 4, 1)));
  auto* present = static_cast<uint8_t*>(cc.ep->scratch(7, std::max<size_t>(nslots, 1)));
  std::memset(present, 0, nslots);  // before wave 1: peers write only after it
  s1.recv = {RecvRegion{stage, nslots * row}, RecvRegion{present, nslots}, RecvRegion{weights, nslots * 4}};
  auto bs_of = [&](const Step& st, int64_t r) {
    int64_t v;
    std::memcpy(&v, st.payload_of(st.index_of(c.phys(r))), sizeof(v));
    return v;
  };
  s1.run("combine_v2", cc.label, nullptr, [&](PutWriter& w) {
    for (int64_t i = 0; i < cc.own_rows; ++i) {
      const int64_t src = cc.triple(i, 0), tok = cc.triple(i, 1), kk = cc.triple(i, 2);
      if (tok >= bs_of(s1, src))
        throw InvalidArgument(detail::str_cat(cc.label, "combine_v2: assist_info_for_combine row ", i, " names token ", tok, " of rank ", src,
                                              " which has BS=", bs_of(s1, src), " (pass dispatch_v2's outputs unchanged)"));
      const int64_t relay = sv.relay(src, sv.of(me));
      // The relay's index of `src` among its sources.
      int64_t idx = 0;
      for (int64_t r = 0; r < src; ++r)
        if (sv.relay(r, sv.of(me)) == relay) ++idx;
      const size_t at = (static_cast<size_t>(idx * c.max_bs + tok) * static_cast<size_t>(SL) + static_cast<size_t>(kk));
      std::memcpy(w.dest(c.phys(relay), 0, at * row, row), cc.expand_x + i * H, row);
      const float wgt = core::at1<float>(cc.args.expand_scales, i);
      std::memcpy(w.dest(c.phys(relay), 2, at * 4, 4), &wgt, 4);
      *static_cast<uint8_t*>(w.dest(c.phys(relay), 1, at, 1)) = 1;
    }
  });

  // Step 2: one pre-reduced row per (token, server) back to the source.
  Step s2;
  s2.transport = cc.ep;
  s2.members = c.members();
  s2.waits_us = c.waits_us;
  const size_t mine = static_cast<size_t>(c.BS * sv.n);
  auto* parts = static_cast<uint16_t*>(cc.ep->scratch(8, std::max<size_t>(mine * row, 1)));
  auto* have = static_cast<uint8_t*>(cc.ep->scratch(9, std::max<size_t>(mine, 1)));
  std::memset(have, 0, mine);
  s2.recv = {RecvRegion{parts, mine * row}, RecvRegion{have, mine}};
  s2.run("combine_v2", cc.label, nullptr, [&](PutWriter& w) {
    const int64_t srv = sv.of(me);
    std::vector<core::RowTerm> terms;
    for (int64_t src : my_sources) {
      const size_t si = src_index(src);
      const int64_t bs = bs_of(s1, src);
      for (int64_t t = 0; t < bs; ++t) {
        // y * w for the present slots in slot order, summed in fp32 and rounded to the dtype
        terms.clear();
        for (int64_t kk = 0; kk < SL; ++kk) {
          const size_t at = (si * static_cast<size_t>(c.max_bs) + static_cast<size_t>(t)) * static_cast<size_t>(SL) + static_cast<size_t>(kk);
          if (!present[at]) continue;
          terms.push_back({reinterpret_cast<const uint16_t*>(stage + at * row), weights[at], true});
        }
        if (terms.empty()) continue;
        const size_t at = static_cast<size_t>(t * sv.n + srv);
        auto* dst = static_cast<uint16_t*>(w.dest(c.phys(src), 0, at * row, row));
        reduce(dst, terms);
        *static_cast<uint8_t*>(w.dest(c.phys(src), 1, at, 1)) = 1;
      }
    }
  });

  // Source: partials in server order, then copy/const experts in k order, then shared_expert_x.
  // Tokens whose terms are all rows (no const expert; shared_expert_x in rows) take the chunked
  // kernel, the others the general loop; both round the same way.
  std::vector<uint16_t> ori_storage, sx_storage;
  const TensorView& ox = cc.args.ori_x;
  const uint16_t* ori = ox.defined() ? core::contiguous_rows(ox, ori_storage) : nullptr;
  const uint16_t* sx = shared_x_rows(cc, sx_storage);
  const bool sx_rows = !cc.args.shared_expert_x.defined() || sx;
  std::vector<float> acc(static_cast<size_t>(H));
  std::vector<core::RowTerm> terms;
  for (int64_t t = 0; t < c.BS; ++t) {
    if (!c.token_on[static_cast<size_t>(t)]) continue;
    uint16_t* o = out + t * H;
    terms.clear();
    for (int64_t s = 0; s < sv.n; ++s) {
      const size_t at = static_cast<size_t>(t * sv.n + s);
      if (have[at]) terms.push_back({parts + at * static_cast<size_t>(H), 1.f, false});
    }
    const size_t n_parts = terms.size();
    bool simple = sx_rows;
    for (int64_t k = 0; k < K && simple; ++k) {
      if (!c.entry_on[static_cast<size_t>(t * K + k)]) continue;
      const int64_t id = c.ids[static_cast<size_t>(t * K + k)];
      const core::ExpertKind kind = c.classify(id);
      if (kind == core::ExpertKind::kCopy)
        terms.push_back({ori + t * H, core::at2<float>(cc.args.expert_scales, t, k), true});
      else if (kind == core::ExpertKind::kConst)
        simple = false;
    }
    if (simple) {
      if (sx) terms.push_back({sx + t * H, 1.f, false});
      reduce(o, terms);
      continue;
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    float* a = acc.data();
    for (size_t i = 0; i < n_parts; ++i) {
      if (dt == DType::kBFloat16)
        core::add_bf16(a, terms[i].row, H);
      else
        core::add_fp16(a, terms[i].row, H);
    }
    for (int64_t k = 0; k < K; ++k) {
      if (!c.entry_on[static_cast<size_t>(t * K + k)]) continue;
      const int64_t id = c.ids[static_cast<size_t>(t * K + k)];
      const core::ExpertKind kind = c.classify(id);
      if (kind == core::ExpertKind::kCopy || kind == core::ExpertKind::kConst)
        add_special_term(cc, t, id, core::at2<float>(cc.args.expert_scales, t, k), a);
    }
    add_shared_x(cc, t, a);
    if (dt == DType::kBFloat16)
      core::store_bf16(o, a, H);
    else
      for (int64_t h = 0; h < H; ++h) o[h] = core::float_to_fp16(a[h]);
  }
}

}  // namespace moedist::ops
