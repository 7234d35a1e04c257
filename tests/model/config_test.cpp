#include "flotilla/model/config.hpp"
#include "flotilla/model/model_writer.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"

namespace flotilla::model {
namespace {
using nlohmann::json;
using ::testing::HasSubstr;

// config.json files as published on the Hugging Face hub (trimmed of _name_or_path).
constexpr const char* kLlama2_7B = R"({
  "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
  "tie_word_embeddings": false, "torch_dtype": "float16",
  "transformers_version": "4.31.0.dev0", "use_cache": true, "vocab_size": 32000})";

constexpr const char* kMistral7B_v03 = R"({
  "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
  "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.42.0.dev0", "use_cache": true, "vocab_size": 32768})";

constexpr const char* kLlama32_1B = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
  "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256})";

constexpr const char* kQwen2_05B = R"({
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
  "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 131072,
  "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
  "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": true,
  "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": true,
  "use_sliding_window": false, "vocab_size": 151936})";

ModelConfig parse(const char* text) { return ModelConfig::from_json(json::parse(text), "config.json"); }

// The InputError message from_json raises for `j` ("" and a failure if none).
std::string parse_error(const json& j) {
  try {
    ModelConfig::from_json(j, "/models/x/config.json");
  } catch (const InputError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no InputError for " << j.dump();
  return "";
}

json llama2() { return json::parse(kLlama2_7B); }

void expect_same(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.arch, b.arch);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.dim, b.dim);
  EXPECT_EQ(a.n_layers, b.n_layers);
  EXPECT_EQ(a.n_heads, b.n_heads);
  EXPECT_EQ(a.n_kv_heads, b.n_kv_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.ffn_dim, b.ffn_dim);
  EXPECT_EQ(a.max_position, b.max_position);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.rope_scaling.factor, b.rope_scaling.factor);
  EXPECT_EQ(a.rope_scaling.low_freq_factor, b.rope_scaling.low_freq_factor);
  EXPECT_EQ(a.rope_scaling.high_freq_factor, b.rope_scaling.high_freq_factor);
  EXPECT_EQ(a.rope_scaling.original_max_position, b.rope_scaling.original_max_position);
  EXPECT_EQ(a.tie_embeddings, b.tie_embeddings);
  EXPECT_EQ(a.qkv_bias, b.qkv_bias);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_id, b.eos_token_id);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
  EXPECT_EQ(a.sliding_window, b.sliding_window);
  EXPECT_EQ(a.initializer_range, b.initializer_range);
  EXPECT_EQ(a.torch_dtype, b.torch_dtype);
  EXPECT_EQ(a.num_params(), b.num_params());
}

// -------------------------------------------------------------------- real configs

TEST(ModelConfig, ParsesLlama2_7B) {
  const ModelConfig c = parse(kLlama2_7B);
  EXPECT_EQ(c.arch, Architecture::llama);
  EXPECT_EQ(c.dim, 4096);
  EXPECT_EQ(c.n_layers, 32);
  EXPECT_EQ(c.n_heads, 32);
  EXPECT_EQ(c.n_kv_heads, 32);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.ffn_dim, 11008);
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.max_position, 4096);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_EQ(c.rope_theta, 10000.0f);
  EXPECT_EQ(c.rope_scaling.factor, 0.0f);
  EXPECT_FALSE(c.tie_embeddings);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_id, 2);
  EXPECT_EQ(c.torch_dtype, "float16");
  EXPECT_EQ(c.num_params(), 6'738'415'616);  // the count transformers reports
}

TEST(ModelConfig, ParsesMistral7B_v03) {
  const ModelConfig c = parse(kMistral7B_v03);
  EXPECT_EQ(c.arch, Architecture::mistral);
  EXPECT_EQ(c.n_heads, 32);
  EXPECT_EQ(c.n_kv_heads, 8);
  EXPECT_EQ(c.kv_dim(), 1024);
  EXPECT_EQ(c.rope_theta, 1e6f);
  EXPECT_EQ(c.vocab_size, 32768);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.max_position, 32768);
  EXPECT_EQ(c.num_params(), 7'248'023'552);
}

