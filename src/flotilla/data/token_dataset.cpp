#include "flotilla/data/token_dataset.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>

#include "flotilla/base/crc32c.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"

namespace flotilla::data {
namespace {

constexpr const char* kTokenDatasetComponent = "data/shards";
using json = nlohmann::json;

// Field readers for index.json: every fault names the file and the field.
class IndexReader {
 public:
  explicit IndexReader(std::string_view source) : source_(source) {}

  [[noreturn]] void fail(std::string_view what) const {
    throw InputError(kTokenDatasetComponent, fmt::format("{}: {}", source_, what));
  }
  const json& field(const json& obj, const char* key, std::string_view where) const {
    if (!obj.is_object()) fail(fmt::format("{}: expected an object", where));
    const auto it = obj.find(key);
    if (it == obj.end()) fail(fmt::format("{}: missing \"{}\"", where, key));
    return *it;
  }
  uint64_t u64(const json& obj, const char* key, std::string_view where) const {
    const json& v = field(obj, key, where);
    if (!v.is_number_unsigned()) fail(fmt::format("{}: \"{}\" must be a non-negative integer", where, key));
    return v.get<uint64_t>();
  }
  int64_t i64(const json& obj, const char* key, std::string_view where) const {
    const json& v = field(obj, key, where);
    if (!v.is_number_integer()) fail(fmt::format("{}: \"{}\" must be an integer", where, key));
    return v.get<int64_t>();
  }
  std::string str(const json& obj, const char* key, std::string_view where) const {
    const json& v = field(obj, key, where);
    if (!v.is_string()) fail(fmt::format("{}: \"{}\" must be a string", where, key));
    return v.get<std::string>();
  }
  bool boolean(const json& obj, const char* key, std::string_view where) const {
    const json& v = field(obj, key, where);
    if (!v.is_boolean()) fail(fmt::format("{}: \"{}\" must be true or false", where, key));
    return v.get<bool>();
  }

