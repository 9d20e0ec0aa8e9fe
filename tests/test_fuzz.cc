// Fuzz: random argument sets for dispatch_v2 / combine_v2 on in-process thread groups. Each case
// starts from a valid configuration (world size, experts, shared/zero/copy/const experts, masks,
// quantization, algorithm, ragged batches) and applies a few random mutations: shapes, dtypes,
// strides, null data, counts and ids, combine metadata (assist_info_for_combine, ep_send_counts,
// expert_ids) corrupted between dispatch and combine, and arguments that differ across ranks.
// Every rank's outcome must be success or moedist::InvalidArgument / Unsupported / TransportError /
// Timeout: never a crash (the sanitizer builds catch memory errors), an internal error ("internal
// error, please report"), another exception type, or a hang (a case that does not end within its
// deadline fails the run).
// Reproducible: MOEDIST_FUZZ_SEED (default fixed) and MOEDIST_FUZZ_CASES choose the cases; a failure
// prints the seed, the case index and its mutations; MOEDIST_FUZZ_CASE=i runs case i alone. An exception
// of the harness itself fails its case the same way, and the later cases still run.
// MOEDIST_FUZZ_TIMEOUT_MS sets the groups' deadline (default 500 ms; a few ms makes calls time out
// at every stage of an exchange).
// A third of the cases have one rank call combine_v2 while its peers call dispatch_v2 (every rank
// must then fail cleanly); MOEDIST_FUZZ_MIXED_OPS=0 leaves them out.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/half.h"
#include "moedist/moedist.h"

namespace moedist::test {
namespace {

const bool kEnvCleared = [] {
  unsetenv("HCCL_INTRA_PCIE_ENABLE");
  unsetenv("HCCL_INTRA_ROCE_ENABLE");
  return true;
}();

uint64_t env_u64(const char* name, uint64_t dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : dflt;
}

#if defined(MOEDIST_TSAN)
constexpr uint64_t kDefaultCases = 300;
#elif defined(MOEDIST_ASAN)
constexpr uint64_t kDefaultCases = 1000;  // the first 1000 of the Release build's cases
#else
constexpr uint64_t kDefaultCases = 1500;
#endif

using Rng = std::mt19937_64;

int64_t pick(Rng& g, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); }
bool chance(Rng& g, double p) { return std::uniform_real_distribution<double>(0, 1)(g) < p; }

// Owns the memory behind every view of a case.
class Arena {
 public:
  template <typename T>
  TensorView view(DType dt, const std::vector<T>& v, std::vector<int64_t> shape) {
    auto p = std::make_shared<std::vector<unsigned char>>(std::max<size_t>(v.size() * sizeof(T), 1));
    if (!v.empty()) std::memcpy(p->data(), v.data(), v.size() * sizeof(T));
    keep_.push_back(p);
    return TensorView(p->data(), dt, std::move(shape));
  }
  // Random bytes behind a random shape / dtype / strides: memory for every element the view can
  // address (strides >= 0), or a small buffer when a dimension is negative.
  TensorView junk(Rng& g, DType dt, std::vector<int64_t> shape, std::vector<int64_t> strides) {
    const size_t es = dtype_size(dt);
    bool negative = false, empty = false;
    for (int64_t s : shape) negative |= s < 0, empty |= s == 0;
    size_t n = 1;
    if (!negative && !empty) {
      if (strides.size() == shape.size()) {
        size_t last = 0;
        for (size_t i = 0; i < shape.size(); ++i)
          last += std::min<size_t>(static_cast<size_t>(shape[i] - 1), size_t{1} << 30) * std::min<size_t>(static_cast<size_t>(strides[i]), size_t{1} << 30);
        n = last + 1;
      } else {
        for (int64_t s : shape) n = __builtin_mul_overflow(n, static_cast<size_t>(s), &n) ? SIZE_MAX : n;
      }
    }
    if (n > (size_t{1} << 24) / es) {  // no more memory than a case needs: a small view instead
      shape = {1};
      strides.clear();
      n = 1;
    }
    auto p = std::make_shared<std::vector<unsigned char>>(std::max<size_t>(n * es, 16));
    for (auto& b : *p) b = static_cast<unsigned char>(g());
    keep_.push_back(p);
    return TensorView(p->data(), dt, std::move(shape), std::move(strides));
  }

 private:
  std::vector<std::shared_ptr<std::vector<unsigned char>>> keep_;
};

const DType kAllTypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32, DType::kInt8, DType::kInt32, DType::kInt64, DType::kBool};

