// flotilla doctor: before a long distributed run, check that every rank sees the same
// binary, model and data, and measure what the network between them gives.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "flotilla/kernels/gemm.hpp"

#include "flotilla/comm/communicator.hpp"
#include "flotilla/parallel/mesh.hpp"

namespace flotilla::parallel {

// What one rank reports about itself. Fixed-size strings travel in one all-gather.
struct RankReport {
  int rank = 0;
  std::string host;
  int cores = 0;          // online CPUs
  int threads = 0;        // OpenMP threads
  std::string versions;   // flotilla and the MPI library
  std::string binary;     // digest of the running executable
  std::string model;      // digest of the model directory's files (empty: none given)
  std::string data;       // digest of the data files (empty: none given)
  std::string cpu;        // the CPU's vector features (kernels::cpu_features)
  std::string kernels;    // the hot kernels' variant this rank runs (kernels::kernel_isa)
  std::string matmul;     // the ISA oneDNN runs the matrix products with (kernels::gemm_engine_info)
  std::string dtype;      // the number format of those products for doctor's --dtype ("float32", "bf16")
};

struct CollectiveTiming {
  uint64_t bytes = 0;
  double time_us = 0.0;       // best of the repetitions
  double bus_gbit_s = 0.0;    // nccl-tests' bus bandwidth: bytes * 2(n-1)/n / time
};

struct DoctorReport {
  std::vector<RankReport> ranks;          // indexed by rank
  std::vector<std::string> mismatches;    // "model: rank 1 differs from rank 0", ...
  // Not errors: "kernels: rank 1 runs avx2, rank 0 avx512" (the same binary chose different
  // kernel variants on different CPUs; results may differ in the last bits, speed differs).
  std::vector<std::string> warnings;
  std::vector<CollectiveTiming> all_reduce;
};

// A digest of the files under `path` (a file or a directory, recursively, in name order):
// names, sizes and every byte. Equal digests mean equal contents.
std::string digest_path(const std::filesystem::path& path);
std::string digest_running_binary();

// Every rank calls this; every rank returns the same report. `dtype`: the format a job
// would ask for (--dtype); each rank says what it computes that in (bf16 or, without a
// bf16 matmul on its CPU, float32), and ranks that differ are a warning.
DoctorReport run_doctor(comm::Communicator& comm, const std::filesystem::path& model,
                        const std::filesystem::path& data, uint64_t max_bytes,
                        kernels::GemmInput dtype = kernels::GemmInput::f32);

// --- the device mesh (doctor --parallel): where each rank sits, and what each dimension's
// groups measure when all of them exchange at once, as they do in training.

struct MeshGroupTiming {
  MeshDim dim = MeshDim::dp;
  std::string name;          // "dp", "pp", "tp"
  int group_size = 1;
  uint64_t bytes = 0;
  double time_us = 0.0;      // the slowest group's best time
  double bus_gbit_s = 0.0;   // bytes * 2(n-1)/n / time, n the group's size
};

struct MeshReport {
  MeshShape shape;
  std::vector<MeshCoords> coords;          // indexed by world rank
  std::vector<MeshGroupTiming> timings;    // one per dimension with more than one rank
  std::vector<std::string> warnings;       // placement advice (mesh_placement_warnings)
};

// Advice on where the mesh's groups fall, given each world rank's host: a tensor-parallel
// group spread over hosts exchanges activations over the network in every block (keep its
// ranks on one host: they are adjacent ranks, so give each host a multiple of tp slots).
std::vector<std::string> mesh_placement_warnings(const MeshShape& shape, const std::vector<std::string>& hosts);

// Every rank of `mesh.world()` calls this with the same `hosts`; every rank returns the same
// report. Measures an all-reduce of `bytes` in every group of each dimension at once.
MeshReport run_mesh_doctor(Mesh& mesh, const std::vector<std::string>& hosts, uint64_t bytes);

}  // namespace flotilla::parallel
