#include "flotilla/comm/signature.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace flotilla::comm {
namespace {

// FNV-1a, 64 bit: a few dozen bytes per collective, so speed is irrelevant; what matters
// is that every rank computes the same value, which a fixed byte order guarantees.
struct Fnv1a {
  uint64_t h = 0xcbf29ce484222325ull;
  void bytes(const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  }
  template <class T>
  void value(T v) {
    bytes(&v, sizeof v);
  }
};

}  // namespace

std::string_view collective_name(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::all_reduce: return "all_reduce";
    case CollectiveKind::broadcast: return "broadcast";
    case CollectiveKind::all_gather: return "all_gather";
    case CollectiveKind::reduce_scatter: return "reduce_scatter";
    case CollectiveKind::all_to_all: return "all_to_all";
    case CollectiveKind::barrier: return "barrier";
    case CollectiveKind::split: return "split";
  }
  return "?";
}

Signature Signature::make(uint64_t seq, CollectiveKind kind, std::string_view name,
                          uint64_t count, ElementType type, int root, ReduceOp reduce) {
  Signature s;
  s.seq = seq;
  s.count = count;
  s.root = root;
  s.kind = kind;
  s.type = type;
  s.reduce = reduce;
  s.name_bytes = static_cast<uint8_t>(std::min(name.size(), kNameBytes));
  if (s.name_bytes) std::memcpy(s.name, name.data(), s.name_bytes);
  Fnv1a h;
  h.value(seq);
  h.value(count);
  h.value(root);
  h.value(static_cast<uint8_t>(kind));
  h.value(static_cast<uint8_t>(type));
  h.value(static_cast<uint8_t>(reduce));
  h.value(name.size());
  h.bytes(name.data(), name.size());
  s.hash = h.h;
  return s;
}

std::string Signature::describe() const {
  std::string args(name_view());
  auto add = [&args](std::string_view part) {
    if (!args.empty()) args += ", ";
    args += part;
  };
  const bool moves_data = kind != CollectiveKind::barrier && kind != CollectiveKind::split;
  if (moves_data) add(fmt::format("{} x {}", count, element_name(type)));
  if (kind == CollectiveKind::all_reduce || kind == CollectiveKind::reduce_scatter)
    add(reduce_name(reduce));
  if (kind == CollectiveKind::broadcast) add(fmt::format("root {}", root));
  return fmt::format("{}({})", collective_name(kind), args);
}

std::string find_mismatch(std::span<const Signature> by_rank) {
  if (by_rank.empty()) return {};
  const bool all_equal = std::all_of(by_rank.begin(), by_rank.end(), [&](const Signature& s) {
    return s.hash == by_rank[0].hash;
  });
  if (all_equal) return {};

  // Groups of ranks with the same signature, in order of their lowest rank.
  struct Group {
    const Signature* signature;
    std::vector<int> ranks;
  };
  std::vector<Group> groups;
  for (size_t r = 0; r < by_rank.size(); ++r) {
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const Group& g) { return g.signature->hash == by_rank[r].hash; });
    if (it == groups.end()) groups.push_back({&by_rank[r], {}}), it = groups.end() - 1;
    it->ranks.push_back(static_cast<int>(r));
  }
  const uint64_t seq = by_rank[0].seq;
  std::string message = fmt::format("collective mismatch at #{}: ", seq);
  for (size_t g = 0; g < groups.size(); ++g) {
    const Group& group = groups[g];
    if (g > 0) message += " vs ";
    message += fmt::format("{} {}", group.ranks.size() == 1 ? "rank" : "ranks",
                           fmt::join(group.ranks, ", "));
    // A rank that skipped or repeated a collective is at another number: say so.
    if (group.signature->seq != seq) message += fmt::format(" at #{}", group.signature->seq);
    message += ' ';
    message += group.signature->describe();
  }
  return message;
}

}  // namespace flotilla::comm