// A random replacement for a tensor argument: another shape, dtype or strides, or null data.
TensorView mutate_view(Rng& g, Arena& ar, const TensorView& v, std::string& log, const char* name) {
  std::vector<int64_t> shape = v.shape;
  std::vector<int64_t> strides;
  DType dt = v.dtype;
  const int what = static_cast<int>(pick(g, 0, 6));
  switch (what) {
    case 0:  // another dtype
      dt = kAllTypes[pick(g, 0, 6)];
      break;
    case 1:  // another number of dimensions
      shape.resize(static_cast<size_t>(pick(g, 0, 3)), 2);
      break;
    case 2:  // one dimension changed (possibly negative, zero or larger)
      if (!shape.empty()) shape[static_cast<size_t>(pick(g, 0, static_cast<int64_t>(shape.size()) - 1))] = pick(g, -2, 9);
      break;
    case 3: {  // strides: padded, broadcast (0) or transposed, or a wrong count
      if (chance(g, 0.2)) {
        strides.assign(static_cast<size_t>(pick(g, 0, 3)), 1);
      } else {
        strides.assign(shape.size(), 1);
        int64_t acc = 1;
        for (size_t i = shape.size(); i-- > 0;) {
          strides[i] = chance(g, 0.15) ? 0 : acc + (chance(g, 0.3) ? pick(g, 1, 3) : 0);
          acc = std::max<int64_t>(strides[i], 1) * std::max<int64_t>(shape[i], 1);
        }
        if (shape.size() == 2 && chance(g, 0.3)) strides = {1, std::max<int64_t>(shape[0], 1)};
      }
      for (int64_t s : shape)
        if (s < 0) strides.clear();
      break;
    }
    case 4: {  // null data
      log += std::string(" ") + name + ":null";
      std::vector<int64_t> sh = chance(g, 0.2) ? std::vector<int64_t>{int64_t{1} << 40, int64_t{1} << 40} : shape;
      return TensorView(nullptr, dt, sh);
    }
    case 5:  // absent
      log += std::string(" ") + name + ":absent";
      return TensorView();
    default:  // same shape, random contents
      break;
  }
  size_t total = dtype_size(dt);
  for (int64_t s : shape) total *= static_cast<size_t>(std::max<int64_t>(s, 1));
  if (total > (size_t{1} << 20)) shape = v.shape;
  log += std::string(" ") + name + ":view" + std::to_string(what);
  return ar.junk(g, dt, shape, strides);
}

struct Base {
  int W = 2, Sr = 0, S = 0, L = 1, E = 2, K = 1, H = 16, Z = 0, C = 0, Q = 0;
  DType dt = DType::kBFloat16;
  int quant = 0, comm_quant = 0, mask = 0, rps = 0;
  bool smooth = false, ragged = false, hierarchy = false, shared_x = false;
  std::vector<int> BS;
  int max_bs = 0;
};

Base random_base(Rng& g) {
  Base b;
  b.W = static_cast<int>(pick(g, 1, 4));
  b.Sr = b.W > 1 && chance(g, 0.25) ? 1 : 0;
  b.S = b.Sr ? 1 : 0;
  b.L = static_cast<int>(pick(g, 1, 3));
  b.E = b.L * (b.W - b.Sr);
  if (chance(g, 0.2)) b.Z = static_cast<int>(pick(g, 1, 2));
  if (chance(g, 0.2)) b.C = static_cast<int>(pick(g, 1, 2));
  if (chance(g, 0.2)) b.Q = static_cast<int>(pick(g, 1, 2));
  b.K = static_cast<int>(pick(g, 1, std::min(b.E + b.Z + b.C + b.Q, 4)));
  const int64_t Hs[] = {1, 7, 16, 32, 33};
  b.H = static_cast<int>(Hs[pick(g, 0, 4)]);
  b.dt = chance(g, 0.5) ? DType::kBFloat16 : DType::kFloat16;
  b.hierarchy = b.W > 1 && chance(g, 0.2);
  b.rps = b.hierarchy ? static_cast<int>(pick(g, 0, 2)) : 0;
  b.quant = chance(g, 0.4) ? 2 : 0;
  b.smooth = b.quant == 2 && !b.hierarchy && chance(g, 0.3);
  b.comm_quant = !b.hierarchy && chance(g, 0.25) ? 2 : 0;
  b.ragged = chance(g, 0.25);
  b.mask = b.ragged ? 0 : static_cast<int>(pick(g, 0, 2));
  b.shared_x = b.Sr == 0 && chance(g, 0.2);
  b.max_bs = static_cast<int>(pick(g, 0, 6));
  for (int r = 0; r < b.W; ++r) b.BS.push_back(b.ragged ? static_cast<int>(pick(g, 0, b.max_bs)) : b.max_bs);
  return b;
}

