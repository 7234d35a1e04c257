// libFuzzer target for the Hugging Face tokenizer.json loader (src/flotilla/text/hf_*):
// the input is a tokenizer.json. Loading may only ever fail with an InputError; a
// tokenizer that loads must encode fixed texts and the input's own bytes (arbitrary,
// often invalid UTF-8) to ids inside its vocabulary, and decode them and their pieces
// without throwing.
//   ./fuzz/hf_tokenizer_fuzz -max_total_time=300 -dict=../fuzz/hf_tokenizer.dict \
//       ../fuzz/corpus/hf_tokenizer
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>

#include "flotilla/base/error.hpp"
#include "flotilla/text/hf_tokenizer.hpp"

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

const std::filesystem::path& input_path() {
  static const std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("hf_tokenizer_fuzz_" + std::to_string(::getpid()) + ".json");
  return path;
}

void exercise(const flotilla::text::Tokenizer& tok, std::string_view text) {
  const std::vector<int32_t> ids = tok.encode(text);
  for (const int32_t id : ids) {
    check(id >= 0 && id < tok.vocab_size());
    (void)tok.token_to_piece(id);
    (void)tok.is_special(id);
  }
  (void)tok.decode(ids);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  FILE* f = std::fopen(input_path().c_str(), "wb");
  if (!f) std::abort();
  check(std::fwrite(data, 1, size, f) == size);
  std::fclose(f);
  std::unique_ptr<flotilla::text::HfTokenizer> tok;
  try {
    tok = std::make_unique<flotilla::text::HfTokenizer>(input_path());
  } catch (const flotilla::InputError&) {
    return 0;
  }
  check(tok->vocab_size() > 0);
  check(tok->bos_id() >= -1 && tok->bos_id() < tok->vocab_size());
  check(tok->eos_id() >= -1 && tok->eos_id() < tok->vocab_size());
  check(!tok->fingerprint().empty());
  for (const char* text : {"", "Hello world", " Ahoy,  matey!\n\n\tDON'T 12345 caf\xC3\xA9 \xF0\x9F\x98\x80",
                           "<s>x</s><|endoftext|>", "\xE2\x96\x81\xE2\x96\x81 a\xE2\x96\x81"}) {
    exercise(*tok, text);
  }
  exercise(*tok, input.substr(0, 4096));
  return 0;
}
