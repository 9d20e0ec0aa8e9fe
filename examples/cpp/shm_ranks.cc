// One rank per process over shared memory. Start it with a launcher:
//   ./build/moedist launch -n 4 -- ./build/examples/cpp/shm_ranks
// (mpirun -np 4 or torchrun work too: moedist::launch_env() reads their variables.)
#include <moedist/moedist.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>


int main() {
  const moedist::LaunchEnv env = moedist::launch_env();
  if (!env.found) {
    std::fprintf(stderr, "shm_ranks: start me with `moedist launch -n N -- %s`\n", "shm_ranks");
    return 2;
  }
  const int W = env.world_size, rank = env.rank;
  constexpr int BS = 32, H = 512, K = 4;
  const int E = 2 * W;
  try {
    moedist::register_group("ep", {moedist::make_shm_group("ep", W, rank)});
    std::mt19937 rng(100 + rank);
    std::vector<uint16_t> x(BS * H);
    for (auto& v : x) v = moedist::float_to_bf16(std::uniform_real_distribution<float>(-1, 1)(rng));
    std::vector<int32_t> ids;
    std::vector<float> w;
    for (int t = 0; t < BS; ++t) {
      std::vector<int> pool(E);
      for (int g = 0; g < E; ++g) pool[g] = g;
      std::shuffle(pool.begin(), pool.end(), rng);
      for (int k = 0; k < K; ++k) {
        ids.push_back(pool[k]);
        w.push_back(0.25f);
      }
    }
    moedist::DispatchArgs d{.x = moedist::TensorView(x.data(), moedist::DType::kBFloat16, {BS, H}),
                            .expert_ids = moedist::TensorView(ids.data(), moedist::DType::kInt32, {BS, K}),
                            .group_ep = "ep",
                            .ep_world_size = W,
                            .ep_rank_id = rank,
                            .moe_expert_num = E,
                            .quant_mode = 2};
    moedist::DispatchResult r = moedist::dispatch_v2(d);
    // Experts: dequantize (int8 * per-row scale) back to bf16.
    moedist::Tensor y(moedist::DType::kBFloat16, {r.expand_x.size(0), H});
    int64_t rows = 0;
    for (int64_t e = 0; e < r.expert_token_nums.numel(); ++e) rows += r.expert_token_nums.data_as<int64_t>()[e];
    for (int64_t i = 0; i < rows; ++i)
      for (int h = 0; h < H; ++h)
        y.data_as<uint16_t>()[i * H + h] = moedist::float_to_bf16(
            static_cast<float>(r.expand_x.data_as<int8_t>()[i * H + h]) * r.dynamic_scales.data_as<float>()[i]);
    moedist::Tensor out = moedist::combine_v2({.expand_x = y,
                                               .expert_ids = d.expert_ids,
                                               .assist_info_for_combine = r.assist_info_for_combine,
                                               .ep_send_counts = r.ep_recv_counts,
                                               .expert_scales = moedist::TensorView(w.data(), moedist::DType::kFloat32, {BS, K}),
                                               .group_ep = "ep",
                                               .ep_world_size = W,
                                               .ep_rank_id = rank,
                                               .moe_expert_num = E});
    // Every expert is the identity (up to int8), weights sum to 1: out ~ x.
    double max_err = 0;
    for (int i = 0; i < BS * H; ++i)
      max_err = std::max(max_err, std::abs(double(moedist::bf16_to_float(out.data_as<uint16_t>()[i])) -
                                           moedist::bf16_to_float(x[i])));
    std::printf("shm_ranks: rank %d/%d received %lld rows, max |out - x| = %.3g\n", rank, W, static_cast<long long>(rows), max_err);
    return max_err < 0.05 ? 0 : 1;
  } catch (const moedist::Error& e) {
    std::fprintf(stderr, "shm_ranks: rank %d: %s\n", rank, e.what());
    return 1;
  }
}