// One rank's inputs of a valid call.
struct RankIn {
  std::vector<uint16_t> x, shared_x, alpha1, alpha2, const_v;
  std::vector<int32_t> ids;
  std::vector<float> w, smooth;
  std::vector<uint8_t> mask;
};

RankIn random_inputs(Rng& g, const Base& b, int r) {
  RankIn in;
  const int BS = b.BS[static_cast<size_t>(r)];
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int i = 0; i < BS * b.H; ++i) in.x.push_back(core::float_to_half(b.dt, nd(g)));
  const int total = b.E + b.Z + b.C + b.Q;
  for (int t = 0; t < BS; ++t) {
    std::vector<int32_t> all(static_cast<size_t>(total));
    for (int i = 0; i < total; ++i) all[static_cast<size_t>(i)] = i;
    std::shuffle(all.begin(), all.end(), g);
    for (int k = 0; k < b.K; ++k) {
      in.ids.push_back(all[static_cast<size_t>(k)]);
      in.w.push_back(static_cast<float>(pick(g, 1, 8)) / 8.0f);
    }
  }
  if (b.smooth)
    for (int i = 0; i < (b.S + b.E) * b.H; ++i) in.smooth.push_back(0.5f + static_cast<float>(pick(g, 0, 8)) / 8.0f);
  if (b.mask == 1) {
    const int on = static_cast<int>(pick(g, 0, BS));
    for (int t = 0; t < BS; ++t) in.mask.push_back(t < on);
  } else if (b.mask == 2) {
    for (int i = 0; i < BS * b.K; ++i) in.mask.push_back(chance(g, 0.7));
  }
  if (b.shared_x)
    for (int i = 0; i < BS * b.H; ++i) in.shared_x.push_back(core::float_to_half(b.dt, nd(g)));
  for (int i = 0; i < b.Q; ++i) {
    in.alpha1.push_back(core::float_to_half(b.dt, 0.5f));
    in.alpha2.push_back(core::float_to_half(b.dt, 0.25f));
  }
  for (int i = 0; i < b.Q * b.H; ++i) in.const_v.push_back(core::float_to_half(b.dt, nd(g)));
  return in;
}

DispatchArgs dispatch_args(Arena& ar, const Base& b, const RankIn& in, int r, const std::string& group) {
  const int64_t BS = b.BS[static_cast<size_t>(r)];
  DispatchArgs a;
  a.x = ar.view(b.dt, in.x, {BS, b.H});
  a.expert_ids = ar.view(DType::kInt32, in.ids, {BS, b.K});
  a.expert_scales = ar.view(DType::kFloat32, in.w, {BS, b.K});
  if (b.smooth) a.scales = ar.view(DType::kFloat32, in.smooth, {b.S + b.E, b.H});
  if (b.mask == 1) a.x_active_mask = ar.view(DType::kBool, in.mask, {BS});
  if (b.mask == 2) a.x_active_mask = ar.view(DType::kBool, in.mask, {BS, b.K});
  a.group_ep = group;
  a.ep_world_size = b.W;
  a.ep_rank_id = r;
  a.moe_expert_num = b.E;
  a.shared_expert_rank_num = b.Sr;
  a.shared_expert_num = b.S ? b.S : 1;
  a.quant_mode = b.quant;
  a.global_bs = b.ragged ? static_cast<int64_t>(b.max_bs) * b.W : 0;
  a.comm_alg = b.hierarchy ? "hierarchy" : "fullmesh";
  a.zero_expert_num = b.Z;
  a.copy_expert_num = b.C;
  a.const_expert_num = b.Q;
  return a;
}

