#include "flotilla/parallel/mesh.hpp"

#include <fmt/format.h>

#include <charconv>

#include "flotilla/base/error.hpp"

namespace flotilla::parallel {
namespace {
constexpr std::string_view kMeshComponent = "parallel/mesh";

std::string_view trim(std::string_view s) {
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
  return s;
}
}  // namespace

std::string MeshShape::to_string() const {
  return ep > 1 ? fmt::format("dp={},pp={},tp={},ep={}", dp, pp, tp, ep) : fmt::format("dp={},pp={},tp={}", dp, pp, tp);
}

MeshShape parse_mesh_shape(std::string_view spec) {
  auto fail = [&](const std::string& what) {
    return InputError(kMeshComponent, fmt::format("--parallel '{}': {} (expected dp=D,pp=P,tp=T,ep=E)", spec, what));
  };
  if (trim(spec).empty()) throw fail("empty");
  MeshShape shape;
  bool seen[4] = {false, false, false, false};
  std::string_view rest = spec;
  while (true) {
    const size_t comma = rest.find(',');
    const std::string_view item = trim(rest.substr(0, comma));
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos) throw fail(fmt::format("'{}' is not key=value", item));
    const std::string_view key = trim(item.substr(0, eq)), value = trim(item.substr(eq + 1));
    int* field = nullptr;
    int index = 0;
    if (key == "dp") {
      field = &shape.dp;
    } else if (key == "pp") {
      field = &shape.pp;
      index = 1;
    } else if (key == "tp") {
      field = &shape.tp;
      index = 2;
    } else if (key == "ep") {
      field = &shape.ep;
      index = 3;
    } else {
      throw fail(fmt::format("unknown key '{}' (dp, pp, tp or ep)", key));
    }
    if (seen[index]) throw fail(fmt::format("'{}' is given twice", key));
    seen[index] = true;
    int v = 0;
    const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
    if (ec != std::errc() || end != value.data() + value.size() || value.empty() || v <= 0)
      throw fail(fmt::format("{} = '{}' is not a positive whole number", key, value));
    *field = v;
    if (comma == std::string_view::npos) break;
    rest = rest.substr(comma + 1);
  }
  return shape;
}

MeshCoords mesh_coords(const MeshShape& shape, int rank) {
  const int inner = shape.pp * shape.tp;
  return {rank / (shape.ep * inner), rank / shape.tp % shape.pp, rank % shape.tp, rank / inner % shape.ep};
}

int mesh_rank(const MeshShape& shape, const MeshCoords& c) {
  return ((c.dp * shape.ep + c.ep) * shape.pp + c.pp) * shape.tp + c.tp;
}

std::vector<int> mesh_group_ranks(const MeshShape& shape, int rank, MeshDim dim) {
  std::vector<int> ranks;
  MeshCoords c = mesh_coords(shape, rank);
  for (int i = 0; i < shape.extent(dim); ++i) {
    (dim == MeshDim::dp ? c.dp : dim == MeshDim::pp ? c.pp : dim == MeshDim::tp ? c.tp : c.ep) = i;
    ranks.push_back(mesh_rank(shape, c));
  }
  return ranks;
}

Mesh::Mesh(comm::Communicator& world, const MeshShape& shape) : world_(world), shape_(shape) {
  if (shape.size() != world.size())
    throw InputError(kMeshComponent, fmt::format("--parallel {} makes {} ranks, but the job has {}: the product "
                                             "dp x ep x pp x tp must be the number of processes",
                                             shape.to_string(), shape.size(), world.size()));
  coords_ = mesh_coords(shape, world.rank());
  // A group is the ranks that share the other coordinates: their index is its color, and
  // its own coordinate orders it. Every rank takes part in every split, in the same order.
  const MeshCoords& c = coords_;
  const auto color = [&](MeshCoords k, MeshDim free) {
    (free == MeshDim::dp ? k.dp : free == MeshDim::pp ? k.pp : free == MeshDim::tp ? k.tp : k.ep) = 0;
    return mesh_rank(shape, k);
  };
  dp_ = world.split(color(c, MeshDim::dp), c.dp, {.name = "mesh dp"});
  pp_ = world.split(color(c, MeshDim::pp), c.pp, {.name = "mesh pp"});
  tp_ = world.split(color(c, MeshDim::tp), c.tp, {.name = "mesh tp"});
  ep_ = world.split(color(c, MeshDim::ep), c.ep, {.name = "mesh ep"});
  data_ = world.split(c.pp * shape.tp + c.tp, c.dp * shape.ep + c.ep, {.name = "mesh data"});
}

comm::Communicator& Mesh::group(MeshDim dim) {
  switch (dim) {
    case MeshDim::dp: return *dp_;
    case MeshDim::pp: return *pp_;
    case MeshDim::tp: return *tp_;
    case MeshDim::ep: break;
  }
  return *ep_;
}

}  // namespace flotilla::parallel
