#include "checks.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "experts.h"
#include "moedist/half.h"
#include "moedist/reference.h"
#include "router.h"
#include "summary.h"
#include "util.h"

namespace moedist::tools::demo {

std::vector<std::vector<float>> dense_layer(const Layer& l, const std::vector<RankState>& ranks, const std::vector<size_t>& which) {
  const int64_t H = l.H, K = l.K;
  const size_t n = ranks.size();
  std::vector<std::vector<float>> raw(n), input(n), out(n);
  for (size_t i : which) {
    raw[i].resize(static_cast<size_t>(l.BS * H));
    for (size_t j = 0; j < raw[i].size(); ++j) raw[i][j] = half_to_float(l.dtype(), ranks[i].x[j]);
    input[i] = raw[i];
    if (l.opt.quant == 2)
      for (int64_t t = 0; t < l.BS; ++t) {
        std::vector<float> row(input[i].begin() + t * H, input[i].begin() + (t + 1) * H);
        quantize_dequantize(row);
        std::copy(row.begin(), row.end(), input[i].begin() + t * H);
      }
    out[i].assign(static_cast<size_t>(l.BS * H), 0.f);
  }

  // Group the (token, k) entries by routed expert, so each expert's weights are made once.
  struct Use {
    size_t rank;
    int64_t token;
    float weight;
  };
  std::vector<std::vector<Use>> uses(static_cast<size_t>(l.E_active));
  const int64_t zero_end = l.E + l.opt.zero, copy_end = zero_end + l.opt.copy;
  for (size_t i : which)
    for (int64_t t = 0; t < l.active_tokens; ++t) {
      float* acc = out[i].data() + t * H;
      const float* x = raw[i].data() + t * H;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t id = ranks[i].expert_ids[static_cast<size_t>(t * K + k)];
        const float w = ranks[i].expert_scales[static_cast<size_t>(t * K + k)];
        if (id < l.E_active) {
          uses[static_cast<size_t>(id)].push_back(Use{i, t, w});
        } else if (id >= zero_end && id < copy_end) {
          for (int64_t h = 0; h < H; ++h) acc[h] += w * x[h];
        } else if (id >= copy_end) {
          const size_t c = static_cast<size_t>(id - copy_end);
          const float a1 = half_to_float(l.dtype(), l.alpha1[c]), a2 = half_to_float(l.dtype(), l.alpha2[c]);
          const uint16_t* v = l.const_v.data() + c * static_cast<size_t>(H);
          for (int64_t h = 0; h < H; ++h) acc[h] += w * (a1 * x[h] + a2 * half_to_float(l.dtype(), v[h]));
        }  // zero experts add nothing
      }
    }

  std::vector<float> y(static_cast<size_t>(H));
  FfnScratch scratch;
  for (int64_t g = 0; g < l.E_active; ++g) {
    if (uses[static_cast<size_t>(g)].empty()) continue;
    const ExpertWeights w = make_expert_weights(l, ExpertKey{false, l.original_of[static_cast<size_t>(g)]});
    for (const Use& u : uses[static_cast<size_t>(g)]) {
      ffn_forward(w, input[u.rank].data() + u.token * H, 0, l.F, scratch, y.data());
      float* acc = out[u.rank].data() + u.token * H;
      for (int64_t h = 0; h < H; ++h) acc[h] += u.weight * y[static_cast<size_t>(h)];
    }
  }
  if (l.S > 0 && l.Sr_active > 0) {  // with every shared-expert rank removed, the shared expert is gone
    const ExpertWeights w = make_expert_weights(l, ExpertKey{true, 0});
    for (size_t i : which)
      for (int64_t t = 0; t < l.active_tokens; ++t) {
        ffn_forward(w, input[i].data() + t * H, 0, l.F, scratch, y.data());
        float* acc = out[i].data() + t * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += y[static_cast<size_t>(h)];
      }
  }
  return out;
}

Accuracy compare_with_dense(const Layer& l, const RankState& st, const std::vector<float>& dense) {
  Accuracy a;
  const uint16_t* got = st.out.data_as<uint16_t>();
  for (size_t j = 0; j < dense.size(); ++j) {
    const double v = half_to_float(l.dtype(), got[j]), want = dense[j];
    if (!std::isfinite(v)) {
      ++a.non_finite;
      continue;
    }
    a.max_abs_err = std::max(a.max_abs_err, std::fabs(v - want));
    a.max_abs_dense = std::max(a.max_abs_dense, std::fabs(want));
  }
  return a;
}