CombineArgs combine_args(Arena& ar, Rng& g, const Base& b, const RankIn& in, const DispatchArgs& d, const DispatchResult& res) {
  const int64_t BS = d.x.shape.size() == 2 ? d.x.shape[0] : 0;
  CombineArgs a;
  // Expert outputs: random values of the token dtype, as many rows as dispatch returned.
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t rows = res.expand_x.shape()[0];
  std::vector<uint16_t> y(static_cast<size_t>(rows * b.H));
  for (auto& v : y) v = core::float_to_half(b.dt, nd(g));
  a.expand_x = ar.view(b.dt, y, {rows, b.H});
  a.expert_ids = d.expert_ids;
  a.assist_info_for_combine = res.assist_info_for_combine.view();
  a.ep_send_counts = res.ep_recv_counts.view();
  a.expert_scales = d.expert_scales;
  a.expand_scales = res.expand_scales.view();
  a.x_active_mask = d.x_active_mask;
  a.group_ep = d.group_ep;
  a.ep_world_size = d.ep_world_size;
  a.ep_rank_id = d.ep_rank_id;
  a.moe_expert_num = d.moe_expert_num;
  a.shared_expert_rank_num = d.shared_expert_rank_num;
  a.shared_expert_num = d.shared_expert_num;
  a.global_bs = d.global_bs;
  a.comm_quant_mode = b.comm_quant;
  a.comm_alg = d.comm_alg;
  a.zero_expert_num = b.Z;
  a.copy_expert_num = b.C;
  a.const_expert_num = b.Q;
  if (b.shared_x) a.shared_expert_x = ar.view(b.dt, in.shared_x, {BS, b.H});
  if (b.C || b.Q) a.ori_x = d.x;
  if (b.Q) {
    a.const_expert_alpha_1 = ar.view(b.dt, in.alpha1, {b.Q});
    a.const_expert_alpha_2 = ar.view(b.dt, in.alpha2, {b.Q});
    a.const_expert_v = ar.view(b.dt, in.const_v, {b.Q, b.H});
  }
  return a;
}

int64_t random_count(Rng& g) {
  const int64_t v[] = {-1, 0, 1, 2, 3, 5, 7, 64, 65536, INT32_MAX, int64_t{1} << 40, INT64_MIN, INT64_MAX};
  return chance(g, 0.5) ? pick(g, -2, 9) : v[pick(g, 0, 12)];
}

// A copy of an int32 tensor's contents with a few entries changed.
TensorView corrupt_i32(Rng& g, Arena& ar, const TensorView& v, std::string& log, const char* name) {
  // (An earlier mutation may have left a negative length: the view is then passed on as it is.)
  if (!v.defined() || v.dtype != DType::kInt32 || v.dim() != 1 || v.data == nullptr || v.shape[0] < 0) return v;
  std::vector<int32_t> c(static_cast<size_t>(v.shape[0]));
  if (!c.empty()) std::memcpy(c.data(), v.data, c.size() * 4);
  const int n = static_cast<int>(pick(g, 1, 3));
  for (int i = 0; i < n && !c.empty(); ++i) {
    const size_t at = static_cast<size_t>(pick(g, 0, static_cast<int64_t>(std::min<size_t>(c.size(), 64)) - 1));
    const int32_t vals[] = {-1, 0, 1, 2, 3, 7, 100, INT32_MAX, INT32_MIN};
    c[at] = chance(g, 0.5) ? static_cast<int32_t>(static_cast<uint32_t>(c[at]) + static_cast<uint32_t>(pick(g, -2, 2))) : vals[pick(g, 0, 8)];
    log += std::string(" ") + name + "[" + std::to_string(at) + "]=" + std::to_string(c[at]);
  }
  return ar.view(DType::kInt32, c, v.shape);
}

// elastic_info: a random or almost valid table for ep_world_size ranks (for at most 4096: another change
// may have made ep_world_size huge, e.g. 2^40).
TensorView random_elastic_info(Rng& g, Arena& ar, int64_t ep_world_size, std::string& log) {
  std::vector<int32_t> e(static_cast<size_t>(4 + 2 * std::clamp<int64_t>(ep_world_size, 0, 4096)));
  for (auto& v : e) v = static_cast<int32_t>(pick(g, -1, 4));
  e[0] = chance(g, 0.8) ? 1 : 0;
  log += " elastic_info:random";
  return ar.view(DType::kInt32, e, {static_cast<int64_t>(e.size())});
}

