#include "flotilla/text/hf_tokenizer.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <optional>
#include <unordered_map>

#include "flotilla/base/error.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/base/hash.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/text/hf_bpe.hpp"
#include "flotilla/text/hf_components.hpp"

namespace flotilla::text {
namespace {

using nlohmann::json;

constexpr const char* kHfTokenizerComponent = "text/hf_tokenizer";
// Ids above this are refused: real vocabularies stay below 300k, and the id tables are
// sized by the largest id.
constexpr int64_t kMaxTokenId = (int64_t{1} << 24) - 1;
// Unassigned ids tolerated below the largest id.
constexpr size_t kMaxIdGap = 65536;


// Typed access to one JSON file's fields; every error names the file and the field.
class Reader {
 public:
  explicit Reader(std::string file) : file_(std::move(file)) {}

  [[noreturn]] void fail(std::string_view what) const {
    throw InputError(kHfTokenizerComponent, fmt::format("{}: {}", file_, what));
  }
  const std::string& file() const { return file_; }

  json parse(const std::string& text) const {
    try {
      return json::parse(text);
    } catch (const json::exception& e) {
      fail(fmt::format("not valid JSON: {}", json_error_text(e)));
    }
  }

  // The member, or nullptr when it is absent or null.
  static const json* member(const json& obj, const char* key) {
    if (!obj.is_object()) return nullptr;
    const auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  const json& object_at(const json& obj, const char* key, std::string_view where) const {
    const json* m = member(obj, key);
    if (!m || !m->is_object()) fail(fmt::format("{}.{} must be an object", where, key));
    return *m;
  }
  const json& array_at(const json& obj, const char* key, std::string_view where) const {
    const json* m = member(obj, key);
    if (!m || !m->is_array()) fail(fmt::format("{}.{} must be an array", where, key));
    return *m;
  }
  std::string string_at(const json& obj, const char* key, std::string_view where) const {
    const json* m = member(obj, key);
    if (!m || !m->is_string()) fail(fmt::format("{}.{} must be a string", where, key));
    return m->get<std::string>();
  }
  std::optional<std::string> optional_string(const json& obj, const char* key, std::string_view where) const {
    const json* m = member(obj, key);
    if (!m) return std::nullopt;
    if (!m->is_string()) fail(fmt::format("{}.{} must be a string or null", where, key));
    return m->get<std::string>();
  }
  bool bool_or(const json& obj, const char* key, bool fallback, std::string_view where) const {
    const json* m = member(obj, key);
    if (!m) return fallback;
    if (!m->is_boolean()) fail(fmt::format("{}.{} must be true or false", where, key));
    return m->get<bool>();
  }
  size_t size_or(const json& obj, const char* key, size_t fallback, std::string_view where) const {
    const json* m = member(obj, key);
    if (!m) return fallback;
    if (!m->is_number_unsigned()) fail(fmt::format("{}.{} must be a non-negative integer", where, key));
    return m->get<size_t>();
  }
  int32_t token_id(const json& value, std::string_view where) const {
    if (!value.is_number_integer() || value.get<int64_t>() < 0 || value.get<int64_t>() > kMaxTokenId) {
      fail(fmt::format("{}: token id {} is not an integer in [0, {}]", where, value.dump(), kMaxTokenId));
    }
    return static_cast<int32_t>(value.get<int64_t>());
  }
  // A Regex / String pattern object of Split and Replace.
  std::string literal_pattern(const json& obj, std::string_view where) const {
    const json& pattern = object_at(obj, "pattern", where);
    if (const json* s = member(pattern, "String"); s && s->is_string()) return s->get<std::string>();
    if (const json* r = member(pattern, "Regex"); r && r->is_string()) {
      fail(fmt::format("{}: regex pattern {} is not supported (only literal String patterns)",
                       where, r->dump()));
    }
    fail(fmt::format("{}.pattern must be {{\"String\": ...}}", where));
  }
  std::string type_of(const json& obj, std::string_view where) const { return string_at(obj, "type", where); }

 private:
  std::string file_;
};

hf::PrependScheme prepend_scheme_of(const Reader& r, const json& obj, std::string_view where) {
  if (const auto scheme = r.optional_string(obj, "prepend_scheme", where)) {
    if (*scheme == "always") return hf::PrependScheme::kAlways;
    if (*scheme == "first") return hf::PrependScheme::kFirst;
    if (*scheme == "never") return hf::PrependScheme::kNever;
    r.fail(fmt::format("{}.prepend_scheme '{}' is not one of always, first, never", where, *scheme));
  }
  // Files from before prepend_scheme existed say add_prefix_space.
  return r.bool_or(obj, "add_prefix_space", true, where) ? hf::PrependScheme::kAlways
                                                          : hf::PrependScheme::kNever;
}

void read_normalizer(const Reader& r, const json& obj, std::string_view where,
                     std::vector<hf::NormalizerStep>& steps) {
  const std::string type = r.type_of(obj, where);
  if (type == "Sequence") {
    const json& list = r.array_at(obj, "normalizers", where);
    for (size_t i = 0; i < list.size(); ++i) {
      read_normalizer(r, list[i], fmt::format("{}.normalizers[{}]", where, i), steps);
    }
  } else if (type == "Prepend") {
    steps.push_back(hf::PrependNormalizer{r.string_at(obj, "prepend", where)});
  } else if (type == "Replace") {
    std::string pattern = r.literal_pattern(obj, where);
    if (pattern.empty()) r.fail(fmt::format("{}: empty pattern", where));
    steps.push_back(hf::ReplaceNormalizer{std::move(pattern), r.string_at(obj, "content", where)});
  } else if (type == "NFC") {
    steps.push_back(hf::NfcNormalizer{});
  } else {
    r.fail(fmt::format("normalizer type '{}' is not supported (supported: Sequence, Prepend, "
                       "Replace, NFC)", type));
  }
}

void read_pre_tokenizer(const Reader& r, const json& obj, std::string_view where,
                        std::vector<hf::PreTokenizerStep>& steps) {
  const std::string type = r.type_of(obj, where);
  if (type == "Sequence") {
    const json& list = r.array_at(obj, "pretokenizers", where);
    for (size_t i = 0; i < list.size(); ++i) {
      read_pre_tokenizer(r, list[i], fmt::format("{}.pretokenizers[{}]", where, i), steps);
    }
  } else if (type == "ByteLevel") {
    steps.push_back(hf::ByteLevelPreTokenizer{r.bool_or(obj, "add_prefix_space", true, where),
                                              r.bool_or(obj, "use_regex", true, where)});
  } else if (type == "Split") {
    const json& pattern = r.object_at(obj, "pattern", where);
    const json* regex = Reader::member(pattern, "Regex");
    if (!regex || !regex->is_string()) {
      r.fail(fmt::format("{}: only a Regex pattern is supported, not {}", where, pattern.dump()));
    }
    const auto known = recognize_split_pattern(regex->get<std::string>());
    if (!known) {
      r.fail(fmt::format("{}: split regex {} is not supported (supported: the GPT-2, Llama 3 and "
                         "Qwen2 patterns)", where, regex->dump()));
    }
    const auto behavior = r.optional_string(obj, "behavior", where);
    if (behavior.value_or("Isolated") != "Isolated" || r.bool_or(obj, "invert", false, where)) {
      r.fail(fmt::format("{}: only behavior Isolated with invert false is supported", where));
    }
    steps.push_back(hf::SplitPreTokenizer{*known});
  } else if (type == "Metaspace") {
    hf::MetaspacePreTokenizer meta;
    if (auto rep = r.optional_string(obj, "replacement", where)) meta.replacement = std::move(*rep);
    if (meta.replacement.empty()) r.fail(fmt::format("{}: empty replacement", where));
    meta.prepend_scheme = prepend_scheme_of(r, obj, where);
    meta.split = r.bool_or(obj, "split", true, where);
    steps.push_back(std::move(meta));
  } else {
    r.fail(fmt::format("pre_tokenizer type '{}' is not supported (supported: ByteLevel, Split, "
                       "Metaspace, Sequence)", type));
  }
}

void read_decoder(const Reader& r, const json& obj, std::string_view where,
                  std::vector<hf::DecoderStep>& steps) {
  const std::string type = r.type_of(obj, where);
  if (type == "Sequence") {
    const json& list = r.array_at(obj, "decoders", where);
    for (size_t i = 0; i < list.size(); ++i) {
      read_decoder(r, list[i], fmt::format("{}.decoders[{}]", where, i), steps);
    }
  } else if (type == "ByteLevel") {
    steps.push_back(hf::ByteLevelDecoder{});
  } else if (type == "Replace") {
    std::string pattern = r.literal_pattern(obj, where);
    if (pattern.empty()) r.fail(fmt::format("{}: empty pattern", where));
    steps.push_back(hf::ReplaceDecoder{std::move(pattern), r.string_at(obj, "content", where)});
  } else if (type == "ByteFallback") {
    steps.push_back(hf::ByteFallbackDecoder{});
  } else if (type == "Fuse") {
    steps.push_back(hf::FuseDecoder{});
  } else if (type == "Strip") {
    steps.push_back(hf::StripDecoder{r.string_at(obj, "content", where), r.size_or(obj, "start", 0, where),
                                     r.size_or(obj, "stop", 0, where)});
  } else if (type == "Metaspace") {
    hf::MetaspaceDecoder meta;
    if (auto rep = r.optional_string(obj, "replacement", where)) meta.replacement = std::move(*rep);
    if (meta.replacement.empty()) r.fail(fmt::format("{}: empty replacement", where));
    meta.strip_first = prepend_scheme_of(r, obj, where) != hf::PrependScheme::kNever;
    steps.push_back(std::move(meta));
  } else {
    r.fail(fmt::format("decoder type '{}' is not supported (supported: ByteLevel, Replace, "
                       "ByteFallback, Fuse, Strip, Metaspace, Sequence)", type));
  }
}

// The TemplateProcessing of a post_processor (possibly inside a Sequence), or nullptr.
const json* find_template(const json& obj) {
  if (!obj.is_object()) return nullptr;
  const json* type = Reader::member(obj, "type");
  if (!type || !type->is_string()) return nullptr;
  if (*type == "TemplateProcessing") return &obj;
  if (*type == "Sequence") {
    if (const json* list = Reader::member(obj, "processors"); list && list->is_array()) {
      for (const json& p : *list) {
        if (const json* t = find_template(p)) return t;
      }
    }
  }
  return nullptr;
}

}  // namespace

struct HfTokenizer::Impl {
  std::filesystem::path json_path;
  std::string json_bytes;
  std::filesystem::path config_path;
  std::optional<std::string> config_bytes;