TEST(ModelConfig, ParsesLlama32_1BWithLlama3RopeScalingAndTiedEmbeddings) {
  const ModelConfig c = parse(kLlama32_1B);
  EXPECT_EQ(c.arch, Architecture::llama);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.n_kv_heads, 8);
  EXPECT_TRUE(c.tie_embeddings);
  EXPECT_EQ(c.rope_theta, 500000.0f);
  EXPECT_EQ(c.rope_scaling.factor, 32.0f);
  EXPECT_EQ(c.rope_scaling.low_freq_factor, 1.0f);
  EXPECT_EQ(c.rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(c.rope_scaling.original_max_position, 8192);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.eos_token_id, 128001);
  EXPECT_EQ(c.num_params(), 1'235'814'400);
}

TEST(ModelConfig, ParsesQwen2_05BWithBiasAndTiedEmbeddings) {
  const ModelConfig c = parse(kQwen2_05B);
  EXPECT_EQ(c.arch, Architecture::qwen2);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_TRUE(c.tie_embeddings);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-6f);
  EXPECT_EQ(c.sliding_window, 0);  // use_sliding_window false
  EXPECT_EQ(c.num_params(), 494'032'768);
}

TEST(ModelConfig, EosListKeepsAllIdsAndTheFirstAsEos) {
  json j = json::parse(kLlama32_1B);
  j["eos_token_id"] = {128001, 128008, 128009};  // Llama-3.2-1B-Instruct
  const ModelConfig c = ModelConfig::from_json(j, "config.json");
  EXPECT_EQ(c.eos_token_id, 128001);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
  EXPECT_EQ(c.to_json()["eos_token_id"], j["eos_token_id"]);
}

TEST(ModelConfig, AbsentOptionalFieldsTakeTransformersDefaults) {
  const json j = {{"model_type", "llama"},     {"hidden_size", 256},
                  {"num_hidden_layers", 2},    {"num_attention_heads", 8},
                  {"intermediate_size", 512},  {"vocab_size", 1000}};
  const ModelConfig c = ModelConfig::from_json(j, "config.json");
  EXPECT_EQ(c.n_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-6f);
  EXPECT_EQ(c.rope_theta, 10000.0f);
  EXPECT_EQ(c.max_position, 2048);
  EXPECT_FALSE(c.tie_embeddings);
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_EQ(c.eos_token_id, -1);
}

TEST(ModelConfig, MistralV01SlidingWindowIsKept) {
  json j = json::parse(kMistral7B_v03);
  j["sliding_window"] = 4096;
  EXPECT_EQ(ModelConfig::from_json(j, "config.json").sliding_window, 4096);
}

TEST(ModelConfig, Transformers5RopeParametersAreRead) {
  json j = json::parse(kLlama32_1B);
  json params = j["rope_scaling"];
  params["rope_theta"] = 500000.0;
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = params;
  const ModelConfig c = ModelConfig::from_json(j, "config.json");
  EXPECT_EQ(c.rope_theta, 500000.0f);
  EXPECT_EQ(c.rope_scaling.factor, 32.0f);
}

// ---------------------------------------------------------------------- round trips

TEST(ModelConfig, ToJsonRoundTripsEveryRealConfig) {
  for (const char* text : {kLlama2_7B, kMistral7B_v03, kLlama32_1B, kQwen2_05B}) {
    const ModelConfig c = parse(text);
    SCOPED_TRACE(std::string(architecture_name(c.arch)));
    expect_same(ModelConfig::from_json(c.to_json(), "roundtrip"), c);
  }
}

TEST(ModelConfig, ToJsonRoundTripsPresets) {
  for (const char* name : {"tiny", "15M", "110M"}) {
    SCOPED_TRACE(name);
    const ModelConfig c = preset_config(name);
    expect_same(ModelConfig::from_json(c.to_json(), "roundtrip"), c);
  }
}

