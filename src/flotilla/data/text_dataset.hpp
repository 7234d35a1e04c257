// The small data path for pretraining: a text file becomes one token stream, and a
// BatchSource cuts (B, T) windows out of it. Vocabulary:
//   document  one unit of text: a paragraph of a plain-text file, or one JSONL line's "text"
//   stream    every document encoded and wrapped as BOS + tokens + EOS, concatenated
//   window    T + 1 consecutive stream tokens at some offset: inputs are the first T,
//             targets the last T (targets[t] = stream[offset + t + 1])
// The full pipeline (prompt/completion and chat formats, token shards, rank-aware
// sampling) replaces the readers later behind the same BatchSource interface.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/base/rng.hpp"
#include "flotilla/text/tokenizer.hpp"

namespace flotilla::data {

// ---- Reading documents ----------------------------------------------------------------

enum class TextFormat { plain, jsonl };

// JSONL if the path ends in ".jsonl" or the first non-blank character of `content` is
// '{'; plain text otherwise.
TextFormat detect_text_format(const std::filesystem::path& path, std::string_view content);

// Plain text: documents are paragraphs separated by one or more blank (whitespace-only)
// lines; a paragraph keeps its inner newlines, "\r\n" becomes "\n".
std::vector<std::string> split_paragraphs(std::string_view content);

// JSONL: one {"text": "..."} object per non-blank line; other keys are ignored, empty
// texts are skipped. `source` names the file in errors: InputError "<source>:<line>: ...".
std::vector<std::string> parse_jsonl_texts(std::string_view content, std::string_view source);

// Reads the documents of a file in either format (a UTF-8 BOM is skipped).
// InputError naming the file if it cannot be read or holds no document.
std::vector<std::string> read_documents(const std::filesystem::path& path);

// ---- Token stream ---------------------------------------------------------------------

// BOS + encode(doc) + EOS for each document, concatenated.
std::vector<int32_t> tokenize_documents(std::span<const std::string> documents,
                                        const text::Tokenizer& tokenizer);

struct TextDataset {
  std::filesystem::path path;
  TextFormat format = TextFormat::plain;
  size_t num_documents = 0;
  std::vector<int32_t> tokens;  // (num_tokens,) the stream
};

// read_documents + tokenize_documents.
TextDataset load_text_dataset(const std::filesystem::path& path, const text::Tokenizer& tokenizer);

struct StreamSplit {
  std::vector<int32_t> train;
  std::vector<int32_t> valid;
};

// The last `valid_fraction` of the stream (rounded down to whole tokens) is validation,
// the rest training. The cut may fall inside a document. valid_fraction in [0, 1).
StreamSplit split_train_valid(std::span<const int32_t> stream, double valid_fraction);

// ---- Batches ------------------------------------------------------------------------

// Produces training or evaluation batches. State is a JSON object so a checkpoint can
// store it beside the step and RNG state; set_state(state()) on a source built from the
// same stream continues exactly where it left off.
// One micro-batch as the model takes it. doc_start is empty for plain rows; for rows that
// pack several examples it gives, per position, where that position's example starts.
struct Batch {
  int64_t B = 0, T = 0;
  std::vector<int32_t> tokens;     // (B, T) input ids
  std::vector<int32_t> targets;    // (B, T) next-token ids, -100 where no loss
  std::vector<int32_t> doc_start;  // (B, T) or empty
};

class BatchSource {
 public:
  virtual ~BatchSource() = default;
  // Fills batch.tokens and batch.targets for batch.B x batch.T (set by the caller); the
  // default has no packing, so it leaves doc_start empty.
  virtual void next_batch(Batch& batch) {
    batch.tokens.resize(static_cast<size_t>(batch.B * batch.T));
    batch.targets.resize(batch.tokens.size());
    batch.doc_start.clear();
    next_batch(batch.tokens.data(), batch.targets.data(), static_cast<int>(batch.B), static_cast<int>(batch.T));
  }
  // tokens:  (B, T) row-major, input ids
  // targets: (B, T) row-major, targets[b, t] = the token after tokens[b, t]
  // InputError if the stream is shorter than T + 1 tokens.
  virtual void next_batch(int32_t* tokens, int32_t* targets, int B, int T) = 0;
  virtual nlohmann::json state() const = 0;
  // InputError if `state` was written by another kind of source or for a stream of a
  // different length.
  virtual void set_state(const nlohmann::json& state) = 0;
};

// Training: each row is a window at an offset drawn uniformly from [0, n - T) with a
// flotilla::Rng (one below() draw per row, in row order). Same stream and seed, same
// batches, on every machine.
class RandomWindowSource final : public BatchSource {
 public:
  using BatchSource::next_batch;
  RandomWindowSource(std::vector<int32_t> stream, uint64_t seed);
  void next_batch(int32_t* tokens, int32_t* targets, int B, int T) override;
  nlohmann::json state() const override;  // {"kind": "random_window", "stream_tokens", "rng": [4 words]}
  void set_state(const nlohmann::json& state) override;
  size_t stream_tokens() const { return stream_.size(); }

 private:
  std::vector<int32_t> stream_;  // (n,)
  Rng rng_;
};

// Evaluation: consecutive non-overlapping windows — row r of the k-th window starts at
// offset k*T — in row-major order across batches. When the next window would run past
// the end it wraps to offset 0, so the last (n - 1) % T tokens' targets are never seen;
// one pass is windows_per_pass(n, T) windows.
class SequentialWindowSource final : public BatchSource {
 public:
  using BatchSource::next_batch;
  explicit SequentialWindowSource(std::vector<int32_t> stream);
  void next_batch(int32_t* tokens, int32_t* targets, int B, int T) override;
  nlohmann::json state() const override;  // {"kind": "sequential_window", "stream_tokens", "offset"}
  void set_state(const nlohmann::json& state) override;
  void reset() { offset_ = 0; }
  size_t stream_tokens() const { return stream_.size(); }
  static size_t windows_per_pass(size_t stream_tokens, int T);

 private:
  std::vector<int32_t> stream_;  // (n,)
  size_t offset_ = 0;            // start of the next window
};

}  // namespace flotilla::data
