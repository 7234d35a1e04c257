// The SentencePiece tokenizer against Google's Python bindings (python3-sentencepiece),
// on two models this test trains itself: the Llama 2 / Mistral configuration (BPE, byte
// fallback, digits split, identity normalizer, whitespace kept) and a default unigram
// model (NFKC, extra whitespace removed, unknown pieces, extra control and user symbols).
// Python and its module are required: scripts/setup installs them; without them every
// comparison test fails and says so.
#include "flotilla/text/sentencepiece_tokenizer.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "../temp_dir.hpp"

namespace flotilla::text {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kPython = "/usr/bin/python3";

using ::flotilla::testing::write_text;

// Runs `python3 script args...`; stdout into `out`, "" on success or the failure text.
std::string run_python(const fs::path& script, const std::vector<std::string>& args,
                       const fs::path& work, std::string* out = nullptr) {
  std::string cmd = std::string(kPython) + " '" + script.string() + "'";
  for (const auto& a : args) cmd += " '" + a + "'";
  const fs::path out_file = work / "python.out";
  const fs::path err_file = work / "python.err";
  cmd += " >'" + out_file.string() + "' 2>'" + err_file.string() + "'";
  const int rc = std::system(cmd.c_str());
  if (out != nullptr) *out = read_text_file(out_file);
  if (rc != 0) {
    return "`" + cmd + "` failed (status " + std::to_string(rc) + "): " + read_text_file(err_file);
  }
  return "";
}

// Texts both models encode; chosen for what tends to break tokenizers: nothing at all,
// whitespace only and runs of it, newlines and tabs (byte fallback in the BPE model),
// accents composed and not, CJK and emoji (no such piece: byte fallback or <unk>),
// full-width forms (NFKC changes them), digits, code, markup that looks special.
std::vector<std::string> varied_texts(const fs::path& corpus) {
  std::vector<std::string> texts = {
      "",
      " ",
      "   ",
      "\n",
      "\n\n\n",
      "\t",
      " \t \n ",
      "Ahoy, matey!",
      " leading space",
      "trailing space ",
      "two  spaces   three    four",
      "line one\nline two\r\nline three\n",
      "\ttabbed\tcolumns\t",
      "café naïve résumé Ωmega",
      "e\xcc\x81 decomposed vs \xc3\xa9 composed",
      "海賊の船 and 中文字符",
      "🏴‍☠️⚓😀",
      "ＦＵＬＬ width １２３",
      "numbers 1234567890 3.14159 -42 1e-5",
      "def f(x):\n    return x**2  # square\n",
      "{\"json\": [1, 2, 3], \"ok\": true}",
      "<s> looks special </s> <unk> <tool>",
      "a\xc2\xa0" "b non-breaking, zero\xe2\x80\x8bwidth",
      "Привет, мир! Γειά σου",
      "mixed 海 1 🙂 x\n\t end",
  };
  // A long stretch of the sample corpus: the common case, many pieces of every length.
  texts.push_back(read_text_file(corpus).substr(0, 3000));
  return texts;
}

// Trains the two models once for the whole suite.
class SentencePieceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    work_ = fs::temp_directory_path() / ("flotilla_spm_" + std::to_string(::getpid()));
    fs::remove_all(work_);
    fs::create_directories(work_);
    setup_error_.clear();
    if (!fs::exists(kPython)) {
      setup_error_ = std::string(kPython) + " is missing: run scripts/setup (python3, "
                     "python3-sentencepiece)";
      return;
    }
    const fs::path corpus = fs::path(FLOTILLA_SOURCE_DIR) / "data/sample/corpus.txt";
    // A few lines with accents and digits so that some non-ASCII pieces exist.
    write_text(work_ / "train.txt", read_text_file(corpus) +
                                   "\ncafé crème à la carte, déjà vu 2024 42 3.14\n");
    write_text(work_ / "train.py", R"PY(
import sys
try:
    import sentencepiece as spm
except ImportError as e:
    sys.exit("python3-sentencepiece is missing (%s): run scripts/setup" % e)
text, out = sys.argv[1], sys.argv[2]
# Llama 2 / Mistral: BPE over raw text, unknown characters as UTF-8 byte pieces.
spm.SentencePieceTrainer.train(
    input=text, model_prefix=out + "/bpe", model_type="bpe", vocab_size=1000,
    byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
    normalization_rule_name="identity", add_dummy_prefix=True,
    remove_extra_whitespaces=False, character_coverage=0.99995,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
# SentencePiece's defaults: unigram, NFKC, extra whitespace removed, <unk> for the rest;
# plus a pad piece, a control symbol and a user-defined one.
spm.SentencePieceTrainer.train(
    input=text, model_prefix=out + "/unigram", model_type="unigram", vocab_size=1000,
    pad_id=3, control_symbols=["<sep>"], user_defined_symbols=["<tool>"],
    num_threads=1, minloglevel=2)
)PY");
    write_text(work_ / "reference.py", R"PY(
import json, sys
import sentencepiece as spm
model, texts_file, out_file = sys.argv[1], sys.argv[2], sys.argv[3]
sp = spm.SentencePieceProcessor(model_file=model)
texts = json.load(open(texts_file, encoding="utf-8"))
ids = [sp.encode(t) for t in texts]
n = sp.get_piece_size()
def wrap(x):
    return [i for i in [sp.bos_id()] if i >= 0] + x + [i for i in [sp.eos_id()] if i >= 0]
json.dump({
    "vocab_size": n, "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id(),
    "control": [i for i in range(n) if sp.is_control(i)],
    "ids": ids,
    "pieces": [[sp.id_to_piece(i) for i in x] for x in ids],
    "decoded": [sp.decode(x) for x in ids],
    "decoded_wrapped": [sp.decode(wrap(x)) for x in ids],
}, open(out_file, "w", encoding="utf-8"))
)PY");
    setup_error_ = run_python(work_ / "train.py", {(work_ / "train.txt").string(), work_.string()},
                              work_);
    if (!setup_error_.empty()) return;
    texts_ = varied_texts(corpus);
    write_text(work_ / "texts.json", json(texts_).dump());
  }

