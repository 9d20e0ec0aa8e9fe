// dispatch_v2: validation, output allocation, the EP step of the chosen algorithm, the TP all-gather,
// and the counts (ep_recv_counts, expert_token_nums, tp_recv_counts).
#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <exception>

#include "core/half.h"
#include "core/kernels.h"
#include "core/quant.h"
#include "moedist/ops.h"
#include "ops/algorithms.h"
#include "ops/collective.h"
#include "transport/window/heap.h"

namespace moedist::ops {

void DispatchCtx::make_row(int64_t t, int64_t scale_row, unsigned char* dst, float* scale) const {
  const int64_t H = cfg.H;
  const uint16_t* xr = x + t * H;
  if (quant) {
    core::dynamic_quant_row_fast(cfg.dtype, xr, smooth ? smooth + scale_row * H : nullptr, H, reinterpret_cast<int8_t*>(dst), scale);
  } else {
    std::memcpy(dst, xr, static_cast<size_t>(H) * 2);
    *scale = 0.f;
  }
}

std::vector<int32_t> send_counts(const DispatchCtx& d) {
  const core::EpConfig& c = d.cfg;
  std::vector<int32_t> cnt(static_cast<size_t>(c.W * c.L), 0);
  for (int64_t t = 0; t < c.BS; ++t) {
    for (int64_t k = 0; k < c.K; ++k)
      if (c.sel(t, k)) {
        const int64_t g = c.ids[static_cast<size_t>(t * c.K + k)];
        ++cnt[static_cast<size_t>(c.moe_rank_of(g) * c.L + g % c.L)];
      }
    if (c.token_on[static_cast<size_t>(t)])
      for (int64_t s = 0; s < c.S; ++s) ++cnt[static_cast<size_t>(c.shared_dest(c.rank, s) * c.L)];
  }
  return cnt;
}

namespace {

std::string label_of(int64_t rank, int64_t world) { return detail::str_cat("[rank ", rank, "/", world, "] "); }

template <typename T>
const T* contiguous(const TensorView& v, std::vector<T>& storage) {
  if (!v.defined()) return nullptr;
  if (v.is_contiguous()) return static_cast<const T*>(v.data);
  const int64_t n = v.size(0), m = v.size(1);
  storage.resize(static_cast<size_t>(n * m));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) storage[static_cast<size_t>(i * m + j)] = core::at2<T>(v, i, j);
  return storage.data();
}

}  // namespace

// One dispatch: begin() validates and sends (with `split`, only begins the EP exchange), finish() waits for
// the peers' rows, builds the counts and runs the TP step. Heap-held and never moved (the context refers
// to its members), so that dispatch_setup can keep it between the two halves.
struct DispatchOp {
  explicit DispatchOp(const DispatchArgs& args) : a(args) {}
  void begin(bool want_split, const char* op_name);
  DispatchResult finish();

  DispatchArgs a;
  const char* op = "dispatch_v2";
  std::shared_ptr<Transport> ep, tpt;
  std::string label;
  core::EpConfig c;
  std::unique_ptr<DispatchCtx> dctx;
  std::vector<uint16_t> xs;
  std::vector<float> ss, ws;
  DispatchResult res;
  RowSinks out;
  DispatchCounts got;
  Step step;  // the begun EP exchange (split)
};

