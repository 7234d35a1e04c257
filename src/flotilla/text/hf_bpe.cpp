#include "flotilla/text/hf_bpe.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <queue>

#include "flotilla/base/error.hpp"
#include "flotilla/text/unicode_classes.hpp"

namespace flotilla::text {
namespace {

constexpr const char* kHfBpeComponent = "text/hf_tokenizer";

// Pieces with at most this many symbols merge by rescanning an array (no allocation,
// cache-friendly); longer ones (a whole SentencePiece sentence) use a heap.
constexpr size_t kShortPieceSymbols = 48;

// SentencePiece's word marker, U+2581 "▁".
constexpr std::string_view kWordMarker = "\xE2\x96\x81";

// First position at or after `from` where the marker follows a character other than the
// marker itself; npos if none.
size_t marker_after_other_char(std::string_view text, size_t from = 1) {
  for (size_t pos = text.find(kWordMarker, std::max<size_t>(from, 1)); pos != std::string_view::npos;
       pos = text.find(kWordMarker, pos + 1)) {
    if (pos < kWordMarker.size() || text.substr(pos - kWordMarker.size(), kWordMarker.size()) != kWordMarker) {
      return pos;
    }
  }
  return std::string_view::npos;
}

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

}  // namespace

// (left id, right id) -> (rank, merged id): open addressing with linear probing. The
// merge loop does one lookup per adjacent pair, so this is the hot table of encode().
struct BpeModel::MergeTable {
  struct Slot {
    uint64_t key = kEmpty;
    int32_t rank = 0;
    int32_t merged = 0;
  };
  static constexpr uint64_t kEmpty = ~uint64_t{0};  // ids are < 2^31: never a real key

  explicit MergeTable(size_t count) {
    size_t cap = 16;
    while (cap < count * 2) cap <<= 1;
    slots.resize(cap);
    mask = cap - 1;
  }
  static size_t hash(uint64_t key) { return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> 20); }

  // Later duplicates overwrite earlier ones (as a Rust HashMap built from the list does).
  void insert(uint64_t key, int32_t rank, int32_t merged) {
    for (size_t i = hash(key) & mask;; i = (i + 1) & mask) {
      if (slots[i].key == kEmpty || slots[i].key == key) {
        slots[i] = {key, rank, merged};
        return;
      }
    }
  }
  const Slot* find(uint64_t key) const {
    for (size_t i = hash(key) & mask;; i = (i + 1) & mask) {
      if (slots[i].key == key) return &slots[i];
      if (slots[i].key == kEmpty) return nullptr;
    }
  }

  std::vector<Slot> slots;
  size_t mask = 0;
};

// Piece -> ids, for pieces seen before. Sharded so that threads encoding in parallel
// rarely meet on a lock; a full shard is simply cleared (prose repeats its common words
// quickly, so they are back in the cache within a few sentences).
struct BpeModel::PieceCache {
  static constexpr size_t kShards = 32;
  static constexpr size_t kEntriesPerShard = 4096;
  static constexpr size_t kMaxPieceBytes = 256;  // longer pieces are rare: not cached

  struct Shard {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int32_t>, KeyHash, std::equal_to<>> entries;
  };
  std::array<Shard, kShards> shards;

  static size_t shard_of(size_t hash) { return (hash >> 7) % kShards; }
};

BpeModel::BpeModel(std::vector<std::pair<std::string, int32_t>> vocab,
                   const std::vector<std::pair<std::string, std::string>>& merges,
                   BpeOptions options, std::string_view source)
    : options_(options), cache_(std::make_unique<PieceCache>()) {
  vocab_.reserve(vocab.size());
  for (auto& [key, id] : vocab) vocab_.insert_or_assign(std::move(key), id);

  byte_ids_.fill(-1);
  byte_fallback_ids_.fill(-1);
  for (int b = 0; b < 256; ++b) {
    if (options_.byte_level) byte_ids_[b] = find(std::string(1, static_cast<char>(b)));
    if (options_.byte_fallback) byte_fallback_ids_[b] = find(fmt::format("<0x{:02X}>", b));
  }

  if (!options_.byte_level && find(kWordMarker) >= 0) {
    split_words_ = std::none_of(vocab_.begin(), vocab_.end(), [](const auto& entry) {
      return marker_after_other_char(entry.first) != std::string_view::npos;
    });
  }

  merges_ = std::make_unique<MergeTable>(merges.size());
  merge_count_ = merges.size();
  std::string joined;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [left, right] = merges[rank];
    const int32_t left_id = find(left);
    const int32_t right_id = find(right);
    joined.assign(left).append(right);
    const int32_t merged_id = find(joined);
    const std::string_view missing = left_id < 0 ? std::string_view(left)
                                     : right_id < 0 ? std::string_view(right)
                                     : merged_id < 0 ? std::string_view(joined)
                                                     : std::string_view();
    if (left_id < 0 || right_id < 0 || merged_id < 0) {
      throw InputError(kHfBpeComponent,
                       fmt::format("{}: merge {} uses a token that is not in the vocabulary "
                                   "(its bytes: {:?})",
                                   source, rank, std::string(missing)));
    }
    merges_->insert(pair_key(left_id, right_id), static_cast<int32_t>(rank), merged_id);
  }
}

BpeModel::~BpeModel() = default;

int32_t BpeModel::find(std::string_view key) const {
  const auto it = vocab_.find(key);
  return it == vocab_.end() ? -1 : it->second;
}

