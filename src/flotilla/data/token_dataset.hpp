// A prepared dataset folder (written by `flotilla data prepare`, read by training):
//
//   index.json          what was prepared and how: format version, tokenizer (name,
//                       fingerprint, vocab size), chat template, mask_prompt, max_seq_len,
//                       and per split its shards and counts
//   train-00000.fltk    token shards (token_shards.hpp), one or more per split
//   valid-00000.fltk
//   test-00000.fltk
//
// index.json:
//   {"format": "flotilla-token-shards", "version": 1,
//    "tokenizer": {"name", "fingerprint", "vocab_size", "bos_id", "eos_id"},
//    "chat_template": "llama3" | null, "mask_prompt": bool, "max_seq_len": int (0: none),
//    "source": "<input path>", "seed": int, "split_fractions": [train, valid, test] | null,
//    "splits": {"train": {"shards": [{"file", "examples", "tokens", "bytes", "crc32c"}], "examples",
//               "tokens", "trainable_tokens", "truncated", "truncated_targets", "longest",
//               "longest_before_truncation", "skipped": {"<reason>": count}}, ...}}
// ("truncated_targets" is absent from datasets prepared before it was counted.)
// A split whose input file was absent is absent; one whose lines were all skipped has no shards.
//
// "crc32c" (8 hex digits, base/crc32c.hpp) is the checksum of the shard file as written, read
// back from disk; opening the folder checks it, so a corrupted shard is refused before
// training reads a token of it. Folders prepared before checksums existed have none and
// still open: every structural fault and every out-of-range token id is caught by the
// shard reader anyway, so what goes unchecked there is only a flipped bit that leaves a
// valid token, and refusing them would force a re-prepare of data that cannot crash a run.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/data/batch_sampler.hpp"
#include "flotilla/data/jsonl_examples.hpp"
#include "flotilla/data/token_shards.hpp"
#include "flotilla/text/tokenizer.hpp"

namespace flotilla::data {

enum class Split { train, valid, test };
inline constexpr std::array<Split, 3> kSplits = {Split::train, Split::valid, Split::test};
std::string_view split_name(Split split);

// The skip reason of an example whose targets all lay past max_seq_len (mask_prompt with a
// prompt that fills the first max_seq_len tokens): the cut left it nothing to learn.
inline constexpr const char* kNoTargetsAfterTruncation = "no_targets_after_truncation";

inline constexpr const char* kIndexFile = "index.json";
inline constexpr const char* kIndexFormat = "flotilla-token-shards";
inline constexpr int kIndexVersion = 1;

struct ShardEntry {
  std::string file;  // name inside the dataset folder
  uint64_t examples = 0;
  uint64_t tokens = 0;
  uint64_t bytes = 0;
  std::optional<uint32_t> crc32c;  // absent in folders prepared before checksums
};

struct SplitStats {
  uint64_t examples = 0;
  uint64_t tokens = 0;
  uint64_t trainable_tokens = 0;  // targets in the loss (mask 1, not counting each first token)
  uint64_t truncated = 0;         // examples cut at max_seq_len (kept ones)
  uint64_t truncated_targets = 0;  // target tokens the cut at max_seq_len lost, left-out examples' too
  uint64_t longest = 0;           // tokens of the longest example as stored
  uint64_t longest_before_truncation = 0;
  SkipCounts skipped;             // lines left out, by reason
};

struct SplitIndex {
  SplitStats stats;
  std::vector<ShardEntry> shards;
};

struct DatasetIndex {
  std::string tokenizer_name;
  std::string tokenizer_fingerprint;
  uint32_t vocab_size = 0;
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  std::optional<std::string> chat_template;  // ChatTemplate::describe()
  bool mask_prompt = false;
  uint64_t max_seq_len = 0;
  std::string source;
  uint64_t seed = 0;
  std::optional<std::array<double, 3>> split_fractions;
  std::map<Split, SplitIndex> splits;  // the splits that had input
};

// The row length (--seq-len) a prepared dataset asks for, so that training keeps what
// prepare kept: its max_seq_len, or, prepared without one, its longest training example up
// to kLongestDefaultSeqLen (mlx_lm's default --max-seq-length); longer ones are then cut,
// and training says so.
inline constexpr int64_t kLongestDefaultSeqLen = 2048;
int64_t prepared_seq_len(const DatasetIndex& index);

nlohmann::json index_to_json(const DatasetIndex& index);
// InputError "<source>: ..." for a missing or mistyped field, an unknown format or version.
DatasetIndex index_from_json(const nlohmann::json& j, std::string_view source);

class TokenDataset {
 public:
  // Reads dir/index.json and opens and validates every shard it lists: each shard's
  // header must agree with the index (fingerprint, vocab size, examples, tokens, bytes),
  // and its CRC-32C with the index's when the index has one.
  // InputError naming the file for anything missing, corrupt or inconsistent.
  static TokenDataset open(const std::filesystem::path& dir);
  // open(dir) + check_tokenizer(tokenizer).
  static TokenDataset open(const std::filesystem::path& dir, const text::Tokenizer& tokenizer);

  // InputError "<dir>: prepared with tokenizer <a> but the model's tokenizer is <b>: re-run
  // flotilla data prepare" when the fingerprints differ.
  void check_tokenizer(const text::Tokenizer& tokenizer) const;
  void check_tokenizer(std::string_view fingerprint, std::string_view name) const;

  const std::filesystem::path& dir() const { return dir_; }
  const DatasetIndex& index() const { return index_; }
  bool has_split(Split split) const { return num_examples(split) > 0; }
  size_t num_examples(Split split) const;  // 0 for an absent split
  uint64_t num_tokens(Split split) const;
  // i < num_examples(split), else flotilla::Error (a caller bug).
  ExampleView example(Split split, size_t i) const;

  // One split as a BatchSampler's ExampleSource; the dataset must outlive it.
  class SplitExamples final : public ExampleSource {
   public:
    SplitExamples(const TokenDataset& dataset, Split split) : dataset_(&dataset), split_(split) {}
    size_t num_examples() const override { return dataset_->num_examples(split_); }
    ExampleView example(size_t i) const override { return dataset_->example(split_, i); }

   private:
    const TokenDataset* dataset_;
    Split split_;
  };
  SplitExamples examples(Split split) const { return SplitExamples(*this, split); }

 private:
  struct SplitShards {
    std::vector<ShardReader> shards;
    std::vector<size_t> first_example;  // (shards + 1,) prefix sums of examples
    uint64_t tokens = 0;
  };
  std::filesystem::path dir_;
  DatasetIndex index_;
  std::array<SplitShards, 3> splits_;
};

}  // namespace flotilla::data
