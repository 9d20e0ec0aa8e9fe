// One rank per MPI process, on one host or several: the group is made over MPI_COMM_WORLD
// (make_mpi_group; make_hybrid_group uses shared memory inside a host). Start it with mpirun:
//   mpirun -np 4 ./build/examples/cpp/mpi_ranks
// Built when moedist was built with MPI (moedist_HAVE_MPI after find_package(moedist)).
#include <moedist/moedist.h>
#include <moedist/mpi.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int W = 0, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &W);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  constexpr int BS = 16, H = 256, K = 4;
  const int E = 2 * W;
  int failed = 0;
  try {
    moedist::register_group("ep", {moedist::make_mpi_group(MPI_COMM_WORLD)});
    std::mt19937 rng(200 + rank);
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
        w.push_back(1.0f / K);
      }
    }
    const moedist::TensorView ids_view(ids.data(), moedist::DType::kInt32, {BS, K});
    const moedist::TensorView w_view(w.data(), moedist::DType::kFloat32, {BS, K});
    moedist::DispatchResult r = moedist::dispatch_v2({.x = moedist::TensorView(x.data(), moedist::DType::kBFloat16, {BS, H}),
                                                      .expert_ids = ids_view,
                                                      .group_ep = "ep",
                                                      .ep_world_size = W,
                                                      .ep_rank_id = rank,
                                                      .moe_expert_num = E,
                                                      .expert_scales = w_view});
    // Every expert is the identity: its output is its input rows.
    moedist::Tensor out = moedist::combine_v2({.expand_x = r.expand_x,
                                               .expert_ids = ids_view,
                                               .assist_info_for_combine = r.assist_info_for_combine,
                                               .ep_send_counts = r.ep_recv_counts,
                                               .expert_scales = w_view,
                                               .group_ep = "ep",
                                               .ep_world_size = W,
                                               .ep_rank_id = rank,
                                               .moe_expert_num = E});
    // Weights 1/K of the same row, summed: exactly x again (each product and partial sum is exact).
    int64_t wrong = 0;
    for (int i = 0; i < BS * H; ++i) wrong += out.data_as<uint16_t>()[i] != x[i];
    std::printf("mpi_ranks: rank %d/%d: %lld of %d output values differ from x\n", rank, W, static_cast<long long>(wrong), BS * H);
    failed = wrong != 0;
    moedist::unregister_group("ep");
  } catch (const moedist::Error& e) {
    std::fprintf(stderr, "mpi_ranks: rank %d: %s\n", rank, e.what());
    failed = 1;
  }
  MPI_Finalize();
  return failed;
}
