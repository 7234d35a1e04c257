// Mismatch detection (after Horovod): before a collective moves data, ranks agree that
// they are running the same one. Each collective gets a Signature: its sequence number
// on the communicator, what it is (kind, name, count, element type, root, reduction) and
// a hash of all of it. Backends exchange signatures (thread: through the rendezvous, for
// free; MPI: see mpi_communicator.cpp) and, when they differ, every rank throws the same
// MismatchError naming the ranks and the operations:
//   [comm] collective mismatch at #17: rank 0 all_reduce(grads, 1024 x f32, sum)
//          vs rank 1 broadcast(params, 1024 x f32, root 0)
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

#include "flotilla/comm/buffer_view.hpp"
#include "flotilla/comm/reduce.hpp"

namespace flotilla::comm {

enum class CollectiveKind : uint8_t {
  all_reduce,
  broadcast,
  all_gather,
  reduce_scatter,
  all_to_all,
  barrier,
  split
};

std::string_view collective_name(CollectiveKind kind);  // "all_reduce", ...

// Fixed 64 bytes of plain data, so it travels as raw bytes between ranks.
struct Signature {
  static constexpr size_t kNameBytes = 32;

  uint64_t seq = 0;    // 1 for a communicator's first collective
  uint64_t count = 0;  // elements per rank: the buffer (all_reduce, broadcast), the
                       // input (all_gather), the output (reduce_scatter), or one chunk
                       // (all_to_all); 0 for barrier and split
  uint64_t hash = 0;   // of every field here and of the whole name
  int32_t root = -1;   // broadcast only
  CollectiveKind kind = CollectiveKind::barrier;
  ElementType type = ElementType::u8;
  ReduceOp reduce = ReduceOp::sum;  // reductions only
  uint8_t name_bytes = 0;
  char name[kNameBytes] = {};  // truncated; the hash covers the whole name

  static Signature make(uint64_t seq, CollectiveKind kind, std::string_view name,
                        uint64_t count, ElementType type, int root, ReduceOp reduce);

  // "all_reduce(grads, 1024 x f32, sum)", "broadcast(params, 7 x i32, root 0)", "barrier()"
  std::string describe() const;
  std::string_view name_view() const { return {name, name_bytes}; }
};
static_assert(sizeof(Signature) == 64 && std::is_trivially_copyable_v<Signature>);

// Empty when every rank's signature has the same hash; otherwise the message of the
// MismatchError (without the "[comm] " prefix). Ranks with equal signatures are grouped.
std::string find_mismatch(std::span<const Signature> by_rank);

}  // namespace flotilla::comm