  static void TearDownTestSuite() { fs::remove_all(work_); }

  static fs::path bpe_model() { return work_ / "bpe.model"; }
  static fs::path unigram_model() { return work_ / "unigram.model"; }

  // What the Python bindings make of texts_ with `model`.
  static json reference(const fs::path& model) {
    const fs::path out = work_ / (model.stem().string() + ".reference.json");
    const std::string error = run_python(
        work_ / "reference.py", {model.string(), (work_ / "texts.json").string(), out.string()},
        work_);
    if (!error.empty()) throw std::runtime_error(error);
    return json::parse(read_text_file(out));
  }

  // A fresh empty directory for one test.
  static fs::path fresh_dir(const std::string& name) {
    const fs::path dir = work_ / name;
    fs::remove_all(dir);
    fs::create_directories(dir);
    return dir;
  }

  void SetUp() override { ASSERT_TRUE(setup_error_.empty()) << setup_error_; }

  void expect_same_as_python(const fs::path& model) {
    const SentencePieceTokenizer tok(model);
    const json ref = reference(model);
    EXPECT_EQ(tok.vocab_size(), ref["vocab_size"].get<int32_t>());
    EXPECT_EQ(tok.bos_id(), ref["bos"].get<int32_t>());
    EXPECT_EQ(tok.eos_id(), ref["eos"].get<int32_t>());
    EXPECT_EQ(tok.pad_id(), ref["pad"].get<int32_t>());
    EXPECT_EQ(tok.unk_id(), ref["unk"].get<int32_t>());
    std::vector<int32_t> special;
    for (int32_t id = 0; id < tok.vocab_size(); ++id) {
      if (tok.is_special(id)) special.push_back(id);
    }
    EXPECT_EQ(special, ref["control"].get<std::vector<int32_t>>());

    ASSERT_EQ(ref["ids"].size(), texts_.size());
    for (size_t i = 0; i < texts_.size(); ++i) {
      SCOPED_TRACE("text " + std::to_string(i) + ": " + json(texts_[i]).dump());
      const std::vector<int32_t> ids = tok.encode(texts_[i]);
      EXPECT_EQ(ids, ref["ids"][i].get<std::vector<int32_t>>())
          << "python pieces: " << ref["pieces"][i].dump();
      EXPECT_EQ(tok.decode(ids), ref["decoded"][i].get<std::string>());
      std::vector<int32_t> wrapped;
      if (tok.bos_id() >= 0) wrapped.push_back(tok.bos_id());
      wrapped.insert(wrapped.end(), ids.begin(), ids.end());
      if (tok.eos_id() >= 0) wrapped.push_back(tok.eos_id());
      EXPECT_EQ(tok.decode(wrapped), ref["decoded_wrapped"][i].get<std::string>());
    }
  }