  std::vector<hf::NormalizerStep> normalizer;
  std::vector<hf::PreTokenizerStep> pre_tokenizer;
  std::vector<hf::DecoderStep> decoder;
  std::unique_ptr<BpeModel> model;
  std::vector<hf::AddedToken> added;
  hf::AddedTokenMatcher raw_matcher;         // added tokens with normalized false
  hf::AddedTokenMatcher normalized_matcher;  // normalized true, matched after the normalizer

  std::vector<std::string> id_to_token;  // "" where no token has the id
  std::vector<uint8_t> special;          // per id
  std::vector<uint8_t> is_added;         // per id
  std::unordered_map<std::string, int32_t> token_to_id;
  bool byte_level = false;

  int32_t bos = -1;
  int32_t eos = -1;
  int32_t pad = -1;
  bool add_bos = false;
  bool add_eos = false;
  std::string fingerprint;

  void load_tokenizer_json();
  void load_bos_eos();
  void encode_section(std::string_view section, bool at_text_start, std::vector<int32_t>& ids,
                      hf::PieceBuffers& buffers) const;
  void check_id(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token.size()) {
      throw Error(kHfTokenizerComponent, fmt::format("token id {} is outside the vocabulary [0, {}) of {}", id,
                                          id_to_token.size(), json_path.string()));
    }
  }
};

void HfTokenizer::Impl::load_tokenizer_json() {
  const Reader r(json_path.string());
  json_bytes = read_text_file(json_path);
  const json root = r.parse(json_bytes);
  if (!root.is_object()) r.fail("expected a JSON object (a Hugging Face tokenizer.json)");

  // ---- model ----
  const json& model_json = r.object_at(root, "model", "tokenizer");
  std::string type;
  if (const json* t = Reader::member(model_json, "type")) {
    if (!t->is_string()) r.fail("model.type must be a string");
    type = t->get<std::string>();
  } else {
    type = Reader::member(model_json, "merges") ? "BPE" : "(unknown)";
  }
  if (type != "BPE") r.fail(fmt::format("tokenizer model type '{}' is not supported (BPE only)", type));
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (const auto v = r.optional_string(model_json, key, "model"); v && !v->empty()) {
      r.fail(fmt::format("model.{} {:?} is not supported", key, *v));
    }
  }

