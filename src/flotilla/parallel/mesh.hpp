// The device mesh: the world's ranks as a grid dp x ep x pp x tp, as picotron's process
// grid. Tensor-parallel ranks are adjacent (they exchange the most, every block: on one
// host they share memory bandwidth rather than a network), then pipeline stages, then
// expert-parallel ranks, then data replicas:
//     rank = ((dp_index * ep + ep_index) * pp + pp_index) * tp + tp_index.
// Expert parallelism lives inside data parallelism: the ep ranks of a group each hold
// their share of every MoE layer's experts and exchange token rows with an all-to-all,
// but for everything else (attention, router, norms, embeddings) they are data replicas,
// as the dp ranks are. So a rank has, besides its dp, ep, pp and tp groups, a *data*
// group of dp x ep ranks (those sharing its pp and tp coordinates) that averages the
// replicated parameters' gradients; the dp group alone averages its experts' gradients.
// Each rank belongs to one group per dimension — the ranks that differ from it in that
// coordinate only — made once, with Communicator::split, when the mesh is built. A
// one-rank world is the 1x1x1 mesh, whose groups are one rank each: no code path is "not
// distributed".
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/comm/communicator.hpp"

namespace flotilla::parallel {

enum class MeshDim : uint8_t { dp, pp, tp, ep };

struct MeshShape {
  int dp = 1, pp = 1, tp = 1, ep = 1;
  int size() const { return dp * ep * pp * tp; }
  int extent(MeshDim d) const {
    return d == MeshDim::dp ? dp : d == MeshDim::pp ? pp : d == MeshDim::tp ? tp : ep;
  }
  std::string to_string() const;  // "dp=2,pp=1,tp=2", with ",ep=E" when ep > 1
  bool operator==(const MeshShape&) const = default;
};

// `--parallel dp=D,pp=P,tp=T,ep=E`: keys in any order, each at most once; a key left out is 1.
// InputError (naming the spec) for an unknown key, a repeated key, a value that is not a
// positive integer, or an empty spec.
MeshShape parse_mesh_shape(std::string_view spec);

// A rank's place in the grid.
struct MeshCoords {
  int dp = 0, pp = 0, tp = 0, ep = 0;
  int of(MeshDim d) const { return d == MeshDim::dp ? dp : d == MeshDim::pp ? pp : d == MeshDim::tp ? tp : ep; }
  bool operator==(const MeshCoords&) const = default;
};
MeshCoords mesh_coords(const MeshShape& shape, int rank);
int mesh_rank(const MeshShape& shape, const MeshCoords& coords);
// The world ranks of `rank`'s group along `dim`, in group-rank order (by that coordinate).
std::vector<int> mesh_group_ranks(const MeshShape& shape, int rank, MeshDim dim);

class Mesh {
 public:
  // Splits `world` (which must outlive the mesh) into this rank's dp, pp, tp, ep and data
  // groups;
  // every rank of the world calls it with the same shape. InputError when the shape's
  // product is not the world's size.
  Mesh(comm::Communicator& world, const MeshShape& shape);

  const MeshShape& shape() const { return shape_; }
  const MeshCoords& coords() const { return coords_; }
  comm::Communicator& world() { return world_; }
  comm::Communicator& group(MeshDim dim);
  comm::Communicator& dp_group() { return group(MeshDim::dp); }
  comm::Communicator& pp_group() { return group(MeshDim::pp); }
  comm::Communicator& tp_group() { return group(MeshDim::tp); }
  comm::Communicator& ep_group() { return group(MeshDim::ep); }
  // The dp x ep ranks that share this rank's pp and tp coordinates, ordered by
  // (dp, ep) index: the data replicas of everything but the experts (the same ranks as
  // the dp group while ep = 1).
  comm::Communicator& data_group() { return *data_; }

 private:
  comm::Communicator& world_;
  MeshShape shape_;
  MeshCoords coords_;
  std::unique_ptr<comm::Communicator> dp_, pp_, tp_, ep_, data_;
};

}  // namespace flotilla::parallel