 private:
  std::string_view source_;
};

// A shard's file name must stay inside the dataset folder.
bool plain_file_name(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string_view::npos &&
         name.find('\\') == std::string_view::npos && name.find('\0') == std::string_view::npos;
}

}  // namespace

std::string_view split_name(Split split) {
  switch (split) {
    case Split::train: return "train";
    case Split::valid: return "valid";
    case Split::test: return "test";
  }
  return "?";
}

int64_t prepared_seq_len(const DatasetIndex& index) {
  if (index.max_seq_len > 0) return static_cast<int64_t>(index.max_seq_len);
  const auto train = index.splits.find(Split::train);
  const uint64_t longest = train == index.splits.end() ? 0 : train->second.stats.longest;
  return std::clamp<int64_t>(static_cast<int64_t>(longest), 1, kLongestDefaultSeqLen);
}

json index_to_json(const DatasetIndex& index) {
  json splits = json::object();
  for (const auto& [split, s] : index.splits) {
    json shards = json::array();
    for (const ShardEntry& e : s.shards) {
      json shard = {{"file", e.file}, {"examples", e.examples}, {"tokens", e.tokens}, {"bytes", e.bytes}};
      if (e.crc32c) shard["crc32c"] = crc32c_hex(*e.crc32c);
      shards.push_back(std::move(shard));
    }
    json skipped = json::object();
    for (const auto& [reason, count] : s.stats.skipped) skipped[reason] = count;
    splits[std::string(split_name(split))] = {
        {"shards", shards},
        {"examples", s.stats.examples},
        {"tokens", s.stats.tokens},
        {"trainable_tokens", s.stats.trainable_tokens},
        {"truncated", s.stats.truncated},
        {"truncated_targets", s.stats.truncated_targets},
        {"longest", s.stats.longest},
        {"longest_before_truncation", s.stats.longest_before_truncation},
        {"skipped", skipped},
    };
  }
  json j = {
      {"format", kIndexFormat},
      {"version", kIndexVersion},
      {"tokenizer",
       {{"name", index.tokenizer_name},
        {"fingerprint", index.tokenizer_fingerprint},
        {"vocab_size", index.vocab_size},
        {"bos_id", index.bos_id},
        {"eos_id", index.eos_id}}},
      {"chat_template", index.chat_template ? json(*index.chat_template) : json(nullptr)},
      {"mask_prompt", index.mask_prompt},
      {"max_seq_len", index.max_seq_len},
      {"source", index.source},
      {"seed", index.seed},
      {"split_fractions", index.split_fractions ? json(*index.split_fractions) : json(nullptr)},
      {"splits", splits},
  };
  return j;
}

DatasetIndex index_from_json(const json& j, std::string_view source) {
  const IndexReader r(source);
  if (!j.is_object()) r.fail("expected a JSON object");
  if (r.str(j, "format", "index") != kIndexFormat) {
    r.fail(fmt::format("\"format\" is not \"{}\": not a flotilla prepared dataset", kIndexFormat));
  }
  const int64_t version = r.i64(j, "version", "index");
  if (version != kIndexVersion) {
    r.fail(fmt::format("format version {}; this flotilla reads version {}: re-run flotilla data prepare",
                       version, kIndexVersion));
  }
  DatasetIndex index;
  const json& tok = r.field(j, "tokenizer", "index");
  index.tokenizer_name = r.str(tok, "name", "tokenizer");
  index.tokenizer_fingerprint = r.str(tok, "fingerprint", "tokenizer");
  const uint64_t vocab = r.u64(tok, "vocab_size", "tokenizer");
  if (vocab == 0 || vocab > UINT32_MAX) r.fail("tokenizer: \"vocab_size\" out of range");
  index.vocab_size = static_cast<uint32_t>(vocab);
  index.bos_id = static_cast<int32_t>(r.i64(tok, "bos_id", "tokenizer"));
  index.eos_id = static_cast<int32_t>(r.i64(tok, "eos_id", "tokenizer"));
  const json& tmpl = r.field(j, "chat_template", "index");
  if (tmpl.is_string()) {
    index.chat_template = tmpl.get<std::string>();
  } else if (!tmpl.is_null()) {
    r.fail("\"chat_template\" must be a string or null");
  }
  index.mask_prompt = r.boolean(j, "mask_prompt", "index");
  index.max_seq_len = r.u64(j, "max_seq_len", "index");
  index.source = r.str(j, "source", "index");
  index.seed = r.u64(j, "seed", "index");
  const json& fractions = r.field(j, "split_fractions", "index");
  if (fractions.is_array() && fractions.size() == 3 &&
      std::all_of(fractions.begin(), fractions.end(), [](const json& f) { return f.is_number(); })) {
    index.split_fractions = std::array<double, 3>{fractions[0].get<double>(), fractions[1].get<double>(),
                                                  fractions[2].get<double>()};
  } else if (!fractions.is_null()) {
    r.fail("\"split_fractions\" must be three numbers or null");
  }
  const json& splits = r.field(j, "splits", "index");
  if (!splits.is_object()) r.fail("\"splits\" must be an object");
  for (const auto& [name, s] : splits.items()) {
    const auto known = std::find_if(kSplits.begin(), kSplits.end(), [&](Split k) { return split_name(k) == name; });
    if (known == kSplits.end()) r.fail(fmt::format("unknown split \"{}\" (expected train, valid, test)", name));
    const std::string where = "split " + name;
    SplitIndex split;
    split.stats.examples = r.u64(s, "examples", where);
    split.stats.tokens = r.u64(s, "tokens", where);
    split.stats.trainable_tokens = r.u64(s, "trainable_tokens", where);
    split.stats.truncated = r.u64(s, "truncated", where);
    if (s.contains("truncated_targets")) split.stats.truncated_targets = r.u64(s, "truncated_targets", where);
    split.stats.longest = r.u64(s, "longest", where);
    split.stats.longest_before_truncation = r.u64(s, "longest_before_truncation", where);
    const json& skipped = r.field(s, "skipped", where);
    if (!skipped.is_object()) r.fail(where + ": \"skipped\" must be an object");
    for (const auto& [reason, count] : skipped.items()) {
      if (!count.is_number_unsigned()) r.fail(where + ": skipped counts must be non-negative integers");
      split.stats.skipped[reason] = count.get<size_t>();
    }
    const json& shards = r.field(s, "shards", where);
    if (!shards.is_array()) r.fail(where + ": \"shards\" must be an array");
    uint64_t examples = 0;
    uint64_t tokens = 0;
    for (const json& e : shards) {
      ShardEntry entry;
      entry.file = r.str(e, "file", where + " shard");
      if (!plain_file_name(entry.file)) r.fail(fmt::format("{}: shard file {:?} is not a plain file name", where, entry.file));
      entry.examples = r.u64(e, "examples", where + " shard");
      entry.tokens = r.u64(e, "tokens", where + " shard");
      entry.bytes = r.u64(e, "bytes", where + " shard");
      if (e.contains("crc32c")) {
        const std::string hex = r.str(e, "crc32c", where + " shard");
        uint32_t crc = 0;
        const auto [end, ec] = std::from_chars(hex.data(), hex.data() + hex.size(), crc, 16);
        if (hex.size() != 8 || ec != std::errc() || end != hex.data() + hex.size())
          r.fail(fmt::format("{}: shard {}: \"crc32c\" {:?} is not 8 hex digits", where, entry.file, hex));
        entry.crc32c = crc;
      }
      examples += entry.examples;
      tokens += entry.tokens;
      split.shards.push_back(std::move(entry));
    }
    if (examples != split.stats.examples || tokens != split.stats.tokens) {
      r.fail(fmt::format("{}: its shards hold {} examples and {} tokens, the split says {} and {}", where,
                         examples, tokens, split.stats.examples, split.stats.tokens));
    }
    index.splits[*known] = std::move(split);
  }
  if (!index.splits.contains(Split::train)) r.fail("no \"train\" split");
  return index;
}

TokenDataset TokenDataset::open(const std::filesystem::path& dir) {
  const std::filesystem::path index_path = dir / kIndexFile;
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    throw InputError(kTokenDatasetComponent, fmt::format("{}: not a directory (expected the output of flotilla data prepare)",
                                             dir.string()));
  }
  if (!std::filesystem::exists(index_path, ec)) {
    throw InputError(kTokenDatasetComponent, fmt::format("{}: no {} (is this the output of flotilla data prepare?)",
                                             dir.string(), kIndexFile));
  }
  json j;
  try {
    j = json::parse(read_text_file(index_path));
  } catch (const json::exception& e) {
    throw InputError(kTokenDatasetComponent, fmt::format("{}: not valid JSON ({})", index_path.string(), e.what()));
  }
  TokenDataset ds;
  ds.dir_ = dir;
  ds.index_ = index_from_json(j, index_path.string());
  for (const auto& [split, s] : ds.index_.splits) {
    SplitShards& shards = ds.splits_[static_cast<size_t>(split)];
    shards.first_example.push_back(0);
    for (const ShardEntry& entry : s.shards) {
      ShardReader reader(dir / entry.file);
      const auto fail = [&](std::string_view what) {
        throw InputError(kTokenDatasetComponent, fmt::format("{}: {}", reader.path().string(), what));
      };
      if (reader.fingerprint() != ds.index_.tokenizer_fingerprint) {
        fail(fmt::format("written with tokenizer {}, but {} says {}", reader.fingerprint(), kIndexFile,
                         ds.index_.tokenizer_fingerprint));
      }
      if (reader.vocab_size() != ds.index_.vocab_size) {
        fail(fmt::format("vocab_size {}, but {} says {}", reader.vocab_size(), kIndexFile, ds.index_.vocab_size));
      }
      if (reader.num_examples() != entry.examples || reader.num_tokens() != entry.tokens ||
          reader.file_bytes() != entry.bytes) {
        fail(fmt::format("{} examples, {} tokens, {} bytes, but {} says {}, {}, {}", reader.num_examples(),
                         reader.num_tokens(), reader.file_bytes(), kIndexFile, entry.examples, entry.tokens,
                         entry.bytes));
      }
      if (entry.crc32c) {
        const uint32_t have = crc32c(reader.file_contents());
        if (have != *entry.crc32c)
          fail(fmt::format("CRC-32C {} does not match {}'s {}: the file is corrupted; re-run flotilla data prepare",
                           crc32c_hex(have), kIndexFile, crc32c_hex(*entry.crc32c)));
      }
      shards.first_example.push_back(shards.first_example.back() + reader.num_examples());
      shards.tokens += reader.num_tokens();
      shards.shards.push_back(std::move(reader));
    }
  }
  return ds;
}