// One random change of a dispatch call's arguments.
void mutate_dispatch(Rng& g, Arena& ar, DispatchArgs& a, std::string& log) {
  switch (pick(g, 0, 15)) {
    case 0: a.x = mutate_view(g, ar, a.x, log, "x"); break;
    case 1: a.expert_ids = mutate_view(g, ar, a.expert_ids, log, "expert_ids"); break;
    case 2: a.expert_scales = mutate_view(g, ar, a.expert_scales, log, "expert_scales"); break;
    case 3: a.scales = mutate_view(g, ar, a.scales, log, "scales"); break;
    case 4: a.x_active_mask = mutate_view(g, ar, a.x_active_mask, log, "x_active_mask"); break;
    case 5: a.elastic_info = random_elastic_info(g, ar, a.ep_world_size, log); break;
    case 6: a.moe_expert_num = random_count(g); log += " moe_expert_num=" + std::to_string(a.moe_expert_num); break;
    case 7: a.ep_world_size = random_count(g); log += " ep_world_size=" + std::to_string(a.ep_world_size); break;
    case 8: {
      // A rank id that is out of range, or this rank's own: an endpoint serves one thread at a time, so
      // another live rank's id (two threads in one endpoint at once) is outside the contract.
      int64_t v;
      do v = random_count(g);
      while (v >= 0 && v < a.ep_world_size && v != a.ep_rank_id);
      a.ep_rank_id = v;
      log += " ep_rank_id=" + std::to_string(a.ep_rank_id);
      break;
    }
    case 9:
      a.shared_expert_rank_num = random_count(g);
      a.shared_expert_num = random_count(g);
      log += " shared=" + std::to_string(a.shared_expert_rank_num) + "/" + std::to_string(a.shared_expert_num);
      break;
    case 10:
      a.tp_world_size = pick(g, -1, 3);
      a.tp_rank_id = pick(g, -1, 2);
      a.group_tp = chance(g, 0.5) ? a.group_ep : "fuzz_no_such_group";
      log += " tp=" + std::to_string(a.tp_world_size);
      break;
    case 11: a.quant_mode = pick(g, -1, 3); log += " quant_mode=" + std::to_string(a.quant_mode); break;
    case 12: a.global_bs = random_count(g); log += " global_bs=" + std::to_string(a.global_bs); break;
    case 13: {
      int64_t* targets[] = {&a.zero_expert_num, &a.copy_expert_num, &a.const_expert_num, &a.expert_token_nums_type, &a.expert_shard_type};
      const int i = static_cast<int>(pick(g, 0, 4));
      *targets[i] = random_count(g);
      log += " special[" + std::to_string(i) + "]=" + std::to_string(*targets[i]);
      break;
    }
    case 14: {
      const char* algs[] = {"", "fullmesh", "hierarchy", "ring", "a2", "a3"};
      if (chance(g, 0.5))
        a.comm_alg = algs[pick(g, 0, 5)];
      else
        a.profile = algs[pick(g, 0, 5)];
      log += " alg/profile=" + a.comm_alg + "/" + a.profile;
      break;
    }
    default: {
      // ids: out of range, repeated, negative
      if (a.expert_ids.dtype != DType::kInt32 || a.expert_ids.data == nullptr || a.expert_ids.numel() <= 0 || !a.expert_ids.strides.empty()) break;
      std::vector<int32_t> ids(static_cast<size_t>(a.expert_ids.numel()));
      std::memcpy(ids.data(), a.expert_ids.data, ids.size() * 4);
      const size_t at = static_cast<size_t>(pick(g, 0, static_cast<int64_t>(ids.size()) - 1));
      const int32_t vals[] = {-1, INT32_MIN, INT32_MAX, 0, 1, 2, 3, 5, 8};
      ids[at] = vals[pick(g, 0, 8)];
      log += " expert_ids[" + std::to_string(at) + "]=" + std::to_string(ids[at]);
      a.expert_ids = ar.view(DType::kInt32, ids, a.expert_ids.shape);
      break;
    }
  }
}

