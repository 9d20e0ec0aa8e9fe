// make_mpi_world_group: MPI groups for programs that do not use MPI themselves (moedist demo, Python).
// Compiled in every build; without MPI it raises Unsupported.
#include <cstdlib>

#include "moedist/error.h"
#include "moedist/group.h"

#ifdef MOEDIST_HAVE_MPI
#include "moedist/mpi.h"
#endif

namespace moedist {

bool mpi_available() {
#ifdef MOEDIST_HAVE_MPI
  return true;
#else
  return false;
#endif
}

#ifdef MOEDIST_HAVE_MPI
namespace {
void finalize_at_exit() {
  int fin = 0;
  MPI_Finalized(&fin);
  if (!fin) MPI_Finalize();
}
}  // namespace
#endif

std::shared_ptr<Transport> make_mpi_world_group(const GroupOptions& options, const std::string& transport, int color, int key) {
  if (transport != "mpi" && transport != "hybrid" && transport != "ucx")
    throw InvalidArgument(detail::str_cat("make_mpi_world_group: transport=\"", transport, "\" (must be \"mpi\", \"hybrid\" or \"ucx\")"));
#ifndef MOEDIST_HAVE_MPI
  (void)options;
  (void)color;
  (void)key;
  throw Unsupported("make_mpi_world_group: this build of moedist has no MPI (install an MPI library, e.g. Debian's libopenmpi-dev, and "
                    "rebuild)");
#else
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (fin) throw InvalidArgument("make_mpi_world_group: MPI is already finalized");
  if (!init) {
    int provided = 0;
    if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS)
      throw TransportError("make_mpi_world_group: MPI_Init_thread failed");
    std::atexit(finalize_at_exit);
  }
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm comm = MPI_COMM_WORLD;
  if (color != 0 || key >= 0) {
    if (MPI_Comm_split(MPI_COMM_WORLD, color >= 0 ? color : MPI_UNDEFINED, key >= 0 ? key : rank, &comm) != MPI_SUCCESS)
      throw TransportError("make_mpi_world_group: MPI_Comm_split failed");
    if (comm == MPI_COMM_NULL) return nullptr;  // color < 0: this rank is in no group of this split
  }
  std::shared_ptr<Transport> t;
  try {
    t = transport == "mpi" ? make_mpi_group(comm, options) : transport == "hybrid" ? make_hybrid_group(comm, options) : make_ucx_group(comm, options);
  } catch (...) {
    if (comm != MPI_COMM_WORLD) MPI_Comm_free(&comm);
    throw;
  }
  if (comm != MPI_COMM_WORLD) MPI_Comm_free(&comm);
  return t;
#endif
}

}  // namespace moedist
