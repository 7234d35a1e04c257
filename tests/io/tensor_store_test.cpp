#include "flotilla/io/tensor_store.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "io_test_util.hpp"
#include "../test_errors.hpp"

namespace flotilla::io {
namespace {
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::flotilla::testing::input_error_of;
using test_util::fresh_seed;
using test_util::random_floats;
using test_util::TempDir;
using test_util::write_bytes;
using test_util::write_raw_safetensors;

std::string store_error(const std::filesystem::path& path) {
  return input_error_of([&] { TensorStore s(path); });
}

// A small model's worth of named tensors with random values.
struct Weights {
  explicit Weights(uint32_t seed)
      : embed(random_floats(16 * 8, seed)),
        q(random_floats(8 * 8, seed + 1)),
        norm(random_floats(8, seed + 2)),
        head(random_floats(16 * 8, seed + 3)) {}
  std::vector<TensorToWrite> tensors() const {
    return {{"model.embed_tokens.weight", {16, 8}, embed.data()},
            {"model.layers.0.self_attn.q_proj.weight", {8, 8}, q.data()},
            {"model.norm.weight", {8}, norm.data()},
            {"lm_head.weight", {16, 8}, head.data()}};
  }
  std::vector<float> embed, q, norm, head;
};

void expect_reads_back(const TensorStore& store, const std::vector<TensorToWrite>& tensors) {
  for (const auto& t : tensors) {
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    std::vector<float> got(static_cast<size_t>(numel));
    store.read_f32(t.name, got, t.shape);
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], t.data[i]) << t.name << "[" << i << "]";
  }
}

// -------------------------------------------------------------------------- reading

