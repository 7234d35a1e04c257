#include "flotilla/data/text_dataset.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "flotilla/base/error.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/base/file.hpp"

namespace flotilla::data {
namespace {

constexpr const char* kTextComponent = "data/text";
constexpr const char* kBatchComponent = "data/batch";

bool is_blank(std::string_view line) {
  return line.find_first_not_of(" \t\r\f\v") == std::string_view::npos;
}

// Calls f(line, line_number) for each line, without its "\n" or "\r\n"; numbers from 1.
template <class F>
void for_each_line(std::string_view content, F&& f) {
  size_t line_number = 0;
  while (!content.empty()) {
    const size_t end = content.find('\n');
    std::string_view line = content.substr(0, end);
    content.remove_prefix(end == std::string_view::npos ? content.size() : end + 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    f(line, ++line_number);
  }
}

// The (T + 1)-token window at `offset` into row `row` of the (B, T) inputs and targets.
void copy_window(const std::vector<int32_t>& stream, size_t offset, int32_t* tokens,
                 int32_t* targets, int row, int T) {
  const int32_t* window = stream.data() + offset;
  std::memcpy(tokens + static_cast<size_t>(row) * T, window, sizeof(int32_t) * T);
  std::memcpy(targets + static_cast<size_t>(row) * T, window + 1, sizeof(int32_t) * T);
}

void check_batch_shape(size_t stream_tokens, int B, int T) {
  if (B <= 0 || T <= 0) {
    throw InputError(kBatchComponent,
                     fmt::format("batch shape B={} T={}: both must be positive", B, T));
  }
  if (stream_tokens < static_cast<size_t>(T) + 1) {
    throw InputError(kBatchComponent,
                     fmt::format("the token stream has {} tokens; a window of T={} needs at "
                                 "least {} (more data or a shorter sequence length)",
                                 stream_tokens, T, static_cast<size_t>(T) + 1));
  }
}

// Checks the fields every source's state has; returns the object.
const nlohmann::json& check_state(const nlohmann::json& state, std::string_view kind,
                                  size_t stream_tokens) {
  if (!state.is_object() || !state.contains("kind") || !state["kind"].is_string()) {
    throw InputError(kBatchComponent, "batch source state: expected an object with a \"kind\"");
  }
  if (state["kind"].get<std::string>() != kind) {
    throw InputError(kBatchComponent,
                     fmt::format("batch source state is for a \"{}\" source, not \"{}\"",
                                 state["kind"].get<std::string>(), kind));
  }
  if (!state.contains("stream_tokens") || !state["stream_tokens"].is_number_unsigned() ||
      state["stream_tokens"].get<uint64_t>() != stream_tokens) {
    throw InputError(kBatchComponent,
                     fmt::format("batch source state was saved for a stream of {} tokens, this "
                                 "stream has {}: not the same data",
                                 state.value("stream_tokens", nlohmann::json()).dump(),
                                 stream_tokens));
  }
  return state;
}

}  // namespace

// ---- Reading documents ----------------------------------------------------------------

TextFormat detect_text_format(const std::filesystem::path& path, std::string_view content) {
  if (path.extension() == ".jsonl") return TextFormat::jsonl;
  const size_t first = content.find_first_not_of(" \t\r\n\f\v");
  return first != std::string_view::npos && content[first] == '{' ? TextFormat::jsonl
                                                                  : TextFormat::plain;
}

std::vector<std::string> split_paragraphs(std::string_view content) {
  std::vector<std::string> paragraphs;
  std::string current;
  bool open = false;
  for_each_line(content, [&](std::string_view line, size_t) {
    if (is_blank(line)) {
      if (open) paragraphs.push_back(std::move(current));
      current.clear();
      open = false;
      return;
    }
    if (open) current.push_back('\n');
    current.append(line);
    open = true;
  });
  if (open) paragraphs.push_back(std::move(current));
  return paragraphs;
}

std::vector<std::string> parse_jsonl_texts(std::string_view content, std::string_view source) {
  std::vector<std::string> texts;
  for_each_line(content, [&](std::string_view line, size_t line_number) {
    if (is_blank(line)) return;
    const auto fail = [&](std::string_view what) {
      throw InputError(kTextComponent, fmt::format("{}:{}: {}", source, line_number, what));
    };
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail(fmt::format("not valid JSON: {}", json_error_text(e)));
    }
    if (!j.is_object()) fail(fmt::format("expected a JSON object {{\"text\": ...}}, found {}", json_type_name(j)));
    const auto it = j.find("text");
    if (it == j.end()) {
      if (j.contains("prompt") || j.contains("messages")) {
        fail("prompt/completion and chat lines are not supported yet; this reader takes {\"text\": ...}");
      }
      fail("missing the \"text\" field");
    }
    if (!it->is_string()) fail(fmt::format("\"text\" is {}, expected a string", json_type_name(*it)));
    std::string text = it->get<std::string>();
    if (!text.empty()) texts.push_back(std::move(text));
  });
  return texts;
}

namespace {

// Reads the documents of `path` and reports the format it found.
std::vector<std::string> read_documents_detecting(const std::filesystem::path& path, TextFormat& format) {
  const std::string content = read_text_file(path);
  std::string_view body = content;
  if (body.starts_with("\xEF\xBB\xBF")) body.remove_prefix(3);
  format = detect_text_format(path, body);
  std::vector<std::string> documents = format == TextFormat::jsonl
                                           ? parse_jsonl_texts(body, path.string())
                                           : split_paragraphs(body);
  if (documents.empty()) {
    throw InputError(kTextComponent,
                     fmt::format("{}: no documents ({})", path.string(),
                                 format == TextFormat::jsonl
                                     ? "no line has a non-empty \"text\""
                                     : "the file is empty or only blank lines"));
  }
  return documents;
}

}  // namespace

std::vector<std::string> read_documents(const std::filesystem::path& path) {
  TextFormat format;
  return read_documents_detecting(path, format);
}

// ---- Token stream ---------------------------------------------------------------------

std::vector<int32_t> tokenize_documents(std::span<const std::string> documents,
                                        const text::Tokenizer& tokenizer) {
  std::vector<int32_t> stream;
  for (const std::string& doc : documents) {
    const std::vector<int32_t> ids = tokenizer.encode(doc);
    stream.push_back(tokenizer.bos_id());
    stream.insert(stream.end(), ids.begin(), ids.end());
    stream.push_back(tokenizer.eos_id());
  }
  return stream;
}

TextDataset load_text_dataset(const std::filesystem::path& path, const text::Tokenizer& tokenizer) {
  TextDataset dataset;
  dataset.path = path;
  const std::vector<std::string> documents = read_documents_detecting(path, dataset.format);
  dataset.num_documents = documents.size();
  dataset.tokens = tokenize_documents(documents, tokenizer);
  return dataset;
}

StreamSplit split_train_valid(std::span<const int32_t> stream, double valid_fraction) {
  if (!(valid_fraction >= 0.0 && valid_fraction < 1.0)) {
    throw InputError(kTextComponent,
                     fmt::format("validation fraction {} must be in [0, 1)", valid_fraction));
  }
  const auto valid_tokens =
      static_cast<size_t>(std::floor(static_cast<double>(stream.size()) * valid_fraction));
  const size_t cut = stream.size() - valid_tokens;
  StreamSplit split;
  split.train.assign(stream.begin(), stream.begin() + cut);
  split.valid.assign(stream.begin() + cut, stream.end());
  return split;
}

// ---- RandomWindowSource ---------------------------------------------------------------

RandomWindowSource::RandomWindowSource(std::vector<int32_t> stream, uint64_t seed)
    : stream_(std::move(stream)), rng_(seed) {}

void RandomWindowSource::next_batch(int32_t* tokens, int32_t* targets, int B, int T) {
  check_batch_shape(stream_.size(), B, T);
  // Offsets in [0, n - T): the window [offset, offset + T] ends at index n - 1 at most.
  const uint64_t num_offsets = stream_.size() - static_cast<size_t>(T);
  for (int row = 0; row < B; ++row) {
    copy_window(stream_, rng_.below(num_offsets), tokens, targets, row, T);
  }
}

nlohmann::json RandomWindowSource::state() const {
  const Rng::State st = rng_.state();
  return {{"kind", "random_window"},
          {"stream_tokens", static_cast<uint64_t>(stream_.size())},
          {"rng", {st.s[0], st.s[1], st.s[2], st.s[3]}}};
}

void RandomWindowSource::set_state(const nlohmann::json& state) {
  check_state(state, "random_window", stream_.size());
  const auto it = state.find("rng");
  if (it == state.end() || !it->is_array() || it->size() != 4 ||
      !std::all_of(it->begin(), it->end(), [](const nlohmann::json& w) { return w.is_number_unsigned(); })) {
    throw InputError(kBatchComponent, "random_window state: \"rng\" must be 4 unsigned integers");
  }
  Rng::State st;
  for (int i = 0; i < 4; ++i) st.s[i] = (*it)[i].get<uint64_t>();
  rng_.set_state(st);
}

// ---- SequentialWindowSource -----------------------------------------------------------

SequentialWindowSource::SequentialWindowSource(std::vector<int32_t> stream)
    : stream_(std::move(stream)) {}

size_t SequentialWindowSource::windows_per_pass(size_t stream_tokens, int T) {
  if (T <= 0 || stream_tokens == 0) return 0;
  return (stream_tokens - 1) / static_cast<size_t>(T);
}

void SequentialWindowSource::next_batch(int32_t* tokens, int32_t* targets, int B, int T) {
  check_batch_shape(stream_.size(), B, T);
  for (int row = 0; row < B; ++row) {
    if (offset_ + static_cast<size_t>(T) + 1 > stream_.size()) offset_ = 0;
    copy_window(stream_, offset_, tokens, targets, row, T);
    offset_ += static_cast<size_t>(T);
  }
}

nlohmann::json SequentialWindowSource::state() const {
  return {{"kind", "sequential_window"},
          {"stream_tokens", static_cast<uint64_t>(stream_.size())},
          {"offset", static_cast<uint64_t>(offset_)}};
}

void SequentialWindowSource::set_state(const nlohmann::json& state) {
  check_state(state, "sequential_window", stream_.size());
  const auto it = state.find("offset");
  if (it == state.end() || !it->is_number_unsigned() || it->get<uint64_t>() > stream_.size()) {
    throw InputError(kBatchComponent,
                     fmt::format("sequential_window state: \"offset\" must be an integer in [0, {}]",
                                 stream_.size()));
  }
  offset_ = it->get<uint64_t>();
}

}  // namespace flotilla::data
