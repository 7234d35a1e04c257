#include "flotilla/data/prepare.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <sstream>

#include <unistd.h>

#include "flotilla/base/crc32c.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/data/example_encoder.hpp"

namespace flotilla::data {
namespace {

namespace fs = std::filesystem;
constexpr const char* kPrepareComponent = "data/prepare";

// An error's message without its "[component] " tag, to re-prefix it with a file and line.
std::string_view without_component(std::string_view what) {
  if (what.starts_with("[")) {
    if (const size_t end = what.find("] "); end != std::string_view::npos) what.remove_prefix(end + 2);
  }
  return what;
}

// The lines of one split, from one file.
struct SplitInput {
  Split split;
  std::string source;  // file name for errors
  std::vector<JsonlLine> lines;
};

// Owns the file contents the lines point into.
struct Inputs {
  std::vector<std::string> contents;
  std::vector<SplitInput> splits;
};

Inputs read_folder(const fs::path& dir) {
  Inputs in;
  std::error_code ec;
  if (!fs::exists(dir / "train.jsonl", ec)) {
    throw InputError(kPrepareComponent, fmt::format("{}: no train.jsonl (a data folder holds train.jsonl and optionally "
                                             "valid.jsonl, test.jsonl)",
                                             dir.string()));
  }
  in.contents.reserve(kSplits.size());
  for (Split split : kSplits) {
    const fs::path file = dir / (std::string(split_name(split)) + ".jsonl");
    if (!fs::exists(file, ec)) continue;
    in.contents.push_back(read_text_file(file));
    std::vector<JsonlLine> lines = jsonl_lines(in.contents.back());
    if (lines.empty()) {
      throw InputError(kPrepareComponent, fmt::format("{}: empty: no examples (expected one JSON object per line)",
                                               file.string()));
    }
    in.splits.push_back({split, file.string(), std::move(lines)});
  }
  return in;
}

Inputs read_and_split_file(const fs::path& file, const std::array<double, 3>& fractions, uint64_t seed) {
  Inputs in;
  in.contents.push_back(read_text_file(file));
  const std::vector<JsonlLine> lines = jsonl_lines(in.contents.back());
  const size_t n = lines.size();
  if (n == 0) {
    throw InputError(kPrepareComponent, fmt::format("{}: empty: no examples (expected one JSON object per line)",
                                             file.string()));
  }
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  Rng rng(seed);
  for (size_t i = n - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
  // The small epsilon keeps 0.05 * 100 (= 5.000000000000001 or 4.999...) at 5.
  const auto share = [&](double f) { return static_cast<size_t>(std::floor(static_cast<double>(n) * f + 1e-9)); };
  const size_t n_valid = share(fractions[1]);
  const size_t n_test = std::min(share(fractions[2]), n - n_valid);
  const size_t n_train = n - n_valid - n_test;
  if (n_train == 0) {
    throw InputError(kPrepareComponent, fmt::format("{}: {} lines leave no training example with split {}, {}, {}",
                                             file.string(), n, fractions[0], fractions[1], fractions[2]));
  }
  const size_t bounds[] = {0, n_train, n_train + n_valid, n};
  for (size_t s = 0; s < kSplits.size(); ++s) {
    std::vector<size_t> picked(order.begin() + static_cast<ptrdiff_t>(bounds[s]),
                               order.begin() + static_cast<ptrdiff_t>(bounds[s + 1]));
    if (picked.empty()) continue;
    std::sort(picked.begin(), picked.end());
    SplitInput split{kSplits[s], file.string(), {}};
    split.lines.reserve(picked.size());
    for (size_t i : picked) split.lines.push_back(lines[i]);
    in.splits.push_back(std::move(split));
  }
  return in;
}

// Writes one split's shards into `dir` as examples arrive.
class SplitWriter {
 public:
  SplitWriter(fs::path dir, Split split, const text::Tokenizer& tokenizer, uint64_t max_shard_tokens)
      : dir_(std::move(dir)), split_(split), tokenizer_(tokenizer), max_shard_tokens_(max_shard_tokens) {}

  void add(const EncodedExample& e) {
    if (!writer_) {
      writer_.emplace(tokenizer_.fingerprint(), static_cast<uint32_t>(tokenizer_.vocab_size()));
    }
    writer_->add(e.tokens, e.mask);
    if (writer_->num_tokens() >= max_shard_tokens_) flush();
  }

  void flush() {
    if (!writer_ || writer_->num_examples() == 0) return;
    ShardEntry entry;
    entry.file = fmt::format("{}-{:05d}.fltk", split_name(split_), index_.shards.size());
    entry.examples = writer_->num_examples();
    entry.tokens = writer_->num_tokens();
    entry.bytes = writer_->write(dir_ / entry.file);
    // What is on disk, read back (as checkpoints do), rather than what we meant to write.
    entry.crc32c = crc32c_file(dir_ / entry.file).crc32c;
    index_.shards.push_back(std::move(entry));
    writer_.reset();
  }

  SplitIndex& index() { return index_; }

 private:
  fs::path dir_;
  Split split_;
  const text::Tokenizer& tokenizer_;
  uint64_t max_shard_tokens_;
  std::optional<ShardWriter> writer_;
  SplitIndex index_;
};

// Parses, encodes and writes the lines of one split; returns its index entry (no shards
// when no example survived).
SplitIndex prepare_split(const SplitInput& in, const ExampleEncoder& encoder, const PrepareOptions& options,
                         const text::Tokenizer& tokenizer, const fs::path& dir) {
  SplitWriter writer(dir, in.split, tokenizer, options.max_shard_tokens);
  SplitStats& stats = writer.index().stats;
  for (const JsonlLine& line : in.lines) {
    const auto skip_or_throw = [&](InvalidReason reason, std::string_view message) {
      if (!options.skip_invalid) throw_line_error(in.source, line.number, message);
      ++stats.skipped[std::string(invalid_reason_name(reason))];
    };
    auto parsed = parse_example_line(line.text);
    if (const auto* bad = std::get_if<LineError>(&parsed)) {
      skip_or_throw(bad->reason, bad->message);
      continue;
    }
    EncodedExample e;
    try {
      e = encoder.encode(std::get<ExampleRecord>(parsed));
    } catch (const ConversationError& ce) {
      skip_or_throw(InvalidReason::bad_conversation, ce.reason());
      continue;
    } catch (const InputError& ie) {
      // Not the line's fault (no chat template): fatal even with skip_invalid.
      throw_line_error(in.source, line.number, without_component(ie.what()));
    }
    const size_t targets = e.trainable_targets();
    if (e.truncated()) stats.truncated_targets += e.targets_before_truncation - targets;
    if (targets == 0) {
      // The cut at max_seq_len took every target (a prompt as long as the limit): said apart
      // from examples that never had one.
      ++stats.skipped[e.targets_before_truncation > 0 ? kNoTargetsAfterTruncation : "no_trainable_tokens"];
      continue;
    }
    stats.examples += 1;
    stats.tokens += e.tokens.size();
    stats.trainable_tokens += e.trainable_targets();
    stats.truncated += e.truncated() ? 1 : 0;
    stats.longest = std::max<uint64_t>(stats.longest, e.tokens.size());
    stats.longest_before_truncation = std::max<uint64_t>(stats.longest_before_truncation, e.length_before_truncation);
    writer.add(e);
  }
  writer.flush();
  return std::move(writer.index());
}

bool is_our_file(const fs::path& name) {
  const std::string s = name.filename().string();
  return s == kIndexFile || name.extension() == ".fltk" || s.find(".tmp.") != std::string::npos;
}

// Removes a folder left by an interrupted prepare, only if everything in it is ours.
void remove_stale_tmp(const fs::path& tmp) {
  std::error_code ec;
  if (!fs::exists(tmp, ec)) return;
  bool ours = fs::is_directory(tmp, ec);
  if (ours) {
    for (const auto& entry : fs::directory_iterator(tmp)) ours = ours && entry.is_regular_file() && is_our_file(entry.path());
  }
  if (!ours) {
    throw InputError(kPrepareComponent, fmt::format("{}: exists and is not a folder left by flotilla data prepare; "
                                             "remove or rename it",
                                             tmp.string()));
  }
  fs::remove_all(tmp);
}

// Removes the temporary folder unless the result was moved into place.
class TmpDirGuard {
 public:
  explicit TmpDirGuard(fs::path path) : path_(std::move(path)) {}
  ~TmpDirGuard() {
    if (armed_) {
      std::error_code ec;
      fs::remove_all(path_, ec);
    }
  }
  void release() { armed_ = false; }

 private:
  fs::path path_;
  bool armed_ = true;
};

void check_output(const PrepareOptions& options) {
  std::error_code ec;
  if (!fs::exists(options.out, ec)) return;
  if (!fs::is_directory(options.out, ec)) {
    throw InputError(kPrepareComponent, fmt::format("{}: exists and is not a directory", options.out.string()));
  }
  if (!fs::is_empty(options.out, ec) && !options.force) {
    throw InputError(kPrepareComponent, fmt::format("{}: exists and is not empty (pass --force to replace it)",
                                             options.out.string()));
  }
}

fs::path with_suffix(const fs::path& p, std::string_view suffix) {
  fs::path out = p;
  if (!out.has_filename()) out = out.parent_path();  // "out/" -> "out"
  out += suffix;
  return out;
}

}  // namespace

std::array<double, 3> parse_split_fractions(std::string_view text) {
  std::array<double, 3> f{0, 0, 0};
  const auto fail = [&](std::string_view why) {
    throw InputError(kPrepareComponent, fmt::format("--split {:?}: {} (expected train,valid[,test] fractions summing "
                                             "to 1, e.g. 0.9,0.05,0.05)",
                                             text, why));
  };
  std::vector<std::string> parts;
  std::stringstream ss{std::string(text)};
  std::string item;
  while (std::getline(ss, item, ',')) parts.push_back(item);
  if (parts.size() < 2 || parts.size() > 3) fail("two or three fractions");
  for (size_t i = 0; i < parts.size(); ++i) {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(parts[i], &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != parts[i].size() || !std::isfinite(v) || v < 0 || v > 1) {
      fail(fmt::format("{:?} is not a fraction in [0, 1]", parts[i]));
    }
    f[i] = v;
  }
  if (std::abs(f[0] + f[1] + f[2] - 1.0) > 1e-6) fail(fmt::format("the fractions sum to {}", f[0] + f[1] + f[2]));
  if (f[0] <= 0) fail("the train fraction must be positive");
  return f;
}

DatasetIndex prepare(const PrepareOptions& options, const text::Tokenizer& tokenizer,
                     const std::optional<ChatTemplate>& chat_template) {
  std::error_code ec;
  if (!fs::exists(options.data, ec)) {
    throw InputError(kPrepareComponent, fmt::format("{}: no such file or folder", options.data.string()));
  }
  const bool is_folder = fs::is_directory(options.data, ec);
  if (is_folder && options.split) {
    throw InputError(kPrepareComponent, fmt::format("{}: --split takes one file; a folder brings its own train.jsonl, "
                                             "valid.jsonl, test.jsonl",
                                             options.data.string()));
  }
  if (!is_folder && !options.split) {
    throw InputError(kPrepareComponent, fmt::format("{}: one file needs --split (e.g. 0.9,0.05,0.05), or give a folder "
                                             "with train.jsonl, valid.jsonl, test.jsonl",
                                             options.data.string()));
  }
  if (options.out.empty()) throw InputError(kPrepareComponent, "no output folder given");
  check_output(options);
  const Inputs inputs =
      is_folder ? read_folder(options.data) : read_and_split_file(options.data, *options.split, options.seed);

  const fs::path tmp = with_suffix(options.out, ".tmp");
  remove_stale_tmp(tmp);
  fs::create_directories(tmp);
  TmpDirGuard guard(tmp);

  DatasetIndex index;
  index.tokenizer_name = tokenizer.name();
  index.tokenizer_fingerprint = tokenizer.fingerprint();
  index.vocab_size = static_cast<uint32_t>(tokenizer.vocab_size());
  index.bos_id = tokenizer.bos_id();
  index.eos_id = tokenizer.eos_id();
  if (chat_template) index.chat_template = chat_template->describe();
  index.mask_prompt = options.mask_prompt;
  index.max_seq_len = options.max_seq_len;
  index.source = options.data.string();
  index.seed = options.seed;
  index.split_fractions = options.split;

  const ExampleEncoder encoder(tokenizer, chat_template, {options.mask_prompt, options.max_seq_len});
  for (const SplitInput& in : inputs.splits) {
    SplitIndex split = prepare_split(in, encoder, options, tokenizer, tmp);
    if (split.stats.examples == 0 && in.split == Split::train) {
      throw InputError(kPrepareComponent, fmt::format("{}: no training example left ({} lines, all skipped: {})", in.source,
                                               in.lines.size(),
                                               nlohmann::json(split.stats.skipped).dump()));
    }
    index.splits[in.split] = std::move(split);
  }
  write_file_atomic(tmp / kIndexFile, index_to_json(index).dump(2) + "\n");

  // Move into place; an existing OUT (empty, or replaced with --force) goes only now.
  check_output(options);
  const fs::path out = with_suffix(options.out, "");  // without a trailing '/'
  // The replaced folder steps aside under a name no one else uses, and goes once the new one is in place.
  const fs::path old = with_suffix(options.out, ".old." + std::to_string(::getpid()));
  const bool replace = fs::exists(out, ec);
  if (replace) {
    if (fs::exists(old, ec)) throw InputError(kPrepareComponent, fmt::format("{}: exists; remove it", old.string()));
    fs::rename(out, old);
  }
  fs::rename(tmp, out);
  guard.release();
  if (replace) fs::remove_all(old);
  return index;
}

DatasetIndex prepare_for_model(const fs::path& model_dir, std::string_view chat_template_name,
                               const PrepareOptions& options) {
  const auto tokenizer = text::Tokenizer::load_for_model(model_dir);
  const std::optional<ChatTemplate> tmpl = resolve_chat_template(model_dir, chat_template_name);
  return prepare(options, *tokenizer, tmpl);
}

bool is_unprepared_data_folder(const fs::path& dir) {
  std::error_code ec;
  return fs::is_directory(dir, ec) && !fs::exists(dir / kIndexFile, ec) && fs::is_regular_file(dir / "train.jsonl", ec);
}

TemporaryPreparedData::TemporaryPreparedData(PrepareOptions options, const text::Tokenizer& tokenizer,
                                             const std::optional<ChatTemplate>& chat_template) {
  std::string pattern = (fs::temp_directory_path() / "flotilla-data-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) throw_errno(kPrepareComponent, "mkdtemp " + pattern);
  root_ = pattern;
  dir_ = root_ / "data";
  options.out = dir_;
  options.force = false;
  try {
    index_ = prepare(options, tokenizer, chat_template);
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(root_, ignored);
    throw;
  }
}

TemporaryPreparedData::~TemporaryPreparedData() {
  std::error_code ignored;
  fs::remove_all(root_, ignored);
}

std::string format_prepare_summary(const DatasetIndex& index) {
  std::string out;
  out += fmt::format("tokenizer      {} ({})\n", index.tokenizer_name, index.tokenizer_fingerprint);
  out += fmt::format("chat template  {}\n", index.chat_template.value_or("none"));
  out += fmt::format("mask prompt    {}\n", index.mask_prompt ? "yes (loss on completions / assistant turns)" : "no");
  out += fmt::format("max seq len    {}\n\n", index.max_seq_len == 0 ? std::string("none") : std::to_string(index.max_seq_len));
  out += fmt::format("{:<6} {:>9} {:>11} {:>11} {:>9} {:>8} {:>7}  {}\n", "split", "examples", "tokens", "trainable",
                     "truncated", "longest", "shards", "skipped");
  for (const auto& [split, s] : index.splits) {
    size_t skipped_total = 0;
    std::string reasons;
    for (const auto& [reason, count] : s.stats.skipped) {
      skipped_total += count;
      reasons += fmt::format("{}{} {}", reasons.empty() ? "" : ", ", reason, count);
    }
    out += fmt::format("{:<6} {:>9} {:>11} {:>11} {:>9} {:>8} {:>7}  {}{}\n", split_name(split), s.stats.examples,
                       s.stats.tokens, s.stats.trainable_tokens, s.stats.truncated, s.stats.longest, s.shards.size(),
                       skipped_total, reasons.empty() ? "" : " (" + reasons + ")");
  }
  // What the cut at max_seq_len lost, in words: the table's counts are easy to miss.
  bool first_note = true;
  for (const auto& [split, s] : index.splits) {
    const auto emptied_it = s.stats.skipped.find(kNoTargetsAfterTruncation);
    const uint64_t emptied = emptied_it == s.stats.skipped.end() ? 0 : emptied_it->second;
    if (s.stats.truncated == 0 && emptied == 0) continue;
    const uint64_t targets = s.stats.trainable_tokens + s.stats.truncated_targets;
    if (first_note) out += "\n";
    first_note = false;
    out += fmt::format("{}: {} of {} examples are longer than --max-seq-len {} and were cut: {} of {} target tokens "
                       "lost ({:.1f}%)",
                       split_name(split), s.stats.truncated + emptied, s.stats.examples + emptied, index.max_seq_len,
                       s.stats.truncated_targets, targets,
                       targets > 0 ? 100.0 * static_cast<double>(s.stats.truncated_targets) / static_cast<double>(targets)
                                   : 0.0);
    if (emptied > 0)
      out += fmt::format("; {} of them kept no target token (the prompt fills the first {} tokens) and were left out",
                         emptied, index.max_seq_len);
    out += fmt::format(". The longest was {} tokens: a larger --max-seq-len keeps more.\n",
                       s.stats.longest_before_truncation);
  }
  return out;
}

}  // namespace flotilla::data