void BpeModel::initial_symbols(std::string_view piece, std::vector<int32_t>& symbols) const {
  bool last_was_unk = false;
  size_t pos = 0;
  while (pos < piece.size()) {
    size_t len = 1;
    int32_t id;
    if (options_.byte_level) {
      id = byte_ids_[static_cast<unsigned char>(piece[pos])];
    } else {
      len = decode_utf8(piece, pos).len;
      id = find(piece.substr(pos, len));
    }
    const std::string_view unit = piece.substr(pos, len);
    pos += len;
    if (id >= 0) {
      symbols.push_back(id);
      last_was_unk = false;
      continue;
    }
    if (options_.byte_fallback) {
      bool all = true;
      for (const char b : unit) all = all && byte_fallback_ids_[static_cast<unsigned char>(b)] >= 0;
      if (all) {
        for (const char b : unit) symbols.push_back(byte_fallback_ids_[static_cast<unsigned char>(b)]);
        last_was_unk = false;
        continue;
      }
    }
    if (options_.unk_id < 0) continue;  // no unk token: the unit is dropped
    if (!(options_.fuse_unk && last_was_unk)) symbols.push_back(options_.unk_id);
    last_was_unk = true;
  }
}

void BpeModel::merge_short(std::vector<int32_t>& symbols) const {
  // ranks[i]: rank of the pair (symbols[i], symbols[i+1]), INT32_MAX if it never merges.
  constexpr int32_t kNoMerge = INT32_MAX;
  std::array<int32_t, kShortPieceSymbols> ranks;
  std::array<int32_t, kShortPieceSymbols> merged;
  size_t n = symbols.size();
  auto look = [&](size_t i) {
    const MergeTable::Slot* slot = merges_->find(pair_key(symbols[i], symbols[i + 1]));
    ranks[i] = slot ? slot->rank : kNoMerge;
    merged[i] = slot ? slot->merged : -1;
  };
  for (size_t i = 0; i + 1 < n; ++i) look(i);
  while (n > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < n; ++i) {
      if (ranks[i] < ranks[best]) best = i;
    }
    if (ranks[best] == kNoMerge) break;
    symbols[best] = merged[best];
    // Close the gap left by symbols[best + 1].
    for (size_t i = best + 1; i + 1 < n; ++i) symbols[i] = symbols[i + 1];
    for (size_t i = best + 1; i + 2 < n; ++i) {
      ranks[i] = ranks[i + 1];
      merged[i] = merged[i + 1];
    }
    --n;
    if (best > 0) look(best - 1);
    if (best + 1 < n) look(best);
  }
  symbols.resize(n);
}

void BpeModel::merge_long(std::vector<int32_t>& symbols) const {
  struct Node {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;  // index of the left node; node order never changes, so leftmost = smallest
    int32_t merged;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  const auto n = static_cast<int32_t>(symbols.size());
  std::vector<Node> nodes(n);
  for (int32_t i = 0; i < n; ++i) nodes[i] = {symbols[i], i - 1, i + 1 < n ? i + 1 : -1, true};
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  auto push = [&](int32_t left) {
    const int32_t right = nodes[left].next;
    if (right < 0) return;
    if (const MergeTable::Slot* slot = merges_->find(pair_key(nodes[left].id, nodes[right].id))) {
      queue.push({slot->rank, left, slot->merged});
    }
  };
  for (int32_t i = 0; i + 1 < n; ++i) push(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Node& left = nodes[top.pos];
    if (!left.alive || left.next < 0) continue;
    Node& right = nodes[left.next];
    // Stale entry: the pair at this position changed since it was queued.
    const MergeTable::Slot* slot = merges_->find(pair_key(left.id, right.id));
    if (!slot || slot->rank != top.rank || slot->merged != top.merged) continue;
    left.id = top.merged;
    right.alive = false;
    left.next = right.next;
    if (left.next >= 0) nodes[left.next].prev = top.pos;
    if (left.prev >= 0) push(left.prev);
    push(top.pos);
  }
  symbols.clear();
  for (int32_t i = 0; i >= 0 && i < n; i = nodes[i].next) symbols.push_back(nodes[i].id);
}

void BpeModel::encode_piece(std::string_view piece, std::vector<int32_t>& ids) const {
  if (!split_words_) {
    encode_word(piece, ids);
    return;
  }
  size_t begin = 0;
  for (size_t cut = marker_after_other_char(piece); cut != std::string_view::npos;
       cut = marker_after_other_char(piece, cut + 1)) {
    encode_word(piece.substr(begin, cut - begin), ids);
    begin = cut;
  }
  encode_word(piece.substr(begin), ids);
}

void BpeModel::encode_word(std::string_view piece, std::vector<int32_t>& ids) const {
  if (piece.empty()) return;
  if (options_.ignore_merges) {
    if (const int32_t id = find(piece); id >= 0) {
      ids.push_back(id);
      return;
    }
  }
  const bool cacheable = piece.size() <= PieceCache::kMaxPieceBytes;
  const size_t hash = KeyHash{}(piece);
  PieceCache::Shard& shard = cache_->shards[PieceCache::shard_of(hash)];
  if (cacheable) {
    std::lock_guard lock(shard.mutex);
    if (const auto it = shard.entries.find(piece); it != shard.entries.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> symbols;
  symbols.reserve(piece.size());
  initial_symbols(piece, symbols);
  if (symbols.size() <= kShortPieceSymbols) {
    merge_short(symbols);
  } else {
    merge_long(symbols);
  }
  ids.insert(ids.end(), symbols.begin(), symbols.end());
  if (cacheable) {
    std::lock_guard lock(shard.mutex);
    if (shard.entries.size() >= PieceCache::kEntriesPerShard) shard.entries.clear();
    shard.entries.emplace(std::string(piece), std::move(symbols));
  }
}

}  // namespace flotilla::text
