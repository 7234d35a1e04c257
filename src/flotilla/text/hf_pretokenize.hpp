// Split patterns of byte-level BPE tokenizers, matched by hand.
//
// A tokenizer.json names its pre-tokenizer split as an Oniguruma regex. flotilla carries
// no regex engine: the few patterns in use are recognised by their exact text and run by
// a matcher written for each, which follows the regex's leftmost-first alternation and
// backtracking to the letter (the reference tests compare against Hugging Face's own
// tokenizers). An unknown pattern is refused when the tokenizer is loaded.
//
//   kGpt2    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//            (GPT-2, RoBERTa; also the built-in pattern of the ByteLevel pre-tokenizer)
//   kLlama3  (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//             ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//   kQwen2   the same with \p{N} instead of \p{N}{1,3}
//
// Vocabulary: a *piece* is one match; the matches tile the text (every one of these
// patterns matches at every position), so splitting with behaviour Isolated yields exactly
// the matches, in order, covering every byte once.
#pragma once

#include <optional>
#include <string_view>
#include <vector>

namespace flotilla::text {

enum class SplitPattern { kGpt2, kLlama3, kQwen2 };

// The pattern a regex string from tokenizer.json is, or nullopt for any other regex.
std::optional<SplitPattern> recognize_split_pattern(std::string_view regex);

// Short name for messages ("gpt2", "llama3", "qwen2").
const char* split_pattern_name(SplitPattern pattern);

// Appends the pieces of `text` to `pieces` (views into `text`). Text that is not valid
// UTF-8 is split too: each malformed byte counts as one non-letter, non-number character.
void split_with_pattern(SplitPattern pattern, std::string_view text,
                        std::vector<std::string_view>& pieces);

}  // namespace flotilla::text