  // ---- pipeline ----
  if (const json* n = Reader::member(root, "normalizer")) read_normalizer(r, *n, "normalizer", normalizer);
  if (const json* p = Reader::member(root, "pre_tokenizer")) read_pre_tokenizer(r, *p, "pre_tokenizer", pre_tokenizer);
  const json* d = Reader::member(root, "decoder");
  if (!d) r.fail("a tokenizer without a decoder is not supported");
  read_decoder(r, *d, "decoder", decoder);
  for (size_t i = 0; i < pre_tokenizer.size(); ++i) {
    if (!std::holds_alternative<hf::ByteLevelPreTokenizer>(pre_tokenizer[i])) continue;
    // After ByteLevel the pieces are in its alphabet; no pattern here is written for that.
    if (i + 1 != pre_tokenizer.size()) r.fail("pre_tokenizer: steps after ByteLevel are not supported");
    byte_level = true;
  }

  // ---- vocabulary ----
  const json& vocab_json = r.object_at(model_json, "vocab", "model");
  std::vector<std::pair<std::string, int32_t>> keys;
  keys.reserve(vocab_json.size());
  int32_t max_id = -1;
  for (const auto& [text, id_json] : vocab_json.items()) {
    const int32_t id = r.token_id(id_json, fmt::format("model.vocab[{:?}]", text));
    max_id = std::max(max_id, id);
    token_to_id[text] = id;
    if (byte_level) {
      // A token outside the byte alphabet can never come out of byte-level text.
      if (auto bytes = hf::alphabet_to_bytes(text)) keys.emplace_back(std::move(*bytes), id);
    } else {
      keys.emplace_back(text, id);
    }
  }
  if (const json* list = Reader::member(root, "added_tokens")) {
    if (!list->is_array()) r.fail("added_tokens must be an array");
    for (size_t i = 0; i < list->size(); ++i) {
      const json& t = (*list)[i];
      const std::string where = fmt::format("added_tokens[{}]", i);
      if (!t.is_object()) r.fail(where + " must be an object");
      hf::AddedToken token;
      token.content = r.string_at(t, "content", where);
      if (!Reader::member(t, "id")) r.fail(where + ".id is missing");
      token.id = r.token_id(t["id"], where + ".id");
      token.special = r.bool_or(t, "special", false, where);
      token.single_word = r.bool_or(t, "single_word", false, where);
      token.lstrip = r.bool_or(t, "lstrip", false, where);
      token.rstrip = r.bool_or(t, "rstrip", false, where);
      token.normalized = r.bool_or(t, "normalized", !token.special, where);
      if (token.content.empty()) r.fail(where + ".content is empty");
      max_id = std::max(max_id, token.id);
      added.push_back(std::move(token));
    }
  }
  if (max_id < 0) r.fail("the vocabulary is empty");
  // Tables are indexed by id: a few huge ids must not cost gigabytes.
  const size_t token_count = token_to_id.size() + added.size();
  if (static_cast<size_t>(max_id) >= token_count + kMaxIdGap) {
    r.fail(fmt::format("token id {} is far beyond the {} tokens defined (ids must be nearly dense)",
                       max_id, token_count));
  }
  id_to_token.assign(static_cast<size_t>(max_id) + 1, std::string());
  special.assign(id_to_token.size(), 0);
  is_added.assign(id_to_token.size(), 0);
  for (const auto& [text, id] : token_to_id) id_to_token[id] = text;
  for (const hf::AddedToken& t : added) {
    id_to_token[t.id] = t.content;
    token_to_id[t.content] = t.id;
    special[t.id] = t.special;
    is_added[t.id] = 1;
  }