// One random change of a combine call's arguments (mostly its metadata).
void mutate_combine(Rng& g, Arena& ar, CombineArgs& a, std::string& log) {
  switch (pick(g, 0, 14)) {
    case 0: a.assist_info_for_combine = corrupt_i32(g, ar, a.assist_info_for_combine, log, "assist"); break;
    case 1: a.ep_send_counts = corrupt_i32(g, ar, a.ep_send_counts, log, "ep_send_counts"); break;
    case 2: a.assist_info_for_combine = mutate_view(g, ar, a.assist_info_for_combine, log, "assist_info_for_combine"); break;
    case 3: a.ep_send_counts = mutate_view(g, ar, a.ep_send_counts, log, "ep_send_counts"); break;
    case 4: a.expand_x = mutate_view(g, ar, a.expand_x, log, "expand_x"); break;
    case 5: a.expert_ids = mutate_view(g, ar, a.expert_ids, log, "expert_ids"); break;
    case 6: {  // other ids than dispatch had (valid-looking)
      if (a.expert_ids.dtype != DType::kInt32 || a.expert_ids.data == nullptr || a.expert_ids.numel() <= 0 || !a.expert_ids.strides.empty()) break;
      std::vector<int32_t> ids(static_cast<size_t>(a.expert_ids.numel()));
      std::memcpy(ids.data(), a.expert_ids.data, ids.size() * 4);
      const size_t at = static_cast<size_t>(pick(g, 0, static_cast<int64_t>(ids.size()) - 1));
      ids[at] = static_cast<int32_t>(pick(g, -1, 8));
      log += " combine expert_ids[" + std::to_string(at) + "]=" + std::to_string(ids[at]);
      a.expert_ids = ar.view(DType::kInt32, ids, a.expert_ids.shape);
      break;
    }
    case 7: a.expert_scales = mutate_view(g, ar, a.expert_scales, log, "expert_scales"); break;
    case 8: a.tp_send_counts = mutate_view(g, ar, a.tp_send_counts, log, "tp_send_counts"); a.tp_world_size = pick(g, 0, 2); break;
    case 9: a.shared_expert_x = mutate_view(g, ar, a.shared_expert_x, log, "shared_expert_x"); break;
    case 10: a.ori_x = mutate_view(g, ar, a.ori_x, log, "ori_x"); break;
    case 11: a.const_expert_v = mutate_view(g, ar, a.const_expert_v, log, "const_expert_v"); break;
    case 12: a.comm_quant_mode = pick(g, -1, 3); log += " comm_quant_mode=" + std::to_string(a.comm_quant_mode); break;
    case 13: a.expand_scales = mutate_view(g, ar, a.expand_scales, log, "expand_scales"); break;
    default: a.moe_expert_num = random_count(g); log += " combine moe_expert_num=" + std::to_string(a.moe_expert_num); break;
  }
}

enum class Outcome { kOk, kInvalid, kUnsupported, kTransport, kBad };

// How the calls ended, over the whole run (printed at the end: what the cases reached).
struct Tally {
  uint64_t ok = 0, invalid = 0, unsupported = 0, transport = 0, timeout = 0;
};
Tally g_tally;

struct Verdict {
  Outcome outcome = Outcome::kOk;
  std::string message;
};

Verdict observe(const std::function<void()>& fn) {
  Verdict v;
  try {
    fn();
  } catch (const InvalidArgument& e) {
    v = {Outcome::kInvalid, e.what()};
  } catch (const Unsupported& e) {
    v = {Outcome::kUnsupported, e.what()};
  } catch (const TransportError& e) {  // Timeout is one
    v = {Outcome::kTransport, e.what()};
  } catch (const Error& e) {
    v = {Outcome::kBad, std::string("moedist::Error: ") + e.what()};
  } catch (const std::exception& e) {
    v = {Outcome::kBad, std::string("std::exception: ") + e.what()};
  } catch (...) {
    v = {Outcome::kBad, "unknown exception"};
  }
  // An allowed type must still not carry an internal error.
  if (v.message.find("internal error") != std::string::npos) v.outcome = Outcome::kBad;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  switch (v.outcome) {
    case Outcome::kOk: ++g_tally.ok; break;
    case Outcome::kInvalid: ++g_tally.invalid; break;
    case Outcome::kUnsupported: ++g_tally.unsupported; break;
    case Outcome::kTransport: ++(v.message.find("timed out") != std::string::npos ? g_tally.timeout : g_tally.transport); break;
    case Outcome::kBad: break;
  }
  return v;
}

// Runs fn(r) on W threads; fails the whole run (after printing `what`) if they have not all
// returned within `limit`.
void run_threads(int W, const std::function<void(int)>& fn, std::chrono::seconds limit, const std::string& what) {
  std::mutex mu;
  std::condition_variable cv;
  int done = 0;
  std::vector<std::thread> th;
  for (int r = 0; r < W; ++r)
    th.emplace_back([&, r] {
      fn(r);
      std::lock_guard<std::mutex> lock(mu);
      ++done;
      cv.notify_all();
    });
  {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, limit, [&] { return done == W; })) {
      std::fprintf(stderr, "FUZZ HANG: the ranks did not return within %lld s: %s\n", static_cast<long long>(limit.count()), what.c_str());
      std::fflush(stderr);
      std::_Exit(1);
    }
  }
  for (auto& t : th) t.join();
}