  static inline fs::path work_;
  static inline std::string setup_error_;
  static inline std::vector<std::string> texts_;
};

TEST_F(SentencePieceTest, LlamaStyleBpeMatchesPythonIdsAndDecode) {
  expect_same_as_python(bpe_model());
}

TEST_F(SentencePieceTest, UnigramNfkcMatchesPythonIdsAndDecode) {
  expect_same_as_python(unigram_model());
}

TEST_F(SentencePieceTest, ByteFallbackRoundTripsEveryTextExactly) {
  // The Llama configuration loses nothing: identity normalizer, whitespace kept, and
  // every character without a piece spelled as its UTF-8 bytes.
  const SentencePieceTokenizer tok(bpe_model());
  for (const std::string& text : texts_) {
    EXPECT_EQ(tok.decode(tok.encode(text)), text) << json(text).dump();
  }
  const json ref = reference(bpe_model());
  const size_t cjk =
      std::find(texts_.begin(), texts_.end(), "海賊の船 and 中文字符") - texts_.begin();
  ASSERT_LT(cjk, texts_.size());
  const auto& pieces = ref["pieces"][cjk];
  EXPECT_NE(std::find(pieces.begin(), pieces.end(), "<0xE6>"), pieces.end()) << pieces.dump();
  EXPECT_EQ(tok.token_to_piece(tok.encode("\n").back()), "\n");
  EXPECT_EQ(tok.encode("海").size(), 4u);  // "▁" and three byte pieces
  EXPECT_EQ(tok.token_to_piece(tok.encode("海")[1]), std::string(1, '\xe6'));
}

TEST_F(SentencePieceTest, EmptyAndSpaceOnlyTexts) {
  const SentencePieceTokenizer bpe(bpe_model());
  EXPECT_TRUE(bpe.encode("").empty());
  EXPECT_EQ(bpe.decode(std::vector<int32_t>{}), "");
  EXPECT_EQ(bpe.decode(bpe.encode("   ")), "   ");
  const SentencePieceTokenizer unigram(unigram_model());
  EXPECT_TRUE(unigram.encode("   ").empty());  // NFKC model removes extra whitespace
}

TEST_F(SentencePieceTest, PiecesConcatenateToDecodeUpToTheDummyPrefixSpace) {
  for (const fs::path& model : {bpe_model(), unigram_model()}) {
    const SentencePieceTokenizer tok(model);
    EXPECT_TRUE(tok.decode_strips_leading_space()) << model;
    for (const std::string& text : texts_) {
      std::vector<int32_t> ids = {tok.bos_id()};
      for (const int32_t id : tok.encode(text)) ids.push_back(id);
      ids.push_back(tok.eos_id());
      std::string pieces;
      for (const int32_t id : ids) pieces += tok.token_to_piece(id);
      if (tok.decode_strips_leading_space() && pieces.starts_with(' ')) pieces.erase(0, 1);
      EXPECT_EQ(pieces, tok.decode(ids)) << model << " " << json(text).dump();
    }
  }
}