  // ---- merges ----
  std::vector<std::pair<std::string, std::string>> merges;
  if (const json* list = Reader::member(model_json, "merges")) {
    if (!list->is_array()) r.fail("model.merges must be an array");
    merges.reserve(list->size());
    for (size_t i = 0; i < list->size(); ++i) {
      const json& m = (*list)[i];
      std::string left;
      std::string right;
      if (m.is_string()) {
        const std::string& s = m.get_ref<const std::string&>();
        const size_t space = s.find(' ');
        if (space == std::string::npos) r.fail(fmt::format("model.merges[{}] {:?} is not \"left right\"", i, s));
        left = s.substr(0, space);
        right = s.substr(space + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        left = m[0].get<std::string>();
        right = m[1].get<std::string>();
      } else {
        r.fail(fmt::format("model.merges[{}] must be \"left right\" or [left, right]", i));
      }
      if (byte_level) {
        auto l = hf::alphabet_to_bytes(left);
        auto rt = hf::alphabet_to_bytes(right);
        if (!l || !rt) r.fail(fmt::format("model.merges[{}] is not in the byte-level alphabet", i));
        left = std::move(*l);
        right = std::move(*rt);
      }
      merges.emplace_back(std::move(left), std::move(right));
    }
  }

  BpeOptions options;
  options.byte_level = byte_level;
  options.byte_fallback = r.bool_or(model_json, "byte_fallback", false, "model");
  options.fuse_unk = r.bool_or(model_json, "fuse_unk", false, "model");
  options.ignore_merges = r.bool_or(model_json, "ignore_merges", false, "model");
  if (const auto unk = r.optional_string(model_json, "unk_token", "model")) {
    const auto it = token_to_id.find(*unk);
    if (it == token_to_id.end()) r.fail(fmt::format("model.unk_token {:?} is not in the vocabulary", *unk));
    options.unk_id = it->second;
  }
  model = std::make_unique<BpeModel>(std::move(keys), merges, options, r.file());

  // ---- added-token matchers ----
  std::vector<hf::AddedTokenMatcher::Entry> raw_entries;
  std::vector<hf::AddedTokenMatcher::Entry> normalized_entries;
  for (size_t i = 0; i < added.size(); ++i) {
    const hf::AddedToken& t = added[i];
    if (t.normalized) {
      normalized_entries.push_back({hf::normalize(normalizer, t.content), t, static_cast<int32_t>(i)});
    } else {
      raw_entries.push_back({t.content, t, static_cast<int32_t>(i)});
    }
  }
  raw_matcher = hf::AddedTokenMatcher(std::move(raw_entries));
  normalized_matcher = hf::AddedTokenMatcher(std::move(normalized_entries));

  // ---- BOS / EOS from the post_processor's template (tokenizer_config.json may override) ----
  if (const json* post = Reader::member(root, "post_processor")) {
    if (const json* tmpl = find_template(*post)) {
      const json* single = Reader::member(*tmpl, "single");
      const json* specials = Reader::member(*tmpl, "special_tokens");
      bool seen_sequence = false;
      if (single && single->is_array()) {
        for (const json& item : *single) {
          if (Reader::member(item, "Sequence")) {
            seen_sequence = true;
            continue;
          }
          const json* st = Reader::member(item, "SpecialToken");
          const json* name = st ? Reader::member(*st, "id") : nullptr;
          if (!name || !name->is_string()) continue;
          int32_t id = -1;
          if (specials) {
            const json* entry = Reader::member(*specials, name->get<std::string>().c_str());
            const json* ids = entry ? Reader::member(*entry, "ids") : nullptr;
            if (ids && ids->is_array() && ids->size() == 1) id = r.token_id((*ids)[0], "post_processor");
          }
          if (id < 0) {
            const auto it = token_to_id.find(name->get<std::string>());
            if (it != token_to_id.end()) id = it->second;
          }
          if (id < 0 || static_cast<size_t>(id) >= id_to_token.size()) continue;
          if (!seen_sequence && bos < 0) {
            bos = id;
            add_bos = true;
          } else if (seen_sequence && eos < 0) {
            eos = id;
            add_eos = true;
          }
        }
      }
    }
  }
}

void HfTokenizer::Impl::load_bos_eos() {
  std::optional<json> config;
  if (!config_path.empty()) {
    const Reader r(config_path.string());
    config_bytes = read_text_file(config_path);
    config = r.parse(*config_bytes);
    if (!config->is_object()) r.fail("expected a JSON object (tokenizer_config.json)");
    // bos_token: "<s>", {"content": "<s>", ...} or null (none).
    auto token_of = [&](const char* key, int32_t& id) {
      if (!config->contains(key)) return false;
      const json& v = (*config)[key];
      if (v.is_null()) {
        id = -1;
        return true;
      }
      std::string content;
      if (v.is_string()) {
        content = v.get<std::string>();
      } else if (const json* c = Reader::member(v, "content"); c && c->is_string()) {
        content = c->get<std::string>();
      } else {
        r.fail(fmt::format("{} must be a string, {{\"content\": ...}} or null", key));
      }
      const auto it = token_to_id.find(content);
      if (it == token_to_id.end()) {
        r.fail(fmt::format("{} {:?} is not a token of {}", key, content, json_path.string()));
      }
      id = it->second;
      return true;
    };
    token_of("bos_token", bos);
    token_of("eos_token", eos);
    token_of("pad_token", pad);
    add_bos = r.bool_or(*config, "add_bos_token", add_bos, "tokenizer_config");
    add_eos = r.bool_or(*config, "add_eos_token", add_eos, "tokenizer_config");
  }
  // Neither file said: the special tokens these model families use.
  auto well_known = [&](std::initializer_list<const char*> names) {
    for (const char* name : names) {
      const auto it = token_to_id.find(name);
      if (it != token_to_id.end() && is_added[it->second]) return it->second;
    }
    return -1;
  };
  const bool config_names_bos = config && config->contains("bos_token");
  const bool config_names_eos = config && config->contains("eos_token");
  if (bos < 0 && !config_names_bos) bos = well_known({"<s>", "<|begin_of_text|>", "<|endoftext|>"});
  if (eos < 0 && !config_names_eos) eos = well_known({"</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"});

  uint64_t hash = fnv1a64(json_bytes);
  hash = fnv1a64(fmt::format("\nbos={} eos={} pad={} add_bos={} add_eos={}", bos, eos, pad, add_bos, add_eos), hash);
  fingerprint = fmt::format("hf-{:016x}", hash);
}

HfTokenizer::HfTokenizer(const std::filesystem::path& tokenizer_json,
                         const std::filesystem::path& tokenizer_config)
    : impl_(std::make_unique<Impl>()) {
  impl_->json_path = tokenizer_json;
  impl_->config_path = tokenizer_config;
  try {
    impl_->load_tokenizer_json();
    impl_->load_bos_eos();
  } catch (const json::exception& e) {
    // A field of an unexpected type that the checks above did not anticipate.
    throw InputError(kHfTokenizerComponent, fmt::format("{}: malformed tokenizer: {}", tokenizer_json.string(),
                                             json_error_text(e)));
  }
}

HfTokenizer::~HfTokenizer() = default;

void HfTokenizer::Impl::encode_section(std::string_view section, bool at_text_start,
                                       std::vector<int32_t>& ids, hf::PieceBuffers& buffers) const {
  std::string normalized_storage;
  std::string_view normalized = section;
  if (!normalizer.empty()) {
    normalized_storage = hf::normalize(normalizer, section);
    normalized = normalized_storage;
  }
  std::vector<hf::Segment> segments;
  normalized_matcher.split(normalized, segments);
  for (const hf::Segment& seg : segments) {
    if (seg.token >= 0) {
      ids.push_back(added[seg.token].id);
      continue;
    }
    const std::string_view text = normalized.substr(seg.begin, seg.end - seg.begin);
    if (pre_tokenizer.empty()) {
      model->encode_piece(text, ids);
      continue;
    }
    hf::pre_tokenize(pre_tokenizer, text, at_text_start && seg.begin == 0, buffers);
    for (const std::string_view piece : buffers.pieces) model->encode_piece(piece, ids);
  }
}

std::vector<int32_t> HfTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  hf::PieceBuffers buffers;
  std::vector<hf::Segment> segments;
  impl_->raw_matcher.split(text, segments);
  for (const hf::Segment& seg : segments) {
    if (seg.token >= 0) {
      ids.push_back(impl_->added[seg.token].id);
    } else {
      impl_->encode_section(text.substr(seg.begin, seg.end - seg.begin), seg.begin == 0, ids, buffers);
    }
  }
  return ids;
}

