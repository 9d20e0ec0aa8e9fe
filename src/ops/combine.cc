// combine_v2: validation, the TP reduce-scatter (peer partial sums of own rows), the EP step of the
// chosen algorithm with the weighted reduction fused into the read, zeros for inactive tokens.
#include <cmath>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>

#include "core/half.h"
#include "core/quant.h"
#include "moedist/ops.h"
#include "ops/algorithms.h"
#include "ops/collective.h"
#include "transport/window/heap.h"

namespace moedist::ops {

namespace {
void fail_step(const std::shared_ptr<Transport>& t, std::vector<int> members, const char* op, const std::string& label,
               const std::string& msg, const char* phase = "") {
  reject_step(t, std::move(members), op, phase, label, msg);
}

// The combine metadata must be what a dispatch on this group returned to this rank.
void check_metadata(Transport& ep, const core::EpConfig& c, const CombineArgs& a, const core::CombineCounts& counts, const std::string& label) {
  if (!was_dispatched(ep, combine_metadata_digest(c, a, counts)))
    throw InvalidArgument(detail::str_cat(label, "combine_v2: assist_info_for_combine, ep_send_counts", c.tp == 2 ? ", tp_send_counts" : "",
                                          ", expert_ids and x_active_mask are not those of any of the last ", CallState::kDigests,
                                          " dispatch_v2 calls of this rank on group \"", a.group_ep, "\" (pass dispatch_v2's outputs and ",
                                          "the same expert_ids and mask unchanged; otherwise combine would read rows nothing wrote)"));
}
}  // namespace

// One combine: begin() validates, runs the TP step and sends (with `split`, only begins the EP exchange),
// finish() waits for the peers' rows and reduces. Heap-held and never moved (the context refers to its
// members), so that combine_setup can keep it between the two halves.
struct CombineOp {
  explicit CombineOp(const CombineArgs& args) : a(args) {}
  void begin(bool want_split, const char* op_name);
  Tensor finish();

