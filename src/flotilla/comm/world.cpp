#include "flotilla/comm/world.hpp"

#include <cstdlib>
#include <string>

#include "flotilla/comm/local/local_communicator.hpp"
#include "flotilla/comm/mpi/mpi_communicator.hpp"

namespace flotilla::comm {

bool launched_under_mpi(const EnvLookup& getenv) {
  auto set = [&](const char* name) {
    const char* value = getenv(name);
    return value && *value;
  };
  if (set("OMPI_COMM_WORLD_SIZE") || set("PMI_SIZE") || set("PMIX_RANK")) return true;
  if (set("SLURM_PROCID") && set("SLURM_NTASKS")) return std::atoi(getenv("SLURM_NTASKS")) > 1;
  return false;
}

std::unique_ptr<Communicator> make_world(const Settings& settings) {
  if (launched_under_mpi()) return make_mpi_world(settings);
  return make_local(settings);
}

}  // namespace flotilla::comm
