// flotilla data prepare: JSONL examples -> a folder of token shards (token_dataset.hpp).
//
// Input, as mlx_lm lays it out:
//   a folder  train.jsonl (required), valid.jsonl, test.jsonl (optional)
//   one file  split three ways by fractions (e.g. 0.9, 0.05, 0.05): its non-blank lines are
//             shuffled with the seed (flotilla::Rng, Fisher-Yates), the first share goes to
//             train, the next to valid, the rest to test, and each split keeps file order.
//             A line's split depends only on the file, the seed and the fractions, never on
//             the tokenizer or the other options.
//
// Each line is parsed (jsonl_examples.hpp), rendered and encoded (example_encoder.hpp),
// truncated at max_seq_len and appended to its split's shard. Examples with no target in the
// loss (mask_prompt with no assistant tokens left, or fewer than two tokens) are left out and
// counted as "no_trainable_tokens".
//
// Output: written into OUT.tmp, then renamed to OUT. An OUT that exists and is not empty is
// refused unless `force`, which replaces it whole (after the new data is complete).
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include "flotilla/data/chat_template.hpp"
#include "flotilla/data/token_dataset.hpp"
#include "flotilla/text/tokenizer.hpp"

namespace flotilla::data {

struct PrepareOptions {
  std::filesystem::path data;  // a folder with train.jsonl [valid.jsonl] [test.jsonl], or one file
  std::filesystem::path out;
  // Fractions for train, valid, test: required with one file, refused with a folder.
  std::optional<std::array<double, 3>> split;
  bool mask_prompt = false;
  size_t max_seq_len = 0;  // 0: no truncation
  bool skip_invalid = false;
  uint64_t seed = 0;
  bool force = false;
  // A split's shard is closed once it holds this many tokens (whole examples only). Tests
  // make it small to exercise several shards per split.
  uint64_t max_shard_tokens = uint64_t{64} << 20;
};

// "0.9,0.05,0.05" (or "0.9,0.1": no test split). Each fraction in [0, 1], train > 0, sum 1
// (within 1e-6). InputError otherwise.
std::array<double, 3> parse_split_fractions(std::string_view text);

// Prepares the data with this tokenizer and chat template (nullopt: the model has none; a
// {"messages"} line is then an error). Returns the index it wrote to options.out/index.json.
// InputError naming the file (and line) for bad input; nothing in an existing OUT is touched
// when it fails.
DatasetIndex prepare(const PrepareOptions& options, const text::Tokenizer& tokenizer,
                     const std::optional<ChatTemplate>& chat_template);

// The tokenizer and chat template of a model directory (Tokenizer::load_for_model,
// resolve_chat_template with `chat_template_name` as the override), then prepare().
DatasetIndex prepare_for_model(const std::filesystem::path& model_dir, std::string_view chat_template_name,
                               const PrepareOptions& options);

// A folder of mlx_lm's layout not yet prepared: train.jsonl and no index.json.
bool is_unprepared_data_folder(const std::filesystem::path& dir);

// Data prepared for one run (`flotilla train --data FOLDER` with an mlx_lm folder): prepare()
// into a fresh temporary folder, removed with this object. options.out is ignored.
class TemporaryPreparedData {
 public:
  TemporaryPreparedData(PrepareOptions options, const text::Tokenizer& tokenizer,
                        const std::optional<ChatTemplate>& chat_template);
  ~TemporaryPreparedData();
  TemporaryPreparedData(const TemporaryPreparedData&) = delete;
  TemporaryPreparedData& operator=(const TemporaryPreparedData&) = delete;

  const std::filesystem::path& dir() const { return dir_; }
  const DatasetIndex& index() const { return index_; }

 private:
  std::filesystem::path root_;  // the temporary folder; dir_ = root_/data
  std::filesystem::path dir_;
  DatasetIndex index_;
};

// The summary as a text table: one row per split (examples, tokens, trainable, truncated,
// longest, skipped with reasons), for the CLI to print.
std::string format_prepare_summary(const DatasetIndex& index);

}  // namespace flotilla::data
