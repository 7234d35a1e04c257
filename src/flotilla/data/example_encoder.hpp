// A record becomes tokens and a loss mask.
//
//   {"text"}                 BOS id + encode(text) + EOS id (BOS when tokenizer.add_bos(),
//                            EOS whenever the tokenizer has one)
//   {"prompt","completion"}  with a chat template: the conversation [user: prompt,
//                            assistant: completion] through it (as mlx_lm does); without:
//                            BOS id + prompt + completion + EOS id, the completion and EOS
//                            trainable
//   {"messages"}             through the chat template; InputError when there is none
//
// Loss mask: mask[i] = 1 when predicting token i (from tokens 0..i-1) is in the loss. mask[0]
// means nothing (no token predicts the first). Without mask_prompt every token is 1; with it
// only trainable segments' tokens are.
//
// Tokens are what encoding the whole rendered text gives, never a concatenation of
// separately encoded pieces (a BPE merge may span a boundary): each run of text segments is
// encoded once. The mask boundaries come from encoding the segments one by one when that
// reproduces the run's tokens (the usual case: boundaries fall at special tokens), else from
// encoding each prefix of the run, as mlx_lm finds its prompt offset.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "flotilla/data/chat_template.hpp"
#include "flotilla/data/jsonl_examples.hpp"
#include "flotilla/text/tokenizer.hpp"

namespace flotilla::data {

struct EncodeOptions {
  bool mask_prompt = false;
  // Longest example in tokens (inputs and the last target together); longer ones keep
  // their first max_seq_len tokens. 0: no limit.
  size_t max_seq_len = 0;
};

struct EncodedExample {
  std::vector<int32_t> tokens;  // (n,)
  std::vector<uint8_t> mask;    // (n,) 0 or 1
  size_t length_before_truncation = 0;
  size_t targets_before_truncation = 0;  // trainable_targets() before the cut at max_seq_len
  bool truncated() const { return length_before_truncation > tokens.size(); }
  // Tokens 1..n-1 with mask 1: the targets this example contributes.
  size_t trainable_targets() const;
};

class ExampleEncoder {
 public:
  // `tokenizer` must outlive the encoder.
  ExampleEncoder(const text::Tokenizer& tokenizer, std::optional<ChatTemplate> chat_template,
                 EncodeOptions options);

  // The record's segments before tokenization. ConversationError for a conversation the
  // template refuses; InputError (not a ConversationError) for a chat record and no template.
  std::vector<Segment> segments(const ExampleRecord& record) const;

  // segments() tokenized, masked and truncated.
  EncodedExample encode(const ExampleRecord& record) const;
  EncodedExample encode_segments(std::span<const Segment> segments) const;

  const std::optional<ChatTemplate>& chat_template() const { return chat_template_; }
  const EncodeOptions& options() const { return options_; }

 private:
  void encode_run(std::span<const Segment> run, EncodedExample& out) const;

  const text::Tokenizer& tokenizer_;
  std::optional<ChatTemplate> chat_template_;
  EncodeOptions options_;
};

}  // namespace flotilla::data