void DispatchOp::begin(bool want_split, const char* op_name) {
  op = op_name;
  const std::string label0 = detail::str_cat("[rank ", a.ep_rank_id, "/", a.ep_world_size, "] ");
  ep = lookup(a.group_ep, a.ep_rank_id, a.ep_world_size, op, "ep_world_size", label0);
  label = label_of(a.ep_rank_id, a.ep_world_size);
  if (a.tp_world_size == 2) tpt = lookup(a.group_tp, a.tp_rank_id, 2, op, "tp_world_size", label0);

  // Validate; a rank that fails still takes part once, so its peers fail at once, naming it.
  try {
    c = core::resolve_dispatch(a);
    check_dispatch_fits(c, *ep, tpt.get());
    check_members_alive(c, *ep, op, label);
  } catch (const Error& e) {
    const std::exception_ptr original = std::current_exception();
    reject_step(ep, fallback_members(a.elastic_info, a.ep_world_size, a.ep_rank_id), op, "", label, e.what());
    if (tpt) reject_step(tpt, {0, 1}, op, "TP", label, e.what());
    std::rethrow_exception(original);
  }

  dctx.reset(new DispatchCtx{a, c, ep, label});
  DispatchCtx& d = *dctx;
  d.quant = a.quant_mode == 2;
  d.row_bytes = static_cast<size_t>(c.H) * (d.quant ? 1 : 2);
  d.x = contiguous<uint16_t>(a.x, xs);
  d.smooth = contiguous<float>(a.scales, ss);
  d.weights = contiguous<float>(a.expert_scales, ws);

  const int64_t A = c.A, H = c.H;
  // Outputs that peers write into come from the transport (shared memory: this rank's window), so every
  // row is written once, straight into its final place. Rows past the received count are not written.
  auto out_tensor = [&](DType dt, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t v : shape) n *= v;
    return Tensor(dt, shape, ep->alloc(static_cast<size_t>(n) * dtype_size(dt)));
  };
  const uint64_t steps0 = steps_started();
  try {
    res.expand_x = out_tensor(d.quant ? DType::kInt8 : c.dtype, {c.tp * A, H});
    res.dynamic_scales = out_tensor(DType::kFloat32, {c.tp * A});
    res.assist_info_for_combine = out_tensor(DType::kInt32, {std::max(c.BS * c.K, 128 * A)});
    res.expert_token_nums = Tensor(DType::kInt64, {c.expert_nums_len()});
    res.ep_recv_counts = Tensor(DType::kInt32, {c.ep_counts_len()});
    res.tp_recv_counts = Tensor(DType::kInt32, {c.tp_world_size_arg});
    res.expand_scales = out_tensor(DType::kFloat32, {A});
    out = RowSinks{static_cast<unsigned char*>(res.expand_x.data()), res.dynamic_scales.data_as<float>(),
                   res.assist_info_for_combine.data_as<int32_t>(), res.expand_scales.data_as<float>(), A};
    // Split where the exchange is one EP step: fullmesh without TP. Otherwise the whole op runs here.
    const bool split = want_split && c.alg == core::Alg::kFullmesh && !tpt;
    got = c.alg == core::Alg::kHierarchy ? hierarchy_dispatch(d, out) : fullmesh_dispatch(d, out, split ? &step : nullptr);
  } catch (const std::exception& e) {
    // Failed before its exchange (e.g. out of memory): the peers must hear of it, not wait for it.
    if (steps_started() == steps0) reject_step(ep, c.members(), op, "", label, e.what());
    if (tpt) reject_step(tpt, {0, 1}, op, "TP", label, "its EP group failed");
    // Given up midway: a slow peer may still be writing rows into these outputs.
    if (ep->abandoned()) transport::keep_forever(std::make_shared<DispatchResult>(res));
    throw;
  }
}

