// The size-1 group: what a process is when nobody launched it as part of a world.
// Collectives are copies or nothing; send/recv to oneself is refused (no algorithm
// needs it on one rank, and a silent self-send would hide a bug in one that does).
#pragma once

#include <memory>

#include "flotilla/comm/communicator.hpp"

namespace flotilla::comm {

std::unique_ptr<Communicator> make_local(const Settings& settings = {});

// This host's name (gethostname), for backends that do not get one from MPI.
std::string local_host_name();

}  // namespace flotilla::comm