TEST(TensorStore, ReadsASingleFileDirectory) {
  TempDir tmp;
  const Weights w(fresh_seed());
  const auto files = write_safetensors_sharded(tmp.path(), w.tensors(), DType::f32, 1 << 20);
  EXPECT_THAT(files, ElementsAre(tmp / "model.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(tmp / "model.safetensors.index.json"));

  const TensorStore store(tmp.path());
  EXPECT_EQ(store.size(), 4u);
  EXPECT_THAT(store.names(), ElementsAre("lm_head.weight", "model.embed_tokens.weight",
                                         "model.layers.0.self_attn.q_proj.weight",
                                         "model.norm.weight"));
  EXPECT_TRUE(store.has("model.norm.weight"));
  EXPECT_FALSE(store.has("model.norm"));
  const TensorEntry& info = store.info("model.embed_tokens.weight");
  EXPECT_EQ(info.dtype, DType::f32);
  EXPECT_EQ(info.shape, (std::vector<int64_t>{16, 8}));
  EXPECT_EQ(info.file, tmp / "model.safetensors");
  expect_reads_back(store, w.tensors());
}

TEST(TensorStore, OpensASingleSafetensorsFileGivenDirectly) {
  TempDir tmp;
  const Weights w(fresh_seed());
  write_safetensors(tmp / "adapter_model.safetensors", w.tensors(), DType::f32);
  const TensorStore store(tmp / "adapter_model.safetensors");
  EXPECT_EQ(store.size(), 4u);
  expect_reads_back(store, w.tensors());
}

TEST(TensorStore, ConvertsHalfPrecisionToFloat32) {
  TempDir tmp;
  const Weights w(fresh_seed());
  for (DType dt : {DType::f16, DType::bf16}) {
    SCOPED_TRACE(std::string(dtype_name(dt)));
    write_safetensors(tmp / "model.safetensors", w.tensors(), dt);
    const TensorStore store(tmp.path());
    std::vector<float> got(8);
    store.read_f32("model.norm.weight", got, {8});
    EXPECT_EQ(store.info("model.norm.weight").dtype, dt);
    for (size_t i = 0; i < got.size(); ++i) {
      const float want = dt == DType::f16 ? f16_to_f32(f32_to_f16(w.norm[i]))
                                          : bf16_to_f32(f32_to_bf16(w.norm[i]));
      EXPECT_EQ(got[i], want) << i;
    }
  }
}

TEST(TensorStore, ASliceEqualsThatPartOfTheWholeTensorInEveryDtype) {
  TempDir tmp;
  const Weights w(fresh_seed());
  for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
    SCOPED_TRACE(std::string(dtype_name(dt)));
    write_safetensors(tmp / "model.safetensors", w.tensors(), dt);
    const TensorStore store(tmp.path());
    std::vector<float> whole(16 * 8);
    store.read_f32("lm_head.weight", whole, {16, 8});
    // Cutting rows in the middle, a single element, the last element, and nothing.
    for (const auto& [first, count] : {std::pair<int64_t, int64_t>{5, 17}, {0, 1}, {127, 1}, {64, 0}, {0, 128}}) {
      std::vector<float> part(static_cast<size_t>(count), -7.0f);
      store.read_f32_slice("lm_head.weight", std::vector<int64_t>{16, 8}, first, part);
      for (int64_t i = 0; i < count; ++i) ASSERT_EQ(part[static_cast<size_t>(i)], whole[static_cast<size_t>(first + i)]) << first << "+" << i;
    }
    // A slice past the end is the caller's fault; a wrong shape is the file's, as for a whole read.
    std::vector<float> two(2);
    EXPECT_THROW(store.read_f32_slice("lm_head.weight", std::vector<int64_t>{16, 8}, 127, two), Error);
    EXPECT_THAT(input_error_of([&] { store.read_f32_slice("lm_head.weight", std::vector<int64_t>{8, 16}, 0, two); }),
                HasSubstr("tensor 'lm_head.weight' has shape [16, 8], expected [8, 16]"));
  }
}

TEST(TensorStore, ASliceChecksOnlyItsOwnElementsForNonFiniteValues) {
  TempDir tmp;
  const Weights w(fresh_seed());
  std::vector<float> norm(w.norm.begin(), w.norm.end());
  norm[5] = std::numeric_limits<float>::quiet_NaN();
  std::vector<TensorToWrite> tensors = w.tensors();
  for (TensorToWrite& t : tensors)
    if (t.name == "model.norm.weight") t.data = norm.data();
  write_safetensors(tmp / "model.safetensors", tensors, DType::bf16);
  const TensorStore strict(tmp.path(), NonFinitePolicy::refuse);
  std::vector<float> part(3);
  EXPECT_NO_THROW(strict.read_f32_slice("model.norm.weight", std::vector<int64_t>{8}, 0, part));  // [0, 3)
  EXPECT_THAT(input_error_of([&] { strict.read_f32_slice("model.norm.weight", std::vector<int64_t>{8}, 4, part); }),
              HasSubstr("tensor 'model.norm.weight' holds 1 non-finite value among elements [4, 7), the part read "
                        "(the first, NaN, at flat index 5)"));
}

TEST(TensorStore, ShardedRoundTrip) {
  TempDir tmp;
  const Weights w(fresh_seed());
  // 16*8*4 = 512 bytes per big tensor: a 600-byte limit gives embed | q + norm | head.
  const auto files = write_safetensors_sharded(tmp.path(), w.tensors(), DType::f32, 600);
  EXPECT_THAT(files, ElementsAre(tmp / "model-00001-of-00003.safetensors",
                                 tmp / "model-00002-of-00003.safetensors",
                                 tmp / "model-00003-of-00003.safetensors",
                                 tmp / "model.safetensors.index.json"));
  EXPECT_FALSE(std::filesystem::exists(tmp / "model.safetensors"));

  const auto index = nlohmann::json::parse(read_text_file(tmp / "model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], (16 * 8 + 8 * 8 + 8 + 16 * 8) * 4);
  EXPECT_EQ(index["weight_map"]["model.embed_tokens.weight"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["model.layers.0.self_attn.q_proj.weight"],
            "model-00002-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["model.norm.weight"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["lm_head.weight"], "model-00003-of-00003.safetensors");

  const TensorStore store(tmp.path());
  EXPECT_EQ(store.size(), 4u);
  EXPECT_EQ(store.info("model.norm.weight").file, tmp / "model-00002-of-00003.safetensors");
  expect_reads_back(store, w.tensors());
}

TEST(TensorStore, TensorLargerThanTheShardLimitGetsAShardAlone) {
  TempDir tmp;
  const Weights w(fresh_seed());
  const auto files = write_safetensors_sharded(tmp.path(), w.tensors(), DType::bf16, 100);
  // embed (256 B) | q (128 B) | norm (16 B) | head (256 B): no two neighbours fit in 100 B,
  // so every tensor is a shard of its own, oversized ones included.
  EXPECT_EQ(files.size(), 5u);
  EXPECT_EQ(files[3], tmp / "model-00004-of-00004.safetensors");
  const TensorStore store(tmp.path());
  EXPECT_EQ(store.size(), 4u);
  EXPECT_EQ(store.info("lm_head.weight").file, tmp / "model-00004-of-00004.safetensors");
}

TEST(TensorStore, SavingTheOtherLayoutRemovesStaleWeightFiles) {
  TempDir tmp;
  const Weights w(fresh_seed());
  write_safetensors_sharded(tmp.path(), w.tensors(), DType::f32, 600);
  write_bytes(tmp / "tokenizer.json", "{}");
  // Now small enough for one file: the old shards and index must go, or tools that glob
  // model*.safetensors would load both.
  write_safetensors_sharded(tmp.path(), w.tensors(), DType::f32, 1 << 20);
  std::vector<std::string> left;
  for (const auto& e : std::filesystem::directory_iterator(tmp.path()))
    left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_THAT(left, ElementsAre("model.safetensors", "tokenizer.json"));

  // And back: a model.safetensors left next to new shards would shadow them.
  write_safetensors_sharded(tmp.path(), w.tensors(), DType::f32, 600);
  EXPECT_FALSE(std::filesystem::exists(tmp / "model.safetensors"));
  expect_reads_back(TensorStore(tmp.path()), w.tensors());
}

// ------------------------------------------------------------------------ bad input

TEST(TensorStoreErrors, MissingPathIsRejected) {
  TempDir tmp;
  const std::string msg = store_error(tmp / "nope");
  EXPECT_THAT(msg, HasSubstr("[io/tensor_store]"));
  EXPECT_THAT(msg, HasSubstr("nope: no such file or directory"));
}

TEST(TensorStoreErrors, DirectoryWithoutSafetensorsIsRejected) {
  TempDir tmp;
  write_bytes(tmp / "config.json", "{}");
  const std::string msg = store_error(tmp.path());
  EXPECT_THAT(msg, HasSubstr(tmp.path().string()));
  EXPECT_THAT(msg, HasSubstr("no model.safetensors or model.safetensors.index.json"));

  write_bytes(tmp / "pytorch_model.bin", "x");
  EXPECT_THAT(store_error(tmp.path()), HasSubstr("found pytorch_model.bin"));
  write_bytes(tmp / "consolidated.safetensors", "x");
  EXPECT_THAT(store_error(tmp.path()), HasSubstr("found consolidated.safetensors"));
}

TEST(TensorStoreErrors, IndexNamingAMissingShardIsRejected) {
  TempDir tmp;
  const Weights w(fresh_seed());
  write_safetensors_sharded(tmp.path(), w.tensors(), DType::f32, 600);
  std::filesystem::remove(tmp / "model-00003-of-00003.safetensors");
  const std::string msg = store_error(tmp.path());
  EXPECT_THAT(msg, HasSubstr("model.safetensors.index.json"));
  EXPECT_THAT(msg, HasSubstr("shard 'model-00003-of-00003.safetensors' (listed for tensor "
                             "'lm_head.weight') does not exist"));
}

TEST(TensorStoreErrors, TensorListedInIndexButAbsentFromItsShardIsRejected) {
  TempDir tmp;
  const Weights w(fresh_seed());
  write_safetensors_sharded(tmp.path(), w.tensors(), DType::f32, 600);
  auto index = nlohmann::json::parse(read_text_file(tmp / "model.safetensors.index.json"));
  index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors";
  write_bytes(tmp / "model.safetensors.index.json", index.dump());
  const std::string msg = store_error(tmp.path());
  EXPECT_THAT(msg, HasSubstr("model-00001-of-00003.safetensors"));
  EXPECT_THAT(msg, HasSubstr("tensor 'model.norm.weight' listed in model.safetensors.index.json "
                             "is missing from this shard"));
}

TEST(TensorStoreErrors, MalformedIndexIsRejected) {
  TempDir tmp;
  write_bytes(tmp / "model.safetensors.index.json", "{\"weight_map\": ");
  EXPECT_THAT(store_error(tmp.path()), HasSubstr("model.safetensors.index.json: not valid JSON"));
  write_bytes(tmp / "model.safetensors.index.json", R"({"metadata": {}})");
  EXPECT_THAT(store_error(tmp.path()), HasSubstr("missing object 'weight_map'"));
  write_bytes(tmp / "model.safetensors.index.json", R"({"weight_map": {"w": 3}})");
  EXPECT_THAT(store_error(tmp.path()), HasSubstr("weight_map entry for 'w' is not a string"));
  write_bytes(tmp / "model.safetensors.index.json", R"({"weight_map": {"w": "../x.safetensors"}})");
  EXPECT_THAT(store_error(tmp.path()), HasSubstr("not a file name in the model directory"));
}

TEST(TensorStoreErrors, CorruptShardIsRejectedNamingIt) {
  TempDir tmp;
  write_raw_safetensors(tmp / "model.safetensors", "{oops", "");
  const std::string msg = store_error(tmp.path());
  EXPECT_THAT(msg, HasSubstr((tmp / "model.safetensors").string()));
  EXPECT_THAT(msg, HasSubstr("header is not valid JSON"));
}

TEST(TensorStoreErrors, WrongShapeIsRejectedWithBothShapes) {
  TempDir tmp;
  const std::vector<float> q(64 * 32, 0.5f);
  const std::vector<TensorToWrite> tensors{
      {"model.layers.0.self_attn.q_proj.weight", {64, 32}, q.data()}};
  write_safetensors(tmp / "model.safetensors", tensors, DType::f32);
  const TensorStore store(tmp.path());
  std::vector<float> dst(64 * 64);
  const std::string msg = input_error_of(
      [&] { store.read_f32("model.layers.0.self_attn.q_proj.weight", dst, {64, 64}); });
  EXPECT_THAT(msg, HasSubstr((tmp / "model.safetensors").string() +
                             ": tensor 'model.layers.0.self_attn.q_proj.weight' has shape "
                             "[64, 32], expected [64, 64]"));
}

TEST(TensorStoreErrors, NonFloatDtypeIsRejectedNamingIt) {
  TempDir tmp;
  write_raw_safetensors(tmp / "model.safetensors",
                        R"({"ids":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})", "abcdefgh");
  const TensorStore store(tmp.path());
  std::vector<float> dst(2);
  const std::string msg = input_error_of([&] { store.read_f32("ids", dst, {2}); });
  EXPECT_THAT(msg, HasSubstr("model.safetensors: tensor 'ids' has dtype I32, expected F32, F16 "
                             "or BF16"));
}

TEST(TensorStoreErrors, MissingTensorIsRejectedNamingTensorAndDirectory) {
  TempDir tmp;
  const Weights w(fresh_seed());
  write_safetensors(tmp / "model.safetensors", w.tensors(), DType::f32);
  const TensorStore store(tmp.path());
  std::vector<float> dst(8);
  const std::string msg = input_error_of([&] { store.read_f32("model.layers.1.norm", dst, {8}); });
  EXPECT_THAT(msg, HasSubstr(tmp.path().string() + ": no tensor 'model.layers.1.norm'"));
  // A prefix mismatch gets a suggestion.
  EXPECT_THAT(input_error_of([&] { store.read_f32("norm.weight", dst, {8}); }),
              HasSubstr("did you mean 'model.norm.weight'?"));
}

TEST(TensorStore, NonFiniteWeightsAreNamedWarnedAboutByDefaultAndRefusedWhenStrict) {
  TempDir tmp;
  const Weights w(fresh_seed());
  for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
    SCOPED_TRACE(std::string(dtype_name(dt)));
    std::vector<float> norm(w.norm.begin(), w.norm.end());
    norm[5] = std::numeric_limits<float>::quiet_NaN();
    norm[6] = -std::numeric_limits<float>::infinity();
    std::vector<TensorToWrite> tensors = w.tensors();
    for (TensorToWrite& t : tensors)
      if (t.name == "model.norm.weight") t.data = norm.data();
    write_safetensors(tmp / "model.safetensors", tensors, dt);
    std::vector<float> got(8);
    // Default: the values load as they are (the caller decides), with a warning.
    const TensorStore lenient(tmp.path());
    lenient.read_f32("model.norm.weight", got, {8});
    EXPECT_TRUE(std::isnan(got[5]));
    EXPECT_EQ(got[6], -std::numeric_limits<float>::infinity());
    // Strict: an InputError naming the file, the tensor, the count and the first one.
    const TensorStore strict(tmp.path(), NonFinitePolicy::refuse);
    try {
      strict.read_f32("model.norm.weight", got, {8});
      ADD_FAILURE() << "no error for NaN and -inf";
    } catch (const InputError& e) {
      EXPECT_THAT(e.what(), HasSubstr("model.safetensors: tensor 'model.norm.weight' holds 2 non-finite values "
                                      "(the first, NaN, at flat index 5)"));
    }
    // The finite tensors of the same file read under either policy.
    for (const TensorToWrite& t : tensors) {
      if (t.name == "model.norm.weight") continue;
      std::vector<float> other(t.shape.size() == 2 ? static_cast<size_t>(t.shape[0] * t.shape[1])
                                                   : static_cast<size_t>(t.shape[0]));
      EXPECT_NO_THROW(strict.read_f32(t.name, other, t.shape));
    }
  }
}

}  // namespace
}  // namespace flotilla::io