constexpr auto kCaseLimit = std::chrono::seconds(60);

// One case; returns "" or what went wrong.
std::string run_case(uint64_t seed, uint64_t index, bool mixed_ops, std::string& log) {
  Rng g(seed ^ (0x9e3779b97f4a7c15ull * (index + 1)));
  const Base b = random_base(g);
  log = "W=" + std::to_string(b.W) + " E=" + std::to_string(b.E) + " Sr=" + std::to_string(b.Sr) + " K=" + std::to_string(b.K) +
        " H=" + std::to_string(b.H) + " ZCQ=" + std::to_string(b.Z) + std::to_string(b.C) + std::to_string(b.Q) +
        " quant=" + std::to_string(b.quant) + (b.smooth ? " smooth" : "") + " cquant=" + std::to_string(b.comm_quant) +
        " mask=" + std::to_string(b.mask) + (b.ragged ? " ragged" : "") + (b.hierarchy ? " hierarchy rps=" + std::to_string(b.rps) : "") +
        " max_bs=" + std::to_string(b.max_bs) + " |";
  const std::string group = "fuzz" + std::to_string(index);
  GroupOptions opt;
  opt.timeout = std::chrono::milliseconds(env_u64("MOEDIST_FUZZ_TIMEOUT_MS", 500));
  opt.ranks_per_server = b.rps;
  register_group(group, make_thread_group(b.W, opt));
  struct Unreg {
    std::string n;
    ~Unreg() { unregister_group(n); }
  } unreg{group};

  Arena ar;
  std::vector<RankIn> in;
  std::vector<DispatchArgs> da;
  for (int r = 0; r < b.W; ++r) {
    in.push_back(random_inputs(g, b, r));
    da.push_back(dispatch_args(ar, b, in.back(), r, group));
  }
  // Mutations of dispatch: none (then combine is mutated), on one rank, or on several.
  const int phase = static_cast<int>(pick(g, 0, 2));  // 0: dispatch mutated, 1: combine mutated, 2: mixed operations
  if (phase == 0) {
    const int n = static_cast<int>(pick(g, 1, 3));
    for (int i = 0; i < n; ++i) {
      const int r = static_cast<int>(pick(g, 0, b.W - 1));
      log += " d" + std::to_string(r) + ":";
      mutate_dispatch(g, ar, da[static_cast<size_t>(r)], log);
    }
  }
  std::vector<Verdict> dv(static_cast<size_t>(b.W));
  std::vector<DispatchResult> dr(static_cast<size_t>(b.W));
  run_threads(b.W, [&](int r) { dv[static_cast<size_t>(r)] = observe([&] { dr[static_cast<size_t>(r)] = dispatch_v2(da[static_cast<size_t>(r)]); }); },
              kCaseLimit, log);
  bool all_ok = true;
  for (int r = 0; r < b.W; ++r) {
    const Verdict& v = dv[static_cast<size_t>(r)];
    if (v.outcome == Outcome::kBad) return "dispatch_v2 on rank " + std::to_string(r) + ": " + v.message;
    all_ok &= v.outcome == Outcome::kOk;
  }
  if (!all_ok) return "";
  std::vector<CombineArgs> ca;
  for (int r = 0; r < b.W; ++r)
    ca.push_back(combine_args(ar, g, b, in[static_cast<size_t>(r)], da[static_cast<size_t>(r)], dr[static_cast<size_t>(r)]));
  if (phase == 1) {
    const int n = static_cast<int>(pick(g, 1, 3));
    for (int i = 0; i < n; ++i) {
      const int r = static_cast<int>(pick(g, 0, b.W - 1));
      log += " c" + std::to_string(r) + ":";
      mutate_combine(g, ar, ca[static_cast<size_t>(r)], log);
    }
  }
  // Mixed operations: one rank calls combine_v2 while the others call dispatch_v2 again.
  const int odd = phase == 2 && mixed_ops && b.W > 1 ? static_cast<int>(pick(g, 0, b.W - 1)) : -1;
  if (odd >= 0) log += " rank " + std::to_string(odd) + " calls combine_v2, the others dispatch_v2";
  std::vector<Verdict> cv(static_cast<size_t>(b.W));
  run_threads(b.W,
              [&](int r) {
                cv[static_cast<size_t>(r)] = observe([&] {
                  if (odd >= 0 && r != odd)
                    (void)dispatch_v2(da[static_cast<size_t>(r)]);
                  else
                    (void)combine_v2(ca[static_cast<size_t>(r)]);
                });
              },
              kCaseLimit, log);
  for (int r = 0; r < b.W; ++r) {
    const Verdict& v = cv[static_cast<size_t>(r)];
    if (v.outcome == Outcome::kBad) return std::string(odd >= 0 && r != odd ? "dispatch_v2" : "combine_v2") + " on rank " + std::to_string(r) + ": " + v.message;
  }
  return "";
}