TEST_F(SentencePieceTest, PiecesKeepTheirSpaceForStreamingAfterAPrompt) {
  const SentencePieceTokenizer tok(bpe_model());
  const std::vector<int32_t> ids = tok.encode("Ahoy there");
  ASSERT_GE(ids.size(), 2u);
  std::string continuation;
  for (size_t i = 1; i < ids.size(); ++i) continuation += tok.token_to_piece(ids[i]);
  EXPECT_NE(continuation.find(" there"), std::string::npos) << continuation;
  EXPECT_EQ(tok.token_to_piece(ids[0]).front(), ' ');  // "▁Ah...": the dummy prefix
  EXPECT_EQ(tok.decode(ids), "Ahoy there");
}

TEST_F(SentencePieceTest, SpecialTokensAreControlPiecesOnly) {
  const SentencePieceTokenizer bpe(bpe_model());
  EXPECT_EQ(bpe.bos_id(), 1);
  EXPECT_EQ(bpe.eos_id(), 2);
  EXPECT_EQ(bpe.pad_id(), -1);  // Llama has none
  EXPECT_TRUE(bpe.is_special(1));
  EXPECT_TRUE(bpe.is_special(2));
  EXPECT_FALSE(bpe.is_special(bpe.unk_id()));
  EXPECT_FALSE(bpe.is_special(-1));
  EXPECT_EQ(bpe.token_to_piece(1), "");
  EXPECT_EQ(bpe.decode(std::vector<int32_t>{1, 2}), "");

  const SentencePieceTokenizer unigram(unigram_model());
  EXPECT_EQ(unigram.pad_id(), 3);
  EXPECT_TRUE(unigram.is_special(3));
  EXPECT_EQ(unigram.token_to_piece(unigram.unk_id()), " \xe2\x81\x87 ");  // " ⁇ "
  EXPECT_EQ(unigram.encode("<tool>").size(), 2u);  // "▁" and the user-defined piece
  EXPECT_EQ(unigram.token_to_piece(unigram.encode("<tool>").back()), "<tool>");
}

TEST_F(SentencePieceTest, IdsOutsideTheVocabularyAreErrors) {
  const SentencePieceTokenizer tok(bpe_model());
  EXPECT_THROW(tok.decode(std::vector<int32_t>{5, 1000}), Error);
  EXPECT_THROW(tok.decode(std::vector<int32_t>{-1}), Error);
  EXPECT_THROW(tok.token_to_piece(1000), Error);
}

TEST_F(SentencePieceTest, FingerprintIsTheModelFileAndStable) {
  const SentencePieceTokenizer a(bpe_model());
  const SentencePieceTokenizer b(bpe_model());
  const SentencePieceTokenizer u(unigram_model());
  EXPECT_EQ(a.fingerprint(), b.fingerprint());
  EXPECT_NE(a.fingerprint(), u.fingerprint());
  EXPECT_EQ(a.fingerprint().size(), 16u);
  EXPECT_EQ(a.fingerprint().find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_EQ(a.name(), "sentencepiece");
}

TEST_F(SentencePieceTest, LoadForModelPicksTokenizerModel) {
  const fs::path dir = fresh_dir("model_dir");
  fs::copy_file(bpe_model(), dir / "tokenizer.model");
  const auto tok = Tokenizer::load_for_model(dir);
  EXPECT_EQ(tok->name(), "sentencepiece");
  EXPECT_EQ(tok->fingerprint(), SentencePieceTokenizer(bpe_model()).fingerprint());
  EXPECT_TRUE(tok->add_bos());
  EXPECT_FALSE(tok->add_eos());
}

TEST_F(SentencePieceTest, TokenizerConfigSetsAddBosAndAddEos) {
  const fs::path dir = fresh_dir("config_dir");
  fs::copy_file(bpe_model(), dir / "tokenizer.model");
  write_text(dir / "tokenizer_config.json",
        R"({"add_bos_token": false, "add_eos_token": true, "chat_template": "{{x}}"})");
  const auto tok = Tokenizer::load_for_model(dir);
  EXPECT_FALSE(tok->add_bos());
  EXPECT_TRUE(tok->add_eos());

  write_text(dir / "tokenizer_config.json", R"({"add_bos_token": null})");
  EXPECT_TRUE(Tokenizer::load_for_model(dir)->add_bos());

  write_text(dir / "tokenizer_config.json", R"({"add_bos_token": "yes"})");
  try {
    Tokenizer::load_for_model(dir);
    ADD_FAILURE() << "no error for a string add_bos_token";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer_config.json: \"add_bos_token\""),
              std::string::npos) << e.what();
  }
}