// "" if the first `elements` elements of got and want (all of them when negative) hold the same bits.
// Only the meaningful prefix is compared: rows past the received count are unspecified (docs/semantics.md §2).
std::string first_difference(const Tensor& got, const Tensor& want, int64_t elements, const std::string& what) {
  if (got.dtype() != want.dtype()) return cat(what, ": dtype ", dtype_name(got.dtype()), " vs reference ", dtype_name(want.dtype()));
  if (got.shape() != want.shape()) return cat(what, ": shape ", got.view().shape_str(), " vs reference ", want.view().shape_str());
  const int64_t n = elements < 0 ? want.numel() : std::min(elements, want.numel());
  const size_t es = dtype_size(want.dtype());
  const auto* a = static_cast<const unsigned char*>(got.data());
  const auto* b = static_cast<const unsigned char*>(want.data());
  for (int64_t i = 0; i < n; ++i)
    if (std::memcmp(a + static_cast<size_t>(i) * es, b + static_cast<size_t>(i) * es, es) != 0)
      return cat(what, ": element ", i, " of ", want.numel(), " differs from the reference");
  return "";
}

int64_t sum_counts(const Tensor& expert_token_nums) {
  int64_t total = 0;
  for (int64_t e = 0; e < expert_token_nums.numel(); ++e) total += expert_token_nums.data_as<int64_t>()[e];
  return total;
}

// Rows this rank received on its own EP group (without its TP peer's).
int64_t own_rows(const Layer& l, const RankState& st, const DispatchResult& d) {
  return l.tp == 2 ? d.tp_recv_counts.data_as<int32_t>()[st.tp_rank] : sum_counts(d.expert_token_nums);
}

std::string compare_dispatch(const Layer& l, const RankState& st, const DispatchResult& w) {
  const DispatchResult& got = st.dispatched;
  const std::string who = rank_name(l, st) + " dispatch_v2 ";
  std::string diff = first_difference(got.expert_token_nums, w.expert_token_nums, -1, who + "expert_token_nums");
  if (diff.empty()) diff = first_difference(got.ep_recv_counts, w.ep_recv_counts, -1, who + "ep_recv_counts");
  if (diff.empty()) diff = first_difference(got.tp_recv_counts, w.tp_recv_counts, -1, who + "tp_recv_counts");
  if (!diff.empty()) return diff;
  const int64_t rows = sum_counts(w.expert_token_nums), own = own_rows(l, st, w);
  diff = first_difference(got.expand_x, w.expand_x, rows * l.H, who + "expand_x");
  if (diff.empty() && l.opt.quant == 2) diff = first_difference(got.dynamic_scales, w.dynamic_scales, rows, who + "dynamic_scales");
  if (diff.empty()) diff = first_difference(got.assist_info_for_combine, w.assist_info_for_combine, 3 * own, who + "assist_info_for_combine");
  if (diff.empty()) diff = first_difference(got.expand_scales, w.expand_scales, own, who + "expand_scales");
  return diff;
}

std::string compare_combine(const Layer& l, const RankState& st, const Tensor& want) {
  return first_difference(st.out, want, -1, rank_name(l, st) + " combine_v2 output");
}

void check_own_rank(const Layer& l, std::vector<RankState>& ranks, size_t me, RankSummary& s) {
  for (size_t i = 0; i < ranks.size(); ++i)
    if (i != me) gate(l, ranks[i]);
  std::vector<DispatchArgs> dispatch_calls;
  for (const RankState& st : ranks) dispatch_calls.push_back(st.dispatch_args);
  std::vector<DispatchResult> want = reference::dispatch_v2(dispatch_calls);
  s.dispatch_diff = compare_dispatch(l, ranks[me], want[me]);

  std::vector<CombineArgs> combine_calls;
  for (size_t i = 0; i < ranks.size(); ++i) {
    RankState& st = ranks[i];
    if (i != me) {
      std::vector<ExpertWeights> weights;
      for (const ExpertKey& key : hosted_experts(l, st.ep_rank)) weights.push_back(make_expert_weights(l, key));
      st.dispatched = std::move(want[i]);
      run_experts(l, st, weights);
      st.combine_args = make_combine_args(l, st);
    }
    combine_calls.push_back(st.combine_args);
  }
  const std::vector<Tensor> want_out = reference::combine_v2(combine_calls);
  s.combine_diff = compare_combine(l, ranks[me], want_out[me]);

  s.accuracy = compare_with_dense(l, ranks[me], dense_layer(l, ranks, {me})[me]);
}

}  // namespace moedist::tools::demo