std::string HfTokenizer::decode(std::span<const int32_t> ids) const {
  std::vector<hf::DecodeToken> tokens;
  tokens.reserve(ids.size());
  for (const int32_t id : ids) {
    impl_->check_id(id);
    if (is_special(id) || impl_->id_to_token[id].empty()) continue;
    tokens.push_back({impl_->id_to_token[id], impl_->is_added[id] != 0});
  }
  return hf::run_decoder(impl_->decoder, std::move(tokens), /*whole_sequence=*/true);
}

std::string HfTokenizer::token_to_piece(int32_t id) const {
  impl_->check_id(id);
  if (is_special(id) || impl_->id_to_token[id].empty()) return {};
  std::vector<hf::DecodeToken> tokens{{impl_->id_to_token[id], impl_->is_added[id] != 0}};
  return hf::run_decoder(impl_->decoder, std::move(tokens), /*whole_sequence=*/false);
}

int32_t HfTokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_to_token.size()); }
int32_t HfTokenizer::bos_id() const { return impl_->bos; }
int32_t HfTokenizer::eos_id() const { return impl_->eos; }
int32_t HfTokenizer::pad_id() const { return impl_->pad; }
bool HfTokenizer::add_bos_token() const { return impl_->add_bos; }
bool HfTokenizer::add_eos_token() const { return impl_->add_eos; }

