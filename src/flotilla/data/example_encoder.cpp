#include "flotilla/data/example_encoder.hpp"

#include <algorithm>

#include "flotilla/base/error.hpp"

namespace flotilla::data {
namespace {

constexpr const char* kExampleEncoderComponent = "data/encode";

void push_token(EncodedExample& out, int32_t token, bool in_loss) {
  out.tokens.push_back(token);
  out.mask.push_back(in_loss ? 1 : 0);
}

}  // namespace

size_t EncodedExample::trainable_targets() const {
  size_t n = 0;
  for (size_t i = 1; i < mask.size(); ++i) n += mask[i];
  return n;
}

ExampleEncoder::ExampleEncoder(const text::Tokenizer& tokenizer, std::optional<ChatTemplate> chat_template,
                               EncodeOptions options)
    : tokenizer_(tokenizer), chat_template_(std::move(chat_template)), options_(options) {}

std::vector<Segment> ExampleEncoder::segments(const ExampleRecord& record) const {
  std::vector<Segment> out;
  const auto special = [&](int32_t id, bool trainable) {
    if (id >= 0) out.push_back(Segment{{}, id, trainable});
  };
  // BOS where the tokenizer's config says documents get one; EOS always, so the model
  // learns to stop (mlx_lm appends it to texts that lack it).
  const int32_t bos = tokenizer_.add_bos() ? tokenizer_.bos_id() : -1;
  if (const auto* text = std::get_if<TextRecord>(&record)) {
    special(bos, false);
    out.push_back(Segment{text->text, -1, true});
    special(tokenizer_.eos_id(), true);
    return out;
  }
  if (const auto* pc = std::get_if<CompletionRecord>(&record)) {
    if (chat_template_) {
      const Message turns[] = {{Role::user, pc->prompt}, {Role::assistant, pc->completion}};
      return render_chat(*chat_template_, turns);
    }
    special(bos, false);
    out.push_back(Segment{pc->prompt, -1, false});
    out.push_back(Segment{pc->completion, -1, true});
    special(tokenizer_.eos_id(), true);
    return out;
  }
  const auto& chat = std::get<ChatRecord>(record);
  if (!chat_template_) {
    throw InputError(kExampleEncoderComponent,
                     "a {\"messages\"} example needs a chat template, and the model has none (no "
                     "\"chat_template\" in tokenizer_config.json, no chat_template.jinja): pass "
                     "--chat-template llama2|llama3|mistral|chatml");
  }
  return render_chat(*chat_template_, chat.messages);
}

EncodedExample ExampleEncoder::encode(const ExampleRecord& record) const {
  const std::vector<Segment> segs = segments(record);
  return encode_segments(segs);
}

EncodedExample ExampleEncoder::encode_segments(std::span<const Segment> segs) const {
  EncodedExample out;
  size_t i = 0;
  while (i < segs.size()) {
    if (segs[i].token >= 0) {
      push_token(out, segs[i].token, !options_.mask_prompt || segs[i].trainable);
      ++i;
      continue;
    }
    size_t j = i;
    while (j < segs.size() && segs[j].token < 0) ++j;
    encode_run(segs.subspan(i, j - i), out);
    i = j;
  }
  out.length_before_truncation = out.tokens.size();
  out.targets_before_truncation = out.trainable_targets();
  if (options_.max_seq_len > 0 && out.tokens.size() > options_.max_seq_len) {
    out.tokens.resize(options_.max_seq_len);
    out.mask.resize(options_.max_seq_len);
  }
  return out;
}

void ExampleEncoder::encode_run(std::span<const Segment> run, EncodedExample& out) const {
  std::string full;
  for (const Segment& s : run) full += s.text;
  const std::vector<int32_t> ids = tokenizer_.encode(full);
  const bool uniform = std::all_of(run.begin(), run.end(),
                                   [&](const Segment& s) { return s.trainable == run.front().trainable; });
  if (!options_.mask_prompt || uniform) {
    const bool in_loss = !options_.mask_prompt || run.front().trainable;
    for (int32_t id : ids) push_token(out, id, in_loss);
    return;
  }
  // ends[k]: number of run tokens up to the end of segment k.
  std::vector<size_t> ends;
  ends.reserve(run.size());
  std::vector<int32_t> pieces;
  for (const Segment& s : run) {
    const std::vector<int32_t> piece = tokenizer_.encode(s.text);
    pieces.insert(pieces.end(), piece.begin(), piece.end());
    ends.push_back(pieces.size());
  }
  if (pieces != ids) {
    // A token spans a boundary: find each boundary by encoding the text before it.
    ends.clear();
    std::string prefix;
    size_t previous = 0;
    for (size_t k = 0; k < run.size(); ++k) {
      prefix += run[k].text;
      size_t end = k + 1 == run.size() ? ids.size() : tokenizer_.encode(prefix).size();
      end = std::clamp(end, previous, ids.size());
      ends.push_back(end);
      previous = end;
    }
  }
  size_t segment = 0;
  for (size_t t = 0; t < ids.size(); ++t) {
    while (segment + 1 < run.size() && t >= ends[segment]) ++segment;
    push_token(out, ids[t], run[segment].trainable);
  }
}

}  // namespace flotilla::data