DispatchResult DispatchOp::finish() {
  if (step.split) {
    step.split = false;
    try {
      step.end();
    } catch (const std::exception&) {
      if (tpt) reject_step(tpt, {0, 1}, op, "TP", label, "its EP group failed");
      throw;
    }
  }
  const int64_t A = c.A;
  const DispatchCtx& d = *dctx;
  // Per-row scalars past the rows are zeros (cheap, and keeps them deterministic).
  std::memset(out.dynamic_scales + got.rows, 0, static_cast<size_t>(c.tp * A - got.rows) * 4);
  std::memset(out.expand_scales + got.rows, 0, static_cast<size_t>(A - got.rows) * 4);

  // Counts: inclusive prefix over (e, r), expert-major; expert_token_nums by type.
  const int64_t nblk = c.local_experts();
  auto* epc = res.ep_recv_counts.data_as<int32_t>();
  auto* etn = res.expert_token_nums.data_as<int64_t>();
  int64_t run = 0;
  for (int64_t e = 0; e < nblk; ++e) {
    int64_t per = 0;
    for (int64_t r = 0; r < c.W; ++r) {
      const int64_t n = got.cnt[static_cast<size_t>(e * c.W + r)];
      run += n;
      per += n;
      epc[e * c.W + r] = static_cast<int32_t>(run);
    }
    etn[e] = a.expert_token_nums_type == 0 ? run : per;
  }
  MOEDIST_ASSERT(run == got.rows, "counted ", run, " rows, received ", got.rows);
  if (c.tp_world_size_arg == 1) res.tp_recv_counts.data_as<int32_t>()[0] = static_cast<int32_t>(run);

  if (tpt) {
    // TP all-gather: [own rows; peer's rows]; the peer's cumulative counts go to [W, 2W).
    Step t;
    t.transport = tpt;
    t.members = {0, 1};
    t.phase = "TP";
    t.extra_uniform = {{"quant_mode", a.quant_mode}, {"ep_rank_id (TP peers share it)", a.ep_rank_id}};
    put_pod<int64_t>(t.payload, run);
    for (int64_t r = 0; r < c.W; ++r) put_pod<int32_t>(t.payload, epc[r]);
    MOEDIST_ASSERT(t.payload.size() == tp_counts_bytes(c));
    unsigned char* peer_x = out.expand_x + static_cast<size_t>(run) * d.row_bytes;
    float* peer_s = out.dynamic_scales + run;
    const size_t room = static_cast<size_t>(c.tp * A - run);
    if (!tpt->recv_anywhere()) {
      peer_x = static_cast<unsigned char*>(tpt->scratch(0, room * d.row_bytes));
      peer_s = static_cast<float*>(tpt->scratch(1, room * 4));
    }
    t.recv = {RecvRegion{peer_x, room * d.row_bytes}, RecvRegion{peer_s, room * 4}};
    const int peer = static_cast<int>(1 - c.tp_rank);
    t.run(op, label, nullptr, [&](PutWriter& w) {
      if (run == 0) return;
      std::memcpy(w.dest(peer, 0, 0, static_cast<size_t>(run) * d.row_bytes), out.expand_x, static_cast<size_t>(run) * d.row_bytes);
      std::memcpy(w.dest(peer, 1, 0, static_cast<size_t>(run) * 4), out.dynamic_scales, static_cast<size_t>(run) * 4);
    });
    int64_t prow;
    std::memcpy(&prow, t.payload_of(t.index_of(peer)), sizeof(prow));
    const unsigned char* pc = t.payload_of(t.index_of(peer)) + sizeof(int64_t);
    std::memcpy(epc + c.W, pc, static_cast<size_t>(c.W) * 4);
    if (!tpt->recv_anywhere()) {
      std::memcpy(out.expand_x + static_cast<size_t>(run) * d.row_bytes, peer_x, static_cast<size_t>(prow) * d.row_bytes);
      std::memcpy(out.dynamic_scales + run, peer_s, static_cast<size_t>(prow) * 4);
    }
    etn[0] = run + prow;
    res.tp_recv_counts.data_as<int32_t>()[c.tp_rank] = static_cast<int32_t>(run);
    res.tp_recv_counts.data_as<int32_t>()[peer] = static_cast<int32_t>(prow);
  }
  remember_dispatch(*ep, metadata_digest(c, out.assist, run, epc, nblk * c.W, tpt ? res.tp_recv_counts.data_as<int32_t>() : nullptr));
  ++ep->call_state().calls_completed;
  return res;
}


namespace {
Pending<DispatchOp>& open_dispatches() {
  static Pending<DispatchOp> p;
  return p;
}
}  // namespace

uint64_t dispatch_setup(const DispatchArgs& a) {
  auto op = std::make_unique<DispatchOp>(a);
  op->begin(true, "dispatch_setup");
  return open_dispatches().add(std::move(op));
}

DispatchResult dispatch_teardown(uint64_t handle) { return open_dispatches().take(handle, "dispatch_teardown")->finish(); }

DispatchResult dispatch_v2(const DispatchArgs& a) {
  DispatchOp d(a);
  d.begin(false, "dispatch_v2");
  return d.finish();
}

}  // namespace moedist::ops

namespace moedist {
DispatchResult dispatch_v2(const DispatchArgs& args) { return ops::dispatch_v2(args); }
uint64_t dispatch_setup(const DispatchArgs& args) { return ops::dispatch_setup(args); }
DispatchResult dispatch_teardown(uint64_t handle) { return ops::dispatch_teardown(handle); }
}  // namespace moedist