bool HfTokenizer::is_special(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return false;
  return impl_->special[id] != 0 || id == impl_->bos || id == impl_->eos || id == impl_->pad;
}

std::string HfTokenizer::name() const {
  return impl_->byte_level ? "hf-bpe-byte-level" : "hf-bpe-sentencepiece";
}

std::string HfTokenizer::fingerprint() const { return impl_->fingerprint; }

int32_t HfTokenizer::token_to_id(std::string_view token) const {
  const auto it = impl_->token_to_id.find(std::string(token));
  return it == impl_->token_to_id.end() ? -1 : it->second;
}

std::string HfTokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return impl_->id_to_token[id];
}

void HfTokenizer::save(const std::filesystem::path& dir) const {
  write_file_atomic(dir / "tokenizer.json", impl_->json_bytes);
  if (impl_->config_bytes) write_file_atomic(dir / "tokenizer_config.json", *impl_->config_bytes);
}

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::filesystem::path& model_dir) {
  const std::filesystem::path json_path = model_dir / "tokenizer.json";
  const std::filesystem::path config_path = model_dir / "tokenizer_config.json";
  std::error_code ec;
  if (!std::filesystem::is_regular_file(json_path, ec)) {
    throw InputError(kHfTokenizerComponent, fmt::format("{}: no such file", json_path.string()));
  }
  const bool has_config = std::filesystem::is_regular_file(config_path, ec);
  return std::make_unique<HfTokenizer>(json_path, has_config ? config_path : std::filesystem::path());
}

}  // namespace flotilla::text