TokenDataset TokenDataset::open(const std::filesystem::path& dir, const text::Tokenizer& tokenizer) {
  TokenDataset ds = open(dir);
  ds.check_tokenizer(tokenizer);
  return ds;
}

void TokenDataset::check_tokenizer(const text::Tokenizer& tokenizer) const {
  check_tokenizer(tokenizer.fingerprint(), tokenizer.name());
}

void TokenDataset::check_tokenizer(std::string_view fingerprint, std::string_view name) const {
  if (fingerprint == index_.tokenizer_fingerprint) return;
  throw InputError(kTokenDatasetComponent,
                   fmt::format("{}: prepared with tokenizer {} ({}) but the model's tokenizer is {} ({}): re-run "
                               "flotilla data prepare",
                               dir_.string(), index_.tokenizer_fingerprint, index_.tokenizer_name, fingerprint,
                               name.empty() ? "unnamed" : name));
}

size_t TokenDataset::num_examples(Split split) const {
  const SplitShards& s = splits_[static_cast<size_t>(split)];
  return s.first_example.empty() ? 0 : s.first_example.back();
}

uint64_t TokenDataset::num_tokens(Split split) const { return splits_[static_cast<size_t>(split)].tokens; }

ExampleView TokenDataset::example(Split split, size_t i) const {
  const SplitShards& s = splits_[static_cast<size_t>(split)];
  if (i >= num_examples(split)) {
    throw Error(kTokenDatasetComponent, fmt::format("{}: {} example {} of {}", dir_.string(), split_name(split), i,
                                        num_examples(split)));
  }
  // The shard whose [first_example, next first_example) holds i.
  const auto it = std::upper_bound(s.first_example.begin(), s.first_example.end(), i);
  const size_t shard = static_cast<size_t>(it - s.first_example.begin()) - 1;
  return s.shards[shard].example(i - s.first_example[shard]);
}

}  // namespace flotilla::data