// The harness itself: corrupting the values of an int32 view whose length an earlier mutation made
// negative passes the view on (it threw std::length_error, which ended the whole fuzz run: seed 20261203,
// case 893).
TEST(FuzzHarness, CorruptingAViewOfNegativeLengthPassesItOn) {
  Rng g(7);
  Arena ar;
  const TensorView v = ar.view(DType::kInt32, std::vector<int32_t>{1, 2, 3}, {-2});
  std::string log;
  const TensorView out = corrupt_i32(g, ar, v, log, "ep_send_counts");
  EXPECT_EQ(out.data, v.data);
  EXPECT_EQ(out.shape, v.shape);
  EXPECT_EQ(log, "");
}

// ... and a random elastic_info for an ep_world_size that another change made 2^40 is a table of 4096
// ranks (it threw std::bad_alloc: seed 4242, case 5944).
TEST(FuzzHarness, ARandomElasticInfoForAHugeWorldSizeIsBounded) {
  Rng g(7);
  Arena ar;
  std::string log;
  EXPECT_EQ(random_elastic_info(g, ar, int64_t{1} << 40, log).shape, std::vector<int64_t>{4 + 2 * 4096});
  EXPECT_EQ(random_elastic_info(g, ar, -5, log).shape, std::vector<int64_t>{4});
  EXPECT_EQ(random_elastic_info(g, ar, 3, log).shape, std::vector<int64_t>{10});
}

TEST(Fuzz, RandomArgumentsGiveResultsOrTypedErrors) {
  const uint64_t seed = env_u64("MOEDIST_FUZZ_SEED", 20261202);
  const uint64_t cases = env_u64("MOEDIST_FUZZ_CASES", kDefaultCases);
  const bool mixed = env_u64("MOEDIST_FUZZ_MIXED_OPS", 1) != 0;
  const char* only = std::getenv("MOEDIST_FUZZ_CASE");
  const uint64_t first = only ? std::strtoull(only, nullptr, 10) : 0, last = only ? first + 1 : cases;
  std::printf("[ fuzz     ] seed %llu, cases %llu..%llu%s (MOEDIST_FUZZ_SEED / MOEDIST_FUZZ_CASES / MOEDIST_FUZZ_CASE)\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(first), static_cast<unsigned long long>(last - 1),
              mixed ? ", with mixed operations" : "");
  int failures = 0;
  for (uint64_t i = first; i < last && failures < 5; ++i) {
    std::string log;
    std::string bad;
    try {
      bad = run_case(seed, i, mixed, log);
    } catch (const std::exception& e) {  // the harness's own failure: named with its case, and the next cases still run
      bad = std::string("the fuzz harness threw: ") + e.what();
    }
    if (!bad.empty()) {
      ++failures;
      ADD_FAILURE() << "seed " << seed << " case " << i << " (rerun: MOEDIST_FUZZ_SEED=" << seed << " MOEDIST_FUZZ_CASE=" << i << "): " << log
                    << "\n  " << bad;
    }
    if (std::getenv("MOEDIST_FUZZ_VERBOSE")) std::printf("case %llu: %s\n", static_cast<unsigned long long>(i), log.c_str());
  }
  std::printf("[ fuzz     ] calls: %llu succeeded, %llu InvalidArgument, %llu Unsupported, %llu TransportError, %llu Timeout\n",
              static_cast<unsigned long long>(g_tally.ok), static_cast<unsigned long long>(g_tally.invalid),
              static_cast<unsigned long long>(g_tally.unsupported), static_cast<unsigned long long>(g_tally.transport),
              static_cast<unsigned long long>(g_tally.timeout));
}

}  // namespace
}  // namespace moedist::test
