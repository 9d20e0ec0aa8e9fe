// Four ranks as threads of one process: dispatch, a stand-in expert (y = 2x), combine, and a check
// against the reference model. Build: part of the CMake project (examples/cpp); run: ./thread_ranks
#include <moedist/moedist.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

// bf16 <-> float conversions: moedist/half.h (part of moedist/moedist.h)

int main() {
  constexpr int W = 4, BS = 16, H = 256, K = 4, E = 8;
  moedist::register_group("ep", moedist::make_thread_group(W));

  // Every rank's inputs: tokens, top-k expert ids (distinct per token) and gating weights.
  std::vector<std::vector<uint16_t>> x(W, std::vector<uint16_t>(BS * H));
  std::vector<std::vector<int32_t>> ids(W);
  std::vector<std::vector<float>> weights(W);
  std::mt19937 rng(7);
  for (int r = 0; r < W; ++r) {
    for (auto& v : x[r]) v = moedist::float_to_bf16(std::uniform_real_distribution<float>(-1, 1)(rng));
    for (int t = 0; t < BS; ++t) {
      std::vector<int> pool = {0, 1, 2, 3, 4, 5, 6, 7};
      std::shuffle(pool.begin(), pool.end(), rng);
      for (int k = 0; k < K; ++k) {
        ids[r].push_back(pool[k]);
        weights[r].push_back(1.0f / K);
      }
    }
  }

  std::vector<moedist::DispatchArgs> dargs(W);
  std::vector<moedist::CombineArgs> cargs(W);
  std::vector<moedist::DispatchResult> dispatched(W);  // kept: combine's arguments view into it
  std::vector<moedist::Tensor> expert_out(W), out(W);
  std::vector<std::thread> ranks;
  for (int rank = 0; rank < W; ++rank)
    ranks.emplace_back([&, rank] {
      dargs[rank] = {.x = moedist::TensorView(x[rank].data(), moedist::DType::kBFloat16, {BS, H}),
                     .expert_ids = moedist::TensorView(ids[rank].data(), moedist::DType::kInt32, {BS, K}),
                     .group_ep = "ep",
                     .ep_world_size = W,
                     .ep_rank_id = rank,
                     .moe_expert_num = E,
                     .expert_scales = moedist::TensorView(weights[rank].data(), moedist::DType::kFloat32, {BS, K})};
      moedist::DispatchResult& d = dispatched[rank] = moedist::dispatch_v2(dargs[rank]);
      // The rank's experts: y = 2x on the rows it received (expert_token_nums per local expert).
      int64_t rows = 0;
      for (int64_t e = 0; e < d.expert_token_nums.numel(); ++e) rows += d.expert_token_nums.data_as<int64_t>()[e];
      expert_out[rank] = moedist::Tensor(moedist::DType::kBFloat16, {d.expand_x.size(0), H});
      for (int64_t i = 0; i < rows * H; ++i) {
        const float v = moedist::bf16_to_float(d.expand_x.data_as<uint16_t>()[i]);
        expert_out[rank].data_as<uint16_t>()[i] = moedist::float_to_bf16(2 * v);
      }
      cargs[rank] = {.expand_x = expert_out[rank],
                     .expert_ids = dargs[rank].expert_ids,
                     .assist_info_for_combine = d.assist_info_for_combine,
                     .ep_send_counts = d.ep_recv_counts,
                     .expert_scales = dargs[rank].expert_scales,
                     .group_ep = "ep",
                     .ep_world_size = W,
                     .ep_rank_id = rank,
                     .moe_expert_num = E};
      out[rank] = moedist::combine_v2(cargs[rank]);
    });
  for (auto& t : ranks) t.join();

  // Weights sum to 1 and every expert doubles: the output is 2x (up to bf16 rounding); and the
  // reference gives the same bits.
  const std::vector<moedist::Tensor> ref = moedist::reference::combine_v2(cargs);
  bool same = true;
  double max_err = 0;
  for (int r = 0; r < W; ++r)
    for (int64_t i = 0; i < BS * H; ++i) {
      same &= out[r].data_as<uint16_t>()[i] == ref[r].data_as<uint16_t>()[i];
      const double want = 2.0 * moedist::bf16_to_float(x[r][i]);
      max_err = std::max(max_err, std::abs(moedist::bf16_to_float(out[r].data_as<uint16_t>()[i]) - want));
    }
  std::printf("thread_ranks: %d ranks, bit-exact vs reference: %s, max |out - 2x| = %.3g\n", W, same ? "yes" : "no", max_err);
  return same && max_err < 0.05 ? 0 : 1;
}
