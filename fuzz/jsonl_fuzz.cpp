// libFuzzer target for the JSONL example reader and what consumes its records: parsing
// (UTF-8 and JSON validation, formats, roles), chat template rendering for every family,
// template detection, and encoding with the byte tokenizer under mask_prompt and truncation.
// Bad input may only ever be an InputError; the invariants below must hold for the rest.
//   ./jsonl_fuzz -max_total_time=300 ../fuzz/corpus/jsonl
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "flotilla/base/error.hpp"
#include "flotilla/data/chat_template.hpp"
#include "flotilla/data/example_encoder.hpp"
#include "flotilla/data/jsonl_examples.hpp"
#include "flotilla/text/byte_tokenizer.hpp"

namespace {

using namespace flotilla;
using namespace flotilla::data;

void check(bool ok) {
  if (!ok) std::abort();
}

void encode_everywhere(const ExampleRecord& record) {
  static const text::ByteTokenizer bytes;
  constexpr size_t kMaxSeqLen = 96;
  for (ChatFamily family : {ChatFamily::llama2, ChatFamily::llama3, ChatFamily::mistral, ChatFamily::chatml}) {
    ChatTemplate tmpl;
    tmpl.family = family;
    if (family == ChatFamily::chatml) tmpl.default_system = "You are a helpful assistant.";
    for (bool mask_prompt : {false, true}) {
      const ExampleEncoder encoder(bytes, tmpl, {mask_prompt, kMaxSeqLen});
      std::vector<Segment> segments;
      try {
        segments = encoder.segments(record);
      } catch (const ConversationError&) {
        continue;
      }
      const EncodedExample e = encoder.encode_segments(segments);
      check(e.tokens.size() == e.mask.size());
      check(e.tokens.size() <= kMaxSeqLen);
      check(e.length_before_truncation >= e.tokens.size());
      for (size_t i = 0; i < e.tokens.size(); ++i) {
        check(e.tokens[i] >= 0 && e.tokens[i] < bytes.vocab_size());
        check(e.mask[i] <= 1);
        if (!mask_prompt) check(e.mask[i] == 1);
      }
      // Byte tokens are the rendered text, byte for byte.
      const std::string text = segments_text(segments);
      size_t at = 0;
      for (int32_t id : e.tokens) {
        if (bytes.is_special(id)) continue;
        check(at < text.size() && static_cast<unsigned char>(text[at]) == id);
        ++at;
      }
      if (!e.truncated()) check(at == text.size());
    }
  }
  // Without a template, a chat record is refused (an InputError), the others encode.
  const ExampleEncoder plain(bytes, std::nullopt, {true, 0});
  try {
    plain.encode(record);
    check(!std::holds_alternative<ChatRecord>(record));
  } catch (const InputError&) {
    check(std::holds_alternative<ChatRecord>(record));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  try {
    parse_jsonl_examples(input, "fuzz.jsonl", /*skip_invalid=*/false);
  } catch (const InputError&) {
  }
  try {
    const ChatTemplate unused = detect_chat_template(input).value_or(ChatTemplate{});
    (void)unused;
  } catch (const InputError&) {
  }
  const std::string_view stripped = python_strip(input);
  check(python_strip(stripped) == stripped);
  check(valid_utf8_prefix(input) <= input.size());

  JsonlExamples examples;
  try {
    examples = parse_jsonl_examples(input, "fuzz.jsonl", /*skip_invalid=*/true);
  } catch (const InputError&) {
    return 0;
  }
  for (const NumberedRecord& r : examples.records) encode_everywhere(r.record);
  return 0;
}