  CombineArgs a;
  const char* op = "combine_v2";
  std::shared_ptr<Transport> ep, tpt;
  std::string label;
  core::EpConfig c;
  core::CombineCounts counts;
  std::vector<uint16_t> xs, partial;
  std::unique_ptr<CombineCtx> cctx;
  Tensor out;
  CombineSplit split;
  bool split_open = false;
};

void CombineOp::begin(bool want_split, const char* op_name) {
  op = op_name;
  const std::string label0 = detail::str_cat("[rank ", a.ep_rank_id, "/", a.ep_world_size, "] ");
  ep = lookup(a.group_ep, a.ep_rank_id, a.ep_world_size, op, "ep_world_size", label0);
  label = detail::str_cat("[rank ", a.ep_rank_id, "/", a.ep_world_size, "] ");
  if (a.tp_world_size == 2) tpt = lookup(a.group_tp, a.tp_rank_id, 2, op, "tp_world_size", label0);

  try {
    c = core::resolve_combine(a);
    counts = core::combine_counts(c, a);
    check_combine_fits(c);
    check_members_alive(c, *ep, op, label);
    check_metadata(*ep, c, a, counts, label);
  } catch (const Error& e) {
    const std::exception_ptr original = std::current_exception();
    if (tpt) fail_step(tpt, {0, 1}, op, label, e.what(), "TP");
    fail_step(ep, fallback_members(a.elastic_info, a.ep_world_size, a.ep_rank_id), op, label, e.what());
    std::rethrow_exception(original);
  }

  const uint16_t* x = core::contiguous_rows(a.expand_x, xs);
  cctx.reset(new CombineCtx{a, c, ep, label});
  CombineCtx& cc = *cctx;
  cc.quant = a.comm_quant_mode == 2;
  cc.slot_bytes = cc.quant ? static_cast<size_t>(core::comm_quant_row_bytes(c.H)) : static_cast<size_t>(c.H) * 2;
  cc.own_rows = counts.own_rows;
  cc.expand_x = x;

  const size_t row = static_cast<size_t>(c.H) * 2;
  if (tpt) {
    // Reduce-scatter within the TP pair: rows [own, own + peer) are partial sums for the peer's rows.
    Step t;
    t.transport = tpt;
    t.members = {0, 1};
    t.phase = "TP";
    t.extra_uniform = {{"ep_rank_id (TP peers share it)", a.ep_rank_id}};
    put_pod<int64_t>(t.payload, counts.own_rows);
    put_pod<int64_t>(t.payload, counts.peer_rows);
    const int peer = static_cast<int>(1 - c.tp_rank);
    uint16_t* recv = nullptr;
    const uint64_t tp_steps0 = steps_started();
    try {
      recv = static_cast<uint16_t*>(tpt->scratch(5, static_cast<size_t>(counts.own_rows) * row));
      t.recv = {RecvRegion{recv, static_cast<size_t>(counts.own_rows) * row}};
      t.run(op, label, nullptr, [&](PutWriter& w) {
        int64_t p[2];
        std::memcpy(p, t.payload_of(t.index_of(peer)), sizeof(p));
        if (p[0] != counts.peer_rows || p[1] != counts.own_rows)
          throw InvalidArgument(detail::str_cat(label, op, ": tp_send_counts disagree with the TP peer's (this rank: own ", counts.own_rows,
                                                ", peer ", counts.peer_rows, "; peer: own ", p[0], ", peer ", p[1], ")"));
        if (counts.peer_rows)
          std::memcpy(w.dest(peer, 0, 0, static_cast<size_t>(counts.peer_rows) * row), x + counts.own_rows * c.H,
                      static_cast<size_t>(counts.peer_rows) * row);
      });
    } catch (const std::exception& e) {
      if (steps_started() == tp_steps0) fail_step(tpt, {0, 1}, op, label, e.what(), "TP");
      fail_step(ep, c.members(), op, label, detail::str_cat("its TP step failed: ", e.what()));
      throw;
    }
    partial.assign(recv, recv + counts.own_rows * c.H);
    cc.tp_partial = partial.data();
  }

  const uint64_t steps0 = steps_started();
  try {
    out = Tensor(c.dtype, {c.BS, c.H}, ep->alloc(static_cast<size_t>(c.BS * c.H) * 2));
    // Inactive tokens' rows are zeros; every active row is written by the algorithm.
    for (int64_t t = 0; t < c.BS; ++t)
      if (!c.token_on[static_cast<size_t>(t)]) std::memset(out.data_as<uint16_t>() + t * c.H, 0, row);
    if (c.alg == core::Alg::kHierarchy) {
      hierarchy_combine(cc, out.data_as<uint16_t>());
    } else if (want_split && !tpt) {  // split where the exchange is one EP step: fullmesh without TP
      split.step.split = true;
      fullmesh_combine_send(cc, split);
      split_open = true;
    } else {
      fullmesh_combine(cc, out.data_as<uint16_t>());
    }
  } catch (const std::exception& e) {
    // Failed before its exchange (e.g. out of memory): the peers must hear of it, not wait for it.
    if (steps_started() == steps0) fail_step(ep, c.members(), op, label, e.what());
    if (ep->abandoned()) transport::keep_forever(std::make_shared<Tensor>(out));  // a slow peer may still write
    throw;
  }
}

Tensor CombineOp::finish() {
  if (split_open) {
    split_open = false;
    fullmesh_combine_reduce(*cctx, split, out.data_as<uint16_t>());
  }
  ++ep->call_state().calls_completed;
  return out;
}


namespace {
Pending<CombineOp>& open_combines() {
  static Pending<CombineOp> p;
  return p;
}
}  // namespace

uint64_t combine_setup(const CombineArgs& a) {
  auto op = std::make_unique<CombineOp>(a);
  op->begin(true, "combine_setup");
  return open_combines().add(std::move(op));
}

Tensor combine_teardown(uint64_t handle) { return open_combines().take(handle, "combine_teardown")->finish(); }

Tensor combine_v2(const CombineArgs& a) {
  CombineOp op(a);
  op.begin(false, "combine_v2");
  return op.finish();
}

namespace {
// x = round(c + r), rstd = 1 / sqrt(sum(x*x) / H + eps), y = round((x * rstd) * gamma): float32, h ascending,
// each product rounded before the add (the build forbids contraction), as the reference.
void add_rms_norm_rows(const core::EpConfig& c, const uint16_t* combined, const CombineAddRmsNormArgs& a, uint16_t* y,
                       float* rstd, uint16_t* x) {
  const int64_t H = c.H;
  const DType dt = c.dtype;
  const float eps = static_cast<float>(a.norm_eps);
  const TensorView& r = a.residual_x;
  std::vector<float> g(static_cast<size_t>(H));
  for (int64_t h = 0; h < H; ++h) g[static_cast<size_t>(h)] = core::half_to_float(dt, core::at1<uint16_t>(a.gamma, h));
  for (int64_t t = 0; t < c.BS; ++t) {
    uint16_t* xt = x + t * H;
    float sum = 0.f;
    for (int64_t h = 0; h < H; ++h) {
      const uint16_t rv = r.dim() == 3 ? *static_cast<const uint16_t*>(r.at({t, 0, h})) : core::at2<uint16_t>(r, t, h);
      xt[h] = core::float_to_half(dt, core::half_to_float(dt, combined[t * H + h]) + core::half_to_float(dt, rv));
      const float xf = core::half_to_float(dt, xt[h]);
      const float sq = xf * xf;
      sum = sum + sq;
    }
    const float mean = sum / static_cast<float>(H);
    const float rs = 1.f / std::sqrt(mean + eps);
    rstd[t] = rs;
    for (int64_t h = 0; h < H; ++h) {
      const float n = core::half_to_float(dt, xt[h]) * rs;
      y[t * H + h] = core::float_to_half(dt, n * g[static_cast<size_t>(h)]);
    }
  }
}
}  // namespace

CombineAddRmsNormResult combine_add_rms_norm(const CombineAddRmsNormArgs& a) {
  const char* op = "combine_add_rms_norm";
  const CombineArgs& ca = a.combine;
  const std::string label = detail::str_cat("[rank ", ca.ep_rank_id, "/", ca.ep_world_size, "] ");
  auto ep = lookup(ca.group_ep, ca.ep_rank_id, ca.ep_world_size, op, "ep_world_size", label);
  core::EpConfig c;
  try {
    c = core::resolve_combine(ca);
    core::combine_counts(c, ca);
    core::check_add_rms_norm(c, a);  // before any byte moves: a rejection reaches the peers below
  } catch (const Error& e) {
    const std::exception_ptr original = std::current_exception();
    if (ca.tp_world_size == 2) {
      try {
        fail_step(lookup(ca.group_tp, ca.tp_rank_id, 2, op, "tp_world_size", label), {0, 1}, op, label, e.what());
      } catch (...) {
      }
    }
    fail_step(ep, fallback_members(ca.elastic_info, ca.ep_world_size, ca.ep_rank_id), op, label, e.what());
    std::rethrow_exception(original);
  }
  Tensor combined = ops::combine_v2(ca);
  CombineAddRmsNormResult out;
  out.y = Tensor(c.dtype, {c.BS, 1, c.H});
  out.rstd = Tensor(DType::kFloat32, {c.BS, 1, 1});
  out.x = Tensor(c.dtype, {c.BS, 1, c.H});
  add_rms_norm_rows(c, combined.data_as<uint16_t>(), a, out.y.data_as<uint16_t>(), out.rstd.data_as<float>(),
                    out.x.data_as<uint16_t>());
  return out;
}

}  // namespace moedist::ops

namespace moedist {
Tensor combine_v2(const CombineArgs& args) { return ops::combine_v2(args); }
uint64_t combine_setup(const CombineArgs& args) { return ops::combine_setup(args); }
Tensor combine_teardown(uint64_t handle) { return ops::combine_teardown(handle); }
CombineAddRmsNormResult combine_add_rms_norm(const CombineAddRmsNormArgs& args) { return ops::combine_add_rms_norm(args); }
}  // namespace moedist