TEST(ModelConfig, ToJsonWritesWhatTransformersExpects) {
  const json j = parse(kLlama32_1B).to_json();
  EXPECT_EQ(j["architectures"], json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(j["model_type"], "llama");
  EXPECT_EQ(j["hidden_act"], "silu");
  EXPECT_EQ(j["use_cache"], true);
  EXPECT_EQ(j["attention_bias"], false);
  EXPECT_EQ(j["tie_word_embeddings"], true);
  EXPECT_EQ(j["head_dim"], 64);
  EXPECT_EQ(j["rms_norm_eps"].get<double>(), 1e-5);  // shortest decimal, not 9.99999974e-06
  EXPECT_EQ(j["rope_scaling"]["rope_type"], "llama3");
  EXPECT_EQ(j["rope_scaling"]["factor"].get<double>(), 32.0);
  EXPECT_EQ(j["rope_scaling"]["original_max_position_embeddings"], 8192);

  const json m = parse(kMistral7B_v03).to_json();
  EXPECT_EQ(m["architectures"], json::array({"MistralForCausalLM"}));
  EXPECT_TRUE(m.contains("sliding_window"));
  EXPECT_TRUE(m["sliding_window"].is_null());
  EXPECT_TRUE(m["rope_scaling"].is_null());
  EXPECT_EQ(parse(kQwen2_05B).to_json()["architectures"], json::array({"Qwen2ForCausalLM"}));

  const json tiny = preset_config("tiny").to_json();
  EXPECT_EQ(tiny["torch_dtype"], "float32");
  EXPECT_TRUE(tiny["bos_token_id"].is_null());  // unset: the tokenizer decides
}

// ------------------------------------------------------------------------ presets

TEST(ModelConfig, PresetsHaveLlama2cSizes) {
  const ModelConfig tiny = preset_config("tiny");
  EXPECT_EQ(tiny.vocab_size, 512);
  EXPECT_EQ(tiny.dim, 64);
  EXPECT_EQ(tiny.n_layers, 2);
  EXPECT_EQ(tiny.n_heads, 4);
  EXPECT_EQ(tiny.n_kv_heads, 2);
  EXPECT_EQ(tiny.head_dim, 16);
  EXPECT_EQ(tiny.ffn_dim, 192);
  EXPECT_EQ(tiny.max_position, 512);

  const ModelConfig s15 = preset_config("15M");
  EXPECT_EQ(s15.dim, 256);
  EXPECT_EQ(s15.head_dim, 32);
  EXPECT_EQ(s15.max_position, 256);
  EXPECT_EQ(s15.num_params(), 15'012'096);  // about llama2.c's stories15M (15'191'712), shared classifier

  const ModelConfig s110 = preset_config("110M");
  EXPECT_EQ(s110.dim, 768);
  EXPECT_EQ(s110.ffn_dim, 2048);
  EXPECT_EQ(s110.max_position, 1024);
  EXPECT_EQ(s110.num_params(), 109'529'856);
}

// The tour quantizes what the presets make: at the default group size (64) every Linear
// weight and the embeddings are quantized, none left float.
TEST(ModelConfig, PresetsQuantizeWholeAtTheDefaultGroupSize) {
  for (const char* name : {"tiny", "15M", "110M"}) {
    SCOPED_TRACE(name);
    const QuantizationPlan plan = plan_quantization(preset_config(name), QuantFormat{4, 64});
    EXPECT_TRUE(plan.left_float.empty()) << describe_left_float(plan);
    EXPECT_FALSE(plan.quantized.empty());
  }
}

TEST(ModelConfig, UnknownPresetListsThePresets) {
  try {
    preset_config("7B");
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_THAT(e.what(), HasSubstr("unknown preset '7B' (presets: tiny, 15M, 110M)"));
  }
}

// ---------------------------------------------------------------------- bad input

TEST(ModelConfigErrors, UnknownModelType) {
  json j = llama2();
  j["model_type"] = "gpt2";
  EXPECT_THAT(parse_error(j),
              HasSubstr("[model/config] /models/x/config.json: unknown model_type 'gpt2' "
                        "(supported: llama, mistral, qwen2, mixtral, qwen2_moe)"));
}

TEST(ModelConfigErrors, MissingRequiredField) {
  json j = llama2();
  j.erase("hidden_size");
  EXPECT_THAT(parse_error(j),
              HasSubstr("/models/x/config.json: missing required field 'hidden_size'"));
  j = llama2();
  j["vocab_size"] = nullptr;
  EXPECT_THAT(parse_error(j), HasSubstr("missing required field 'vocab_size'"));
}

TEST(ModelConfigErrors, WrongTypeNamesTheField) {
  json j = llama2();
  j["hidden_size"] = "4096";
  EXPECT_THAT(parse_error(j),
              HasSubstr("field 'hidden_size' must be an integer, got string \"4096\""));
  j = llama2();
  j["tie_word_embeddings"] = 1;
  EXPECT_THAT(parse_error(j), HasSubstr("field 'tie_word_embeddings' must be true or false"));
  j = llama2();
  j["rms_norm_eps"] = "1e-5";
  EXPECT_THAT(parse_error(j), HasSubstr("field 'rms_norm_eps' must be a number"));
  j = llama2();
  j["eos_token_id"] = "</s>";
  EXPECT_THAT(parse_error(j), HasSubstr("field 'eos_token_id' must be a non-negative token id"));
  j = llama2();
  j["num_hidden_layers"] = 32.5;
  EXPECT_THAT(parse_error(j), HasSubstr("field 'num_hidden_layers' must be an integer"));
}

TEST(ModelConfigErrors, HeadsNotDivisibleByKvHeads) {
  json j = llama2();
  j["num_key_value_heads"] = 5;
  EXPECT_THAT(parse_error(j),
              HasSubstr("num_attention_heads (32) is not divisible by num_key_value_heads (5)"));
}

TEST(ModelConfigErrors, NonPositiveSizesAndOddHeadDim) {
  json j = llama2();
  j["num_hidden_layers"] = 0;
  EXPECT_THAT(parse_error(j), HasSubstr("field 'num_hidden_layers' must be positive, got 0"));
  j = llama2();
  j["head_dim"] = 127;
  EXPECT_THAT(parse_error(j), HasSubstr("head_dim (127) must be even"));
  j = llama2();
  j["hidden_size"] = 4000;
  j["num_attention_heads"] = 48;
  j["num_key_value_heads"] = 48;
  EXPECT_THAT(parse_error(j), HasSubstr("hidden_size (4000) is not divisible by "
                                        "num_attention_heads (48)"));
}

TEST(ModelConfigErrors, UnsupportedRopeScaling) {
  json j = llama2();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  EXPECT_THAT(parse_error(j), HasSubstr("rope_scaling type 'linear' is not supported "
                                        "(supported: llama3); linear position interpolation"));
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  EXPECT_THAT(parse_error(j), HasSubstr("rope_scaling type 'yarn' is not supported"));
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  EXPECT_THAT(parse_error(j), HasSubstr("missing required field 'rope_scaling.low_freq_factor'"));
  j["rope_scaling"] = "llama3";
  EXPECT_THAT(parse_error(j), HasSubstr("field 'rope_scaling' must be an object or null"));
}

TEST(ModelConfigErrors, LlamaBiasesAndOtherActivationsAreNotSupported) {
  json j = llama2();
  j["attention_bias"] = true;
  EXPECT_THAT(parse_error(j), HasSubstr("attention_bias true"));
  j = llama2();
  j["mlp_bias"] = true;
  EXPECT_THAT(parse_error(j), HasSubstr("mlp_bias true is not supported"));
  j = llama2();
  j["hidden_act"] = "gelu";
  EXPECT_THAT(parse_error(j), HasSubstr("hidden_act 'gelu' is not supported"));
}

class ConfigFile : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("flotilla_config_test_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path write(const std::string& text) {
    const auto path = dir_ / "config.json";
    std::ofstream(path) << text;
    return path;
  }
  std::string load_error(const std::filesystem::path& path) {
    try {
      ModelConfig::load(path);
    } catch (const InputError& e) {
      return e.what();
    }
    ADD_FAILURE() << "no InputError";
    return "";
  }
  std::filesystem::path dir_;
};

TEST_F(ConfigFile, LoadsAFile) {
  const auto path = write(kQwen2_05B);
  EXPECT_EQ(ModelConfig::load(path).num_params(), 494'032'768);
}

TEST_F(ConfigFile, MissingFileIsAnInputError) {
  EXPECT_THAT(load_error(dir_ / "absent.json"), HasSubstr("absent.json: file not found"));
}

TEST_F(ConfigFile, InvalidJsonNamesTheFileAndBytePosition) {
  const auto path = write("{\"model_type\": \"llama\",\n \"hidden_size\": 4096,,}");
  const std::string msg = load_error(path);
  EXPECT_THAT(msg, HasSubstr(path.string() + ": not valid JSON (byte 46): parse error at line 2"));
}

TEST_F(ConfigFile, FieldErrorsNameTheFile) {
  const auto path = write(R"({"model_type": "gpt2"})");
  EXPECT_THAT(load_error(path), HasSubstr(path.string() + ": unknown model_type 'gpt2'"));
}

}  // namespace
}  // namespace flotilla::model