TEST_F(SentencePieceTest, SaveThenLoadGivesTheSameTokenizerAndKeepsOtherConfigKeys) {
  const fs::path src = fresh_dir("save_src");
  fs::copy_file(unigram_model(), src / "tokenizer.model");
  write_text(src / "tokenizer_config.json", R"({"add_eos_token": true})");
  const auto tok = Tokenizer::load_for_model(src);

  const fs::path dst = fresh_dir("save_dst");
  write_text(dst / "tokenizer_config.json", R"({"chat_template": "{{ messages }}"})");
  tok->save(dst);
  const auto back = Tokenizer::load_for_model(dst);
  EXPECT_EQ(back->name(), "sentencepiece");
  EXPECT_EQ(back->fingerprint(), tok->fingerprint());
  EXPECT_EQ(back->encode("Ahoy, matey!"), tok->encode("Ahoy, matey!"));
  EXPECT_TRUE(back->add_bos());
  EXPECT_TRUE(back->add_eos());
  const json config = json::parse(read_text_file(dst / "tokenizer_config.json"));
  EXPECT_EQ(config["chat_template"], "{{ messages }}");
}

TEST_F(SentencePieceTest, FlotillaTokenizerFileWinsOverTokenizerModel) {
  const fs::path dir = fresh_dir("both_dir");
  fs::copy_file(bpe_model(), dir / "tokenizer.model");
  write_text(dir / "flotilla_tokenizer.json", R"({"type": "bytes"})");
  EXPECT_EQ(Tokenizer::load_for_model(dir)->name(), "bytes");
}

TEST_F(SentencePieceTest, TokenizerJsonIsChosenOverTokenizerModel) {
  // "{}" is no usable tokenizer.json: the error names it, which shows the loader picked
  // it although a valid tokenizer.model sits beside it.
  const fs::path dir = fresh_dir("hf_dir");
  fs::copy_file(bpe_model(), dir / "tokenizer.model");
  write_text(dir / "tokenizer.json", "{}");
  try {
    const auto tok = Tokenizer::load_for_model(dir);
    EXPECT_NE(tok->name(), "sentencepiece");
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.json"), std::string::npos) << e.what();
  }
}

TEST(SentencePieceLoad, EmptyDirectoryGivesBytes) {
  const fs::path dir =
      fs::temp_directory_path() / ("flotilla_spm_empty_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  EXPECT_EQ(Tokenizer::load_for_model(dir)->name(), "bytes");
  fs::remove_all(dir);
}

TEST(SentencePieceLoad, CorruptModelIsAnInputErrorNamingTheFile) {
  const fs::path dir =
      fs::temp_directory_path() / ("flotilla_spm_bad_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const std::string& bytes : {std::string("not a model"), std::string()}) {
    write_text(dir / "tokenizer.model", bytes);
    try {
      Tokenizer::load_for_model(dir);
      ADD_FAILURE() << "no error for tokenizer.model holding " << json(bytes).dump();
    } catch (const InputError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("[text/sentencepiece]"), std::string::npos) << msg;
      EXPECT_NE(msg.find((dir / "tokenizer.model").string() + ": not a valid SentencePiece model"),
                std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }
  EXPECT_THROW(SentencePieceTokenizer(dir / "missing.model"), InputError);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace flotilla::text
